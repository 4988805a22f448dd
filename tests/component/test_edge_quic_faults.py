"""The edge's QUIC endpoint when things go wrong on purpose: stateless resets for connections it does not
know (an edge restart), and the QUIC faults quic-idle, quic-blackhole and quic-refuse-handshake, against
the scripted qh3 connector of test_edge_quic."""

from __future__ import annotations

import logging
import socket
from typing import Any

import trio

from tests.component.test_edge_quic import QuicConnector, quic_connector, wait_routable
from tests.component.test_edge_support import make_tunnel, running_edge, split
from tunnel_lab.edge.api import apply_fault, clear_fault
from tunnel_lab.lab import paths
from tunnel_lab.transport.qh3 import ResetAwareConnection
from tunnel_lab.wire.registration import ConnectionDetails
from tunnel_lab.wire.stateless_reset import RESET_SIZE, reset_token


async def _udp_exchange(address: str, packets: list[bytes]) -> bytes:
    """Send `packets` in order from one socket; the first datagram that comes back."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for packet in packets:
            sock.sendto(packet, split(address))
        await trio.lowlevel.wait_readable(sock)
        return sock.recv(2048)


async def test_an_unknown_short_header_packet_gets_a_stateless_reset(tmp_path):
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, _):
            key = paths.quic_reset_key(tmp_path / "state")  # the edge made it; a restart reads it again
            tiny_cid, cid = b"tinytiny", b"unknown!"
            tiny = b"\x40" + tiny_cid + bytes(12)  # 21 bytes: no valid reset could be smaller
            packet = b"\x41" + cid + bytes(60)
            reply = await _udp_exchange(edge.listeners["LAB1"].quic_address, [tiny, packet])
            # The first answer is the long packet's: the tiny one got none.
            assert reply[-16:] == reset_token(key, cid)
            assert len(reply) == RESET_SIZE < len(packet)
            assert reply[0] & 0xC0 == 0x40


async def test_a_connection_the_edge_forgot_ends_at_its_reset(tmp_path):
    """Two edges on one state directory stand for one edge before and after a restart: the connector's
    packets for its connection on the first, sent to the second, are answered with a reset it obeys."""
    with trio.fail_after(30):
        async with running_edge(tmp_path) as (old, nursery), running_edge(tmp_path) as (new, _):
            t = make_tunnel(old, "t1", "app.test")
            conn = QuicConnector(old.listeners["LAB1"].quic_address, str(old.pki.ca_pem_path))
            conn.quic = ResetAwareConnection(configuration=conn.quic._configuration)  # as our connector
            await nursery.start(conn.run)
            assert isinstance(await conn.register(t), ConnectionDetails)
            conn.addr = split(new.listeners["LAB1"].quic_address)
            conn.transmit = _redirected(conn)  # type: ignore[method-assign]
            conn.quic.send_ping(1)
            conn.transmit()
            await conn.closed.wait()
            assert conn.terminated is not None and conn.terminated.reason_phrase == "Stateless reset"


def _redirected(conn: QuicConnector) -> Any:
    def transmit() -> None:
        for data, _addr in conn.quic.datagrams_to_send(now=trio.current_time()):
            conn.sock.sendto(data, conn.addr)
        conn._wake.unpark_all()
    return transmit


async def _short_idle_connector(nursery: trio.Nursery, edge: Any) -> QuicConnector:
    conn = QuicConnector(edge.listeners["LAB1"].quic_address, str(edge.pki.ca_pem_path))
    conn.quic._configuration.idle_timeout = 1.0  # negotiated: the edge's side times out after it too
    await nursery.start(conn.run)
    return conn


async def test_quic_idle_silences_a_connection_until_both_sides_time_out(tmp_path):
    with trio.fail_after(30):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await _short_idle_connector(nursery, edge)
            assert isinstance(await conn.register(t), ConnectionDetails)
            await wait_routable(edge, t)
            answer = await apply_fault(edge.state, edge, {"kind": "quic-idle", "tunnel_id": str(t.id)})
            assert answer["affected"] == 1
            assert not edge.registry.routable(t.id)  # no new request goes to a silent connection
            await conn.closed.wait()
            assert conn.terminated is not None and conn.terminated.reason_phrase == "Idle timeout"  # no CLOSE
            while edge.registry.listed():
                await trio.sleep(0.01)
            # Its path stays dark after it ended: the first answer is to the unknown connection's packet.
            dark_cid = conn.quic._peer_cid.cid
            key = paths.quic_reset_key(tmp_path / "state")
            reply = await _udp_exchange(edge.listeners["LAB1"].quic_address,
                                        [b"\x40" + dark_cid + bytes(60), b"\x41unknown!" + bytes(60)])
            assert reply[-16:] == reset_token(key, b"unknown!")


async def test_quic_blackhole_drops_everything_until_cleared(tmp_path):
    with trio.fail_after(30):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await _short_idle_connector(nursery, edge)
            assert isinstance(await conn.register(t), ConnectionDetails)
            fault = await apply_fault(edge.state, edge, {"kind": "quic-blackhole", "location": "LAB1"})
            assert fault["silenced"] == 1
            await conn.closed.wait()
            assert conn.terminated is not None and conn.terminated.reason_phrase == "Idle timeout"
            await clear_fault(edge.state, edge, fault["id"])
            again = await quic_connector(nursery, edge)
            assert isinstance(await again.register(t), ConnectionDetails)


async def test_quic_refuse_handshake_closes_new_connections_with_its_code(tmp_path):
    with trio.fail_after(30):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await apply_fault(edge.state, edge, {"kind": "quic-refuse-handshake", "count": 1,
                                                 "reason": "not today"})
            refused = await quic_connector(nursery, edge)
            await refused.closed.wait()
            assert refused.terminated is not None
            assert (refused.terminated.error_code, refused.terminated.reason_phrase) == (0x2, "not today")
            assert not refused.connected.is_set() or refused.terminated.frame_type is not None
            accepted = await quic_connector(nursery, edge)  # the fault is used up
            assert isinstance(await accepted.register(t), ConnectionDetails)
            assert edge.state.faults.of_kind("quic-refuse-handshake") == []


async def test_a_handshake_with_another_sni_is_refused(tmp_path, caplog):
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            with caplog.at_level(logging.WARNING, logger="tunnel_lab.edge.quic"):
                wrong = await quic_connector(nursery, edge, server_name="h2.cftunnel.com")
                await wrong.closed.wait()
            assert wrong.terminated is not None
            assert wrong.terminated.error_code == 0x100 + 112  # CRYPTO_ERROR unrecognized_name
            assert any("SNI 'h2.cftunnel.com', not 'quic.cftunnel.com': refused" in r.getMessage()
                       for r in caplog.records)
            right = await quic_connector(nursery, edge)
            assert isinstance(await right.register(t), ConnectionDetails)


async def test_a_precheck_probe_handshake_is_accepted(tmp_path, caplog):
    # cloudflared's connectivity pre-checks (and `tunnel diag`'s) handshake with SNI probe.cftunnel.com,
    # then close at once: the real edge lets them through, so must the lab's
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            with caplog.at_level(logging.WARNING, logger="tunnel_lab.edge.quic"):
                probe = await quic_connector(nursery, edge, server_name="probe.cftunnel.com")
                await probe.connected.wait()
            assert not any("refused" in r.getMessage() for r in caplog.records)
            probe.quic.close(error_code=0, reason_phrase="precheck complete")
            probe.transmit()
            await probe.closed.wait()

"""Our connector over QUIC against a scripted qh3 edge (tests/component/quic_edge_peer.py): registration on
the control stream, a data stream through the same Proxy as http2, UDP sessions over RPC streams and datagrams
v2 and v3, bad datagrams and streams."""

from __future__ import annotations

import ipaddress
import logging
import socket
import uuid
from pathlib import Path

import pytest
import trio

from tests.component.connector_edge import (
    http_rule,
    make_settings,
    start_connector,
    status_rule,
    wait_ready,
    wait_until,
)
from tests.component.quic_edge_peer import QuicEdgePeer, quic_edge_cert
from tunnel_lab.connector.quic_conn import IDLE_TIMEOUT
from tunnel_lab.wire import datagram as dg
from tunnel_lab.wire import quic_stream as qs
from tunnel_lab.wire import session_rpc as srpc

SID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")


async def udp_echo(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, addr = await sock.recvfrom(65536)
            await sock.sendto(b"echo:" + data, addr)


async def _start(nursery: trio.Nursery, tmp_path: Path, **kw: object) -> tuple[QuicEdgePeer, object]:
    ca, cert, key = quic_edge_cert(tmp_path)
    peer = QuicEdgePeer(cert, key)
    nursery.start_soon(peer.serve)
    settings = make_settings(ca, [peer.address], (status_rule(418),), protocol="quic", ha_connections=1,
                             **kw)
    running = await start_connector(nursery, settings)
    await wait_ready(running)
    return peer, running


async def _rpc_call(peer: QuicEdgePeer, client: srpc.SessionRpcClient, qid: int) -> object:
    sid = peer.open_stream(qs.rpc_stream_preamble() + client.data_to_send())
    answers: list[object] = []

    def answered() -> bool:
        data = bytes(peer.streams.pop(sid, b""))
        if data:
            answers.extend(ev for ev in client.receive_data(data) if getattr(ev, "question_id", None) == qid)
            out = client.data_to_send()
            if out:
                peer.send(sid, out)
        return bool(answers)

    await peer.wait(answered)
    client.abort()
    peer.send(sid, client.data_to_send(), end=True)
    return answers[0]


async def test_registers_over_quic_and_serves_a_data_stream(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            peer, running = await _start(nursery, tmp_path)
            (reg,) = peer.registrations
            assert reg.params.conn_index == 0
            request = qs.ConnectRequest(dest="http://app.example.test/x", type=qs.ConnectionType.HTTP,
                                        metadata=(("HttpMethod", "GET"), ("HttpHost", "app.example.test")))
            sid = peer.open_stream(qs.encode_connect_request(request), end=True)
            await peer.wait(lambda: sid in peer.ended)
            head = qs.StreamHeadReader(expect="response").feed(bytes(peer.streams[sid]))
            assert head is not None and isinstance(head.message, qs.ConnectResponse)
            assert head.message.error == "" and head.message.get("HttpStatus") == "418"
            running.handle.shutdown()  # type: ignore[attr-defined]
            assert await running.exit_code() == 0  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()
            assert await running.exit_code() == 0  # type: ignore[attr-defined]
            assert peer.unregistered
            nursery.cancel_scope.cancel()


async def upgrading_origin(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """An origin that answers any request with 101 Switching Protocols, then echoes."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some()
            await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
            async for data in stream:
                await stream.send_all(data)

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve, listeners)


async def test_a_websocket_upgrade_answers_with_the_origins_101(tmp_path: Path) -> None:
    # cloudflared's QUIC response adapter writes the origin's status as it is: 101 for a WebSocket
    # (only its http2 writer turns it into 200).
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(upgrading_origin)
            ca, cert, key = quic_edge_cert(tmp_path)
            peer = QuicEdgePeer(cert, key)
            nursery.start_soon(peer.serve)
            settings = make_settings(ca, [peer.address], (http_rule(port),), protocol="quic",
                                     ha_connections=1)
            running = await start_connector(nursery, settings)
            await wait_ready(running)
            request = qs.ConnectRequest(
                dest="http://app.example.test/ws", type=qs.ConnectionType.WEBSOCKET,
                metadata=(("HttpMethod", "GET"), ("HttpHost", "app.example.test"),
                          ("HttpHeader:Sec-Websocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                          ("HttpHeader:Sec-Websocket-Version", "13")))
            sid = peer.open_stream(qs.encode_connect_request(request))

            def answered() -> bool:
                return qs.StreamHeadReader(expect="response").feed(bytes(peer.streams.get(sid, b""))) \
                    is not None

            await peer.wait(answered)
            head = qs.StreamHeadReader(expect="response").feed(bytes(peer.streams[sid]))
            assert head is not None and isinstance(head.message, qs.ConnectResponse)
            assert head.message.error == ""
            assert head.message.get("HttpStatus") == "101", head.message
            nursery.cancel_scope.cancel()


async def test_an_idle_connection_outlives_the_idle_timeout(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # qh3 sends no keep-alive of its own: without our PINGs the 5 s idle timeout ends a quiet tunnel
    # connection (failover-dc-down over QUIC lost both connections while it waited for the backoff)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            _peer, running = await _start(nursery, tmp_path)
            await trio.sleep(IDLE_TIMEOUT + 1.5)  # nothing to wait on: the point is that nothing happens
            assert running.handle.ready_connections == 1  # type: ignore[attr-defined]
            assert "no recent network activity" not in caplog.text
            running.handle.shutdown()  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()


async def test_a_stateless_reset_on_conn_index_0_reconnects_without_the_supervisor_backoff(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # cloudflared (observed, failover-edge-crash): quic-go ends the connection at the reset, its stream
    # listener fails, and startFirstTunnel serves connIndex 0 again after the per-connection backoff only.
    # The supervisor backoff is set far beyond the guard below: waiting it would fail the test.
    caplog.set_level(logging.INFO)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            peer, running = await _start(nursery, tmp_path, supervisor_backoff_base=3600.0)
            peer.stateless_reset()
            await peer.wait(lambda: len(peer.registrations) == 2)
            await wait_ready(running)
            running.handle.shutdown()  # type: ignore[attr-defined]
            assert await running.exit_code() == 0  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()
    text = caplog.text
    assert ('failed to accept incoming stream requests error="failed to accept QUIC stream: received a '
            'stateless reset" connIndex=0') in text
    assert 'failed to run the datagram handler error="context canceled" connIndex=0' in text
    listener = 'error="accept stream listener encountered a failure while serving" connIndex=0'
    assert f"failed to serve tunnel connection {listener}" in text
    assert f"Serve tunnel error {listener}" in text
    assert "Retrying connection in up to 50ms connIndex=0" in text  # the per-connection backoff (FAST_KNOBS)
    assert "Connection terminated error" not in text
    assert "Lost connection with the edge" not in text  # cloudflared's http2 connection says it, not QUIC's


async def test_udp_session_v2_over_rpc_and_datagrams(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(udp_echo)
            peer, running = await _start(nursery, tmp_path)
            client = srpc.SessionRpcClient()
            qid = client.register_udp_session(srpc.RegisterUdpSessionParams(
                session_id=SID, dst_ip=ipaddress.IPv4Address("127.0.0.1"), dst_port=echo_port,
                close_after_idle_ns=30 * 10**9))
            assert await _rpc_call(peer, client, qid) == srpc.UdpSessionRegistered(question_id=qid, error="")
            peer.send_datagram(dg.encode_v2_session(SID, b"ping"))
            await peer.wait(lambda: bool(peer.datagrams))
            echoed = dg.decode_v2(peer.datagrams.pop())
            assert echoed == dg.V2SessionDatagram(session_id=SID, payload=b"echo:ping")

            # bad input: garbage, an unknown session; the session carries on
            peer.send_datagram(b"\x07garbage\x09")
            peer.send_datagram(dg.encode_v2_session(uuid.uuid4(), b"lost"))
            peer.send_datagram(dg.encode_v2_session(SID, b"again"))
            await peer.wait(lambda: bool(peer.datagrams))
            assert dg.decode_v2(peer.datagrams.pop()).payload == b"echo:again"  # type: ignore[union-attr]
            assert "Failed to demux datagram" in caplog.text and "unexpected datagram type 9" in caplog.text
            assert "session not found" in caplog.text

            client = srpc.SessionRpcClient()
            qid = client.unregister_udp_session(SID, "eyeball went away")
            await _rpc_call(peer, client, qid)
            conn = running.handle.supervisor.connections[0]  # type: ignore[attr-defined]
            with trio.fail_after(5):
                while conn.udp.active:
                    await trio.sleep(0.01)
            assert "session closed by remote due to eyeball went away" in caplog.text
            running.handle.shutdown()  # type: ignore[attr-defined]
            assert await running.exit_code() == 0  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()


async def test_udp_flow_v3_in_datagrams(tmp_path: Path) -> None:
    from tunnel_lab.connector.settings import TunnelSettings

    features = (*TunnelSettings.__dataclass_fields__["features"].default, "support_datagram_v3_2")  # type: ignore[misc]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(udp_echo)
            peer, running = await _start(nursery, tmp_path, features=features)
            rid = 0xABC
            peer.send_datagram(dg.encode_v3(dg.V3Registration(
                request_id=rid, address=ipaddress.IPv4Address("127.0.0.1"), port=echo_port,
                idle_hint_seconds=5)))
            await peer.wait(lambda: bool(peer.datagrams))
            assert dg.decode_v3(peer.datagrams.pop()) == dg.V3RegistrationResponse(
                request_id=rid, response=dg.V3Response.OK)
            peer.send_datagram(dg.encode_v3(dg.V3Payload(request_id=rid, payload=b"v3")))
            await peer.wait(lambda: bool(peer.datagrams))
            assert dg.decode_v3(peer.datagrams.pop()) == dg.V3Payload(request_id=rid, payload=b"echo:v3")
            # v2's RPC is refused in v3, as cloudflared does
            client = srpc.SessionRpcClient()
            qid = client.register_udp_session(srpc.RegisterUdpSessionParams(
                session_id=SID, dst_ip=ipaddress.IPv4Address("127.0.0.1"), dst_port=echo_port))
            answer = await _rpc_call(peer, client, qid)
            assert answer == srpc.UdpSessionRegistered(
                question_id=qid, error="datagram v3 does not support RegisterUdpSession RPC")
            running.handle.shutdown()  # type: ignore[attr-defined]
            assert await running.exit_code() == 0  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()


async def test_a_stream_with_a_bad_signature_is_reset_and_the_connection_carries_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            peer, running = await _start(nursery, tmp_path)
            bad = peer.open_stream(b"NOTASIGNATURE", end=True)
            await peer.wait(lambda: bad in peer.resets)
            assert "Malformed stream from the edge" in caplog.text
            assert "unknown stream signature" in caplog.text
            request = qs.ConnectRequest(dest="http://a.test/", type=qs.ConnectionType.HTTP,
                                        metadata=(("HttpMethod", "GET"), ("HttpHost", "a.test")))
            sid = peer.open_stream(qs.encode_connect_request(request), end=True)
            await peer.wait(lambda: sid in peer.ended)
            assert peer.terminated is None
            running.handle.shutdown()  # type: ignore[attr-defined]
            assert await running.exit_code() == 0  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()


async def test_a_malformed_rpc_stream_is_reset_with_a_warning(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            peer, running = await _start(nursery, tmp_path)
            bad = peer.open_stream(qs.rpc_stream_preamble() + b"\x00\x00\x00\x00\xff\xff\xff\x7f" + bytes(8))
            await peer.wait(lambda: bad in peer.resets)
            assert "Malformed RPC stream from the edge" in caplog.text
            # a well-formed call on the next stream is served
            client = srpc.SessionRpcClient()
            qid = client.update_configuration(1, b'{"ingress":[{"service":"http_status:421"}]}')
            answer = await _rpc_call(peer, client, qid)
            assert answer == srpc.ConfigurationUpdated(question_id=qid, latest_version=1, error="")
            conn = running.handle.supervisor.connections[0]  # type: ignore[attr-defined]
            assert conn.proxy.config_version == 1
            running.handle.shutdown()  # type: ignore[attr-defined]
            assert await running.exit_code() == 0  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()


async def test_late_data_for_a_finished_stream_starts_nothing(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            peer, running = await _start(nursery, tmp_path)
            conn = running.handle.supervisor.connections[0]  # type: ignore[attr-defined]
            request = qs.ConnectRequest(dest="http://a.test/", type=qs.ConnectionType.HTTP,
                                        metadata=(("HttpMethod", "GET"), ("HttpHost", "a.test")))
            first = peer.open_stream(qs.encode_connect_request(request))  # no FIN: more could follow
            await peer.wait(lambda: first in peer.ended)
            peer.send(first, b"late bytes", end=True)
            second = peer.open_stream(qs.encode_connect_request(request), end=True)
            await peer.wait(lambda: second in peer.ended)
            # the connector forgets a stream after the peer saw its end: wait for it, not a fixed moment
            await wait_until(lambda: set(conn.transport.streams) <= {0})
            assert "Malformed stream" not in caplog.text
            running.handle.shutdown()  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()


def test_a_stream_whose_reader_stalls_is_reset_past_its_buffer_limit(
        caplog: pytest.LogCaptureFixture) -> None:
    from qh3.quic.configuration import QuicConfiguration

    from tunnel_lab.connector import quic_transport as qt

    transport = qt.QuicTransport(QuicConfiguration(is_client=True), ("127.0.0.1", 9),
                                 stream_buffer_limit=64 * 1024)
    stream = qt.QuicStream(transport, 1)
    resets: list[bool] = []
    stream.on_reset = lambda: resets.append(True)
    for _ in range(4):
        stream._push(bytes(16 * 1024), False)
    assert not stream.overflowed
    stream._push(b"x", False)
    assert stream.overflowed and stream.reset_received == qt.STREAM_OVERFLOW and resets == [True]
    assert not stream._chunks  # what it held is freed
    stream._push(bytes(1000), False)
    assert not stream._chunks
    assert "more than 65536 unread bytes on stream=1" in caplog.text


async def test_an_idle_v2_session_is_unregistered_at_the_edge(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(udp_echo)
            peer, running = await _start(nursery, tmp_path)
            client = srpc.SessionRpcClient()
            qid = client.register_udp_session(srpc.RegisterUdpSessionParams(
                session_id=SID, dst_ip=ipaddress.IPv4Address("127.0.0.1"), dst_port=echo_port,
                close_after_idle_ns=300_000_000))
            assert await _rpc_call(peer, client, qid) == srpc.UdpSessionRegistered(question_id=qid, error="")

            def unregister_call() -> srpc.UnregisterUdpSessionCalled | None:
                for stream_id, data in peer.streams.items():
                    if stream_id % 4 == 0 and data.startswith(qs.rpc_stream_preamble()):
                        server = srpc.SessionRpcServer(srpc.SESSION_MANAGER_METHODS)
                        for event in server.receive_data(bytes(data[len(qs.rpc_stream_preamble()):])):
                            if isinstance(event, srpc.UnregisterUdpSessionCalled):
                                return event
                return None

            await peer.wait(lambda: unregister_call() is not None)
            call = unregister_call()
            assert call is not None and call.session_id == SID and call.message == "session idle for 300ms"
            assert "Session terminated" in caplog.text
            running.handle.shutdown()  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()

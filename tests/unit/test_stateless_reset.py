"""QUIC Stateless Resets: the sans-I/O tokens and datagrams (wire.stateless_reset), the qh3 override that
makes a server's tokens derive from a key (transport.qh3.KeyedResetConnection), and a real qh3 client
ending its connection on such a reset (what our connector does after an edge restart)."""

from __future__ import annotations

from pathlib import Path

import trustme
from hypothesis import given
from hypothesis import strategies as st
from qh3._hazmat import pull_quic_header
from qh3.quic import events as qevents
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from tunnel_lab.transport.qh3 import KeyedResetConnection, ResetAwareConnection
from tunnel_lab.wire.stateless_reset import MIN_RESET_SIZE, RESET_SIZE, reset_for, reset_token

KEY = bytes(range(32))
CLIENT_ADDR = ("127.0.0.1", 40000)
SERVER_ADDR = ("127.0.0.1", 7844)


def test_tokens_depend_on_key_and_connection_id_only() -> None:
    assert reset_token(KEY, b"12345678") == reset_token(bytes(KEY), b"12345678")
    assert len(reset_token(KEY, b"12345678")) == 16
    assert reset_token(KEY, b"12345678") != reset_token(KEY, b"12345679")
    assert reset_token(KEY, b"12345678") != reset_token(bytes(32), b"12345678")


@given(st.binary(min_size=0, max_size=1500))
def test_a_reset_is_valid_smaller_than_its_trigger_and_carries_the_token(packet: bytes) -> None:
    reset = reset_for(KEY, packet, 8)
    short_header = bool(packet) and packet[0] & 0xC0 == 0x40
    if reset is None:
        assert not short_header or len(packet) - 1 < MIN_RESET_SIZE or len(packet) < 9
        return
    assert short_header
    assert MIN_RESET_SIZE <= len(reset) < len(packet)  # never loops (RFC 9000 §10.3.3)
    assert len(reset) == min(len(packet) - 1, RESET_SIZE)
    assert reset[0] & 0xC0 == 0x40  # looks like a short-header packet
    assert reset[-16:] == reset_token(KEY, packet[1:9])


def test_no_reset_for_long_headers_or_tiny_packets() -> None:
    assert reset_for(KEY, b"\xc0" + bytes(1300), 8) is None  # a long header (an Initial)
    assert reset_for(KEY, b"\x40" + bytes(20), 8) is None  # 21 bytes: the reset could not be smaller
    assert reset_for(KEY, b"\x00" + bytes(100), 8) is None  # fixed bit clear: not QUIC v1
    assert reset_for(KEY, b"", 8) is None
    assert reset_for(KEY, b"\x40" + bytes(21), 8) is not None


def _pair(tmp: Path) -> tuple[QuicConnection, KeyedResetConnection]:
    ca = trustme.CA()
    cert = ca.issue_cert("quic.cftunnel.com")
    ca_path, chain_path, key_path = tmp / "ca.pem", tmp / "chain.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    cert.private_key_pem.write_to_path(str(key_path))
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(chain_path), append=True)
    server_config = QuicConfiguration(is_client=False, alpn_protocols=["argotunnel"])
    server_config.load_cert_chain(str(chain_path), str(key_path))
    client_config = QuicConfiguration(is_client=True, alpn_protocols=["argotunnel"],
                                      server_name="quic.cftunnel.com")
    client_config.load_verify_locations(str(ca_path))
    client = ResetAwareConnection(configuration=client_config)
    client.connect(SERVER_ADDR, now=0.0)
    first = client.datagrams_to_send(now=0.0)
    server = KeyedResetConnection(reset_key=KEY, configuration=server_config,
                                  original_destination_connection_id=pull_quic_header(first[0][0], 0, 8)[3])
    pending = [(server, d) for d, _ in first]
    now = 0.0
    while pending:  # hand datagrams back and forth until both sides are quiet
        now += 0.001
        target, data = pending.pop(0)
        target.receive_datagram(data, CLIENT_ADDR if target is server else SERVER_ADDR, now=now)
        other = client if target is server else server
        pending += [(other, d) for d, _ in target.datagrams_to_send(now=now)]
    return client, server


def _events(conn: QuicConnection) -> list[qevents.QuicEvent]:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def test_a_keyed_server_advertises_derived_tokens_and_a_qh3_client_obeys_a_reset(tmp_path: Path) -> None:
    client, server = _pair(tmp_path)
    assert any(isinstance(e, qevents.HandshakeCompleted) for e in _events(client))
    # Pinned qh3 internals (transport.qh3.KeyedResetConnection): every host connection id, the first one
    # (transport parameter) and those issued later (NEW_CONNECTION_ID), carries the derived token.
    host_cids = server._host_cids
    assert len(host_cids) > 1
    for host_cid in host_cids:
        assert host_cid.stateless_reset_token == reset_token(KEY, host_cid.cid)
    # The client learned them: a packet it sends to a server that forgot everything gets a reset that
    # ends the client's connection at once.
    client.send_ping(1)
    packet = client.datagrams_to_send(now=1.0)[0][0]
    reset = reset_for(KEY, packet, len(server.host_cid))
    assert reset is not None
    client.receive_datagram(reset, SERVER_ADDR, now=1.1)
    terminated = [e for e in _events(client) if isinstance(e, qevents.ConnectionTerminated)]
    assert terminated and terminated[0].reason_phrase == "Stateless reset"


def test_a_reset_with_another_key_is_ignored(tmp_path: Path) -> None:
    client, server = _pair(tmp_path)
    _events(client)
    client.send_ping(1)
    packet = client.datagrams_to_send(now=1.0)[0][0]
    reset = reset_for(bytes(32), packet, len(server.host_cid))
    assert reset is not None
    client.receive_datagram(reset, SERVER_ADDR, now=1.1)
    assert not [e for e in _events(client) if isinstance(e, qevents.ConnectionTerminated)]


def test_plain_qh3_clients_ignore_a_reset(tmp_path: Path) -> None:
    # Pins the qh3 behaviour transport.qh3.ResetAwareConnection works around: a plain client drops the
    # reset as "unknown connection id" before looking for a token. When this fails, qh3 fixed it.
    client, server = _pair(tmp_path)
    client.send_ping(1)
    packet = client.datagrams_to_send(now=1.0)[0][0]
    reset = reset_for(KEY, packet, len(server.host_cid))
    assert reset is not None
    _events(client)
    QuicConnection.receive_datagram(client, reset, SERVER_ADDR, now=1.1)
    assert not [e for e in _events(client) if isinstance(e, qevents.ConnectionTerminated)]

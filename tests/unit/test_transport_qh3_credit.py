"""Receive-side backpressure over QUIC (transport.qh3.CreditConnection): a held stream gets credit only as
its reader consumes, so a reader that never reads bounds what is buffered to the window; qh3 connections in
memory, datagrams handed over by the test."""

from __future__ import annotations

import os
from pathlib import Path

import trustme
from qh3._hazmat import pull_quic_header
from qh3.quic import events as qevents
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from tunnel_lab.transport.qh3 import CreditConnection, without_pacing

CLIENT_ADDR = ("127.0.0.1", 40000)
SERVER_ADDR = ("127.0.0.1", 7844)
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 3 << 20


class Pair:
    """A qh3 client (the sender) and a server of class `server_class`, exchanging datagrams in memory."""

    def __init__(self, tmp: Path, server_class: type[QuicConnection]) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("quic.cftunnel.com")
        ca_path, chain_path, key_path = tmp / "ca.pem", tmp / "chain.pem", tmp / "key.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        cert.private_key_pem.write_to_path(str(key_path))
        for blob in cert.cert_chain_pems:
            blob.write_to_path(str(chain_path), append=True)
        server_config = QuicConfiguration(is_client=False, alpn_protocols=["argotunnel"],
                                          max_stream_data=STREAM_WINDOW, max_data=CONNECTION_WINDOW)
        server_config.load_cert_chain(str(chain_path), str(key_path))
        client_config = QuicConfiguration(is_client=True, alpn_protocols=["argotunnel"],
                                          server_name="quic.cftunnel.com")
        client_config.load_verify_locations(str(ca_path))
        self.client = QuicConnection(configuration=client_config)
        self.client.connect(SERVER_ADDR, now=0.0)
        first = self.client.datagrams_to_send(now=0.0)
        self.server = server_class(configuration=server_config,
                                   original_destination_connection_id=pull_quic_header(first[0][0], 0, 8)[3])
        without_pacing(self.client)
        without_pacing(self.server)
        self.now = 0.0
        self.received = bytearray()  # what the server's events delivered
        self.ended = False
        self.pump([(self.server, d) for d, _ in first])

    def pump(self, pending: list[tuple[QuicConnection, bytes]] | None = None) -> None:
        """Hand datagrams back and forth until both sides are quiet, collecting the server's stream 0."""
        pending = pending or []
        while True:
            for target, data in pending:
                self.now += 0.0001
                target.receive_datagram(data, CLIENT_ADDR if target is self.server else SERVER_ADDR,
                                        now=self.now)
            while (event := self.server.next_event()) is not None:
                if isinstance(event, qevents.StreamDataReceived) and event.stream_id == 0:
                    self.received += event.data
                    self.ended = self.ended or event.end_stream
            while self.client.next_event() is not None:
                pass
            pending = [(self.server if side is self.client else self.client, d)
                       for side in (self.client, self.server)
                       for d, _ in side.datagrams_to_send(now=self.now)]
            if not pending:
                return


def test_a_held_stream_nobody_reads_buffers_no_more_than_its_window(tmp_path: Path) -> None:
    pair = Pair(tmp_path, CreditConnection)
    server = pair.server
    assert isinstance(server, CreditConnection)
    server.hold(0)
    body = os.urandom(20 << 20)
    pair.client.send_stream_data(0, body, end_stream=True)
    pair.pump()
    assert 0 < len(pair.received) <= STREAM_WINDOW  # the sender stalls on the window, nothing is lost
    assert not pair.ended
    # The reader consumes in 256 KiB steps: credit follows, the transfer completes byte-exact.
    taken = 0
    while not (pair.ended and taken == len(pair.received)):
        step = min(256 << 10, len(pair.received) - taken)
        assert step > 0, "stalled with nothing left to consume"
        taken += step
        if server.consumed(0, step):
            pair.pump()
        assert len(pair.received) - taken <= STREAM_WINDOW
    assert bytes(pair.received) == body


def test_releasing_a_held_stream_frees_its_bytes_for_the_connection(tmp_path: Path) -> None:
    pair = Pair(tmp_path, CreditConnection)
    server = pair.server
    assert isinstance(server, CreditConnection)
    for stream_id in (0, 4, 8, 12):
        server.hold(stream_id)
        pair.client.send_stream_data(stream_id, b"x" * STREAM_WINDOW, end_stream=True)
    pair.pump()
    # Unread, the held streams fill the connection window: the last stream's bytes wait.
    assert server._local_max_data.used <= CONNECTION_WINDOW
    for stream_id in (0, 4, 8, 12):
        server.release(stream_id)
    pair.pump()
    assert server._local_max_data.used == 4 * STREAM_WINDOW  # all of it arrived


def test_a_stream_not_held_is_credited_as_delivered(tmp_path: Path) -> None:
    pair = Pair(tmp_path, CreditConnection)
    body = os.urandom(5 * STREAM_WINDOW)
    pair.client.send_stream_data(0, body, end_stream=True)
    pair.pump()
    assert pair.ended and bytes(pair.received) == body

"""A scripted QUIC edge for the connector's component tests: a qh3 server connection on a loopback UDP socket
that answers the registration RPC on the control stream (wire.rpc.RpcServer) and lets the test open data and
RPC streams, send datagrams and read what the connector sends back."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import trio
import trustme
from qh3._hazmat import pull_quic_header
from qh3.quic import events as qe
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from tunnel_lab.wire.registration import ConnectionDetails
from tunnel_lab.wire.rpc import (
    RegisterConnectionCalled,
    RpcServer,
    UnregisterConnectionCalled,
    UpdateLocalConfigurationCalled,
)


def quic_edge_cert(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, cert.pem, key.pem) for `quic.cftunnel.com`, from a fresh trustme CA."""
    ca = trustme.CA()
    leaf = ca.issue_cert("quic.cftunnel.com")
    paths = tmp_path / "ca.pem", tmp_path / "edge.pem", tmp_path / "edge.key"
    ca.cert_pem.write_to_path(str(paths[0]))
    leaf.cert_chain_pems[0].write_to_path(str(paths[1]))
    leaf.private_key_pem.write_to_path(str(paths[2]))
    return paths


class QuicEdgePeer:
    """One QUIC connection at a time, server side; every change wakes `changed` waiters."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.config = QuicConfiguration(is_client=False, alpn_protocols=["argotunnel"],
                                        max_datagram_frame_size=16383, idle_timeout=5.0)
        self.config.load_cert_chain(str(cert), str(key))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conn: QuicConnection | None = None
        self.peer: tuple[str, int] | None = None
        self.rpc = RpcServer()
        self.registrations: list[RegisterConnectionCalled] = []
        self.unregistered = False
        self.streams: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.datagrams: list[bytes] = []
        self.terminated: str | None = None
        self._forgotten: set[tuple[str, int]] = set()  # peers of connections ended by `stateless_reset`
        self._changed = trio.Event()
        self._timer_changed = trio.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self) -> None:
        with self.sock:
            await self._serve()

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._timer)
            while True:
                await trio.lowlevel.wait_readable(self.sock)
                while True:
                    try:
                        data, addr = self.sock.recvfrom(65536)
                    except BlockingIOError:
                        break
                    if addr in self._forgotten:
                        continue
                    if self.conn is None or addr != self.peer:
                        header = pull_quic_header(data, 0, 8)
                        self.conn = QuicConnection(configuration=self.config,
                                                   original_destination_connection_id=header[3])
                        self.peer = addr
                        self.rpc = RpcServer()
                    self.conn.receive_datagram(data, addr, now=trio.current_time())
                if self.conn is not None:
                    self._process()

    async def _timer(self) -> None:
        while True:
            self._timer_changed = trio.Event()
            deadline = self.conn.get_timer() if self.conn is not None else None
            if deadline is None:
                await self._timer_changed.wait()
                continue
            with trio.move_on_at(deadline):
                await self._timer_changed.wait()
                continue
            if self.conn is None:  # forgotten while waiting
                continue
            self.conn.handle_timer(now=trio.current_time())
            self._process()

    def transmit(self) -> None:
        if self.conn is None:
            return
        for data, addr in self.conn.datagrams_to_send(now=trio.current_time()):
            self.sock.sendto(data, addr)
        self._timer_changed.set()

    def _process(self) -> None:
        assert self.conn is not None
        while (event := self.conn.next_event()) is not None:
            if isinstance(event, qe.StreamDataReceived):
                if event.stream_id == 0:
                    self._control(event.data)
                else:
                    self.streams.setdefault(event.stream_id, bytearray()).extend(event.data)
                    if event.end_stream:
                        self.ended.add(event.stream_id)
            elif isinstance(event, qe.StreamReset):
                self.resets[event.stream_id] = event.error_code
            elif isinstance(event, qe.DatagramFrameReceived):
                self.datagrams.append(event.data)
            elif isinstance(event, qe.ConnectionTerminated):
                self.terminated = event.reason_phrase or str(event.error_code)
        self.transmit()
        self._changed.set()
        self._changed = trio.Event()

    def _control(self, data: bytes) -> None:
        assert self.conn is not None
        for event in self.rpc.receive_data(data):
            if isinstance(event, RegisterConnectionCalled):
                self.registrations.append(event)
                self.rpc.answer_registration(event.question_id, ConnectionDetails(
                    uuid=__import__("uuid").uuid4(), location_name="LAB1"))
            elif isinstance(event, UpdateLocalConfigurationCalled | UnregisterConnectionCalled):
                self.unregistered |= isinstance(event, UnregisterConnectionCalled)
                self.rpc.answer_empty(event.question_id)
        out = self.rpc.data_to_send()
        if out:
            self.conn.send_stream_data(0, out)

    # -- the test's hands
    def open_stream(self, data: bytes, *, end: bool = False) -> int:
        assert self.conn is not None
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_stream_data(stream_id, data, end_stream=end)
        self.transmit()
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        assert self.conn is not None
        self.conn.send_stream_data(stream_id, data, end_stream=end)
        self.transmit()

    def stateless_reset(self) -> None:
        """Forget the connection as a restarted edge would; end it with a Stateless Reset (RFC 9000 §10.3)."""
        assert self.conn is not None and self.peer is not None
        token = next(c.stateless_reset_token for c in self.conn._host_cids if c.stateless_reset_token)
        self.sock.sendto(bytes([0x40 | 0x3F & os.urandom(1)[0]]) + os.urandom(24) + token, self.peer)
        self._forgotten.add(self.peer)
        self.conn = None
        self.peer = None
        self._changed.set()
        self._changed = trio.Event()

    def send_datagram(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.send_datagram_frame(data)
        self.transmit()

    async def wait(self, predicate: Callable[[], bool]) -> None:
        """Until `predicate()` holds after something arrived (callers bound it with fail_after)."""
        while not predicate():
            await self._changed.wait()

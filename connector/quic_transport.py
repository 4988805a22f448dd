"""A thin trio shell around qh3's sans-I/O `QuicConnection` (the client side of our QUIC edge connection).

One connected UDP socket; one task feeds received datagrams to qh3 and hands its events out, another runs
qh3's timer (loss recovery, keep-alive, idle timeout). Whatever qh3 wants to send goes out at once with a
non-blocking `send` (a UDP send that would block is a lost packet, which QUIC recovers). Streams are
`QuicStream` objects with trio-style `receive_some` / `send_all` / `send_eof`; a stream's writer waits while
more than `SEND_HIGH_WATER` bytes are still unsent (the peer's flow control holds them), so an origin that is
faster than the edge cannot fill memory.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import trio
from qh3.quic import events as qe
from qh3.quic.configuration import QuicConfiguration

from tunnel_lab.transport import udp
from tunnel_lab.transport.qh3 import (
    ResetAwareConnection,
    TracedResetAwareConnection,
    ack_now,
    hold_unsent,
    stream_state,
    without_pacing,
)
from tunnel_lab.wire.errors import TunnelLabError

log = logging.getLogger(__name__)

SEND_HIGH_WATER = 256 * 1024
# qh3 widens a stream's flow-control window as data arrives, not as it is read: a stream whose reader
# stalls (a slow origin) would buffer without limit, so past this many unread bytes it is reset.
STREAM_BUFFER_LIMIT = 32 << 20
KEEPALIVE_PERIOD = 1.0  # cloudflared: quic-go KeepAlivePeriod 1 s against MaxIdleTimeout 5 s
SOCKET_BUFFER = 4 << 20  # bursts of datagrams from the edge must not overflow the kernel's queue
MAX_BUFFERED_DATAGRAMS = 1024  # received datagrams not yet taken by the session manager


STREAM_OVERFLOW = 0x2  # the reset code for an overflowing stream


class QuicClosedError(TunnelLabError):
    """The QUIC connection is closed; `reason` says why (the peer's or qh3's words)."""


class QuicStream:
    """One bidirectional stream; the receive side buffers what qh3 delivered until it is read."""

    def __init__(self, transport: QuicTransport, stream_id: int) -> None:
        self.transport = transport
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self.remote_ended = False
        self.reset_received: int | None = None  # the peer's RESET_STREAM error code
        self.stop_sending_received: int | None = None
        self.local_ended = False
        self.overflowed = False
        self.on_reset: Callable[[], None] | None = None  # e.g. cancel the handler of the stream
        self._buffered = 0
        self.written = 0  # bytes handed to qh3 (its sender's `highest_offset` counts only those sent)
        self._wakeup = trio.Event()

    def _push(self, data: bytes, end: bool) -> None:
        if self.overflowed:
            return
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            limit = self.transport.stream_buffer_limit
            if self._buffered > limit:
                log.warning("The edge sent more than %d unread bytes on stream=%d; resetting it",
                            limit, self.stream_id)
                self.overflowed = True
                self.reset(STREAM_OVERFLOW)
                self._reset(STREAM_OVERFLOW)
                return
        if end:
            self.remote_ended = True
        self._wakeup.set()

    def _reset(self, code: int) -> None:
        self.reset_received = code
        self.remote_ended = True
        self._wakeup.set()
        if self.on_reset is not None:
            self.on_reset()

    def push_back(self, data: bytes) -> None:
        """Return unconsumed bytes to the front of the receive buffer."""
        if data:
            self._chunks.appendleft(data)
            self._buffered += len(data)

    async def receive_some(self) -> bytes:
        """The bytes received so far (b"" at the end of the stream or after a reset)."""
        while True:
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                self.transport.consumed(self.stream_id, len(data))  # (bytes pushed back stay credited)
                return data
            if self.remote_ended or self.transport.closed:
                await trio.lowlevel.checkpoint()
                return b""
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def send_all(self, data: bytes, *, end_stream: bool = False) -> None:
        """Queue `data` (and FIN) on the stream; waits while the peer's flow control holds too much."""
        transport = self.transport
        transport.check_open()
        if self.stop_sending_received is not None:
            raise QuicClosedError(f"stream {self.stream_id}: the peer stopped reading "
                                  f"(STOP_SENDING {self.stop_sending_received})")
        if self.local_ended:
            raise QuicClosedError(f"stream {self.stream_id}: already ended")
        transport.quic.send_stream_data(self.stream_id, bytes(data), end_stream=end_stream)
        self.written += len(data)
        if end_stream:
            self.local_ended = True
            transport._ended.add(self.stream_id)
        transport.transmit()
        while transport.unsent(self) > SEND_HIGH_WATER:
            await transport.wait_progress()
            transport.check_open()
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        if not self.local_ended:
            await self.send_all(b"", end_stream=True)

    def reset(self, code: int) -> None:
        """RESET_STREAM our side and STOP_SENDING theirs (nothing more is read or written)."""
        transport = self.transport
        if transport.closed:
            return
        with contextlib.suppress(ValueError, AssertionError):  # qh3: already finished that way
            if not self.local_ended:
                transport.quic.reset_stream(self.stream_id, code)
                hold_unsent(stream_state(transport.quic, self.stream_id))  # qh3 would send past the reset
            if not self.remote_ended:
                transport.quic.stop_stream(self.stream_id, code)
        self.local_ended = True
        self.remote_ended = True
        self._chunks.clear()
        transport.transmit()


class QuicTransport:
    """Drives one client `QuicConnection` over a connected UDP socket until it closes."""

    def __init__(self, configuration: QuicConfiguration, address: tuple[str, int], *,
                 on_stream: Callable[[QuicStream], None] | None = None,
                 on_datagram: Callable[[bytes], None] | None = None,
                 bind_address: str | None = None, stream_buffer_limit: int = STREAM_BUFFER_LIMIT,
                 keepalive: float | None = KEEPALIVE_PERIOD, trace: Any = None) -> None:
        # Both end at a Stateless Reset (transport.qh3.ResetAwareConnection)
        self.quic = ResetAwareConnection(configuration=configuration) if trace is None else \
            TracedResetAwareConnection(configuration=configuration)
        without_pacing(self.quic)
        self.trace = trace  # transport.trace.ConnTrace with --trace (docs/trace.md), else None
        if trace is not None:
            self.quic.trace = trace  # type: ignore[attr-defined]
        self.keepalive = keepalive  # seconds between PINGs once connected (None: none)
        self.stream_buffer_limit = stream_buffer_limit  # unread bytes per stream before it is reset
        self.address = address
        self.streams: dict[int, QuicStream] = {}
        self.on_stream = on_stream
        self.on_datagram = on_datagram
        self.bind_address = bind_address
        self.closed = False
        self.close_reason = ""
        self.close_code: int | None = None  # the CONNECTION_CLOSE error code (0x1XX: a TLS alert)
        self.close_is_transport = False  # a transport error (RFC 9000 §20.1), not an application one
        self.quic_reason = ""  # the peer's reason phrase, as sent
        self.handshake_done = trio.Event()
        self.terminated = trio.Event()
        self.local_address: tuple[str, int] | None = None
        self._sock: socket.socket | None = None
        self._sender: udp.DatagramSender | None = None
        self._progress = trio.Event()
        self._timer_changed = trio.Event()
        self._ended: set[int] = set()
        self._last_peer_stream = -1  # streams we sent FIN on, until the peer acknowledged it

    # -- used by streams and the connection
    def check_open(self) -> None:
        if self.closed:
            raise QuicClosedError(f"connection with edge closed: {self.close_reason}")

    def unsent(self, stream: QuicStream) -> int:
        """Bytes of `stream` qh3 holds and has not sent yet (the peer's credit or the congestion window
        holds them back; lost ones to send again count too)."""
        state = stream_state(self.quic, stream.stream_id)
        if state is None:
            return 0
        return max(0, stream.written - int(state.sender.next_offset))

    async def wait_progress(self) -> None:
        await self._progress.wait()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def open_stream(self) -> QuicStream:
        """A new bidirectional stream of ours (the first one is the control stream)."""
        self.check_open()
        stream_id = self.quic.get_next_available_stream_id()
        stream = QuicStream(self, stream_id)
        self.streams[stream_id] = stream
        return stream

    def consumed(self, stream_id: int, length: int) -> None:
        """The reader took `length` bytes of a stream the edge opened: its receive window slides."""
        if self.quic.consumed(stream_id, length) and not self.closed:
            self.transmit()

    def forget(self, stream: QuicStream) -> None:
        self.streams.pop(stream.stream_id, None)
        if self.quic.release(stream.stream_id) and not self.closed:
            self.transmit()
        if len(self._ended) > 1024:  # FINs still unacknowledged: bounded by pruning the acknowledged
            self._prune_ended()

    def send_datagram(self, data: bytes) -> None:
        """Queue one DATAGRAM frame and send it (dropped silently once closed: datagrams are unreliable)."""
        if self.closed:
            return
        self.quic.send_datagram_frame(data)
        self.transmit()

    def delivered(self) -> bool:
        """Every stream we ended has had its data and FIN acknowledged by the peer."""
        self._prune_ended()
        return not self._ended

    def _prune_ended(self) -> None:
        quic = self.quic
        self._ended = {sid for sid in self._ended
                       if (state := stream_state(quic, sid)) is not None and not state.sender.is_finished}

    async def drain(self) -> None:
        """Until `delivered()` (callers bound it): closing earlier would lose the responses' last bytes."""
        while not self.closed and not self.delivered():
            await self.wait_progress()

    def close(self, error_code: int = 0, reason: str = "") -> None:
        if not self.closed:
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.transmit()

    def transmit(self) -> None:
        """Send every datagram qh3 has ready, now."""
        sock = self._sock
        if sock is None:
            return
        datagrams = self.quic.datagrams_to_send(now=trio.current_time())
        if datagrams and self._sender is not None:
            # batched (GSO); a full socket buffer is packet loss, which QUIC recovers
            self._sender.send([data for data, _addr in datagrams])
        self._timer_changed.set()

    # -- lifecycle
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and run until the connection closes (the handshake is awaited by the caller)."""
        host, port = self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            if self.bind_address:
                sock.bind((self.bind_address, 0))
            sock.connect((host, port))  # UDP: no packet leaves, only the kernel's route is chosen
            self.local_address = sock.getsockname()[:2]
            self._sock = sock
            self._sender = udp.DatagramSender(sock)
            gro = udp.enable_gro(sock)
            self.quic.connect((host, port), now=trio.current_time())
            self.transmit()
            task_status.started()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, sock, gro)
                    nursery.start_soon(self._timer)
                    if self.keepalive:
                        nursery.start_soon(self._keep_alive, self.keepalive)
                    await self.terminated.wait()
                    nursery.cancel_scope.cancel()
            finally:
                self._mark_closed(self.close_reason or "closed")
                self._sock = None
                self._sender = None

    async def _reader(self, sock: socket.socket, gro: bool) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            received = 0
            # a burst is taken whole before the events are handled (batched receive)
            while received < 256:
                try:
                    datagrams, _addr = udp.receive(sock, gro)
                except BlockingIOError:
                    break
                except OSError as exc:
                    # ICMP port unreachable on a connected socket: nobody listens there (QUIC blocked);
                    # the handshake timeout decides, as for a dropped packet
                    log.debug("UDP receive from the edge failed error=%s", exc)
                    break
                for data in datagrams:
                    self.quic.receive_datagram(data, self.address, now=now)
                received += len(datagrams)
            if received > 1:
                ack_now(self.quic)  # a transfer: acknowledge it now, not at qh3's 1 ms timer (edge/quic.py)
            if received:
                self._handle_events()
                self.transmit()
                self._wake()

    async def _timer(self) -> None:
        while True:
            self._timer_changed = trio.Event()
            deadline = self.quic.get_timer()
            if deadline is None:
                await self._timer_changed.wait()
                continue
            with trio.move_on_at(deadline):
                await self._timer_changed.wait()
                continue
            self.quic.handle_timer(now=trio.current_time())
            self._handle_events()
            self.transmit()
            self._wake()

    async def _keep_alive(self, period: float) -> None:
        """A PING every `period` once the handshake is done, as cloudflared's quic-go does (KeepAlivePeriod):
        qh3 sends none by itself, so an idle tunnel connection would hit the 5 s idle timeout."""
        await self.handshake_done.wait()
        uid = 0
        while not self.closed:
            await trio.sleep(period)
            uid += 1
            self.quic.send_ping(uid)
            self.transmit()
            self._timer_changed.set()  # the PING may have moved qh3's timers

    def _handle_events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if self.trace is not None:
                self.trace.quic_event(event)
            if isinstance(event, qe.StreamDataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None:
                    # only a server-initiated bidirectional stream beyond every one seen is new; data for
                    # one we are done with (late, after our reset) is dropped
                    if event.stream_id % 4 != 1 or event.stream_id <= self._last_peer_stream:
                        continue
                    self._last_peer_stream = event.stream_id
                    # credit follows what the handler reads from here on (transport.qh3.CreditConnection)
                    self.quic.hold(event.stream_id)
                    stream = QuicStream(self, event.stream_id)
                    self.streams[event.stream_id] = stream
                    stream._push(event.data, event.end_stream)
                    if self.on_stream is not None:
                        self.on_stream(stream)
                    continue
                stream._push(event.data, event.end_stream)
            elif isinstance(event, qe.DatagramFrameReceived):
                if self.on_datagram is not None:
                    self.on_datagram(event.data)
            elif isinstance(event, qe.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._reset(event.error_code)
            elif isinstance(event, qe.StopSendingReceived):
                stream = self.streams.get(event.stream_id)
                hold_unsent(stream_state(self.quic, event.stream_id))  # qh3 reset our side on STOP_SENDING
                if stream is not None:
                    stream.stop_sending_received = event.error_code
                    stream._wakeup.set()
            elif isinstance(event, qe.HandshakeCompleted):
                self.handshake_done.set()
            elif isinstance(event, qe.ConnectionTerminated):
                self.close_code = event.error_code
                self.close_is_transport = event.frame_type is not None  # CONNECTION_CLOSE 0x1c, not 0x1d
                self.quic_reason = event.reason_phrase
                reason = event.reason_phrase or f"error code {event.error_code:#x}"
                self._mark_closed(reason)

    def _mark_closed(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for stream in self.streams.values():
            stream._wakeup.set()
        self._wake()
        self.terminated.set()

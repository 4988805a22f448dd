"""One edge-opened HTTP/2 stream as the connector's stream handlers see it (`IncomingStream`)."""

from __future__ import annotations

import time
from collections import deque
from email.utils import formatdate
from typing import Protocol

import h2.errors
import h2.exceptions
import trio

from tunnel_lab.connector.edge_errors import StreamGone
from tunnel_lab.transport.h2 import TunnelH2Connection, send_within_window


class StreamOwner(Protocol):
    """What a stream uses of its connection (`connector.edge_conn.EdgeConnection`), so that module and
    this one do not import each other."""

    h2: TunnelH2Connection
    conn_index: int
    dead: bool

    @property
    def label(self) -> str: ...
    def open_window(self, n: int, stream_id: int | None = None) -> None: ...
    async def flush(self) -> None: ...
    async def push(self, queued: int = 0) -> None: ...
    async def wait_for_window(self) -> None: ...

MAX_READ = 256 * 1024  # most request-body bytes one receive_some returns
WINDOW = 1 << 20  # INITIAL_WINDOW_SIZE and the connection window, as Go's server sets them
# WINDOW_UPDATEs go out once a quarter of the window was used (cloudflared: about every 32 KiB; 8x fewer
# frames to write here and to parse at the edge on an upload, and the window never runs dry).
CREDIT_BATCH = WINDOW // 4


_DATE: list[tuple[int, bytes]] = [(0, b"")]  # (second, Date header value) of the last response


def http_date() -> bytes:
    now = int(time.time())
    second, value = _DATE[0]
    if second != now:  # formatted once per second, not per response
        value = formatdate(now, usegmt=True).encode()
        _DATE[0] = (now, value)
    return value


class IncomingStream:
    """One edge-opened HTTP/2 stream as the stream handlers see it.

    Flow control as Go's server does it: connection-level credit goes back as DATA arrives (each stream's
    buffer is bounded by its own window, so one slow stream never starves the others); stream-level credit
    goes back only when the handler comes back for more, i.e. after it handed the previous chunk on:
    backpressure reaches the edge per stream."""

    def __init__(self, conn: StreamOwner, stream_id: int, headers: list[tuple[bytes, bytes]],
                 end_stream: bool) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream_on_headers = end_stream
        self.remote_ended = end_stream
        self.reset_received = False
        self.local_ended = False
        self.headers_sent = False
        self.trailers: list[tuple[bytes, bytes]] = []  # request trailers the edge sent, if any
        self.status: int | None = None  # the :status we answered
        self.failed = False  # the connector could not serve it (502 of its own, or a reset)
        self.cancel_scope = trio.CancelScope()
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._to_ack = 0  # flow-controlled bytes handed out, not yet acknowledged
        self._credit = 0  # stream-level credit owed to the edge, sent in batches
        self._wakeup = trio.Event()

    @property
    def label(self) -> str:
        return f"{self.conn.label} stream={self.stream_id}"

    # -- fed by the connection's reader
    def _push(self, data: bytes, flow_len: int) -> None:
        self._chunks.append((data, flow_len))
        self._wakeup.set()

    def _ended(self) -> None:
        self.remote_ended = True
        self._wakeup.set()

    def _reset(self) -> None:
        self.reset_received = True
        self.remote_ended = True
        self._wakeup.set()
        self.cancel_scope.cancel()

    # -- request body
    async def receive_some(self) -> bytes:
        """The next chunk of the request body; b"" once the edge ended (or reset) its side."""
        await self._ack()
        while True:
            # Everything already buffered goes out as one piece, like Go's body reads (D07b).
            parts: list[bytes] = []
            size = 0
            while self._chunks and size < MAX_READ:
                data, flow_len = self._chunks.popleft()
                self._to_ack += flow_len
                parts.append(data)
                size += len(data)
            if size:
                return b"".join(parts)
            if self.remote_ended:
                await self._ack()
                return b""
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    def push_back(self, data: bytes) -> None:
        """Return unconsumed bytes to the front of the inbox (already counted for flow control)."""
        if data:
            self._chunks.appendleft((data, 0))

    async def _ack(self) -> None:
        if self._to_ack:
            self._credit += self._to_ack
            self._to_ack = 0
            if self._credit >= CREDIT_BATCH and not self.remote_ended:
                n, self._credit = self._credit, 0
                self.conn.open_window(n, self.stream_id)
                await self.conn.push()

    def take_unread(self) -> list[bytes]:
        """Empty the inbox and return what the handler never read (its connection is gone)."""
        unread = [data for data, _ in self._chunks]
        self._chunks.clear()
        return unread

    def _release_window(self) -> None:
        """Forget what this stream never consumed (its connection-level credit went back on arrival)."""
        self._to_ack = 0
        self._credit = 0
        self._chunks.clear()

    # -- response
    async def send_headers(self, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False,
                           upgraded: bool = False) -> None:
        # `upgraded` (an origin's 101, see wire.origin.SendHeaders) changes nothing here: over HTTP/2
        # the 101 travels as the 200 already in `headers`.
        if not any(name == b"date" for name, _ in headers):
            headers = [*headers, (b"date", http_date())]
        self._queue_headers(headers, end_stream, "headers")
        self.headers_sent = True
        for name, value in headers:
            if name == b":status" and value.isdigit():
                self.status = int(value)
        await self.conn.push()

    async def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._queue_headers(headers, True, "trailers")
        await self.conn.push()

    def _queue_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool, what: str) -> None:
        self._check()
        try:
            self.conn.h2.send_headers(self.stream_id, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            raise StreamGone(f"{self.label}: cannot send {what}: {exc}") from exc
        if end_stream:
            self.local_ended = True

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        """Send body bytes within the edge's flow-control windows, flushed at once (SSE, chunked, pipes)."""
        queued = await send_within_window(
            self.conn.h2, self.stream_id, data, end_stream=end_stream, flush=self.conn.flush,
            wait_for_window=self.conn.wait_for_window, check=self._check,
            closed=lambda exc: StreamGone(f"{self.label}: stream closed: {exc}"))
        if end_stream:
            self.local_ended = True
        await self.conn.push(queued)  # every write goes out at once: SSE and chunked responses stream

    async def end(self) -> None:
        if not self.local_ended:
            await self.send_data(b"", end_stream=True)

    async def reset(self, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        if self.reset_received:
            return
        if code != h2.errors.ErrorCodes.NO_ERROR:
            self.failed = True
        self.reset_received = True
        self.local_ended = True
        try:
            self.conn.h2.reset_stream(self.stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        await self.conn.flush()

    def _check(self) -> None:
        if self.reset_received:
            raise StreamGone(f"{self.label}: reset by the edge")
        if self.conn.dead:
            raise StreamGone(f"{self.label}: connection with edge closed")

"""The one HTTP/2 writer of the project: a task per connection that sends what h2 queued.

Both tunnel ends and the HTTP/2 eyeball server use `H2Writer`. Streams queue frames in h2 and wake the
writer (`push`) or wait for it (`flush`); the writer task takes everything h2 holds at each pass and
sends it in one write. So the writes several streams make before it runs leave in one TLS write, a
reader never has to block on the socket (`wake`), and a stream handler being cancelled never cuts a
write short: once taken from h2 the bytes must reach the socket whole, or the HTTP/2 framing breaks for
every stream. Each write is bounded by the write timeout instead (`WriteStalled`).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from tunnel_lab.transport.h2 import TunnelH2Connection
from tunnel_lab.wire.errors import TunnelLabError

# `push` waits for the socket only once this many DATA bytes are queued (backpressure on bulk bodies);
# below that, HEADERS, DATA and END_STREAM written back to back leave in one write.
PUSH_WAIT = 64 * 1024


async def acquire_fast(lock: trio.Lock) -> None:
    """`await lock.acquire()` without its scheduler pass when the lock is free.

    trio's `acquire` always yields once, even uncontended; on the request path that is several
    extra scheduler passes (each an epoll_wait) per request. Cancellation is still checked first,
    as `acquire` does; a held lock is waited for as before (FIFO).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class WriteStalled(TunnelLabError, trio.BrokenResourceError):
    """The peer did not read what we wrote within the write timeout."""


class H2Writer:
    """Sends what `conn` queued to `transport`, from one task (`run`, in the connection's nursery).

    `flush` returns once everything queued before it was written; `push` only wakes the writer (it
    waits like `flush` once `PUSH_WAIT` DATA bytes are queued); `wake` is `push` for a reader, which
    must never wait for its own connection's writes. Once the task has ended (a failed, stalled or
    cancelled write, or the connection closing) `flush` and `push` raise `trio.BrokenResourceError`.
    """

    def __init__(self, conn: TunnelH2Connection, transport: trio.abc.SendStream, *,
                 write_timeout: float | None = None, push_wait: int = PUSH_WAIT) -> None:
        self.conn = conn
        self.transport = transport
        self.write_timeout = write_timeout
        self.push_wait = push_wait
        self.queued = 0  # DATA payload bytes queued by `push` callers since the writer last took them
        self.closed = False  # the task ended: nothing more goes out through it
        self.intact = True  # False while a write is under way, and for good once one was cut short
        self._want = 0  # flushes asked for
        self._written = 0  # flushes served
        self._wake = trio.Event()
        self._written_event = trio.Event()
        # The protocol trace's hook (transport.trace.ConnTrace.sent): sees every write, None when off.
        self.on_send: Callable[[bytes | bytearray], None] | None = None

    def _check_open(self) -> None:
        if self.closed:
            raise trio.BrokenResourceError("the connection's writer has stopped")

    def wake(self) -> None:
        """Have the writer send what h2 queued at its next pass, without waiting."""
        if self.conn.has_data_to_send():
            self._wake.set()

    async def push(self, queued: int = 0) -> None:
        """Have the writer send what h2 queued (`queued` more DATA bytes than before) at its next pass.

        Waits for the write only once `push_wait` bytes are queued."""
        self.queued += queued
        if self.queued >= self.push_wait:
            await self.flush()
            return
        self._check_open()
        self._wake.set()
        await trio.lowlevel.checkpoint_if_cancelled()

    async def flush(self) -> None:
        """Have the writer send everything queued so far; returns once it was written."""
        self._check_open()
        if self.intact and not self.conn.has_data_to_send():
            # Nothing queued and no write under way that could hold our frames: no pass through the
            # writer (a reader flushes after every read, mostly with nothing to say).
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        self._want += 1
        target = self._want
        self._wake.set()
        while self._written < target:
            self._check_open()
            await self._written_event.wait()
        self._check_open()

    async def run(self) -> None:
        """The writer task: runs until cancelled, or raises what broke the write (`WriteStalled` when
        the peer stopped reading for `write_timeout` seconds). Start it before the first `flush`."""
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                target = self._want
                data = self.conn.data_to_send()
                self.queued = 0
                if data:
                    if self.on_send is not None:
                        self.on_send(data)
                    self.intact = False  # until send_all returns: a cancelled send leaves a partial write
                    with trio.move_on_after(self.write_timeout or float("inf")) as stalled:
                        await self.transport.send_all(data)
                        self.intact = True
                    if stalled.cancelled_caught:
                        raise WriteStalled(f"the peer did not read for {self.write_timeout:g}s")
                self._written = target
                self._written_event.set()
                self._written_event = trio.Event()
        finally:
            self.closed = True
            self._written_event.set()

    def take_remaining(self) -> bytes | bytearray:
        """What h2 still holds once the task has ended, unless a write was cut short (then b"": the
        framing is broken). For a last best-effort write before closing."""
        if not self.intact:
            return b""
        return self.conn.data_to_send()

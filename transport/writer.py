"""Writing what an h2 connection queued: one writer at a time, whole, bounded by a deadline.

Used by the edge's tunnel connection and its HTTP/2 eyeball server. (The connector writes from one
writer task per connection instead, woken by its streams, so that writes of several streams made
before it runs leave in one TLS write: connector/edge_conn.py.)
"""

from __future__ import annotations

import trio

from transport.h2 import TunnelH2Connection
from wire.errors import TunnelLabError


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
    """Sends what `conn` has queued to `transport`, one writer at a time.

    Once taken from h2 the bytes must reach the socket whole, or the HTTP/2 framing breaks for every
    stream; so the write is shielded from the caller's cancellation (a stream handler being
    cancelled) and bounded by its own timeout instead (`WriteStalled`).
    """

    def __init__(self, conn: TunnelH2Connection, transport: trio.abc.SendStream, *,
                 write_timeout: float) -> None:
        self.conn = conn
        self.transport = transport
        self.write_timeout = write_timeout
        self._lock = trio.Lock()

    async def flush(self) -> None:
        """Send whatever h2 has queued. Raises trio's Broken/ClosedResourceError, or `WriteStalled`."""
        if not self.conn.has_data_to_send():
            # Nothing queued (e.g. an acknowledgement h2 batched): no lock, no write. Bytes another
            # task already took are that task's to deliver.
            return
        await acquire_fast(self._lock)
        try:
            data = self.conn.data_to_send()
            if not data:
                return
            # One scope: shielded from the caller's cancellation, cancelled by its own deadline.
            deadline = trio.current_time() + self.write_timeout
            with trio.CancelScope(shield=True, deadline=deadline) as stalled:
                await self.transport.send_all(data)
            if stalled.cancelled_caught:
                raise WriteStalled(f"the peer did not read for {self.write_timeout:g}s")
        finally:
            self._lock.release()

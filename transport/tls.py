"""TLS streams that hand out every TLS record already received in one read.

trio's `SSLStream.receive_some` returns one TLS record (at most 16 KiB) per call, with a scheduler pass in
between: a 64 KiB HTTP/2 DATA frame then costs four reader passes. Two ways around it, one per side:

- `take_buffered_tls(stream, data)`: the edge accepts with trio's `SSLStream` (server side, SNI,
  certificate swaps); after each `receive_some` this decrypts the records already whole in the stream's
  incoming buffer. It reads `SSLStream._ssl_object` and `SSLStream._incoming` (trio internals, pinned
  by tests/unit/test_transport_tls.py; pyproject bounds trio).
- `TLSClientStream`: the connector's client side does its own TLS over memory BIOs (public `ssl` API
  only), decrypting everything that arrived in one receive.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

import trio

TLS_RECEIVE_SIZE = 256 * 1024  # most bytes one socket read takes


TLS_BATCH = 256 * 1024  # the reader takes up to this much already-received TLS data per pass


def take_buffered_tls(transport: Any, data: bytes | bytearray) -> bytes | bytearray:
    """`data` plus every further TLS record already received and buffered, decrypted now.

    trio's `SSLStream.receive_some` returns one TLS record (at most 16 KiB) per call, with a
    scheduler pass in between; a 64 KiB DATA frame then costs four reader passes (h2 buffering,
    frame guard, flush check each time). Records that are already whole in the stream's incoming
    buffer are read here without waiting. Anything unusual (an incomplete record, close_notify, a
    TLS error) is left in place for the next `receive_some`, which handles it as before. Not a trio
    `SSLStream` (tests' memory streams): `data` unchanged.
    """
    ssl_object = getattr(transport, "_ssl_object", None)
    incoming = getattr(transport, "_incoming", None)
    if ssl_object is None or incoming is None or not incoming.pending:
        return data
    parts = [data]
    size = len(data)
    while size < TLS_BATCH and (incoming.pending or ssl_object.pending()):
        try:
            more = ssl_object.read(TLS_BATCH - size)
        except ssl.SSLError:  # incl. SSLWantReadError: a partial record; trio reads the rest
            break
        if not more:
            break
        parts.append(more)
        size += len(more)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class TLSClientStream(trio.abc.Stream):
    """A TLS client over any trio stream, with the ssl module's memory BIOs (the connector's edge connection).

    trio's `SSLStream` returns one TLS record (at most 16 KiB) per `receive_some`, with a scheduler round
    trip each: here one receive decrypts every complete record the socket had, so h2 parses a whole batch
    of frames at once. Errors are trio's: `trio.BrokenResourceError` (the `ssl` or `OSError` as its cause),
    `trio.ClosedResourceError`. Reading and writing may run in different tasks (one of each)."""

    def __init__(self, transport_stream: trio.abc.Stream, ctx: ssl.SSLContext,
                 server_hostname: str) -> None:
        self.transport_stream = transport_stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        self._eof = False

    async def _send_pending(self) -> None:
        data = self._outgoing.read()
        if data:
            await self.transport_stream.send_all(data)

    async def _refill(self) -> None:
        data = await self.transport_stream.receive_some(TLS_RECEIVE_SIZE)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def do_handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._send_pending()  # the alert, as trio's SSLStream sends it
                raise trio.BrokenResourceError(str(exc)) from exc
            await self._send_pending()
            if done:
                return
            await self._refill()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Everything decryptable so far (b"" once the peer closed the TLS session)."""
        while True:
            parts: list[bytes] = []
            try:
                while True:
                    chunk = self._ssl.read(TLS_RECEIVE_SIZE)
                    if not chunk:  # the peer's close_notify
                        self._eof = True
                        break
                    parts.append(chunk)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self._eof = True
            except ssl.SSLError as exc:
                if not parts:
                    raise trio.BrokenResourceError(str(exc)) from exc
            if parts:
                return b"".join(parts)
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b""
            await self._refill()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        await self._send_pending()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl.getpeercert(binary_form)

    async def aclose(self) -> None:
        """Send close_notify (without waiting for the peer's), then close the socket."""
        try:
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._send_pending()
        finally:
            await self.transport_stream.aclose()

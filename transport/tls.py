"""One TLS stream for both sides: `TLSStream`, over the ssl module's memory BIOs (public `ssl` API only).

trio's `SSLStream` returns one TLS record (at most 16 KiB) per `receive_some`, with a scheduler pass in
between: a 64 KiB HTTP/2 DATA frame then costs four reader passes. Here one receive decrypts every complete
record the socket had, so h2 parses a whole batch of frames at once. It also sends the alert OpenSSL queued
when a handshake fails (trio's `SSLStream` drops it: a client would see a bare EOF instead of, say,
`unrecognized_name` from the edge's SNI callback). The edge accepts with it (`server_side=True`: the SNI
callback and certificate swaps are the `SSLContext`'s, as before) and the connector dials with it; nothing
reads trio internals any more.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Mapping
from typing import Any

import trio

from tunnel_lab.transport.writer import acquire_fast

TLS_RECEIVE_SIZE = 256 * 1024  # most bytes one socket read takes, and one receive_some returns
KEYLOG_ENV = "SSLKEYLOGFILE"


def honour_keylog(ctx: ssl.SSLContext, env: Mapping[str, str] = os.environ) -> ssl.SSLContext:
    """Have `ctx` append its TLS secrets to `$SSLKEYLOGFILE` (NSS key log format) when that is set.

    `ssl.create_default_context` does this by itself; contexts built with `ssl.SSLContext(...)` do not.
    The key log lets Wireshark decrypt a capture of the tunnel (docs/trace.md, "Key logs")."""
    path = env.get(KEYLOG_ENV)
    if path:
        ctx.keylog_filename = path
    return ctx


class TLSStream(trio.abc.Stream):
    """TLS over any trio stream (client, or server with `server_side=True`).

    Errors are trio's: `trio.BrokenResourceError` (the `ssl` or `OSError` as its cause),
    `trio.ClosedResourceError`. Reading and writing may run in different tasks (one of each); the TLS
    records either produces (a TLS 1.3 session ticket after a read, say) leave through one send lock, in
    the order OpenSSL made them."""

    def __init__(self, transport_stream: trio.abc.Stream, ctx: ssl.SSLContext, *,
                 server_side: bool = False, server_hostname: str | None = None) -> None:
        self.transport_stream = transport_stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                 server_hostname=server_hostname)
        self._eof = False
        self._send_lock = trio.Lock()
        self._write_intact = True  # False once a send was cut short (cancelled or failed mid-record)

    async def _send_pending(self) -> None:
        if not self._outgoing.pending:
            return
        await acquire_fast(self._send_lock)
        try:
            while self._outgoing.pending:  # what the other task added meanwhile goes out too, in order
                self._write_intact = False
                await self.transport_stream.send_all(self._outgoing.read())
                self._write_intact = True
        finally:
            self._send_lock.release()

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
                    await self._send_pending()  # the alert (trio's SSLStream drops it)
                raise trio.BrokenResourceError(str(exc)) from exc
            await self._send_pending()
            if done:
                return
            await self._refill()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Everything decryptable so far, up to `max_bytes` (b"" once the peer closed the TLS session)."""
        limit = TLS_RECEIVE_SIZE if max_bytes is None else max_bytes
        while True:
            parts: list[bytes] = []
            size = 0
            try:
                while size < limit:
                    chunk = self._ssl.read(limit - size)
                    if not chunk:  # the peer's close_notify
                        self._eof = True
                        break
                    parts.append(chunk)
                    size += len(chunk)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self._eof = True
            except ssl.SSLError as exc:
                if not parts:
                    raise trio.BrokenResourceError(str(exc)) from exc
            if self._outgoing.pending and not self._send_lock.locked():
                # Records the read made (a ticket, a key update's answer); a send under way takes
                # them itself, so the reader never waits behind a blocked writer for these.
                # A broken socket: the writer and the next read see it.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._send_pending()
            if parts:
                return parts[0] if len(parts) == 1 else b"".join(parts)
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

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """The session's `ssl.SSLObject` (version, cipher, peer certificate: for the protocol trace)."""
        return self._ssl

    async def aclose(self) -> None:
        """Send close_notify (without waiting for the peer's), then close the socket.

        Not after a send was cut short, nor while another task is still sending: a close_notify after
        part of a record is garbage to the peer, so then the socket just closes."""
        try:
            if self._write_intact and not self._send_lock.locked():
                with contextlib.suppress(ssl.SSLError):
                    self._ssl.unwrap()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    await self._send_pending()
        finally:
            await self.transport_stream.aclose()

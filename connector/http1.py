"""A small HTTP/1.1 server connection on h11, for the connector's own little servers.

Used by the metrics server and the hello-world origin: read one request (with a bounded body), answer
it (whole or streamed), then start the next keep-alive cycle. Both are Go `net/http` servers in
cloudflared, and they answer as one does: a `Date` header, no `Server` header, and a whole body sent with
`Content-Length` only when it fits Go's 2 KiB pre-chunking buffer (chunked otherwise).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import h11
import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionType

from tunnel_lab.connector.tunnel_stream import http_date
from tunnel_lab.connector.websocket import websocket_accept
from tunnel_lab.wire.errors import TunnelLabError

MAX_BODY = 1 << 20
MAX_HEAD = 64 * 1024
GO_CHUNKING_BUFFER = 2048  # net/http's bufferBeforeChunkingSize


class ClientGone(TunnelLabError):
    """The client closed the connection or sent something that is not HTTP/1.1."""


class ServerConnection:
    """One accepted connection: `next_request()`, then `respond()` or `start()`/`send()`/`end()`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.method = b"GET"

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone(str(exc)) from None

    async def _next_event(self) -> h11.Event:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ClientGone(f"bad request: {exc}") from None
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                raise ClientGone("connection paused (protocol switch)")
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone(str(exc)) from None
            self.conn.receive_data(bytes(data))

    async def next_request(self) -> tuple[h11.Request, bytes] | None:
        """The next request and its body; None when the client closed cleanly between requests."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        elif self.conn.our_state is not h11.IDLE:
            return None
        try:
            event = await self._next_event()
        except ClientGone:
            return None
        if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Request):
            return None
        self.method = event.method
        body = bytearray()
        while True:
            ev = await self._next_event()
            if isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > MAX_BODY:
                    raise ClientGone("request body too large")
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return event, bytes(body)

    async def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes = b"") -> None:
        """A whole response: with Content-Length up to Go's 2 KiB buffer, chunked beyond it (as net/http
        frames a handler's body that set no length)."""
        framing = [("Content-Length", str(len(body)))] if len(body) <= GO_CHUNKING_BUFFER else []
        await self.start(status, [*headers, *framing])
        if body and self.method != b"HEAD":
            await self.send(body)
        await self.end()

    async def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        """The response head; h11 frames a body without Content-Length as chunked (HTTP/1.1)."""
        date = http_date().decode()
        await self._send(h11.Response(status_code=status, headers=[*headers, ("Date", date)]))

    async def send(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    def detach(self) -> bytes:
        """After a 101 Switching Protocols: the bytes h11 already read beyond the request."""
        data, _closed = self.conn.trailing_data
        return bytes(data)

    async def accept_websocket(self, key: bytes) -> WSConnection:
        """Answers a WebSocket upgrade with 101; the server-side framing then owns the stream."""
        await self._send(h11.InformationalResponse(status_code=101, headers=[
            ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", websocket_accept(key).decode())]))
        ws = WSConnection(ConnectionType.SERVER)
        pending = self.detach()
        if pending:
            ws.receive_data(pending)
        return ws

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self.stream.aclose()

"""Terminating a WebSocket on a tunnel stream, for `tcp://`, `ssh://`, `rdp://`, `smb://` services.

cloudflared answers such a WebSocket itself (docs/protocol.md §6.2, vector B04): 200 with the serialized
101 headers, then WebSocket frames on the stream (the edge's masked, ours unmasked) and raw TCP to the
service. wsproto does the framing; it is driven in its OPEN state after a stand-in handshake, because the
real handshake already happened between the eyeball and the edge.
"""

from __future__ import annotations

import base64
import hashlib

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    TextMessage,
)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# cloudflared copies every stream through a 16 KiB buffer (cfio.Copy; stream.Pipe hides the sockets'
# ReadFrom/WriteTo): each read of a socket becomes one binary message of at most this size, and on the
# receiving side a message longer than this is cut to it and the rest silently dropped (websocket/
# connection.go, Conn.Read: docs/protocol.md §12.2). Both of our ends send messages of this size.
MESSAGE_SIZE = 16 * 1024


def websocket_accept(key: bytes) -> bytes:
    """`Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def accept_headers(key: bytes | None) -> list[tuple[bytes, bytes]]:
    """The origin-side 101 headers cloudflared serializes when it terminates the WebSocket itself."""
    return [
        (b"Connection", b"Upgrade"),
        (b"Sec-Websocket-Accept", websocket_accept(key or b"")),
        (b"Upgrade", b"websocket"),
    ]


class WebSocketBridge:
    """Sans-I/O: edge bytes (WebSocket frames) <-> raw TCP bytes.

    `from_edge(data)` -> (bytes for the TCP service, bytes to send back to the edge, closed);
    `to_edge(data)` -> frame bytes for the edge; `close()` -> a close frame (or b"" if already closed).
    """

    def __init__(self) -> None:
        self._ws = WSConnection(ConnectionType.SERVER)
        self._ws.receive_data(b"GET / HTTP/1.1\r\nHost: tunnel\r\n"
                              b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                              b"Sec-WebSocket-Version: 13\r\n\r\n")
        for _ in self._ws.events():
            pass
        self._ws.send(AcceptConnection())  # the handshake bytes are discarded: the edge already has them
        self.closed = False

    def from_edge(self, data: bytes) -> tuple[bytes, bytes, bool]:
        to_service = bytearray()
        to_edge = bytearray()
        self._ws.receive_data(data)
        event: Event
        for event in self._ws.events():
            if isinstance(event, BytesMessage):
                to_service += event.data
            elif isinstance(event, TextMessage):
                to_service += event.data.encode("utf-8")
            elif isinstance(event, Ping):
                to_edge += self._ws.send(event.response())
            elif isinstance(event, CloseConnection):
                if self._ws.state is not ConnectionState.CLOSED:
                    to_edge += self._ws.send(event.response())
                self.closed = True
        return bytes(to_service), bytes(to_edge), self.closed

    def to_edge(self, data: bytes) -> bytes:
        if self.closed or self._ws.state is not ConnectionState.OPEN:
            return b""
        return self._ws.send(Message(data=data))

    def close(self, code: int = 1000) -> bytes:
        if self.closed or self._ws.state is not ConnectionState.OPEN:
            return b""
        self.closed = True
        return self._ws.send(CloseConnection(code=code))

"""One client connection to an origin fixture: read requests, write responses, keep the record."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import trio

from tunnel_lab.origin_fixtures.history import History, RequestRecord
from tunnel_lab.origin_fixtures.http1 import (
    BodyData,
    EndOfRequest,
    Event,
    Framing,
    NeedData,
    RequestHead,
    RequestParseError,
    RequestReader,
    chunk,
    last_chunk,
    response_head,
)

log = logging.getLogger(__name__)

RECEIVE_SIZE = 64 * 1024
ECHO_BODY_PREFIX = 4096

Headers = list[tuple[str | bytes, str | bytes | int]]


@dataclass(frozen=True)
class BodyInfo:
    """A request body after it was read: its length, digest, first bytes and trailers."""

    length: int
    sha256: str
    prefix: bytes
    trailers: tuple[tuple[bytes, bytes], ...] = ()


def _text(value: bytes) -> str:
    return value.decode("latin-1")


class Conn:
    """A client connection: a request reader over a trio stream, and the current request's record."""

    def __init__(self, stream: trio.abc.Stream, *, kind: str, history: History, peer: str,
                 tls: bool, sni: str | None, max_head_bytes: int) -> None:
        self.stream = stream
        self.kind = kind
        self.history = history
        self.peer = peer
        self.tls = tls
        self.sni = sni
        self.reader = RequestReader(max_head_bytes=max_head_bytes)
        self.record: RequestRecord | None = None
        self.head_sent = False

    @property
    def socket_stream(self) -> trio.SocketStream:
        """The TCP stream under any TLS layer (for SO_LINGER tricks)."""
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        assert isinstance(stream, trio.SocketStream)
        return stream

    async def receive_event(self) -> Event:
        """The next request event, receiving bytes as needed."""
        while True:
            event = self.reader.next_event()
            if not isinstance(event, NeedData):
                return event
            self.reader.feed(await self.stream.receive_some(RECEIVE_SIZE))

    def begin_record(self, head: RequestHead) -> RequestRecord:
        """Start the history record of a request whose head was just read."""
        self.head_sent = False
        self.record = self.history.begin(RequestRecord(
            seq=self.history.next_seq(), time=History.now(), kind=self.kind, peer=self.peer,
            tls=self.tls, sni=self.sni, method=_text(head.method), target=_text(head.target),
            http_version=_text(head.http_version),
            headers=[[_text(k), _text(v)] for k, v in head.headers], framing=head.framing.value,
            websocket=head.is_websocket_upgrade))
        return self.record

    def end_exchange(self) -> None:
        """The response is complete: forget the request and read the next one on this connection."""
        self.record = None
        self.head_sent = False
        self.reader.start_next_request()

    async def read_body(self, head: RequestHead) -> BodyInfo:
        """Consume the request body (de-chunked), digesting it without keeping more than a prefix."""
        expect = (head.get(b"expect") or b"").lower()
        if expect == b"100-continue" and head.http_version == b"1.1" \
                and head.framing is not Framing.NONE and head.content_length != 0:
            await self.stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        digest = hashlib.sha256()
        length = 0
        prefix = bytearray()
        while True:
            event = await self.receive_event()
            if isinstance(event, BodyData):
                digest.update(event.data)
                length += len(event.data)
                if len(prefix) < ECHO_BODY_PREFIX:
                    prefix += event.data[: ECHO_BODY_PREFIX - len(prefix)]
                continue
            if isinstance(event, EndOfRequest):
                body = BodyInfo(length, digest.hexdigest(), bytes(prefix), event.trailers)
                break
            raise RequestParseError(f"origin fixture: unexpected {type(event).__name__} in a body")
        if self.record is not None:
            self.record.body_length = body.length
            self.record.body_sha256 = body.sha256
            self.record.trailers = [[_text(k), _text(v)] for k, v in body.trailers]
        return body

    def note(self, text: str) -> None:
        """Add a remark to the current record (what the fixture did beyond the status)."""
        # Misbehaviour is a test knob: say so at INFO, so a log shows why a client saw what it saw.
        level = logging.INFO if self.kind == "misbehave" else logging.DEBUG
        target = self.record.target if self.record is not None else "-"
        log.log(level, "origin kind=%s peer=%s target=%s: %s", self.kind, self.peer, target, text)
        if self.record is not None:
            self.record.note = f"{self.record.note}; {text}" if self.record.note else text

    async def send(self, data: bytes) -> None:
        """Send raw bytes."""
        await self.stream.send_all(data)

    def _base_headers(self, head: RequestHead, headers: Headers, keep: bool) -> Headers:
        out: Headers = [("X-Origin", self.kind), *headers]
        if not keep or not head.keep_alive:
            out.append(("Connection", "close"))
        return out

    async def send_head(self, head: RequestHead, status: int, headers: Headers, *,
                        keep_alive: bool = True, reason: str | None = None) -> None:
        """Send a status line and headers as given (plus `X-Origin` and, when closing, `Connection`)."""
        if self.record is not None:
            self.record.status = status
        self.head_sent = True
        await self.send(response_head(status, self._base_headers(head, headers, keep_alive), reason=reason))

    async def respond(self, head: RequestHead, status: int, headers: Headers, body: bytes = b"", *,
                      keep_alive: bool = True) -> bool:
        """A complete response with `Content-Length` (no body for HEAD, 1xx, 204, 304).

        Returns whether the connection can carry another request.
        """
        bodyless = status < 200 or status in (204, 304)
        if not bodyless:
            headers = [*headers, ("Content-Length", len(body))]
        await self.send_head(head, status, headers, keep_alive=keep_alive)
        if not bodyless and head.method != b"HEAD" and body:
            await self.send(body)
        return keep_alive and head.keep_alive

    async def send_chunk(self, data: bytes) -> None:
        """One chunk of a chunked response body."""
        if data:
            await self.send(chunk(data))

    async def end_chunks(self, trailers: list[tuple[str | bytes, str | bytes]] | None = None) -> None:
        """The last chunk (and trailer section)."""
        await self.send(last_chunk(trailers))

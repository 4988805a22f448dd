"""A lenient, sans-I/O HTTP/1.1 request reader and response builders for the origin fixtures.

The fixtures are the ground truth for what a connector puts on the wire, so the reader keeps the raw
request head (header names as sent, in order, values untouched) and accepts anything that frames
(odd bytes in values, repeated headers, folded lines). h11 is stricter and normalises what it keeps,
which is right for a client under test but wrong for a witness; the tests use h11 as the strict client.

Usage: `feed(bytes)` (`b""` for EOF), then call `next_event()` until it returns `NEED_DATA`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tunnel_lab.wire.errors import ProtocolError

MAX_HEAD_BYTES = 1 << 20
MAX_CHUNK_LINE = 4096


class RequestParseError(ProtocolError):
    """A client sent bytes that cannot be framed as an HTTP/1.1 request."""


class Framing(enum.Enum):
    """How the request body was delimited on the wire (the echo's `framing` field)."""

    NONE = "none"
    CONTENT_LENGTH = "content-length"
    CHUNKED = "chunked"


@dataclass(frozen=True, kw_only=True)
class RequestHead:
    """A request line and header section, exactly as received."""

    method: bytes
    target: bytes
    http_version: bytes  # b"1.1" or b"1.0"
    headers: tuple[tuple[bytes, bytes], ...]  # raw names, values without surrounding whitespace
    raw: bytes  # the whole head including the blank line that ends it
    framing: Framing
    content_length: int | None

    def get(self, name: bytes) -> bytes | None:
        """The first value of a header (case-insensitive name), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def tokens(self, name: bytes) -> set[bytes]:
        """All comma-separated tokens of every occurrence of a header, lower-cased."""
        lname = name.lower()
        out: set[bytes] = set()
        for key, value in self.headers:
            if key.lower() == lname:
                out.update(t.strip().lower() for t in value.split(b",") if t.strip())
        return out

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after this one."""
        conn = self.tokens(b"connection")
        if self.http_version == b"1.0":
            return b"keep-alive" in conn
        return b"close" not in conn

    @property
    def is_websocket_upgrade(self) -> bool:
        """An HTTP/1.1 WebSocket opening handshake (Upgrade: websocket + Connection: upgrade)."""
        return b"websocket" in self.tokens(b"upgrade") and b"upgrade" in self.tokens(b"connection")


@dataclass(frozen=True)
class BodyData:
    """A piece of the (de-chunked) request body."""

    data: bytes


@dataclass(frozen=True)
class EndOfRequest:
    """The body ended; `trailers` is the chunked trailer section (raw names)."""

    trailers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True)
class ConnectionClosed:
    """The client closed the connection cleanly between requests."""


class NeedData(enum.Enum):
    """`next_event()` needs more bytes (the one member is `NEED_DATA`)."""

    NEED_DATA = "need-data"


NEED_DATA = NeedData.NEED_DATA

Event = RequestHead | BodyData | EndOfRequest | ConnectionClosed


class _State(enum.Enum):
    HEAD = 1
    LENGTH_BODY = 2
    CHUNK_SIZE = 3
    CHUNK_DATA = 4
    CHUNK_CRLF = 5
    TRAILERS = 6
    DONE = 7  # a request ended; waiting for start_next_request()
    CLOSED = 8


def _parse_header_lines(lines: list[bytes], where: str) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and headers:
            # obs-fold: keep it as part of the previous value, raw.
            name, value = headers[-1]
            headers[-1] = (name, value + b" " + line.strip(b" \t"))
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip(b" \t"):
            raise RequestParseError(f"origin fixture: bad {where} line {line[:80]!r}")
        headers.append((name, value.strip(b" \t")))
    return headers


def parse_head(raw: bytes) -> RequestHead:
    """Parse a complete request head (ending in a blank line) into a `RequestHead`."""
    text = raw[:-4] if raw.endswith(b"\r\n\r\n") else raw.rstrip(b"\r\n")
    lines = [line.rstrip(b"\r") for line in text.split(b"\n")]
    request_line = lines[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise RequestParseError(f"origin fixture: bad request line {request_line[:200]!r}")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise RequestParseError(f"origin fixture: unsupported HTTP version {version[:20]!r}")
    headers = _parse_header_lines(lines[1:], "header")
    te = [v for k, v in headers if k.lower() == b"transfer-encoding"]
    cl = [v for k, v in headers if k.lower() == b"content-length"]
    framing, length = Framing.NONE, None
    if te:
        codings = [t.strip().lower() for v in te for t in v.split(b",") if t.strip()]
        if not codings or codings[-1] != b"chunked":
            raise RequestParseError(f"origin fixture: transfer-encoding {b', '.join(te)!r} is not chunked")
        framing = Framing.CHUNKED
    elif cl:
        values = {v.strip() for v in cl}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise RequestParseError(f"origin fixture: bad content-length {cl!r}")
        length = int(next(iter(values)))
        framing = Framing.CONTENT_LENGTH
    return RequestHead(method=method, target=target, http_version=version[5:], headers=tuple(headers),
                       raw=raw, framing=framing, content_length=length)


class RequestReader:
    """Incremental request de-framer for one connection (requests one after another: keep-alive)."""

    def __init__(self, *, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self._buf = bytearray()
        self._eof = False
        self._state = _State.HEAD
        self._remaining = 0
        self._trailer_lines: list[bytes] = []
        self._max_head = max_head_bytes

    def feed(self, data: bytes | bytearray) -> None:
        """Add received bytes; `b""` means the client closed its sending side."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def start_next_request(self) -> None:
        """After `EndOfRequest`, allow the next request on the connection to be read."""
        if self._state is not _State.DONE:
            raise RuntimeError("start_next_request() before the current request ended")
        self._state = _State.HEAD

    def take_buffered(self) -> bytes:
        """Hand over the unread bytes (after an upgrade: they belong to the new protocol)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._state = _State.CLOSED
        return data

    def next_event(self) -> Event | NeedData:
        """The next event, or `NEED_DATA`. Raises `RequestParseError` for bytes that do not frame."""
        state = self._state
        if state is _State.HEAD:
            return self._head()
        if state is _State.LENGTH_BODY:
            if self._remaining == 0:
                self._state = _State.DONE
                return EndOfRequest()
            if not self._buf:
                return self._need("the body")
            data = bytes(self._buf[: self._remaining])
            del self._buf[: len(data)]
            self._remaining -= len(data)
            return BodyData(data)
        if state is _State.CHUNK_SIZE:
            line = self._line(MAX_CHUNK_LINE, "a chunk size line")
            if line is None:
                return self._need("a chunk size line")
            size_text = line.split(b";", 1)[0].strip(b" \t")
            try:
                size = int(size_text, 16)
            except ValueError:
                raise RequestParseError(f"origin fixture: bad chunk size line {line[:80]!r}") from None
            if size_text[:1] in (b"-", b"+") or size_text.lower().startswith(b"0x"):
                raise RequestParseError(f"origin fixture: bad chunk size line {line[:80]!r}")
            if size == 0:
                self._state = _State.TRAILERS
                self._trailer_lines = []
            else:
                self._remaining = size
                self._state = _State.CHUNK_DATA
            return self.next_event()
        if state is _State.CHUNK_DATA:
            if not self._buf:
                return self._need("a chunk")
            data = bytes(self._buf[: self._remaining])
            del self._buf[: len(data)]
            self._remaining -= len(data)
            if self._remaining == 0:
                self._state = _State.CHUNK_CRLF
            return BodyData(data)
        if state is _State.CHUNK_CRLF:
            if len(self._buf) < 2:
                return self._need("the CRLF after a chunk")
            if self._buf[:2] != b"\r\n":
                got = bytes(self._buf[:8])
                raise RequestParseError(f"origin fixture: chunk not followed by CRLF: {got!r}")
            del self._buf[:2]
            self._state = _State.CHUNK_SIZE
            return self.next_event()
        if state is _State.TRAILERS:
            while True:
                line = self._line(self._max_head, "the trailer section")
                if line is None:
                    return self._need("the trailer section")
                if line == b"":
                    self._state = _State.DONE
                    trailers = _parse_header_lines(self._trailer_lines, "trailer")
                    return EndOfRequest(tuple(trailers))
                self._trailer_lines.append(line)
        return NEED_DATA

    def _need(self, what: str) -> NeedData:
        if self._eof:
            raise RequestParseError(f"origin fixture: connection closed in the middle of {what}")
        return NEED_DATA

    def _line(self, limit: int, what: str) -> bytes | None:
        idx = self._buf.find(b"\n")
        if idx < 0:
            if len(self._buf) > limit:
                raise RequestParseError(f"origin fixture: {what} is longer than {limit} bytes")
            return None
        line = bytes(self._buf[:idx]).rstrip(b"\r")
        del self._buf[: idx + 1]
        return line

    def _head(self) -> Event | NeedData:
        # Tolerate blank lines before a request line (RFC 9112 §2.2).
        while self._buf[:2] == b"\r\n":
            del self._buf[:2]
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > self._max_head:
                raise RequestParseError(f"origin fixture: request head is longer than {self._max_head} bytes")
            if self._eof:
                if not self._buf:
                    self._state = _State.CLOSED
                    return ConnectionClosed()
                raise RequestParseError("origin fixture: connection closed in the middle of a request head")
            return NEED_DATA
        raw = bytes(self._buf[: end + 4])
        del self._buf[: end + 4]
        head = parse_head(raw)
        if head.framing is Framing.CHUNKED:
            self._state = _State.CHUNK_SIZE
        else:
            self._remaining = head.content_length or 0
            self._state = _State.LENGTH_BODY
        return head


# --- responses ---------------------------------------------------------------------------------

_REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted",
    204: "No Content", 206: "Partial Content", 301: "Moved Permanently", 302: "Found",
    303: "See Other", 304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
    418: "I'm a teapot", 426: "Upgrade Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}


def reason_phrase(status: int) -> str:
    """The usual reason phrase for a status code (`Unknown` for the rest)."""
    return _REASONS.get(status, "Unknown")


def _b(value: str | bytes | int) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("latin-1")


def response_head(status: int, headers: list[tuple[str | bytes, str | bytes | int]], *,
                  reason: str | None = None) -> bytes:
    """An HTTP/1.1 status line and header section, ready to send."""
    lines = [b"HTTP/1.1 %d %s" % (status, _b(reason if reason is not None else reason_phrase(status)))]
    lines += [_b(name) + b": " + _b(value) for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (empty data gives nothing: an empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: list[tuple[str | bytes, str | bytes]] | None = None) -> bytes:
    """The last chunk and the trailer section."""
    lines = [_b(name) + b": " + _b(value) + b"\r\n" for name, value in trailers or ()]
    return b"0\r\n" + b"".join(lines) + b"\r\n"

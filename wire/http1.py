"""HTTP/1.1 framing for the hot paths: llhttp (httptools) behind sans-I/O readers, and a response writer.

The edge reads eyeball requests with `RequestReader` and answers with `ResponseWriter`; the connector reads
origin responses with `ResponseReader` (its request bytes come from `wire.origin`). httptools parses in C
and calls back per element (URL, header, body piece); the readers turn those calls into events, as h11
does: `feed(data)` returns the events the bytes completed, `feed_eof()` those the end of input completes.
Bad input raises `Http1Error` with the status an answer should carry (400, 431, 505).

llhttp refuses what h11 refused that matters for smuggling (both Content-Length and Transfer-Encoding,
a Transfer-Encoding other than chunked, two different Content-Lengths: 400), and is stricter in places
(no obsolete line folding, no bare LF). It is told to accept one thing the edge answers itself
(`wire.eyeball.request_head_error`): an HTTP version other than 1.x, which gets 505, not 400.

h11 still serves the light paths (the connector's metrics and hello-world servers, the edge's API, WARP and
live pages, the runner's client): there its validation matters more than its cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httptools

from tunnel_lab.wire.errors import ProtocolError, TunnelLabError

__all__ = [
    "Body",
    "Closed",
    "End",
    "Http1Error",
    "Informational",
    "RequestHead",
    "RequestReader",
    "ResponseHead",
    "ResponseReader",
    "ResponseWriter",
]

Headers = list[tuple[bytes, bytes]]
_OWS = b" \t"


class Http1Error(ProtocolError):
    """HTTP/1.1 bytes that cannot be parsed (from a peer) or sent (by us); `status` for an answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class RequestHead:
    """A request line and its fields (names lower-case, values without surrounding blanks)."""

    method: bytes
    target: bytes
    http_version: bytes  # b"1.1", b"1.0"
    headers: Headers
    keep_alive: bool  # the client allows another request on this connection
    expects_continue: bool  # `Expect: 100-continue` from an HTTP/1.1 client
    upgrade: bool  # `Upgrade` / CONNECT: the bytes after this head may not be HTTP (`RequestReader.held`)


@dataclass(slots=True)
class ResponseHead:
    """A final response's status line and fields (names lower-case, values without surrounding blanks)."""

    status: int
    reason: bytes
    http_version: bytes
    headers: Headers


@dataclass(slots=True)
class Informational:
    """A 1xx response head (100 Continue, 103 Early Hints, 101 Switching Protocols)."""

    status: int
    headers: Headers


@dataclass(slots=True)
class Body:
    """Body bytes (de-chunked); the pieces one `feed` parsed come as one event."""

    data: bytes


@dataclass(slots=True)
class End:
    """The message is complete; `trailers` from a chunked body."""

    trailers: Headers


@dataclass(slots=True)
class Closed:
    """The server closed the connection where that ends no response (before one, or after a HEAD's)."""


Event = RequestHead | ResponseHead | Informational | Body | End | Closed


class _SkipBody(TunnelLabError):
    """Raised from a callback to stop llhttp after the head of a response that has no body (HEAD)."""


def _lower_fields(raw: Headers) -> Headers:
    return [(name.lower(), value.strip(_OWS)) for name, value in raw]


def _stripped_fields(raw: Headers) -> Headers:
    return [(name, value.strip(_OWS)) for name, value in raw]


class _Reader:
    """The callback side shared by both readers: collects heads, body pieces and trailers."""

    def __init__(self, max_head: int, fields: Callable[[Headers], Headers]) -> None:
        self.max_head = max_head
        self._clean = fields
        self.events: list[Event] = []
        self.in_head = False  # between the message's first byte and the end of its head
        self.in_body = False  # between the end of the head and the end of the message
        self._head_size = 0  # bytes of this head seen so far (an upper bound once it spans reads)
        self._spans = 0  # bytes the callbacks delivered for this head
        self._start = b""  # URL (request) or reason phrase (response)
        self._fields: Headers = []
        self._pieces: list[bytes] = []
        # A parse error in bytes that came after complete events (a head, then a bad chunk size): those
        # events go first, as h11 gave them; the error is raised by the next `feed` (callers that would
        # wait for more bytes first check it).
        self.error: Http1Error | None = None

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        self.in_head = True
        self._start = b""
        self._fields = []
        self._spans = 0

    def on_url(self, url: bytes) -> None:
        self._start += url
        self._spans += len(url)

    on_status = on_url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))
        self._spans += len(name) + len(value) + 4

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        self._flush_body()
        self.in_body = False
        # fields after the head are a chunked body's trailers
        self.events.append(End(self._clean(self._fields) if self._fields else []))
        self._fields = []

    # -- helpers

    def _head_done(self) -> None:
        self.in_head = False
        self.in_body = True
        self._head_size = 0

    def _flush_body(self) -> None:
        if self._pieces:
            data = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
            self._pieces.clear()
            self.events.append(Body(data))

    def _bound_head(self, head_was_open: bool, fed: int) -> None:
        """After a read: a head still incomplete must stay within `max_head` (431)."""
        if not self.in_head:
            return
        # A head that began before this read owns all of it; one that began in it, what the callbacks saw.
        self._head_size = self._head_size + fed if head_was_open else self._spans
        if self._head_size > self.max_head:
            raise Http1Error(f"head over {self.max_head} bytes and not yet complete", 431)

    def _take(self) -> list[Event]:
        self._flush_body()
        events, self.events = self.events, []
        return events

    def _fail(self, error: Http1Error) -> list[Event]:
        events = self._take()
        if not events:
            raise error
        self.error = error
        return events


class RequestReader(_Reader):
    """Requests from a client, one after another on one connection (server side).

    After a head with `upgrade` the reader holds every further byte (`held`) until told what the response
    was: `resume()` parses them as HTTP again (the upgrade was refused), or the caller takes `held` as the
    new protocol's first bytes.
    """

    def __init__(self, max_head: int) -> None:
        super().__init__(max_head, _lower_fields)
        self._parser = httptools.HttpRequestParser(self)
        self._parser.set_dangerous_leniencies(lenient_version=True)
        self.held: bytes | None = None  # bytes after an upgrade request, not parsed

    def on_headers_complete(self) -> None:
        self._flush_body()
        parser = self._parser
        version = parser.get_http_version().encode()
        headers = _lower_fields(self._fields)
        self._fields = []
        codings = [v.lower() for n, v in headers if n == b"transfer-encoding"]
        if codings and codings != [b"chunked"]:
            # llhttp refuses most of these only once the head is out: refused here, nothing is forwarded
            raise Http1Error(f"malformed request: Transfer-Encoding {b', '.join(codings).decode('latin-1')!r}"
                             " is not chunked")
        expects_continue = version == b"1.1" and any(
            n == b"expect" and v.lower() == b"100-continue" for n, v in headers)
        self.events.append(RequestHead(
            method=parser.get_method(), target=self._start, http_version=version, headers=headers,
            keep_alive=version == b"1.1" and parser.should_keep_alive(),  # HTTP/1.0: one request, as h11
            expects_continue=expects_continue, upgrade=parser.should_upgrade()))
        self._head_done()

    def feed(self, data: bytes) -> list[Event]:
        """The events `data` completes. Raises `Http1Error` for bytes that are not an HTTP/1.x request."""
        if self.error is not None:
            raise self.error
        if self.held is not None:
            self.held += data
            return []
        head_was_open = self.in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.held = data[upgrade.args[0]:]
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, Http1Error):
                raise
            return self._fail(exc.__context__)
        except httptools.HttpParserError as exc:
            return self._fail(Http1Error(f"malformed request: {exc}"))
        self._bound_head(head_was_open, len(data))
        return self._take()

    def resume(self) -> list[Event]:
        """After a refused upgrade: parse the held bytes as HTTP again."""
        data, self.held = self.held or b"", None
        return self.feed(data) if data else []

    def feed_eof(self) -> None:
        """The client closed its side: fine between requests, `Http1Error` within one."""
        if self.error is not None:
            raise self.error
        if self.in_head or self.in_body:
            raise Http1Error("client closed the connection in the middle of a request")

    @property
    def idle(self) -> bool:
        """Between requests, with no byte of the next one read."""
        return not (self.in_head or self.in_body or self.held)


def _no_body_status(status: int) -> bool:
    return status < 200 or status in (204, 304)


class ResponseReader(_Reader):
    """Responses from a server, one per request (client side). Call `expect(method)` before each.

    Field names keep their case (a proxy passes them on as the origin wrote them)."""

    def __init__(self, max_head: int) -> None:
        super().__init__(max_head, _stripped_fields)
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = False
        self._until_eof = False  # the body ends when the connection does
        self._status = 0
        self.done = False  # this response's End was given
        self.keep_alive = False
        self.junk = False  # bytes after the response (or a parse error in them): not reusable
        self._restart = False  # llhttp was stopped after a bodiless head: a fresh parser for the next
        self.held: bytes | None = None  # bytes after a 101 Switching Protocols head

    def expect(self, method: str) -> None:
        """A new request was sent: parse its response (HEAD: no body whatever the head says)."""
        if self._restart:
            self._parser = httptools.HttpResponseParser(self)
            self._restart = False
        self._head_request = method == "HEAD"
        self.done = False
        self.keep_alive = False
        self._until_eof = False
        self._status = 0

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        headers = _stripped_fields(self._fields)
        self._fields = []
        self._head_done()
        if status < 200:
            self.events.append(Informational(status, headers))
            return
        self._status = status
        self.events.append(ResponseHead(status=status, reason=self._start,
                                        http_version=parser.get_http_version().encode(), headers=headers))
        self.keep_alive = parser.should_keep_alive()
        if self._head_request:
            raise _SkipBody
        self._until_eof = not _no_body_status(status) and not any(
            n.lower() in (b"content-length", b"transfer-encoding") for n, _ in headers)

    def on_message_complete(self) -> None:
        if self._status == 0:  # the end of a 1xx: no event, the final response follows
            self.in_body = False
            return
        self._status = 0
        super().on_message_complete()
        self.done = True

    def feed(self, data: bytes) -> list[Event]:
        """The events `data` completes. Raises `Http1Error` for bytes that are not an HTTP/1.x response;
        bytes after a complete response only make the connection not reusable (`junk`)."""
        if self.error is not None:
            raise self.error
        if self.held is not None:
            self.held += data
            return []
        if self.done:
            self.junk = True
            return []
        head_was_open = self.in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.held = data[upgrade.args[0]:]
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _SkipBody):
                raise
            self._end_bodiless()
        except httptools.HttpParserError as exc:
            if not self.done:
                return self._fail(Http1Error(f"malformed response: {exc}"))
            self.junk = True
        self._bound_head(head_was_open, len(data))
        return self._trim(self._take())

    def _end_bodiless(self) -> None:
        self.in_body = False
        self.events.append(End([]))
        self.done = True
        # llhttp stopped at the head: as with h11, bytes that follow are parsed as the next response
        self._restart = True

    def _trim(self, events: list[Event]) -> list[Event]:
        # llhttp goes on parsing after the response; anything after its End is junk on this connection
        for i, event in enumerate(events):
            if type(event) is End:
                if i + 1 < len(events):
                    self.junk = True
                    return events[:i + 1]
                break
        return events

    def feed_eof(self) -> list[Event]:
        """The server closed the connection: the end of a body read until EOF, `Closed` outside a
        response (before one: the caller judges), `Http1Error` within one."""
        if self.error is not None:
            raise self.error
        if self.in_body and self._until_eof and not self.done:
            self.in_body = False
            self.done = True
            return [*self._take(), End([])]
        if self.in_head or self.in_body:
            part = "head" if self.in_head else "body"
            raise Http1Error(f"server closed the connection in the middle of a response {part}")
        return [Closed()]

    @property
    def reusable(self) -> bool:
        """The response is complete, both sides allow another request, and nothing else was sent."""
        return self.done and self.keep_alive and not self.junk and not self._until_eof


class ResponseWriter:
    """One response to one request (server side): the head, the body framing, the end.

    A body is framed by the head's Content-Length, else chunked for an HTTP/1.1 client, else by closing
    the connection (`must_close`). Sending more or fewer bytes than announced raises `Http1Error`.
    """

    def __init__(self, *, http_version: bytes, method: bytes, keep_alive: bool) -> None:
        self.http11 = http_version == b"1.1"
        self.head_request = method == b"HEAD"
        self.must_close = not keep_alive
        self.chunked = False
        self.left: int | None = None  # Content-Length bytes still to send
        self.bodiless = False
        self.started = False
        self.ended = False

    def informational(self, status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
        """A 1xx head (100 Continue, 101 Switching Protocols)."""
        return _head(status, reason, headers)

    def head(self, status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
        """The final response head. Raises `Http1Error` for a Content-Length that is not one number."""
        self.started = True
        lengths = {v.strip(_OWS) for n, v in headers if n.lower() == b"content-length"}
        if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
            raise Http1Error(f"response Content-Length {sorted(lengths)!r} is not one number")
        extra: Headers = []
        if self.head_request or _no_body_status(status):
            self.bodiless = True
        elif lengths:
            self.left = int(next(iter(lengths)))
        elif self.http11:
            self.chunked = True
            extra.append((b"transfer-encoding", b"chunked"))
        else:
            self.must_close = True
        if self.must_close and not any(n.lower() == b"connection" for n, _ in headers):
            extra.append((b"connection", b"close"))
        return _head(status, reason, [*headers, *extra] if extra else headers)

    def data(self, data: bytes) -> bytes:
        """Body bytes as they go on the wire."""
        if not data or self.bodiless:
            if data and not self.head_request:
                raise Http1Error(f"{len(data)} body bytes in a response that has no body")
            return b""
        if self.chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        if self.left is not None:
            if len(data) > self.left:
                raise Http1Error(f"{len(data)} body bytes where Content-Length allows {self.left} more")
            self.left -= len(data)
        return data

    def end(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        """The end of the body (with trailers when chunked)."""
        self.ended = True
        if self.chunked:
            return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
        if self.left and not self.head_request:
            raise Http1Error(f"response ended {self.left} bytes short of its Content-Length")
        return b""


def _head(status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)

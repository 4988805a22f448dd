"""The HTTP/1.1 eyeball server (wire.http1 on httptools): keep-alive, timeouts, WebSocket upgrades.

Used for `--http-listen` and for `--https-listen` connections that did not negotiate h2.
"""

from __future__ import annotations

import contextlib
import http
import logging
import math
from collections import deque

import trio

from tunnel_lab.edge import pages
from tunnel_lab.edge.proxy import BadRequestBody, EyeballGone, proxy_request
from tunnel_lab.edge.state import EdgeState
from tunnel_lab.transport.tunnel import TunnelConnection
from tunnel_lab.transport.writer import acquire_fast
from tunnel_lab.wire.eyeball import EyeballExchange, RequestRefused
from tunnel_lab.wire.http1 import Body, End, Event, Http1Error, RequestHead, RequestReader, ResponseWriter

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
READ_SIZE = 65536
BODY_READ_SIZE = 256 * 1024  # request-body reads: fewer parser events, DATA frames and tunnel writes per MB
EXTRA_REASONS = {520: "Unknown Error", 524: "A Timeout Occurred", 530: "Origin DNS Error"}


def reason(status: int) -> bytes:
    """The reason phrase for a status line."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return EXTRA_REASONS.get(status, "").encode()


class _Conn:
    """The request reader and response writer (wire.http1) plus the transport, with the read/send plumbing."""

    def __init__(self, edge: EdgeState[TunnelConnection], stream: trio.abc.Stream, client: str) -> None:
        self.edge = edge
        self.stream = stream
        self.client = client
        self.reader = RequestReader(edge.config.max_request_headers)
        self.events: deque[Event] = deque()  # parsed, not yet taken (a read can hold several)
        self.writer: ResponseWriter | None = None  # the current request's response
        self.closed = False
        self.peer_eof = False  # the eyeball closed its sending side
        self.send_lock = trio.Lock()
        self._out: list[bytes] = []  # serialized but not yet written (a deferred response head)

    def feed(self, data: bytes) -> None:
        """Parse bytes read from the eyeball (b"" is its EOF). Raises `Http1Error`."""
        if data:
            self.events.extend(self.reader.feed(data))
        else:
            self.reader.feed_eof()

    async def next_event(self, timeout: float, read_size: int = READ_SIZE) -> Event | None:
        """The next parsed event, None at EOF between requests; raises EyeballGone on a broken transport,
        TimeoutError after `timeout` s without bytes, Http1Error for bytes that are not HTTP/1.x."""
        while not self.events:
            if self.peer_eof:
                return None
            # a parse error deferred behind earlier events is raised at once (by feed_eof), without a read
            self.feed(await self.receive(timeout, read_size) if self.reader.error is None else b"")
        return self.events.popleft()

    async def receive(self, timeout: float, read_size: int) -> bytes:
        """Bytes from the eyeball (b"" at EOF); TimeoutError after `timeout` s without any."""
        with trio.move_on_after(timeout) as scope:
            try:
                data = await self.stream.receive_some(read_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise EyeballGone(f"eyeball connection broke: {exc}") from exc
        if scope.cancelled_caught:
            raise TimeoutError
        self.peer_eof = not data
        return bytes(data)

    async def send(self, data: bytes, *, defer: bool = False) -> None:
        """Send bytes (the upload task's 100 Continue and the response may race: a lock).

        `defer` keeps the bytes for the next write (a response head goes out with the first body
        bytes: one write instead of two); `flush` writes them without more.
        """
        await acquire_fast(self.send_lock)
        try:
            if data:
                self._out.append(data)
            if not defer:
                await self._write_out()
        finally:
            self.send_lock.release()

    async def flush(self) -> None:
        """Write deferred bytes now."""
        if self._out:
            await acquire_fast(self.send_lock)
            try:
                await self._write_out()
            finally:
                self.send_lock.release()

    async def _write_out(self) -> None:
        # under send_lock
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise EyeballGone(f"eyeball connection broke: {exc}") from exc

    async def close(self) -> None:
        """Close the transport (deferred bytes are written first, best effort)."""
        if not self.closed:
            self.closed = True
            with (trio.CancelScope(shield=True), trio.move_on_after(1),
                  contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                if self._out:
                    data, self._out = b"".join(self._out), []
                    await self.stream.send_all(data)
                await self.stream.aclose()


class _RawChannel:
    def __init__(self, conn: _Conn, leftover: bytes) -> None:
        self.conn = conn
        self.leftover = leftover

    async def receive_some(self) -> bytes:
        if self.leftover:
            data, self.leftover = self.leftover, b""
            return data
        try:
            return bytes(await self.conn.stream.receive_some(READ_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise EyeballGone(str(exc)) from exc

    async def send_all(self, data: bytes) -> None:
        try:
            await self.conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise EyeballGone(str(exc)) from exc


class H1Exchange:
    """One HTTP/1.1 request/response for `proxy_request`."""

    def __init__(self, conn: _Conn, core: EyeballExchange, head: RequestHead, writer: ResponseWriter) -> None:
        self.conn = conn
        self.core = core
        self.head = head
        self.writer = writer
        self.request = core.request
        self.has_body = core.has_body
        self.websocket = core.websocket
        self.response_started = False
        self.request_trailers: Headers | None = None
        self.switched = False
        self.aborted = False
        self.body_done = False  # the request's End was taken
        self._continue_due = head.expects_continue

    @property
    def reset(self) -> bool:
        """A forwarded request whose eyeball reset its stream in the sending data centre (edge.forward)."""
        return bool(getattr(self.conn.stream, "reset", False))

    async def read_body(self) -> bytes | None:
        if self.body_done:
            return None
        conn = self.conn
        if self._continue_due and not self.response_started and not conn.events:
            # the client waits for this before its body (and nothing of the body has come yet)
            await conn.send(self.writer.informational(100, b"Continue", []))
        self._continue_due = False
        try:
            event = await conn.next_event(conn.edge.config.eyeball_idle_timeout, BODY_READ_SIZE)
        except TimeoutError:
            raise EyeballGone("eyeball stopped sending the request body") from None
        except Http1Error as exc:
            raise BadRequestBody(f"malformed request body: {exc}", eof=conn.peer_eof) from exc
        if type(event) is Body:
            return event.data
        if type(event) is End:
            self.body_done = True
            self.request_trailers = event.trailers or None
            return None
        raise EyeballGone("eyeball closed during the request body")

    async def start_response(self, status: int, headers: Headers) -> None:
        self.response_started = True
        try:
            head = self.writer.head(status, reason(status), headers)
        except Http1Error as exc:
            log.warning("response head not valid HTTP/1.1 (%s); aborting", exc)
            await self.abort()
            raise EyeballGone(str(exc)) from exc
        # Deferred: written with the first body bytes, or by `flush` before the proxy waits.
        await self.conn.send(head, defer=True)

    async def send_body(self, data: bytes) -> None:
        try:
            data = self.writer.data(data)
        except Http1Error as exc:  # e.g. more bytes than Content-Length
            await self.abort()
            raise EyeballGone(str(exc)) from exc
        await self.conn.send(data)

    async def finish(self, trailers: Headers | None = None) -> None:
        if not self.writer.started or self.writer.ended:
            return
        try:
            data = self.writer.end(trailers or ())  # only chunked framing carries trailers
        except Http1Error as exc:  # fewer bytes than Content-Length
            await self.abort()
            raise EyeballGone(str(exc)) from exc
        await self.conn.send(data)

    async def flush(self) -> None:
        await self.conn.flush()

    async def abort(self) -> None:
        self.aborted = True
        await self.conn.close()

    async def upgrade(self, status: int, headers: Headers) -> _RawChannel:
        await self.conn.send(self.writer.informational(status, reason(status), headers))
        self.switched = True
        leftover, self.conn.reader.held = self.conn.reader.held or b"", None
        return _RawChannel(self.conn, leftover)


async def handle_h1_connection(edge: EdgeState[TunnelConnection], stream: trio.abc.Stream, *, scheme: str,
                               client: str, client_ip: str) -> None:
    """Serve HTTP/1.1 on one eyeball connection until it closes (never raises but Cancelled)."""
    conn = _Conn(edge, stream, client)
    cfg = edge.config
    try:
        while True:
            try:
                if not conn.events and conn.reader.idle:
                    # Between requests: wait up to the idle timeout for the next request's first byte.
                    with trio.move_on_after(cfg.eyeball_idle_timeout) as waiting:
                        try:
                            data = await stream.receive_some(READ_SIZE)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return
                    if waiting.cancelled_caught:
                        log.debug("eyeball idle, closing client=%s", client)
                        return
                    if not data:
                        return
                    conn.feed(bytes(data))
                event: Event | None
                if conn.events:  # the head came whole in one read (the usual case): no timer
                    event = conn.events.popleft()
                else:
                    # From the first byte on, the whole head must arrive in time: a trickling client
                    # gets 408.
                    with trio.fail_after(cfg.eyeball_header_timeout):
                        event = await conn.next_event(math.inf)
            except (TimeoutError, trio.TooSlowError):
                log.info("eyeball too slow sending its request head; 408 client=%s", client)
                await _simple_error(conn, 408, "The request head did not arrive in time.")
                return
            except Http1Error as exc:
                if exc.status == 431:
                    log.warning("eyeball request head over %d bytes; 431 (limit max_request_headers) "
                                "client=%s", cfg.max_request_headers, client)
                else:
                    log.info("malformed eyeball request (%s); %d client=%s", exc, exc.status, client)
                await _simple_error(conn, exc.status, f"The request could not be parsed: {exc}")
                return
            if type(event) is not RequestHead:
                return  # EOF between requests
            conn.writer = writer = ResponseWriter(http_version=event.http_version, method=event.method,
                                                  keep_alive=event.keep_alive)
            try:
                core = EyeballExchange.from_h1(
                    method=event.method, target=event.target, http_version=event.http_version,
                    headers=event.headers, scheme=scheme, client_ip=client_ip,
                    max_head_size=cfg.max_request_headers)
            except RequestRefused as exc:
                # Before anything is forwarded: a smuggling attempt never reaches a tunnel stream.
                if exc.status == 431:
                    log.warning("eyeball %s; 431 (limit max_request_headers) client=%s", exc, client)
                else:
                    log.warning("eyeball request refused with %d: %s client=%s", exc.status, exc, client)
                await _simple_error(conn, exc.status, exc.detail)
                return
            if event.upgrade and not core.websocket:
                _resume(conn)  # only a WebSocket switches protocols here: the bytes after it are HTTP
            ex = H1Exchange(conn, core, event, writer)
            try:
                await proxy_request(edge, ex)
            except EyeballGone:
                return
            if ex.switched or ex.aborted or conn.closed:
                return
            _resume(conn)  # a WebSocket upgrade the origin refused: the connection goes on as HTTP
            if not ex.body_done and conn.events and type(conn.events[0]) is End:
                conn.events.popleft()  # a bodiless request's End, parsed with its head
                ex.body_done = True
            if not ex.body_done or not writer.ended or writer.must_close:
                return
            conn.writer = None  # the next request's error page is answered afresh
    except EyeballGone as exc:
        log.debug("eyeball connection ended: %s client=%s", exc, client)
    except Http1Error as exc:
        log.info("malformed eyeball request after an upgrade was refused (%s) client=%s", exc, client)
    except Exception:
        log.exception("eyeball connection failed client=%s", client)
    finally:
        await conn.close()


def _resume(conn: _Conn) -> None:
    if conn.reader.held is not None:
        conn.events.extend(conn.reader.resume())


async def _simple_error(conn: _Conn, status: int, detail: str) -> None:
    writer = conn.writer or ResponseWriter(http_version=b"1.1", method=b"GET", keep_alive=False)
    if writer.started:
        return
    writer.must_close = True
    headers, body = pages.error_page(status, detail)
    try:
        data = writer.head(status, reason(status), headers) + writer.data(body) + writer.end()
        await conn.send(data)
    except (EyeballGone, Http1Error):
        pass

"""The HTTP/1.1 eyeball server (h11): keep-alive, timeouts, WebSocket upgrades.

Used for `--http-listen` and for `--https-listen` connections that did not negotiate h2.
"""

from __future__ import annotations

import contextlib
import http
import logging
import math
from typing import Any

import h11
import trio

from tunnel_lab.edge import pages
from tunnel_lab.edge.proxy import BadRequestBody, EyeballGone, proxy_request
from tunnel_lab.edge.state import EdgeState
from tunnel_lab.transport.h11body import body_bytes_left, skip_body_bytes
from tunnel_lab.transport.tunnel import TunnelConnection
from tunnel_lab.transport.writer import acquire_fast
from tunnel_lab.wire.eyeball import EyeballExchange, RequestRefused

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
READ_SIZE = 65536
BODY_READ_SIZE = 256 * 1024  # request-body reads: fewer h11 events, DATA frames and tunnel writes per MB
EXTRA_REASONS = {520: "Unknown Error", 524: "A Timeout Occurred", 530: "Origin DNS Error"}


def reason(status: int) -> bytes:
    """The reason phrase for a status line."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return EXTRA_REASONS.get(status, "").encode()


class _Conn:
    """h11 plus the transport, with the read/send plumbing."""

    def __init__(self, edge: EdgeState[TunnelConnection], stream: trio.abc.Stream, client: str) -> None:
        self.edge = edge
        self.stream = stream
        self.client = client
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=edge.config.max_request_headers)
        self.closed = False
        self.peer_eof = False  # the eyeball closed its sending side
        self.send_lock = trio.Lock()
        self._out: list[bytes] = []  # serialized but not yet written (a deferred response head)

    async def next_event(self, timeout: float, read_size: int = READ_SIZE) -> Any:
        """The next h11 event; raises EyeballGone on timeout or a broken transport."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.receive(timeout, read_size))

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

    async def send(self, event: Any, *, defer: bool = False) -> None:
        """Send an h11 event (the upload task's 100 Continue and the response may race: a lock).

        `defer` keeps the bytes for the next write (a response head goes out with the first body
        bytes: one write instead of two); `flush` writes them without an event.
        """
        await acquire_fast(self.send_lock)
        try:
            data = self.h11.send(event)
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

    def __init__(self, conn: _Conn, core: EyeballExchange) -> None:
        self.conn = conn
        self.core = core
        self.request = core.request
        self.has_body = core.has_body
        self.websocket = core.websocket
        self.response_started = False
        self.request_trailers: Headers | None = None
        self.switched = False
        self.aborted = False
        self.body_done = not core.has_body
        self.chunked = False

    async def read_body(self) -> bytes | None:
        if self.body_done:
            return None
        if self.conn.h11.they_are_waiting_for_100_continue and not self.response_started:
            await self.conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                           reason=b"Continue"))
        try:
            # Content-Length body bytes around h11's buffer (transport/h11body.py)
            left = body_bytes_left(self.conn.h11)
            if left:
                data = await self.conn.receive(self.conn.edge.config.eyeball_idle_timeout, BODY_READ_SIZE)
                if skip_body_bytes(self.conn.h11, data, left):
                    return data
                self.conn.h11.receive_data(data)  # the body's end (or EOF): h11 judges it
            event = await self.conn.next_event(self.conn.edge.config.eyeball_idle_timeout, BODY_READ_SIZE)
        except TimeoutError:
            raise EyeballGone("eyeball stopped sending the request body") from None
        except h11.RemoteProtocolError as exc:
            raise BadRequestBody(f"malformed request body: {exc}", eof=self.conn.peer_eof) from exc
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self.body_done = True
            self.request_trailers = [(bytes(n), bytes(v)) for n, v in event.headers] or None
            return None
        raise EyeballGone("eyeball closed during the request body")

    async def start_response(self, status: int, headers: Headers) -> None:
        self.response_started = True
        self.chunked = (self.conn.h11.their_http_version == b"1.1"
                        and not any(n.lower() == b"content-length" for n, _ in headers))
        try:
            # Deferred: written with the first body bytes, or by `flush` before the proxy waits.
            await self.conn.send(h11.Response(status_code=status, headers=headers, reason=reason(status)),
                                 defer=True)
        except h11.LocalProtocolError as exc:
            log.warning("response head not valid HTTP/1.1 (%s); aborting", exc)
            await self.abort()
            raise EyeballGone(str(exc)) from exc

    async def send_body(self, data: bytes) -> None:
        try:
            await self.conn.send(h11.Data(data=data))
        except h11.LocalProtocolError as exc:  # e.g. more bytes than Content-Length
            await self.abort()
            raise EyeballGone(str(exc)) from exc

    async def finish(self, trailers: Headers | None = None) -> None:
        if self.conn.h11.our_state is not h11.SEND_BODY:
            return
        if not self.chunked:
            trailers = None  # only chunked framing can carry trailers
        try:
            await self.conn.send(h11.EndOfMessage(headers=trailers or []))
        except h11.LocalProtocolError as exc:  # fewer bytes than Content-Length
            await self.abort()
            raise EyeballGone(str(exc)) from exc

    async def flush(self) -> None:
        await self.conn.flush()

    async def abort(self) -> None:
        self.aborted = True
        await self.conn.close()

    async def upgrade(self, status: int, headers: Headers) -> _RawChannel:
        await self.conn.send(h11.InformationalResponse(status_code=status, headers=headers,
                                                       reason=reason(status)))
        self.switched = True
        leftover, _ = self.conn.h11.trailing_data
        return _RawChannel(self.conn, bytes(leftover))


async def handle_h1_connection(edge: EdgeState[TunnelConnection], stream: trio.abc.Stream, *, scheme: str,
                               client: str, client_ip: str) -> None:
    """Serve HTTP/1.1 on one eyeball connection until it closes (never raises but Cancelled)."""
    conn = _Conn(edge, stream, client)
    cfg = edge.config
    try:
        while True:
            idle = conn.h11.their_state is h11.IDLE and not conn.h11.trailing_data[0]
            if idle:
                # Between requests: wait up to the idle timeout for the next request's first byte.
                with trio.move_on_after(cfg.eyeball_idle_timeout) as waiting:
                    try:
                        data = await stream.receive_some(READ_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                if waiting.cancelled_caught:
                    log.debug("eyeball idle, closing client=%s", client)
                    return
                conn.h11.receive_data(bytes(data))
            try:
                # From the first byte on, the whole head must arrive in time: a trickling client
                # gets 408.
                with trio.fail_after(cfg.eyeball_header_timeout):
                    event = await conn.next_event(math.inf)
            except (TimeoutError, trio.TooSlowError):
                log.info("eyeball too slow sending its request head; 408 client=%s", client)
                await _simple_error(conn, 408, "The request head did not arrive in time.")
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
                if status == 431:
                    log.warning("eyeball request head over %d bytes; 431 (limit max_request_headers) "
                                "client=%s", cfg.max_request_headers, client)
                else:
                    log.info("malformed eyeball request (%s); %d client=%s", exc, status, client)
                await _simple_error(conn, status, f"The request could not be parsed: {exc}")
                return
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            headers = [(bytes(n), bytes(v)) for n, v in event.headers]
            try:
                core = EyeballExchange.from_h1(
                    method=bytes(event.method), target=bytes(event.target),
                    http_version=bytes(event.http_version), headers=headers, scheme=scheme,
                    client_ip=client_ip, max_head_size=cfg.max_request_headers)
            except RequestRefused as exc:
                # Before anything is forwarded: a smuggling attempt never reaches a tunnel stream.
                if exc.status == 431:
                    log.warning("eyeball %s; 431 (limit max_request_headers) client=%s", exc, client)
                else:
                    log.warning("eyeball request refused with %d: %s client=%s", exc.status, exc, client)
                await _simple_error(conn, exc.status, exc.detail)
                return
            ex = H1Exchange(conn, core)
            try:
                await proxy_request(edge, ex)
            except EyeballGone:
                return
            if ex.switched or ex.aborted or conn.closed:
                return
            if conn.h11.their_state is h11.SEND_BODY and not ex.has_body:
                # A bodiless request's EndOfMessage is already buffered in h11: take it.
                with contextlib.suppress(h11.RemoteProtocolError):
                    conn.h11.next_event()
            if conn.h11.our_state is h11.MUST_CLOSE or conn.h11.their_state is not h11.DONE:
                return
            if conn.h11.our_state is not h11.DONE:
                return
            conn.h11.start_next_cycle()
    except EyeballGone as exc:
        log.debug("eyeball connection ended: %s client=%s", exc, client)
    except Exception:
        log.exception("eyeball connection failed client=%s", client)
    finally:
        await conn.close()


async def _simple_error(conn: _Conn, status: int, detail: str) -> None:
    if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    headers, body = pages.error_page(status, detail)
    try:
        await conn.send(h11.Response(status_code=status, headers=[*headers, (b"connection", b"close")],
                                    reason=reason(status)))
        await conn.send(h11.Data(data=body))
        await conn.send(h11.EndOfMessage())
    except (EyeballGone, h11.LocalProtocolError):
        pass

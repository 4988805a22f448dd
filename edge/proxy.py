"""Forward one eyeball request through a tunnel: routing, the stream, bodies, errors, history.

Independent of the eyeball's HTTP version: the HTTP/1.1 and HTTP/2 eyeball servers both hand an
`Exchange` to `proxy_request`. Bodies are streamed both ways; tunnel DATA is acknowledged only after
it was handed to the eyeball (backpressure), never buffered whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

import trio
from h2.errors import ErrorCodes

from tunnel_lab.edge import access, lb, management, pages, waf
from tunnel_lab.edge.state import EdgeState
from tunnel_lab.transport.pipe import Way, pipe, receive_acked
from tunnel_lab.transport.tunnel import (
    NoCapacityError,
    OversizedHeadersError,
    TunnelConnection,
    TunnelStream,
    TunnelStreamError,
)
from tunnel_lab.wire.errors import TunnelLabError
from tunnel_lab.wire.eyeball import Answer, EyeballExchange, Next, new_ray_id

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
RELAY_BATCH = 256 * 1024  # response DATA already received is relayed in one write up to this size


class EyeballGone(TunnelLabError):
    """The eyeball closed or broke its connection."""


class BadRequestBody(EyeballGone):
    """The eyeball's request body is malformed (a bad chunk size), or ended early (`eof`: it closed its
    side before sending all it announced)."""

    def __init__(self, message: str, *, eof: bool = False) -> None:
        super().__init__(message)
        self.eof = eof


class RawChannel(Protocol):
    """A byte pipe to the eyeball after a protocol switch (WebSocket)."""

    async def receive_some(self) -> bytes:
        """Bytes from the eyeball; b"" at EOF."""

    async def send_all(self, data: bytes) -> None:
        """Bytes to the eyeball."""


class Exchange(Protocol):
    """One eyeball request/response, whatever the eyeball's HTTP version."""

    core: EyeballExchange  # the decisions; the rest moves bytes
    request: Any  # wire.eyeball.EyeballRequest
    has_body: bool
    websocket: bool
    response_started: bool
    request_trailers: Headers | None

    async def read_body(self) -> bytes | None:
        """Next request-body chunk; None at the end (then `request_trailers` is set)."""

    async def start_response(self, status: int, headers: Headers) -> None:
        """Send the response head."""

    async def send_body(self, data: bytes) -> None:
        """Send response-body bytes (returns once handed to the eyeball's transport)."""

    async def finish(self, trailers: Headers | None = None) -> None:
        """End the response."""

    async def abort(self) -> None:
        """Abort the response mid-way: the eyeball must see a failure, not a short success."""

    async def flush(self) -> None:
        """Hand the eyeball what was sent so far (the proxy calls it before it waits for the connector:
        an exchange may hold a response head back to send it with the first body bytes)."""

    async def upgrade(self, status: int, headers: Headers) -> RawChannel:
        """Send a 101 and switch to raw bytes (HTTP/1.1 only)."""


@functools.lru_cache(maxsize=1024)
def _uuid_text(value: Any) -> str:
    """`str(uuid)`, formatted once per tunnel rather than once per request."""
    return str(value)


def _host_only(host: str) -> str:
    host = host.strip()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.lower().rstrip(".")


async def send_page(ex: Exchange, status: int, headers: Headers, body: bytes) -> None:
    """Answer with a complete small response (an error page)."""
    method = str(getattr(ex.request, "method", "GET")).upper()
    await ex.start_response(status, headers)
    if body and method != "HEAD":
        await ex.send_body(body)
    await ex.finish()


class _Outcome:
    """What happened to one request; recorded in the history exactly once."""

    def __init__(self, edge: EdgeState[TunnelConnection], req: Any, host: str, ray: str) -> None:
        self.edge = edge
        self.req = req
        self.host = host
        self.ray = ray
        self.started = time.monotonic()
        self.status = 0
        self.outcome = "ok"
        self.tunnel: Any = None
        self.lb_choice: Any = None  # the load balancer's tunnel, when chosen before (edge.forward)
        self.conn: TunnelConnection | None = None
        self.recorded = False
        self.waf: dict[str, Any] | None = None  # WAF rule hits (edge.waf), recorded when there are any

    def record(self) -> None:
        """Write the history entry and metrics (before the last byte goes out, so a client that
        reads the history right after its response finds its entry)."""
        if self.recorded:
            return
        self.recorded = True
        duration = time.monotonic() - self.started
        conn = self.conn
        self.edge.history.record(
            ray=self.ray, host=self.host, method=str(self.req.method), path=str(self.req.target),
            status=self.status, tunnel_id=_uuid_text(self.tunnel.id) if self.tunnel is not None else None,
            connection=conn.id if conn is not None else None,
            location=conn.location if conn is not None else None,
            outcome=self.outcome, duration_ms=round(duration * 1000, 3),
            **({"waf": self.waf} if self.waf else {}))
        if self.edge.trace is not None:
            self.edge.trace.event("eyeball.done", ray=self.ray, status=self.status, outcome=self.outcome,
                                  duration_ms=round(duration * 1000, 3), method=str(self.req.method),
                                  target=str(self.req.target), host=self.host,
                                  conn=conn.id if conn is not None else None)
        self.edge.metrics.requests.inc(status=self.status, outcome=self.outcome)
        self.edge.metrics.request_seconds.inc(duration)


class _Recording:
    """Wraps an Exchange so the history entry is written just before the response ends."""

    def __init__(self, ex: Exchange, result: _Outcome) -> None:
        self._ex = ex
        self._result = result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ex, name)

    async def finish(self, trailers: Headers | None = None) -> None:
        self._result.record()
        await self._ex.finish(trailers)


async def proxy_request(edge: EdgeState[TunnelConnection], ex: Exchange) -> None:
    """Handle one eyeball request end to end (never raises except Cancelled and EyeballGone)."""
    req = ex.request
    host = _host_only(str(req.host or ""))
    result = _Outcome(edge, req, host, new_ray_id(edge.default_location, os.urandom(8)))
    result.req = access.for_history(req)  # an Access sign-in URL carries a token in its query
    try:
        if edge.peers is not None and await edge.peers.forward(ex, host, result):
            return  # served by the data centre (process) that has the tunnel's connection; it records it
        ex = cast(Exchange, _Recording(ex, result))
        latency = edge.faults.latency()
        if latency:
            await trio.sleep(latency)
        if await waf.check(edge, ex, host, result):  # WAF custom rules and rate limits, before Access
            return
        verdict = await access.gate(edge, ex, host, result.ray)  # Access: the team domain, policies
        if verdict.answered:
            result.status, result.outcome = verdict.status, verdict.outcome
            return
        if host == management.HOSTNAME:
            await _management(edge, ex, result, verdict)
            return
        tunnel = edge.tunnels.resolve_hostname(host) if host else None
        conn = None
        if tunnel is None and host:
            tunnel, conn = lb.pick(edge, host, chosen=result.lb_choice)  # a load balancer (`route lb`)
        result.tunnel = tunnel
        if tunnel is None:
            result.status, result.outcome = 404, "no-route"
            log.info("no route for host=%r ray=%s", host, result.ray)
            await send_page(ex, 404, *pages.no_route_page(host, result.ray))
            return
        conn = conn or edge.registry.pick(tunnel.id)
        if conn is None:
            result.status, result.outcome = 530, "no-connection"
            log.info("no healthy connection tunnel=%s host=%r ray=%s", tunnel.id, host, result.ray)
            await send_page(ex, 530, *pages.no_connection_page(host, str(tunnel.id), result.ray))
            return
        result.ray = new_ray_id(conn.location, os.urandom(8))
        if edge.trace is not None:
            edge.trace.event("eyeball.request", ray=result.ray, dc=conn.location, tunnel=str(tunnel.id),
                             method=str(req.method), target=str(result.req.target), host=host,
                             scheme=str(req.scheme), client_ip=str(req.client_ip), headers=req.headers)
        await _forward(edge, ex, tunnel, conn, result.ray, result, verdict)
    except EyeballGone:
        if not result.recorded:
            # `reset`: a forwarded request whose eyeball reset its stream in the sending data centre
            result.outcome = "eyeball-reset" if getattr(ex, "reset", False) else "eyeball-closed"
        log.info("eyeball went away host=%r ray=%s", host, result.ray)
        raise
    except trio.Cancelled:
        # An HTTP/2 eyeball reset the stream (or its connection, or the edge, is going away):
        # never recorded as `ok` with no status.
        if not result.recorded:
            result.outcome = "eyeball-reset" if getattr(ex, "reset", False) else "cancelled"
        raise
    finally:
        result.record()


async def _management(edge: EdgeState[TunnelConnection], ex: Exchange, result: _Outcome,
                      verdict: access.Verdict) -> None:
    """A request for the management hostname: to a connector of the tunnel its token names."""
    req = ex.request
    # The token is a credential: the history and the logs keep the path only.
    result.req = dataclasses.replace(req, target=str(req.target).partition("?")[0])
    checked = management.check(edge, str(req.target))
    if isinstance(checked, management.Target):
        result.tunnel = edge.tunnels.by_id(checked.tunnel_id)
        conn = management.pick(edge, checked, []) if result.tunnel is not None else None
        if conn is not None:
            result.ray = new_ray_id(conn.location, os.urandom(8))
            target = checked
            await _forward(edge, ex, result.tunnel, conn, result.ray, result, verdict,
                           repick=lambda tried: management.pick(edge, target, tried))
            return
        checked = management.no_connector(checked)
    log.info("management request refused: %s ray=%s", checked.message, result.ray)
    result.status, result.outcome = checked.status, "management-refused"
    await send_page(ex, checked.status, *checked.page())


async def _forward(edge: EdgeState[TunnelConnection], ex: Exchange, tunnel: Any, conn: TunnelConnection,
                   ray: str, result: _Outcome, verdict: access.Verdict, *,
                   repick: Callable[[list[TunnelConnection]], TunnelConnection | None] | None = None) -> None:
    core = ex.core
    req = ex.request
    tried: list[TunnelConnection] = []

    def another() -> TunnelConnection | None:
        return repick(tried) if repick is not None else edge.registry.pick(tunnel.id, exclude=tried)
    while True:
        result.conn = conn
        tried.append(conn)
        ident = f"{conn.ident()} ray={ray}"
        headers = access.forward_headers(core.open_stream(ray), verdict)  # Access: identity fields
        try:
            stream = await conn.open_stream(headers, end_stream=core.end_stream)
        except TunnelStreamError as exc:
            no_capacity = isinstance(exc, NoCapacityError)
            if no_capacity:
                log.warning("no stream slot: %s %s", exc, ident)
            nxt = another() if core.may_retry_open(exc.retryable) else None
            if nxt is not None:
                log.info("retrying on another connection after %s %s", exc, ident)
                conn = nxt
                continue
            # No stream was opened, so nothing reached the connector.
            answer = core.open_failed(retryable=exc.retryable, no_capacity=no_capacity)
            if no_capacity:
                page = pages.error_page(503, f"The tunnel's connections are at their stream limit: {exc}",
                                        ray=ray)
            elif exc.retryable:
                page = pages.no_connection_page(req.host, str(tunnel.id), ray)
            else:
                page = pages.error_page(502, f"The edge could not open a stream: {exc}", ray=ray)
            await _answer(ex, result, answer, page)
            return
        core.stream_opened()
        log.debug("forwarding %s %s on stream=%d %s", req.method, result.req.target, stream.id, ident)
        try:
            retry = await _run_stream(edge, ex, stream, ray, result, ident)
        finally:
            await stream.release()
        if not retry:
            return
        nxt = another()
        if nxt is None:
            await _answer(ex, result, core.connection_lost(), pages.error_page(
                502, "The tunnel connection was lost before the connector answered, and no other "
                     "connection could take the request.", ray=ray))
            return
        log.info("connection lost before the response; retrying once on another connection %s", ident)
        conn = nxt


async def _answer(ex: Exchange, result: _Outcome, answer: Answer, page: tuple[Headers, bytes]) -> None:
    """The edge answers the eyeball itself with `page`."""
    result.status, result.outcome = answer.status, answer.outcome
    await send_page(ex, answer.status, *page)


async def _upload(ex: Exchange, stream: TunnelStream, failed: list[BaseException],
                  scope: trio.CancelScope) -> None:
    with scope:
        await _upload_body(ex, stream, failed)


async def _upload_body(ex: Exchange, stream: TunnelStream, failed: list[BaseException]) -> None:
    try:
        while True:
            chunk = await ex.read_body()
            if chunk is None:
                await stream.end(ex.request_trailers or None)
                return
            if chunk:
                await stream.send(chunk)
    except TunnelStreamError:
        return  # the response side reports it
    except EyeballGone as exc:
        failed.append(exc)
        await stream.reset(ErrorCodes.CANCEL)


async def _run_stream(edge: EdgeState[TunnelConnection], ex: Exchange, stream: TunnelStream, ray: str,
                      result: _Outcome, ident: str) -> bool:
    """Drive one tunnel stream. Returns True when the request should be retried elsewhere."""
    upload_failed: list[BaseException] = []
    upload = trio.CancelScope()  # cancelled once the response no longer needs the request body
    if not ex.has_body:  # nothing to upload: no nursery, no task
        return await _respond(edge, ex, stream, ray, result, ident, upload, upload_failed)
    gone: EyeballGone | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_upload, ex, stream, upload_failed, upload)
        try:
            return await _respond(edge, ex, stream, ray, result, ident, upload, upload_failed)
        except EyeballGone as exc:
            # Kept out of the nursery's exception group: the caller handles a plain EyeballGone.
            gone = exc
        finally:
            upload.cancel()
    assert gone is not None
    raise gone


async def _respond(edge: EdgeState[TunnelConnection], ex: Exchange, stream: TunnelStream, ray: str,
                   result: _Outcome, ident: str, upload: trio.CancelScope,
                   upload_failed: list[BaseException]) -> bool:
    core = ex.core
    try:
        with trio.move_on_after(edge.config.origin_timeout) as waited:
            raw_headers = await stream.response_headers()
    except OversizedHeadersError as exc:
        upload.cancel()
        await _answer(ex, result, core.oversized_response(),
                      pages.error_page(502, f"The origin's {exc}.", ray=ray))
        return False
    except TunnelStreamError as exc:
        upload.cancel()
        bad = next((e for e in upload_failed if isinstance(e, BadRequestBody)), None)
        decision = core.stream_failed(retryable=exc.retryable, bad_body=bad is not None,
                                      body_eof=bad is not None and bad.eof, upload_failed=bool(upload_failed),
                                      response_started=ex.response_started)
        if decision is Next.GONE:
            raise EyeballGone("eyeball closed during the upload") from None
        if decision is Next.RETRY:
            return True
        assert isinstance(decision, Answer)
        if decision.status == 400:
            # The connector's stream was reset; the eyeball gets a 400 where its connection allows.
            log.info("malformed request body (%s); 400 %s", bad, ident)
            page = pages.error_page(400, f"The request body could not be read: {bad}", ray=ray)
        else:
            log.info("stream failed before the response: %s %s", exc, ident)
            page = pages.error_page(502, f"The tunnel stream failed before the connector answered: {exc}",
                                    ray=ray)
        await _answer(ex, result, decision, page)
        return False
    if waited.cancelled_caught:
        upload.cancel()
        await stream.reset(ErrorCodes.CANCEL)
        log.warning("no response within %gs; 524 %s", edge.config.origin_timeout, ident)
        await _answer(ex, result, core.timed_out(), pages.error_page(
            524, f"The origin did not answer within {edge.config.origin_timeout:g} seconds.",
            ray=ray, hint="make the origin answer faster or raise the edge's --origin-timeout"))
        return False
    try:
        resp = core.response(raw_headers)
    except TunnelLabError as exc:
        upload.cancel()
        log.warning("bad response headers from the connector: %s %s", exc, ident)
        await _answer(ex, result, core.bad_response(), pages.error_page(
            502, f"The connector sent a bad response: {exc}", ray=ray))
        return False
    result.status, result.outcome = resp.status, resp.outcome
    if resp.outcome == "websocket":
        await _websocket(ex, stream, resp.headers, ident)
        upload.cancel()
        return False
    if ex.websocket:
        # Not an upgrade: an ordinary response; our request side carries no body.
        with contextlib.suppress(TunnelStreamError):
            await stream.end()
    if resp.outcome == "connector-error":
        log.info("connector answered %d (src=cloudflared) %s", result.status, ident)
        await _drain_quietly(stream)
        await send_page(ex, result.status, *pages.error_page(
            result.status, "The connector could not reach the origin service (it answered "
            f"{result.status} with src=cloudflared); its log names the cause.", ray=ray,
            hint="check that the origin named by the ingress rule is up and reachable"))
        return False
    if resp.bodiless:
        result.record()  # the head is the whole response for the eyeball
    if edge.trace is not None:
        edge.trace.event("eyeball.response", ray=ray, status=result.status, headers=resp.headers)
    await ex.start_response(result.status, resp.headers)
    try:
        await _relay_body(edge, ex, stream, result, resp.body_length)
    except TunnelStreamError as exc:
        result.outcome = "aborted"
        log.warning("stream failed mid-response; aborting the eyeball response: %s %s", exc, ident)
        upload.cancel()
        await ex.abort()
        return False
    upload.cancel()
    return False


async def _drain_quietly(stream: TunnelStream) -> None:
    with trio.move_on_after(1):
        try:
            while (item := await stream.receive()) is not None:
                await stream.ack(item[1])
        except TunnelStreamError:
            pass


async def _relay_body(edge: EdgeState[TunnelConnection], ex: Exchange, stream: TunnelStream, result: _Outcome,
                      content_length: int | None) -> None:
    total = 0
    while True:
        if not stream.ready:
            await ex.flush()  # about to wait for the connector: the eyeball gets what we have
        item = await stream.receive_many(RELAY_BATCH)
        if item is None:
            break
        data, length = item
        if stream.fully_received or (content_length is not None and total + len(data) >= content_length):
            result.record()  # the last bytes: record before the eyeball can see the end
        if data:
            await ex.send_body(data)
            total += len(data)
        await stream.ack(length)
    edge.metrics.bytes.inc(total, direction="response")
    await ex.finish(stream.trailers or None)


async def _websocket(ex: Exchange, stream: TunnelStream, headers: Headers, ident: str) -> None:
    raw = await ex.upgrade(101, headers)
    log.info("websocket upgraded %s", ident)

    quiet = (TunnelStreamError, EyeballGone)
    # The eyeball's EOF ends our side of the stream; the connector's end of the stream ends the relay.
    await pipe(Way(raw.receive_some, stream.send, at_eof=stream.end, quiet=quiet, ends_pipe=False,
                   error_ends_pipe=False),
               Way(receive_acked(stream), raw.send_all, quiet=quiet))
    log.info("websocket closed %s", ident)

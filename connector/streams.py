"""What the connector does with each stream the edge opens (docs/protocol.md §4.1, §5-§8).

`Proxy.handle_stream` is called in its own task for every non-control stream. HTTP and WebSocket streams
go through the ingress rules to an origin (`wire.origin` decides the bytes, `connector.origin_client`
moves them); TCP streams are dialled to `IP:port`; update-configuration streams replace the ingress rules.
Any failure before the response headers becomes a 502 with meta `{"src":"cloudflared"}` and a log line
naming the cause; a failure after them resets the stream (INTERNAL_ERROR). Nothing here ends a connection.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import h2.errors
import trio

from tunnel_lab.connector import ingress
from tunnel_lab.connector.access_jwt import HANDLER, AccessValidator, Refusal
from tunnel_lab.connector.logging_setup import format_value as q
from tunnel_lab.connector.origin_client import (
    OriginConnection,
    OriginPool,
    OriginTarget,
    dial_error_text,
    set_keepalive,
)
from tunnel_lab.connector.settings import (
    HelloWorldService,
    HTTPService,
    IngressRule,
    StatusService,
    StreamService,
    TunnelSettings,
    WarpRoutingConfig,
)
from tunnel_lab.connector.state import ConnectorState
from tunnel_lab.connector.websocket import MESSAGE_SIZE, WebSocketBridge, accept_headers
from tunnel_lab.transport.pipe import PipeDone, Way, prepend
from tunnel_lab.transport.pipe import pipe as transport_pipe
from tunnel_lab.wire import http1
from tunnel_lab.wire import origin as wo
from tunnel_lab.wire.errors import (
    ConfigError,
    OriginError,
    ResponseBodyError,
    StreamConversionError,
    TunnelLabError,
)
from tunnel_lab.wire.headers import (
    META_FLOW_LIMITED,
    META_ORIGIN,
    RESPONSE_HEADERS,
    RESPONSE_META,
    StreamType,
    first_value,
    serialize_response_headers,
)

if TYPE_CHECKING:
    from tunnel_lab.connector.tunnel_stream import IncomingStream

log = logging.getLogger(__name__)


_RESPONSE_OPEN = (wo.ResponseState.WAITING, wo.ResponseState.HEAD_ONLY, wo.ResponseState.BODY)

BODY_WRITE_GRACE = 0.05  # after the response, Go waits this long for an unfinished request body write
MAX_CONFIG_BODY = 4 * 1024 * 1024
UNREACHABLE = ("Unable to reach the origin service. The service may be down or it may not be responding "
               "to traffic from cloudflared")


def parse_ip_port(authority: str) -> tuple[str, int] | None:
    """`IP:port` / `[v6]:port` -> (ip, port); None for anything else (hostnames included)."""
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, int(port)


class Proxy:
    """Shared by every edge connection of one connector: ingress rules (replaceable by remote config),
    the origin pool, the lazily started hello-world origin."""

    def __init__(self, settings: TunnelSettings, nursery: trio.Nursery,
                 state: ConnectorState | None = None) -> None:
        self.settings = settings
        self.rules: tuple[IngressRule, ...] = settings.ingress_rules
        # cloudflared's internal rules (the management service), tried before the user's; index -1.
        self.internal_rules: tuple[IngressRule, ...] = ()
        self.warp: WarpRoutingConfig = settings.warp_routing
        self.config_version = -1
        self.pool = OriginPool()
        self.state = state if state is not None else ConnectorState(connector_id=settings.connector_id)
        self._nursery = nursery
        self._hello: tuple[str, int, str] | None = None
        self._hello_lock = trio.Lock()
        self.access = AccessValidator(settings.ca_cert)  # originRequest.access (connector/access_jwt.py)

    # -- entry point
    async def handle_stream(self, ts: IncomingStream, kind: StreamType) -> None:
        bad = wo.forbidden_request_header(ts.headers)
        if bad is not None:
            await self._go_bad_request(ts, bad)
            return
        state = self.state
        if kind is StreamType.TCP:
            state.tcp_session_started()
        else:
            state.request_started()
        try:
            if kind is StreamType.CONFIGURATION:
                await self._update_configuration(ts)
            elif kind is StreamType.TCP:
                await self._tcp_stream(ts)
            elif kind is StreamType.CONTROL:
                log.warning("A second control stream was opened, refusing it %s", ts.label)
                await ts.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
            else:
                await self._http_stream(ts, websocket=kind is StreamType.WEBSOCKET)
        finally:
            if kind is StreamType.TCP:
                state.tcp_session_finished()
            else:
                state.request_finished(ts.status, error=ts.failed)

    # -- answers the connector makes itself
    async def _go_bad_request(self, ts: IncomingStream, text: str) -> None:
        headers, body = wo.bad_request_response(text)
        await ts.send_headers(headers)
        await ts.send_data(body, end_stream=True)

    async def _bad_gateway(self, ts: IncomingStream, cause: str, *, rule: IngressRule | None = None) -> None:
        """502 with meta cloudflared, logged in cloudflared's words with the cause."""
        self._log_proxy_error(ts, f"{UNREACHABLE}: {cause}", rule)
        await self._answer_502(ts)

    @staticmethod
    def _log_proxy_error(ts: IncomingStream, error: str, rule: IngressRule | None) -> None:
        """cloudflared's two lines for a failed HTTP proxy: the origin logger's, then the handler's."""
        if rule is not None:
            log.error(" error=%s connIndex=%d event=1 ingressRule=%d originService=%s stream=%d", q(error),
                      ts.conn.conn_index, rule.index, q(rule.service_text), ts.stream_id)
        else:
            log.error(" error=%s connIndex=%d event=1 stream=%d", q(error), ts.conn.conn_index, ts.stream_id)
        log.error("failed to serve incoming request error=%s", q(f"Failed to proxy HTTP: {error}"))

    async def _refuse(self, ts: IncomingStream, rule: IngressRule, refusal: Refusal) -> None:
        """originRequest.access said no: 403 with no body, or 502 when the validator itself failed."""
        if refusal.status == 403:
            log.error("failed to serve incoming request error=%s ingressRule=%d",
                      q(f"request filtered by middleware handler ({HANDLER}) due to: {refusal.reason}"),
                      rule.index)
            await ts.send_headers(wo.tunnel_response_headers(403, []), end_stream=True)
            return
        await self._failed(ts, refusal.reason)

    async def _tcp_unreachable(self, ts: IncomingStream, authority: str, cause: str) -> None:
        error = f"unable to dial tcp to origin {authority}: {cause}"
        log.error(" error=%s connIndex=%d destAddr=%s event=2 flowID= originService=warp-routing stream=%d",
                  q(error), ts.conn.conn_index, q(authority), ts.stream_id)
        await self._failed(ts, error)

    async def _failed(self, ts: IncomingStream, error: str) -> None:
        log.error("failed to serve incoming request error=%s", q(error))
        await self._answer_502(ts)

    async def _answer_502(self, ts: IncomingStream) -> None:
        ts.failed = True
        if ts.headers_sent:
            await ts.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        await ts.send_headers(wo.error_response_headers(), end_stream=True)

    # -- HTTP and WebSocket streams
    async def _http_stream(self, ts: IncomingStream, *, websocket: bool) -> None:
        try:
            req = wo.TunnelRequest.from_h2_headers(ts.headers, ts.end_stream_on_headers)
        except StreamConversionError as exc:
            log.warning("Malformed request from the edge error=%s %s", q(str(exc)), ts.label)
            await ts.reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        path = req.path.split("?", 1)[0]
        rule = ingress.match_internal_rule(self.internal_rules, req.authority, path) or \
            ingress.match_rule(self.rules, req.authority, path)
        service = rule.service
        log.debug("Request %s %s%s matched rule #%d service=%s %s", req.method, req.authority, req.path,
                  rule.index, rule.service_text, ts.label)
        access = rule.origin_request.access
        if access is not None and access.required:
            refusal = await self.access.check(ts.headers, access)
            if refusal is not None:
                await self._refuse(ts, rule, refusal)
                return
        if isinstance(service, StatusService):
            await ts.send_headers(wo.tunnel_response_headers(service.status, []), end_stream=True)
            return
        if isinstance(service, StreamService):
            if websocket:
                await self._websocket_to_tcp(ts, rule, service)
            else:
                await self._bad_gateway(ts, f"ingress rule #{rule.index} service {rule.service_text} needs "
                                            f"a WebSocket (cloudflared access) client", rule=rule)
            return
        try:
            target = await self._target(rule, req.authority)
        except (OriginError, TunnelLabError) as exc:
            await self._bad_gateway(ts, str(exc), rule=rule)
            return
        await self._proxy_http(ts, req, rule, target, websocket=websocket)

    async def _target(self, rule: IngressRule, authority: str) -> OriginTarget:
        cfg = rule.origin_request
        service = rule.service
        if isinstance(service, HelloWorldService):
            host, port, ca_pem = await self._hello_world()
            return OriginTarget("https", host, port, server_name="localhost", extra_ca_pem=ca_pem)
        assert isinstance(service, HTTPService)
        server_name = None
        if service.tls:
            if cfg.origin_server_name:
                server_name = cfg.origin_server_name
            elif cfg.match_sni_to_host or service.unix_path is not None:
                # unix+tls: Go's transport verifies the request URL's host, which cloudflared leaves as
                # the eyeball's host
                server_name = ingress.strip_port(authority)
        return OriginTarget(service.scheme, service.host, service.port, server_name=server_name,
                            verify=not cfg.no_tls_verify, ca_pool=cfg.ca_pool, unix_path=service.unix_path)

    async def _hello_world(self) -> tuple[str, int, str]:
        async with self._hello_lock:
            if self._hello is None:
                from tunnel_lab.connector import hello

                ctx, ca_pem = hello.self_signed_context()
                _, port = await self._nursery.start(
                    functools.partial(hello.serve_hello_world, "127.0.0.1", 0, ssl_context=ctx))
                self._hello = ("127.0.0.1", port, ca_pem)
                log.info("Starting Hello World server at 127.0.0.1:%d", port)
            return self._hello

    def _origin_options(self, rule: IngressRule) -> wo.OriginOptions:
        cfg = rule.origin_request
        return wo.OriginOptions(connector_id=str(self.settings.connector_id),
                                http_host_header=cfg.http_host_header,
                                disable_chunked_encoding=cfg.disable_chunked_encoding,
                                tags=self.settings.tags)

    async def _probe(self, ts: IncomingStream) -> bytes | None:
        """Go's 1-byte body probe: b"" for EOF at once, the first byte, or None after 200 ms of silence."""
        with trio.move_on_after(wo.PROBE_TIMEOUT):
            data = await ts.receive_some()
            if data:
                ts.push_back(data[1:])
                return data[:1]
            return b""
        return None

    async def _proxy_http(self, ts: IncomingStream, req: wo.TunnelRequest, rule: IngressRule,
                          target: OriginTarget, *, websocket: bool) -> None:
        ex = wo.OriginExchange(req, self._origin_options(rule), websocket=websocket, origin=target.address)
        probe = await self._probe(ts) if ex.needs_probe else None
        try:
            ex.start(probe)
            if ex.request_state is wo.RequestState.BUFFERING:
                while data := await ts.receive_some():
                    ex.buffer_body(data)
                ex.end_buffered_body()
        except StreamConversionError as exc:
            await self._bad_gateway(ts, str(exc), rule=rule)
            return
        cfg = rule.origin_request
        try:
            conn = await self.pool.acquire(target, cfg)
        except OriginError as exc:
            await self._bad_gateway(ts, str(exc), rule=rule)
            return
        try:
            await self._exchange(ts, ex, conn, rule)
        finally:
            if not self.pool.keep(conn, cfg, reusable=ex.reusable()):
                with trio.CancelScope(shield=True):
                    await conn.aclose()

    async def _exchange(self, ts: IncomingStream, ex: wo.OriginExchange, conn: OriginConnection,
                        rule: IngressRule) -> None:
        """One request/response on `conn`; `ex.reusable()` then says whether `conn` may be reused."""
        body_done = trio.Event()

        async def send_body() -> None:
            try:
                if first := ex.request_pending():
                    await conn.send_all(first)
                while ex.wants_request_body:
                    data = await ts.receive_some()
                    if not data:
                        break
                    await conn.send_all(ex.request_data(data))
                await conn.send_all(ex.request_end(ts.trailers))
                ex.request_written()
            except (OriginError, StreamConversionError) as exc:
                ex.request_failed(exc)
            finally:
                body_done.set()

        async def relay() -> None:
            try:
                await self._relay_response(ts, ex, conn)
            except ResponseBodyError as exc:
                # cloudflared's handler panics (http.ErrAbortHandler) once the status was written: RST_STREAM,
                # and whatever Go still buffered, HEADERS included, never leaves, so the edge may see a
                # reset before any answer (and answers 502 itself).
                self._log_proxy_error(ts, str(exc), rule)
                ts.failed = True
                await ts.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
            except OriginError as exc:
                if ts.headers_sent:
                    log.error("Origin response failed after the headers were sent, resetting the stream "
                              "error=%s %s", q(str(exc)), ts.label)
                    await ts.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
                else:
                    cause = str(exc)
                    if ex.request_error is not None:
                        cause = f"{cause} (writing the request body: {ex.request_error})"
                    await self._bad_gateway(ts, cause, rule=rule)

        try:
            conn.start_request(ex.request.method, websocket=ex.websocket)
            head = ex.request_head()
            if self.settings.trace is not None:
                _trace_origin(self.settings.trace, ts, "origin.request", raw_head=head,
                              origin=conn.target.address)
            await conn.send_all(head)
        except OriginError as exc:
            await self._bad_gateway(ts, str(exc), rule=rule)
            return
        if not ex.has_request_body:  # no request body to send: no task for it
            await relay()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body)
            await relay()
            if ex.response_complete and not body_done.is_set():
                with trio.move_on_after(BODY_WRITE_GRACE):
                    await body_done.wait()
            nursery.cancel_scope.cancel()

    async def _relay_response(self, ts: IncomingStream, ex: wo.OriginExchange,
                              conn: OriginConnection) -> None:
        """Origin response -> tunnel stream, each parsed event through the exchange."""
        while ex.response_state in _RESPONSE_OPEN:
            try:
                event = await conn.next_event()
            except OriginError as exc:
                error = ex.body_error(exc)
                if error is exc:
                    raise
                raise error from exc
            if isinstance(event, http1.Body):  # the commonest first
                await _perform(ts, ex.response_data(event.data))
            elif isinstance(event, http1.ResponseHead):
                if self.settings.trace is not None:
                    _trace_origin(self.settings.trace, ts, "origin.response", status=event.status,
                                  http_version=event.http_version.decode(),
                                  reason=event.reason.decode("latin-1"), headers=event.headers)
                await _perform(ts, ex.response_head(event.status, event.headers,
                                                    http10=event.http_version == b"1.0"))
            elif isinstance(event, http1.End):
                await _perform(ts, ex.response_end(event.trailers))
            elif isinstance(event, http1.Informational):
                await _perform(ts, ex.informational(event.status, event.headers))
                if ex.response_state is wo.ResponseState.UPGRADED:
                    await pipe(ts, initial=conn.take_held(), read_origin=conn.receive_raw,
                               write_origin=conn.send_all)
                    return
            elif isinstance(event, http1.Closed):
                await _perform(ts, ex.response_closed())
            else:
                raise OriginError(f"unexpected answer from origin {conn.target.address}: {event!r}")

    # -- tcp:// ssh:// rdp:// services: terminate the WebSocket here
    async def _websocket_to_tcp(self, ts: IncomingStream, rule: IngressRule, service: StreamService) -> None:
        try:
            with trio.fail_after(rule.origin_request.connect_timeout):
                tcp = await trio.open_tcp_stream(service.host, service.port)
            set_keepalive(tcp, rule.origin_request.tcp_keep_alive)
        except (OSError, trio.TooSlowError) as exc:
            await self._bad_gateway(ts, f"dial tcp {service.host}:{service.port}: {dial_error_text(exc)}",
                                    rule=rule)
            return
        async with tcp:
            key = first_value(ts.headers, b"sec-websocket-key")
            await ts.send_headers(wo.tunnel_response_headers(101, accept_headers(key)))
            bridge = WebSocketBridge()
            closing = trio.Event()

            async def read_tcp() -> bytes:
                if closing.is_set():
                    return b""
                try:
                    data = await tcp.receive_some(MESSAGE_SIZE)  # one read, one message, as cloudflared
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    return bridge.close()  # then b"" on the next call ends the stream
                return bridge.to_edge(data)

            async def write_tcp(data: bytes) -> None:
                to_service, to_edge, closed = bridge.from_edge(data)
                if to_edge:
                    await ts.send_data(to_edge)
                if to_service:
                    try:
                        await tcp.send_all(to_service)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        raise OriginError(f"write to {service.host}:{service.port}: {exc}") from exc
                if closed:
                    closing.set()
                    raise PipeDone

            await pipe(ts, read_origin=read_tcp, write_origin=write_tcp)

    # -- TCP streams (private network routing)
    async def _tcp_stream(self, ts: IncomingStream) -> None:
        authority = (first_value(ts.headers, b":authority") or b"").decode("latin-1")
        dest = parse_ip_port(authority)
        if dest is None:
            await self._tcp_unreachable(ts, authority, f"destination {authority!r} is not IP:port")
            return
        host, port = dest
        limit = self.warp.max_active_flows
        if limit and self.state.tcp_active_sessions > limit:  # this stream is already counted
            log.error(" error=%s connIndex=%d destAddr=%s event=2 originService=warp-routing stream=%d",
                      q(f"too many active flows (max-active-flows {limit})"), ts.conn.conn_index,
                      q(authority), ts.stream_id)
            ts.failed = True
            await ts.send_headers(wo.error_response_headers(META_FLOW_LIMITED), end_stream=True)
            return
        try:
            with trio.fail_after(self.warp.connect_timeout):
                tcp = await trio.open_tcp_stream(host, port)
            set_keepalive(tcp, self.warp.tcp_keep_alive)
        except (OSError, trio.TooSlowError) as exc:
            await self._tcp_unreachable(ts, authority, f"dial tcp {authority}: {dial_error_text(exc)}")
            return
        async with tcp:
            key = first_value(ts.headers, b"sec-websocket-key")
            extra = accept_headers(key) if key is not None else []
            await ts.send_headers([(b":status", b"200"),
                                   (RESPONSE_HEADERS, serialize_response_headers(extra)),
                                   (RESPONSE_META, META_ORIGIN)])
            log.debug("Proxying TCP stream to %s event=2 %s", authority, ts.label)

            async def read_tcp() -> bytes:
                try:
                    return await tcp.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return b""

            async def write_tcp(data: bytes) -> None:
                try:
                    await tcp.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise OriginError(f"write to {authority}: {exc}") from exc

            await pipe(ts, read_origin=read_tcp, write_origin=write_tcp)

    # -- update-configuration streams
    async def _update_configuration(self, ts: IncomingStream) -> None:
        body = bytearray()
        while True:
            data = await ts.receive_some()
            if not data:
                break
            body += data
            if len(body) > MAX_CONFIG_BODY:
                await self._failed(ts, f"update-configuration body larger than {MAX_CONFIG_BODY} bytes")
                return
        try:
            version, _config = ingress.remote_config_version(bytes(body))
        except StreamConversionError as exc:
            await self._failed(ts, f"failed to decode configuration update: {exc}")
            return
        err: object = None
        if version > self.config_version:
            try:
                _, rules, warp = ingress.parse_remote_config(bytes(body))
            except (ConfigError, StreamConversionError) as exc:
                log.error("Failed to update configuration error=%s version=%d", q(str(exc)), version)
                err = {}
            else:
                self.rules = rules
                self.warp = warp
                self.config_version = version
                config_text = json.dumps(_config, separators=(",", ":"))
                log.info("Updated to new configuration config=%s version=%d", q(config_text), version)
                self._set_state_config(version, _config)
        else:
            log.debug("Ignoring configuration version=%d, current version=%d %s", version,
                      self.config_version, ts.label)
        answer = json.dumps({"lastAppliedVersion": self.config_version, "err": err},
                            separators=(",", ":")).encode()
        await ts.send_headers([(b":status", b"200"), (b"content-type", b"text/plain; charset=utf-8"),
                               (b"content-length", str(len(answer)).encode())])
        await ts.send_data(answer, end_stream=True)

    def _set_state_config(self, version: int, config: Any) -> None:
        self.state.set_config(version, config if isinstance(config, dict) else {})


def _trace_origin(tracer: Any, ts: IncomingStream, kind: str, **fields: Any) -> None:
    """An origin head for the protocol trace, with the stream's ids (its connection's, its ray)."""
    ray = first_value(ts.headers, b"cf-ray")
    target = getattr(ts.conn, "trace", None) or tracer
    target.event(kind, stream=ts.stream_id, ray=ray.decode("latin-1") if ray else None, **fields)


async def _perform(ts: IncomingStream, actions: list[wo.TunnelAction]) -> None:
    """Carry out an origin exchange's tunnel actions, in order."""
    for action in actions:
        if isinstance(action, wo.SendHeaders):
            await ts.send_headers(action.fields, end_stream=action.end_stream)
        elif isinstance(action, wo.SendData):
            await ts.send_data(action.data, end_stream=action.end_stream)
        elif isinstance(action, wo.SendTrailers):
            await ts.send_trailers(action.fields)
        else:
            await ts.end()


async def pipe(ts: IncomingStream, *, read_origin: Callable[[], Awaitable[bytes]],
               write_origin: Callable[[bytes], Awaitable[None]], initial: bytes = b"") -> None:
    """Copy bytes both ways until either side ends; then end our side of the stream.

    The edge's END_STREAM or the origin's EOF finishes the whole exchange, as cloudflared does (A11, A12);
    the stream task's wrap-up then resets an edge side that is still open (NO_ERROR)."""
    await transport_pipe(Way(ts.receive_some, write_origin, quiet=(OriginError,)),
                         Way(prepend(initial, read_origin), ts.send_data))
    await ts.end()

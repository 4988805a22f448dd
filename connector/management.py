"""The connector's management service: cloudflared's built-in `management` (log streaming for `tail`).

cloudflared answers requests for the management hostname (`--management-hostname`, default
`management.argotunnel.com`) itself, through an internal ingress rule tried before the user's (rule index
-1). The edge routes them to the connector named by `connector_id`. Routes:

- every request needs `access_token`: a JWT (header `alg` ES256) whose claims hold `tun{id, account_tag}`
  and `actor{id}`; cloudflared checks only that shape, not the signature (the edge did). Else 400
  `{"errors":[{"code":1001,"message":"missing access_token query parameter"}]}`;
- `GET|HEAD /ping` (200), `GET /host_details` (`{"connector_id","ip","hostname"}`), `GET /metrics`
  (with `--management-diagnostics`, the default);
- `GET /logs`: a WebSocket. The client sends `{"type":"start_streaming","filters":{"events":[..],
  "level":"info","sampling":0.5}}`; the server then sends each log line as
  `{"type":"logs","logs":[{"time","level","message","event","fields"}]}` (level and event omitted at
  their zero values, debug and cloudflared, as Go's omitempty does). `stop_streaming` pauses. One
  streaming session at a time: a second actor is refused with close code 4002, the same actor's new
  session replaces the old one; 5 minutes without streaming closes with 4003; a message that is not a
  known client event closes with 1003. A session keeps at most 30 lines waiting; more are dropped.

The decisions (token, events, filters, log lines) are pure functions here; `serve_management` is the
trio shell: a loopback HTTP server that the internal rule points at.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError as WSLocalProtocolError

from tunnel_lab.connector import diag
from tunnel_lab.connector.http1 import ClientGone, ServerConnection
from tunnel_lab.connector.logging_setup import split_fields
from tunnel_lab.connector.state import ConnectorState
from tunnel_lab.wire.errors import ProtocolError

log = logging.getLogger(__name__)

MANAGEMENT_HOSTNAME = "management.argotunnel.com"
LOG_WINDOW = 30  # lines a session keeps waiting (management/session.go logWindow)
IDLE_TIMEOUT = 300.0
PING_INTERVAL = 15.0
LEVELS = ("debug", "info", "warn", "error")
EVENTS = ("cloudflared", "http", "tcp", "udp")
STATUS_INVALID_COMMAND = 4001
STATUS_SESSION_LIMIT = 4002
STATUS_IDLE_LIMIT = 4003
STATUS_UNSUPPORTED_DATA = 1003
# with diagnostics on, the profiles cloudflared's management service serves (heap and goroutine only)
PROFILES = {"/debug/pprof/goroutine": diag.task_dump, "/debug/pprof/heap": diag.heap_dump}
MISSING_TOKEN = {"errors": [{"code": 1001, "message": "missing access_token query parameter"}]}


class ManagementError(ProtocolError):
    """A management token or a client event that cloudflared would refuse; the text is its words."""


# --- tokens ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenClaims:
    tunnel_id: str
    account_tag: str
    actor_id: str
    issuer: str = ""


def _b64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ManagementError("malformed jwt: illegal base64 data") from None


def parse_management_token(token: str) -> TokenClaims:
    """management.ParseToken: an ES256 JWS; its claims are read without verifying the signature."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ManagementError("malformed jwt: go-jose/go-jose: compact JWS format must have three parts")
    try:
        header = json.loads(_b64url(parts[0]))
        claims = json.loads(_b64url(parts[1]))
    except (ValueError, UnicodeDecodeError):
        raise ManagementError("malformed jwt: invalid JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "ES256":
        alg = header.get("alg") if isinstance(header, dict) else None
        raise ManagementError(f'malformed jwt: unexpected signature algorithm "{alg}"; expected ["ES256"]')
    if not isinstance(claims, dict):
        raise ManagementError("malformed jwt: claims are not an object")
    raw_tun, raw_actor = claims.get("tun"), claims.get("actor")
    tun: dict[str, Any] = raw_tun if isinstance(raw_tun, dict) else {}
    actor: dict[str, Any] = raw_actor if isinstance(raw_actor, dict) else {}

    def text(doc: dict[str, Any], key: str) -> str:
        value = doc.get(key)
        return value if isinstance(value, str) else ""

    parsed = TokenClaims(tunnel_id=text(tun, "id"), account_tag=text(tun, "account_tag"),
                         actor_id=text(actor, "id"), issuer=text(claims, "iss"))
    if not (parsed.tunnel_id and parsed.account_tag and parsed.actor_id):
        raise ManagementError("invalid management token format provided")
    return parsed


# --- client events and filters -------------------------------------------------------------------------

@dataclass(frozen=True)
class Filters:
    """StreamingFilters: a minimum level, the event types wanted (all when empty), a sampling ratio."""

    level: int | None = None
    events: tuple[int, ...] = ()
    sampling: float = 0.0

    def allows(self, level: int, event: int, *, draw: float | None = None) -> bool:
        if self.level is not None and self.level > level:
            return False
        if self.events and event not in self.events:
            return False
        if 0 < self.sampling < 1:
            # sampler.Sample: rand.Intn(100) <= p
            roll = int((random.random() if draw is None else draw) * 100)
            return roll <= int(self.sampling * 100)
        return True


@dataclass(frozen=True)
class ClientEvent:
    type: str  # start_streaming | stop_streaming
    filters: Filters | None = None


def parse_client_event(message: str | bytes) -> ClientEvent:
    """ReadClientEvent + IntoClientEvent: a text message holding a start or stop event."""
    if isinstance(message, bytes):
        raise ManagementError("invalid message type was provided")
    try:
        doc = json.loads(message)
    except ValueError as exc:
        raise ManagementError(str(exc)) from None
    if not isinstance(doc, dict):
        raise ManagementError("json: cannot unmarshal into Go value of type management.ClientEvent")
    kind = doc.get("type")
    if not kind:
        raise ManagementError("invalid message type was provided")
    if kind == "stop_streaming":
        return ClientEvent("stop_streaming")
    if kind != "start_streaming":
        raise ManagementError(f"invalid client message type was provided: {kind}")
    raw = doc.get("filters")
    if raw is None:
        return ClientEvent("start_streaming", None)
    if not isinstance(raw, dict):
        raise ManagementError("expected start streaming as first event")
    level = raw.get("level")
    if level is not None and level not in LEVELS:
        raise ManagementError("unable to unmarshal LogLevel")
    events = raw.get("events") or []
    if not isinstance(events, list) or any(e not in EVENTS for e in events):
        raise ManagementError("unable to unmarshal LogEventType")
    sampling = raw.get("sampling") or 0
    if isinstance(sampling, bool) or not isinstance(sampling, (int, float)):
        raise ManagementError("json: cannot unmarshal sampling into a number")
    return ClientEvent("start_streaming", Filters(
        level=LEVELS.index(level) if level is not None else None,
        events=tuple(EVENTS.index(e) for e in events), sampling=min(max(float(sampling), 0.0), 1.0)))


# --- log lines ---------------------------------------------------------------------------------------

_LEVEL_OF = {logging.DEBUG: 0, logging.INFO: 1, logging.WARNING: 2, logging.ERROR: 3, logging.CRITICAL: 3}


def log_event(*, created: float, levelno: int, message: str, extra: dict[str, Any] | None = None
              ) -> tuple[int, int, dict[str, Any]]:
    """A log record as cloudflared's management Log: (level, event, JSON object).

    The level is the record's (an `error` field makes it error, as parseZerologEvent does), the event
    type the `event` field when it is a known number, else cloudflared (0).
    """
    text, fields = split_fields(message)
    if extra:
        fields.update(extra)
    level = 3 if "error" in fields else _LEVEL_OF.get(levelno, 3 if levelno > logging.ERROR else 0)
    event = 0
    raw_event = fields.pop("event", None)
    if isinstance(raw_event, int) and not isinstance(raw_event, bool) and 0 <= raw_event < len(EVENTS):
        event = raw_event
    doc: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))}
    if level:
        doc["level"] = LEVELS[level]
    if text:
        doc["message"] = text
    if event:
        doc["event"] = EVENTS[event]
    if fields:
        doc["fields"] = fields
    return level, event, doc


def logs_message(events: Sequence[dict[str, Any]]) -> str:
    return json.dumps({"type": "logs", "logs": list(events)}, separators=(",", ":"), default=str)


# --- sessions and the log hub -----------------------------------------------------------------------

@dataclass(eq=False)
class Session:
    """One streaming client: its actor, filters and a bounded queue of lines to send."""

    actor_id: str
    filters: Filters = field(default_factory=Filters)
    active: bool = False
    send: trio.MemorySendChannel[dict[str, Any]] | None = None
    receive: trio.MemoryReceiveChannel[dict[str, Any]] | None = None
    cancel: trio.CancelScope | None = None
    replaced: bool = False  # a new session of the same actor took over: close normally

    def __post_init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel(LOG_WINDOW)

    def insert(self, level: int, event: int, doc: dict[str, Any]) -> None:
        if not self.active or not self.filters.allows(level, event) or self.send is None:
            return
        # a slow client loses lines rather than slowing the connector, as cloudflared's does
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError,
                                 RuntimeError):
            self.send.send_nowait(doc)


class ManagementHub(logging.Handler):
    """A logging handler feeding every active session (cloudflared's management Logger)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.sessions: list[Session] = []
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._saved_level: int | None = None  # the root level while a session wants debug lines
        self._raised: list[logging.Handler] = []

    def bind(self) -> None:
        """Call from the trio thread: records from other threads are then handed over to it."""
        self._trio_token = trio.lowlevel.current_trio_token()

    def active_session(self, actor_id: str) -> Session | None:
        return next((s for s in self.sessions if s.active and s.actor_id == actor_id), None)

    def active_sessions(self) -> int:
        return sum(1 for s in self.sessions if s.active)

    def listen(self, session: Session) -> None:
        session.active = True
        if session not in self.sessions:
            self.sessions.append(session)
        self._follow_levels()

    def remove(self, session: Session) -> None:
        session.active = False
        if session in self.sessions:
            self.sessions.remove(session)
        self._follow_levels()

    def _follow_levels(self) -> None:
        """cloudflared hands every line to the management logger whatever `--loglevel` says; here the root
        logger goes down to DEBUG only while a session asks for debug lines (debug records cost CPU), and
        the other handlers keep the configured level meanwhile."""
        root = logging.getLogger()
        wanted = any(s.active and (s.filters.level is None or s.filters.level == 0) for s in self.sessions)
        if wanted and self._saved_level is None and root.level > logging.DEBUG:
            self._saved_level = root.level
            for handler in root.handlers:
                if handler is not self and handler.level == logging.NOTSET:
                    handler.setLevel(root.level)
                    self._raised.append(handler)
            root.setLevel(logging.DEBUG)
        elif not wanted and self._saved_level is not None:
            root.setLevel(self._saved_level)
            for handler in self._raised:
                handler.setLevel(logging.NOTSET)
            self._saved_level, self._raised = None, []

    def emit(self, record: logging.LogRecord) -> None:
        # Only the connector's own lines (not the libraries'), and not the service's: those would feed
        # themselves.
        if not self.sessions or not record.name.startswith("tunnel_lab") or record.name.startswith(__name__):
            return
        try:
            extra = getattr(record, "fields", None)
            level, event, doc = log_event(created=record.created, levelno=record.levelno,
                                          message=record.getMessage(),
                                          extra=extra if isinstance(extra, dict) else None)
        except Exception:  # a log line must never break the code that logged it
            return
        for session in list(self.sessions):
            self._insert(session, level, event, doc)

    def _insert(self, session: Session, level: int, event: int, doc: dict[str, Any]) -> None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            if self._trio_token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    self._trio_token.run_sync_soon(session.insert, level, event, doc)
            return
        session.insert(level, event, doc)


# --- the HTTP/WebSocket shell ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ManagementConfig:
    connector_id: str
    label: str = ""
    diagnostics: bool = True
    service_ip: str | None = None  # an edge address: /host_details reports our address towards it


def host_details(config: ManagementConfig) -> dict[str, str]:
    doc = {"connector_id": config.connector_id}
    ip = _private_ip(config.service_ip)
    if ip:
        doc["ip"] = ip
    if config.label:
        doc["hostname"] = f"custom:{config.label}"
    else:
        try:
            doc["hostname"] = socket.gethostname() or "unknown"
        except OSError:
            doc["hostname"] = "unknown"
    return doc


def _private_ip(addr: str | None) -> str | None:
    # cloudflared dials the edge address and reports the local end; a connected UDP socket sends nothing.
    if not addr:
        return None
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((host, int(port)))
            return str(sock.getsockname()[0])
    except (OSError, ValueError):
        return None


async def serve_management(hub: ManagementHub, config: ManagementConfig, state: ConnectorState, *,
                           task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """The management service on a loopback port (the internal ingress rule's origin); never returns."""
    hub.bind()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    sockname = listeners[0].socket.getsockname()

    async def handler(tcp: trio.SocketStream) -> None:
        conn = ServerConnection(tcp)
        try:
            await _handle(conn, hub, config, state)
        except (ClientGone, h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
                WSLocalProtocolError):
            pass
        except Exception:  # one bad client never stops the service
            log.debug("management request failed", exc_info=True)
        finally:
            await conn.aclose()

    task_status.started((sockname[0], sockname[1]))
    await trio.serve_listeners(handler, listeners)


async def _handle(conn: ServerConnection, hub: ManagementHub, config: ManagementConfig,
                  state: ConnectorState) -> None:
    from tunnel_lab.connector.metrics import prometheus_text

    json_type = [("Content-Type", "application/json")]
    while True:
        got = await conn.next_request()
        if got is None:
            return
        request, _body = got
        parts = urlsplit(request.target.decode("latin-1"))
        token = (parse_qs(parts.query).get("access_token") or [""])[0]
        try:
            claims = parse_management_token(token) if token else None
        except ManagementError:
            claims = None
        if claims is None:
            body = json.dumps(MISSING_TOKEN, separators=(",", ":")) + "\n"
            await conn.respond(400, json_type, body.encode())
            continue
        method, path = request.method, parts.path
        if path == "/ping" and method in (b"GET", b"HEAD"):
            await conn.respond(200, [])
        elif path == "/host_details" and method == b"GET":
            await conn.respond(200, json_type, (json.dumps(host_details(config), separators=(",", ":"))
                                                + "\n").encode())
        elif path == "/metrics" and method == b"GET" and config.diagnostics:
            await conn.respond(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                               prometheus_text(state))
        elif path in PROFILES and method == b"GET" and config.diagnostics:
            # Go's pprof index at debug=0 answers a binary profile; ours is text (connector.diag)
            await conn.respond(200, [("Content-Type", "text/plain; charset=utf-8")], PROFILES[path]())
        elif path == "/logs" and method == b"GET":
            await _logs(conn, request, hub, claims)
            return
        else:
            await conn.respond(404, [("Content-Type", "text/plain; charset=utf-8"),
                                     ("X-Content-Type-Options", "nosniff")], b"404 page not found\n")


async def _logs(conn: ServerConnection, request: h11.Request, hub: ManagementHub,
                claims: TokenClaims) -> None:
    headers = {k.lower(): v for k, v in request.headers}
    key = headers.get(b"sec-websocket-key")
    if key is None or headers.get(b"upgrade", b"").lower() != b"websocket":
        await conn.respond(426, [("Content-Type", "text/plain; charset=utf-8")],
                           b"WebSocket protocol violation: Connection header \"\" does not contain Upgrade\n")
        return
    ws = await conn.accept_websocket(key)
    await _LogSession(conn.stream, ws, hub, claims).run()


class _LogSession:
    """One `/logs` WebSocket: reads client events, streams lines while a session is active."""

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection, hub: ManagementHub,
                 claims: TokenClaims) -> None:
        self.stream = stream
        self.ws = ws
        self.hub = hub
        self.session = Session(actor_id=claims.actor_id)
        self.lock = trio.Lock()

    async def _send(self, data: bytes) -> None:
        if data:
            async with self.lock:
                await self.stream.send_all(data)

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.state is ConnectionState.OPEN:
            await self._send(self.ws.send(CloseConnection(code=code, reason=reason)))

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.session.cancel = nursery.cancel_scope
                nursery.start_soon(self._stream_logs)
                nursery.start_soon(self._pings)
                await self._read_events()
                nursery.cancel_scope.cancel()
            if self.session.replaced:
                # cloudflared cancels the old request's context, and its handler closes normally
                with trio.move_on_after(1):
                    await self._close(1000, "context closed")
        finally:
            self.hub.remove(self.session)

    async def _pings(self) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            if self.ws.state is ConnectionState.OPEN:
                await self._send(self.ws.send(Ping()))

    async def _stream_logs(self) -> None:
        assert self.session.receive is not None
        async for doc in self.session.receive:
            if self.ws.state is not ConnectionState.OPEN:
                return
            await self._send(self.ws.send(TextMessage(data=logs_message([doc]))))

    async def _read_events(self) -> None:
        parts: list[str] = []
        idle = trio.current_time() + IDLE_TIMEOUT
        while True:
            for event in self.ws.events():
                if isinstance(event, CloseConnection):
                    if self.ws.state is not ConnectionState.CLOSED:
                        await self._send(self.ws.send(event.response()))
                    return
                if isinstance(event, Ping):
                    await self._send(self.ws.send(event.response()))
                    continue
                if isinstance(event, BytesMessage):
                    await self._close(STATUS_UNSUPPORTED_DATA, "invalid message type was provided")
                    return
                if not isinstance(event, TextMessage):
                    continue
                parts.append(event.data)
                if not event.message_finished:
                    continue
                text, parts = "".join(parts), []
                try:
                    client = parse_client_event(text)
                except ManagementError as exc:
                    await self._close(STATUS_UNSUPPORTED_DATA, str(exc))
                    return
                if client.type == "start_streaming":
                    if not self._can_start():
                        await self._close(STATUS_SESSION_LIMIT, "limit exceeded for streaming sessions")
                        return
                    self.session.filters = client.filters or Filters()
                    self.hub.listen(self.session)
                    idle = float("inf")
                else:
                    self.hub.remove(self.session)
                    idle = trio.current_time() + IDLE_TIMEOUT
            with trio.move_on_at(idle) as scope:
                data = await self.stream.receive_some(65536)
            if scope.cancelled_caught:
                await self._close(STATUS_IDLE_LIMIT, "session was idle for too long")
                return
            if not data:
                return
            self.ws.receive_data(bytes(data))

    def _can_start(self) -> bool:
        if self.hub.active_sessions() == 0:
            return True
        existing = self.hub.active_session(self.session.actor_id)
        if existing is None or existing is self.session:
            if existing is None:
                log.warning("Another management session request was attempted but one session already "
                            "being served; there is a limit of streaming log sessions to reduce overall "
                            "performance impact.")
            return existing is self.session
        log.info("Another management session request for the same actor was requested; the other session "
                 "will be disconnected to handle the new request.")
        self.hub.remove(existing)
        existing.replaced = True
        if existing.cancel is not None:
            existing.cancel.cancel()
        return True


def install(hub: ManagementHub) -> None:
    """Attach the hub to the root logger (once)."""
    root = logging.getLogger()
    if hub not in root.handlers:
        root.addHandler(hub)


def uninstall(hub: ManagementHub) -> None:
    for session in list(hub.sessions):
        hub.remove(session)  # puts the root level back
    logging.getLogger().removeHandler(hub)

"""Edge side of an HTTP tunnel stream: eyeball HTTP/1.1 request -> tunnel stream, and back.

The edge is the HTTP/2 client on the tunnel connection. What it may put on a stream is constrained by
Go's HTTP/2 server in cloudflared (docs/protocol.md §11.1): no connection-specific fields ever (Go answers
400), a WebSocket is signalled only by `cf-cloudflared-proxy-connection-upgrade: websocket`. What it adds
is the lab's choice, modelled on Cloudflare's documented origin headers (docs/protocol.md §11.2).

Pure functions, small value objects and `EyeballExchange`, the state machine of one eyeball request
through the edge (heads in; tunnel fields, retry decisions and the eyeball's response out); the edge shell
does the I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tunnel_lab.wire.errors import StreamConversionError
from tunnel_lab.wire.headers import (
    PROXY_UPGRADE,
    RESPONSE_HEADERS,
    RESPONSE_META,
    UPGRADE_WEBSOCKET,
    as_bytes,
    deserialize_response_headers,
    is_token,
    is_valid_value,
    parse_meta,
)

__all__ = [
    "Answer",
    "EyeballExchange",
    "EyeballRequest",
    "EyeballResponse",
    "EyeballState",
    "Next",
    "RequestRefused",
    "TunnelResponse",
    "eyeball_response_headers",
    "h2_response_fields",
    "is_websocket_request",
    "new_ray_id",
    "request_head_error",
    "tunnel_request_headers",
    "tunnel_response",
]

# Hop-by-hop / connection-specific fields: never on a tunnel stream (Go's HTTP/2 server answers 400).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                        b"te", b"trailer"})
# Fields the lab edge sets itself; an eyeball's own copies are dropped (or merged, see below).
_EDGE_OWNED = frozenset({b"host", b"cf-ray", b"cf-connecting-ip", b"cf-visitor", b"x-forwarded-proto"})
_MERGED = (b"x-forwarded-for", b"cdn-loop")
# Internal tunnel fields an eyeball must never be able to inject.
_INTERNAL_PREFIXES = (b"cf-cloudflared-", b"cf-int-", b":")


def _tokens(values: Iterable[bytes]) -> set[bytes]:
    return {t.strip(b" \t").lower() for v in values for t in v.split(b",") if t.strip(b" \t")}


@dataclass(frozen=True, kw_only=True)
class EyeballRequest:
    """An HTTP/1.1 request as the edge received it from an eyeball."""

    method: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...]  # as received: name case and order kept
    scheme: str  # "http" or "https", as the eyeball connected
    client_ip: str
    host: str  # from Host (or the absolute target's authority)

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", tuple((as_bytes(k), as_bytes(v)) for k, v in self.headers))


def _origin_form(target: str) -> str:
    if target.startswith("/") or target == "*":
        return target
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        slash = rest.find("/")
        query = rest.find("?")
        if slash < 0 or (0 <= query < slash):
            return "/" + (rest[query:] if query >= 0 else "")
        return rest[slash:]
    raise StreamConversionError(f"request target {target[:80]!r} cannot become an HTTP/2 :path")


def tunnel_request_headers(req: EyeballRequest, *, ray: str, websocket: bool = False,
                           extra: Iterable[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 request fields the edge sends on a new tunnel stream (docs/protocol.md §11.1-§11.2).

    Pseudo-headers from the request line and Host; the eyeball's fields lower-cased in their order,
    minus hop-by-hop ones (`Connection` and every field it names, `Keep-Alive`, `Proxy-Connection`,
    `Transfer-Encoding`, `Upgrade`, `TE` unless exactly `trailers`) and internal `cf-cloudflared-*`;
    then `cf-ray`, `cf-connecting-ip`, `x-forwarded-for` (appended), `x-forwarded-proto`, `cf-visitor`,
    `cdn-loop`; then the WebSocket marker when `websocket`; then `extra`.
    """
    fields: list[tuple[bytes, bytes]] = [
        (b":method", req.method.encode("latin-1")),
        (b":scheme", req.scheme.encode("latin-1")),
        (b":authority", req.host.encode("utf-8", "surrogateescape")),
        (b":path", _origin_form(req.target).encode("utf-8", "surrogateescape")),
    ]
    lowered = [(k.lower(), v.strip(b" \t")) for k, v in req.headers]
    named = _tokens(v for k, v in lowered if k == b"connection")
    merged: dict[bytes, list[bytes]] = {name: [] for name in _MERGED}
    te_kept = False
    for name, value in lowered:
        if name in named or name.startswith(_INTERNAL_PREFIXES) or name in _EDGE_OWNED:
            continue
        if not is_token(name) or not is_valid_value(value):
            continue
        if name == b"te":
            if value == b"trailers" and not te_kept:
                te_kept = True
                fields.append((name, value))
            continue
        if name in HOP_BY_HOP:
            continue
        if name in merged:
            if value:
                merged[name].append(value)
            continue
        fields.append((name, value))
    scheme = req.scheme.encode("latin-1")
    client_ip = req.client_ip.encode("latin-1")
    fields += [
        (b"cf-ray", ray.encode("latin-1")),
        (b"cf-connecting-ip", client_ip),
        (b"x-forwarded-for", b", ".join([*merged[b"x-forwarded-for"], client_ip])),
        (b"x-forwarded-proto", scheme),
        (b"cf-visitor", b'{"scheme":"' + scheme + b'"}'),
        (b"cdn-loop", b", ".join([*merged[b"cdn-loop"], b"cloudflare"])),
    ]
    if websocket:
        fields.append((PROXY_UPGRADE, UPGRADE_WEBSOCKET))
    fields += [(as_bytes(k).lower(), as_bytes(v)) for k, v in extra]
    return fields


def request_head_error(http_version: bytes, headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, str] | None:
    """Why the edge refuses an HTTP/1.x request head before forwarding anything: (status, reason), or None.

    - a major version other than 1 (`HTTP/9.9`, `HTTP/2.0` in text): 505;
    - both `Content-Length` and `Transfer-Encoding` (either order): 400. RFC 9112 §6.1 lets a server
      reject such a request (the request-smuggling pattern) instead of ignoring the length; the
      connection is closed after the answer either way.
    """
    major = http_version.split(b".", 1)[0]
    if major != b"1":
        return 505, f"HTTP version {http_version.decode('latin-1')!r} is not supported (HTTP/1.x only)"
    names = {name.lower() for name, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return 400, "The request has both Content-Length and Transfer-Encoding (RFC 9112 section 6.1)"
    return None


def is_websocket_request(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """An HTTP/1.1 WebSocket handshake: `Upgrade: websocket` and `Connection: upgrade` (tokens, any case)."""
    upgrade = _tokens(as_bytes(v) for k, v in headers if as_bytes(k).lower() == b"upgrade")
    connection = _tokens(as_bytes(v) for k, v in headers if as_bytes(k).lower() == b"connection")
    return b"websocket" in upgrade and b"upgrade" in connection


@dataclass(frozen=True)
class TunnelResponse:
    """A tunnel stream's response HEADERS, decoded."""

    status: int  # the HTTP/2 status (200 stands for the origin's 101 on an upgrade)
    headers: list[tuple[bytes, bytes]]  # the origin's, from cf-cloudflared-response-headers
    src: str | None  # "origin", "cloudflared", or None when meta is absent (Go's own answer)
    websocket_upgrade: bool
    content_length: int | None
    flow_rate_limited: bool = field(default=False)

    @property
    def eyeball_status(self) -> int:
        """The status to give the eyeball: 101 restored for an upgrade."""
        return 101 if self.websocket_upgrade else self.status


def tunnel_response(h2_headers: Sequence[tuple[bytes, bytes]], *,
                    request_was_websocket: bool) -> TunnelResponse:
    """Decode the response HEADERS of a tunnel stream (docs/protocol.md §5.4, §11.1).

    Only the serialized field holds origin headers; HTTP/2-level `date`, `content-type` and
    `content-length` are Go's. Without meta the whole answer is Go's own (its 400 for forbidden
    fields): `src` is None and its regular fields (minus `date` and `content-length`) are the headers.
    Raises `StreamConversionError` or `HeaderSerializationError` for a malformed answer.
    """
    pairs = [(as_bytes(k).lower(), as_bytes(v)) for k, v in h2_headers]
    first: dict[bytes, bytes] = {}  # first value per (lower-case) name, as first_value would find
    for k, v in pairs:
        first.setdefault(k, v)
    status_raw = first.get(b":status")
    if status_raw is None or len(status_raw) != 3 or not status_raw.isdigit():
        raise StreamConversionError(f"tunnel response :status {status_raw!r} is not a 3-digit status")
    status = int(status_raw)
    meta_raw = first.get(RESPONSE_META)
    meta = parse_meta(meta_raw) if meta_raw is not None else {}
    src = meta.get("src") if meta_raw is not None else None
    if src is not None and not isinstance(src, str):
        raise StreamConversionError(f"cf-cloudflared-response-meta src {src!r} is not a string")
    serialized = first.get(RESPONSE_HEADERS)
    if serialized is not None:
        headers = deserialize_response_headers(serialized)
    elif src is None:
        headers = [(k, v) for k, v in pairs
                   if not k.startswith((b":", b"cf-")) and k not in (b"date", b"content-length")]
    else:
        headers = []
    length_raw = first.get(b"content-length")
    content_length = int(length_raw) if length_raw is not None and length_raw.isdigit() else None
    upgrade = False
    if request_was_websocket and status == 200:
        upgrade_values = _tokens(v for k, v in headers if k.lower() == b"upgrade")
        has_accept = any(k.lower() == b"sec-websocket-accept" for k, _ in headers)
        upgrade = b"websocket" in upgrade_values and has_accept
    return TunnelResponse(status, headers, src, upgrade, content_length,
                          flow_rate_limited=meta.get("flow_rate_limited") is True)


def eyeball_response_headers(resp: TunnelResponse) -> list[tuple[bytes, bytes]]:
    """The origin's headers for the eyeball's HTTP/1.1 response.

    Hop-by-hop fields are stripped, except that an upgrade (status 101, see `eyeball_status`) keeps
    `Connection`, `Upgrade` and `Sec-WebSocket-Accept`. Fields h11 could not send are dropped.
    """
    pairs = [(k, v) for k, v in resp.headers if is_token(k) and is_valid_value(v)]
    if resp.websocket_upgrade:
        drop = {b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
                b"content-length"}
        return [(k, v) for k, v in pairs if k.lower() not in drop]
    named = _tokens(v for k, v in pairs if k.lower() == b"connection")
    return [(k, v) for k, v in pairs if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def new_ray_id(location: str, rand: bytes) -> str:
    """A `cf-ray` value: 16 lower-case hex digits from 8 random bytes, `-`, the location name."""
    if len(rand) < 8:
        raise ValueError(f"new_ray_id needs 8 random bytes, got {len(rand)}")
    return f"{rand[:8].hex()}-{location}"


# --- one eyeball request through the edge, as a state machine -----------------------------------------

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
MAX_TRIES = 2  # a request goes to at most two tunnel connections
# Connection-specific fields an HTTP/2 response must not carry (RFC 9113 §8.2.2).
_H2_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                     b"upgrade", b"te"})


class RequestRefused(StreamConversionError):
    """The edge refuses an eyeball's request head before forwarding anything: answer `status` with a page
    saying `detail` (the message, when not given, is the detail)."""

    def __init__(self, status: int, detail: str, message: str | None = None) -> None:
        super().__init__(message or detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Answer:
    """The edge answers the eyeball itself (an error page): the status and the history's outcome."""

    status: int
    outcome: str


class Next(enum.Enum):
    """What to do after a tunnel stream failed, when the edge does not answer itself."""

    RETRY = "retry"  # the connector cannot have seen the request: try another connection
    GONE = "gone"  # the eyeball went away during its upload: nobody to answer


@dataclass(frozen=True, kw_only=True)
class EyeballResponse:
    """What the eyeball gets for a tunnel response head."""

    status: int
    headers: list[tuple[bytes, bytes]]  # for the eyeball: hop-by-hop fields gone, `cf-ray` last
    outcome: str  # "ok", "websocket" (switch to a byte pipe), "connector-error" (the edge's own page)
    bodiless: bool  # the head is the whole response (HEAD, 204, 304, content-length 0)
    body_length: int | None  # the body's announced length; None when bodiless or unknown


class EyeballState(enum.Enum):
    """Where an eyeball exchange is (`EyeballExchange.state`)."""

    ROUTING = "routing"  # no tunnel stream yet
    OPENING = "opening"  # a stream is being opened on a connection
    WAITING = "waiting"  # the request is on a stream: its response head is awaited
    RESPONDING = "responding"  # the eyeball is getting the tunnel's response
    ANSWERED = "answered"  # the edge answered itself


class EyeballExchange:
    """One eyeball request through the edge, without I/O: the stream to open, when to retry it on
    another connection, and what the eyeball gets back.

    Build it with `from_h1` / `from_h2` (which refuse bad heads) or directly. Then `open_stream(ray)`
    for each try (the tunnel fields and `end_stream`), `open_failed` / `stream_failed` / `timed_out`
    when that goes wrong (an `Answer`, or `Next`), and `response(fields)` for the response head.
    """

    def __init__(self, request: EyeballRequest, *, has_body: bool, websocket: bool = False) -> None:
        self.request = request
        self.has_body = has_body
        self.websocket = websocket
        self.method = request.method.upper()
        self.state = EyeballState.ROUTING
        self.tries = 0
        self.ray = ""

    # -- request heads

    @classmethod
    def from_h1(cls, *, method: bytes, target: bytes, http_version: bytes,
                headers: Sequence[tuple[bytes, bytes]], scheme: str, client_ip: str,
                max_head_size: int) -> EyeballExchange:
        """An HTTP/1.x request head (`headers` as h11 gives them: lower-case names). Raises
        `RequestRefused` for a head the edge answers itself (505, 400, 431), before forwarding anything."""
        refused = request_head_error(http_version, headers)
        if refused is not None:
            raise RequestRefused(*refused)
        # h11 only bounds a head that arrives in pieces; a complete one is checked here.
        head_size = len(target) + sum(len(n) + len(v) + 4 for n, v in headers)
        if head_size > max_head_size:
            raise RequestRefused(431, "The request's header fields are too large.",
                                 f"request head of {head_size} bytes over {max_head_size}")
        host = next((v.decode("latin-1") for n, v in headers if n == b"host"), "")
        if not host:
            raise RequestRefused(400, "The request has no Host header.")
        req = EyeballRequest(method=method.decode("latin-1"), target=target.decode("latin-1"),
                             headers=tuple(headers), scheme=scheme, client_ip=client_ip, host=host)
        return cls(req, has_body=_h1_has_body(headers), websocket=is_websocket_request(headers))

    @classmethod
    def from_h2(cls, headers: Sequence[tuple[bytes, bytes]], *, ended: bool,
                client_ip: str) -> EyeballExchange:
        """An HTTP/2 request stream's HEADERS (`ended`: END_STREAM came with them). Raises
        `StreamConversionError` without `:method`, or without both `:authority` and `host`."""
        pseudo = {n: v for n, v in headers if n.startswith(b":")}
        regular = [(n, v) for n, v in headers if not n.startswith(b":")]
        host = pseudo.get(b":authority") or next((v for n, v in regular if n == b"host"), None)
        if b":method" not in pseudo or host is None:
            raise StreamConversionError("eyeball HTTP/2 request without :method, or without :authority "
                                        "and host")
        req = EyeballRequest(method=pseudo[b":method"].decode("latin-1"),
                             target=pseudo.get(b":path", b"/").decode("latin-1"), headers=tuple(regular),
                             scheme="https", client_ip=client_ip, host=host.decode("latin-1"))
        return cls(req, has_body=not ended)

    # -- the tunnel stream

    @property
    def end_stream(self) -> bool:
        """END_STREAM goes on the request HEADERS: no body follows (a WebSocket keeps its side open)."""
        return not self.has_body and not self.websocket

    def open_stream(self, ray: str) -> list[tuple[bytes, bytes]]:
        """The fields of a new tunnel stream for this request (one more try)."""
        self.ray = ray
        self.tries += 1
        self.state = EyeballState.OPENING
        return tunnel_request_headers(self.request, ray=ray, websocket=self.websocket)

    def stream_opened(self) -> None:
        """The stream is open: the request is on its way to the connector."""
        self.state = EyeballState.WAITING

    def may_retry_open(self, retryable: bool) -> bool:
        """Opening the stream failed where the connector saw nothing: try another connection?"""
        return retryable and self.tries < MAX_TRIES

    def open_failed(self, *, retryable: bool, no_capacity: bool) -> Answer:
        """No stream could be opened (and no retry): 503 at the stream limit, 530 when the connection
        went away, 502 otherwise."""
        if no_capacity:
            return self._answer(503, "overloaded")
        if retryable:
            return self._answer(530, "no-connection")
        return self._answer(502, "stream-failed")

    def stream_failed(self, *, retryable: bool, bad_body: bool = False, body_eof: bool = False,
                      upload_failed: bool = False, response_started: bool = False) -> Answer | Next:
        """The stream failed before its response head. `bad_body`: the eyeball's body was malformed
        (`body_eof`: it ended early); `upload_failed`: the eyeball went away during the upload. Only a
        bodiless idempotent request is retried, and only where the connector cannot have seen it."""
        if bad_body and not response_started:
            return self._answer(400, "eyeball-closed" if body_eof else "bad-request")
        if upload_failed:
            return Next.GONE
        if retryable and self._may_retry():
            return Next.RETRY
        return self._answer(502, "stream-failed")

    def _may_retry(self) -> bool:
        return self.method in IDEMPOTENT and self.end_stream and self.tries < MAX_TRIES

    def connection_lost(self) -> Answer:
        """A retry found no other connection."""
        return self._answer(502, "connection-lost")

    def timed_out(self) -> Answer:
        """No response head within the origin timeout."""
        return self._answer(524, "timeout")

    def response(self, fields: Sequence[tuple[bytes, bytes]]) -> EyeballResponse:
        """The eyeball's response for the tunnel's response HEADERS. Raises `StreamConversionError` or
        `HeaderSerializationError` for a malformed head (the edge answers 502, `bad_response`)."""
        resp = tunnel_response(fields, request_was_websocket=self.websocket)
        headers = eyeball_response_headers(resp)
        self.state = EyeballState.RESPONDING
        if resp.websocket_upgrade:  # only ever True for a WebSocket request
            return EyeballResponse(status=101, headers=headers, outcome="websocket", bodiless=False,
                                   body_length=None)
        if resp.src == "cloudflared" and resp.status >= 500:
            self.state = EyeballState.ANSWERED
            return EyeballResponse(status=resp.status, headers=headers, outcome="connector-error",
                                   bodiless=False, body_length=None)
        # Like Cloudflare's edge: every proxied response names its ray (the same as in the history).
        headers = [(n, v) for n, v in headers if n.lower() != b"cf-ray"] + [(b"cf-ray", self.ray.encode())]
        bodiless = self.method == "HEAD" or resp.status in (204, 304) or resp.content_length == 0
        return EyeballResponse(status=resp.status, headers=headers, outcome="ok", bodiless=bodiless,
                               body_length=None if bodiless else resp.content_length)

    def bad_response(self) -> Answer:
        """The connector's response head could not be decoded."""
        return self._answer(502, "bad-response")

    def oversized_response(self) -> Answer:
        """The connector's response head is over the lab's limit."""
        return self._answer(502, "oversized-headers")

    def _answer(self, status: int, outcome: str) -> Answer:
        self.state = EyeballState.ANSWERED
        return Answer(status, outcome)


def _h1_has_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """An HTTP/1.1 request has a body: Transfer-Encoding, or a Content-Length other than 0."""
    for name, value in headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            try:
                return int(value) > 0
            except ValueError:
                return True
    return False


def h2_response_fields(status: int, headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An HTTP/2 eyeball's response HEADERS: `:status`, then the fields lower-cased, minus the
    connection-specific ones HTTP/2 forbids."""
    fields = [(b":status", str(status).encode())]
    for name, value in headers:
        name = name.lower()
        if name not in _H2_CONNECTION_SPECIFIC:
            fields.append((name, value))
    return fields

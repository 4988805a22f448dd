"""Edge side of an HTTP tunnel stream: eyeball HTTP/1.1 request -> tunnel stream, and back.

The edge is the HTTP/2 client on the tunnel connection. What it may put on a stream is constrained by
Go's HTTP/2 server in cloudflared (docs/protocol.md §11.1): no connection-specific fields ever (Go answers
400), a WebSocket is signalled only by `cf-cloudflared-proxy-connection-upgrade: websocket`. What it adds
is the lab's choice, modelled on Cloudflare's documented origin headers (docs/protocol.md §11.2).

Pure functions and small value objects; the edge shell does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from wire.errors import StreamConversionError
from wire.headers import (
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
    "EyeballRequest",
    "TunnelResponse",
    "eyeball_response_headers",
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

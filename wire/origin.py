"""Connector side of an HTTP tunnel stream: HTTP/2 request -> HTTP/1.1 origin request, and back.

cloudflared hands the request Go's HTTP/2 server parsed straight to Go's HTTP/1.1 client, so every rule
here is one of those two Go components' rules (docs/protocol.md §5.2-§6; body framing and header order
as captured from the released go1.26 build, docs/protocol.md §5.3):

- names are Go-canonical, several `cookie` fields become one `Cookie` joined by `; `;
- the head is: request line, `Host`, `User-Agent` (only if the edge sent a non-empty one), the framing
  header, then every other header sorted by name (repeats keep their order), then `Accept-Encoding: gzip`
  when Go's transport adds it (not for HEAD, not with Range);
- body framing follows Go's `outgoingLength` / `shouldSendChunkedRequestBody` / 1-byte probe rules.

Pure functions, small value objects and `OriginExchange`, the state machine of one request/response with
the origin (events in, bytes and tunnel actions out); the connector shell does the I/O.
"""

from __future__ import annotations

import enum
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from tunnel_lab.wire.errors import OriginError, ResponseBodyError, StreamConversionError
from tunnel_lab.wire.headers import (
    META_CLOUDFLARED,
    META_ORIGIN,
    PROXY_UPGRADE,
    RESPONSE_HEADERS,
    RESPONSE_META,
    TRACING,
    as_bytes,
    canonical_header_name,
    first_value,
    is_token,
    is_valid_value,
    serialize_response_headers,
)
from tunnel_lab.wire.sniff import sniff_content_type

__all__ = [
    "BodyEncoder",
    "EndStream",
    "Framing",
    "Gunzipper",
    "OriginExchange",
    "OriginOptions",
    "OriginRequest",
    "RequestState",
    "ResponseState",
    "SendData",
    "SendHeaders",
    "SendTrailers",
    "TunnelAction",
    "TunnelRequest",
    "bad_request_response",
    "build_origin_request",
    "error_response_headers",
    "forbidden_request_header",
    "go_request_uri",
    "needs_body_probe",
    "should_gunzip",
    "strip_gzip_headers",
    "tunnel_response_headers",
    "tunnel_trailers",
]

# Go's requestMethodUsuallyLacksBody: for these an unknown-length body is probed (1 byte, 200 ms) first.
PROBE_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "PROPFIND", "SEARCH"})
PROBE_TIMEOUT = 0.2  # seconds, Go's transferWriter.probeRequestBody

_PSEUDO = (b":method", b":scheme", b":authority", b":path")
# Connection-specific fields Go's HTTP/2 server refuses, in the order it checks them (x/net http2).
_CONNECTION_SPECIFIC = (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
# Never written from the header map by Go's Request.write (it writes its own Host/User-Agent/framing).
_REQ_WRITE_EXCLUDED = frozenset({b"Host", b"User-Agent", b"Content-Length", b"Transfer-Encoding", b"Trailer"})
# Trailer names Go refuses (httpguts.ValidTrailerHeader), canonical form.
_BAD_TRAILERS = frozenset({
    b"Authorization", b"Cache-Control", b"Connection", b"Content-Encoding", b"Content-Length",
    b"Content-Range", b"Content-Type", b"Expect", b"Host", b"Keep-Alive", b"Max-Forwards", b"Pragma",
    b"Proxy-Authenticate", b"Proxy-Authorization", b"Proxy-Connection", b"Range", b"Realm", b"Te",
    b"Trailer", b"Transfer-Encoding", b"Www-Authenticate",
})


def _go_trim(value: bytes) -> bytes:
    # Header.write: CR/LF become spaces, then textproto.TrimString.
    return value.replace(b"\r", b" ").replace(b"\n", b" ").strip(b" \t\r\n")


# --- the request as it came off the tunnel ---------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class TunnelRequest:
    """An HTTP request stream as the connector's HTTP/2 server received it."""

    method: str
    scheme: str
    authority: str
    path: str
    headers: tuple[tuple[bytes, bytes], ...]  # regular fields, lower-case names, wire order
    end_stream: bool  # END_STREAM came on HEADERS

    @classmethod
    def from_h2_headers(cls, headers: Iterable[tuple[bytes | str, bytes | str]],
                        end_stream: bool) -> TunnelRequest:
        """Validate pseudo-headers like Go's HTTP/2 server; a violation is a stream error there.

        Raises `StreamConversionError` (the connector answers RST_STREAM(PROTOCOL_ERROR)).
        Connection-specific fields are *not* checked here: see `forbidden_request_header`.
        """
        pseudo: dict[bytes, bytes] = {}
        regular: list[tuple[bytes, bytes]] = []
        for raw_name, raw_value in headers:
            name, value = as_bytes(raw_name), as_bytes(raw_value)
            if name.startswith(b":"):
                if regular:
                    raise StreamConversionError(f"pseudo-header {name!r} after a regular header")
                if name not in _PSEUDO:
                    raise StreamConversionError(f"unknown request pseudo-header {name!r}")
                if name in pseudo:
                    raise StreamConversionError(f"pseudo-header {name!r} repeated")
                pseudo[name] = value
                continue
            if not is_token(name) or name.lower() != name:
                raise StreamConversionError(f"invalid request header name {name!r}")
            if not is_valid_value(value):
                raise StreamConversionError(f"invalid value for request header {name.decode()!r}")
            regular.append((name, value))
        method = pseudo.get(b":method", b"")
        scheme = pseudo.get(b":scheme", b"")
        path = pseudo.get(b":path", b"")
        authority = pseudo.get(b":authority", b"")
        if not method:
            raise StreamConversionError("request without :method")
        if method == b"CONNECT":
            if path or scheme or not authority:
                raise StreamConversionError("CONNECT request needs :authority and no :path or :scheme")
        else:
            if scheme not in (b"http", b"https"):
                raise StreamConversionError(f"request :scheme {scheme!r} is not http or https")
            if not path:
                raise StreamConversionError("request without :path")
            if not (path.startswith(b"/") or path == b"*"):
                raise StreamConversionError(f"request :path {path[:80]!r} is not origin-form")
            if any(b < 0x21 or b == 0x7F for b in path):
                raise StreamConversionError(f"request :path {path[:80]!r} holds a control byte or space")
            # Go's server parses :path with url.ParseRequestURI: a bad escape is a stream error there.
            go_request_uri(path.decode("utf-8", "surrogateescape"))
        if not authority:
            authority = first_value(regular, b"host") or b""
        return cls(method=method.decode("latin-1"), scheme=scheme.decode("latin-1"),
                   authority=authority.decode("utf-8", "surrogateescape"),
                   path=path.decode("utf-8", "surrogateescape"),
                   headers=tuple(regular), end_stream=end_stream)

    def h2_content_length(self) -> int:
        """`Request.ContentLength` as Go's HTTP/2 server sets it: 0 with END_STREAM on HEADERS, the
        `content-length` value while the body is open (0 when unparsable), -1 (unknown) without one."""
        if self.end_stream:
            return 0
        value = first_value(self.headers, b"content-length")
        if value is None:
            return -1
        if value.isdigit() and int(value) < 2**63:
            return int(value)
        return 0


@dataclass(frozen=True, kw_only=True)
class OriginOptions:
    """The per-rule settings that change what the origin sees."""

    connector_id: str
    http_host_header: str | None = None
    disable_chunked_encoding: bool = False
    tags: tuple[tuple[str, str], ...] = ()


class Framing(enum.Enum):
    """How the request body goes to the origin."""

    NONE = "none"  # no framing header, no body bytes
    CONTENT_LENGTH = "content-length"
    CHUNKED = "chunked"
    RAW = "raw"  # no framing header, body copied raw (CONNECT)
    # --no-chunked-encoding and no usable length: read the whole body first, then send it with a
    # Content-Length (`OriginRequest.with_body_length`). cloudflared copies such a body raw after a head
    # with no framing header, so the origin never sees it and it desynchronises the connection
    # (docs/protocol.md §12.1); this is the lab connector's deliberate, correct departure from it.
    BUFFERED = "buffered"


# --no-chunked-encoding bodies without a length are read whole before the head is sent: a bound on that.
MAX_BUFFERED_BODY = 32 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class OriginRequest:
    """The HTTP/1.1 request head for the origin, and how to frame the body after it."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]  # origin wire order, Go-canonical names, Host first
    framing: Framing
    content_length: int | None
    added_accept_encoding: bool
    host: bytes = b""
    trailer_names: tuple[bytes, ...] = field(default=())

    def with_body_length(self, length: int) -> OriginRequest:
        """A BUFFERED request once its whole body is known: framed by Content-Length, as Go frames a body
        of known length (none at all for an empty body, as with `--no-chunked-encoding` in D08b)."""
        if self.framing is not Framing.BUFFERED:
            raise ValueError(f"with_body_length needs a BUFFERED request, not {self.framing.name}")
        if length <= 0:
            return replace(self, framing=Framing.NONE, content_length=None)
        # Go's order: Host, User-Agent, then the framing header
        at = 2 if len(self.headers) > 1 and self.headers[1][0] == b"User-Agent" else 1
        headers = [*self.headers[:at], (b"Content-Length", b"%d" % length), *self.headers[at:]]
        return replace(self, headers=headers, framing=Framing.CONTENT_LENGTH, content_length=length)

    def head_bytes(self) -> bytes:
        """Request line, header lines and the blank line, exactly as Go writes them."""
        lines = [f"{self.method} {self.target} HTTP/1.1".encode("utf-8", "surrogateescape")]
        lines += [name + b": " + value for name, value in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"


# --- Go's HTTP/2 server: connection-specific fields -----------------------------------------------

def forbidden_request_header(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The message Go's HTTP/2 server answers (400, before cloudflared sees the request), or None.

    Exactly the texts captured in the go1.26 vectors (D11), without the trailing newline that Go's
    `http.Error` appends (`bad_request_response` adds it). `te: trailers` (or an empty `te`) is allowed.
    """
    names = {as_bytes(k).lower() for k, _ in headers}
    for name in _CONNECTION_SPECIFIC:
        if name in names:
            return f'request header "{canonical_header_name(name).decode()}" is not valid in HTTP/2'
    te = [as_bytes(v) for k, v in headers if as_bytes(k).lower() == b"te"]
    if te and (len(te) > 1 or te[0] not in (b"trailers", b"")):
        return 'request header "TE" may only be "trailers" in HTTP/2'
    return None


def bad_request_response(message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Go's own 400 (`http.Error`): HTTP/2 response fields and body. No cloudflared headers at all,
    which is how an edge tells it from an origin's 400 (a `date` field is up to the shell)."""
    body = message.encode() + b"\n"
    return ([(b":status", b"400"), (b"content-type", b"text/plain; charset=utf-8"),
             (b"x-content-type-options", b"nosniff"), (b"content-length", str(len(body)).encode())], body)


# --- Go's URL and Host handling -------------------------------------------------------------------

_UNRESERVED = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~")
_PATH_OK = _UNRESERVED | frozenset(b"$&+,/:;=@")  # shouldEscape(c, encodePath) is False
_VALID_ENCODED = _PATH_OK | frozenset(b"!'()*[]%")  # url.validEncoded extras
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _unescape_path(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25:  # '%'
            hexpart = raw[i + 1:i + 3]
            if len(hexpart) != 2 or not all(b in _HEX for b in hexpart):
                raise StreamConversionError(f"request path {raw[:80]!r} has a bad % escape")
            out.append(int(hexpart, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def go_request_uri(path: str) -> str:
    """`:path` as Go re-serialises it for the origin (`url.ParseRequestURI` then `RequestURI()`).

    The query is kept verbatim; the path is kept when it is validly encoded, otherwise it is
    unescaped and escaped again (non-ASCII bytes become `%XX`). A bad `%` escape raises
    `StreamConversionError`.
    """
    if path == "*":
        return path
    raw = path.encode("utf-8", "surrogateescape")
    raw_path, sep, query = raw.partition(b"?")
    decoded = _unescape_path(raw_path)
    if not all(b in _VALID_ENCODED for b in raw_path):
        raw_path = b"".join(bytes([b]) if b in _PATH_OK else b"%%%02X" % b for b in decoded)
    # The query goes out verbatim, raw bytes included (Go only refuses control bytes).
    return (raw_path + sep + query).decode("utf-8", "surrogateescape")


_VALID_HOST = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!$%&()*+,-.:;=['[]_~")


def _split_host_port(hostport: bytes) -> tuple[bytes, bytes] | None:
    # net.SplitHostPort, None on any error.
    i = hostport.rfind(b":")
    if i < 0:
        return None
    if hostport.startswith(b"["):
        end = hostport.find(b"]")
        if end < 0 or end + 1 != i:
            return None
        host, j, k = hostport[1:end], 1, end + 1
    else:
        host, j, k = hostport[:i], 0, 0
        if b":" in host:
            return None
    if b"[" in hostport[j:] or b"]" in hostport[k:]:
        return None
    return host, hostport[i + 1:]


def _punycode_labels(host: bytes) -> bytes:
    labels = []
    for label in host.split(b"."):
        if label.isascii():
            labels.append(label)
        else:
            # Go's idna Punycode profile: no mapping, one ACE label per non-ASCII label.
            text = label.decode("utf-8", "replace")
            labels.append(b"xn--" + text.encode("punycode"))
    return b".".join(labels)


def go_host_header(host: str) -> bytes:
    """The `Host` value Go's HTTP/1.1 client writes for `req.Host` (`PunycodeHostPort`, validity, zone).

    Non-ASCII hosts are punycoded (a port is kept); a host with bytes Go does not allow is sent empty.
    """
    raw = host.encode("utf-8", "surrogateescape")
    if not raw.isascii():
        split = _split_host_port(raw)
        if split is None:
            raw = _punycode_labels(raw)
        else:
            name, port = split
            name = _punycode_labels(name)
            bracketed = b"[" + name + b"]" if b":" in name else name
            raw = bracketed + b":" + port if port else name
    if not all(b in _VALID_HOST for b in raw):
        return b""
    if raw.startswith(b"["):
        i = raw.rfind(b"]")
        j = raw.rfind(b"%", 0, i) if i >= 0 else -1
        if j >= 0:
            raw = raw[:j] + raw[i:]
    return raw


# --- building the origin request ------------------------------------------------------------------

def _go_atoi(value: bytes) -> int | None:
    if re.fullmatch(rb"[+-]?[0-9]+", value) is None:
        return None
    number = int(value)
    return number if -(2**63) <= number < 2**63 else None


def needs_body_probe(req: TunnelRequest, opts: OriginOptions, *, websocket: bool = False) -> bool:
    """True when Go's client reads 1 byte of the body (waiting up to 200 ms) before writing the head.

    GET/HEAD/DELETE/OPTIONS/PROPFIND/SEARCH whose body is still open and has no usable length
    (no `content-length`, or 0), unless `--no-chunked-encoding` is on. After the probe, pass what it read
    to `build_origin_request(probe=...)` and send that byte as the first chunk.
    """
    if websocket or req.end_stream or opts.disable_chunked_encoding:
        return False
    return req.method in PROBE_METHODS and req.h2_content_length() <= 0


def build_origin_request(req: TunnelRequest, opts: OriginOptions, *, websocket: bool = False,
                         probe: bytes | None = None) -> OriginRequest:
    """The HTTP/1.1 request cloudflared (Go's client) sends the origin for this stream.

    `probe` is what the 1-byte probe read: `b""` for EOF at once, 1 byte for data, None when no probe
    ran or it timed out (an open body of unknown length is then sent chunked). With data, the connector
    must send the probed byte as the first chunk (`BodyEncoder.encode(probe)`).

    Raises `StreamConversionError` where Go's client refuses to write the request (cloudflared then
    answers 502 with meta `{"src":"cloudflared"}`).
    """
    method = req.method
    if not is_token(method.encode("latin-1")):
        raise StreamConversionError(f"invalid method {method!r}")

    # Go's http.Header: canonical name -> values. Dict order is irrelevant: Go sorts when writing.
    header: dict[bytes, list[bytes]] = {}
    cookies: list[bytes] = []
    for name, value in req.headers:
        if name == b"cookie":
            cookies.append(value)
            continue
        header.setdefault(canonical_header_name(name), []).append(value)
    if cookies:
        header[b"Cookie"] = [b"; ".join(cookies)]
    header.pop(canonical_header_name(PROXY_UPGRADE), None)

    # x/net moves declared trailers out of the header map; Go's client re-declares them.
    trailer_names: set[bytes] = set()
    for value in header.pop(b"Trailer", []):
        for key in value.split(b","):
            key = canonical_header_name(key.strip(b" \t"))
            if key and key not in (b"Transfer-Encoding", b"Trailer", b"Content-Length"):
                trailer_names.add(key)

    for tag_name, tag_value in (*opts.tags, ("ID", opts.connector_id)):
        key = canonical_header_name(b"Cf-Warp-Tag-" + tag_name.encode("utf-8", "surrogateescape"))
        value = tag_value.encode("utf-8", "surrogateescape")
        if not is_token(key) or not is_valid_value(value):
            raise StreamConversionError(f"tag {tag_name!r}={tag_value!r} makes an invalid header")
        header.setdefault(key, []).append(value)

    req_host = req.authority
    if opts.http_host_header:
        header[b"X-Forwarded-Host"] = [req_host.encode("utf-8", "surrogateescape")]
        req_host = opts.http_host_header

    # Body: Go's HTTP/2 server never hands over a nil body; cloudflared drops it for WebSockets.
    body_nil = websocket
    content_length = 0 if websocket else req.h2_content_length()
    transfer_encoding: list[bytes] = []
    if websocket:
        header[b"Connection"] = [b"Upgrade"]
        header[b"Upgrade"] = [b"websocket"]
        header[b"Sec-Websocket-Version"] = [b"13"]
    else:
        if opts.disable_chunked_encoding:
            transfer_encoding = [b"gzip", b"deflate"]  # written by Go as nothing at all
            parsed = _go_atoi((header.get(b"Content-Length") or [b""])[0])
            if parsed is not None:
                content_length = parsed
        header[b"Connection"] = [b"keep-alive"]

    user_agent = (header.get(b"User-Agent") or [b""])[0]
    if not user_agent:
        header[b"User-Agent"] = [b""]

    # transferWriter: outgoingLength, then chunking and the probe.
    outgoing = 0 if body_nil else (content_length if content_length != 0 else -1)
    if req.end_stream and probe is None:
        probe = b""  # the body is already at EOF: the probe would read EOF at once
    if outgoing < 0 and not transfer_encoding and method != "CONNECT":
        if method in PROBE_METHODS and probe == b"":
            body_nil, outgoing = True, 0
        else:
            transfer_encoding = [b"chunked"]
    chunked = transfer_encoding == [b"chunked"]
    send_length = (not chunked) and (outgoing > 0 or (outgoing == 0 and method in ("POST", "PUT", "PATCH")))

    if chunked:
        framing, framing_header = Framing.CHUNKED, [(b"Transfer-Encoding", b"chunked")]
        length: int | None = None
    elif send_length:
        framing, length = Framing.CONTENT_LENGTH, outgoing
        framing_header = [(b"Content-Length", b"%d" % outgoing)]
        if outgoing > 0 and req.end_stream:
            raise StreamConversionError(
                f"http: ContentLength={outgoing} with Body length 0 (the stream ended on its HEADERS)")
    elif body_nil or outgoing == 0 or req.end_stream:
        framing, framing_header, length = Framing.NONE, [], None
    elif opts.disable_chunked_encoding and method != "CONNECT":
        framing, framing_header, length = Framing.BUFFERED, [], None
    else:
        framing, framing_header, length = Framing.RAW, [], None

    host = go_host_header(req_host)
    # CONNECT: Go writes the host as the request target.
    target = host.decode("ascii") if method == "CONNECT" and not req.path else go_request_uri(req.path)

    lines: list[tuple[bytes, bytes]] = [(b"Host", host)]
    if user_agent:
        lines.append((b"User-Agent", _go_trim(user_agent)))
    lines += framing_header
    if trailer_names:
        lines.append((b"Trailer", b",".join(sorted(trailer_names))))
    for name in sorted(header):
        if name in _REQ_WRITE_EXCLUDED:
            continue
        lines += [(name, _go_trim(value)) for value in header[name]]
    accept_encoding = (header.get(b"Accept-Encoding") or [b""])[0]
    range_ = (header.get(b"Range") or [b""])[0]
    added_gzip = not accept_encoding and not range_ and method != "HEAD"
    if added_gzip:
        lines.append((b"Accept-Encoding", b"gzip"))
    return OriginRequest(method=method, target=target, headers=lines, framing=framing,
                         content_length=length, added_accept_encoding=added_gzip, host=host,
                         trailer_names=tuple(sorted(trailer_names)))


class BodyEncoder:
    """Frames request body bytes for the origin: one chunk per `encode` call when chunked.

    With `content_length`, Go's length check is applied (more or fewer bytes than declared raise
    `StreamConversionError`, where Go's client fails the request).
    """

    def __init__(self, framing: Framing, content_length: int | None = None) -> None:
        if framing is Framing.BUFFERED:
            raise ValueError("frame a BUFFERED request with OriginRequest.with_body_length first")
        self.framing = framing
        self.content_length = content_length
        self.sent = 0
        self._ended = False

    def encode(self, data: bytes) -> bytes:
        """Bytes to write for `data` (a chunk when chunked; `b""` for empty data)."""
        if self._ended:
            raise StreamConversionError("request body data after its end")
        if not data:
            return b""
        self.sent += len(data)
        if self.framing is Framing.NONE:
            raise StreamConversionError(f"{len(data)} request body bytes, but the origin request has no body")
        if self.framing is Framing.CHUNKED:
            return b"%x\r\n" % len(data) + data + b"\r\n"
        if self.content_length is not None and self.sent > self.content_length:
            raise StreamConversionError(
                f"http: ContentLength={self.content_length} with Body length {self.sent}")
        return data

    def end(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        """Bytes that finish the body (`0\\r\\n`, trailers, `\\r\\n` when chunked)."""
        if self._ended:
            return b""
        self._ended = True
        if self.framing is Framing.CHUNKED:
            canon = sorted(((canonical_header_name(as_bytes(k)), _go_trim(as_bytes(v))) for k, v in trailers),
                           key=lambda kv: kv[0])
            return b"0\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in canon) + b"\r\n"
        if (self.framing is Framing.CONTENT_LENGTH and self.content_length is not None
                and self.sent != self.content_length):
            raise StreamConversionError(
                f"http: ContentLength={self.content_length} with Body length {self.sent}")
        return b""


# --- the response ----------------------------------------------------------------------------------

def _no_body_status(status: int) -> bool:
    return 100 <= status < 200 or status in (204, 304)


def _go_response_headers(status: int, headers: Sequence[tuple[bytes, bytes]], head: bool,
                         http10: bool = False) -> list[tuple[bytes, bytes]]:
    """Go's client view of an origin response head: canonical names, Transfer-Encoding and Trailer
    moved out, Content-Length dropped when chunked and de-duplicated, and on HTTP/1.1 a `Connection`
    that says `close` taken out (Go's shouldClose records it on the response instead)."""
    pairs = [(canonical_header_name(as_bytes(k)), _go_trim(as_bytes(v))) for k, v in headers]
    if not http10 and any(b"close" in _tokens(v) for k, v in pairs if k == b"Connection"):
        pairs = [(k, v) for k, v in pairs if k != b"Connection"]
    te = [v for k, v in pairs if k == b"Transfer-Encoding"]
    chunked = False
    if te:
        if len(te) != 1 or te[0].lower() != b"chunked":
            raise OriginError(f"origin response has unsupported transfer encoding {b', '.join(te)!r}")
        chunked = True
    lengths = [v for k, v in pairs if k == b"Content-Length"]
    if len(lengths) > 1 and any(v != lengths[0] for v in lengths[1:]):
        raise OriginError(f"origin response has multiple Content-Length headers {lengths!r}")
    if lengths and not chunked and not head and not _no_body_status(status) and not lengths[0].isdigit():
        raise OriginError(f"origin response has a bad Content-Length {lengths[0][:40]!r}")
    out: list[tuple[bytes, bytes]] = []
    seen_length = False
    for k, v in pairs:
        if k in (b"Transfer-Encoding", b"Trailer"):
            continue
        if k == b"Content-Length":
            if chunked or seen_length:
                continue
            seen_length = True
        out.append((k, v))
    return out


def _tokens(value: bytes) -> list[bytes]:
    """The comma-separated tokens of a header value, trimmed and lower-cased."""
    return [token.strip(b" \t").lower() for token in value.split(b",")]


def tunnel_response_headers(status: int, headers: Sequence[tuple[bytes, bytes]], *, head: bool = False,
                            http10: bool = False) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 response fields cloudflared sends for an origin response (docs/protocol.md §5.4).

    `headers` are the origin's response header pairs as read (any case). 101 becomes 200; every origin
    header goes into `cf-cloudflared-response-headers` (exclusion rules applied), meta is origin,
    `content-length` is copied when the origin had one (not when chunked). `head` says the request was
    HEAD (Go then keeps Content-Length without checking it). Raises `OriginError` where Go's client
    rejects the response (cloudflared answers 502).
    """
    if not 100 <= status <= 999:
        raise OriginError(f"origin response status {status} is out of range")
    go_headers = _go_response_headers(status, headers, head, http10)
    tracing = [v for k, v in go_headers if k.lower() == TRACING]
    fields: list[tuple[bytes, bytes]] = [
        (b":status", b"200" if status == 101 else b"%d" % status),
        (RESPONSE_HEADERS, serialize_response_headers(go_headers)),
        (RESPONSE_META, META_ORIGIN),
    ]
    fields += [(TRACING, v) for v in tracing]
    fields += [(b"content-length", v) for k, v in go_headers if k == b"Content-Length"]
    return fields


def with_sniffed_type(fields: Sequence[tuple[bytes, bytes]], first_bytes: bytes) -> list[tuple[bytes, bytes]]:
    """`fields` plus the `content-type` Go's server sniffs when the HEADERS leave together with the first
    body bytes (wire.sniff; not for streamed responses, whose HEADERS leave before any body, nor for an
    empty body). It goes before `content-length`, where Go writes it."""
    if not first_bytes:
        return list(fields)
    ctype = (b"content-type", sniff_content_type(first_bytes).encode())
    at = next((i for i, (name, _) in enumerate(fields) if name == b"content-length"), len(fields))
    return [*fields[:at], ctype, *fields[at:]]


def error_response_headers(meta: bytes = META_CLOUDFLARED, status: int = 502) -> list[tuple[bytes, bytes]]:
    """cloudflared's own error answer: status, meta, `content-length: 0`, no serialized headers
    (docs/protocol.md §5.7)."""
    return [(b":status", b"%d" % status), (RESPONSE_META, meta), (b"content-length", b"0")]


def tunnel_trailers(trailers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Origin trailers as the HTTP/2 trailers Go's server sends: lower-case, sorted by name (repeats keep
    their order), names Go forbids as trailers and invalid fields dropped (docs/protocol.md §5.6)."""
    out = []
    for k, v in trailers:
        name, value = canonical_header_name(as_bytes(k)), _go_trim(as_bytes(v))
        if not is_token(name) or name in _BAD_TRAILERS or not is_valid_value(value):
            continue
        out.append((name.lower(), value))
    return sorted(out, key=lambda kv: kv[0])


# --- transparent gzip ------------------------------------------------------------------------------

def should_gunzip(added_accept_encoding: bool, status: int, headers: Sequence[tuple[bytes, bytes]], *,
                  head: bool = False) -> bool:
    """True when Go's transport would transparently gunzip this response: it added `Accept-Encoding: gzip`
    itself, the response has a body, and its first Content-Encoding is `gzip` (any case)."""
    if not added_accept_encoding or head or _no_body_status(status):
        return False
    encoding = first_value(headers, b"content-encoding")
    if encoding is None or encoding.strip(b" \t").lower() != b"gzip":
        return False
    chunked = first_value(headers, b"transfer-encoding") is not None
    length = first_value(headers, b"content-length")
    return chunked or length is None or length.strip(b" \t") != b"0"


def strip_gzip_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop Content-Encoding and Content-Length, as Go does when it gunzips for the caller."""
    return [(k, v) for k, v in headers if as_bytes(k).lower() not in (b"content-encoding", b"content-length")]


class Gunzipper:
    """Streaming gunzip of an origin body (several gzip members allowed, as Go's gzip.Reader).

    `feed(data) -> bytes`, then `finish() -> bytes`. Corrupt or truncated data raises `OriginError`.
    """

    def __init__(self) -> None:
        self._inflater = zlib.decompressobj(wbits=31)
        self._member_started = False

    def feed(self, data: bytes) -> bytes:
        """Decompress what can be decompressed so far."""
        out = bytearray()
        while data:
            self._member_started = True
            try:
                out += self._inflater.decompress(data)
            except zlib.error as exc:
                raise OriginError(f"gzip response body from the origin is corrupt: {exc}") from exc
            if not self._inflater.eof:
                break
            data = self._inflater.unused_data
            self._inflater = zlib.decompressobj(wbits=31)
            self._member_started = False
        return bytes(out)

    def finish(self) -> bytes:
        """End of the origin body: raise if a gzip member was cut short."""
        if self._member_started:
            raise OriginError("gzip response body from the origin ended early (unexpected EOF)")
        return b""


# --- when response bytes leave: Go's buffered response writer and cloudflared's flush rule ---------------

HANDLER_BUFFER_SIZE = 4096  # Go's http2 server: handlerChunkWriteSize, the bufio.Writer before each stream
COPY_BUFFER_SIZE = 16 * 1024  # cloudflared's cfio.Copy: the body is read and written 16 KiB at a time
_STREAMED_CONTENT_TYPES = (b"text/event-stream", b"application/grpc", b"application/x-ndjson")


def streams_response(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """cloudflared's `shouldFlush(header)` (connection/connection.go): a response without Content-Length, a
    chunked one, or one whose Content-Type is SSE, gRPC or NDJSON is flushed on every write; any other is
    left to Go's buffered response writer. `headers` are the origin's, after Go's transport (no
    Content-Length once it gunzipped)."""
    if first_value(headers, b"content-length") is None:
        return True
    encoding = first_value(headers, b"transfer-encoding")
    if encoding is not None and b"chunked" in encoding.lower():
        return True
    ctype = first_value(headers, b"content-type")
    return ctype is not None and ctype.lower().startswith(_STREAMED_CONTENT_TYPES)


class ResponseBuffer:
    """The body bytes of one response on their way to the edge, held as Go's HTTP/2 server holds them.

    cloudflared writes an origin's response into Go's `http2.responseWriter`, which keeps a 4 KiB
    `bufio.Writer` in front of the stream: HEADERS leave only with the first bytes that leave the buffer
    (or when the handler ends), and small writes wait until 4 KiB have gathered. For the response kinds
    it streams (`streams_response`) cloudflared flushes after the headers and after every write. So a
    slowly trickled Content-Length body reaches the eyeball in one piece at the end, and an origin that
    fails before 4 KiB left costs a reset before any HEADERS (the edge answers 502).

    cloudflared copies the origin's body with a 16 KiB buffer, so each write it makes is at most 16 KiB:
    `write` takes the origin's bytes in such pieces. (Of 20000 bytes read before the origin failed, 16384
    leave and 3616 stay in the buffer, never sent.)

    `write(data)` returns what leaves now (b"" when it all stays), `finish()` what is left at the end.
    `headers_held` is True until something leaves or the response is streamed.
    """

    def __init__(self, *, streamed: bool, size: int = HANDLER_BUFFER_SIZE,
                 copy_size: int = COPY_BUFFER_SIZE) -> None:
        self.streamed = streamed
        self.size = size
        self.copy_size = copy_size
        self.headers_held = not streamed  # streamed: WriteRespHeaders flushes the HEADERS at once
        self._buf = bytearray()

    def write(self, data: bytes) -> bytes:
        """The origin's bytes, written in copy-buffer pieces; what leaves now."""
        if self.streamed:
            return data
        if len(data) <= self.copy_size:
            return self._write(data)
        return b"".join(self._write(data[i:i + self.copy_size]) for i in range(0, len(data), self.copy_size))

    def _write(self, data: bytes) -> bytes:
        """bufio.Writer.Write: fill the buffer, pass it on when full; a big write into an empty buffer
        passes straight through."""
        if len(data) <= self.size - len(self._buf):
            self._buf += data
            return b""
        out = b""
        if self._buf:
            room = self.size - len(self._buf)
            self._buf += data[:room]
            out, data = bytes(self._buf), data[room:]
            self._buf.clear()
        if len(data) > self.size:
            out, data = out + data, b""
        self._buf += data
        if out:
            self.headers_held = False
        return out

    def finish(self) -> bytes:
        """The handler ended: whatever is still buffered."""
        out = bytes(self._buf)
        self._buf.clear()
        return out


# --- one exchange with the origin, as a state machine ----------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SendHeaders:
    """Send these response HEADERS on the tunnel stream."""

    fields: list[tuple[bytes, bytes]]
    end_stream: bool = False
    # The fields stand for the origin's 101 to a WebSocket request. HTTP/2 carries it as 200 (what
    # `fields` say); a QUIC ConnectResponse carries the 101 itself, as cloudflared's does.
    upgraded: bool = False


@dataclass(frozen=True, kw_only=True)
class SendData:
    """Send these response body bytes on the tunnel stream."""

    data: bytes
    end_stream: bool = False


@dataclass(frozen=True, kw_only=True)
class SendTrailers:
    """Send these trailers (they end the stream)."""

    fields: list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class EndStream:
    """End the tunnel stream with an empty DATA frame."""


TunnelAction = SendHeaders | SendData | SendTrailers | EndStream


class RequestState(enum.Enum):
    """Where the request to the origin is (`OriginExchange.request_state`)."""

    START = "start"  # before `start`
    BUFFERING = "buffering"  # Framing.BUFFERED: collecting the whole body before the head
    HEAD = "head"  # the request head is ready to be written
    BODY = "body"  # writing the body
    ENDED = "ended"  # the body's last bytes were produced, not yet written
    DONE = "done"  # written to the end
    FAILED = "failed"  # the body could not be written


class ResponseState(enum.Enum):
    """Where the origin's response is (`OriginExchange.response_state`)."""

    WAITING = "waiting"  # no response head yet
    HEAD_ONLY = "head-only"  # a HEAD request: HEADERS ended the stream, the origin's end is awaited
    BODY = "body"
    UPGRADED = "upgraded"  # 101 to a WebSocket request: the stream is now a byte pipe
    DONE = "done"  # the response ended as HTTP says
    CLOSED = "closed"  # the origin closed the connection where that ends nothing in error (HEAD)


def _go_body_error(text: str) -> str:
    """Go's words for a response body cut short (its readers say `unexpected EOF`); other causes as read."""
    if "without sending complete message body" in text or "closed the connection" in text:
        return "unexpected EOF"
    return text


class OriginExchange:
    """One HTTP request/response between the connector and an origin (`origin`: its address, for
    messages), without I/O.

    The request side: `needs_probe`, `start(probe)` (or `buffer_body` / `end_buffered_body` for a
    BUFFERED body), `request_head()`, `request_pending()`, `request_data()` while `wants_request_body`,
    `request_end(trailers)`, then `request_written()` once those bytes are out (or `request_failed`).
    The response side: `informational`, `response_head`, `response_data`, `response_end`,
    `response_closed` each return the `TunnelAction`s to perform in order; `body_error` turns a failed
    origin read into the error to report. `reusable()` says whether the origin connection may serve
    another request. Errors are `StreamConversionError` (the request cannot be written), `OriginError`
    (the origin's answer is unusable; 502) and `ResponseBodyError` (after the head: reset the stream).
    """

    def __init__(self, request: TunnelRequest, options: OriginOptions, *, origin: str,
                 websocket: bool = False) -> None:
        self.request = request
        self.options = options
        self.websocket = websocket
        self.origin = origin
        self.head = request.method == "HEAD"
        self.needs_probe = needs_body_probe(request, options, websocket=websocket)
        self.origin_request: OriginRequest | None = None
        self.request_state = RequestState.START
        self.request_error: str | None = None
        self.response_state = ResponseState.WAITING
        self.headers_sent = False
        self._pending = b""  # the probed byte or the buffered body: the first body bytes to write
        self._remaining: int | None = None
        self._encoder: BodyEncoder | None = None
        self._fields: list[tuple[bytes, bytes]] = []
        self._gunzip: Gunzipper | None = None
        self._buffer: ResponseBuffer | None = None

    # -- the request

    def start(self, probe: bytes | None = None) -> OriginRequest:
        """Build the origin request (`probe`: what the body probe read, see `build_origin_request`)."""
        self._expect(RequestState.START)
        oreq = build_origin_request(self.request, self.options, websocket=self.websocket, probe=probe)
        self.origin_request = oreq
        if oreq.framing is Framing.BUFFERED:
            self.request_state = RequestState.BUFFERING
        else:
            self._ready(oreq, probe or b"")
        return oreq

    def buffer_body(self, data: bytes) -> None:
        """More of a BUFFERED body; `StreamConversionError` once it grows past MAX_BUFFERED_BODY."""
        self._expect(RequestState.BUFFERING)
        self._pending += data
        if len(self._pending) > MAX_BUFFERED_BODY:
            self.request_state = RequestState.FAILED
            raise StreamConversionError(
                f"the request body is over {MAX_BUFFERED_BODY} bytes: too large to send without chunked "
                "encoding or a Content-Length")

    def end_buffered_body(self) -> OriginRequest:
        """The whole BUFFERED body is in: the request, now framed by its length."""
        self._expect(RequestState.BUFFERING)
        assert self.origin_request is not None
        oreq = self.origin_request.with_body_length(len(self._pending))
        self.origin_request = oreq
        self._ready(oreq, self._pending)
        return oreq

    def _ready(self, oreq: OriginRequest, pending: bytes) -> None:
        self.request_state = RequestState.HEAD
        self._pending = pending
        self._remaining = oreq.content_length if oreq.framing is Framing.CONTENT_LENGTH else None
        self._encoder = BodyEncoder(oreq.framing, self._remaining)

    @property
    def has_request_body(self) -> bool:
        """False when nothing follows the request head (no body framing, or a WebSocket handshake)."""
        oreq = self.origin_request
        return oreq is not None and oreq.framing is not Framing.NONE and not self.websocket

    def request_head(self) -> bytes:
        """The request head's bytes."""
        self._expect(RequestState.HEAD)
        assert self.origin_request is not None
        self.request_state = RequestState.BODY if self.has_request_body else RequestState.DONE
        return self.origin_request.head_bytes()

    def request_pending(self) -> bytes:
        """The first body bytes, already read from the stream (the probed byte, a buffered body)."""
        self._expect(RequestState.BODY)
        pending, self._pending = self._pending, b""
        return self.request_data(pending) if pending else b""

    @property
    def wants_request_body(self) -> bool:
        """True while more request body may go to the origin (a Content-Length body stops at its length)."""
        return self.request_state is RequestState.BODY and (self._remaining is None or self._remaining > 0)

    def request_data(self, data: bytes) -> bytes:
        """Bytes to write for body `data` from the stream (cut at the declared length, framed)."""
        self._expect(RequestState.BODY)
        assert self._encoder is not None
        if self._remaining is not None:
            data = data[:self._remaining]
            self._remaining -= len(data)
        return self._encoder.encode(data)

    def request_end(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        """Bytes that end the body. Request trailers travel only when the request declared them (Go's
        `Request.Trailer`)."""
        self._expect(RequestState.BODY)
        assert self._encoder is not None and self.origin_request is not None
        declared = {name.lower() for name in self.origin_request.trailer_names}
        out = self._encoder.end([(k, v) for k, v in trailers if k.lower() in declared])
        self.request_state = RequestState.ENDED
        return out

    def request_written(self) -> None:
        """The bytes of `request_end` were written: the request is complete."""
        self._expect(RequestState.ENDED)
        self.request_state = RequestState.DONE

    def request_failed(self, error: Exception) -> None:
        """The body could not be produced or written; `request_error` keeps the cause for the 502."""
        self.request_state = RequestState.FAILED
        self.request_error = str(error)

    def _expect(self, state: RequestState) -> None:
        if self.request_state is not state:
            raise StreamConversionError(
                f"origin request is {self.request_state.value}, not {state.value}")

    # -- the response

    def _sent(self, fields: list[tuple[bytes, bytes]], end_stream: bool = False, *,
              upgraded: bool = False) -> SendHeaders:
        self.headers_sent = True
        return SendHeaders(fields=fields, end_stream=end_stream, upgraded=upgraded)

    def _expect_response(self, *states: ResponseState) -> None:
        if self.response_state not in states:
            raise OriginError(f"origin response event while the response is {self.response_state.value}")

    def informational(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> list[TunnelAction]:
        """A 1xx head. 101 to a WebSocket request starts the byte pipe (HEADERS with 200); any other is
        swallowed, as Go's transport does with 100 Continue and 103 Early Hints."""
        self._expect_response(ResponseState.WAITING)
        if status == 101 and self.websocket:
            self.response_state = ResponseState.UPGRADED
            return [self._sent(tunnel_response_headers(101, headers), upgraded=True)]
        return []

    def response_head(self, status: int, headers: Sequence[tuple[bytes, bytes]], *,
                      http10: bool = False) -> list[TunnelAction]:
        """The final response head. HEADERS go now for a HEAD request (ending the stream) and for a
        streamed response; otherwise they wait for the first bytes to leave Go's buffer."""
        self._expect_response(ResponseState.WAITING)
        origin_headers = list(headers)
        oreq = self.origin_request
        added_gzip = oreq is not None and oreq.added_accept_encoding
        if should_gunzip(added_gzip, status, origin_headers, head=self.head):
            origin_headers = strip_gzip_headers(origin_headers)
            self._gunzip = Gunzipper()
        self._fields = tunnel_response_headers(status, origin_headers, head=self.head, http10=http10)
        if self.head:
            self.response_state = ResponseState.HEAD_ONLY
            return [self._sent(self._fields, end_stream=True)]
        self.response_state = ResponseState.BODY
        self._buffer = ResponseBuffer(streamed=streams_response(origin_headers))
        if not self._buffer.headers_held:
            return [self._sent(self._fields)]
        return []

    def response_data(self, data: bytes) -> list[TunnelAction]:
        """Body bytes from the origin (gunzipped when Go would); what leaves now."""
        if self.response_state is ResponseState.HEAD_ONLY:
            return []
        self._expect_response(ResponseState.BODY)
        assert self._buffer is not None
        if self._gunzip is not None:
            data = self._feed_gunzip(data)
        out = self._buffer.write(data) if data else b""
        if not out:
            return []
        actions: list[TunnelAction] = []
        if not self.headers_sent:  # Go sniffs a content-type from what leaves with them
            actions.append(self._sent(with_sniffed_type(self._fields, out)))
        actions.append(SendData(data=out))
        return actions

    def _feed_gunzip(self, data: bytes) -> bytes:
        assert self._gunzip is not None
        try:
            return self._gunzip.feed(data)
        except OriginError as exc:
            raise self.body_error(exc) from exc

    def response_end(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> list[TunnelAction]:
        """The origin's response ended (with `trailers`): the rest of the stream."""
        if self.response_state is ResponseState.HEAD_ONLY:
            self.response_state = ResponseState.DONE
            return []
        self._expect_response(ResponseState.BODY)
        assert self._buffer is not None
        if self._gunzip is not None:
            try:
                self._buffer.write(self._gunzip.finish())
            except OriginError as exc:
                raise self.body_error(exc) from exc
        self.response_state = ResponseState.DONE
        tail = self._buffer.finish()
        h2_trailers = tunnel_trailers(trailers)
        actions: list[TunnelAction] = []
        if not self.headers_sent:  # like Go's handlerDone: HEADERS end the stream when nothing follows
            nothing_follows = not tail and not h2_trailers
            actions.append(self._sent(with_sniffed_type(self._fields, tail), end_stream=nothing_follows))
            if nothing_follows:
                return actions
        if tail:
            actions.append(SendData(data=tail, end_stream=not h2_trailers))
        if h2_trailers:
            actions.append(SendTrailers(fields=h2_trailers))
        elif not tail:
            actions.append(EndStream())
        return actions

    def response_closed(self) -> list[TunnelAction]:
        """The origin closed the connection. Before the head that is an `OriginError`, in the body a
        `ResponseBodyError`; after a HEAD response's head it only makes the connection unusable."""
        if self.response_state is ResponseState.HEAD_ONLY:
            self.response_state = ResponseState.CLOSED
            return []
        if self.response_state is ResponseState.WAITING:
            raise OriginError(f"origin {self.origin} closed the connection before answering")
        self._expect_response(ResponseState.BODY)
        raise self.body_error(OriginError("unexpected EOF"))

    def body_error(self, error: OriginError) -> OriginError:
        """The error to report for `error` from the origin: a `ResponseBodyError` (in Go's words) once
        the body was being read, `error` itself before."""
        if self.response_state is not ResponseState.BODY or isinstance(error, ResponseBodyError):
            return error
        return ResponseBodyError(_go_body_error(str(error)))

    @property
    def response_complete(self) -> bool:
        """The response ended as HTTP says (a WebSocket upgrade never does)."""
        return self.response_state is ResponseState.DONE

    def reusable(self) -> bool:
        """Whether the origin connection may serve another request: the response ended, the request was
        written to its end, and its body had a framing that says where it ends (not raw)."""
        oreq = self.origin_request
        if oreq is None or not self.response_complete:
            return False
        if oreq.framing is Framing.RAW:  # read until the origin closes: nothing can follow it
            return False
        return not self.has_request_body or self.request_state is RequestState.DONE

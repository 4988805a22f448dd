"""Header rules shared by both ends of a tunnel stream (docs/protocol.md §4.1, §5.5).

- Go's header-name canonicalisation (`CanonicalMIMEHeaderKey`), which decides every name the origin sees.
- The `cf-cloudflared-response-headers` serialization: the only place an origin's response headers travel
  (one `base64(name):base64(value)` pair per value, joined by `;`, standard alphabet without padding).
- Stream classification: which kind of stream the edge opened, from its request headers.
- The response meta values (`cf-cloudflared-response-meta`).

Pure functions over `bytes`; no I/O.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import json
from collections.abc import Iterable, Sequence
from typing import Any

from tunnel_lab.wire.errors import HeaderSerializationError

RESPONSE_HEADERS = b"cf-cloudflared-response-headers"
RESPONSE_META = b"cf-cloudflared-response-meta"
REQUEST_HEADERS = b"cf-cloudflared-request-headers"  # defined upstream, never read (vectors A03)
PROXY_UPGRADE = b"cf-cloudflared-proxy-connection-upgrade"
PROXY_SRC = b"cf-cloudflared-proxy-src"
TRACING = b"cf-int-cloudflared-tracing"

META_ORIGIN = b'{"src":"origin"}'
META_CLOUDFLARED = b'{"src":"cloudflared"}'
META_FLOW_LIMITED = b'{"src":"cloudflared","flow_rate_limited":true}'

UPGRADE_WEBSOCKET = b"websocket"
UPGRADE_CONTROL = b"control-stream"
UPGRADE_CONFIGURATION = b"update-configuration"

# RFC 9110 tchar: what Go's httpguts/textproto accept in a header name.
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Excluded from the serialized response headers (lower-cased prefix test) ...
_CONTROL_PREFIXES = (b":", b"cf-int-", b"cf-cloudflared-", b"cf-proxy-")
# ... except these, which a WebSocket client needs.
_ALWAYS_SERIALIZED = frozenset({b"connection", b"upgrade", b"sec-websocket-accept"})


def as_bytes(value: bytes | str) -> bytes:
    """h2 hands out bytes, tests and JSON vectors use str: accept both (str as UTF-8)."""
    if type(value) is bytes:  # the common case, first: called for every field of every request
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


_TOKEN_BYTES = bytes(sorted(_TOKEN))


def is_token(name: bytes) -> bool:
    """True when `name` is a non-empty RFC 9110 token (a valid header field name)."""
    if not isinstance(name, bytes | bytearray):
        if isinstance(name, str):
            return False  # as before: a str's characters are never token *bytes*
        name = bytes(name)
    # translate(None, delete) keeps what is *not* a token byte: empty means all are (C speed).
    return bool(name) and not name.translate(None, _TOKEN_BYTES)


# httpguts.ValidHeaderFieldValue: any byte but a CTL, except HTAB (bytes >= 0x80 are fine).
_VALUE_BYTES = bytes(b for b in range(256) if (b >= 0x20 and b != 0x7F) or b == 0x09)


def is_valid_value(value: bytes) -> bool:
    """True when `value` may be a header field value (no control byte but HTAB, as Go's httpguts)."""
    if not isinstance(value, bytes | bytearray):
        value = bytes(value)
    # translate(None, delete) keeps only the forbidden bytes: none left means valid (C speed).
    return not value.translate(None, _VALUE_BYTES)


@functools.lru_cache(maxsize=1024)  # the same few names on every request
def canonical_header_name(name: bytes) -> bytes:
    """Go's `CanonicalMIMEHeaderKey`: `x-custom` -> `X-Custom`, `cf-connecting-ip` -> `Cf-Connecting-Ip`.

    Names holding a byte that is not a token character (or empty names) come back unchanged, as in Go.
    """
    if not is_token(name):
        return name
    out = bytearray(name)
    upper = True
    for i, b in enumerate(out):
        if upper and 0x61 <= b <= 0x7A:
            out[i] = b - 0x20
        elif not upper and 0x41 <= b <= 0x5A:
            out[i] = b + 0x20
        upper = b == 0x2D  # '-'
    return bytes(out)


def first_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of `name` (case-insensitive), like Go's `Header.Get`; None when absent."""
    name = name.lower()
    for k, v in headers:
        if as_bytes(k).lower() == name:
            return as_bytes(v)
    return None


def all_values(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of `name` (case-insensitive), in order."""
    name = name.lower()
    return [as_bytes(v) for k, v in headers if as_bytes(k).lower() == name]


# --- cf-cloudflared-response-headers ---------------------------------------------------------------

def is_serialized_response_header(name: bytes) -> bool:
    """Whether cloudflared puts a response header with this name into the serialized field
    (docs/protocol.md §5.5)."""
    low = name.lower()
    if low in _ALWAYS_SERIALIZED:
        return True
    return not low.startswith(_CONTROL_PREFIXES)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def serialize_response_headers(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Serialize response headers the way cloudflared does (docs/protocol.md §5.5).

    One `base64(name):base64(value)` pair per value, joined by `;`. Excluded names (`:*`, `cf-int-*`,
    `cf-cloudflared-*`, `cf-proxy-*`, except `connection`, `upgrade`, `sec-websocket-accept`) are dropped.
    Go serializes from a map, so all values of one name sit together; we keep the first-seen name order
    and the value order within a name (upstream's name order is random).
    """
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        name_b, value_b = as_bytes(name), as_bytes(value)
        if not is_serialized_response_header(name_b):
            continue
        grouped.setdefault(name_b, []).append(value_b)
    return b";".join(_b64(name) + b":" + _b64(value) for name, values in grouped.items() for value in values)


_B64_ALPHABET_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64_decode_raw(part: bytes, what: str) -> bytes:
    # Go's RawStdEncoding: no padding, CR/LF skipped, trailing bits not checked.
    part = part.replace(b"\r", b"").replace(b"\n", b"")
    outside = part.translate(None, _B64_ALPHABET_BYTES)  # the bytes not in the alphabet, in order
    if outside:
        bad = outside[0]
        raise HeaderSerializationError(
            f"cf-cloudflared-response-headers: {what} {part[:40]!r} holds {bytes([bad])!r}, "
            "not in the unpadded base64 alphabet")
    if len(part) % 4 == 1:
        raise HeaderSerializationError(
            f"cf-cloudflared-response-headers: {what} {part[:40]!r} "
            f"has an impossible base64 length {len(part)}")
    try:
        return binascii.a2b_base64(part + b"=" * (-len(part) % 4))  # what b64decode does, less a layer
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - excluded by the checks above
        raise HeaderSerializationError(
            f"cf-cloudflared-response-headers: bad base64 in {what}: {exc}") from exc


# Decoded values of recently seen serialized fields: an origin answers many requests with the
# same header block (it changes at most with its Date, once a second). Bounded; cleared when full.
_DECODED: dict[bytes, tuple[tuple[bytes, bytes], ...]] = {}
_DECODED_LIMIT = 512


def deserialize_response_headers(value: bytes | str) -> list[tuple[bytes, bytes]]:
    """Decode `cf-cloudflared-response-headers` like upstream's edge side does.

    Split on `;`, skip empty parts, each part must be exactly `name:value` in unpadded base64.
    Raises `HeaderSerializationError` naming the offending pair.
    """
    value = as_bytes(value)
    cached = _DECODED.get(value)
    if cached is not None:
        return list(cached)
    out = _deserialize(value)
    if len(_DECODED) >= _DECODED_LIMIT:
        _DECODED.clear()
    _DECODED[value] = tuple(out)
    return out


def _deserialize(value: bytes) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for index, pair in enumerate(value.split(b";")):
        if not pair:
            continue
        parts = pair.split(b":")
        if len(parts) != 2:
            raise HeaderSerializationError(
                f"cf-cloudflared-response-headers: pair {index} {pair[:60]!r} "
                "does not have the form name:value")
        out.append((_b64_decode_raw(parts[0], f"name of pair {index}"),
                    _b64_decode_raw(parts[1], f"value of pair {index}")))
    return out


# --- meta ------------------------------------------------------------------------------------------

_KNOWN_META: dict[bytes, dict[str, Any]] = {}  # filled below with the three values cloudflared sends


def parse_meta(value: bytes | str) -> dict[str, Any]:
    """Parse `cf-cloudflared-response-meta` (a JSON object such as `{"src":"origin"}`)."""
    known = _KNOWN_META.get(value) if isinstance(value, bytes) else None
    if known is not None:
        return dict(known)  # a fresh dict: callers may change theirs
    try:
        parsed = json.loads(as_bytes(value))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HeaderSerializationError(
            f"cf-cloudflared-response-meta {as_bytes(value)[:80]!r} is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise HeaderSerializationError(
            f"cf-cloudflared-response-meta {as_bytes(value)[:80]!r} is not a JSON object")
    return parsed


for _meta in (META_ORIGIN, META_CLOUDFLARED, META_FLOW_LIMITED):
    _KNOWN_META[_meta] = json.loads(_meta)
del _meta


# --- classification --------------------------------------------------------------------------------

class StreamType(enum.Enum):
    """What a stream the edge opened carries (docs/protocol.md §4.1)."""

    HTTP = "http"
    WEBSOCKET = "websocket"
    TCP = "tcp"
    CONTROL = "control"
    CONFIGURATION = "configuration"


def classify_stream(headers: Sequence[tuple[bytes, bytes]]) -> StreamType:
    """Classify a stream from its request headers, in cloudflared's order (docs/protocol.md §4.1).

    Values are compared exactly and only the first value of a repeated header counts (Go's `Header.Get`).
    """
    upgrade = first_value(headers, PROXY_UPGRADE)
    if upgrade == UPGRADE_CONFIGURATION:
        return StreamType.CONFIGURATION
    if upgrade == UPGRADE_WEBSOCKET:
        return StreamType.WEBSOCKET
    if first_value(headers, PROXY_SRC):
        return StreamType.TCP
    if upgrade == UPGRADE_CONTROL:
        return StreamType.CONTROL
    return StreamType.HTTP

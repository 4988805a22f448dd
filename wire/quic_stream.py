"""The QUIC tunnel protocol's stream heads: signatures, version, ConnectRequest / ConnectResponse.

Over QUIC there is no HTTP/2 inside the tunnel. Roles (docs/protocol.md, QUIC chapter): the connector
dials and opens the first bidirectional stream, the control stream, where it speaks the registration
RPC straight away (no signature). Every other stream is opened by the edge and starts with a 6-byte
signature saying what it carries:

- a *data stream* (one request): signature, the 2-byte protocol version ``01``, then one framed Cap'n
  Proto ``ConnectRequest`` (destination, type http / websocket / tcp, key-value metadata), then the
  request body. The connector answers with the same signature and version, one ``ConnectResponse``
  (an error text, metadata), then the response body. The body ends with the stream's FIN; QUIC
  streams carry no trailers.
- an *RPC stream*: the signature alone (no version), then Cap'n Proto RPC (the edge calls the
  connector's ``updateConfiguration`` and UDP session methods).

HTTP requests and responses travel as metadata: ``HttpMethod``, ``HttpHost``, ``HttpHeader:<Name>``
(one entry per value) on the request, ``HttpStatus`` and ``HttpHeader:<Name>`` on the response. This
module also translates between that metadata and the HTTP/2-style field lists the edge's proxy builds
and reads for its http2 tunnel streams, so the proxy does not care which transport carries a stream.

Bytes in, values out; no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tunnel_lab.wire.capnp import Message as CapnpMessage
from tunnel_lab.wire.capnp import MessageBuilder, MessageReader, StructBuilder, StructReader, frame_message
from tunnel_lab.wire.errors import CapnpError, ProtocolError
from tunnel_lab.wire.headers import (
    META_CLOUDFLARED,
    META_FLOW_LIMITED,
    META_ORIGIN,
    RESPONSE_HEADERS,
    RESPONSE_META,
    StreamType,
    as_bytes,
    canonical_header_name,
    classify_stream,
    first_value,
    serialize_response_headers,
)

__all__ = [
    "DATA_STREAM_SIGNATURE",
    "PROTOCOL_VERSION",
    "RPC_STREAM_SIGNATURE",
    "ConnectRequest",
    "ConnectResponse",
    "ConnectionType",
    "HttpFields",
    "QuicStreamError",
    "StreamHead",
    "StreamHeadReader",
    "StreamKind",
    "connect_request_from_headers",
    "connect_request_message",
    "connect_response_for_http",
    "connect_response_message",
    "decode_connect_request",
    "decode_connect_response",
    "encode_connect_request",
    "encode_connect_response",
    "headers_from_connect_response",
    "http_fields_from_connect_request",
    "rpc_stream_preamble",
]

# tunnelrpc/quic/protocol.go: the first six bytes of an edge-opened stream.
DATA_STREAM_SIGNATURE = bytes((0x0A, 0x36, 0xCD, 0x12, 0xA1, 0x3E))
RPC_STREAM_SIGNATURE = bytes((0x52, 0xBB, 0x82, 0x5C, 0xDB, 0x65))
SIGNATURE_LENGTH = 6
PROTOCOL_VERSION = b"01"  # after a data stream's signature; cloudflared reads it and ignores its value

# Metadata keys (connection/quic_connection.go).
HTTP_METHOD = "HttpMethod"
HTTP_HOST = "HttpHost"
HTTP_STATUS = "HttpStatus"
HTTP_HEADER = "HttpHeader"
FLOW_ID = "FlowID"
FLOW_RATE_LIMITED = "FlowConnectRateLimited"

#: A stream head bigger than this is refused (a request's metadata is its header block: the lab's
#: http2 limits are far smaller).
DEFAULT_MAX_HEAD_BYTES = 1024 * 1024

# Struct layouts (quic_metadata_protocol schema): ConnectRequest = 1 data word (type: u16 at byte 0),
# pointers dest, metadata; Metadata = pointers key, val; ConnectResponse = pointers error, metadata.
_REQUEST_DATA_WORDS, _REQUEST_POINTERS = 1, 2
_METADATA_DATA_WORDS, _METADATA_POINTERS = 0, 2
_RESPONSE_DATA_WORDS, _RESPONSE_POINTERS = 0, 2


class QuicStreamError(ProtocolError):
    """A QUIC tunnel stream's head is malformed: signature, version or Cap'n Proto message."""


class ConnectionType(enum.IntEnum):
    """What a data stream carries (the schema's ConnectionType enum)."""

    HTTP = 0
    WEBSOCKET = 1
    TCP = 2


class StreamKind(enum.Enum):
    """What an edge-opened stream carries, from its signature."""

    DATA = "data"
    RPC = "rpc"


Metadata = tuple[tuple[str, str], ...]


def metadata_value(metadata: Metadata, key: str) -> str | None:
    """The value of `key` in a stream head's metadata; the last one wins when repeated."""
    found = None
    for k, v in metadata:
        if k == key:
            found = v
    return found


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectRequest:
    """The head of a data stream, edge -> connector."""

    dest: str
    type: ConnectionType
    metadata: Metadata = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", ConnectionType(self.type))
        object.__setattr__(self, "metadata", tuple((str(k), str(v)) for k, v in self.metadata))

    def get(self, key: str) -> str | None:
        """The value of `key`; the last one wins when repeated, as Go's MetadataMap builds it."""
        return metadata_value(self.metadata, key)


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectResponse:
    """The head of a data stream's answer, connector -> edge. A non-empty `error` is a failure."""

    error: str = ""
    metadata: Metadata = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", tuple((str(k), str(v)) for k, v in self.metadata))

    def get(self, key: str) -> str | None:
        """The value of `key` (the last one when repeated)."""
        return metadata_value(self.metadata, key)


# ---- Cap'n Proto -----------------------------------------------------------------------------------

def _set_text(sb: StructBuilder, index: int, value: str) -> None:
    # Go's capnp writes an empty Text as a null pointer. Values are byte strings in Go; header bytes
    # that are not UTF-8 travel unchanged (surrogateescape), as Go would send them.
    if value:
        sb.set_data(index, value.encode("utf-8", "surrogateescape") + b"\0")


def _get_text(reader: StructReader, index: int, what: str) -> str:
    raw = reader.data(index, what)
    if not raw:
        return ""
    if raw[-1] != 0:
        raise QuicStreamError(f"{what}: Text is not NUL-terminated")
    return raw[:-1].decode("utf-8", "surrogateescape")


def _set_metadata(sb: StructBuilder, index: int, metadata: Metadata) -> None:
    if not metadata:
        return
    elements = sb.init_struct_list(index, len(metadata), _METADATA_DATA_WORDS, _METADATA_POINTERS)
    for element, (key, value) in zip(elements, metadata, strict=True):
        _set_text(element, 0, key)
        _set_text(element, 1, value)


def _get_metadata(reader: StructReader, index: int, what: str) -> Metadata:
    return tuple((_get_text(item, 0, f"{what}[{i}].key"), _get_text(item, 1, f"{what}[{i}].val"))
                 for i, item in enumerate(reader.struct_list(index, what)))


def connect_request_message(request: ConnectRequest) -> bytes:
    """The framed Cap'n Proto message of a ConnectRequest (no signature)."""
    msg = MessageBuilder()
    root = msg.init_root(_REQUEST_DATA_WORDS, _REQUEST_POINTERS)
    _set_text(root, 0, request.dest)
    root.set_u16(0, int(request.type))
    _set_metadata(root, 1, request.metadata)
    return frame_message(msg.segments())


def connect_response_message(response: ConnectResponse) -> bytes:
    """The framed Cap'n Proto message of a ConnectResponse (no signature)."""
    msg = MessageBuilder()
    root = msg.init_root(_RESPONSE_DATA_WORDS, _RESPONSE_POINTERS)
    _set_text(root, 0, response.error)
    _set_metadata(root, 1, response.metadata)
    return frame_message(msg.segments())


def encode_connect_request(request: ConnectRequest) -> bytes:
    """Everything the edge writes before a request body: signature, version, ConnectRequest."""
    return DATA_STREAM_SIGNATURE + PROTOCOL_VERSION + connect_request_message(request)


def encode_connect_response(response: ConnectResponse) -> bytes:
    """Everything the connector writes before a response body: signature, version, ConnectResponse."""
    return DATA_STREAM_SIGNATURE + PROTOCOL_VERSION + connect_response_message(response)


def rpc_stream_preamble() -> bytes:
    """What starts an RPC stream (the signature; RPC streams carry no version)."""
    return RPC_STREAM_SIGNATURE


def decode_connect_request(segments: Sequence[bytes]) -> ConnectRequest:
    """A ConnectRequest from a de-framed message. Raises QuicStreamError."""
    try:
        root = CapnpMessage(segments).root()
        raw_type = root.u16(0)
        try:
            kind = ConnectionType(raw_type)
        except ValueError:
            raise QuicStreamError(f"ConnectRequest.type {raw_type} is not http (0), websocket (1) "
                                  "or tcp (2)") from None
        return ConnectRequest(dest=_get_text(root, 0, "ConnectRequest.dest"), type=kind,
                              metadata=_get_metadata(root, 1, "ConnectRequest.metadata"))
    except CapnpError as exc:
        raise QuicStreamError(f"malformed ConnectRequest: {exc}") from exc


def decode_connect_response(segments: Sequence[bytes]) -> ConnectResponse:
    """A ConnectResponse from a de-framed message. Raises QuicStreamError."""
    try:
        root = CapnpMessage(segments).root()
        return ConnectResponse(error=_get_text(root, 0, "ConnectResponse.error"),
                               metadata=_get_metadata(root, 1, "ConnectResponse.metadata"))
    except CapnpError as exc:
        raise QuicStreamError(f"malformed ConnectResponse: {exc}") from exc


# ---- reading a stream head -------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class StreamHead:
    """A stream's head once whole: its kind, version, message (data streams) and the bytes after it."""

    kind: StreamKind
    version: bytes  # b"" on an RPC stream
    message: ConnectRequest | ConnectResponse | None  # None on an RPC stream
    rest: bytes  # body bytes (data stream) or RPC bytes that arrived with the head


class StreamHeadReader:
    """Incremental reader of a stream head: `feed()` bytes until `head()` returns one.

    `expect` says which message a data stream carries here: "request" on the connector (the edge opened
    the stream) or "response" on the edge. `allow_rpc` accepts RPC streams (the connector's side).
    Raises QuicStreamError for an unknown signature, a data stream where it is not allowed, a version
    that is not two ASCII digits, a malformed or oversized message.
    """

    def __init__(self, *, expect: str, allow_rpc: bool = False,
                 max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> None:
        if expect not in ("request", "response"):
            raise ValueError(f"expect is 'request' or 'response', not {expect!r}")
        self.expect = expect
        self.allow_rpc = allow_rpc
        self._buf = bytearray()
        self._kind: StreamKind | None = None
        self._version = b""
        self._messages = MessageReader(max_message_bytes=max_head_bytes)
        self._fed = bytearray()  # bytes given to the de-framer (the head is small, so is this)
        self._head: StreamHead | None = None

    def feed(self, data: bytes) -> StreamHead | None:
        """Take stream bytes; the head once it is whole (later calls return it again)."""
        if self._head is not None:
            raise RuntimeError("the stream head is already read; the rest is the stream's body")
        if self._kind is None:
            self._buf += data
            if len(self._buf) < SIGNATURE_LENGTH:
                return None
            self._kind = self._signature(bytes(self._buf[:SIGNATURE_LENGTH]))
            data, self._buf = bytes(self._buf[SIGNATURE_LENGTH:]), bytearray()
            if self._kind is StreamKind.RPC:
                self._head = StreamHead(kind=StreamKind.RPC, version=b"", message=None, rest=data)
                return self._head
        if not self._version:
            self._buf += data
            if len(self._buf) < len(PROTOCOL_VERSION):
                return None
            version = bytes(self._buf[:len(PROTOCOL_VERSION)])
            if not version.isdigit():
                raise QuicStreamError(f"data stream version {version!r} is not two digits")
            self._version = version
            data, self._buf = bytes(self._buf[len(PROTOCOL_VERSION):]), bytearray()
        try:
            self._fed += data
            self._messages.feed(data)
            segments = self._messages.next_message()
        except CapnpError as exc:
            raise QuicStreamError(f"malformed {self._what}: {exc}") from exc
        if segments is None:
            return None
        # What the de-framer still holds after the message is the start of the body.
        left = self._messages.buffered
        rest = bytes(self._fed[len(self._fed) - left:]) if left else b""
        self._fed = bytearray()
        message = (decode_connect_request(segments) if self.expect == "request"
                   else decode_connect_response(segments))
        self._head = StreamHead(kind=StreamKind.DATA, version=self._version, message=message, rest=rest)
        return self._head

    @property
    def _what(self) -> str:
        return "ConnectRequest" if self.expect == "request" else "ConnectResponse"

    def _signature(self, signature: bytes) -> StreamKind:
        if signature == DATA_STREAM_SIGNATURE:
            return StreamKind.DATA
        if signature == RPC_STREAM_SIGNATURE:
            if not self.allow_rpc:
                raise QuicStreamError("an RPC stream signature where only data streams are expected")
            return StreamKind.RPC
        raise QuicStreamError(f"unknown stream signature {signature.hex()} (data is "
                              f"{DATA_STREAM_SIGNATURE.hex()}, RPC is {RPC_STREAM_SIGNATURE.hex()})")


# ---- translation: HTTP/2-style field lists <-> metadata --------------------------------------------

def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _raw(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def connect_request_from_headers(headers: Sequence[tuple[bytes, bytes]], *, has_body: bool) -> ConnectRequest:
    """The ConnectRequest for a stream the edge would open over http2 with these request fields.

    HTTP and WebSocket: `dest` is the URL (scheme, authority, path), `HttpMethod` and `HttpHost` come
    from the pseudo-headers and every other field becomes `HttpHeader:<Canonical-Name>` (one entry per
    value, order kept). cloudflared builds the origin request from these alone, and gives it no body
    unless it has a Content-Length or chunked Transfer-Encoding: a body without a length is announced
    as `Transfer-Encoding: chunked` (which an http2 stream need not say). TCP (a WARP stream): `dest` is
    the authority and no metadata is sent.
    """
    kind = classify_stream(headers)
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        name_b, value_b = as_bytes(name).lower(), as_bytes(value)
        if name_b.startswith(b":"):
            pseudo.setdefault(name_b, value_b)
        else:
            fields.append((name_b, value_b))
    authority = pseudo.get(b":authority", b"")
    if kind is StreamType.TCP:
        return ConnectRequest(dest=_text(authority), type=ConnectionType.TCP)
    if kind not in (StreamType.HTTP, StreamType.WEBSOCKET):
        raise QuicStreamError(f"a {kind.value} stream has no QUIC data-stream form")
    scheme = pseudo.get(b":scheme", b"http")
    path = pseudo.get(b":path", b"/")
    dest = _text(scheme + b"://" + authority + path)
    metadata: list[tuple[str, str]] = []
    for name, value in fields:
        metadata.append((f"{HTTP_HEADER}:{_text(canonical_header_name(name))}", _text(value)))
    websocket = kind is StreamType.WEBSOCKET
    if (has_body and not websocket and first_value(fields, b"content-length") is None
            and first_value(fields, b"transfer-encoding") is None):
        metadata.append((f"{HTTP_HEADER}:Transfer-Encoding", "chunked"))
    metadata.append((HTTP_HOST, _text(authority)))
    metadata.append((HTTP_METHOD, _text(pseudo.get(b":method", b"GET"))))
    return ConnectRequest(dest=dest, type=ConnectionType.WEBSOCKET if websocket else ConnectionType.HTTP,
                          metadata=tuple(metadata))


def headers_from_connect_response(response: ConnectResponse, *,
                                  request_type: ConnectionType) -> list[tuple[bytes, bytes]]:
    """The HTTP/2-style response fields cloudflared would have sent over http2 for this answer.

    So the edge's response decoding (wire.eyeball.tunnel_response) serves both transports: `:status`
    from `HttpStatus` (a WebSocket's 101 becomes 200, as over http2), the origin's fields serialized
    into `cf-cloudflared-response-headers`, `content-length` repeated at the top, and the response
    meta: `origin` for an answer, `cloudflared` for an error (with `flow_rate_limited` when the
    connector says so). A TCP stream's success is a bare 200. Raises QuicStreamError for a status that
    is not three digits.
    """
    status_text = response.get(HTTP_STATUS)
    if response.error:
        status = status_text if status_text is not None else "502"
        limited = response.get(FLOW_RATE_LIMITED) == "true"
        return [(b":status", _checked_status(status)),
                (RESPONSE_META, META_FLOW_LIMITED if limited else META_CLOUDFLARED)]
    if request_type is ConnectionType.TCP:
        return [(b":status", b"200")]
    if status_text is None:
        raise QuicStreamError("ConnectResponse without an error has no HttpStatus")
    status_b = _checked_status(status_text)
    if status_b == b"101" and request_type is ConnectionType.WEBSOCKET:
        status_b = b"200"
    prefix = HTTP_HEADER + ":"
    origin = [(_raw(key[len(prefix):]), _raw(value)) for key, value in response.metadata
              if key.startswith(prefix)]
    out = [(b":status", status_b)]
    length = first_value(origin, b"content-length")
    if length is not None:
        out.append((b"content-length", length))
    out.append((RESPONSE_HEADERS, serialize_response_headers(origin)))
    out.append((RESPONSE_META, META_ORIGIN))
    return out


def _checked_status(text: str) -> bytes:
    raw = _raw(text)
    if len(raw) != 3 or not raw.isdigit():
        raise QuicStreamError(f"ConnectResponse HttpStatus {text[:40]!r} is not a 3-digit status")
    return raw


# ---- translation for the connector's side ----------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class HttpFields:
    """An HTTP request as a ConnectRequest describes it (the connector's view)."""

    method: str
    host: str
    dest: str
    headers: tuple[tuple[bytes, bytes], ...]  # canonical names, in metadata order
    websocket: bool


def http_fields_from_connect_request(request: ConnectRequest) -> HttpFields:
    """Method, host, URL and header fields of an http or websocket ConnectRequest.

    Like cloudflared: a `HttpHeader:` key must hold exactly one more colon-free name. Raises
    QuicStreamError for a TCP request or a malformed key.
    """
    if request.type is ConnectionType.TCP:
        raise QuicStreamError("a tcp ConnectRequest carries no HTTP request")
    headers: list[tuple[bytes, bytes]] = []
    for key, value in request.metadata:
        if HTTP_HEADER not in key:
            continue
        parts = key.split(":")
        if len(parts) != 2:
            raise QuicStreamError(f"ConnectRequest metadata key {key[:80]!r} is not HttpHeader:<Name>")
        headers.append((_raw(parts[1]), _raw(value)))
    return HttpFields(method=request.get(HTTP_METHOD) or "", host=request.get(HTTP_HOST) or "",
                      dest=request.dest, headers=tuple(headers),
                      websocket=request.type is ConnectionType.WEBSOCKET)


def connect_response_for_http(status: int, headers: Iterable[tuple[bytes, bytes]]) -> ConnectResponse:
    """The ConnectResponse a connector sends for an origin's response head (`HttpStatus` first, then
    one `HttpHeader:<Name>` per value)."""
    metadata = [(HTTP_STATUS, str(int(status)))]
    metadata += [(f"{HTTP_HEADER}:{_text(as_bytes(k))}", _text(as_bytes(v))) for k, v in headers]
    return ConnectResponse(metadata=tuple(metadata))

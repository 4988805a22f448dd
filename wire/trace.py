"""The protocol trace's record builders (docs/trace.md): bytes, frames and messages in, JSON-ready dicts out.

Sans-I/O: no trio, no logging, no files. The shells hand over what they already have (plaintext HTTP/2
bytes as they were read or written, QUIC stream bytes, HTTP/1.1 heads, TLS parameters); the trace
writer (`transport.trace`) runs these builders off the hot path and writes one JSON line per record.

Redaction is part of building, not an afterthought: `TraceRedactor` blanks the values of credential
headers (Authorization, Cookie, Set-Cookie, Cf-Access-*, ...) and the tunnel secret of a registration,
and its `record` pass applies the lab's one rule (`wire.redact`) to every string of a finished record,
so a secret registered with it (the tunnel secret, its base64 forms, a token) never reaches a trace.
Bodies are summarised (`body_summary`): length, SHA-256 and the first bytes, never the whole body;
the control stream's bytes get no "first bytes" at all (they carry the tunnel secret).
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hpack
import hpack.exceptions

from tunnel_lab.wire.capnp import MessageReader
from tunnel_lab.wire.errors import TunnelLabError
from tunnel_lab.wire.headers import (
    RESPONSE_HEADERS,
    deserialize_response_headers,
)
from tunnel_lab.wire.redact import REDACTED, Redactor
from tunnel_lab.wire.registration import (
    METHOD_NAMES,
    REGISTRATION_SERVER_ID,
    ConnectionDetails,
    RegisterConnectionParams,
    RegistrationError,
    RegistrationResult,
    read_register_params,
    read_register_results,
    read_update_configuration_params,
)

__all__ = [
    "HEAD_BYTES",
    "SENSITIVE_HEADERS",
    "VERSION",
    "H2FrameDecoder",
    "QuicStreamDecoder",
    "RpcDecoder",
    "TraceRedactor",
    "body_summary",
    "datagram_record",
    "http1_head_record",
    "registration_params_record",
    "registration_result_record",
    "tls_record",
]

#: The record format's version: the `"v"` field of every record. Bump it when a field changes meaning
#: or disappears (adding fields or kinds does not); docs/trace.md says what each version holds.
VERSION = 1
HEAD_BYTES = 32  # first bytes of a body shown in a summary
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: Header names whose values are credentials: always `<redacted>` in a trace (lower case).
SENSITIVE_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "cf-access-token",
    "cf-access-client-secret", "cf-access-jwt-assertion", "cf-authorization", "x-api-key", "x-auth-token",
})
_SENSITIVE_PREFIXES = ("cf-access-",)

FRAME_TYPES = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS", 5: "PUSH_PROMISE",
               6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE", 9: "CONTINUATION"}
ERROR_CODES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
               4: "SETTINGS_TIMEOUT", 5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM",
               8: "CANCEL", 9: "COMPRESSION_ERROR", 10: "CONNECT_ERROR", 11: "ENHANCE_YOUR_CALM",
               12: "INADEQUATE_SECURITY", 13: "HTTP_1_1_REQUIRED"}
SETTINGS_NAMES = {1: "HEADER_TABLE_SIZE", 2: "ENABLE_PUSH", 3: "MAX_CONCURRENT_STREAMS",
                  4: "INITIAL_WINDOW_SIZE", 5: "MAX_FRAME_SIZE", 6: "MAX_HEADER_LIST_SIZE",
                  8: "ENABLE_CONNECT_PROTOCOL", 9: "NO_RFC7540_PRIORITIES"}
_FLAG_NAMES = {
    "DATA": {0x1: "END_STREAM", 0x8: "PADDED"},
    "HEADERS": {0x1: "END_STREAM", 0x4: "END_HEADERS", 0x8: "PADDED", 0x20: "PRIORITY"},
    "SETTINGS": {0x1: "ACK"}, "PING": {0x1: "ACK"},
    "PUSH_PROMISE": {0x4: "END_HEADERS", 0x8: "PADDED"}, "CONTINUATION": {0x4: "END_HEADERS"},
}
_FRAME_HEADER = struct.Struct(">HBBBL")  # length is 24 bits: 16 + 8
MAX_BUFFER = 1 << 24  # a "frame" announcing more than this is not HTTP/2: stop decoding


def error_name(code: int) -> str:
    """An HTTP/2 error code's name (`0x..` for one RFC 9113 does not define)."""
    return ERROR_CODES.get(code, f"0x{code:x}")


# ---- redaction ---------------------------------------------------------------------------------------

class TraceRedactor:
    """Redaction for trace records: credential headers blanked, then `wire.redact`'s rule on every string."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._rule = Redactor(secrets)

    def add(self, secret: str) -> None:
        """Redact this value (and its base64 forms) from every later record."""
        self._rule.add(secret)

    @staticmethod
    def sensitive(name: str) -> bool:
        """Is a header of this name a credential?"""
        name = name.lower()
        return name in SENSITIVE_HEADERS or name.startswith(_SENSITIVE_PREFIXES)

    def headers(self, fields: Iterable[tuple[bytes | str, bytes | str]]) -> list[list[str]]:
        """Header fields as `[name, value]` text pairs, credentials `<redacted>`."""
        out = []
        for raw_name, raw_value in fields:
            name = _text(raw_name)
            out.append([name, REDACTED if self.sensitive(name) else self._rule.text(_text(raw_value))])
        return out

    def text(self, text: str) -> str:
        """`wire.redact`'s rule on one string."""
        return self._rule.text(text)

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """The whole record through the rule (strings, and values of keys named like secrets)."""
        redacted: dict[str, Any] = self._rule.value(record)
        return redacted


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes | bytearray) else str(value)


def head_text(data: bytes) -> str:
    """The first `HEAD_BYTES` of a body as printable text (non-ASCII bytes as `\\xNN`)."""
    return bytes(data[:HEAD_BYTES]).decode("ascii", "backslashreplace")


def body_summary(data: bytes, *, show_head: bool = True) -> dict[str, Any]:
    """A body summarised: `length`, `sha256` and (unless `show_head` is false) its first bytes."""
    summary: dict[str, Any] = {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if show_head:
        summary["head"] = head_text(data)
    return summary


class BodyDigest:
    """A body summary built chunk by chunk (`add`, then `summary`)."""

    __slots__ = ("_hash", "_head", "length")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._head = b""
        self.length = 0

    def add(self, data: bytes) -> None:
        self._hash.update(data)
        if len(self._head) < HEAD_BYTES:
            self._head += bytes(data[:HEAD_BYTES - len(self._head)])
        self.length += len(data)

    def summary(self, *, show_head: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"length": self.length, "sha256": self._hash.hexdigest()}
        if show_head:
            out["head"] = head_text(self._head)
        return out


# ---- TLS, HTTP/1.1 -----------------------------------------------------------------------------------

def _name_text(name: Any) -> str | None:
    """`getpeercert()`'s subject/issuer (tuple of RDNs of (key, value) pairs) as `CN=x, O=y`."""
    if not name:
        return None
    parts = []
    for rdn in name:
        for key, value in rdn:
            short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                     "countryName": "C"}.get(key, key)
            parts.append(f"{short}={value}")
    return ", ".join(parts)


def tls_record(*, version: str | None, cipher: tuple[str, str, int] | None, alpn: str | None,
               sni: str | None, peer_cert: dict[str, Any] | None = None, side: str) -> dict[str, Any]:
    """A `tls.handshake` record: what `ssl` says about a finished handshake (`side`: client/server)."""
    record: dict[str, Any] = {"kind": "tls.handshake", "side": side, "version": version,
                              "cipher": cipher[0] if cipher else None, "alpn": alpn, "sni": sni}
    if peer_cert:
        record["peer_subject"] = _name_text(peer_cert.get("subject"))
        record["peer_issuer"] = _name_text(peer_cert.get("issuer"))
        sans = peer_cert.get("subjectAltName")
        if sans:
            record["peer_san"] = [value for _, value in sans]
    return record


def http1_head_record(kind: str, redactor: TraceRedactor, *, method: str | None = None,
                      target: str | None = None, status: int | None = None,
                      headers: Sequence[tuple[bytes | str, bytes | str]] = (),
                      http_version: str = "1.1") -> dict[str, Any]:
    """An HTTP/1.1 request head (`method`, `target`) or response head (`status`), headers redacted."""
    record: dict[str, Any] = {"kind": kind, "http_version": http_version}
    if method is not None:
        record["method"] = method
        record["target"] = redactor.text(target or "")
    if status is not None:
        record["status"] = status
    record["headers"] = redactor.headers(headers)
    return record


def http1_head_fields(head: bytes, redactor: TraceRedactor) -> dict[str, Any]:
    """The fields of a raw HTTP/1.1 request head (`method`, `target`, `http_version`, `headers`)."""
    text = bytes(head).split(b"\r\n\r\n", 1)[0].decode("latin-1")
    start, *lines = text.split("\r\n")
    method, _, rest = start.partition(" ")
    target, _, version = rest.rpartition(" ")
    fields = [tuple(line.split(":", 1)) for line in lines if ":" in line]
    return {"method": method, "target": redactor.text(target),
            "http_version": version.removeprefix("HTTP/"),
            "headers": redactor.headers((name, value.strip()) for name, value in fields),
            "head_length": len(head)}


# ---- Cap'n Proto RPC ---------------------------------------------------------------------------------

def registration_params_record(params: RegisterConnectionParams) -> dict[str, Any]:
    """registerConnection's params as fields; the tunnel secret is never included (its length is)."""
    client = params.options.client
    return {
        "auth": {"account_tag": params.auth.account_tag, "tunnel_secret": REDACTED,
                 "tunnel_secret_length": len(params.auth.tunnel_secret)},
        "tunnel_id": str(params.tunnel_id),
        "conn_index": params.conn_index,
        "options": {
            "client": {"client_id": _uuid_text(client.client_id), "features": list(client.features),
                       "version": client.version, "arch": client.arch},
            "origin_local_ip": params.options.origin_local_ip.hex(),
            "replace_existing": params.options.replace_existing,
            "compression_quality": params.options.compression_quality,
            "num_previous_attempts": params.options.num_previous_attempts,
        },
    }


def registration_result_record(result: RegistrationResult) -> dict[str, Any]:
    """registerConnection's result: the connection details or the error."""
    if isinstance(result, ConnectionDetails):
        return {"connection_details": {"uuid": str(result.uuid), "location_name": result.location_name,
                                       "tunnel_is_remotely_managed": result.tunnel_is_remotely_managed}}
    assert isinstance(result, RegistrationError)
    return {"error": {"cause": result.cause, "retry_after_ns": result.retry_after_ns,
                      "should_retry": result.should_retry}}


def _uuid_text(raw: bytes) -> str:
    return str(uuid.UUID(bytes=bytes(raw))) if len(raw) == 16 else bytes(raw).hex()


def _config_value(config: bytes) -> Any:
    try:
        return json.loads(config)
    except ValueError:
        return {"undecodable": len(config)}


def _method_name(interface_id: int, method_id: int) -> tuple[str, str]:
    """(interface, method) names for a Call."""
    from tunnel_lab.wire.session_rpc import (
        CLOUDFLARED_SERVER_ID,
        CONFIGURATION_MANAGER_ID,
        METHODS,
        SESSION_MANAGER_ID,
    )

    if interface_id == REGISTRATION_SERVER_ID:
        return "RegistrationServer", METHOD_NAMES.get(method_id, f"method {method_id}")
    interfaces = {SESSION_MANAGER_ID: "SessionManager", CONFIGURATION_MANAGER_ID: "ConfigurationManager",
                  CLOUDFLARED_SERVER_ID: "CloudflaredServer"}
    name = METHODS.get((interface_id, method_id), f"method {method_id}")
    return interfaces.get(interface_id, f"0x{interface_id:016x}"), name


@dataclass
class RpcDecoder:
    """One RPC conversation (both directions): Cap'n Proto bytes -> `rpc.message` records.

    Calls go one way and their Returns the other, so one decoder serves both directions
    (`feed(direction, data)`) and remembers which method each question asked, to decode its results.
    A decoding failure is reported once as a record and ends decoding of that conversation (the trace
    never breaks the tunnel); the shells' own decoders decide what the bytes mean for the connection.
    """

    _readers: dict[str, MessageReader] = field(default_factory=dict)
    _questions: dict[tuple[str, int], str] = field(default_factory=dict)
    broken: bool = False

    def feed(self, direction: str, data: bytes) -> list[dict[str, Any]]:
        """Records for the whole messages `data` completes (`direction`: "in" or "out")."""
        if self.broken:
            return []
        reader = self._readers.setdefault(direction, MessageReader())
        out: list[dict[str, Any]] = []
        try:
            reader.feed(data)
            while (segments := reader.next_message()) is not None:
                out.append(self._message(direction, segments))
        except (TunnelLabError, ValueError, IndexError, struct.error) as exc:
            self.broken = True
            out.append({"kind": "rpc.undecodable", "error": str(exc)})
        return out

    def _message(self, direction: str, segments: list[bytes]) -> dict[str, Any]:
        from tunnel_lab.wire import rpc

        msg = rpc.decode_rpc_message(segments)
        size = sum(len(s) for s in segments)
        record: dict[str, Any] = {"kind": "rpc.message", "size": size}
        if isinstance(msg, rpc.BootstrapMessage):
            record.update(message="bootstrap", question=msg.question_id)
            self._questions[(direction, msg.question_id)] = "bootstrap"
        elif isinstance(msg, rpc.CallMessage):
            interface, method = _method_name(msg.interface_id, msg.method_id)
            target = (f"importedCap({msg.target.cap_id})" if isinstance(msg.target, rpc.ImportedCap)
                      else f"promisedAnswer({msg.target.question_id})")
            record.update(message="call", question=msg.question_id, interface=interface, method=method,
                          target=target)
            self._questions[(direction, msg.question_id)] = method
            params = self._params(msg, method)
            if params is not None:
                record["params"] = params
        elif isinstance(msg, rpc.ReturnMessage):
            asker = "out" if direction == "in" else "in"
            method = self._questions.get((asker, msg.answer_id), "?")
            record.update(message="return", answer=msg.answer_id, method=method, result_kind=msg.kind)
            if msg.exception is not None:
                record["exception"] = msg.exception.reason
            elif msg.results is not None and method == "registerConnection":
                record["results"] = registration_result_record(
                    read_register_results(msg.results.struct("registerConnection.results")))
            elif msg.results is not None and method == "bootstrap":
                record["capabilities"] = [f"{d.kind}({d.id})" for d in msg.results.cap_table]
        elif isinstance(msg, rpc.FinishMessage):
            record.update(message="finish", question=msg.question_id,
                          release_result_caps=msg.release_result_caps)
            self._questions.pop((direction, msg.question_id), None)
        elif isinstance(msg, rpc.ReleaseMessage):
            record.update(message="release", id=msg.id, reference_count=msg.reference_count)
        elif isinstance(msg, rpc.AbortMessage):
            record.update(message="abort", reason=msg.exception.reason)
        elif isinstance(msg, rpc.UnimplementedMessage):
            record.update(message="unimplemented")
        else:
            record.update(message=f"tag {msg.tag}")
        return record

    @staticmethod
    def _params(msg: Any, method: str) -> dict[str, Any] | None:
        if method == "registerConnection":
            return registration_params_record(read_register_params(
                msg.params.struct("registerConnection.params")))
        if method == "updateLocalConfiguration":
            what = "updateLocalConfiguration.params"
            config = read_update_configuration_params(msg.params.struct(what), what)
            return {"config": _config_value(config), "config_length": len(config)}
        return None


# ---- HTTP/2 ------------------------------------------------------------------------------------------

class H2FrameDecoder:
    """One direction of one HTTP/2 connection: plaintext bytes -> `h2.frame` records.

    Header blocks are decoded with an HPACK decoder of its own (it sees every block in order, so its
    dynamic table follows the sender's), `cf-cloudflared-response-headers` is decoded into the origin's
    fields, credentials are redacted, DATA is counted and digested per stream (an `h2.body` record at
    END_STREAM or RST_STREAM), and DATA on the control stream (stream 1) goes to `rpc`. `preface`: this
    direction starts with the client connection preface. Undecodable input is reported once as an
    `h2.undecodable` record and decoding of this direction stops.
    """

    def __init__(self, *, direction: str, redactor: TraceRedactor, preface: bool = False,
                 rpc: RpcDecoder | None = None, rays: dict[int, str] | None = None,
                 control_stream: int = 1) -> None:
        self.direction = direction
        self.redactor = redactor
        self.rpc = rpc if rpc is not None else RpcDecoder()
        self.control_stream = control_stream
        self._preface = CLIENT_PREFACE if preface else b""
        self._buf = bytearray()
        self._hpack = hpack.Decoder()
        self._hpack.max_allowed_table_size = 1 << 20
        self._hpack.max_header_list_size = 1 << 24
        # HEADERS awaiting CONTINUATION: its record, the block so far, the records held back until the block
        # is whole (so the HEADERS record, with its decoded fields and ray, comes out first)
        self._block: tuple[dict[str, Any], bytearray, list[dict[str, Any]]] | None = None
        self._bodies: dict[int, BodyDigest] = {}
        # stream -> cf-ray, learnt from request headers (shared by both directions of a connection)
        self.rays: dict[int, str] = rays if rays is not None else {}
        self.broken = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Records for every whole frame `data` completes."""
        if self.broken:
            return []
        self._buf += data
        out: list[dict[str, Any]] = []
        try:
            if self._preface:
                if len(self._buf) < len(self._preface):
                    return out
                if bytes(self._buf[:len(self._preface)]) != self._preface:
                    raise ValueError("no HTTP/2 client preface")
                del self._buf[:len(self._preface)]
                self._preface = b""
                out.append({"kind": "h2.preface"})
            while len(self._buf) >= 9:
                high, low, type_, flags, stream = _FRAME_HEADER.unpack_from(self._buf, 0)
                length = (high << 8) | low
                if length > MAX_BUFFER:
                    raise ValueError(f"frame of {length} bytes announced")
                if len(self._buf) < 9 + length:
                    break
                payload = bytes(self._buf[9:9 + length])
                del self._buf[:9 + length]
                out.extend(self._frame(type_, flags, stream & 0x7FFFFFFF, payload))
        except (ValueError, IndexError, struct.error, hpack.exceptions.HPACKError) as exc:
            self.broken = True
            out.append({"kind": "h2.undecodable", "error": str(exc) or type(exc).__name__})
        return out

    def _frame(self, type_: int, flags: int, stream: int, payload: bytes) -> list[dict[str, Any]]:
        name = FRAME_TYPES.get(type_, f"0x{type_:x}")
        names = _FLAG_NAMES.get(name, {})
        record: dict[str, Any] = {"kind": "h2.frame", "type": name, "stream": stream, "length": len(payload),
                                  "flags": [names[bit] for bit in sorted(names) if flags & bit]}
        out = [record]
        end_stream = bool(flags & 0x1) and name in ("DATA", "HEADERS")
        if name == "DATA":
            body = _unpad(payload, flags)
            record["data_length"] = len(body)
            if stream == self.control_stream:
                out.extend(self._with_stream(self.rpc.feed(self.direction, body), stream))
            else:
                self._bodies.setdefault(stream, BodyDigest()).add(body)
        elif name in ("HEADERS", "PUSH_PROMISE"):
            block = _unpad(payload, flags)
            if name == "HEADERS" and flags & 0x20:
                block = block[5:]
            elif name == "PUSH_PROMISE":
                record["promised_stream"] = int.from_bytes(block[:4], "big") & 0x7FFFFFFF
                block = block[4:]
            if flags & 0x4:
                self._decode_block(record, stream, block)
            else:
                self._block = (record, bytearray(block), out)
                return []
        elif name == "CONTINUATION":
            if self._block is None:
                raise ValueError("CONTINUATION without HEADERS")
            first, pending, held = self._block
            pending += payload
            held.append(record)
            if not flags & 0x4:
                return []
            self._block = None
            self._decode_block(first, stream, bytes(pending))
            record["completes"] = first["type"]
            out = held
            end_stream = "END_STREAM" in first["flags"]
        elif name == "RST_STREAM":
            record["error_code"] = error_name(int.from_bytes(payload[:4], "big"))
            out.extend(self._end_body(stream, reset=True))
        elif name == "SETTINGS":
            pairs = (struct.unpack_from(">HL", payload, i) for i in range(0, len(payload) - 5, 6))
            record["settings"] = {SETTINGS_NAMES.get(ident, f"0x{ident:x}"): value for ident, value in pairs}
        elif name == "PING":
            record["opaque"] = payload.hex()
        elif name == "GOAWAY":
            record["last_stream"] = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            record["error_code"] = error_name(int.from_bytes(payload[4:8], "big"))
            if payload[8:]:
                record["debug"] = self.redactor.text(payload[8:].decode("utf-8", "backslashreplace"))
        elif name == "WINDOW_UPDATE":
            record["increment"] = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        if end_stream and stream != self.control_stream:
            out.extend(self._end_body(stream, reset=False))
        if stream in self.rays:
            for item in out:
                item.setdefault("ray", self.rays[stream])
        return out

    def _decode_block(self, record: dict[str, Any], stream: int, block: bytes) -> None:
        fields = self._hpack.decode(block, raw=True)
        record["headers"] = self.redactor.headers(fields)
        for name, value in fields:
            if name == b"cf-ray":
                self.rays[stream] = _text(value)
            elif name == RESPONSE_HEADERS:
                try:
                    record["origin_headers"] = self.redactor.headers(deserialize_response_headers(value))
                except TunnelLabError as exc:
                    record["origin_headers_error"] = str(exc)

    def _end_body(self, stream: int, *, reset: bool) -> list[dict[str, Any]]:
        digest = self._bodies.pop(stream, None)
        if digest is None:
            return []
        record = {"kind": "h2.body", "stream": stream, "complete": not reset, **digest.summary()}
        record["head"] = self.redactor.text(record["head"])
        return [record]

    @staticmethod
    def _with_stream(records: list[dict[str, Any]], stream: int) -> list[dict[str, Any]]:
        for record in records:
            record["stream"] = stream
        return records


def _unpad(payload: bytes, flags: int) -> bytes:
    if flags & 0x8:
        pad = payload[0]
        if pad >= len(payload):
            raise ValueError("padding longer than the frame")
        return payload[1:len(payload) - pad]
    return payload


# ---- QUIC --------------------------------------------------------------------------------------------

class QuicStreamDecoder:
    """The streams of one QUIC tunnel connection (both directions): bytes -> records.

    Stream 0 is the control stream (Cap'n Proto RPC, docs/protocol.md §13.2). Every other stream starts
    with a head (docs/protocol.md §13.3): a data stream's ConnectRequest (edge -> connector) and
    ConnectResponse (back), decoded to a `quic.stream_head` record with its metadata redacted, then the
    body (digested per stream and direction, an `quic.body` record at FIN or reset); an RPC stream's
    Cap'n Proto messages become `rpc.message` records. `request_direction` is the direction ("in" or
    "out") in which ConnectRequests travel on this side.
    """

    def __init__(self, *, request_direction: str, redactor: TraceRedactor) -> None:
        self.request_direction = request_direction
        self.redactor = redactor
        self.control = RpcDecoder()
        self._heads: dict[tuple[int, str], Any] = {}
        self._rpc: dict[int, RpcDecoder] = {}
        self._bodies: dict[tuple[int, str], BodyDigest] = {}
        self.rays: dict[int, str] = {}

    def feed(self, direction: str, stream: int, data: bytes, *, fin: bool = False,
             reset: bool = False) -> list[dict[str, Any]]:
        """Records for `data` received or sent on `stream` (`fin`: the stream's end in this direction)."""
        from tunnel_lab.wire.quic_stream import QuicStreamError, StreamHeadReader, StreamKind

        if stream == 0:
            out = self.control.feed(direction, data)
        elif stream in self._rpc:
            out = self._rpc[stream].feed(direction, data)
        else:
            out = []
            key = (stream, direction)
            reader = self._heads.get(key)
            if reader is None and key not in self._bodies:
                expect = "request" if direction == self.request_direction else "response"
                reader = self._heads[key] = StreamHeadReader(expect=expect, allow_rpc=True)
            if reader is not None and data:
                try:
                    head = reader.feed(data)
                except QuicStreamError as exc:
                    del self._heads[key]
                    self._bodies[key] = BodyDigest()
                    out.append({"kind": "quic.undecodable", "error": str(exc)})
                    head = None
                    data = b""
                if head is not None:
                    del self._heads[key]
                    if head.kind is StreamKind.RPC:
                        self._rpc[stream] = RpcDecoder()
                        out.append({"kind": "quic.stream_head", "stream_kind": "rpc"})
                        out.extend(self._rpc[stream].feed(direction, head.rest))
                    else:
                        out.append(self._head_record(stream, head.message))
                        self._bodies[key] = BodyDigest()
                    data = head.rest if head.kind is not StreamKind.RPC else b""
                else:
                    data = b""
            digest = self._bodies.get(key)
            if digest is not None and data:
                digest.add(data)
            if (fin or reset) and digest is not None:
                del self._bodies[key]
                record = {"kind": "quic.body", "complete": not reset, **digest.summary()}
                record["head"] = self.redactor.text(record["head"])
                out.append(record)
        for record in out:
            record["stream"] = stream
            if stream in self.rays:
                record.setdefault("ray", self.rays[stream])
        return out

    def _head_record(self, stream: int, message: Any) -> dict[str, Any]:
        from tunnel_lab.wire.quic_stream import ConnectRequest

        metadata = self.redactor.headers((k.removeprefix("HttpHeader:"), v) for k, v in message.metadata)
        # keep the metadata keys as sent (HttpHeader:Name), values redacted by header name
        fields = [[k, v[1]] for (k, _), v in zip(message.metadata, metadata, strict=True)]
        if isinstance(message, ConnectRequest):
            ray = message.get("HttpHeader:Cf-Ray")
            if ray:
                self.rays[stream] = ray
            return {"kind": "quic.stream_head", "stream_kind": "data", "message": "ConnectRequest",
                    "dest": self.redactor.text(message.dest), "type": message.type.name.lower(),
                    "metadata": fields}
        return {"kind": "quic.stream_head", "stream_kind": "data", "message": "ConnectResponse",
                "error": message.error, "metadata": fields}


def datagram_record(data: bytes, *, version: int = 2) -> dict[str, Any]:
    """A `quic.datagram` record: its type and session or request id, the payload summarised."""
    from tunnel_lab.wire import datagram as dg

    record: dict[str, Any] = {"kind": "quic.datagram", "length": len(data), "version": version}
    try:
        if version == 3:
            decoded: Any = dg.decode_v3(data)
        else:
            decoded = dg.decode_v2(data)
    except TunnelLabError as exc:
        record["error"] = str(exc)
        return record
    record["type"] = type(decoded).__name__
    for name in ("session_id", "request_id"):
        value = getattr(decoded, name, None)
        if isinstance(value, uuid.UUID):
            record[name] = str(value)
        elif isinstance(value, int):
            record[name] = dg.format_request_id(value)
    payload = getattr(decoded, "payload", None)
    if isinstance(payload, bytes | bytearray):
        record["payload"] = body_summary(bytes(payload), show_head=False)
    return record

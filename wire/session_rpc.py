"""Sans-I/O Cap'n Proto RPC on QUIC RPC streams: UDP sessions, config push (docs/protocol.md §13.7).

Over QUIC the edge opens a fresh bidirectional stream for every call it makes to the connector (after the
RPC stream signature, wire/quic_stream.py); the connector serves `CloudflaredServer` there, which extends
`SessionManager` (`registerUdpSession`, `unregisterUdpSession`) and `ConfigurationManager`
(`updateConfiguration`). The other way, the connector opens a stream to tell the edge that a UDP session
ended (`SessionManager.unregisterUdpSession` on the edge). The conversation is the same two-party subset
as the control stream (Bootstrap, a pipelined Call, Return, Finish, Release, Abort), so the classes here
extend wire.rpc's `RpcServer` / `RpcClient` with these interfaces; usage is the same h11 style.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass

from tunnel_lab.wire.capnp import StructBuilder, StructReader
from tunnel_lab.wire.errors import CapnpError
from tunnel_lab.wire.rpc import (
    CallFailed,
    CallMessage,
    CallReturned,
    ContentWriter,
    ReturnMessage,
    RpcAborted,
    RpcClient,
    RpcServer,
    encode_call,
    encode_return_exception,
    encode_return_results,
)

SESSION_MANAGER_ID = 0x839445A59FB01686
CONFIGURATION_MANAGER_ID = 0xB48EDFBDAA25DB04
CLOUDFLARED_SERVER_ID = 0xF548CEF9DEA2A4A1

REGISTER_UDP_SESSION = "registerUdpSession"
UNREGISTER_UDP_SESSION = "unregisterUdpSession"
UPDATE_CONFIGURATION = "updateConfiguration"

#: (interface id, method ordinal) -> method name; calls name the interface that declares the method.
METHODS = {
    (SESSION_MANAGER_ID, 0): REGISTER_UDP_SESSION,
    (SESSION_MANAGER_ID, 1): UNREGISTER_UDP_SESSION,
    (CONFIGURATION_MANAGER_ID, 0): UPDATE_CONFIGURATION,
}
_ORDINALS = {name: key for key, name in METHODS.items()}

#: What each side serves: the connector CloudflaredServer, the edge only SessionManager.
CLOUDFLARED_SERVER_METHODS = frozenset(METHODS.values())
SESSION_MANAGER_METHODS = frozenset({REGISTER_UDP_SESSION, UNREGISTER_UDP_SESSION})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass(frozen=True, kw_only=True)
class RegisterUdpSessionParams:
    """registerUdpSession: proxy UDP between session `session_id` and `dst_ip:dst_port`.

    `close_after_idle_ns` is Go's time.Duration (0: cloudflared's default of 210 s).
    """

    session_id: uuid.UUID
    dst_ip: IPAddress
    dst_port: int
    close_after_idle_ns: int = 0
    trace_context: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.dst_port <= 0xFFFF:
            raise ValueError(f"dst_port must be 0-65535, got {self.dst_port!r}")
        if not _I64_MIN <= self.close_after_idle_ns <= _I64_MAX:
            raise ValueError("close_after_idle_ns must fit in an Int64")


def _ip_from_bytes(raw: bytes, what: str) -> IPAddress:
    """Go's net.IP: 4 bytes, or 16 (an IPv4-mapped address means IPv4, as cloudflared's To4 does)."""
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        ip = ipaddress.IPv6Address(raw)
        return ip.ipv4_mapped or ip
    raise CapnpError(f"{what}: {len(raw)} bytes is not an IP address (4 or 16 bytes)")


def _session_id(raw: bytes, what: str) -> uuid.UUID:
    if len(raw) != 16:
        raise CapnpError(f"{what}: {len(raw)} bytes, a session id is a 16-byte UUID")
    return uuid.UUID(bytes=raw)


def write_register_udp_session_params(parent: StructBuilder, index: int,
                                      value: RegisterUdpSessionParams) -> None:
    """p0 sessionId, p1 dstIp, dstPort u16 @ byte 0, closeAfterIdleHint i64 @ byte 8, p2 traceContext."""
    sb = parent.init_struct(index, 2, 3)
    sb.set_data(0, value.session_id.bytes)
    sb.set_data(1, value.dst_ip.packed)
    sb.set_u16(0, value.dst_port)
    sb.set_i64(8, value.close_after_idle_ns)
    if value.trace_context:
        sb.set_text(2, value.trace_context)


def read_register_udp_session_params(r: StructReader, what: str = "registerUdpSession.params"
                                     ) -> RegisterUdpSessionParams:
    return RegisterUdpSessionParams(
        session_id=_session_id(r.data(0, f"{what}.sessionId"), f"{what}.sessionId"),
        dst_ip=_ip_from_bytes(r.data(1, f"{what}.dstIp"), f"{what}.dstIp"),
        dst_port=r.u16(0), close_after_idle_ns=r.i64(8),
        trace_context=r.text(2, f"{what}.traceContext"))


def write_register_udp_session_results(parent: StructBuilder, index: int, error: str, spans: bytes) -> None:
    """results: p0 RegisterUdpSessionResponse {p0 err Text, p1 spans Data}; an empty err means success."""
    response = parent.init_struct(index, 0, 1).init_struct(0, 0, 2)
    if error:
        response.set_text(0, error)
    else:
        response.set_data(1, spans)


def write_unregister_udp_session_params(parent: StructBuilder, index: int, session_id: uuid.UUID,
                                        message: str) -> None:
    sb = parent.init_struct(index, 0, 2)
    sb.set_data(0, session_id.bytes)
    sb.set_text(1, message)


def write_update_configuration_params(parent: StructBuilder, index: int, version: int, config: bytes) -> None:
    """params: version i32 @ byte 0, p0 config Data (the same JSON envelope as docs/protocol.md §8)."""
    sb = parent.init_struct(index, 1, 1)
    sb.set_i32(0, version)
    sb.set_data(0, config)


def write_update_configuration_results(parent: StructBuilder, index: int, latest_version: int,
                                       error: str) -> None:
    """results: p0 UpdateConfigurationResponse {latestAppliedVersion i32 @ byte 0, p0 err Text}."""
    response = parent.init_struct(index, 0, 1).init_struct(0, 1, 1)
    response.set_i32(0, latest_version)
    if error:
        response.set_text(0, error)


# --------------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, kw_only=True)
class RegisterUdpSessionCalled:
    """Server: register a session; answer with `answer_register_udp_session`."""

    question_id: int
    params: RegisterUdpSessionParams


@dataclass(frozen=True, kw_only=True)
class UnregisterUdpSessionCalled:
    """Server: end a session; answer with `answer_empty`."""

    question_id: int
    session_id: uuid.UUID
    message: str


@dataclass(frozen=True, kw_only=True)
class UpdateConfigurationCalled:
    """Server (connector): a remote configuration; answer with `answer_update_configuration`."""

    question_id: int
    version: int
    config: bytes


@dataclass(frozen=True, kw_only=True)
class UdpSessionRegistered:
    """Client: registerUdpSession returned; `error` is empty on success (the session is live)."""

    question_id: int
    error: str
    spans: bytes = b""


@dataclass(frozen=True, kw_only=True)
class ConfigurationUpdated:
    """Client: updateConfiguration returned the version the connector now runs (and any error)."""

    question_id: int
    latest_version: int
    error: str


SessionServerEvent = (RegisterUdpSessionCalled | UnregisterUdpSessionCalled | UpdateConfigurationCalled
                      | RpcAborted)
SessionClientEvent = UdpSessionRegistered | ConfigurationUpdated | CallReturned | CallFailed | RpcAborted


# --------------------------------------------------------------------------------------------------
# Server (the connector's CloudflaredServer, the edge's SessionManager)


class SessionRpcServer(RpcServer):
    """Serves the methods in `methods` on the bootstrap capability of one RPC stream."""

    def __init__(self, methods: frozenset[str] = CLOUDFLARED_SERVER_METHODS, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self._methods = methods

    def receive_data(self, data: bytes) -> list[SessionServerEvent]:  # type: ignore[override]
        """Feed bytes from the RPC stream; returns the events they complete."""
        return super().receive_data(data)  # type: ignore[return-value]

    def _handle_call(self, call: CallMessage) -> SessionServerEvent | None:  # type: ignore[override]
        q = call.question_id
        method = METHODS.get((call.interface_id, call.method_id),
                             f"interface 0x{call.interface_id:016x} method {call.method_id}")
        if not self._admit(call, method, implemented=method in self._methods):
            return None
        what = f"{method}.params"
        try:
            params = call.params.struct(what)
            if method == REGISTER_UDP_SESSION:
                return RegisterUdpSessionCalled(question_id=q,
                                                params=read_register_udp_session_params(params, what))
            if method == UNREGISTER_UDP_SESSION:
                session_id = _session_id(params.data(0, f"{what}.sessionId"), f"{what}.sessionId")
                return UnregisterUdpSessionCalled(question_id=q, session_id=session_id,
                                                  message=params.text(1, f"{what}.message"))
            return UpdateConfigurationCalled(question_id=q, version=params.i32(0),
                                             config=params.data(0, f"{what}.config"))
        except CapnpError as exc:
            self._fail(q, f"rpc: bad {method} params: {exc}")
            return None

    def answer_register_udp_session(self, question_id: int, error: str = "", spans: bytes = b"") -> None:
        """Answer registerUdpSession: `error` empty means registered (cloudflared sends no exception)."""
        if self._take(question_id, (REGISTER_UDP_SESSION,)):
            self._out += encode_return_results(
                question_id, lambda p, i: write_register_udp_session_results(p, i, error, spans))

    def answer_update_configuration(self, question_id: int, latest_version: int, error: str = "") -> None:
        """Answer updateConfiguration with the version now applied (and why a newer one was not)."""
        if not _I32_MIN <= latest_version <= _I32_MAX:
            raise ValueError("latest_version must fit in an Int32")
        if self._take(question_id, (UPDATE_CONFIGURATION,)):
            self._out += encode_return_results(
                question_id, lambda p, i: write_update_configuration_results(p, i, latest_version, error))

    def answer_empty(self, question_id: int) -> None:
        """Answer unregisterUdpSession (empty results)."""
        if self._take(question_id, (UNREGISTER_UDP_SESSION,)):
            self._out += encode_return_results(question_id, None)

    def answer_exception(self, question_id: int, reason: str) -> None:
        """Fail a pending call with Return.exception (type failed)."""
        if self._take(question_id, tuple(METHODS.values())):
            self._out += encode_return_exception(question_id, reason)


# --------------------------------------------------------------------------------------------------
# Client (the edge calling the connector, the connector calling the edge)


class SessionRpcClient(RpcClient):
    """Bootstraps the peer's capability on one RPC stream and calls it (pipelined, as Go does)."""

    def receive_data(self, data: bytes) -> list[SessionClientEvent]:  # type: ignore[override]
        """Feed bytes from the RPC stream; returns the events they complete."""
        return super().receive_data(data)  # type: ignore[return-value]

    def _call_method(self, method: str, params: ContentWriter | None) -> int:
        interface_id, ordinal = _ORDINALS[method]
        target = self._target()
        q = self._new_question(method)
        self._out += encode_call(q, target, interface_id, ordinal, params)
        return q

    def register_udp_session(self, params: RegisterUdpSessionParams) -> int:
        """Queue Bootstrap and registerUdpSession; returns its question id."""
        return self._call_method(REGISTER_UDP_SESSION,
                                 lambda p, i: write_register_udp_session_params(p, i, params))

    def unregister_udp_session(self, session_id: uuid.UUID, message: str) -> int:
        """Queue Bootstrap and unregisterUdpSession; returns its question id."""
        return self._call_method(UNREGISTER_UDP_SESSION,
                                 lambda p, i: write_unregister_udp_session_params(p, i, session_id, message))

    def update_configuration(self, version: int, config: bytes) -> int:
        """Queue Bootstrap and updateConfiguration; returns its question id."""
        if not _I32_MIN <= version <= _I32_MAX:
            raise ValueError("version must fit in an Int32")
        return self._call_method(UPDATE_CONFIGURATION,
                                 lambda p, i: write_update_configuration_params(p, i, version, config))

    def _handle_return(self, ret: ReturnMessage) -> SessionClientEvent | None:  # type: ignore[override]
        event = super()._handle_return(ret)
        if not isinstance(event, CallReturned) or ret.results is None:
            # a registerConnection answer cannot come here: this client never asks one
            return event  # type: ignore[return-value]
        q, method = event.question_id, event.method
        try:
            if method == REGISTER_UDP_SESSION:
                response = ret.results.struct(f"{method}.results").struct(0, f"{method}.results.result")
                return UdpSessionRegistered(question_id=q, error=response.text(0, f"{method}.result.err"),
                                            spans=response.data(1, f"{method}.result.spans"))
            if method == UPDATE_CONFIGURATION:
                response = ret.results.struct(f"{method}.results").struct(0, f"{method}.results.result")
                return ConfigurationUpdated(question_id=q, latest_version=response.i32(0),
                                            error=response.text(0, f"{method}.result.err"))
        except CapnpError as exc:
            return CallFailed(q, method, f"rpc: malformed answer: {exc}")
        return event

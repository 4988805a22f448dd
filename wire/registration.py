"""The tunnelrpc registration structs as frozen dataclasses, and their Cap'n Proto encoding.

Layouts, ids and ordinals are those of docs/protocol.md §3.5 (and `wire/tunnelrpc.capnp`). Each struct has:

- `write_<struct>(parent, index, value)`: build it at pointer `index` of a `StructBuilder`;
- `read_<struct>(reader, what)`: read it from a `StructReader` (`what` names it in errors);
- `encode_<struct>(value) -> bytes` / `decode_<struct>(data)`: a stand-alone framed message with the
  struct as root (handy for tests and for cross-checking with pycapnp).

`wire.rpc` uses the write/read building blocks for method params and results.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tunnel_lab.wire.capnp import Message, MessageBuilder, StructBuilder, StructReader
from tunnel_lab.wire.errors import CapnpError

#: Interface ids and method ordinals (docs/protocol.md §3.5).
FILE_ID = 0xDB8274F9144ABC7E
REGISTRATION_SERVER_ID = 0xF71695EC7FE85497
TUNNEL_SERVER_ID = 0xEA58385C65416035  # deprecated; extends RegistrationServer
METHOD_REGISTER_CONNECTION = 0
METHOD_UNREGISTER_CONNECTION = 1
METHOD_UPDATE_LOCAL_CONFIGURATION = 2
METHOD_NAMES = {
    METHOD_REGISTER_CONNECTION: "registerConnection",
    METHOD_UNREGISTER_CONNECTION: "unregisterConnection",
    METHOD_UPDATE_LOCAL_CONFIGURATION: "updateLocalConfiguration",
}

_U8_MAX = 0xFF
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def _check_u8(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= _U8_MAX:
        raise ValueError(f"{name} must be an integer 0-255, got {value!r}")


def _check_bytes(name: str, value: object) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}")


@dataclass(frozen=True)
class TunnelAuth:
    """TunnelAuth (0x9496331ab9cd463f): who the connector claims to be."""

    account_tag: str
    tunnel_secret: bytes

    def __post_init__(self) -> None:
        _check_str("account_tag", self.account_tag)
        _check_bytes("tunnel_secret", self.tunnel_secret)

    def __repr__(self) -> str:  # the secret never reaches a log line
        return (f"TunnelAuth(account_tag={self.account_tag!r}, "
                f"tunnel_secret=<{len(self.tunnel_secret)} bytes>)")


@dataclass(frozen=True)
class ClientInfo:
    """ClientInfo (0x83ced0145b2f114b): the connector id (16 bytes), features, version, GOOS_GOARCH."""

    client_id: bytes
    features: tuple[str, ...]
    version: str
    arch: str

    def __post_init__(self) -> None:
        _check_bytes("client_id", self.client_id)
        object.__setattr__(self, "features", tuple(self.features))
        for feature in self.features:
            _check_str("features[]", feature)
        _check_str("version", self.version)
        _check_str("arch", self.arch)


@dataclass(frozen=True)
class ConnectionOptions:
    """ConnectionOptions (0xb4bf9861fe035d04)."""

    client: ClientInfo
    origin_local_ip: bytes
    replace_existing: bool = False
    compression_quality: int = 0
    num_previous_attempts: int = 0

    def __post_init__(self) -> None:
        _check_bytes("origin_local_ip", self.origin_local_ip)
        _check_u8("compression_quality", self.compression_quality)
        _check_u8("num_previous_attempts", self.num_previous_attempts)


@dataclass(frozen=True)
class RegisterConnectionParams:
    """The params of RegistrationServer.registerConnection (0xe6646dec8feaa6ee)."""

    auth: TunnelAuth
    tunnel_id: uuid.UUID
    conn_index: int
    options: ConnectionOptions

    def __post_init__(self) -> None:
        if not isinstance(self.tunnel_id, uuid.UUID):
            raise TypeError("tunnel_id must be a uuid.UUID")
        _check_u8("conn_index", self.conn_index)


@dataclass(frozen=True)
class ConnectionDetails:
    """ConnectionDetails (0xb5f39f082b9ac18a): a successful registration."""

    uuid: uuid.UUID
    location_name: str
    tunnel_is_remotely_managed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.uuid, uuid.UUID):
            raise TypeError("uuid must be a uuid.UUID")
        _check_str("location_name", self.location_name)


@dataclass(frozen=True)
class RegistrationError:
    """ConnectionError (0xf5f383d2785edb86): a refused registration. A value, not an exception."""

    cause: str
    retry_after_ns: int = 0
    should_retry: bool = False

    def __post_init__(self) -> None:
        _check_str("cause", self.cause)
        if not _I64_MIN <= self.retry_after_ns <= _I64_MAX:
            raise ValueError("retry_after_ns must fit in an Int64")


RegistrationResult = ConnectionDetails | RegistrationError


def origin_local_ip_bytes(address: str) -> bytes:
    """Go's 16-byte form of an IP address (IPv4 as IPv4-mapped IPv6), as cloudflared sends it."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes(10) + b"\xff\xff" + ip.packed
    return ip.packed


# --------------------------------------------------------------------------------------------------
# Building blocks


def write_tunnel_auth(parent: StructBuilder, index: int, value: TunnelAuth) -> None:
    sb = parent.init_struct(index, 0, 2)
    sb.set_text(0, value.account_tag)
    sb.set_data(1, value.tunnel_secret)


def read_tunnel_auth(r: StructReader, what: str = "TunnelAuth") -> TunnelAuth:
    return TunnelAuth(account_tag=r.text(0, f"{what}.accountTag"),
                      tunnel_secret=r.data(1, f"{what}.tunnelSecret"))


def write_client_info(parent: StructBuilder, index: int, value: ClientInfo) -> None:
    sb = parent.init_struct(index, 0, 4)
    sb.set_data(0, value.client_id)
    sb.set_text_list(1, value.features)
    sb.set_text(2, value.version)
    sb.set_text(3, value.arch)


def read_client_info(r: StructReader, what: str = "ClientInfo") -> ClientInfo:
    return ClientInfo(client_id=r.data(0, f"{what}.clientId"),
                      features=tuple(r.text_list(1, f"{what}.features")),
                      version=r.text(2, f"{what}.version"),
                      arch=r.text(3, f"{what}.arch"))


def write_connection_options(parent: StructBuilder, index: int, value: ConnectionOptions) -> None:
    sb = parent.init_struct(index, 1, 2)
    write_client_info(sb, 0, value.client)
    sb.set_data(1, value.origin_local_ip)
    sb.set_bool(0, value.replace_existing)
    sb.set_u8(1, value.compression_quality)
    sb.set_u8(2, value.num_previous_attempts)


def read_connection_options(r: StructReader, what: str = "ConnectionOptions") -> ConnectionOptions:
    return ConnectionOptions(client=read_client_info(r.struct(0, f"{what}.client"), f"{what}.client"),
                             origin_local_ip=r.data(1, f"{what}.originLocalIp"),
                             replace_existing=r.flag(0),
                             compression_quality=r.u8(1),
                             num_previous_attempts=r.u8(2))


def write_register_params(parent: StructBuilder, index: int, value: RegisterConnectionParams) -> None:
    """registerConnection params: p0 auth, p1 tunnelId, connIndex u8 @ byte 0, p2 options."""
    sb = parent.init_struct(index, 1, 3)
    write_tunnel_auth(sb, 0, value.auth)
    sb.set_data(1, value.tunnel_id.bytes)
    sb.set_u8(0, value.conn_index)
    write_connection_options(sb, 2, value.options)


def read_register_params(r: StructReader,
                         what: str = "registerConnection.params") -> RegisterConnectionParams:
    raw_id = r.data(1, f"{what}.tunnelId")
    if len(raw_id) != 16:
        raise CapnpError(f"{what}.tunnelId: {len(raw_id)} bytes, a tunnel id is a 16-byte UUID")
    return RegisterConnectionParams(
        auth=read_tunnel_auth(r.struct(0, f"{what}.auth"), f"{what}.auth"),
        tunnel_id=uuid.UUID(bytes=raw_id),
        conn_index=r.u8(0),
        options=read_connection_options(r.struct(2, f"{what}.options"), f"{what}.options"))


def write_connection_details(parent: StructBuilder, index: int, value: ConnectionDetails) -> None:
    sb = parent.init_struct(index, 1, 2)
    sb.set_data(0, value.uuid.bytes)
    sb.set_text(1, value.location_name)
    sb.set_bool(0, value.tunnel_is_remotely_managed)


def read_connection_details(r: StructReader, what: str = "ConnectionDetails") -> ConnectionDetails:
    raw = r.data(0, f"{what}.uuid")
    if len(raw) != 16:
        raise CapnpError(f"{what}.uuid: {len(raw)} bytes, must be exactly 16")
    return ConnectionDetails(uuid=uuid.UUID(bytes=raw), location_name=r.text(1, f"{what}.locationName"),
                             tunnel_is_remotely_managed=r.flag(0))


def write_registration_error(parent: StructBuilder, index: int, value: RegistrationError) -> None:
    sb = parent.init_struct(index, 2, 1)
    sb.set_text(0, value.cause)
    sb.set_i64(0, value.retry_after_ns)
    sb.set_bool(64, value.should_retry)


def read_registration_error(r: StructReader, what: str = "ConnectionError") -> RegistrationError:
    return RegistrationError(cause=r.text(0, f"{what}.cause"), retry_after_ns=r.i64(0),
                             should_retry=r.flag(64))


def write_connection_response(parent: StructBuilder, index: int, value: RegistrationResult) -> None:
    """ConnectionResponse: union tag u16 @0 (0 error, 1 connectionDetails), the variant at p0."""
    sb = parent.init_struct(index, 1, 1)
    if isinstance(value, ConnectionDetails):
        sb.set_u16(0, 1)
        write_connection_details(sb, 0, value)
    elif isinstance(value, RegistrationError):
        sb.set_u16(0, 0)
        write_registration_error(sb, 0, value)
    else:
        raise TypeError(f"expected ConnectionDetails or RegistrationError, got {type(value).__name__}")


def read_connection_response(r: StructReader, what: str = "ConnectionResponse") -> RegistrationResult:
    tag = r.u16(0)
    if tag == 1:
        return read_connection_details(r.struct(0, f"{what}.connectionDetails"), f"{what}.connectionDetails")
    if tag == 0:
        return read_registration_error(r.struct(0, f"{what}.error"), f"{what}.error")
    raise CapnpError(f"{what}.result: unknown union tag {tag}")


def write_register_results(parent: StructBuilder, index: int, value: RegistrationResult) -> None:
    """registerConnection results (0xea50d822450d1f17): p0 result ConnectionResponse."""
    sb = parent.init_struct(index, 0, 1)
    write_connection_response(sb, 0, value)


def read_register_results(r: StructReader, what: str = "registerConnection.results") -> RegistrationResult:
    return read_connection_response(r.struct(0, f"{what}.result"), f"{what}.result")


def write_update_configuration_params(parent: StructBuilder, index: int, config: bytes) -> None:
    """updateLocalConfiguration params (0xc5d6e311876a3604): p0 config Data."""
    sb = parent.init_struct(index, 0, 1)
    sb.set_data(0, config)


def read_update_configuration_params(r: StructReader,
                                     what: str = "updateLocalConfiguration.params") -> bytes:
    return r.data(0, f"{what}.config")


# --------------------------------------------------------------------------------------------------
# Stand-alone messages (root = the struct)

_T = TypeVar("_T")


class _RootHolder(StructBuilder):
    """A fake parent whose pointer 0 is the message's root pointer."""

    def __init__(self, msg: MessageBuilder) -> None:
        super().__init__(msg, 0, 0, 0, 1)


def _root(data: bytes) -> StructReader:
    return Message.from_bytes(data).root()


def _encode(write: Callable[[StructBuilder, int, _T], None], value: _T) -> bytes:
    msg = MessageBuilder()
    write(_RootHolder(msg), 0, value)
    return msg.to_bytes()


def encode_tunnel_auth(value: TunnelAuth) -> bytes:
    return _encode(write_tunnel_auth, value)


def decode_tunnel_auth(data: bytes) -> TunnelAuth:
    return read_tunnel_auth(_root(data))


def encode_client_info(value: ClientInfo) -> bytes:
    return _encode(write_client_info, value)


def decode_client_info(data: bytes) -> ClientInfo:
    return read_client_info(_root(data))


def encode_connection_options(value: ConnectionOptions) -> bytes:
    return _encode(write_connection_options, value)


def decode_connection_options(data: bytes) -> ConnectionOptions:
    return read_connection_options(_root(data))


def encode_register_params(value: RegisterConnectionParams) -> bytes:
    return _encode(write_register_params, value)


def decode_register_params(data: bytes) -> RegisterConnectionParams:
    return read_register_params(_root(data))


def encode_connection_details(value: ConnectionDetails) -> bytes:
    return _encode(write_connection_details, value)


def decode_connection_details(data: bytes) -> ConnectionDetails:
    return read_connection_details(_root(data))


def encode_registration_error(value: RegistrationError) -> bytes:
    return _encode(write_registration_error, value)


def decode_registration_error(data: bytes) -> RegistrationError:
    return read_registration_error(_root(data))


def encode_connection_response(value: RegistrationResult) -> bytes:
    return _encode(write_connection_response, value)


def decode_connection_response(data: bytes) -> RegistrationResult:
    return read_connection_response(_root(data))


def encode_register_results(value: RegistrationResult) -> bytes:
    return _encode(write_register_results, value)


def decode_register_results(data: bytes) -> RegistrationResult:
    return read_register_results(_root(data))


def encode_update_configuration_params(config: bytes) -> bytes:
    return _encode(write_update_configuration_params, config)


def decode_update_configuration_params(data: bytes) -> bytes:
    return read_update_configuration_params(_root(data))

"""Sans-I/O codecs for cloudflared's QUIC datagrams, versions 2 and 3 (docs/protocol.md §13.6).

Version 2 (the default) puts its metadata at the *end* of a datagram: a UDP session datagram is
`payload | session id (16-byte UUID) | type 0`; the other types (a raw IP packet, an IP packet with a
tracing identity, tracing spans) carry IP/ICMP traffic, which the lab only recognises. Sessions are
registered out of band, by the `registerUdpSession` RPC (wire/session_rpc.py).

Version 3 (cloudflared's `support_datagram_v3_2` feature) puts a one-byte type *first* and registers
sessions in band: a registration datagram carries the flow's 16-byte request id, the destination, an idle
hint in seconds and optionally a first payload; cloudflared answers with a registration response datagram.

Sizes are those of cloudflared on Linux: a session payload is at most 1280 bytes (what WARP clients send),
a whole v2 datagram at most 1350 bytes. Every decoder raises `DatagramError` naming what is wrong; every
encoder refuses a payload that would not fit instead of producing a datagram the peer drops.
"""

from __future__ import annotations

import enum
import ipaddress
import uuid
from dataclasses import dataclass

from tunnel_lab.wire.errors import DatagramError

#: The largest UDP payload a session datagram carries (quic/param_unix.go maxDatagramPayloadSize).
MAX_PAYLOAD = 1280
#: The largest v2 datagram cloudflared builds (quic/param_unix.go MaxDatagramFrameSize).
MAX_V2_DATAGRAM = 1350
SESSION_ID_LEN = 16
REQUEST_ID_LEN = 16
#: A v2 tracing identity: 16-byte trace id, 8-byte span id, 1 flag byte (tracing/identity.go).
TRACING_IDENTITY_LEN = 25

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --------------------------------------------------------------------------------------------------
# Version 2


class V2Type(enum.IntEnum):
    """The last byte of a v2 datagram (quic/datagramv2.go DatagramV2Type)."""

    UDP = 0
    IP = 1
    IP_WITH_TRACE = 2
    TRACING_SPAN = 3


@dataclass(frozen=True, kw_only=True)
class V2SessionDatagram:
    """One UDP payload of a registered session."""

    session_id: uuid.UUID
    payload: bytes


@dataclass(frozen=True, kw_only=True)
class V2PacketDatagram:
    """An IP packet (ICMP) or tracing spans; `tracing_identity` is empty for `V2Type.IP`."""

    type: V2Type
    payload: bytes
    tracing_identity: bytes = b""


V2Datagram = V2SessionDatagram | V2PacketDatagram


def encode_v2_session(session_id: uuid.UUID, payload: bytes) -> bytes:
    """`payload | session id | 0`; a payload over `MAX_PAYLOAD` is refused as cloudflared refuses it."""
    if len(payload) > MAX_PAYLOAD:
        raise DatagramError(f"origin UDP payload has {len(payload)} bytes, "
                            f"which exceeds transport MTU {MAX_PAYLOAD}")
    return payload + session_id.bytes + bytes((V2Type.UDP,))


def encode_v2_packet(packet: V2PacketDatagram) -> bytes:
    """`payload | tracing identity | type` for the non-session types."""
    size = len(packet.payload) + len(packet.tracing_identity) + 1
    if size > MAX_V2_DATAGRAM:
        raise DatagramError(f"datagram size {size} exceeds max frame size {MAX_V2_DATAGRAM}")
    return packet.payload + packet.tracing_identity + bytes((packet.type,))


def decode_v2(data: bytes) -> V2Datagram:
    """Split a received v2 datagram into its type, metadata and payload."""
    if not data:
        raise DatagramError("datagram v2: empty, a datagram has at least a type byte")
    raw_type, body = data[-1], data[:-1]
    try:
        kind = V2Type(raw_type)
    except ValueError:
        raise DatagramError(f"datagram v2: unexpected datagram type {raw_type}") from None
    if kind is V2Type.UDP:
        if len(body) < SESSION_ID_LEN:
            raise DatagramError(f"datagram v2: session ID has {SESSION_ID_LEN} bytes, "
                                f"but data only has {len(body)}")
        # No size check on receive, as in cloudflared: the QUIC layer's max_datagram_frame_size bounds it.
        return V2SessionDatagram(session_id=uuid.UUID(bytes=body[-SESSION_ID_LEN:]),
                                 payload=body[:-SESSION_ID_LEN])
    if kind is V2Type.IP:
        return V2PacketDatagram(type=kind, payload=body)
    if len(body) < TRACING_IDENTITY_LEN:
        raise DatagramError(f"datagram v2: a {kind.name} datagram needs a {TRACING_IDENTITY_LEN}-byte "
                            f"tracing identity, got {len(body)} bytes")
    return V2PacketDatagram(type=kind, payload=body[:-TRACING_IDENTITY_LEN],
                            tracing_identity=body[-TRACING_IDENTITY_LEN:])


def format_session_id(session_id: uuid.UUID) -> str:
    """cloudflared's log form of a v2 session id: 32 hex digits, no dashes."""
    return session_id.hex


# --------------------------------------------------------------------------------------------------
# Version 3


class V3Type(enum.IntEnum):
    """The first byte of a v3 datagram (quic/v3/datagram.go DatagramType)."""

    REGISTRATION = 0
    PAYLOAD = 1
    ICMP = 2
    REGISTRATION_RESPONSE = 3


class V3Response(enum.IntEnum):
    """A registration response's outcome (quic/v3/datagram.go SessionRegistrationResp)."""

    OK = 0x00
    DESTINATION_UNREACHABLE = 0x01
    UNABLE_TO_BIND_SOCKET = 0x02
    TOO_MANY_ACTIVE_FLOWS = 0x03
    ERROR_WITH_MESSAGE = 0xFF


_FLAG_IPV6 = 0b001
_FLAG_TRACED = 0b010
_FLAG_BUNDLED = 0b100
_REGISTRATION_V4_HEADER = 1 + 1 + 2 + 2 + REQUEST_ID_LEN + 4  # 26
_REGISTRATION_V6_HEADER = _REGISTRATION_V4_HEADER + 12  # 38
PAYLOAD_HEADER_LEN = 1 + REQUEST_ID_LEN
_RESPONSE_HEADER = 1 + 1 + REQUEST_ID_LEN + 2  # 20
MAX_RESPONSE_MESSAGE = MAX_PAYLOAD - _RESPONSE_HEADER
_IDLE_MAX = 0xFFFF


def format_request_id(request_id: int) -> str:
    """cloudflared's log form of a v3 request id (`flowID=`): 32 hex digits."""
    return f"{request_id:032x}"


def _check_request_id(request_id: int) -> None:
    if not 0 <= request_id < 1 << 128:
        raise DatagramError(f"request id {request_id!r} does not fit in 128 bits")


@dataclass(frozen=True, kw_only=True)
class V3Registration:
    """Register flow `request_id` to `address:port`; `payload` is an optional first datagram to send."""

    request_id: int
    address: IPAddress
    port: int
    idle_hint_seconds: int = 0
    traced: bool = False
    payload: bytes = b""


@dataclass(frozen=True, kw_only=True)
class V3Payload:
    """One UDP payload of flow `request_id`."""

    request_id: int
    payload: bytes


@dataclass(frozen=True, kw_only=True)
class V3RegistrationResponse:
    """cloudflared's answer to a registration."""

    request_id: int
    response: V3Response | int
    error_message: str = ""


@dataclass(frozen=True, kw_only=True)
class V3Icmp:
    """A raw ICMPv4/ICMPv6 packet."""

    payload: bytes


V3Datagram = V3Registration | V3Payload | V3RegistrationResponse | V3Icmp


def encode_v3(datagram: V3Datagram) -> bytes:
    """The wire form of any v3 datagram; `DatagramError` for values that do not fit."""
    if isinstance(datagram, V3Payload):
        _check_request_id(datagram.request_id)
        if len(datagram.payload) > MAX_PAYLOAD:
            raise DatagramError(f"datagram v3: payload has {len(datagram.payload)} bytes, over {MAX_PAYLOAD}")
        return bytes((V3Type.PAYLOAD,)) + datagram.request_id.to_bytes(16, "big") + datagram.payload
    if isinstance(datagram, V3Registration):
        return _encode_registration(datagram)
    if isinstance(datagram, V3RegistrationResponse):
        _check_request_id(datagram.request_id)
        message = datagram.error_message.encode()
        if len(message) > MAX_RESPONSE_MESSAGE:
            raise DatagramError("datagram v3: response message is an invalid size")
        return (bytes((V3Type.REGISTRATION_RESPONSE, int(datagram.response)))
                + datagram.request_id.to_bytes(16, "big") + len(message).to_bytes(2, "big") + message)
    if not datagram.payload:
        raise DatagramError("datagram v3: icmp payload is missing")
    if len(datagram.payload) > MAX_PAYLOAD:
        raise DatagramError(f"datagram v3: icmp payload exceeds {MAX_PAYLOAD} bytes")
    return bytes((V3Type.ICMP,)) + datagram.payload


def _encode_registration(reg: V3Registration) -> bytes:
    _check_request_id(reg.request_id)
    if not 0 <= reg.port <= 0xFFFF:
        raise DatagramError(f"datagram v3: port {reg.port} out of range")
    if len(reg.payload) > MAX_PAYLOAD:
        raise DatagramError("datagram v3: payload length is too large to be bundled in datagram")
    flags = (_FLAG_TRACED if reg.traced else 0) | (_FLAG_BUNDLED if reg.payload else 0)
    if reg.address.version == 6:
        flags |= _FLAG_IPV6
    # Go converts the hint with uint16(seconds): clamp instead of wrapping.
    idle = min(max(reg.idle_hint_seconds, 0), _IDLE_MAX)
    return (bytes((V3Type.REGISTRATION, flags)) + reg.port.to_bytes(2, "big") + idle.to_bytes(2, "big")
            + reg.request_id.to_bytes(16, "big") + reg.address.packed + reg.payload)


def decode_v3(data: bytes) -> V3Datagram:
    """Parse a received v3 datagram; the error text follows cloudflared's (quic/v3/datagram_errors.go)."""
    if not data:
        raise DatagramError("datagram v3: datagram should have at least 1 byte")
    raw_type = data[0]
    if raw_type == V3Type.PAYLOAD:
        if not PAYLOAD_HEADER_LEN <= len(data) <= PAYLOAD_HEADER_LEN + MAX_PAYLOAD:
            raise DatagramError(f"datagram v3: payload datagram of {len(data)} bytes is an invalid size "
                                f"({PAYLOAD_HEADER_LEN}-{PAYLOAD_HEADER_LEN + MAX_PAYLOAD})")
        return V3Payload(request_id=int.from_bytes(data[1:PAYLOAD_HEADER_LEN], "big"),
                         payload=data[PAYLOAD_HEADER_LEN:])
    if raw_type == V3Type.REGISTRATION:
        return _decode_registration(data)
    if raw_type == V3Type.REGISTRATION_RESPONSE:
        if len(data) < _RESPONSE_HEADER:
            raise DatagramError(f"datagram v3: response of {len(data)} bytes is an invalid size "
                                f"(at least {_RESPONSE_HEADER})")
        length = int.from_bytes(data[18:20], "big")
        if length > MAX_RESPONSE_MESSAGE:
            raise DatagramError(f"datagram v3: response error message length {length} exceeds the "
                                f"maximum {MAX_RESPONSE_MESSAGE}")
        if len(data) - _RESPONSE_HEADER < length:
            raise DatagramError("datagram v3: response error message length exceeds the datagram")
        try:
            response: V3Response | int = V3Response(data[1])
        except ValueError:
            response = data[1]
        return V3RegistrationResponse(request_id=int.from_bytes(data[2:18], "big"), response=response,
                                      error_message=data[20:20 + length].decode(errors="replace"))
    if raw_type == V3Type.ICMP:
        if len(data) == 1:
            raise DatagramError("datagram v3: icmp payload is missing")
        if len(data) - 1 > MAX_PAYLOAD:
            raise DatagramError(f"datagram v3: icmp payload exceeds {MAX_PAYLOAD} bytes")
        return V3Icmp(payload=data[1:])
    raise DatagramError(f"datagram v3: unknown datagram type received: {raw_type}")


def _decode_registration(data: bytes) -> V3Registration:
    # cloudflared slices the header without checking the length first (a short datagram panics its
    # muxer); here a short one is an error like any other.
    if len(data) < 2:
        raise DatagramError(f"datagram v3: registration of {len(data)} bytes has no flags")
    flags = data[1]
    ipv6 = bool(flags & _FLAG_IPV6)
    header = _REGISTRATION_V6_HEADER if ipv6 else _REGISTRATION_V4_HEADER
    if len(data) < header:
        raise DatagramError(f"datagram v3: registration of {len(data)} bytes is shorter than its "
                            f"{header}-byte header")
    address: IPAddress = (ipaddress.IPv6Address(data[22:38]) if ipv6 else ipaddress.IPv4Address(data[22:26]))
    payload = data[header:] if flags & _FLAG_BUNDLED else b""
    if len(payload) > MAX_PAYLOAD:
        raise DatagramError(f"datagram v3: bundled payload has {len(payload)} bytes, over {MAX_PAYLOAD}")
    return V3Registration(request_id=int.from_bytes(data[6:22], "big"), address=address,
                          port=int.from_bytes(data[2:4], "big"),
                          idle_hint_seconds=int.from_bytes(data[4:6], "big"),
                          traced=bool(flags & _FLAG_TRACED), payload=payload)

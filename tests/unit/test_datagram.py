"""wire.datagram: cloudflared's QUIC datagram v2 and v3 layouts, round trips and bad input."""

from __future__ import annotations

import contextlib
import ipaddress
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire import datagram as dg
from tunnel_lab.wire.errors import DatagramError

SID = uuid.UUID("0102030405060708090a0b0c0d0e0f10")
UUIDS = st.builds(uuid.UUID, bytes=st.binary(min_size=16, max_size=16))
REQUEST_IDS = st.integers(min_value=0, max_value=(1 << 128) - 1)
PAYLOADS = st.binary(max_size=dg.MAX_PAYLOAD)
ADDRESSES = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


# --- v2 -------------------------------------------------------------------------------------------


def test_v2_session_layout_is_payload_then_id_then_type() -> None:
    # quic/datagram.go SuffixSessionID + quic/datagramv2.go SuffixType: metadata at the end.
    assert dg.encode_v2_session(SID, b"dns?") == b"dns?" + bytes(range(1, 17)) + b"\x00"


def test_v2_session_payload_over_mtu_is_refused_on_send() -> None:
    dg.encode_v2_session(SID, bytes(dg.MAX_PAYLOAD))
    with pytest.raises(DatagramError, match="1281 bytes, which exceeds transport MTU 1280"):
        dg.encode_v2_session(SID, bytes(dg.MAX_PAYLOAD + 1))


@given(UUIDS, PAYLOADS)
def test_v2_session_round_trip(session_id: uuid.UUID, payload: bytes) -> None:
    assert dg.decode_v2(dg.encode_v2_session(session_id, payload)) == dg.V2SessionDatagram(
        session_id=session_id, payload=payload)


def test_v2_empty_session_payload_is_legal() -> None:
    assert dg.decode_v2(SID.bytes + b"\x00") == dg.V2SessionDatagram(session_id=SID, payload=b"")


def test_v2_packets_split_their_tracing_identity() -> None:
    identity = bytes(range(25))
    packet = dg.V2PacketDatagram
    assert dg.decode_v2(b"ip-packet" + b"\x01") == packet(type=dg.V2Type.IP, payload=b"ip-packet")
    traced = dg.decode_v2(b"pkt" + identity + b"\x02")
    assert traced == packet(type=dg.V2Type.IP_WITH_TRACE, payload=b"pkt", tracing_identity=identity)
    assert dg.encode_v2_packet(traced) == b"pkt" + identity + b"\x02"
    spans = dg.decode_v2(b"spans" + identity + b"\x03")
    assert spans == packet(type=dg.V2Type.TRACING_SPAN, payload=b"spans", tracing_identity=identity)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty"),
    (b"x" * 20 + b"\x04", "unexpected datagram type 4"),
    (b"x" * 20 + b"\xff", "unexpected datagram type 255"),
    (bytes(15) + b"\x00", "session ID has 16 bytes, but data only has 15"),
    (bytes(24) + b"\x02", "25-byte tracing identity, got 24"),
    (bytes(3) + b"\x03", "25-byte tracing identity, got 3"),
])
def test_v2_garbage_is_a_datagram_error_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(DatagramError, match=message):
        dg.decode_v2(data)


def test_v2_packet_over_frame_size_is_refused() -> None:
    with pytest.raises(DatagramError, match="exceeds max frame size 1350"):
        dg.encode_v2_packet(dg.V2PacketDatagram(type=dg.V2Type.IP, payload=bytes(dg.MAX_V2_DATAGRAM)))


@given(st.binary(max_size=2000))
def test_v2_decode_only_ever_raises_datagram_error(data: bytes) -> None:
    try:
        decoded = dg.decode_v2(data)
    except DatagramError:
        return
    if isinstance(decoded, dg.V2SessionDatagram):
        if len(decoded.payload) <= dg.MAX_PAYLOAD:
            assert dg.encode_v2_session(decoded.session_id, decoded.payload) == data
    else:
        assert dg.encode_v2_packet(decoded) == data or len(data) > dg.MAX_V2_DATAGRAM


def test_session_id_log_form_has_no_dashes() -> None:
    assert dg.format_session_id(SID) == "0102030405060708090a0b0c0d0e0f10"


# --- v3 -------------------------------------------------------------------------------------------

RID = 0x0102030405060708090A0B0C0D0E0F10


def test_v3_registration_ipv4_layout() -> None:
    reg = dg.V3Registration(request_id=RID, address=ipaddress.IPv4Address("10.0.0.53"), port=53,
                            idle_hint_seconds=30, payload=b"q")
    # type 0, flags bundled, port, idle seconds, request id, IPv4, payload (quic/v3/datagram.go diagram)
    header = b"\x00\x04\x00\x35\x00\x1e"
    assert dg.encode_v3(reg) == header + bytes(range(1, 17)) + b"\x0a\x00\x00\x35" + b"q"


def test_v3_registration_ipv6_traced_layout() -> None:
    reg = dg.V3Registration(request_id=RID, address=ipaddress.IPv6Address("fd00::1"), port=7, traced=True)
    data = dg.encode_v3(reg)
    assert data[:2] == b"\x00\x03" and len(data) == 38
    assert data[22:38] == ipaddress.IPv6Address("fd00::1").packed
    assert dg.decode_v3(data) == reg


def test_v3_payload_and_response_and_icmp_layouts() -> None:
    assert dg.encode_v3(dg.V3Payload(request_id=RID, payload=b"hi")) == b"\x01" + bytes(range(1, 17)) + b"hi"
    ok = dg.V3RegistrationResponse(request_id=RID, response=dg.V3Response.OK)
    assert dg.encode_v3(ok) == b"\x03\x00" + bytes(range(1, 17)) + b"\x00\x00"
    failed = dg.V3RegistrationResponse(request_id=RID, response=dg.V3Response.ERROR_WITH_MESSAGE,
                                       error_message="no")
    assert dg.encode_v3(failed) == b"\x03\xff" + bytes(range(1, 17)) + b"\x00\x02no"
    assert dg.encode_v3(dg.V3Icmp(payload=b"\x08\x00")) == b"\x02\x08\x00"


v3_datagrams = st.one_of(
    st.builds(dg.V3Registration, request_id=REQUEST_IDS, address=ADDRESSES, port=st.integers(0, 0xFFFF),
              idle_hint_seconds=st.integers(0, 0xFFFF), traced=st.booleans(), payload=PAYLOADS),
    st.builds(dg.V3Payload, request_id=REQUEST_IDS, payload=PAYLOADS),
    st.builds(dg.V3RegistrationResponse, request_id=REQUEST_IDS, response=st.sampled_from(dg.V3Response),
              error_message=st.text(max_size=40)),
    st.builds(dg.V3Icmp, payload=st.binary(min_size=1, max_size=dg.MAX_PAYLOAD)),
)


@given(v3_datagrams)
def test_v3_round_trip(datagram: dg.V3Datagram) -> None:
    assert dg.decode_v3(dg.encode_v3(datagram)) == datagram


@pytest.mark.parametrize(("data", "message"), [
    (b"", "at least 1 byte"),
    (b"\x07", "unknown datagram type received: 7"),
    (b"\x00", "has no flags"),
    (b"\x00\x00" + bytes(23), "25 bytes is shorter than its 26-byte header"),
    (b"\x00\x01" + bytes(30), "32 bytes is shorter than its 38-byte header"),
    (b"\x01" + bytes(15), "16 bytes is an invalid size"),
    (b"\x01" + bytes(16 + 1281), "1298 bytes is an invalid size"),
    (b"\x03\x00" + bytes(17), "19 bytes is an invalid size"),
    (b"\x03\x00" + bytes(16) + b"\x00\x05abc", "exceeds the datagram"),
    (b"\x03\x00" + bytes(16) + b"\xff\xff", "exceeds the maximum 1260"),
    (b"\x02", "icmp payload is missing"),
    (b"\x02" + bytes(1281), "icmp payload exceeds 1280 bytes"),
    (b"\x00\x04" + bytes(24) + bytes(1281), "bundled payload has 1281 bytes"),
])
def test_v3_garbage_is_a_datagram_error_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(DatagramError, match=message):
        dg.decode_v3(data)


@given(st.binary(max_size=1400))
def test_v3_decode_only_ever_raises_datagram_error(data: bytes) -> None:
    with contextlib.suppress(DatagramError):
        dg.decode_v3(data)


def test_v3_unknown_response_code_is_kept_as_a_number() -> None:
    decoded = dg.decode_v3(b"\x03\x42" + bytes(16) + b"\x00\x00")
    assert isinstance(decoded, dg.V3RegistrationResponse) and decoded.response == 0x42


def test_v3_unbundled_registration_ignores_trailing_bytes() -> None:
    # cloudflared reads the payload only when the bundled flag is set
    decoded = dg.decode_v3(b"\x00\x00" + bytes(24) + b"extra")
    assert isinstance(decoded, dg.V3Registration) and decoded.payload == b""


@pytest.mark.parametrize("datagram", [
    dg.V3Payload(request_id=1 << 128, payload=b""),
    dg.V3Payload(request_id=-1, payload=b""),
    dg.V3Payload(request_id=1, payload=bytes(1281)),
    dg.V3Registration(request_id=1, address=ipaddress.IPv4Address("10.0.0.1"), port=70000),
    dg.V3Registration(request_id=1, address=ipaddress.IPv4Address("10.0.0.1"), port=1, payload=bytes(1281)),
    dg.V3RegistrationResponse(request_id=1, response=dg.V3Response.ERROR_WITH_MESSAGE,
                              error_message="x" * 1261),
    dg.V3Icmp(payload=b""),
    dg.V3Icmp(payload=bytes(1281)),
])
def test_v3_encoder_refuses_what_does_not_fit(datagram: dg.V3Datagram) -> None:
    with pytest.raises(DatagramError):
        dg.encode_v3(datagram)


def test_v3_idle_hint_is_clamped_to_16_bits() -> None:
    reg = dg.V3Registration(request_id=1, address=ipaddress.IPv4Address("10.0.0.1"), port=1,
                            idle_hint_seconds=1 << 20)
    decoded = dg.decode_v3(dg.encode_v3(reg))
    assert isinstance(decoded, dg.V3Registration) and decoded.idle_hint_seconds == 0xFFFF


def test_request_id_log_form() -> None:
    assert dg.format_request_id(RID) == "0102030405060708090a0b0c0d0e0f10"
    assert dg.format_request_id(1) == "0" * 31 + "1"

"""wire/dns.py (the DNS codec) and lab/dns.py (what the sandbox's resolver answers)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.lab.dns import FEATURES_TXT, HTTP2_ONLY, PROTOCOL_TXT, SRV_NAME, LabZone
from tunnel_lab.wire import dns

# A query as Go's resolver sends it: id, RD, one question, an EDNS OPT record in the additionals.
GO_QUERY = bytes.fromhex(
    "beef01000001000000000001"
    "115f76322d6f726967696e74756e6e656c64045f746370"  # _v2-origintunneld._tcp
    "0a6172676f74756e6e656c03636f6d00"  # argotunnel.com
    "00210001"  # SRV IN
    "0000290580000000000000"  # OPT, 1408-byte payload, no options
)

ZONE = LabZone(
    regions={"region1.v2.argotunnel.com": ["127.0.1.1", "127.0.1.2"],
             "region2.v2.argotunnel.com": ["127.0.2.1", "127.0.2.2"]},
    services="127.0.3.1",
    eyeballs="127.0.0.1",
    routed=lambda name: name == "app.example.com",
)


def ask(name: str, qtype: int, *, zone: LabZone = ZONE) -> dns.Message:
    query = dns.Message(id=7, flags=dns.RD, questions=(dns.Question(name=name, qtype=qtype),))
    answer = zone.respond(dns.encode_message(query))
    assert answer is not None
    return dns.decode_message(answer)


def test_go_style_query_decodes() -> None:
    msg = dns.decode_message(GO_QUERY)
    assert msg.id == 0xBEEF and msg.flags == dns.RD and not msg.is_response
    assert msg.questions == (dns.Question(name=SRV_NAME, qtype=dns.SRV),)
    assert [r.rtype for r in msg.additionals] == [dns.OPT]


def test_srv_answer_names_both_regions_on_7844() -> None:
    reply = dns.decode_message(ZONE.respond(GO_QUERY) or b"")
    assert reply.id == 0xBEEF and reply.is_response and reply.rcode == dns.NOERROR
    assert reply.flags & dns.RD and reply.flags & dns.RA
    assert [(r.data.target, r.data.port) for r in reply.answers if isinstance(r.data, dns.SrvData)] == [
        ("region1.v2.argotunnel.com", 7844), ("region2.v2.argotunnel.com", 7844)]


def test_regions_have_two_addresses_each() -> None:
    assert [r.data for r in ask("Region1.V2.argotunnel.com.", dns.A).answers] == ["127.0.1.1", "127.0.1.2"]
    assert [r.data for r in ask("region2.v2.argotunnel.com", dns.A).answers] == ["127.0.2.1", "127.0.2.2"]


def test_txt_records_are_the_json_cloudflared_reads() -> None:
    (protocols,) = ask(PROTOCOL_TXT, dns.TXT).answers
    assert isinstance(protocols.data, tuple)
    assert json.loads(b"".join(protocols.data)) == [{"protocol": "quic", "percentage": 100},
                                                    {"protocol": "http2", "percentage": 100}]
    http2_only = LabZone(regions={}, services="127.0.3.1", eyeballs="127.0.0.1", protocols=HTTP2_ONLY)
    (record,) = ask(PROTOCOL_TXT, dns.TXT, zone=http2_only).answers
    assert isinstance(record.data, tuple)
    assert [p["percentage"] for p in json.loads(b"".join(record.data))] == [0, 100]
    (features,) = ask(FEATURES_TXT, dns.TXT).answers
    assert isinstance(features.data, tuple)
    assert json.loads(b"".join(features.data)) == {"dv3_2": 0}


@pytest.mark.parametrize("name", ["api.cloudflare.com", "api.trycloudflare.com", "login.cloudflareaccess.org",
                                  "dash.cloudflare.com"])
def test_service_names_point_at_the_services(name: str) -> None:
    assert [r.data for r in ask(name, dns.A).answers] == ["127.0.3.1"]


def test_routed_hostname_points_at_the_eyeballs_and_others_do_not_exist() -> None:
    assert [r.data for r in ask("app.example.com", dns.A).answers] == ["127.0.0.1"]
    missing = ask("other.example.com", dns.A)
    assert missing.rcode == dns.NXDOMAIN and missing.answers == ()
    assert ask("one.one.one.one", dns.A).rcode == dns.NXDOMAIN


def test_management_hostname_points_at_the_eyeballs() -> None:
    # cloudflared tail dials wss://management.argotunnel.com/logs: the edge's eyeball listener answers.
    assert [r.data for r in ask("management.argotunnel.com", dns.A).answers] == ["127.0.0.1"]


def test_known_name_other_type_is_nodata() -> None:
    reply = ask("api.cloudflare.com", dns.AAAA)
    assert reply.rcode == dns.NOERROR and reply.answers == ()


def test_not_a_query_opcode_and_class() -> None:
    notify = dns.Message(id=1, flags=4 << 11, questions=(dns.Question(name="x", qtype=dns.A),))
    assert ZONE.answer(notify).rcode == dns.NOTIMP
    chaos = dns.Message(id=1, questions=(dns.Question(name="version.bind", qtype=dns.TXT, qclass=3),))
    assert ZONE.answer(chaos).rcode == dns.REFUSED
    assert ZONE.answer(dns.Message(id=1)).rcode == dns.FORMERR


def test_malformed_query_gets_formerr_and_junk_gets_nothing() -> None:
    cut = GO_QUERY[:20]
    reply = dns.decode_message(ZONE.respond(cut) or b"")
    assert reply.id == 0xBEEF and reply.rcode == dns.FORMERR
    assert ZONE.respond(b"\x01") is None
    response_bits = dns.encode_message(dns.Message(id=3, flags=dns.QR))[:11]
    assert ZONE.respond(response_bits) is None


@pytest.mark.parametrize(("data", "offset", "what"), [
    (b"\x00" * 11, 11, "shorter than the 12-byte header"),
    (b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ab", 12, "label runs past the end"),
    (b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", 12, "pointer loop"),
    (b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x40", 12, "unsupported label type"),
    (b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01", 13, "before its type and class"),
    (b"\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", 12, "1 bytes after the last record"),
    (b"\x00\x01\x80\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x03abc",
     23, "A record with 3 bytes"),
])
def test_malformed_messages_say_where(data: bytes, offset: int, what: str) -> None:
    with pytest.raises(dns.DnsFormatError, match=what) as info:
        dns.decode_message(data)
    assert info.value.offset == offset


def test_compressed_names_are_followed() -> None:
    # A response whose answer name points back at the question name (offset 12).
    question = dns.encode_name("app.example.com") + struct.pack("!HH", dns.A, dns.IN)
    answer = b"\xc0\x0c" + struct.pack("!HHIH", dns.A, dns.IN, 30, 4) + bytes([127, 0, 0, 1])
    data = struct.pack("!HHHHHH", 9, dns.QR, 1, 1, 0, 0) + question + answer
    msg = dns.decode_message(data)
    assert msg.answers == (dns.Record(name="app.example.com", rtype=dns.A, ttl=30, data="127.0.0.1"),)


def test_long_txt_is_split_into_255_byte_strings() -> None:
    pieces = dns.txt_strings("x" * 600)
    assert [len(p) for p in pieces] == [255, 255, 90]
    assert dns.txt_strings("") == (b"",)


def test_encode_name_refuses_bad_labels() -> None:
    with pytest.raises(ValueError, match="1-63 bytes"):
        dns.encode_name("a..b")
    with pytest.raises(ValueError, match="1-63 bytes"):
        dns.encode_name("x" * 64 + ".com")
    with pytest.raises(ValueError, match="longer than 255"):
        dns.encode_name(".".join(["x" * 60] * 5))


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
_name = st.lists(_label, min_size=0, max_size=5).map(".".join)
_record = st.one_of(
    st.builds(lambda n, a: dns.Record(name=n, rtype=dns.A, data=a), _name,
              st.ip_addresses(v=4).map(str)),
    st.builds(lambda n, a: dns.Record(name=n, rtype=dns.AAAA, data=a), _name,
              st.ip_addresses(v=6).map(str)),
    st.builds(lambda n, p, w, port, t: dns.Record(name=n, rtype=dns.SRV, data=dns.SrvData(
        priority=p, weight=w, port=port, target=t)), _name, st.integers(0, 65535), st.integers(0, 65535),
        st.integers(0, 65535), _name),
    st.builds(lambda n, s: dns.Record(name=n, rtype=dns.TXT, data=tuple(s)), _name,
              st.lists(st.binary(max_size=255), min_size=1, max_size=3)),
    st.builds(lambda n, t, d: dns.Record(name=n, rtype=t, data=d), _name,
              st.sampled_from([5, 15, 99]), st.binary(max_size=40)),
)


@given(msg_id=st.integers(0, 65535), rcode=st.integers(0, 15), rd=st.booleans(),
       questions=st.lists(st.builds(lambda n, t: dns.Question(name=n, qtype=t), _name,
                                    st.integers(0, 65535)), max_size=3),
       answers=st.lists(_record, max_size=4), additionals=st.lists(_record, max_size=2))
def test_round_trip(msg_id: int, rcode: int, rd: bool, questions: list[dns.Question],
                    answers: list[dns.Record], additionals: list[dns.Record]) -> None:
    msg = dns.Message(id=msg_id, flags=dns.QR | (dns.RD if rd else 0), rcode=rcode,
                      questions=tuple(questions), answers=tuple(answers), additionals=tuple(additionals))
    assert dns.decode_message(dns.encode_message(msg)) == msg


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    try:
        dns.decode_message(data)
    except dns.DnsFormatError as exc:
        assert 0 <= exc.offset <= len(data)
    assert ZONE.respond(data) is None or len(ZONE.respond(data) or b"") >= 12

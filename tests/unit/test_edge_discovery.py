"""connector.edge_discovery against the lab's own zone (lab.dns.LabZone), and the protocol choice."""

from __future__ import annotations

import pytest

from tunnel_lab.connector import edge_discovery as ed
from tunnel_lab.connector.protocol import ProtocolChoice, choose_protocol, switch_threshold
from tunnel_lab.lab.dns import HTTP2_ONLY, LabZone
from tunnel_lab.wire import dns
from tunnel_lab.wire.errors import ProtocolError

ZONE = LabZone(
    regions={
        "region1.v2.argotunnel.com": ["127.0.1.1", "127.0.1.2"],
        "region2.v2.argotunnel.com": ["127.0.2.1", "127.0.2.2"],
    },
    services="127.0.3.1",
    eyeballs="127.0.0.1",
)


def zone_exchange(zone: LabZone) -> ed.Exchange:
    def exchange(query: bytes) -> bytes:
        return dns.encode_message(zone.answer(dns.decode_message(query)))

    return exchange


def test_regions_are_interleaved_and_the_protocol_record_read() -> None:
    found = ed.discover(zone_exchange(ZONE))
    assert found.addresses == ("127.0.1.1:7844", "127.0.2.1:7844", "127.0.1.2:7844", "127.0.2.2:7844")
    assert found.protocol_percentages == {"quic": 100, "http2": 100}
    assert ed.discover(
        zone_exchange(LabZone(regions=ZONE.regions, services="x", eyeballs="y", protocols=HTTP2_ONLY))
    ).protocol_percentages == {"quic": 0, "http2": 100}


def test_no_srv_record_is_an_error_that_says_what_to_do() -> None:
    def nxdomain(query: bytes) -> bytes:
        return dns.encode_message(dns.reply(dns.decode_message(query), rcode=dns.NXDOMAIN))

    with pytest.raises(ed.DiscoveryError, match="Could not lookup srv records") as info:
        ed.discover(nxdomain)
    assert "--edge" in str(info.value)


def test_a_silent_server_is_retried_then_reported() -> None:
    calls = 0

    def silent(query: bytes) -> bytes:
        nonlocal calls
        calls += 1
        raise TimeoutError("timed out")

    with pytest.raises(ed.DiscoveryError, match="timed out"):
        ed.discover(silent)
    assert calls == ed.ATTEMPTS


def test_a_mismatched_answer_is_not_believed() -> None:
    def wrong_id(query: bytes) -> bytes:
        msg = dns.decode_message(query)
        return dns.encode_message(
            dns.reply(dns.Message(id=(msg.id + 1) % 65536, flags=msg.flags, questions=msg.questions))
        )

    with pytest.raises(ProtocolError, match="does not match"):
        ed.lookup(wrong_id, ed.SRV_NAME, dns.SRV)


def test_nameservers_of_resolv_conf() -> None:
    assert ed.nameservers("# lab\nsearch x\nnameserver 127.0.0.1 # ours\nnameserver ::1\n") == [
        "127.0.0.1",
        "::1",
    ]
    assert ed.nameservers("") == ["127.0.0.1"]


def test_switch_threshold_is_fnv1a_mod_100() -> None:
    assert switch_threshold("") == 0x811C9DC5 % 100
    assert switch_threshold("a") == 0xE40C292C % 100


@pytest.mark.parametrize(
    ("flag", "token", "percentages", "expected"),
    [
        ("auto", False, None, ProtocolChoice("http2", False)),
        ("auto", False, {"quic": 100, "http2": 100}, ProtocolChoice("quic", True)),
        ("auto", False, {"quic": 0, "http2": 100}, ProtocolChoice("http2", False)),
        (
            "auto",
            False,
            {},
            ProtocolChoice("quic", True),
        ),  # nothing beats the threshold: the first of the list
        ("auto", True, {"quic": 0, "http2": 100}, ProtocolChoice("quic", True)),
        ("http2", False, {"quic": 100}, ProtocolChoice("http2", False)),
    ],
)
def test_auto_follows_the_protocol_record(
    flag: str, token: bool, percentages: dict[str, int] | None, expected: ProtocolChoice
) -> None:
    assert choose_protocol(flag, token_given=token, percentages=percentages, account_tag="acct") == expected

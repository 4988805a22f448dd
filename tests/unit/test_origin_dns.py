"""origin_fixtures.dns: the `dns` origin's answers, and the runner's query/answer helpers."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.origin_fixtures import dns


@pytest.mark.parametrize(("qtype", "answers"), [
    ("A", ["192.0.2.1"]), ("AAAA", ["2001:db8::1"]), ("TXT", ["tunnel-lab dns origin"])])
def test_queries_get_the_fixed_records(qtype: str, answers: list[str]) -> None:
    reply = dns.answer(dns.build_query("app.lab.test", qtype, query_id=7))
    assert reply is not None
    assert dns.parse_answer(reply) == (7, 0, answers)


def test_other_types_get_an_empty_answer() -> None:
    query = dns.build_query("x.test")[:-4] + struct.pack("!HH", 15, 1)  # MX
    reply = dns.answer(query)
    assert reply is not None and dns.parse_answer(reply) == (0x4C42, 0, [])


def test_a_malformed_query_gets_formerr_and_a_stub_nothing() -> None:
    reply = dns.answer(b"\x12\x34" + bytes(10) + b"\x05ab")  # header, 0 questions
    assert reply is not None and dns.parse_answer(reply)[:2] == (0x1234, dns.RCODE_FORMERR)
    assert dns.answer(b"short") is None


@given(st.binary(max_size=300))
def test_any_datagram_is_answered_or_ignored(data: bytes) -> None:
    reply = dns.answer(data)
    if reply is not None:
        with contextlib.suppress(dns.DNSFormatError):
            dns.parse_answer(reply)
        assert reply[:2] == data[:2]

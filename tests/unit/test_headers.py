"""wire.headers: Go canonical names, response-header serialization, stream classification, meta."""

from __future__ import annotations

import base64
import contextlib
import json
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire.errors import HeaderSerializationError, TunnelLabError
from tunnel_lab.wire.headers import (
    META_CLOUDFLARED,
    META_FLOW_LIMITED,
    META_ORIGIN,
    PROXY_SRC,
    PROXY_UPGRADE,
    StreamType,
    all_values,
    as_bytes,
    canonical_header_name,
    classify_stream,
    deserialize_response_headers,
    is_serialized_response_header,
    is_token,
    is_valid_value,
    parse_meta,
    serialize_response_headers,
)

TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
token_names = st.binary(min_size=1, max_size=20).map(lambda b: bytes(TOKEN[x % len(TOKEN)] for x in b))


# --- canonical names -------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "canonical"), [
    (b"x-custom", b"X-Custom"),
    (b"cf-connecting-ip", b"Cf-Connecting-Ip"),
    (b"sec-websocket-key", b"Sec-Websocket-Key"),
    (b"SEC-WEBSOCKET-ACCEPT", b"Sec-Websocket-Accept"),
    (b"te", b"Te"),
    (b"content-md5", b"Content-Md5"),
    (b"x--y", b"X--Y"),
    (b"-x", b"-X"),
    (b"1abc-2def", b"1abc-2def"),
    (b"a_b", b"A_b"),
    (b"x y", b"x y"),  # not a token: unchanged
    (b"caf\xc3\xa9", b"caf\xc3\xa9"),
    (b"", b""),
])
def test_canonical_header_name_examples(name: bytes, canonical: bytes) -> None:
    assert canonical_header_name(name) == canonical


@given(token_names)
def test_canonical_name_is_idempotent_and_case_blind(name: bytes) -> None:
    canon = canonical_header_name(name)
    assert canonical_header_name(canon) == canon
    assert canon.lower() == name.lower()
    assert canonical_header_name(name.upper()) == canon == canonical_header_name(name.lower())
    # Go's rule: upper after start or '-', lower elsewhere.
    for i, b in enumerate(canon):
        if chr(b).isalpha():
            assert chr(b).isupper() == (i == 0 or canon[i - 1] == ord("-"))


@given(st.binary(max_size=20))
def test_non_token_names_come_back_unchanged(name: bytes) -> None:
    if not name or any(b not in TOKEN for b in name):
        assert canonical_header_name(name) == name


# --- serialization ---------------------------------------------------------------------------------

def test_serialization_matches_the_observed_example() -> None:
    value = (b"WC1NdWx0aQ:YQ;WC1NdWx0aQ:Yg;U2V0LUNvb2tpZQ:YT0x;U2V0LUNvb2tpZQ:Yj0y;"
             b"Q29ubmVjdGlvbg:a2VlcC1hbGl2ZQ;Q29udGVudC1MZW5ndGg:MzU;WC1PcmlnaW4:eWVz")
    pairs = [(b"X-Multi", b"a"), (b"X-Multi", b"b"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
             (b"Connection", b"keep-alive"), (b"Content-Length", b"35"), (b"X-Origin", b"yes")]
    assert deserialize_response_headers(value) == pairs
    assert serialize_response_headers(pairs) == value


def test_serialization_is_unpadded_standard_base64() -> None:
    out = serialize_response_headers([(b"X-Odd-Value", b"semi;colon:and\xe9"), (b"A", b"\xfb\xff")])
    assert b"=" not in out
    assert b"+/" in out or b"/" in out  # standard alphabet, not URL-safe
    assert out == b"WC1PZGQtVmFsdWU:c2VtaTtjb2xvbjphbmTp;QQ:+/8"


def test_serialization_groups_values_of_one_name() -> None:
    out = serialize_response_headers([(b"A", b"1"), (b"B", b"2"), (b"A", b"3")])
    assert deserialize_response_headers(out) == [(b"A", b"1"), (b"A", b"3"), (b"B", b"2")]


@pytest.mark.parametrize(("name", "kept"), [
    (b":status", False), (b"Cf-Int-Tracing", False), (b"cf-cloudflared-response-meta", False),
    (b"Cf-Proxy-X", False), (b"Connection", True), (b"Upgrade", True), (b"Sec-Websocket-Accept", True),
    (b"Content-Length", True), (b"Cf-Ray", True), (b"Cf-Cache-Status", True), (b"X-Cf-Int-Y", True),
])
def test_exclusion_rules(name: bytes, kept: bool) -> None:
    assert is_serialized_response_header(name) is kept
    assert (serialize_response_headers([(name, b"v")]) != b"") is kept


def test_an_excluded_field_drops_only_itself() -> None:
    pairs = [(b":status", b"200"), (b"Cf-Int-Tracing", b"1"), (b"X-A", b"2"), (b"Cf-Proxy-X", b"3"),
             (b"B", b"4")]
    assert deserialize_response_headers(serialize_response_headers(pairs)) == [(b"X-A", b"2"), (b"B", b"4")]


def test_empty_and_empty_parts() -> None:
    assert serialize_response_headers([]) == b""
    assert deserialize_response_headers(b"") == []
    assert deserialize_response_headers(b";;QQ:Yg;;") == [(b"A", b"b")]
    assert deserialize_response_headers(b":") == [(b"", b"")]
    assert deserialize_response_headers("QQ:Yg") == [(b"A", b"b")]  # h2 may hand out str


@pytest.mark.parametrize("bad", [b"QQ", b"QQ:Yg:Yg", b"QQ==:Yg", b"Q:Yg", b"QQ:Y g", b"QQ:Y-", b"\xff:QQ"])
def test_deserialize_rejects_malformed_pairs(bad: bytes) -> None:
    with pytest.raises(HeaderSerializationError):
        deserialize_response_headers(bad)


def test_deserialize_skips_newlines_like_go() -> None:
    assert deserialize_response_headers(b"Q\r\nQ:Y\nQ") == [(b"A", b"a")]


header_pairs = st.lists(st.tuples(st.binary(max_size=30), st.binary(max_size=60)), max_size=12)


@given(header_pairs)
def test_serialization_round_trips_to_the_same_multiset(pairs: list[tuple[bytes, bytes]]) -> None:
    """Arbitrary names and values (';', ':', non-ASCII, empty) survive; excluded names are dropped."""
    decoded = deserialize_response_headers(serialize_response_headers(pairs))
    expected = [p for p in pairs if is_serialized_response_header(p[0])]
    assert Counter(decoded) == Counter(expected)
    # Repeats keep their relative order.
    for name in {n for n, _ in expected}:
        assert [v for n, v in decoded if n == name] == [v for n, v in expected if n == name]


@given(header_pairs)
def test_serialized_value_has_only_base64_and_separators(pairs: list[tuple[bytes, bytes]]) -> None:
    out = serialize_response_headers(pairs)
    allowed = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/:;")
    assert set(out) <= allowed
    assert not out.startswith(b";") and not out.endswith(b";")


@given(st.binary(max_size=200))
def test_deserialize_arbitrary_bytes_raises_only_project_errors(data: bytes) -> None:
    try:
        pairs = deserialize_response_headers(data)
    except HeaderSerializationError:
        return
    # Whatever decodes re-encodes to the same pairs (minus the names serialization excludes).
    again = deserialize_response_headers(serialize_response_headers(pairs))
    assert Counter(again) == Counter(p for p in pairs if is_serialized_response_header(p[0]))


@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=20)), max_size=6))
def test_deserialize_accepts_what_go_would_encode(pairs: list[tuple[bytes, bytes]]) -> None:
    value = b";".join(base64.b64encode(n).rstrip(b"=") + b":" + base64.b64encode(v).rstrip(b"=")
                      for n, v in pairs)
    assert deserialize_response_headers(value) == pairs


# --- meta ------------------------------------------------------------------------------------------

def test_meta_constants_parse() -> None:
    assert parse_meta(META_ORIGIN) == {"src": "origin"}
    assert parse_meta(META_CLOUDFLARED) == {"src": "cloudflared"}
    assert parse_meta(META_FLOW_LIMITED) == {"src": "cloudflared", "flow_rate_limited": True}
    assert json.dumps(parse_meta(META_ORIGIN), separators=(",", ":")).encode() == META_ORIGIN


@pytest.mark.parametrize("bad", [b"", b"{", b"[]", b'"origin"', b"\xff"])
def test_meta_errors(bad: bytes) -> None:
    with pytest.raises(HeaderSerializationError):
        parse_meta(bad)


@given(st.binary(max_size=50))
def test_parse_meta_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(TunnelLabError):
        assert isinstance(parse_meta(data), dict)


# --- classification ---------------------------------------------------------------------------------

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]


@pytest.mark.parametrize(("extra", "kind"), [
    ([], StreamType.HTTP),
    ([(PROXY_UPGRADE, b"control-stream")], StreamType.CONTROL),
    ([(PROXY_UPGRADE, b"websocket")], StreamType.WEBSOCKET),
    ([(PROXY_UPGRADE, b"update-configuration")], StreamType.CONFIGURATION),
    ([(PROXY_SRC, b"tcp://198.51.100.7:40000")], StreamType.TCP),
    ([(PROXY_SRC, b"")], StreamType.HTTP),
    ([(PROXY_UPGRADE, b"Websocket")], StreamType.HTTP),  # values compared exactly
    ([(PROXY_UPGRADE, b"websocket "), (PROXY_UPGRADE, b"websocket")], StreamType.HTTP),  # first value only
    ([(PROXY_SRC, b"x"), (PROXY_UPGRADE, b"control-stream")], StreamType.TCP),
    ([(PROXY_SRC, b"x"), (PROXY_UPGRADE, b"websocket")], StreamType.WEBSOCKET),
    ([(PROXY_SRC, b"x"), (PROXY_UPGRADE, b"update-configuration")], StreamType.CONFIGURATION),
    ([(PROXY_SRC, b""), (PROXY_SRC, b"x")], StreamType.HTTP),
])
def test_classify_examples(extra: list[tuple[bytes, bytes]], kind: StreamType) -> None:
    assert classify_stream(BASE + extra) is kind


upgrade_values = st.sampled_from([b"websocket", b"control-stream", b"update-configuration", b"", b"x",
                                  b"WEBSOCKET"])
src_values = st.sampled_from([b"", b"tcp://1.2.3.4:5", b"x"])
classify_fields = st.lists(st.one_of(
    st.tuples(st.just(PROXY_UPGRADE), upgrade_values),
    st.tuples(st.just(PROXY_SRC), src_values),
    st.tuples(st.sampled_from([b"x-other", b"cookie"]), st.binary(max_size=5)),
), max_size=6)


@given(classify_fields)
def test_classify_precedence_uses_first_values_only(fields: list[tuple[bytes, bytes]]) -> None:
    upgrade = next((v for k, v in fields if k == PROXY_UPGRADE), None)
    src = next((v for k, v in fields if k == PROXY_SRC), None)
    if upgrade == b"update-configuration":
        expected = StreamType.CONFIGURATION
    elif upgrade == b"websocket":
        expected = StreamType.WEBSOCKET
    elif src:
        expected = StreamType.TCP
    elif upgrade == b"control-stream":
        expected = StreamType.CONTROL
    else:
        expected = StreamType.HTTP
    assert classify_stream(BASE + fields) is expected
    # Once both fields have a first value, later values never change the answer.
    if upgrade is not None and src is not None:
        later = [(PROXY_UPGRADE, b"websocket"), (PROXY_SRC, b"y"), (PROXY_UPGRADE, b"update-configuration")]
        assert classify_stream(BASE + fields + later) is expected


# --- pinned by mutation testing (docs/mutation-report.md) --------------------------------------------

def test_as_bytes_keeps_undecodable_bytes_of_a_str() -> None:
    assert as_bytes("a\udcff") == b"a\xff"  # h2 decodes with surrogateescape; we must give the byte back


def test_as_bytes_copies_other_buffers() -> None:
    # h2 and hyperframe may hand a field over as a bytearray or a memoryview
    assert as_bytes(bytearray(b"x-a")) == b"x-a" and type(as_bytes(bytearray(b"x-a"))) is bytes
    assert as_bytes(memoryview(b"x-b")) == b"x-b"  # type: ignore[arg-type]


def test_token_and_value_checks_take_any_bytes_like() -> None:
    assert is_token(memoryview(b"x-a")) and not is_token(memoryview(b"x a"))
    assert not is_token("x-a")  # a str is never token *bytes*
    assert is_valid_value(memoryview(b"a\tb")) and not is_valid_value(memoryview(b"a\x00b"))
    assert is_valid_value(bytearray(b"ok")) and not is_valid_value(bytearray(b"\r\n"))


def test_canonical_name_upper_cases_z_after_a_dash() -> None:
    assert canonical_header_name(b"z-zz") == b"Z-Zz"
    assert canonical_header_name(b"A-ZZ") == b"A-Zz"


def test_serialized_value_ending_in_x_keeps_it() -> None:
    # base64 of \x00\x00\x17 is AAAX: only padding may be stripped, not a trailing X
    assert serialize_response_headers([(b"A", b"\x00\x00\x17")]) == b"QQ:AAAX"
    assert deserialize_response_headers(b"QQ:AAAX") == [(b"A", b"\x00\x00\x17")]


def test_deserialize_error_messages_name_the_pair_and_cut_long_parts() -> None:
    value = b"A" * 45 + b"-"
    with pytest.raises(HeaderSerializationError) as bad_byte:
        deserialize_response_headers(b"QQ:Yg;QQ:" + value)
    assert str(bad_byte.value) == (f"cf-cloudflared-response-headers: value of pair 1 {value[:40]!r} holds "
                                   "b'-', not in the unpadded base64 alphabet")
    with pytest.raises(HeaderSerializationError) as bad_name:
        deserialize_response_headers(b"Q-:Yg")
    assert str(bad_name.value).startswith("cf-cloudflared-response-headers: name of pair 0 b'Q-' holds b'-'")
    with pytest.raises(HeaderSerializationError) as bad_length:
        deserialize_response_headers(b"QQ:" + b"A" * 45)
    assert str(bad_length.value) == (f"cf-cloudflared-response-headers: value of pair 0 {b'A' * 40!r} "
                                     "has an impossible base64 length 45")
    with pytest.raises(HeaderSerializationError) as bad_name_length:
        deserialize_response_headers(b"QUFBQ:Yg")
    assert "name of pair 0 b'QUFBQ' has an impossible base64 length 5" in str(bad_name_length.value)
    pair = b"Q" * 70
    with pytest.raises(HeaderSerializationError) as no_colon:
        deserialize_response_headers(b";" + pair)
    assert str(no_colon.value) == (f"cf-cloudflared-response-headers: pair 1 {pair[:60]!r} "
                                   "does not have the form name:value")


def test_parse_meta_beyond_the_known_values_and_its_messages() -> None:
    assert parse_meta(b'{"src": "origin"}') == {"src": "origin"}  # not byte-equal to a known value
    assert parse_meta('{"src":"origin"}') == {"src": "origin"}
    long_text = b"{" + b"x" * 90
    with pytest.raises(HeaderSerializationError) as not_json:
        parse_meta(long_text)
    assert str(not_json.value).startswith(f"cf-cloudflared-response-meta {long_text[:80]!r} is not JSON: ")
    long_list = b"[" + b"1," * 50 + b"1]"
    with pytest.raises(HeaderSerializationError) as not_object:
        parse_meta(long_list)
    assert str(not_object.value) == f"cf-cloudflared-response-meta {long_list[:80]!r} is not a JSON object"


def test_all_values_in_order_any_case_bytes_or_str() -> None:
    headers = [(b"Set-Cookie", b"a=1"), ("x-other", "0"), ("set-cookie", "b=2"), (b"SET-COOKIE", b"c=3")]
    assert all_values(headers, b"Set-Cookie") == [b"a=1", b"b=2", b"c=3"]
    assert all_values(headers, b"missing") == []

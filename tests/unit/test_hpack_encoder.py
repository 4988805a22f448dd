"""wire.hpack_encoder + transport.hpack: long values leave as plain literals, short ones Huffman-coded,
all decodable; and the override of `hpack.Encoder.add` still takes effect."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.transport.hpack import LongValueEncoder
from tunnel_lab.wire.hpack_encoder import HUFFMAN_LIMIT, huffman_worthwhile


def test_a_long_value_is_a_plain_literal_and_decodes() -> None:
    value = b"h" * (HUFFMAN_LIMIT + 1)
    block = LongValueEncoder().encode([(b"x-huge", value)])
    # literal with incremental indexing, new name: 0x40, then the name, then the value's length prefix
    name_len = block[1] & 0x7F
    value_prefix = block[2 + name_len]
    assert not value_prefix & 0x80  # the long value is not
    assert value in block
    assert hpack.Decoder().decode(block, raw=True) == [(b"x-huge", value)]


def test_short_values_keep_huffman_coding_like_plain_hpack() -> None:
    headers = [(b":status", b"200"), (b"content-type", b"text/plain; charset=utf-8")]
    assert LongValueEncoder().encode(headers) == hpack.Encoder().encode(headers)


def test_the_override_still_reaches_hpack_internals() -> None:
    """Fails if hpack stops routing encode() through add(..., huffman) (the override would do nothing)."""
    calls: list[bool] = []

    class Spy(LongValueEncoder):
        def add(self, to_add: tuple[bytes, bytes], sensitive: bool, huffman: bool = False) -> bytes:
            calls.append(huffman)
            return super().add(to_add, sensitive, huffman)

    Spy().encode([(b"a", b"b")])
    assert calls == [True]


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=8).map(lambda b: b"x-" + b.hex().encode()),
                          st.binary(max_size=3 * HUFFMAN_LIMIT)), max_size=6))
def test_every_block_decodes_to_what_was_encoded(headers: list[tuple[bytes, bytes]]) -> None:
    encoder, decoder = LongValueEncoder(), hpack.Decoder()
    decoder.max_header_list_size = 1 << 20
    for _ in range(2):  # the dynamic table stays in step across blocks
        assert decoder.decode(encoder.encode(headers), raw=True) == headers


@pytest.mark.parametrize("size", [HUFFMAN_LIMIT, HUFFMAN_LIMIT + 1])
def test_the_limit_is_inclusive(size: int) -> None:
    block = LongValueEncoder().encode([(b"v", b"a" * size)])
    assert (b"a" * size in block) is (size > HUFFMAN_LIMIT)


@pytest.mark.parametrize(("name", "value", "expected"), [
    (b"a", b"b" * HUFFMAN_LIMIT, True), (b"a", b"b" * (HUFFMAN_LIMIT + 1), False),
    (b"a" * (HUFFMAN_LIMIT + 1), b"b", False), (b"a" * HUFFMAN_LIMIT, b"", True)])
def test_the_decision_looks_at_name_and_value(name: bytes, value: bytes, expected: bool) -> None:
    assert huffman_worthwhile(name, value) is expected


@pytest.mark.parametrize("size", [HUFFMAN_LIMIT, HUFFMAN_LIMIT + 1])
def test_the_limit_applies_to_names_too(size: int) -> None:
    name = b"x" * size
    block = LongValueEncoder().encode([(name, b"v")])
    assert (name in block) is (size > HUFFMAN_LIMIT)
    assert hpack.Decoder().decode(block, raw=True) == [(name, b"v")]


def test_sensitive_fields_stay_never_indexed() -> None:
    """A sensitive field (RFC 7541 §6.2.3, literal never indexed) is encoded as plain hpack does it."""
    headers = [(b"authorization", b"Bearer x", True), (b"x-b", b"y", False)]
    block = LongValueEncoder().encode(headers)
    assert block == hpack.Encoder().encode(headers)
    assert block[0] & 0xF0 == 0x10  # never indexed, new name


def test_add_keeps_hpacks_default_of_no_huffman() -> None:
    assert LongValueEncoder().add((b"x-a", b"b"), False) == hpack.Encoder().add((b"x-a", b"b"), False)


def _request(ray: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":path", b"/x"), (b"user-agent", b"bench"), *extra, (b"cf-ray", ray)]


def test_a_repeated_block_reuses_the_table_and_the_ray_is_never_indexed() -> None:
    encoder, decoder = LongValueEncoder(), hpack.Decoder()
    first = encoder.encode(_request(b"0123456789abcdef-LAB1"))
    entries = list(encoder.header_table.dynamic_entries)
    assert (b"cf-ray", b"0123456789abcdef-LAB1") not in entries
    assert decoder.decode(first, raw=True) == _request(b"0123456789abcdef-LAB1")
    second = encoder.encode(_request(b"fedcba9876543210-LAB1"))
    assert list(encoder.header_table.dynamic_entries) == entries  # nothing added: the memo stays valid
    assert decoder.decode(second, raw=True) == _request(b"fedcba9876543210-LAB1")
    assert second == encoder.encode(_request(b"fedcba9876543210-LAB1"))
    assert second[-1 - len(b"fedcba9876543210-LAB1"):] != first[-1 - len(b"fedcba9876543210-LAB1"):]


def test_a_memoised_field_is_not_reused_after_the_table_changed() -> None:
    """The same field moves to another index once a new entry is added: the memo must notice."""
    encoder = LongValueEncoder()
    before = encoder.encode([(b"x-a", b"1")])
    again = encoder.encode([(b"x-a", b"1")])  # now indexed: 62
    encoder.encode([(b"x-b", b"2")])  # x-a moves to 63
    after = encoder.encode([(b"x-a", b"1")])
    assert (before[0], again, after) == (0x40, b"\xbe", b"\xbf")


blocks = st.lists(st.lists(st.tuples(st.sampled_from([b"x-a", b"x-b", b"cf-ray", b"user-agent"]),
                                     st.sampled_from([b"1", b"22", b"a" * 40, b""])), max_size=6),
                  max_size=8)


@given(blocks, st.sampled_from([0, 64, 256, 4096]))
def test_blocks_with_repeats_decode_in_step_whatever_the_table_size(
        sequence: list[list[tuple[bytes, bytes]]], table_size: int) -> None:
    encoder, decoder = LongValueEncoder(), hpack.Decoder()
    encoder.header_table_size = table_size
    assert decoder.decode(encoder.encode([]), raw=True) == []  # the size update goes out first
    for headers in sequence * 2:
        twin = _without_memo(encoder)
        block = encoder.encode(headers)
        assert block == twin.encode(headers)
        assert decoder.decode(block, raw=True) == headers


def _without_memo(encoder: LongValueEncoder) -> LongValueEncoder:
    """A fresh encoder in the same table state: what the block must be without the memo."""
    twin = LongValueEncoder()
    table, theirs = twin.header_table, encoder.header_table
    table.maxsize, table._current_size, table.resized = theirs.maxsize, theirs._current_size, False
    table.dynamic_entries = type(theirs.dynamic_entries)(theirs.dynamic_entries)
    return twin

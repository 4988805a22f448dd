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

"""wire.capnp: framing, the incremental de-framer, bounds-checked readers, far pointers, the builder."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire.capnp import (
    COMPOSITE,
    POINTER,
    Message,
    MessageBuilder,
    MessageReader,
    frame_message,
    unframe,
)
from tunnel_lab.wire.errors import CapnpError, ProtocolError

BOOTSTRAP = bytes.fromhex("000000000500000000000000010001000800000000000000000000000100010000000000"
                          "000000000000000000000000")


def words(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def struct_ptr(offset: int, dw: int, pc: int) -> int:
    return ((offset << 2) & 0xFFFFFFFF) | (dw << 32) | (pc << 48)


def list_ptr(offset: int, size: int, count: int) -> int:
    return ((offset << 2) & 0xFFFFFFFF) | 1 | ((size | (count << 3)) << 32)


def far_ptr(segment: int, offset: int, double: bool = False) -> int:
    return (offset << 3) | (int(double) << 2) | 2 | (segment << 32)


# ------------------------------------------------------------------------------------------------
# Framing


def test_frame_single_segment_matches_capture() -> None:
    segments = unframe(BOOTSTRAP)
    assert len(segments) == 1 and len(segments[0]) == 40
    assert frame_message(segments) == BOOTSTRAP


def test_frame_pads_the_segment_table() -> None:
    two = frame_message([bytes(8), bytes(16)])
    # count-1, two sizes, then 4 bytes of padding: 16 bytes of table.
    assert two[:16] == struct.pack("<4I", 1, 1, 2, 0)
    assert unframe(two) == [bytes(8), bytes(16)]
    three = frame_message([bytes(8)] * 3)
    assert three[:16] == struct.pack("<4I", 2, 1, 1, 1)
    assert unframe(three) == [bytes(8)] * 3


def test_frame_rejects_bad_segments() -> None:
    with pytest.raises(ValueError):
        frame_message([])
    with pytest.raises(ValueError):
        frame_message([b"abc"])


SEGMENT = st.lists(st.binary(min_size=8, max_size=8), max_size=5).map(b"".join)


@given(st.lists(SEGMENT, min_size=1, max_size=6),
       st.lists(st.integers(min_value=1, max_value=50), max_size=10))
def test_deframer_reassembles_any_split(segments: list[bytes], cuts: list[int]) -> None:
    stream = frame_message(segments) * 2
    reader = MessageReader()
    got = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        reader.feed(stream[pos:pos + cut])
        pos += cut
        while (message := reader.next_message()) is not None:
            got.append(message)
    reader.feed(stream[pos:])
    while (message := reader.next_message()) is not None:
        got.append(message)
    assert got == [segments, segments]
    assert reader.buffered == 0


def test_deframer_limits_segments_before_buffering() -> None:
    reader = MessageReader(max_segments=4)
    reader.feed(struct.pack("<I", 4))  # 5 segments announced
    with pytest.raises(CapnpError, match="5 segments"):
        reader.next_message()


def test_deframer_limits_total_size_before_buffering() -> None:
    reader = MessageReader(max_message_bytes=1024)
    reader.feed(struct.pack("<II", 0, 129))  # 1032 bytes announced, none sent
    with pytest.raises(CapnpError, match="1032 bytes"):
        reader.next_message()
    reader = MessageReader()
    reader.feed(struct.pack("<II", 0, 0xFFFFFFFF))
    with pytest.raises(CapnpError, match="limit"):
        reader.next_message()


def test_deframer_waits_for_partial_table_and_body() -> None:
    reader = MessageReader()
    for i in range(len(BOOTSTRAP) - 1):
        reader.feed(BOOTSTRAP[i:i + 1])
        assert reader.next_message() is None
    reader.feed(BOOTSTRAP[-1:])
    assert reader.next_message() == unframe(BOOTSTRAP)


def test_unframe_rejects_truncated_and_trailing() -> None:
    with pytest.raises(CapnpError, match="truncated"):
        unframe(BOOTSTRAP[:-1])
    with pytest.raises(CapnpError, match="after the message"):
        unframe(BOOTSTRAP + b"\0")


# ------------------------------------------------------------------------------------------------
# Reading


def test_reads_bootstrap_capture() -> None:
    root = Message(unframe(BOOTSTRAP)).root()
    assert root.u16(0) == 8
    bootstrap = root.struct(0, "bootstrap")
    assert bootstrap.u32(0) == 0
    assert not bootstrap.has(0)


def test_fields_beyond_a_small_struct_read_as_defaults() -> None:
    # Root: 1 data word, 0 pointers; reading word 1 or pointer 0 gives defaults (schema evolution).
    root = Message([words(struct_ptr(0, 1, 0), 0x0102030405060708)]).root()
    assert root.u64(0) == 0x0102030405060708
    assert root.u8(0) == 8 and root.u16(6) == 0x0102
    assert root.u32(8) == 0 and root.i64(8) == 0
    assert root.flag(3) is True and root.flag(3, default=True) is False
    assert root.flag(100) is False and root.flag(100, default=True) is True
    assert root.text(0, "t") == "" and root.data(0, "d") == b"" and root.struct_or_none(0, "s") is None
    assert root.capability(0, "c") is None
    assert root.pointer_kind(5, "x") == "null"


def test_signed_reads() -> None:
    root = Message([words(struct_ptr(0, 2, 0), (1 << 64) - 2, 0x80000000)]).root()
    assert root.i64(0) == -2
    assert root.i32(8) == -(1 << 31)


def test_null_root_reads_as_empty_struct() -> None:
    root = Message([words(0)]).root()
    assert root.u64(0) == 0 and root.text(0, "x") == ""


def test_empty_segment_zero_is_an_error() -> None:
    with pytest.raises(CapnpError, match="segment 0 is empty"):
        Message([b""]).root()
    with pytest.raises(CapnpError, match="no segments"):
        Message([])
    with pytest.raises(CapnpError, match="whole number of words"):
        Message([b"abc"])


def test_struct_pointer_out_of_range_names_the_field() -> None:
    msg = Message([words(struct_ptr(0, 1, 1), 0, struct_ptr(5, 1, 0))])
    with pytest.raises(CapnpError, match=r"Call\.target.*outside segment 0"):
        msg.root().struct(0, "Call.target")
    negative = Message([words(struct_ptr(-5, 1, 0))])
    with pytest.raises(CapnpError, match="root"):
        negative.root()


def test_list_out_of_range_and_wrong_kinds() -> None:
    msg = Message([words(struct_ptr(0, 0, 3), list_ptr(2, 2, 100), struct_ptr(-1, 0, 0), list_ptr(0, 4, 1),
                         0)])
    root = msg.root()
    with pytest.raises(CapnpError, match=r"ClientInfo\.version: points outside"):
        root.text(0, "ClientInfo.version")
    with pytest.raises(CapnpError, match="expected a list pointer, got a struct pointer"):
        root.data(1, "x.data")
    with pytest.raises(CapnpError, match="expected a byte list, got a 4-byte list"):
        root.data(2, "x.data")
    with pytest.raises(CapnpError, match="expected a struct pointer, got a list pointer"):
        root.struct(2, "x.struct")


def test_text_must_be_nul_terminated() -> None:
    msg = Message([words(struct_ptr(0, 0, 1), list_ptr(0, 2, 3), int.from_bytes(b"abc", "little"))])
    with pytest.raises(CapnpError, match="NUL"):
        msg.root().text(0, "Exception.reason")
    ok = Message([words(struct_ptr(0, 0, 1), list_ptr(0, 2, 4), int.from_bytes(b"ab\xffc\0", "little"))])
    with pytest.raises(CapnpError, match="NUL"):
        ok.root().text(0, "x")
    good = Message([words(struct_ptr(0, 0, 1), list_ptr(0, 2, 4), int.from_bytes(b"a\xff\xfe\0", "little"))])
    assert good.root().text(0, "x") == "a\ufffd\ufffd"  # bad UTF-8 is replaced, not fatal


def test_capability_pointer() -> None:
    msg = Message([words(struct_ptr(0, 0, 2), 3 | (7 << 32), 0xFF)])
    root = msg.root()
    assert root.capability(0, "content") == 7
    assert root.pointer_kind(0, "content") == "capability"
    with pytest.raises(CapnpError, match="expected a struct pointer, got a capability"):
        root.struct(0, "content")
    with pytest.raises(CapnpError, match="unknown 'other' pointer"):
        root.pointer_kind(1, "content")
    with pytest.raises(CapnpError, match="expected a capability pointer"):
        Message([words(struct_ptr(0, 0, 1), struct_ptr(-1, 0, 0))]).root().capability(0, "x")


def test_composite_list_checks() -> None:
    # Tag claims 3 elements of 1 word in a 2-word list.
    msg = Message([words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 2), struct_ptr(3, 1, 0), 1, 2)])
    with pytest.raises(CapnpError, match="does not fit"):
        msg.root().struct_list(0, "capTable")
    bad_tag = Message([words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 1), list_ptr(1, 2, 1), 1)])
    with pytest.raises(CapnpError, match="tag"):
        bad_tag.root().struct_list(0, "capTable")
    not_composite = Message([words(struct_ptr(0, 0, 1), list_ptr(0, 5, 1), 1)])
    with pytest.raises(CapnpError, match="expected a struct list"):
        not_composite.root().struct_list(0, "capTable")


def test_composite_list_range_counts_the_tag_word() -> None:
    """A composite list's words plus its tag must fit: one word short is an error (not a 0 element)."""
    # root: 1 pointer -> list at word 2: tag + 2 elements of 1 data word = words 2..4
    fits = Message([words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 2), struct_ptr(2, 1, 0), 7, 8)])
    assert [e.u64(0) for e in fits.root().struct_list(0, "capTable")] == [7, 8]
    short = Message([words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 2), struct_ptr(2, 1, 0), 7)])
    outside = r"capTable: points outside segment 0 \(words 2\.\.5, segment has 4\)"
    with pytest.raises(CapnpError, match=outside):
        short.root().struct_list(0, "capTable")


def test_check_range_bounds_exactly() -> None:
    """An object may end exactly at the segment end; one word more, or a negative start, is outside."""
    exact = Message([words(struct_ptr(0, 2, 0), 1, 2)])
    assert (exact.root().u64(0), exact.root().u64(8)) == (1, 2)
    with pytest.raises(CapnpError, match=r"root: points outside segment 0 \(words 1\.\.4, segment has 3\)"):
        Message([words(struct_ptr(0, 3, 0), 1, 2)]).root()
    with pytest.raises(CapnpError, match=r"root: points outside segment 0 \(words -1\.\.0, segment has 2\)"):
        Message([words(struct_ptr(-2, 1, 0), 5)]).root()
    # a list ending exactly at the segment end, and one byte beyond it
    assert Message([words(struct_ptr(0, 0, 1), list_ptr(0, 2, 8), 0x0706050403020100)]).root().data(
        0, "d") == bytes(range(8))
    with pytest.raises(CapnpError, match=r"d: points outside segment 0 \(words 2\.\.4, segment has 3\)"):
        Message([words(struct_ptr(0, 0, 1), list_ptr(0, 2, 9), 0)]).root().data(0, "d")


def test_single_far_pointer() -> None:
    seg0 = words(far_ptr(1, 0))
    seg1 = words(struct_ptr(0, 1, 0), 42)
    assert Message([seg0, seg1]).root().u64(0) == 42


def test_double_far_pointer() -> None:
    seg0 = words(far_ptr(1, 0, double=True))
    seg1 = words(far_ptr(2, 0), struct_ptr(0, 1, 1))
    seg2 = words(99, list_ptr(0, 2, 3), int.from_bytes(b"hi\0", "little"))
    root = Message([seg0, seg1, seg2]).root()
    assert root.u64(0) == 99
    assert root.text(0, "name") == "hi"


def test_far_pointer_errors() -> None:
    with pytest.raises(CapnpError, match="segment 3"):
        Message([words(far_ptr(3, 0))]).root()
    with pytest.raises(CapnpError, match="landing pad"):
        Message([words(far_ptr(1, 5)), words(0)]).root()
    with pytest.raises(CapnpError, match="another far pointer"):
        Message([words(far_ptr(1, 0)), words(far_ptr(0, 0))]).root()
    with pytest.raises(CapnpError, match="double-far landing pad"):
        Message([words(far_ptr(1, 0, double=True)), words(struct_ptr(0, 1, 0), 0)]).root()
    with pytest.raises(CapnpError, match="double-far tag"):
        Message([words(far_ptr(1, 0, double=True)), words(far_ptr(0, 0), 3)]).root()
    with pytest.raises(CapnpError, match="segment 9"):
        Message([words(far_ptr(1, 0, double=True)), words(far_ptr(9, 0), struct_ptr(0, 1, 0))]).root()
    # Double-far to an object that overruns its segment.
    with pytest.raises(CapnpError, match="outside segment 2"):
        Message([words(far_ptr(1, 0, double=True)), words(far_ptr(2, 0), struct_ptr(0, 4, 0)),
                 words(1)]).root()


def test_self_referencing_struct_hits_the_nesting_limit() -> None:
    # A struct whose only pointer points at itself: reading down forever must stop.
    msg = Message([words(struct_ptr(0, 0, 1), struct_ptr(-1, 0, 1))])
    reader = msg.root()
    with pytest.raises(CapnpError, match=r"nesting limit|traversal limit"):
        for _ in range(1000):
            reader = reader.struct(0, "loop")


def test_amplification_hits_the_traversal_limit() -> None:
    # 1000 pointers to the same 100-word struct: 100,000 words of reading from an 1,100-word message.
    n = 1000
    body = [struct_ptr(0, 0, n), *[struct_ptr(n - 1 - i, 100, 0) for i in range(n)], *([7] * 100)]
    root = Message([words(*body)]).root()
    with pytest.raises(CapnpError, match="traversal limit"):
        for i in range(n):
            root.struct(i, f"p{i}")


def test_void_list_with_huge_count_is_not_free() -> None:
    msg = Message([words(struct_ptr(0, 0, 1), list_ptr(0, 0, (1 << 29) - 1))])
    with pytest.raises(CapnpError, match="traversal limit"):
        msg.root().list_at(0, "x")
    zero_sized = Message([words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 0), struct_ptr(1 << 20, 0, 0))])
    with pytest.raises(CapnpError, match="traversal limit"):
        zero_sized.root().struct_list(0, "capTable")


# ------------------------------------------------------------------------------------------------
# Building


def test_builder_round_trip_of_every_kind() -> None:
    msg = MessageBuilder()
    root = msg.init_root(2, 6)
    root.set_u8(0, 0xAB)
    root.set_u16(2, 0xBEEF)
    root.set_u32(4, 0xDEADBEEF)
    root.set_i64(8, -5)
    root.set_bool(1, True)
    root.set_bool(70, False, default=True)
    root.set_text(0, "héllo")
    root.set_data(1, b"\x00\x01")
    child = root.init_struct(2, 1, 0)
    child.set_i32(0, -7)
    root.set_text_list(3, ["a", "", "ü"])
    items = root.init_struct_list(4, 2, 1, 1)
    items[1].set_u32(4, 9)
    items[1].set_text(0, "x")
    root.set_capability(5, 2)
    r = Message(unframe(msg.to_bytes())).root()
    assert (r.u8(0), r.u16(2), r.u32(4), r.i64(8)) == (0xAB, 0xBEEF, 0xDEADBEEF, -5)
    assert r.flag(1) is True and r.flag(70, default=True) is False and r.u8(8) == 0xFB  # i64 -5 low byte
    assert r.text(0, "t") == "héllo" and r.data(1, "d") == b"\x00\x01"
    assert r.struct(2, "s").i32(0) == -7
    assert r.text_list(3, "l") == ["a", "", "ü"]
    elements = r.struct_list(4, "sl")
    assert [e.u32(4) for e in elements] == [0, 9]
    assert elements[1].text(0, "x") == "x"
    assert r.capability(5, "c") == 2
    lst = r.list_at(3, "l")
    assert lst is not None and lst.element_size == POINTER and len(lst) == 3


def test_builder_zero_sized_struct_uses_offset_minus_one() -> None:
    msg = MessageBuilder()
    msg.init_root(0, 1).init_struct(0, 0, 0)
    assert msg.segments()[0] == bytes.fromhex("0000000000000100" "fcffffff00000000")


def test_builder_rejects_out_of_section_writes() -> None:
    sb = MessageBuilder().init_root(1, 1)
    with pytest.raises(IndexError):
        sb.set_u64(8, 1)
    with pytest.raises(IndexError):
        sb.set_bool(64, True)
    with pytest.raises(IndexError):
        sb.set_text(1, "x")
    with pytest.raises(OverflowError):
        sb.set_u8(0, 256)


def test_copy_struct_deep_copies_every_pointer_kind() -> None:
    src = MessageBuilder()
    root = src.init_root(1, 4)
    root.set_u64(0, 5)
    root.set_text(0, "abc")
    root.init_struct_list(1, 2, 1, 1)[0].set_text(0, "deep")
    root.set_text_list(2, ["x", "y"])
    root.set_capability(3, 1)
    original = Message(src.segments()).root()
    out = MessageBuilder()
    out.init_root(0, 1).copy_struct(0, original, "copy")
    copy = Message(out.segments()).root().struct(0, "copy")
    assert copy.u64(0) == 5 and copy.text(0, "t") == "abc"
    assert copy.struct_list(1, "l")[0].text(0, "t") == "deep"
    assert copy.text_list(2, "l") == ["x", "y"]
    assert copy.capability(3, "c") == 1


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_capnp_errors(data: bytes) -> None:
    reader = MessageReader(max_message_bytes=4096)
    reader.feed(data)
    try:
        while (segments := reader.next_message()) is not None:
            root = Message(segments).root()
            _walk(root, 4)
    except ProtocolError:
        pass


@given(st.lists(st.binary(min_size=8, max_size=8), min_size=1, max_size=40).map(b"".join),
       st.lists(st.binary(min_size=8, max_size=8), max_size=10).map(b"".join))
def test_arbitrary_segments_only_raise_capnp_errors(seg0: bytes, seg1: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        _walk(Message([seg0, seg1]).root(), 5)


def _walk(reader: object, depth: int) -> None:
    """Read everything reachable, every way the decoders do."""
    from tunnel_lab.wire.capnp import StructReader

    assert isinstance(reader, StructReader)
    for off in range(0, reader.data_words * 8 + 8):
        reader.u8(off)
    reader.flag(5)
    if depth == 0:
        return
    for i in range(min(reader.pointer_count, 8)):
        kind = reader.pointer_kind(i, f"p{i}")
        if kind == "struct":
            _walk(reader.struct(i, f"p{i}"), depth - 1)
        elif kind == "list":
            lst = reader.list_at(i, f"p{i}")
            assert lst is not None
            for getter in (reader.data, reader.text, reader.text_list, reader.struct_list):
                try:
                    result = getter(i, f"p{i}")
                except ProtocolError:
                    continue
                if isinstance(result, list):
                    for element in result[:4]:
                        if isinstance(element, StructReader):
                            _walk(element, depth - 1)
        elif kind == "capability":
            reader.capability(i, f"p{i}")

"""wire.capnp details pinned by mutation testing (docs/mutation-report.md): limits at their exact bounds,
error messages that name the field being read, and the reader's and builder's arithmetic."""

from __future__ import annotations

import pytest

from tests.unit.test_capnp_codec import far_ptr, list_ptr, struct_ptr, words
from tunnel_lab.wire.capnp import (
    BIT,
    BYTE,
    COMPOSITE,
    POINTER,
    Message,
    MessageBuilder,
    MessageReader,
    frame_message,
)
from tunnel_lab.wire.errors import CapnpError

# --- framing -------------------------------------------------------------------------------------


def test_frame_message_refusals_say_why() -> None:
    with pytest.raises(ValueError, match=r"^a message has at least one segment$"):
        frame_message([])
    with pytest.raises(ValueError, match=r"^segment length must be a multiple of 8 bytes$"):
        frame_message([b"abc"])


def test_reader_limits_hold_at_their_exact_bounds() -> None:
    two = frame_message([words(0), words(0)])
    reader = MessageReader(max_segments=2, max_message_bytes=16)
    reader.feed(two)
    assert reader.next_message() == [words(0), words(0)]
    reader = MessageReader(max_segments=2)
    reader.feed(frame_message([words(0)] * 3))
    with pytest.raises(CapnpError, match=r"^capnp framing: 3 segments announced, limit is 2$"):
        reader.next_message()
    reader = MessageReader(max_message_bytes=16)
    reader.feed(frame_message([words(0, 0, 0)]))
    with pytest.raises(CapnpError, match=r"^capnp framing: message of 24 bytes announced, limit is 16$"):
        reader.next_message()


# --- errors name the field -----------------------------------------------------------------------


def test_list_errors_name_the_field() -> None:
    root = Message([words(struct_ptr(0, 0, 3), struct_ptr(2, 0, 0), list_ptr(1, 4, 1), list_ptr(0, BYTE, 2),
                          int.from_bytes(b"ab", "little"))]).root()
    with pytest.raises(CapnpError, match=r"^capnp pointer x\.data: expected a list pointer, got a struct"):
        root.data(0, "x.data")
    with pytest.raises(CapnpError, match=r"^capnp pointer x\.data: expected a byte list, got a 4-byte list$"):
        root.data(1, "x.data")
    with pytest.raises(CapnpError, match=r"^capnp pointer x\.text: expected a byte list, got a 4-byte list$"):
        root.text(1, "x.text")
    with pytest.raises(CapnpError, match=r"^capnp pointer x\.text: text is not NUL-terminated$"):
        root.text(2, "x.text")
    with pytest.raises(CapnpError, match=r"^capnp pointer x\.list\[0\]: expected a struct list, got a byte"):
        root.struct_list(2, "x.list")
    with pytest.raises(CapnpError, match=r"^capnp pointer x\.names: expected a list pointer"):
        root.text_list(0, "x.names")
    not_pointers = r"^capnp pointer x\.names\[0\]: expected a pointer list, got a byte"
    with pytest.raises(CapnpError, match=not_pointers):
        root.text_list(2, "x.names")


def test_element_errors_name_the_element() -> None:
    # a pointer list of two texts, the second not NUL-terminated; then a 4-byte list as a text element
    root = Message([words(struct_ptr(0, 0, 2), list_ptr(1, POINTER, 2), list_ptr(2, POINTER, 1),
                          list_ptr(2, BYTE, 2), list_ptr(2, BYTE, 2), list_ptr(2, 4, 1),
                          int.from_bytes(b"a\0", "little"), int.from_bytes(b"bc", "little"), 0)]).root()
    with pytest.raises(CapnpError, match=r"^capnp pointer x\.names\[1\]: text is not NUL-terminated$"):
        root.text_list(0, "x.names")
    with pytest.raises(CapnpError, match=r"^capnp pointer x\.names\[0\]: expected a byte list, got a 4-byte"):
        root.text_list(1, "x.names")
    # a composite list whose second element's pointer is a struct, read as a struct list then its text
    caps = Message([words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 4), struct_ptr(2, 1, 1),
                          0, 0, 0, struct_ptr(-1, 0, 0))]).root().struct_list(0, "capTable")
    with pytest.raises(CapnpError, match=r"^capnp pointer capTable\[1\]\.id: expected a list pointer"):
        caps[1].text(0, "capTable[1].id")
    with pytest.raises(CapnpError, match=r"^capnp pointer capTable: composite list of 3 elements of 2 words "
                                         r"does not fit in 4 words$"):
        Message([words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 4), struct_ptr(3, 1, 1), 0, 0, 0, 0)]
                ).root().struct_list(0, "capTable")


def test_traversal_limit_names_the_field_and_charges_words_not_bytes() -> None:
    # root (1 word) + a 64-byte list (8 words) = 9 words exactly
    seg = words(struct_ptr(0, 0, 1), list_ptr(0, BYTE, 64), *([0] * 8))
    assert Message([seg], traversal_limit_words=9).root().data(0, "d") == bytes(64)
    with pytest.raises(CapnpError, match=r"^capnp message: traversal limit exceeded at d "
                                         r"\(a pointer loop or amplification\)$"):
        Message([seg], traversal_limit_words=8).root().data(0, "d")
    composite = words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 2), struct_ptr(2, 1, 0), 0, 0)
    with pytest.raises(CapnpError, match=r"^capnp message: traversal limit exceeded at caps "):
        Message([composite], traversal_limit_words=2).root().struct_list(0, "caps")


def test_composite_and_pointer_lists_use_one_nesting_level() -> None:
    # root -> List(struct) -> element -> struct: three levels below the limit's start
    seg = words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 1), struct_ptr(1, 0, 1), struct_ptr(-1, 0, 0))
    Message([seg], nesting_limit=3).root().struct_list(0, "l")[0].struct(0, "e")
    with pytest.raises(CapnpError, match=r"^capnp pointer e: nesting limit exceeded$"):
        Message([seg], nesting_limit=2).root().struct_list(0, "l")[0].struct(0, "e")
    texts = words(struct_ptr(0, 0, 1), list_ptr(0, POINTER, 1), list_ptr(0, BYTE, 1), 0)
    assert Message([texts], nesting_limit=3).root().text_list(0, "t") == [""]
    with pytest.raises(CapnpError, match=r"^capnp pointer t\[0\]: nesting limit exceeded$"):
        Message([texts], nesting_limit=2).root().text_list(0, "t")


def test_bit_list_size_rounds_up_to_whole_words() -> None:
    fits = words(struct_ptr(0, 0, 1), list_ptr(0, BIT, 65), 0, 0)
    assert Message([fits]).root().list_at(0, "bits") is not None
    with pytest.raises(CapnpError, match=r"bits: points outside segment 0 \(words 2\.\.4, segment has 3\)"):
        Message([words(struct_ptr(0, 0, 1), list_ptr(0, BIT, 65), 0)]).root().list_at(0, "bits")


def test_kind_names_in_errors() -> None:
    with pytest.raises(CapnpError, match=r"expected a struct pointer, got an unknown 'other' pointer$"):
        Message([words(struct_ptr(0, 0, 1), 7)]).root().struct(0, "x")
    # a far pointer is followed first: here to the root's own struct pointer (segment 0, word 0)
    with pytest.raises(CapnpError,
                       match=r"^capnp pointer x: expected a capability pointer, got a struct pointer$"):
        Message([words(struct_ptr(0, 0, 1), 2)]).root().capability(0, "x")


# --- the struct reader ---------------------------------------------------------------------------


def test_null_struct_reads_defaults_even_where_the_segment_has_bytes() -> None:
    empty = Message([words(struct_ptr(0, 0, 1), 0)]).root().struct(0, "x")
    assert empty.u64(0) == 0 and not empty.has(0) and empty.pointer_word(0) == 0


def test_signed_reads_and_bools_at_the_edges() -> None:
    root = Message([words(struct_ptr(0, 2, 0), 0x7F_FFFFFFFE, 0x80000000_00000005)]).root()
    assert root.i32(0) == -2  # the byte after the field (0x7F) is not part of it
    assert root.i32(8) == 5 and root.i32(12) == -(1 << 31)
    assert root.flag(127) and not root.flag(126) and root.flag(64)


def test_pointer_section_reads() -> None:
    root = Message([words(struct_ptr(0, 0, 2), list_ptr(1, BYTE, 0), 0, 0)]).root()
    assert root.has(0) and not root.has(1) and not root.has(2)
    assert root.pointer_word(0) == list_ptr(1, BYTE, 0) and root.pointer_word(5) == 0
    assert root.text(0, "t") == ""  # an empty list, not even a NUL: lenient
    assert root.capability(1, "c") is None and root.capability(9, "c") is None
    assert (root.pointer_kind(0, "p"), root.pointer_kind(1, "p"), root.pointer_kind(7, "p")) == (
        "list", "null", "null")


def test_list_index_bounds() -> None:
    caps = Message([words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 1), struct_ptr(1, 1, 0), 0)]
                   ).root().list_at(0, "l")
    assert caps is not None
    with pytest.raises(IndexError) as exc:
        caps.struct(1, "l")
    assert exc.value.args == (1,)
    names = Message([words(struct_ptr(0, 0, 1), list_ptr(0, POINTER, 1), 0)]).root().list_at(0, "n")
    assert names is not None and names.text(0, "n[0]") == ""
    with pytest.raises(IndexError) as exc:
        names.text(1, "n[1]")
    assert exc.value.args == (1,)


def test_text_list_over_a_composite_list_reads_each_element_pointer() -> None:
    # List(struct{data: 1 word, 1 pointer}) read as List(Text): element i's pointer, past its data word
    seg = words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 4), struct_ptr(2, 1, 1),
                0xAAAA, list_ptr(2, BYTE, 2), 0xBBBB, list_ptr(1, BYTE, 2),
                int.from_bytes(b"a\0", "little"), int.from_bytes(b"b\0", "little"))
    assert Message([seg]).root().text_list(0, "t") == ["a", "b"]
    no_pointers = words(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 1), struct_ptr(1, 1, 0), 0)
    with pytest.raises(CapnpError, match=r"^capnp pointer t\[0\]: expected a pointer list, got a composite"):
        Message([no_pointers]).root().text_list(0, "t")


# --- the builder ---------------------------------------------------------------------------------


def test_builder_writes_exactly_the_field_bytes() -> None:
    msg = MessageBuilder()
    root = msg.init_root(1, 0)
    root.set_u8(2, 7)
    root.set_u16(0, 0xFFFF)
    assert Message(msg.segments()).root().u8(2) == 7  # a u16 writes two bytes, not three
    root.set_u8(6, 9)
    root.set_i32(2, -1)
    back = Message(msg.segments()).root()
    assert back.u16(0) == 0xFFFF and back.i32(2) == -1 and back.u8(6) == 9
    root.set_bool(9, True)
    root.set_bool(10, True)
    root.set_bool(9, False)
    back = Message(msg.segments()).root()
    assert not back.flag(9) and back.flag(10) and back.u8(0) == 0xFF


def test_builder_refusals_say_where() -> None:
    root = MessageBuilder().init_root(1, 1)
    with pytest.raises(IndexError, match=r"^data offset 7 outside a 1-word data section$"):
        root.set_u16(7, 1)
    with pytest.raises(IndexError, match=r"^bit 64 outside a 1-word data section$"):
        root.set_bool(64, True)
    with pytest.raises(IndexError, match=r"^pointer 1 outside a struct with 1 pointers$"):
        root.set_text(1, "x")
    builder = MessageBuilder()
    builder._list_pointer(0, 1, BYTE, (1 << 29) - 1)  # the largest count a list pointer holds
    with pytest.raises(ValueError, match=r"^list too long for a capnp list pointer$"):
        builder._list_pointer(0, 1, BYTE, 1 << 29)


def test_zero_sized_struct_is_written_with_offset_minus_one() -> None:
    msg = MessageBuilder()
    empty = msg.init_root(0, 0)
    assert msg.segments() == [words(0xFFFFFFFC)]
    assert (empty.data_words, empty.pointer_count) == (0, 0)
    with pytest.raises(IndexError):
        empty.set_u8(0, 1)
    with pytest.raises(IndexError):
        empty.set_text(0, "x")
    assert msg.segments() == [words(0xFFFFFFFC)]  # nothing was written past the pointer


def test_copy_pointer_copies_one_pointer_of_any_kind() -> None:
    src = Message([words(struct_ptr(0, 0, 3), list_ptr(2, BYTE, 3), 0, 3 | (5 << 32),
                         int.from_bytes(b"hi\0", "little"))]).root()
    out = MessageBuilder()
    root = out.init_root(0, 4)
    root.copy_pointer(0, src, 0, "t")
    root.copy_pointer(1, src, 1, "null")
    root.copy_pointer(2, src, 2, "cap")
    root.copy_pointer(3, src, 9, "outside")  # beyond the source's pointers: left null
    back = Message(out.segments()).root()
    assert back.text(0, "t") == "hi" and not back.has(1) and back.capability(2, "cap") == 5
    assert not back.has(3)
    with pytest.raises(IndexError, match=r"^pointer 4 outside a struct with 4 pointers$"):
        root.copy_pointer(4, src, 0, "t")


def test_pointer_kind_errors_name_the_field() -> None:
    with pytest.raises(CapnpError, match=r"^capnp pointer p: far pointer to segment 4, message has 1$"):
        Message([words(struct_ptr(0, 0, 1), 2 | (4 << 32))]).root().pointer_kind(0, "p")


def test_copy_errors_name_the_path_to_the_bad_pointer() -> None:
    def copy(*source_words: int) -> None:
        MessageBuilder().init_root(0, 1).copy_struct(0, Message([words(*source_words)]).root(), "copy")

    # root -> struct -> an unknown 'other' pointer
    with pytest.raises(CapnpError, match=r"^capnp pointer copy\.p0\.p0: unknown 'other' pointer$"):
        copy(struct_ptr(0, 0, 1), struct_ptr(0, 0, 1), 7)
    # root -> List(struct) -> element 1 -> bad pointer
    with pytest.raises(CapnpError, match=r"^capnp pointer copy\.p0\[1\]\.p0: unknown 'other' pointer$"):
        copy(struct_ptr(0, 0, 1), list_ptr(0, COMPOSITE, 2), struct_ptr(2, 0, 1), 0, 7)
    # root -> List(pointer) -> element 1 bad
    with pytest.raises(CapnpError, match=r"^capnp pointer copy\.p0\[1\]: unknown 'other' pointer$"):
        copy(struct_ptr(0, 0, 1), list_ptr(0, POINTER, 2), 0, 7)
    with pytest.raises(CapnpError, match=r"^capnp pointer copy\.p0: far pointer to segment 4"):
        copy(struct_ptr(0, 0, 1), 2 | (4 << 32))
    with pytest.raises(CapnpError, match=r"^capnp pointer copy\.p0: points outside segment 0"):
        copy(struct_ptr(0, 0, 1), struct_ptr(0, 5, 0))
    with pytest.raises(CapnpError, match=r"^capnp pointer copy\.p0: points outside segment 0"):
        copy(struct_ptr(0, 0, 1), list_ptr(0, BYTE, 100))


def test_copied_data_lists_keep_their_exact_size() -> None:
    eight = bytes(range(8))
    sixty_five = bytes(range(65))
    padded = sixty_five + bytes(7)
    source = Message([words(struct_ptr(0, 0, 3), list_ptr(2, BYTE, 8), list_ptr(2, BYTE, 65),
                            list_ptr(10, BIT, 65),
                            int.from_bytes(eight, "little"),
                            *(int.from_bytes(padded[i:i + 8], "little") for i in range(0, 72, 8)),
                            2**64 - 1, 1)]).root()
    out = MessageBuilder()
    out.init_root(0, 1).copy_struct(0, source, "copy")
    copied = Message(out.segments()).root().struct(0, "copy")
    assert copied.data(0, "a") == eight and copied.data(1, "b") == sixty_five
    bits = copied.list_at(2, "c")
    assert bits is not None and len(bits) == 65
    assert len(out.segments()[0]) == 8 * (1 + 1 + 3 + 1 + 9 + 2)  # root, struct, data: nothing more


# --- far pointers: landing pads built by hand, as the encoding spec lays them out ------------------
# A far pointer (kind 2) names a segment and a word in it, the landing pad. A single pad (B=0) is an
# ordinary pointer, read as if it stood there; a double pad (B=1) is two words: a single far pointer to
# the object's first word, then a tag word (a struct or list pointer with offset 0) that describes it.


def test_single_far_pad_offsets_count_from_the_pad() -> None:
    # root -> far(segment 1, word 1); the pad at word 1 is a struct pointer with offset 1: object at word 3
    seg1 = words(struct_ptr(0, 2, 0), struct_ptr(1, 1, 0), 0xBAD, 42)
    root = Message([words(far_ptr(1, 1)), seg1]).root()
    assert (root.data_words, root.pointer_count, root.u64(0)) == (1, 0, 42)


def test_a_null_pad_is_a_null_pointer() -> None:
    root = Message([words(struct_ptr(0, 0, 2), far_ptr(1, 0), far_ptr(1, 0)), words(0)]).root()
    assert root.pointer_kind(0, "p") == "null"
    assert root.struct_or_none(0, "p") is None and root.list_at(1, "l") is None


def test_far_pointers_lead_to_lists_and_capabilities() -> None:
    seg0 = words(struct_ptr(0, 0, 3), far_ptr(1, 0), far_ptr(1, 1), far_ptr(1, 2))
    seg1 = words(list_ptr(0, 0, 0), 3 | (7 << 32), list_ptr(0, BYTE, 3), int.from_bytes(b"hi\0", "little"))
    root = Message([seg0, seg1]).root()
    empty = root.list_at(0, "void")
    assert empty is not None and len(empty) == 0
    # Go's reader follows far pointers to a capability too (pointer_kind and capability agree)
    assert root.pointer_kind(1, "cap") == "capability" and root.capability(1, "cap") == 7
    assert root.text(2, "text") == "hi"


def test_far_pointer_segment_bounds_are_exact() -> None:
    with pytest.raises(CapnpError, match=r"^capnp pointer root: far pointer to segment 1, message has 1$"):
        Message([words(far_ptr(1, 0))]).root()
    pad_to_missing = [words(far_ptr(1, 0, double=True)), words(far_ptr(2, 0), struct_ptr(0, 1, 0))]
    with pytest.raises(CapnpError, match=r"^capnp pointer root: landing pad points to segment 2, "
                                         r"message has 2$"):
        Message(pad_to_missing).root()


def test_a_double_pad_needs_two_words() -> None:
    # the pad is the last word of segment 1: its tag word would be outside
    with pytest.raises(CapnpError, match=r"^capnp pointer root \(landing pad\): points outside segment 1 "
                                         r"\(words 0\.\.2, segment has 1\)$"):
        Message([words(far_ptr(1, 0, double=True)), words(far_ptr(2, 0)), words(5)]).root()


def test_a_double_pad_is_a_single_far_pointer() -> None:
    double_in_double = [words(far_ptr(1, 0, double=True)), words(far_ptr(2, 0, double=True),
                                                                  struct_ptr(0, 1, 0)), words(5)]
    with pytest.raises(CapnpError, match=r"^capnp pointer root: double-far landing pad is not a single "
                                         r"far pointer$"):
        Message(double_in_double).root()


def test_double_far_reads_the_tag_after_the_pad_and_the_object_where_the_pad_says() -> None:
    # pad at segment 1 word 1 (word 0 is a decoy struct pointer), object at segment 2 word 1 (odd offset)
    seg1 = words(struct_ptr(0, 2, 0), far_ptr(2, 1), struct_ptr(0, 1, 0))
    root = Message([words(far_ptr(1, 1, double=True)), seg1, words(0xBAD, 42)]).root()
    assert (root.data_words, root.pointer_count, root.u64(0)) == (1, 0, 42)


def test_far_pointer_errors_name_the_field_being_read() -> None:
    root = Message([words(struct_ptr(0, 0, 2), far_ptr(5, 0), far_ptr(5, 0))]).root()
    with pytest.raises(CapnpError, match=r"^capnp pointer Call\.target: far pointer to segment 5, "
                                         r"message has 1$"):
        root.struct(0, "Call.target")
    with pytest.raises(CapnpError, match=r"^capnp pointer ClientInfo\.version: far pointer to segment 5"):
        root.text(1, "ClientInfo.version")
    with pytest.raises(CapnpError, match=r"^capnp pointer t: far pointer to segment 5, message has 1$"):
        MessageBuilder().init_root(0, 1).copy_pointer(0, root, 0, "t")


# --- limits --------------------------------------------------------------------------------------


def test_default_traversal_limit_is_eight_times_the_message_plus_1024_words() -> None:
    # 2 words: the budget is 8 * 2 + 1024 = 1040 words; the root charges 1 (its pointer), a void list
    # charges its element count
    def read_void_list(count: int) -> None:
        Message([words(struct_ptr(0, 0, 1), list_ptr(0, 0, count))]).root().list_at(0, "v")

    read_void_list(1039)
    with pytest.raises(CapnpError, match=r"^capnp message: traversal limit exceeded at v "
                                         r"\(a pointer loop or amplification\)$"):
        read_void_list(1040)


def test_a_struct_costs_its_data_words_plus_its_pointers() -> None:
    seg = words(struct_ptr(0, 1, 1), 5, 0)
    assert Message([seg], traversal_limit_words=2).root().u64(0) == 5
    with pytest.raises(CapnpError, match=r"^capnp message: traversal limit exceeded at root "):
        Message([seg], traversal_limit_words=1).root()


def test_message_shape_errors_are_exact() -> None:
    with pytest.raises(CapnpError, match=r"^capnp message has no segments$"):
        Message([])
    with pytest.raises(CapnpError, match=r"^capnp message: segment 0 is empty, there is no root pointer$"):
        Message([b""]).root()
    with pytest.raises(CapnpError, match=r"^capnp segment 1 is not a whole number of words$"):
        Message([words(0), b"abc"])

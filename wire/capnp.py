"""A small hand-written Cap'n Proto codec: stream framing, bounds-checked readers, a one-segment builder.

Only what the control stream needs, and nothing that trusts the peer:

- `frame_message` / `MessageReader` / `unframe`: the standard stream framing (u32 LE segment count - 1,
  u32 LE size in words of each segment, padding to 8 bytes, the segments). Several segments are
  accepted; segment count and total size are limited.
- `Message(segments).root()` gives a `StructReader`. Every pointer is checked against its segment
  (struct, list, text, data, capability and far pointers, single and double landing pads); a bad one
  raises `CapnpError` naming the field. A traversal limit (words read, proportional to the message
  size) and a nesting limit bound the work a hostile message can cause.
- `MessageBuilder` writes single-segment messages, allocating objects in the order they are set
  (depth first), which is how the captured edge messages were laid out.

Wire layout notes (docs/protocol.md §3.2): struct pointer = offset<<2 | 0, data words, pointer count;
list pointer = offset<<2 | 1, element size (3 bits) | count<<3; far pointer = offset<<3 | double<<2 | 2,
segment id; capability pointer = 3, cap table index.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from tunnel_lab.wire.errors import CapnpError

WORD = 8

#: Default limits for de-framing (a message the control stream will ever carry is far smaller).
DEFAULT_MAX_SEGMENTS = 512
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
DEFAULT_NESTING_LIMIT = 64

# Pointer kinds (low two bits of a pointer word).
_STRUCT, _LIST, _FAR, _OTHER = 0, 1, 2, 3

# List element size codes.
VOID, BIT, BYTE, TWO_BYTES, FOUR_BYTES, EIGHT_BYTES, POINTER, COMPOSITE = range(8)
_ELEMENT_BITS = {VOID: 0, BIT: 1, BYTE: 8, TWO_BYTES: 16, FOUR_BYTES: 32, EIGHT_BYTES: 64, POINTER: 64}
_SIZE_NAMES = {VOID: "void", BIT: "bit", BYTE: "byte", TWO_BYTES: "2-byte", FOUR_BYTES: "4-byte",
               EIGHT_BYTES: "8-byte", POINTER: "pointer", COMPOSITE: "composite"}

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


# --------------------------------------------------------------------------------------------------
# Stream framing


def frame_message(segments: Sequence[bytes]) -> bytes:
    """Frame segments for a byte stream: segment table, padding, then the segments."""
    if not segments:
        raise ValueError("a message has at least one segment")
    table = [len(segments) - 1]
    for seg in segments:
        if len(seg) % WORD:
            raise ValueError("segment length must be a multiple of 8 bytes")
        table.append(len(seg) // WORD)
    if len(table) % 2:
        table.append(0)  # pad the table to a word boundary
    return struct.pack(f"<{len(table)}I", *table) + b"".join(bytes(s) for s in segments)


class MessageReader:
    """Incremental de-framer: `feed()` stream bytes, take whole messages with `next_message()`.

    Raises `CapnpError` as soon as a segment table announces more than `max_segments` segments or
    more than `max_message_bytes` of segment data, before buffering it.
    """

    def __init__(self, *, max_segments: int = DEFAULT_MAX_SEGMENTS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_segments = max_segments
        self.max_message_bytes = max_message_bytes
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        """Append bytes received from the stream."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole message."""
        return len(self._buf)

    def next_message(self) -> list[bytes] | None:
        """Return the next complete message's segments, or None if more bytes are needed."""
        buf = self._buf
        if len(buf) < 4:
            return None
        count = _U32.unpack_from(buf, 0)[0] + 1
        if count > self.max_segments:
            raise CapnpError(f"capnp framing: {count} segments announced, limit is {self.max_segments}")
        header = 4 + 4 * count
        header += header % WORD  # pad to 8 bytes
        if len(buf) < 4 + 4 * count:
            return None
        sizes = struct.unpack_from(f"<{count}I", buf, 4)
        total = sum(sizes) * WORD
        if total > self.max_message_bytes:
            raise CapnpError(f"capnp framing: message of {total} bytes announced, "
                             f"limit is {self.max_message_bytes}")
        if len(buf) < header + total:
            return None
        segments = []
        pos = header
        for size in sizes:
            segments.append(bytes(buf[pos:pos + size * WORD]))
            pos += size * WORD
        del buf[:pos]
        return segments


def unframe(data: bytes, **limits: int) -> list[bytes]:
    """Parse exactly one framed message (no trailing bytes) into its segments."""
    reader = MessageReader(**limits)
    reader.feed(data)
    segments = reader.next_message()
    if segments is None:
        raise CapnpError(f"capnp framing: truncated message ({len(data)} bytes)")
    if reader.buffered:
        raise CapnpError(f"capnp framing: {reader.buffered} bytes after the message")
    return segments


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a resolved pointer leads: the segment, the first word of the object, the pointer word
    that describes it (the landing pad's or tag's for far pointers). A capability pointer has no
    object: its `word` is never read."""

    seg: int
    word: int
    raw: int


class Message:
    """A received message's segments plus the limits that bound reading it."""

    def __init__(self, segments: Sequence[bytes], *, traversal_limit_words: int | None = None,
                 nesting_limit: int = DEFAULT_NESTING_LIMIT) -> None:
        self.segments = [bytes(s) for s in segments]
        if not self.segments:
            raise CapnpError("capnp message has no segments")
        for i, seg in enumerate(self.segments):
            if len(seg) % WORD:
                raise CapnpError(f"capnp segment {i} is not a whole number of words")
        self._sizes = [len(s) // WORD for s in self.segments]
        total = sum(self._sizes)
        self._budget = traversal_limit_words if traversal_limit_words is not None else 8 * total + 1024
        self.nesting_limit = nesting_limit

    @classmethod
    def from_bytes(cls, data: bytes) -> Message:
        """A message from one framed message (segment table included)."""
        return cls(unframe(data))

    def root(self) -> StructReader:
        """The root struct (a null root reads as an empty struct)."""
        if self._sizes[0] < 1:
            raise CapnpError("capnp message: segment 0 is empty, there is no root pointer")
        reader = self._struct_at(0, 0, "root", self.nesting_limit)
        return reader if reader is not None else StructReader.empty(self)

    # -- internals shared by the readers --

    def _word(self, seg: int, idx: int) -> int:
        return _U64.unpack_from(self.segments[seg], idx * WORD)[0]

    def _charge(self, words: int, what: str) -> None:
        self._budget -= max(words, 1)
        if self._budget < 0:
            raise CapnpError(f"capnp message: traversal limit exceeded at {what} "
                             "(a pointer loop or amplification)")

    def _check_range(self, seg: int, start: int, words: int, what: str) -> None:
        if start < 0 or start + words > self._sizes[seg]:
            raise CapnpError(f"capnp pointer {what}: points outside segment {seg} "
                             f"(words {start}..{start + words}, segment has {self._sizes[seg]})")

    def _resolve(self, seg: int, idx: int, what: str) -> _Target | None:
        """Follow the pointer at (seg, idx), through far pointers; None for a null pointer."""
        raw = self._word(seg, idx)
        if raw == 0:
            return None
        if raw & 3 != _FAR:
            return _Target(seg, idx + 1 + _signed_offset(raw), raw)
        double = (raw >> 2) & 1
        pad = (raw & 0xFFFFFFFF) >> 3
        pad_seg = raw >> 32
        if pad_seg >= len(self.segments):
            raise CapnpError(f"capnp pointer {what}: far pointer to segment {pad_seg}, "
                             f"message has {len(self.segments)}")
        self._check_range(pad_seg, pad, 2 if double else 1, f"{what} (landing pad)")
        pad_raw = self._word(pad_seg, pad)
        if not double:
            if pad_raw & 3 == _FAR:
                raise CapnpError(f"capnp pointer {what}: landing pad is another far pointer")
            if pad_raw == 0:
                return None
            return _Target(pad_seg, pad + 1 + _signed_offset(pad_raw), pad_raw)
        # Double-far: the pad is a far pointer to the object plus a tag word that describes it.
        if pad_raw & 3 != _FAR or (pad_raw >> 2) & 1:
            raise CapnpError(f"capnp pointer {what}: double-far landing pad is not a single far pointer")
        obj_seg = pad_raw >> 32
        if obj_seg >= len(self.segments):
            raise CapnpError(f"capnp pointer {what}: landing pad points to segment {obj_seg}, "
                             f"message has {len(self.segments)}")
        tag = self._word(pad_seg, pad + 1)
        if tag & 3 not in (_STRUCT, _LIST):
            raise CapnpError(f"capnp pointer {what}: double-far tag is not a struct or list pointer")
        return _Target(obj_seg, (pad_raw & 0xFFFFFFFF) >> 3, tag)

    def _resolve_kind(self, seg: int, idx: int, what: str, depth: int, kind: int) -> _Target | None:
        """`_resolve`, then check the pointer is of `kind` (_STRUCT or _LIST) and nesting is left."""
        target = self._resolve(seg, idx, what)
        if target is None:
            return None
        if target.raw & 3 != kind:
            raise CapnpError(f"capnp pointer {what}: expected {_kind_name(kind)}, "
                             f"got {_kind_name(target.raw)}")
        if depth <= 0:
            raise CapnpError(f"capnp pointer {what}: nesting limit exceeded")
        return target

    def _struct_at(self, seg: int, idx: int, what: str, depth: int) -> StructReader | None:
        target = self._resolve_kind(seg, idx, what, depth, _STRUCT)
        if target is None:
            return None
        dw = (target.raw >> 32) & 0xFFFF
        pc = target.raw >> 48
        self._check_range(target.seg, target.word, dw + pc, what)
        self._charge(dw + pc, what)
        return StructReader(self, target.seg, target.word, dw, target.word + dw, pc, depth - 1)

    def _list_at(self, seg: int, idx: int, what: str, depth: int) -> ListReader | None:
        target = self._resolve_kind(seg, idx, what, depth, _LIST)
        if target is None:
            return None
        size = (target.raw >> 32) & 7
        count = target.raw >> 35
        if size == COMPOSITE:
            words = count
            self._check_range(target.seg, target.word, words + 1, what)
            tag = self._word(target.seg, target.word)
            if tag & 3 != _STRUCT:
                raise CapnpError(f"capnp pointer {what}: composite list tag is not a struct tag")
            elements = (tag & 0xFFFFFFFF) >> 2
            dw = (tag >> 32) & 0xFFFF
            pc = tag >> 48
            if elements * (dw + pc) > words:
                raise CapnpError(f"capnp pointer {what}: composite list of {elements} elements of "
                                 f"{dw + pc} words does not fit in {words} words")
            # Zero-sized elements still cost one unit each, so a huge count cannot be free.
            self._charge(max(words, elements), what)
            return ListReader(self, target.seg, target.word + 1, COMPOSITE, elements, dw, pc, depth - 1)
        words = (count * _ELEMENT_BITS[size] + 63) // 64
        self._check_range(target.seg, target.word, words, what)
        self._charge(max(words, count if size == VOID else 0), what)
        return ListReader(self, target.seg, target.word, size, count, 0, 0, depth - 1)


def _decode_text(raw: bytes, what: str) -> str:
    if not raw:
        return ""  # an empty list instead of a lone NUL: lenient, as Go's reader is
    if raw[-1] != 0:
        raise CapnpError(f"capnp pointer {what}: text is not NUL-terminated")
    return raw[:-1].decode("utf-8", errors="replace")


def _signed_offset(raw: int) -> int:
    off = (raw & 0xFFFFFFFF) >> 2
    return off - (1 << 30) if off & (1 << 29) else off


def _kind_name(raw: int) -> str:
    """The kind of a resolved pointer word (`_resolve` has followed any far pointer)."""
    kind = raw & 3
    if kind == _OTHER:
        return "a capability pointer" if raw & 0xFFFFFFFF == 3 else "an unknown 'other' pointer"
    return "a struct pointer" if kind == _STRUCT else "a list pointer"


class StructReader:
    """Read access to one struct. Fields outside the (possibly older, smaller) struct read as defaults."""

    __slots__ = ("_data", "_depth", "_msg", "_ptrs", "_seg", "data_words", "pointer_count")

    def __init__(self, msg: Message, seg: int, data: int, data_words: int, ptrs: int, pointer_count: int,
                 depth: int) -> None:
        self._msg = msg
        self._seg = seg
        self._data = data
        self.data_words = data_words
        self._ptrs = ptrs
        self.pointer_count = pointer_count
        self._depth = depth

    @classmethod
    def empty(cls, msg: Message) -> StructReader:
        """A struct with no fields: every read gives the default."""
        return cls(msg, 0, 0, 0, 0, 0, msg.nesting_limit)

    @property
    def message(self) -> Message:
        return self._msg

    # data section
    def _uint(self, byte_offset: int, size: int) -> int:
        if byte_offset + size > self.data_words * WORD:
            return 0
        start = self._data * WORD + byte_offset
        return int.from_bytes(self._msg.segments[self._seg][start:start + size], "little")

    def u8(self, byte_offset: int) -> int:
        return self._uint(byte_offset, 1)

    def u16(self, byte_offset: int) -> int:
        return self._uint(byte_offset, 2)

    def u32(self, byte_offset: int) -> int:
        return self._uint(byte_offset, 4)

    def u64(self, byte_offset: int) -> int:
        return self._uint(byte_offset, 8)

    def i32(self, byte_offset: int) -> int:
        v = self._uint(byte_offset, 4)
        return v - (1 << 32) if v & (1 << 31) else v

    def i64(self, byte_offset: int) -> int:
        v = self._uint(byte_offset, 8)
        return v - (1 << 64) if v & (1 << 63) else v

    def flag(self, bit: int, default: bool = False) -> bool:
        """A Bool at bit offset `bit`; stored XOR its default (so default-true bools are inverted)."""
        byte = self._uint(bit // 8, 1)
        return bool((byte >> (bit % 8)) & 1) != default

    # pointer section
    def _ptr_word(self, index: int) -> int | None:
        return self._ptrs + index if index < self.pointer_count else None

    def pointer_word(self, index: int) -> int:
        """The raw 64-bit pointer word `index` (0 if outside the pointer section)."""
        idx = self._ptr_word(index)
        return 0 if idx is None else self._msg._word(self._seg, idx)

    def has(self, index: int) -> bool:
        """Whether pointer `index` is non-null."""
        idx = self._ptr_word(index)
        return idx is not None and self._msg._word(self._seg, idx) != 0

    def struct(self, index: int, what: str) -> StructReader:
        """The struct at pointer `index`; a null pointer reads as an empty struct."""
        reader = self.struct_or_none(index, what)
        return reader if reader is not None else StructReader.empty(self._msg)

    def struct_or_none(self, index: int, what: str) -> StructReader | None:
        idx = self._ptr_word(index)
        if idx is None:
            return None
        return self._msg._struct_at(self._seg, idx, what, self._depth)

    def list_at(self, index: int, what: str) -> ListReader | None:
        """The list at pointer `index`, or None if null."""
        idx = self._ptr_word(index)
        if idx is None:
            return None
        return self._msg._list_at(self._seg, idx, what, self._depth)

    def data(self, index: int, what: str) -> bytes:
        """A Data field (byte list); null reads as b""."""
        lst = self.list_at(index, what)
        if lst is None:
            return b""
        return lst.as_bytes(what)

    def text(self, index: int, what: str) -> str:
        """A Text field (NUL-terminated byte list); null reads as "". Bad UTF-8 is replaced, not fatal."""
        lst = self.list_at(index, what)
        if lst is None:
            return ""
        return _decode_text(lst.as_bytes(what), what)

    def text_list(self, index: int, what: str) -> list[str]:
        """A List(Text); null reads as []."""
        lst = self.list_at(index, what)
        if lst is None:
            return []
        return [lst.text(i, f"{what}[{i}]") for i in range(len(lst))]

    def struct_list(self, index: int, what: str) -> list[StructReader]:
        """A List(struct); null reads as []."""
        lst = self.list_at(index, what)
        if lst is None:
            return []
        return [lst.struct(i, f"{what}[{i}]") for i in range(len(lst))]

    def capability(self, index: int, what: str) -> int | None:
        """The cap-table index of a capability pointer (reached through far pointers, as Go's reader
        and `pointer_kind` do), or None if null."""
        idx = self._ptr_word(index)
        if idx is None:
            return None
        target = self._msg._resolve(self._seg, idx, what)
        if target is None:
            return None
        if target.raw & 0xFFFFFFFF != 3:
            raise CapnpError(f"capnp pointer {what}: expected a capability pointer, "
                             f"got {_kind_name(target.raw)}")
        return target.raw >> 32

    def pointer_kind(self, index: int, what: str) -> str:
        """'null', 'struct', 'list' or 'capability' (after following far pointers)."""
        idx = self._ptr_word(index)
        if idx is None:
            return "null"
        target = self._msg._resolve(self._seg, idx, what)
        if target is None:
            return "null"
        kind = target.raw & 3
        if kind == _OTHER:
            if target.raw & 0xFFFFFFFF != 3:
                raise CapnpError(f"capnp pointer {what}: unknown 'other' pointer")
            return "capability"
        return "struct" if kind == _STRUCT else "list"


class ListReader:
    """Read access to one list."""

    __slots__ = ("_depth", "_msg", "_seg", "_start", "count", "data_words", "element_size", "pointer_count")

    def __init__(self, msg: Message, seg: int, start: int, element_size: int, count: int,
                 data_words: int, pointer_count: int, depth: int) -> None:
        self._msg = msg
        self._seg = seg
        self._start = start
        self.element_size = element_size
        self.count = count
        self.data_words = data_words
        self.pointer_count = pointer_count
        self._depth = depth

    def __len__(self) -> int:
        return self.count

    def as_bytes(self, what: str) -> bytes:
        if self.element_size != BYTE:
            raise CapnpError(f"capnp pointer {what}: expected a byte list, got a "
                             f"{_SIZE_NAMES[self.element_size]} list")
        start = self._start * WORD
        return self._msg.segments[self._seg][start:start + self.count]

    def struct(self, i: int, what: str) -> StructReader:
        if self.element_size != COMPOSITE:
            raise CapnpError(f"capnp pointer {what}: expected a struct list, got a "
                             f"{_SIZE_NAMES[self.element_size]} list")
        if not 0 <= i < self.count:
            raise IndexError(i)
        step = self.data_words + self.pointer_count
        word = self._start + i * step
        return StructReader(self._msg, self._seg, word, self.data_words, word + self.data_words,
                            self.pointer_count, self._depth)

    def _pointer_word(self, i: int, what: str) -> int:
        if not 0 <= i < self.count:
            raise IndexError(i)
        if self.element_size == POINTER:
            return self._start + i
        if self.element_size == COMPOSITE and self.pointer_count > 0:
            return self._start + i * (self.data_words + self.pointer_count) + self.data_words
        raise CapnpError(f"capnp pointer {what}: expected a pointer list, got a "
                         f"{_SIZE_NAMES[self.element_size]} list")

    def text(self, i: int, what: str) -> str:
        lst = self._msg._list_at(self._seg, self._pointer_word(i, what), what, self._depth)
        if lst is None:
            return ""
        return _decode_text(lst.as_bytes(what), what)


# --------------------------------------------------------------------------------------------------
# Building (single segment)


class MessageBuilder:
    """Builds a single-segment message; objects are placed in the order they are created."""

    def __init__(self) -> None:
        self._buf = bytearray(WORD)  # word 0: the root pointer

    def alloc(self, words: int) -> int:
        """Reserve `words` zeroed words at the end; returns the first word's index."""
        start = len(self._buf) // WORD
        self._buf += bytes(words * WORD)
        return start

    def init_root(self, data_words: int, pointer_count: int) -> StructBuilder:
        return self._init_struct_at(0, data_words, pointer_count)

    def segments(self) -> list[bytes]:
        return [bytes(self._buf)]

    def to_bytes(self) -> bytes:
        """The framed message, ready for the stream."""
        return frame_message(self.segments())

    # -- pointer writers --

    def _put_word(self, idx: int, value: int) -> None:
        _U64.pack_into(self._buf, idx * WORD, value)

    def _struct_pointer(self, ptr: int, target: int, dw: int, pc: int) -> None:
        offset = target - (ptr + 1)
        self._put_word(ptr, ((offset << 2) & 0xFFFFFFFF) | (dw << 32) | (pc << 48))

    def _list_pointer(self, ptr: int, target: int, size: int, count: int) -> None:
        offset = target - (ptr + 1)
        if count >= 1 << 29:
            raise ValueError("list too long for a capnp list pointer")
        self._put_word(ptr, ((offset << 2) & 0xFFFFFFFF) | 1 | ((size | (count << 3)) << 32))

    def _init_struct_at(self, ptr: int, dw: int, pc: int) -> StructBuilder:
        if dw == 0 and pc == 0:
            # A zero-sized struct is written with offset -1, as the C++ and Go encoders do.
            self._put_word(ptr, 0xFFFFFFFC)
            return StructBuilder(self, ptr + 1, 0, ptr + 1, 0)
        start = self.alloc(dw + pc)
        self._struct_pointer(ptr, start, dw, pc)
        return StructBuilder(self, start, dw, start + dw, pc)

    def _init_struct_list_at(self, ptr: int, count: int, dw: int, pc: int) -> list[StructBuilder]:
        step = dw + pc
        tag = self.alloc(1 + count * step)
        self._list_pointer(ptr, tag, COMPOSITE, count * step)
        self._put_word(tag, ((count << 2) & 0xFFFFFFFF) | (dw << 32) | (pc << 48))
        firsts = [tag + 1 + i * step for i in range(count)]
        return [StructBuilder(self, first, dw, first + dw, pc) for first in firsts]

    def _bytes_at(self, ptr: int, payload: bytes) -> None:
        start = self.alloc((len(payload) + WORD - 1) // WORD)
        self._buf[start * WORD:start * WORD + len(payload)] = payload
        self._list_pointer(ptr, start, BYTE, len(payload))


class StructBuilder:
    """Write access to one struct being built."""

    __slots__ = ("_data", "_msg", "_ptrs", "data_words", "pointer_count")

    def __init__(self, msg: MessageBuilder, data: int, data_words: int, ptrs: int,
                 pointer_count: int) -> None:
        self._msg = msg
        self._data = data
        self.data_words = data_words
        self._ptrs = ptrs
        self.pointer_count = pointer_count

    def _set(self, byte_offset: int, size: int, value: int, signed: bool = False) -> None:
        if byte_offset + size > self.data_words * WORD:
            raise IndexError(f"data offset {byte_offset} outside a {self.data_words}-word data section")
        start = self._data * WORD + byte_offset
        self._msg._buf[start:start + size] = value.to_bytes(size, "little", signed=signed)

    def set_u8(self, byte_offset: int, value: int) -> None:
        self._set(byte_offset, 1, value)

    def set_u16(self, byte_offset: int, value: int) -> None:
        self._set(byte_offset, 2, value)

    def set_u32(self, byte_offset: int, value: int) -> None:
        self._set(byte_offset, 4, value)

    def set_u64(self, byte_offset: int, value: int) -> None:
        self._set(byte_offset, 8, value)

    def set_i32(self, byte_offset: int, value: int) -> None:
        self._set(byte_offset, 4, value, signed=True)

    def set_i64(self, byte_offset: int, value: int) -> None:
        self._set(byte_offset, 8, value, signed=True)

    def set_bool(self, bit: int, value: bool, default: bool = False) -> None:
        """Set a Bool, stored XOR its default."""
        if bit >= self.data_words * 64:
            raise IndexError(f"bit {bit} outside a {self.data_words}-word data section")
        pos = self._data * WORD + bit // 8
        mask = 1 << (bit % 8)
        if bool(value) != default:
            self._msg._buf[pos] |= mask
        else:
            self._msg._buf[pos] &= ~mask & 0xFF

    def _ptr(self, index: int) -> int:
        if not 0 <= index < self.pointer_count:
            raise IndexError(f"pointer {index} outside a struct with {self.pointer_count} pointers")
        return self._ptrs + index

    def init_struct(self, index: int, data_words: int, pointer_count: int) -> StructBuilder:
        return self._msg._init_struct_at(self._ptr(index), data_words, pointer_count)

    def set_data(self, index: int, value: bytes) -> None:
        self._msg._bytes_at(self._ptr(index), bytes(value))

    def set_text(self, index: int, value: str) -> None:
        self._msg._bytes_at(self._ptr(index), value.encode("utf-8") + b"\0")

    def set_text_list(self, index: int, values: Sequence[str]) -> None:
        ptr = self._ptr(index)
        start = self._msg.alloc(len(values))
        self._msg._list_pointer(ptr, start, POINTER, len(values))
        for i, value in enumerate(values):
            self._msg._bytes_at(start + i, value.encode("utf-8") + b"\0")

    def init_struct_list(self, index: int, count: int, data_words: int,
                         pointer_count: int) -> list[StructBuilder]:
        """A composite list: tag word, then `count` elements."""
        return self._msg._init_struct_list_at(self._ptr(index), count, data_words, pointer_count)

    def set_capability(self, index: int, cap_index: int) -> None:
        self._msg._put_word(self._ptr(index), 3 | (cap_index << 32))

    def copy_struct(self, index: int, source: StructReader, what: str) -> None:
        """Deep-copy the struct `source` (with everything it points to) into pointer `index`."""
        _copy_struct(self._msg, self._ptr(index), source, what)

    def copy_pointer(self, index: int, source: StructReader, source_index: int, what: str) -> None:
        """Deep-copy pointer `source_index` of `source` (any kind) into pointer `index`."""
        idx = source._ptr_word(source_index)
        if idx is None:
            return
        _copy_pointer(self._msg, self._ptr(index), source.message, source._seg, idx, what,
                      source._depth)


def _copy_pointer(out: MessageBuilder, dst: int, msg: Message, seg: int, idx: int, what: str,
                  depth: int) -> None:
    target = msg._resolve(seg, idx, what)
    if target is None:
        return
    kind = target.raw & 3
    if kind == _OTHER:
        if target.raw & 0xFFFFFFFF != 3:
            raise CapnpError(f"capnp pointer {what}: unknown 'other' pointer")
        out._put_word(dst, target.raw)
        return
    if kind == _STRUCT:
        src = msg._struct_at(seg, idx, what, depth)
        assert src is not None
        _copy_struct(out, dst, src, what)
        return
    lst = msg._list_at(seg, idx, what, depth)
    assert lst is not None
    if lst.element_size == COMPOSITE:
        elements = out._init_struct_list_at(dst, lst.count, lst.data_words, lst.pointer_count)
        for i, element in enumerate(elements):
            _copy_struct_body(out, element, lst.struct(i, f"{what}[{i}]"), f"{what}[{i}]")
    elif lst.element_size == POINTER:
        start = out.alloc(lst.count)
        out._list_pointer(dst, start, POINTER, lst.count)
        for i in range(lst.count):
            _copy_pointer(out, start + i, msg, lst._seg, lst._start + i, f"{what}[{i}]", lst._depth)
    else:
        words = (lst.count * _ELEMENT_BITS[lst.element_size] + 63) // 64
        start = out.alloc(words)
        raw = msg.segments[lst._seg][lst._start * WORD:(lst._start + words) * WORD]
        out._buf[start * WORD:(start + words) * WORD] = raw
        out._list_pointer(dst, start, lst.element_size, lst.count)


def _copy_struct(out: MessageBuilder, dst: int, src: StructReader, what: str) -> None:
    sb = out._init_struct_at(dst, src.data_words, src.pointer_count)
    _copy_struct_body(out, sb, src, what)


def _copy_struct_body(out: MessageBuilder, sb: StructBuilder, src: StructReader, what: str) -> None:
    data = src.message.segments[src._seg][src._data * WORD:(src._data + src.data_words) * WORD]
    out._buf[sb._data * WORD:(sb._data + sb.data_words) * WORD] = data
    for i in range(src.pointer_count):
        idx = src._ptr_word(i)
        assert idx is not None
        _copy_pointer(out, sb._ptrs + i, src.message, src._seg, idx, f"{what}.p{i}", src._depth)

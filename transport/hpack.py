"""An HPACK encoder that stays fast on long header values and on header blocks that repeat
(an override of `hpack.Encoder.add`).

Which strings leave as plain literals is decided in `wire.hpack_encoder` (why: hpack's Huffman coder is
quadratic in the string's length). Here only the hook: `hpack.Encoder.encode` routes each field through
`add(to_add, sensitive, huffman)`; tests/unit/test_hpack_encoder.py fails if it stops doing so.
`transport.h2.TunnelH2Connection` installs it; any other h2 connection takes it with
`conn.encoder = LongValueEncoder()` before the first header block is sent.

Repeats: a field's encoding depends only on the field and the dynamic table, so while the table is
unchanged the bytes of a field already encoded are reused (hpack's own `add` searches the whole table
and formats integers for every field of every request). Fields whose value is new on every request
(`UNIQUE_VALUE_NAMES`, the ray ID) go out as literals without indexing: added to the table they would
evict the repeating fields and change the table on every request, so nothing could be reused.
"""

from __future__ import annotations

import hpack
from hpack.hpack import INDEX_NONE

from tunnel_lab.wire.hpack_encoder import huffman_worthwhile

# Never added to the dynamic table: a value seen once (RFC 7541 §6.2.2, "literal without indexing").
UNIQUE_VALUE_NAMES = frozenset({b"cf-ray"})
MEMO_LIMIT = 512  # fields remembered per table state; a table this busy is not worth memoising


class LongValueEncoder(hpack.Encoder):
    """`hpack.Encoder` that Huffman-codes only the fields `wire.hpack_encoder.huffman_worthwhile` allows,
    and reuses a field's encoding while the dynamic table has not changed."""

    def __init__(self) -> None:
        super().__init__()
        self._memo: dict[tuple[tuple[bytes, bytes], bool, bool], bytes] = {}
        self._memo_len = 0  # the table state the memo is valid for: its length and newest entry
        self._memo_head: object = None

    def _table_changed(self) -> bool:
        # An add puts a new tuple at the front; an eviction or a smaller table shortens it.
        entries = self.header_table.dynamic_entries
        return len(entries) != self._memo_len or (entries[0] if entries else None) is not self._memo_head

    def add(self, to_add: tuple[bytes, bytes], sensitive: bool, huffman: bool = False) -> bytes:
        if self._table_changed():
            self._memo.clear()
            entries = self.header_table.dynamic_entries
            self._memo_len, self._memo_head = len(entries), entries[0] if entries else None
        key = (to_add, sensitive, huffman)
        encoded = self._memo.get(key)
        if encoded is not None:
            return encoded
        name, value = to_add
        huffman = huffman and huffman_worthwhile(name, value)
        if name in UNIQUE_VALUE_NAMES and not sensitive:
            match = self.header_table.search(name, value)
            if match is None:
                return self._encode_literal(name, value, INDEX_NONE, huffman)
            index, _, perfect = match
            if perfect is not None:
                return self._encode_indexed(index)
            return self._encode_indexed_literal(index, value, INDEX_NONE, huffman)  # not memoised either
        encoded = super().add(to_add, sensitive, huffman)
        if not self._table_changed() and len(self._memo) < MEMO_LIMIT:
            self._memo[key] = encoded
        return encoded

"""An HPACK encoder that stays fast on long header values.

hpack's Huffman coder builds one big integer bit by bit, so its cost grows with the square of the string's
length: a 350 KB header value (an origin's large response head, serialized) takes about 14 s of CPU, long
enough to stall a stream; Go's coder is linear. Huffman coding is optional for each string
(RFC 7541 §5.2), so strings longer than `HUFFMAN_LIMIT` go out as plain literals; the block decodes to the
same headers. Install it on an h2 connection with `conn.encoder = LongValueEncoder()` before the first
header block is sent.
"""

from __future__ import annotations

import hpack

HUFFMAN_LIMIT = 1024  # bytes; Huffman saves ~20 % on text, and below this its cost is negligible


class LongValueEncoder(hpack.Encoder):
    """`hpack.Encoder` that Huffman-codes only names and values up to `HUFFMAN_LIMIT` bytes."""

    def add(self, to_add: tuple[bytes, bytes], sensitive: bool, huffman: bool = False) -> bytes:
        name, value = to_add
        short = len(name) <= HUFFMAN_LIMIT and len(value) <= HUFFMAN_LIMIT
        return super().add(to_add, sensitive, huffman and short)

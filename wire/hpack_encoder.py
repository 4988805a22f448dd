"""Which header strings leave Huffman-coded: the decision behind `transport.hpack.LongValueEncoder`.

hpack's Huffman coder builds one big integer bit by bit, so its cost grows with the square of the string's
length: a 350 KB header value (an origin's large response head, serialized) takes about 14 s of CPU, long
enough to stall a stream; Go's coder is linear. Huffman coding is optional for each string
(RFC 7541 §5.2), so strings longer than `HUFFMAN_LIMIT` go out as plain literals; the block decodes to the
same headers. The encoder that applies this (an override of an hpack internal) is `transport.hpack`.
"""

from __future__ import annotations

HUFFMAN_LIMIT = 1024  # bytes; Huffman saves ~20 % on text, and below this its cost is negligible


def huffman_worthwhile(name: bytes, value: bytes) -> bool:
    """May this field's strings be Huffman-coded (both at most `HUFFMAN_LIMIT` bytes)?"""
    return len(name) <= HUFFMAN_LIMIT and len(value) <= HUFFMAN_LIMIT

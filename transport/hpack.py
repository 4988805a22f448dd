"""An HPACK encoder that stays fast on long header values (an override of `hpack.Encoder.add`).

Which strings leave as plain literals is decided in `wire.hpack_encoder` (why: hpack's Huffman coder is
quadratic in the string's length). Here only the hook: `hpack.Encoder.encode` routes each field through
`add(to_add, sensitive, huffman)`; tests/unit/test_hpack_encoder.py fails if it stops doing so.
`transport.h2.TunnelH2Connection` installs it; any other h2 connection takes it with
`conn.encoder = LongValueEncoder()` before the first header block is sent.
"""

from __future__ import annotations

import hpack

from tunnel_lab.wire.hpack_encoder import huffman_worthwhile


class LongValueEncoder(hpack.Encoder):
    """`hpack.Encoder` that Huffman-codes only the fields `wire.hpack_encoder.huffman_worthwhile` allows."""

    def add(self, to_add: tuple[bytes, bytes], sensitive: bool, huffman: bool = False) -> bytes:
        name, value = to_add
        return super().add(to_add, sensitive, huffman and huffman_worthwhile(name, value))

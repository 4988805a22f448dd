"""Deterministic generated bodies: the same (size, seed) always gives the same bytes.

`/large?bytes=N&seed=S` streams `generate_body(N, S)`, and announces `body_sha256(N, S)` before the body,
which is computed by generating the body a first time without keeping it. Scenario runners and
benchmarks can import these to produce request bodies the echo origin's digest can be checked against.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterator

BLOCK = 64 * 1024


def generate_body(nbytes: int, seed: int = 0, *, block: int = BLOCK) -> Iterator[bytes]:
    """Yield `nbytes` pseudo-random bytes in pieces of at most `block` bytes.

    The bytes depend only on (nbytes, seed), never on `block`: the generator always draws whole
    64 KiB blocks and slices them.
    """
    if nbytes < 0:
        raise ValueError("nbytes must be >= 0")
    rng = random.Random(seed)
    left = nbytes
    while left > 0:
        data = rng.randbytes(BLOCK)[: min(BLOCK, left)]
        left -= len(data)
        for start in range(0, len(data), block):
            yield data[start : start + block]


@functools.lru_cache(maxsize=64)
def body_sha256(nbytes: int, seed: int = 0) -> str:
    """Hex SHA-256 of `generate_body(nbytes, seed)` (cached; large sizes take a second or two)."""
    digest = hashlib.sha256()
    for piece in generate_body(nbytes, seed):
        digest.update(piece)
    return digest.hexdigest()

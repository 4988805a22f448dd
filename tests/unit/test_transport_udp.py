"""transport.udp.gso_batches: how datagrams are grouped for one GSO send (no sockets)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.transport.udp import MAX_BATCH_BYTES, MAX_SEGMENTS, gso_batches


@given(st.lists(st.integers(min_value=0, max_value=1452), max_size=200))
def test_batches_keep_every_datagram_in_order_under_the_kernels_rules(sizes: list[int]) -> None:
    datagrams = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    rebuilt: list[bytes] = []
    for buffer, segment in gso_batches(datagrams):
        if segment == 0:
            rebuilt.append(buffer)
            continue
        parts = [buffer[i:i + segment] for i in range(0, len(buffer), segment)]
        assert 2 <= len(parts) <= MAX_SEGMENTS
        assert len(buffer) <= MAX_BATCH_BYTES
        assert all(len(p) == segment for p in parts[:-1]) and 0 < len(parts[-1]) <= segment
        rebuilt += parts
    assert rebuilt == datagrams


def test_a_run_of_full_packets_and_a_short_tail_is_one_send() -> None:
    datagrams = [b"a" * 1452] * 10 + [b"b" * 100, b"c" * 1452]
    assert [(len(buf), seg) for buf, seg in gso_batches(datagrams)] == [(10 * 1452 + 100, 1452), (1452, 0)]
    assert len(list(gso_batches([b"x" * 1200] * 100))) == 2  # 54 segments fit in 64 KiB, then the rest

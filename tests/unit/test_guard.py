"""wire.guard: the edge's frame guard and flood counters, against simple models of the rules."""

from __future__ import annotations

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tunnel_lab.wire.errors import ProtocolError
from tunnel_lab.wire.guard import ControlFloodGuard, FrameGuard, ResetFloodGuard

SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"

# increasing times: gaps of 0 to 6 s, so some fall in one 10 s window and some do not
times = st.lists(st.floats(0, 6, allow_nan=False), max_size=60).map(
    lambda gaps: [sum(gaps[:i + 1]) for i in range(len(gaps))])


@given(times, st.integers(0, 8))
def test_control_flood_counts_in_fixed_windows(ts: list[float], limit: int) -> None:
    guard = ControlFloodGuard(limit, 10.0, now=0.0)
    start, count = 0.0, 0
    for now in ts:
        if now - start > 10.0:
            start, count = now, 0
        count += 1
        if count > limit:
            event("reached the flood")
            with pytest.raises(ProtocolError, match=rf"^control-frame flood: more than {limit} PING/SETTINGS "
                                                     r"frames within 10s$"):
                guard.frame(now)
            return
        guard.frame(now)
    event("no flood")


def test_control_flood_window_edges() -> None:
    guard = ControlFloodGuard(2, 10.0, now=5.0)
    guard.frame(5.0)
    guard.frame(15.0)  # exactly one window later: still the same window
    with pytest.raises(ProtocolError, match="more than 2 PING/SETTINGS frames within 10s"):
        guard.frame(15.0)
    guard = ControlFloodGuard(2, 10.0, now=5.0)
    guard.frame(5.0)
    guard.frame(6.0)
    guard.frame(15.5)  # a new window: the count starts again
    guard.frame(16.0)
    with pytest.raises(ProtocolError):
        guard.frame(16.0)


@given(times, st.integers(0, 8), st.lists(st.booleans(), max_size=60))
def test_reset_flood_is_a_sliding_window(ts: list[float], limit: int, checks: list[bool]) -> None:
    guard = ResetFloodGuard(limit, 10.0)
    seen: list[float] = []
    for i, now in enumerate(ts):
        guard.reset(now)
        seen.append(now)
        if (i < len(checks) and checks[i]) or i == len(ts) - 1:  # some checks on the way, one at the end
            recent = [t for t in seen if t >= now - 10.0]
            assert guard.flooded(now) == (len(recent) > limit)
    event("reached the checks")
    later = (ts[-1] if ts else 0.0) + 10.5  # a quiet window later, nothing counts any more
    assert not guard.flooded(later)


def test_reset_flood_window_edge() -> None:
    guard = ResetFloodGuard(1, 10.0)
    guard.reset(0.0)
    guard.reset(10.0)
    assert guard.flooded(10.0)  # a reset exactly one window ago still counts
    assert not guard.flooded(10.5)
    assert not ResetFloodGuard(0, 10.0).flooded(0.0)


frames = st.lists(st.tuples(st.integers(0, 9), st.binary(max_size=40)), max_size=6)


@given(frames, st.lists(st.integers(1, 30), min_size=1, max_size=8))
def test_valid_frames_pass_in_any_pieces(body: list[tuple[int, bytes]], steps: list[int]) -> None:
    data = SETTINGS + b"".join(len(p).to_bytes(3, "big") + bytes([t, 0, 0, 0, 0, 1]) + p for t, p in body)
    guard = FrameGuard(40)
    i = 0
    for k in range(len(data)):
        step = steps[k % len(steps)]
        guard.feed(data[i:i + step])
        i += step
        if i >= len(data):
            break
    event("reached the end of the frames")
    with pytest.raises(ProtocolError, match=r"^frame of 41 bytes exceeds our MAX_FRAME_SIZE 40$"):
        guard.feed(b"\x00\x00\x29\x00\x00\x00\x00\x00\x01")


def test_the_first_frame_must_be_settings() -> None:
    with pytest.raises(ProtocolError, match=r"first bytes are not an HTTP/2 SETTINGS frame \(b'HTTP/1.1 "):
        FrameGuard(16384).feed(b"HTTP/1.1 400 Bad Request\r\n")
    guard = FrameGuard(16384)
    guard.feed(b"\x00\x00\x00\x04\x00\x00\x00\x00")  # 8 bytes: not judged yet
    guard.feed(b"\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # then a DATA frame header is fine
    guard.feed(b"")


def test_a_frame_of_exactly_the_limit_passes() -> None:
    guard = FrameGuard(40)
    guard.feed(SETTINGS)
    guard.feed(b"\x00\x00\x28\x00\x00\x00\x00\x00\x01" + b"x" * 40)
    with pytest.raises(ProtocolError, match="frame of 41 bytes"):
        guard.feed(b"\x00\x00\x29\x00\x00\x00\x00\x00\x01")

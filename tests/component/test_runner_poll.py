"""The runner's polling for `wait` and `history` steps (`lab.runner.engine._poll`): the step's timeout is
checked between probes and never cuts one short, so a verdict always rests on a finished probe."""

from __future__ import annotations

import trio
import trio.testing

from tunnel_lab.lab.runner.engine import _poll


async def test_a_first_probe_slower_than_the_timeout_still_decides(autojump_clock: trio.testing.MockClock,
                                                                   ) -> None:
    calls: list[float] = []

    async def slow() -> tuple[bool, str]:
        calls.append(trio.current_time())
        await trio.sleep(5)  # a starved edge answering after the step's 3 s
        return True, "the record is there"

    assert await _poll(slow, 3, 0.1) == (True, "the record is there")
    assert len(calls) == 1


async def test_probes_until_yes_then_stops(autojump_clock: trio.testing.MockClock) -> None:
    answers = iter([(False, 0), (False, 1), (True, 2), (True, 3)])

    async def probe() -> tuple[bool, int]:
        return next(answers)

    start = trio.current_time()
    assert await _poll(probe, 10, 0.5) == (True, 2)
    assert trio.current_time() - start == 1.0  # two intervals between three probes


async def test_no_gives_the_last_probe_after_the_timeout(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[int] = []

    async def probe() -> tuple[bool, int]:
        seen.append(len(seen))
        return False, seen[-1]

    start = trio.current_time()
    ok, last = await _poll(probe, 1, 0.3)
    assert not ok and last == seen[-1] and len(seen) == 5  # at 0, 0.3, 0.6, 0.9 and 1.2 s
    assert trio.current_time() - start >= 1

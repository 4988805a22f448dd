"""`lab.runner.procs.concurrently`, which starts a scenario's components at once: every job runs, and the
first failure cancels the rest and comes out as itself, not inside an exception group."""

from __future__ import annotations

import pytest
import trio

from tunnel_lab.lab.runner.procs import ComponentError, concurrently


async def test_jobs_run_at_once() -> None:
    started: list[str] = []
    both = trio.Event()

    async def job(name: str) -> None:
        started.append(name)
        if len(started) == 2:
            both.set()
        await both.wait()  # returns only if the other job runs meanwhile

    with trio.fail_after(5):
        await concurrently([lambda: job("a"), lambda: job("b")])
    assert sorted(started) == ["a", "b"]


async def test_the_first_failure_cancels_the_rest_and_is_raised_as_itself() -> None:
    cancelled = trio.Event()

    async def slow() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async def broken() -> None:
        raise ComponentError("edge exited with code 1 before it was ready")

    with trio.fail_after(5), pytest.raises(ComponentError, match="edge exited"):
        await concurrently([slow, broken])
    assert cancelled.is_set()


async def test_no_jobs() -> None:
    await concurrently([])

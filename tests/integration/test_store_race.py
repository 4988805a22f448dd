"""lab.store: processes that create the same new store at the same moment all open it."""

from __future__ import annotations

import multiprocessing
from multiprocessing.synchronize import Barrier
from pathlib import Path

from tunnel_lab.lab.store import Store, StoreError

CREATORS = 8
ROUNDS = 15  # one round lost the race about one time in six before the creation lock


def _create(path: str, start: Barrier, results: multiprocessing.SimpleQueue[str]) -> None:
    start.wait()
    try:
        with Store(path) as store:
            results.put(store.account_tag)
    except StoreError as exc:
        results.put(f"error: {exc}")


def test_racing_creators_all_open_one_new_store(tmp_path: Path) -> None:
    # fork, so every creator is at the barrier within microseconds (no interpreter start-up between them)
    ctx = multiprocessing.get_context("fork")
    for round_no in range(ROUNDS):
        path = tmp_path / f"state-{round_no}.db"
        start = ctx.Barrier(CREATORS)
        results: multiprocessing.SimpleQueue[str] = ctx.SimpleQueue()
        procs = [ctx.Process(target=_create, args=(str(path), start, results)) for _ in range(CREATORS)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
        assert [proc.exitcode for proc in procs] == [0] * CREATORS
        tags = [results.get() for _ in procs]
        assert not [t for t in tags if t.startswith("error")], tags
        assert len(set(tags)) == 1  # they agreed on one account

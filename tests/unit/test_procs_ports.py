"""free_port under pytest-xdist: each worker process gets its own slice of the port range."""

from __future__ import annotations

import pytest

from tunnel_lab.lab.runner import procs


def test_without_xdist_the_whole_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert procs._worker_slice(20_000, 29_999) == (20_000, 29_999)


def test_workers_get_disjoint_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    slices = []
    for i in range(3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{i}")
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
        slices.append(procs._worker_slice(20_000, 29_999))
    assert slices == [(20_000, 23_332), (23_333, 26_665), (26_666, 29_998)]
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    low, high = procs._ephemeral_range()
    bottom, top = procs._worker_slice(*((20_000, low - 1) if low > 20_000 else (high + 1, 65_535)))
    assert bottom > 20_000 or low <= 20_000  # the second of three slices, not the first
    assert all(bottom <= procs.free_port() <= top for _ in range(5))

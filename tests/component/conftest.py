"""Fixtures shared by the component tests."""

from __future__ import annotations

import pytest

from connector import supervisor


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connector's retry backoff shortened to 50 ms, so reconnect paths run in test time."""
    monkeypatch.setattr(supervisor, "BACKOFF_BASE", 0.05)
    monkeypatch.setattr(supervisor, "SUPERVISOR_BACKOFF_BASE", 0.05)

"""Unit-test fixtures."""

from __future__ import annotations

import pytest

from tunnel_lab.wire import headers


@pytest.fixture(autouse=True)
def fresh_header_cache() -> None:
    """Each test decodes serialized headers itself: a value another test (or an earlier run in the same
    process, as under mutmut) left in the decode cache would skip the decoder under test."""
    headers._DECODED.clear()

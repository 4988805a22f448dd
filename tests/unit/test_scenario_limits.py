"""Scenario files the loader refuses up front (issue 11): over the size limit; a malformed `raw` step."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_scenario_loader import GOOD, error_of
from tunnel_lab.lab.runner import loader
from tunnel_lab.lab.runner.loader import ConfigError, parse_scenario


def test_a_scenario_over_the_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "huge.yaml"
    literal = "x" * (loader.MAX_SCENARIO_BYTES + 1)
    big.write_text(GOOD + f"\n# {literal}\n")
    with pytest.raises(ConfigError) as caught:
        loader.load_scenario(big)
    text = str(caught.value)
    assert "huge.yaml" in text and "over the limit" in text and "body_generated" in text
    with pytest.raises(ConfigError, match="over the limit"):
        parse_scenario(GOOD + f"\n# {literal}\n", "inline")


def test_raw_needs_exactly_one_of_send_and_rapid_reset() -> None:
    step = "  - raw: {send: \"GET / HTTP/1.1\\r\\n\\r\\n\", h2_rapid_reset: {pairs: 2}}\n"
    err = error_of(GOOD + step)
    assert "raw needs exactly one of send, h2_rapid_reset" in str(err)
    assert parse_scenario(GOOD + "  - raw: {h2_rapid_reset: {pairs: 2}, expect: {status: 200}}\n", "x.yaml")
    assert "maximum" in str(error_of(GOOD + "  - raw: {h2_rapid_reset: {pairs: 100000}}\n"))

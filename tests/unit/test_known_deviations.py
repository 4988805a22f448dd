"""`known_deviations`: the loader's field, how a result is classified, and how reports show it."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tunnel_lab.lab.runner.engine import ScenarioResult, apply_known_deviation
from tunnel_lab.lab.runner.loader import ConfigError, load_scenario, parse_scenario
from tunnel_lab.lab.runner.report import write_json, write_junit

ROOT = Path(__file__).resolve().parents[2]
SEEN = ROOT / "tests" / "scenarios" / "known-deviation-seen.yaml"


def test_the_loader_reads_the_reasons_by_connector() -> None:
    sc = load_scenario(SEEN)
    reason = "test fixture: the echo origin answers 200, the step expects 201"
    assert sc.known_deviations == {"builtin": reason}
    assert load_scenario(ROOT / "scenarios" / "http-get-echo.yaml").known_deviations == {}


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("{cloudflare: x}", "unknown key 'cloudflare' (did you mean 'cloudflared'?"),
        ('{cloudflared: "  "}', "known_deviations.cloudflared: must not be empty"),
        ("[cloudflared]", "known_deviations: expected a mapping, got a list"),
        ("{builtin: 3}", "known_deviations.builtin: expected a string, got the number 3"),
    ],
)
def test_malformed_markers_are_refused_with_the_line(value: str, error: str) -> None:
    text = SEEN.read_text()
    start = text.index("known_deviations:")
    end = text.index("timeout:")
    with pytest.raises(ConfigError) as caught:
        parse_scenario(text[:start] + f"known_deviations: {value}\n" + text[end:], "x.yaml")
    assert str(caught.value).startswith("x.yaml:6: ")
    assert error in str(caught.value)


def _result(status: str, step: str = "step 1 (x, line 3)") -> ScenarioResult:
    return ScenarioResult("s", "s.yaml", status, message="it went wrong", step=step)


@pytest.mark.parametrize(
    ("connector", "status", "step", "expected"),
    [
        ("builtin", "failed", "step 1", "deviation"),
        ("builtin", "error", "set-up", "deviation"),  # e.g. the connector never became ready
        ("builtin", "error", "step 1", "error"),  # an internal error of the runner is never excused
        ("builtin", "skipped", "", "skipped"),
        ("cloudflared", "failed", "step 1", "failed"),  # marked for the other connector only
    ],
)
def test_which_failures_count_as_the_known_deviation(
    connector: str, status: str, step: str, expected: str
) -> None:
    sc = load_scenario(SEEN)
    result = _result(status, step)
    apply_known_deviation(sc, connector, result)
    assert result.status == expected
    assert result.deviation == (sc.known_deviations["builtin"] if expected == "deviation" else "")
    assert result.note == ""


def test_a_pass_despite_the_marker_says_the_deviation_was_not_seen() -> None:
    result = _result("passed")
    apply_known_deviation(load_scenario(SEEN), "builtin", result)
    assert result.status == "passed"
    assert result.note == (
        "known deviation of the builtin connector not seen (stale marker?): "
        "test fixture: the echo origin answers 200, the step expects 201"
    )


def test_reports_show_deviations_without_failing(tmp_path: Path) -> None:
    deviation = _result("deviation")
    deviation.deviation = "cloudflared drops the rest of a WebSocket message (docs/protocol.md)"
    stale = ScenarioResult("t", "t.yaml", "passed", note="known deviation ... not seen")
    write_json(tmp_path / "r.json", [deviation, stale], connector="cloudflared", duration=1.0)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"] == {"passed": 1, "failed": 0, "error": 0, "skipped": 0, "deviation": 1}
    assert data["scenarios"][0]["deviation"] == deviation.deviation
    assert data["scenarios"][1]["note"] == "known deviation ... not seen"

    write_junit(tmp_path / "j.xml", [deviation, stale], connector="cloudflared", duration=1.0)
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("0", "0", "1")
    first, second = suite.findall("testcase")
    skipped = first.find("skipped")
    assert skipped is not None and first.find("failure") is None
    assert skipped.get("message") == f"known deviation: {deviation.deviation}"
    assert "it went wrong" in (skipped.text or "")
    assert second.findtext("system-out") == "known deviation ... not seen"

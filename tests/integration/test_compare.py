"""`tunnel-lab run --compare` as a user runs it: two runs of our own connector agree; a stand-in connector
that changes what the origin receives is caught, in the terminal, the JSON and the JUnit report."""

from __future__ import annotations

import json
import os
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.integration.test_scenarios import run_lab
from tests.standin import write_standin
from tunnel_lab.lab.runner import netns

SAME = ["http-get-echo", "http-sse-streaming", "websocket-echo"]


@pytest.mark.slow
def test_builtin_against_builtin_has_no_difference(tmp_path: Path) -> None:
    proc = run_lab(
        "--compare",
        "builtin,builtin",
        "-k",
        " or ".join(SAME),
        "--jobs",
        "2",
        "--results",
        str(tmp_path / "results"),
        "--json",
        str(tmp_path / "report.json"),
        "--junit",
        str(tmp_path / "junit.xml"),
    )
    data = json.loads((tmp_path / "report.json").read_text())
    verdicts = {s["name"]: (s["status"], s["differences"]) for s in data["scenarios"]}
    assert verdicts == {name: ("same", []) for name in SAME}, proc.stdout[-4000:]
    assert proc.returncode == 0
    assert "3 same, 0 different" in proc.stdout
    # Each side has its own results, with what the origins received.
    for side in ("A-builtin", "B-builtin"):
        assert (tmp_path / "results" / side / "http-get-echo" / "origin-app.history.jsonl").exists()
    cases = ET.parse(tmp_path / "junit.xml").getroot().findall("testsuite/testcase")
    assert sorted(c.get("name") for c in cases) == sorted(SAME)
    assert all(c.find("failure") is None for c in cases)


ONE_REQUEST = textwrap.dedent("""\
    name: one-request
    description: one GET to the echo origin
    topology:
      origins:
        app: {kind: echo}
      tunnels:
        main: {dns: [app.lab.test]}
      connector:
        tunnel: main
        url: ${origins.app.url}
    steps:
      - request: {host: app.lab.test, path: /x}
    """)

# A connector that is ours with one difference: it sends every request to the origin with another Host.
# It wraps a stand-in cloudflared 2026.8.2 (tests/standin.py) that runs our connector, so the runner's
# probe accepts it; only `tunnel ...` command lines other than `tunnel --help` get the flag.
STAND_IN = textwrap.dedent("""\
    #!/bin/sh
    if [ "$1" = tunnel ] && [ "$2" != --help ]; then
        shift
        set -- tunnel --http-host-header other.lab.test "$@"
    fi
    exec {inner} "$@"
    """)


@pytest.mark.slow
@pytest.mark.skipif(not netns.available()[0], reason=f"no private network namespace: {netns.available()[1]}")
def test_a_different_connector_is_caught(tmp_path: Path) -> None:
    scenario = tmp_path / "one-request.yaml"
    scenario.write_text(ONE_REQUEST)
    stand_in = tmp_path / "stand-in"
    inner = write_standin(tmp_path / "cloudflared-2026.8.2", "2026.8.2", run_connector=True)
    stand_in.write_text(STAND_IN.format(inner=inner))
    stand_in.chmod(0o755)
    proc = run_lab(
        str(scenario),
        "--compare",
        f"builtin,{stand_in}",
        "--results",
        str(tmp_path / "results"),
        "--json",
        str(tmp_path / "report.json"),
        "--junit",
        str(tmp_path / "junit.xml"),
        timeout=90,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "private network namespace" in proc.stdout  # a binary side isolates the whole run
    data = json.loads((tmp_path / "report.json").read_text())
    (only,) = data["scenarios"]
    assert only["status"] == "different"
    host = [d for d in only["differences"] if d["field"] == "origin header Host"]
    assert host == [
        {"step": "1", "title": host[0]["title"], "n": None, "field": "origin header Host",
         "a": "app.lab.test", "b": "other.lab.test"},
    ]  # fmt: skip
    # The echo body carries the Host too, so the eyeball saw a different body.
    assert {"body_sha256", "body_length"} <= {d["field"] for d in only["differences"]}
    assert "one-request: " in proc.stdout and "origin header Host" in proc.stdout
    assert "A: app.lab.test" in proc.stdout and "B: other.lab.test" in proc.stdout
    case = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite/testcase")
    assert case is not None and case.find("failure") is not None


# Scenarios where the real cloudflared 2026.8.2 and our connector agree on every compared field.
AGREED = ["http-get-echo", "http-post-framing", "websocket-echo"]


@pytest.mark.slow
@pytest.mark.cloudflared
@pytest.mark.skipif(
    not os.environ.get("TUNNEL_LAB_CLOUDFLARED"),
    reason="set TUNNEL_LAB_CLOUDFLARED=PATH to a real cloudflared to compare our connector with it",
)
@pytest.mark.skipif(not netns.available()[0], reason=f"no private network namespace: {netns.available()[1]}")
def test_builtin_against_the_real_cloudflared(tmp_path: Path) -> None:
    proc = run_lab(
        "--compare",
        f"builtin,{os.environ['TUNNEL_LAB_CLOUDFLARED']}",
        "-k",
        " or ".join(AGREED),
        "--jobs",
        "2",
        "--results",
        str(tmp_path / "results"),
        "--json",
        str(tmp_path / "report.json"),
    )
    data = json.loads((tmp_path / "report.json").read_text())
    verdicts = {s["name"]: (s["status"], s["differences"]) for s in data["scenarios"]}
    assert verdicts == {name: ("same", []) for name in AGREED}, proc.stdout[-4000:]
    assert proc.returncode == 0

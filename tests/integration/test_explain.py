"""`tunnel-lab explain TOPIC [--protocol quic]` end to end: it starts a real lab, and its Markdown output is
what docs/walkthroughs/TOPIC.md (TOPIC-quic.md) holds (the walkthroughs are generated: this test fails when
they drift)."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest

from tunnel_lab.lab.explain import PROTOCOLS, TOPICS

ROOT = Path(__file__).resolve().parents[2]
WALKTHROUGHS = ROOT / "docs" / "walkthroughs"

pytestmark = pytest.mark.slow


def _explain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunnel_lab", "explain", *args], capture_output=True,
                          text=True, timeout=180, check=False, cwd=ROOT)


def test_explain_request_tells_how_the_request_crossed_the_tunnel() -> None:
    proc = _explain("request")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # the real steps, in order, with this run's facts (not placeholders)
    order = ["Eyeball -> Edge: GET /hello?lang=en (Host app.lab.test, http)",
             "Edge -> Connector: HEADERS on stream 3 [END_STREAM|END_HEADERS]",
             "Connector: stream 3 classified as http",
             "Connector -> Origin: GET /hello?lang=en HTTP/1.1",
             "Origin -> Connector: HTTP/1.1 200",
             "Connector -> Edge: HEADERS on stream 3 [END_HEADERS]",
             "Connector -> Edge: DATA on stream 3 [END_STREAM]",
             "Edge -> Eyeball: 200",
             "Edge: request done: 200 ok"]
    positions = [out.find(step) for step in order]
    assert -1 not in positions, (order, out)
    assert positions == sorted(positions)
    assert "<uuid>" not in out and "<ray>" not in out  # the terminal shows the real ids
    assert "cf-ray: " in out and "why: " in out and "(docs/protocol.md §4.1)" in out


def test_explain_request_over_quic_tells_how_the_request_crossed_the_tunnel() -> None:
    proc = _explain("request", "--protocol", "quic")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    order = ["Eyeball -> Edge: GET /hello?lang=en (Host app.lab.test, http)",
             "Edge -> Connector: stream 1: ConnectRequest type http",
             "Connector: stream 1 classified as http",
             "Connector -> Origin: GET /hello?lang=en HTTP/1.1",
             "Origin -> Connector: HTTP/1.1 200",
             "Connector -> Edge: stream 1: ConnectResponse HttpStatus 200",
             "Edge -> Eyeball: 200",
             "Connector -> Edge: body of stream 1: 1449 bytes",
             "Edge: request done: 200 ok"]
    positions = [out.find(step) for step in order]
    assert -1 not in positions, (order, out)
    assert positions == sorted(positions)
    assert "HEADERS" not in out and "(docs/protocol.md §13.3, §13.4)" in out


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("topic", sorted(TOPICS))
def test_committed_walkthrough_matches_a_fresh_run(topic: str, protocol: str) -> None:
    proc = _explain(topic, "--protocol", protocol, "--markdown")
    assert proc.returncode == 0, proc.stderr
    page = TOPICS[topic].page(protocol)
    path = WALKTHROUGHS / page
    committed = path.read_text(encoding="utf-8") if path.exists() else ""
    if proc.stdout != committed:
        diff = "".join(difflib.unified_diff(committed.splitlines(True), proc.stdout.splitlines(True),
                                            f"docs/walkthroughs/{page} (committed)", "a fresh run"))
        pytest.fail(f"docs/walkthroughs/{page} drifted from what the code does:\n{diff}\n"
                    f"Refresh it with: tunnel-lab explain {topic} --protocol {protocol} --markdown > "
                    f"docs/walkthroughs/{page}", pytrace=False)

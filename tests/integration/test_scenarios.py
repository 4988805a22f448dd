"""`tunnel-lab run` as a user runs it: a real subprocess driving the edge, the connector and the origins
as real processes. A representative subset of the library, a deliberately failing scenario (the failure
report must say what and where), a malformed file (refused before anything starts), and an isolated run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.standin import logged_argvs, write_standin
from tunnel_lab.lab.runner import internet, netns

ROOT = Path(__file__).resolve().parents[2]

# One or two per family of the library: requests, ingress, websocket, tcp, certificates, failover,
# registration, UDP. Each runs in a few seconds.
SUBSET = [
    "http-get-echo",
    "http-post-framing",
    "ingress-paths",
    "websocket-echo",
    "tcp-access",
    "origin-cert-expired",
    "connector-sigterm-drain",
    "registration-unauthorized",
    "hostile-rapid-reset",
    "hostile-cl-te",
    "udp-dns-private-resolver",  # QUIC: UDP sessions over RPC streams and datagrams, an edge UDP forward
]


def run_lab(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnel_lab", "run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "160", "PYTHONPATH": str(ROOT)},
    )


def report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.mark.slow
def test_representative_subset_passes(tmp_path: Path) -> None:
    pattern = " or ".join(SUBSET)
    proc = run_lab(
        "-k",
        pattern,
        "--jobs",
        "2",
        "--results",
        str(tmp_path / "results"),
        "--json",
        str(tmp_path / "report.json"),
        "--junit",
        str(tmp_path / "junit.xml"),
    )
    data = report(tmp_path / "report.json")
    statuses = {s["name"]: s["status"] for s in data["scenarios"]}
    failures = {
        s["name"]: f"{s['step']}: {s['message']} {s['mismatches']}"
        for s in data["scenarios"]
        if s["status"] != "passed"
    }
    assert failures == {}, proc.stdout[-4000:]
    assert proc.returncode == 0
    assert sorted(statuses) == sorted(SUBSET)
    # the reports and the operation history are there and agree
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == str(len(SUBSET)) and suite.get("failures") == "0"
    ops = [json.loads(line) for line in (tmp_path / "results" / "operations.jsonl").read_text().splitlines()]
    assert {op["scenario"] for op in ops} == set(SUBSET)
    assert any(op["op"] == "request" and op["status"] == 200 for op in ops)
    assert f"{len(SUBSET)} passed, 0 failed" in proc.stdout


FAILING = textwrap.dedent("""\
    name: deliberately-wrong
    description: expects 201 where the echo origin answers 200
    topology:
      origins:
        app: {kind: echo}
      tunnels:
        main: {dns: [app.lab.test]}
      connector:
        tunnel: main
        url: ${origins.app.url}
    steps:
      - request: {host: app.lab.test, path: /ok}
      - name: the wrong expectation
        request:
          host: app.lab.test
          path: /x
          expect: {status: 201, origin_saw: {target: /y}}
    """)


def test_failure_report_names_step_expected_and_actual(tmp_path: Path) -> None:
    (tmp_path / "wrong.yaml").write_text(FAILING)
    proc = run_lab(
        str(tmp_path / "wrong.yaml"),
        "--results",
        str(tmp_path / "results"),
        "--json",
        str(tmp_path / "report.json"),
        "--junit",
        str(tmp_path / "junit.xml"),
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [result] = report(tmp_path / "report.json")["scenarios"]
    assert result["status"] == "failed"
    assert result["step"] == "step 2 (the wrong expectation, line 13)"
    assert "status: expected 201, got 200" in result["mismatches"]
    assert "origin saw target: expected '/y', got '/x'" in result["mismatches"]
    assert {"edge", "connector", "origin:app"} <= set(result["logs"])
    assert "Traceback" not in proc.stdout + proc.stderr
    # not a terminal: the failure report is plain text
    assert "deliberately-wrong (" in proc.stdout and ": FAILED" in proc.stdout
    assert "    - status: expected 201, got 200" in proc.stdout
    assert "  last lines of connector:" in proc.stdout
    failure = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite/testcase/failure")
    assert failure is not None and "line 13" in failure.get("message", "")
    # teardown happened: no component of this run is still alive
    starts = [
        json.loads(line)
        for line in (tmp_path / "results" / "deliberately-wrong" / "operations.jsonl")
        .read_text()
        .splitlines()
    ]
    assert [op["op"] for op in starts][-1] == "scenario-end"


def test_malformed_file_is_refused_before_anything_starts(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(FAILING.replace("kind: echo", "kind: echoo"))
    proc = run_lab(str(tmp_path / "bad.yaml"), "--results", str(tmp_path / "results"), timeout=30)
    assert proc.returncode == 2
    assert f"{tmp_path / 'bad.yaml'}:5: topology.origins.app.kind" in proc.stderr
    assert "expected one of: echo" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(not netns.available()[0], reason=f"no private network namespace: {netns.available()[1]}")
def test_isolated_run(tmp_path: Path) -> None:
    proc = run_lab(
        "--isolate",
        "-k",
        "http-get-echo",
        "--results",
        str(tmp_path / "results"),
        "--json",
        str(tmp_path / "report.json"),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "private network namespace" in proc.stdout
    ops = (tmp_path / "results" / "operations.jsonl").read_text()
    assert '"isolated": true' in ops


SLOW = textwrap.dedent("""\
    name: interrupted
    description: a long step, interrupted by Ctrl-C
    topology:
      origins:
        files: {kind: stream}
      tunnels:
        main: {dns: [files.lab.test]}
      connector:
        tunnel: main
        url: ${origins.files.url}
    steps:
      - request: {host: files.lab.test, path: "/slow?delay=30", timeout: 40}
    """)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie whose parent has not reaped it yet counts as gone
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def test_ctrl_c_tears_everything_down(tmp_path: Path) -> None:
    (tmp_path / "slow.yaml").write_text(SLOW)
    ops_file = tmp_path / "results" / "interrupted" / "operations.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunnel_lab",
            "run",
            str(tmp_path / "slow.yaml"),
            "--results",
            str(tmp_path / "results"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 30
        while '"action": "request"' not in (ops_file.read_text() if ops_file.exists() else ""):
            assert time.monotonic() < deadline, "the scenario never reached its request step"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    pids = [json.loads(line)["pid"] for line in ops_file.read_text().splitlines() if '"op": "start"' in line]
    assert len(pids) == 3  # origin, edge, connector
    assert [p for p in pids if _alive(p)] == []


@pytest.mark.skipif(not netns.available()[0], reason=f"no private network namespace: {netns.available()[1]}")
def test_cloudflared_mode_with_a_stand_in_binary(tmp_path: Path) -> None:
    """`--connector cloudflared` with a stand-in that logs its argv and runs our connector: the run moves into
    the namespace, the binary gets cloudflared's offline command line, and `requires` skips what it lacks."""
    fake = tmp_path / "cloudflared"
    argv_log = tmp_path / "argv.txt"
    write_standin(fake, "2026.8.2", argv_log=argv_log, run_connector=True)
    (tmp_path / "lab-only.yaml").write_text(
        FAILING.replace("deliberately-wrong", "lab-only").replace(
            "description:", "requires: [lab-connector]\ndescription:"
        )
    )
    proc = run_lab(
        "--connector",
        "cloudflared",
        "--cloudflared",
        str(fake),
        "-k",
        "http-get-echo",
        str(ROOT / "scenarios" / "http-get-echo.yaml"),
        str(tmp_path / "lab-only.yaml"),
        "--results",
        str(tmp_path / "results"),
        "--json",
        str(tmp_path / "report.json"),
        timeout=60,
    )
    data = report(tmp_path / "report.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["connector"] == "cloudflared"
    assert {s["name"]: s["status"] for s in data["scenarios"]} == {"http-get-echo": "passed"}
    [args] = logged_argvs(argv_log)
    assert args[:5] == ["tunnel", "--config", args[2], "--no-autoupdate", "--no-prechecks"]
    assert args.count("--edge") == 2 and args[args.index("--ha-connections") + 1] == "1"
    run = args.index("run")
    assert args[run : run + 3] == ["run", "--protocol", "http2"]
    assert "--dns-resolver-addrs" in args[run:] and "--cacert" in args[:run]
    ops = (tmp_path / "results" / "operations.jsonl").read_text()
    assert '"isolated": true' in ops


def test_requires_skips_with_the_reason(tmp_path: Path) -> None:
    fake = write_standin(tmp_path / "cloudflared", "2026.8.2")
    (tmp_path / "lab-only.yaml").write_text(
        FAILING.replace("deliberately-wrong", "lab-only").replace(
            "description:", "requires: [lab-connector]\ndescription:"
        )
    )
    proc = run_lab(
        "--connector",
        "cloudflared",
        "--cloudflared",
        str(fake),
        str(tmp_path / "lab-only.yaml"),
        "--results",
        str(tmp_path / "results"),
        "--json",
        str(tmp_path / "report.json"),
        timeout=60,
    )
    if not netns.available()[0]:
        assert proc.returncode == 2 and "cannot isolate cloudflared" in proc.stderr
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [result] = report(tmp_path / "report.json")["scenarios"]
    assert result["status"] == "skipped"
    assert result["message"] == "the cloudflared connector does not support: lab-connector"


FLOW = ["flow-login-create-run", "flow-quick-tunnel", "flow-token-live-config", "flow-cleanup-stale",
        "lb-route-command", "lb-pool-round-robin", "lb-pool-failover"]
CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")


def _flow_failures(proc: subprocess.CompletedProcess[str], path: Path) -> dict[str, str]:
    data = report(path)
    assert sorted(s["name"] for s in data["scenarios"]) == sorted(FLOW), proc.stdout[-3000:] + proc.stderr
    return {s["name"]: f"{s['step']}: {s['message']} {s['mismatches']}"
            for s in data["scenarios"] if s["status"] != "passed"}


@pytest.mark.skipif(not internet.available()[0], reason=f"no mount namespace: {internet.available()[1]}")
@pytest.mark.parametrize("protocol", ["http2", "quic"])
def test_documented_flow_scenarios_with_our_connector(tmp_path: Path, protocol: str) -> None:
    # The connector's own commands (login approved on the page, create, route dns, run by name, a quick
    # tunnel, run --token with a configuration PUT while it runs, cleanup, route lb with two connectors at
    # once), with no lab flag.
    proc = run_lab("-k", "documented-flow", "--protocol", protocol, "--jobs", "2", "--results",
                   str(tmp_path / "results"), "--json", str(tmp_path / "report.json"))
    assert _flow_failures(proc, tmp_path / "report.json") == {}, proc.stdout[-4000:]
    assert proc.returncode == 0


@pytest.mark.skipif(not CLOUDFLARED, reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=PATH")
@pytest.mark.skipif(not netns.available()[0], reason=f"no private network namespace: {netns.available()[1]}")
@pytest.mark.parametrize("protocol", ["http2", "quic"])
def test_documented_flow_scenarios_with_the_real_cloudflared(tmp_path: Path, protocol: str) -> None:
    assert CLOUDFLARED is not None
    proc = run_lab("-k", "documented-flow", "--protocol", protocol, "--jobs", "2", "--connector",
                   "cloudflared", "--cloudflared", str(Path(CLOUDFLARED).resolve()), "--results",
                   str(tmp_path / "results"), "--json", str(tmp_path / "report.json"))
    assert _flow_failures(proc, tmp_path / "report.json") == {}, proc.stdout[-4000:]
    assert proc.returncode == 0

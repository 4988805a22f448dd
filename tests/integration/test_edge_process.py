"""The edge as a real process: command line, ready file, our connector through it, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

PY = sys.executable


def lab(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "tunnel_lab", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "TUNNEL_LAB_STATE": str(state)}, check=True)


def wait_json(path: Path, proc: subprocess.Popen[str], timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"process exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def get(address: str, path: str, host: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{address}{path}", headers={"Host": host, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def api(ready: dict[str, Any], path: str, method: str = "GET", body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{ready['api']}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {ready['api_token']}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def procs():
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def start(procs: list, args: list[str], state: Path, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as fh:  # the child keeps its own copy of the descriptor
        p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "TUNNEL_LAB_STATE": str(state)})
    procs.append(p)
    return p


def test_edge_with_our_connector_end_to_end(tmp_path, procs):
    state = tmp_path / "state"
    lab(state, "tunnel", "create", "t1")
    lab(state, "tunnel", "route", "dns", "t1", "app.test")
    creds = next((state / "credentials").glob("*.json"))
    edge = start(procs, [PY, "-m", "tunnel_lab", "edge", "--state", str(state), "--tunnel-listen",
                         "LAB1=127.0.0.1:0",
                         "--tunnel-listen", "LAB2=127.0.0.2:0", "--http-listen", "127.0.0.1:0",
                         "--api-listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "edge.json"),
                         "--shutdown-timeout", "2"], state, tmp_path / "edge.log")
    ready = wait_json(tmp_path / "edge.json", edge)
    assert [t["location"] for t in ready["tunnel_listeners"]] == ["LAB1", "LAB2"]
    assert ready["pid"] == edge.pid and Path(ready["ca"]).exists()
    assert json.loads((state / "edge.json").read_text()) == ready
    origin = start(procs, [PY, "-m", "tunnel_lab", "origin", "echo", "--listen", "127.0.0.1:0",
                           "--ready-file",
                           str(tmp_path / "origin.json")], state, tmp_path / "origin.log")
    origin_url = wait_json(tmp_path / "origin.json", origin)["url"]
    # a route added while the edge runs is honoured; no connector yet: 530
    status, body = get(ready["http"], "/", "app.test")
    assert status == 530 and b"1033" in body
    edges = [a for t in ready["tunnel_listeners"] for a in ("--edge", t["address"])]
    connector = start(procs, [PY, "-m", "tunnel_lab", "connector", "tunnel", "--no-autoupdate", *edges,
                              "--cacert", ready["ca"], "--no-prechecks", "--ha-connections", "2",
                              "--grace-period", "3s", "run", "--protocol", "http2", "--credentials-file",
                              str(creds), "--url", origin_url, "t1"], state, tmp_path / "connector.log")
    deadline = time.monotonic() + 15
    while len(api(ready, "/connections")) < 2:
        assert time.monotonic() < deadline, (tmp_path / "edge.log").read_text()
        time.sleep(0.1)
    conns = api(ready, "/connections")
    assert sorted(c["location"] for c in conns) == ["LAB1", "LAB2"]
    status, body = get(ready["http"], "/echo?x=1", "app.test", {"X-Test": "yes"})
    assert status == 200
    seen = json.loads(body)
    assert seen["target"] == "/echo?x=1" and ["X-Test", "yes"] in seen["headers"]
    assert api(ready, "/history?since=0")[-1]["status"] == 200
    tunnel_id = conns[0]["tunnel_id"]
    assert "ingress" in api(ready, f"/config/{tunnel_id}")
    # connector SIGTERM: it unregisters; the edge drains and closes both connections
    connector.send_signal(signal.SIGTERM)
    assert connector.wait(timeout=10) == 0
    deadline = time.monotonic() + 5
    while api(ready, "/connections"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    edge.send_signal(signal.SIGTERM)
    assert edge.wait(timeout=10) == 0
    log = (tmp_path / "edge.log").read_text()
    assert "Registered tunnel connection" in log and "edge stopped" in log
    assert "Traceback" not in log


def test_bad_command_lines(tmp_path):
    run = subprocess.run([PY, "-m", "tunnel_lab", "edge", "--state", str(tmp_path), "--tunnel-listen",
                          "LAB1=nowhere"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "bad address" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([PY, "-m", "tunnel_lab", "edge", "--bogus"], capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 2

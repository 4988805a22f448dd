"""Conformance: a connector started with the lab's offline command line (docs/protocol.md §10.2), in a
private network namespace, registers its HA connections with our edge, serves HTTP and a large POST, and
drains on SIGTERM; over http2 and over QUIC (with `--post-quantum`).

The real cloudflared runs when TUNNEL_LAB_CLOUDFLARED names its binary; our connector runs the same
command line (with `tunnel-lab connector` in place of `cloudflared`) so the harness itself is tested.
Everything (edge, origin, connector) runs inside a namespace made by `unshare` and set up by
`lab.runner.netns` (only `lo`, a DNS stub answering NXDOMAIN), as `tunnel-lab run` does for cloudflared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunnel_lab.lab.runner import netns

# The runner's own namespace recipe (lab.runner.netns.reexec); the driver sets it up from the inside.
UNSHARE = ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"]

DRIVER = r'''
import hashlib, json, os, signal, subprocess, sys, time, urllib.request
from pathlib import Path

from tunnel_lab.lab.runner import netns

netns.enter_inside()  # lo up, resolv.conf naming 127.0.0.1, the NXDOMAIN stub

work = Path(sys.argv[1]); connector = json.loads(sys.argv[2]); py = sys.executable
run_flags = json.loads(sys.argv[3])  # --protocol ... (and --post-quantum over QUIC)
state = work / "state"
env = {**os.environ, "TUNNEL_LAB_STATE": str(state)}
result = {"steps": []}
procs = []

def step(name, **kw):
    result["steps"].append({"step": name, **kw})

def start(args, log):
    with open(work / log, "w") as fh:
        p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env)
    procs.append(p)
    return p

def wait_file(path, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise SystemExit(f"{path} never appeared")

def api(ready, path):
    req = urllib.request.Request(f"http://{ready['api']}{path}",
                                 headers={"Authorization": f"Bearer {ready['api_token']}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())

try:
    subprocess.run([py, "-m", "tunnel_lab", "tunnel", "create", "t1"], env=env, check=True,
                   capture_output=True)
    subprocess.run([py, "-m", "tunnel_lab", "tunnel", "route", "dns", "t1", "app.test"], env=env, check=True,
                   capture_output=True)
    creds = next((state / "credentials").glob("*.json"))
    tunnel_id = json.loads(creds.read_text())["TunnelID"]
    start([py, "-m", "tunnel_lab", "edge", "--tunnel-listen", "LAB1=127.0.0.1:7844",
           "--tunnel-listen", "LAB2=127.0.0.2:7844", "--tunnel-listen", "LAB3=127.0.0.3:7844",
           "--http-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0",
           "--ready-file", str(work / "edge.json")], "edge.log")
    ready = wait_file(work / "edge.json")
    start([py, "-m", "tunnel_lab", "origin", "echo", "--listen", "127.0.0.1:0", "--ready-file",
           str(work / "origin.json")], "origin.log")
    origin = wait_file(work / "origin.json")
    conn = start([*connector, "tunnel", "--no-autoupdate", "--no-prechecks", "--edge", "127.0.0.1:7844",
                  "--edge", "127.0.0.2:7844", "--edge", "127.0.0.3:7844", "--ha-connections", "2",
                  "--cacert", ready["ca"], "--metrics", "127.0.0.1:0", "--grace-period", "5s",
                  "run", *run_flags, "--credentials-file", str(creds),
                  "--dns-resolver-addrs", "127.0.0.1:53", "--url", origin["url"], tunnel_id], "connector.log")
    end = time.monotonic() + 30
    while len(api(ready, "/connections")) < 2:
        if time.monotonic() > end or conn.poll() is not None:
            raise SystemExit("the connector did not register 2 connections")
        time.sleep(0.1)
    conns = api(ready, "/connections")
    step("registered", locations=sorted(c["location"] for c in conns),
         versions=[c["client_version"] for c in conns])
    req = urllib.request.Request(f"http://{ready['http']}/hello?x=1", headers={"Host": "app.test"})
    with urllib.request.urlopen(req, timeout=10) as r:
        seen = json.loads(r.read())
    step("get", status=r.status, target=seen["target"])
    body = os.urandom(1 << 20)
    req = urllib.request.Request(f"http://{ready['http']}/upload", data=body, method="POST",
                                 headers={"Host": "app.test"})
    with urllib.request.urlopen(req, timeout=30) as r:
        seen = json.loads(r.read())
    step("post", status=r.status, ok=seen["body_sha256"] == hashlib.sha256(body).hexdigest())
    config = api(ready, f"/config/{tunnel_id}")
    step("config", ingress=bool(config.get("ingress")))
    conn.send_signal(signal.SIGTERM)
    code = conn.wait(timeout=20)
    end = time.monotonic() + 10
    while api(ready, "/connections") and time.monotonic() < end:
        time.sleep(0.1)
    step("sigterm", exit_code=code, left=len(api(ready, "/connections")))
finally:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    (work / "result.json").write_text(json.dumps(result))
'''


def _connectors() -> list:
    ours = [sys.executable, "-m", "tunnel_lab", "connector"]
    real = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
    return [
        pytest.param(ours, id="builtin"),
        pytest.param([real] if real else None, id="cloudflared", marks=[
            pytest.mark.cloudflared,
            pytest.mark.skipif(
                not real, reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared"
            ),
        ]),
    ]


@pytest.mark.parametrize("run_flags", [["--protocol", "http2"], ["--protocol", "quic", "--post-quantum"]],
                         ids=["http2", "quic"])
@pytest.mark.parametrize("connector", _connectors())
def test_connector_in_a_private_namespace_through_our_edge(tmp_path: Path, connector: list[str],
                                                           run_flags: list[str]) -> None:
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"cannot create a private network namespace here: {why}")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([*UNSHARE, sys.executable, str(driver), str(tmp_path), json.dumps(connector),
                          json.dumps(run_flags)],
                         capture_output=True, text=True, timeout=120, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    logs = {name: (tmp_path / name).read_text()[-3000:] for name in ("edge.log", "connector.log")
            if (tmp_path / name).exists()}
    assert run.returncode == 0, (run.stderr[-3000:], logs)
    steps = {s["step"]: s for s in json.loads((tmp_path / "result.json").read_text())["steps"]}
    assert len(steps["registered"]["locations"]) == 2, logs
    assert len(set(steps["registered"]["locations"])) == 2  # two data centres
    assert steps["get"] == {"step": "get", "status": 200, "target": "/hello?x=1"}
    assert steps["post"]["status"] == 200 and steps["post"]["ok"]
    assert steps["config"]["ingress"]
    assert steps["sigterm"]["exit_code"] == 0 and steps["sigterm"]["left"] == 0, logs
    assert "Traceback" not in logs.get("edge.log", "")
    if "quic" in run_flags:
        assert "connector connected over QUIC" in (tmp_path / "edge.log").read_text(), logs

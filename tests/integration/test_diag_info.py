"""`tunnel diag` and `tunnel info` with both connectors: each diag collects from each connector's metrics
server, both diags' network jobs (traceroutes, pre-checks) give the same files in the sandbox, and `info`
prints the same connector table (several connectors, connections in several data centres) from either
binary. The real cloudflared runs only inside a private network namespace, with the whole lab (the API on
the edge's management port: docs/sandbox.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tunnel_lab.lab.runner import netns

TIMEOUT = 240
CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
OK, WHY = netns.available()
needs_real = [
    pytest.mark.skipif(not OK, reason=f"no private network namespaces here: {WHY}"),
    pytest.mark.skipif(not CLOUDFLARED, reason="set TUNNEL_LAB_CLOUDFLARED to a cloudflared binary"),
]

# argv: connector (builtin or a cloudflared path), diag command (same), output directory. Prints JSON.
DIAG = r'''
import json, subprocess, sys, zipfile
from pathlib import Path
from tunnel_lab.lab.api import start_lab

connector, differ, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
ours = [sys.executable, "-m", "tunnel_lab", "connector"]
with start_lab(datacentres=3) as lab:
    tunnel = lab.create_tunnel("app", hostnames=["app.lab.test"])
    origin = lab.start_origin("echo")
    c = lab.start_connector(tunnel, url=origin.url, ha_connections=2,
                            cloudflared=None if connector == "builtin" else connector)
    command = [*(ours if differ == "builtin" else [differ]), "tunnel", "diag", "--metrics", c.metrics,
               "--no-diag-network"]
    done = subprocess.run(command, cwd=out, capture_output=True, text=True, timeout=120)
    [archive] = out.glob("cloudflared-diag-*.zip")
    with zipfile.ZipFile(archive) as zf:
        files = {name: zf.read(name).decode(errors="replace") for name in zf.namelist()}
    conns = lab.connections()
    edges = sorted(lab.edge.datacentres[c["location"]] for c in conns)
    print(json.dumps({"exit": done.returncode, "log": done.stderr, "files": files, "tunnel": tunnel.id,
                      "edges": edges, "connector": conns[0]["connector_id"]}))
'''

# argv: cloudflared path or "builtin" for the second connector; prints each binary's `info` outputs.
INFO = r'''
import json, os, subprocess, sys
from tunnel_lab.lab.api import Tunnel, start_lab
from tunnel_lab.lab.login import issue_origin_cert

second = sys.argv[1]
ours = [sys.executable, "-m", "tunnel_lab", "connector"]
with start_lab(datacentres=4) as lab:
    home = lab.state / "home"
    (home / ".cloudflared").mkdir(parents=True)
    cert = home / ".cloudflared" / "cert.pem"
    cert.write_bytes(issue_origin_cert(lab.state))
    env = {**os.environ, "HOME": str(home), "SSL_CERT_FILE": str(lab.ca)}

    def admin(base, *args):
        url = f"https://{lab.edge.api}/client/v4"
        done = subprocess.run([*base, "tunnel", "--api-url", url, "--origincert", str(cert), *args], env=env,
                              capture_output=True, text=True, timeout=60)
        return [done.returncode, done.stdout, done.stderr]

    admin(ours, "create", "app")
    tid = json.loads(admin(ours, "list", "-o", "json")[1])[0]["id"]
    origin = lab.start_origin("echo")
    creds = home / ".cloudflared" / f"{tid}.json"
    lab.start_connector(Tunnel("app", tid, creds), url=origin.url, ha_connections=3, name="c1")
    lab.start_connector(Tunnel("app", tid, creds), url=origin.url, ha_connections=2, name="c2",
                        cloudflared=None if second == "builtin" else second)
    binaries = {"ours": ours, **({} if second == "builtin" else {"real": [second]})}
    outputs = {name: [admin(base, *args) for args in (["info", "app"], ["info", "--sort-by", "numConnections",
                                                                          "--invert-sort", "app"])]
               for name, base in binaries.items()}
    print(json.dumps(outputs))
'''


def run(script: str, *args: str, inside_netns: bool) -> dict[str, object]:
    prefix = [sys.executable, "-m", "tunnel_lab", "netns", "--"] if inside_netns else []
    done = subprocess.run([*prefix, sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def check_diag(found: dict[str, object]) -> None:
    log = str(found["log"])
    assert found["exit"] == 0, log
    assert "Selected server http://127.0.0.1:" in log and "Diagnostic file written: cloudflared-diag-" in log
    files: dict[str, str] = found["files"]  # type: ignore[assignment]
    assert set(files) == {"tunnelstate.json", "systeminformation.json", "goroutine.pprof", "heap.pprof",
                          "metrics.txt", "cli-configuration.json", "configuration.json", "task-result.json"}
    state = json.loads(files["tunnelstate.json"])
    assert (state["tunnelID"], state["connectorID"]) == (found["tunnel"], found["connector"])
    edges = sorted(f"{c['edgeAddress']}" for c in state["connections"])
    assert edges == sorted(str(e).rpartition(":")[0] for e in found["edges"])  # type: ignore[union-attr]
    assert sorted(c.get("index", 0) for c in state["connections"]) == [0, 1]
    system = json.loads(files["systeminformation.json"])
    assert system["errors"] == {} and system["info"]["memoryMaximum"] > 0 and system["info"]["disk"]
    cli = json.loads(files["cli-configuration.json"])
    assert cli["ha-connections"] == "2" and cli["uid"] == str(os.getuid()) and "metrics" in cli
    assert "cloudflared_tunnel_ha_connections 2" in files["metrics.txt"]
    assert json.loads(files["configuration.json"])["config"]["ingress"]
    tasks = json.loads(files["task-result.json"])
    assert {k for k, v in tasks.items() if v["result"] == "success"} >= {
        "tunnel state", "system information", "goroutine profile", "heap profile", "metrics",
        "cli configuration", "configuration"}
    assert "log information" in tasks  # as root, both look for the service's log (/var/log/cloudflared.err)


def test_our_diag_collects_from_our_connector(tmp_path: Path) -> None:
    check_diag(run(DIAG, "builtin", "builtin", str(tmp_path), inside_netns=False))


@pytest.mark.parametrize(("connector", "differ"), [("builtin", "real"), ("real", "builtin")])
@needs_real[0]
@needs_real[1]
def test_each_diag_collects_from_the_other_connector(tmp_path: Path, connector: str, differ: str) -> None:
    def pick(which: str) -> str:
        return str(CLOUDFLARED) if which == "real" else which

    check_diag(run(DIAG, pick(connector), pick(differ), str(tmp_path), inside_netns=True))


# The network jobs, in `tunnel-lab sandbox` (the regions and api.cloudflare.com resolve to the lab's edge
# there). argv: connector ("ours" or "real"), then the diag commands to run as NAME=COMMAND pairs. Each
# diag runs twice: with the PATH as it is (`NAME`), and with a PATH holding no traceroute (`NAME-bare`).
# Prints JSON: per run, the exit status and the zip's files.
SANDBOX_DIAG = r"""
set -eu
CONNECTOR=$1; shift
tunnel-lab login >/dev/null
tunnel-lab connector tunnel create app >/dev/null
python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &
if [ "$CONNECTOR" = real ]; then RUN=cloudflared; else RUN="tunnel-lab connector"; fi
$RUN tunnel --metrics 127.0.0.1:20241 run --url http://localhost:8000 app >"$HOME/connector.log" 2>&1 &
for _ in $(seq 1 300); do curl -sf -o /dev/null http://127.0.0.1:20241/ready && break; sleep 0.2; done
for pair in "$@"; do
  NAME=${pair%%=*}; COMMAND=${pair#*=}
  FIRST=${COMMAND%% *}; COMMAND="$(command -v "$FIRST")${COMMAND#"$FIRST"}"  # found before PATH is emptied
  for mode in "" -bare; do
    mkdir -p "$HOME/$NAME$mode"
    if [ -z "$mode" ]; then path=$PATH; else path=/nonexistent; fi
    status=0
    (cd "$HOME/$NAME$mode" && env PATH="$path" $COMMAND tunnel diag --metrics 127.0.0.1:20241 \
      >diag.log 2>&1) || status=$?
    echo $status >"$HOME/$NAME$mode/exit"
  done
done
python3 - "$HOME" <<'PY'
import json, sys, zipfile
from pathlib import Path
out = {}
for run in sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "exit").exists()):
    [archive] = run.glob("cloudflared-diag-*.zip")
    with zipfile.ZipFile(archive) as zf:
        files = {n: zf.read(n).decode(errors="replace") for n in zf.namelist()}
    out[run.name] = {"exit": int((run / "exit").read_text()), "log": (run / "diag.log").read_text(),
                     "files": files}
print(json.dumps(out))
PY
"""
TRACEROUTE = bool(shutil.which("traceroute") and shutil.which("traceroute6"))
NO_TRACEROUTE = "traceroute/traceroute6 not installed (Debian package traceroute, scripts/system-deps.sh)"
NETWORK_FILES = {"raw-network.txt", "network.json", "prechecks.json"}
NETWORK_JOBS = ("raw network information", "network information", "connectivity pre-checks")
TRACE_NAMES = [f"region{n}.v2.argotunnel.com-v{v}" for n in (1, 2) for v in (4, 6)]
MISSING = re.compile(r'error starting traceroute: exec: "traceroute6?": executable file not found in \$PATH')


def sandbox_diag(tmp_path: Path, connector: str, **diags: str) -> dict[str, dict[str, object]]:
    argv = [sys.executable, "-m", "tunnel_lab", "sandbox", "--quiet", "--state", str(tmp_path / "state")]
    if CLOUDFLARED:
        argv += ["--cloudflared", str(Path(CLOUDFLARED).resolve())]
    pairs = [f"{name}={command}" for name, command in diags.items()]
    done = subprocess.run([*argv, "--", "bash", "-c", SANDBOX_DIAG, "diag", connector, *pairs],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found: dict[str, dict[str, object]] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def ordered(text: str) -> object:
    """JSON with each object as a list of pairs, so that key order is compared too."""
    return json.loads(text, object_pairs_hook=list)


def raw_sections(text: str) -> dict[str, list[str]]:
    """raw-network.txt: each run's name and its lines (a run's output ends with a blank line)."""
    sections: dict[str, list[str]] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines) and lines[i]:
        name, body = lines[i], []
        i += 1
        while i < len(lines) and lines[i] and lines[i] != "no content":
            body.append(lines[i])
            i += 1
        if i < len(lines) and lines[i] == "no content":
            body.append("no content")
        i += 1
        sections[name] = body
    return sections


def network_shape(files: dict[str, str], traced: bool) -> dict[str, object]:
    """What two binaries' network files must share (no round-trip times, no run id), checked on the way."""
    raw = raw_sections(files["raw-network.txt"])
    assert sorted(raw) == TRACE_NAMES, files["raw-network.txt"]
    network = json.loads(files["network.json"])
    assert list(network) == TRACE_NAMES  # a Go map: sorted
    if traced:
        for name, lines in raw.items():
            host = name.rpartition("-")[0]
            assert lines[0].startswith(f"traceroute to {host} ("), lines
        for hops in network.values():
            assert hops and all(list(h) == ["hop", "domain", "rtts"] and len(h["rtts"]) == 3 for h in hops)
    else:
        assert all(lines == ["no content"] for lines in raw.values()) and set(network.values()) == {None}
    prechecks = ordered(files["prechecks.json"])
    assert [k for k, _ in prechecks] == ["RunID", "Results", "SuggestedProtocol"]  # type: ignore[union-attr]
    report = json.loads(files["prechecks.json"])
    uuid.UUID(report["RunID"])
    # in the sandbox every probe reaches the lab's edge: the environment is healthy, QUIC suggested
    assert {(r["Type"], r["ProbeStatus"]) for r in report["Results"]} == {(0, 0), (1, 0), (2, 0), (3, 0)}
    return {"raw": {name: lines[0].partition("),")[0] for name, lines in raw.items()},
            "hops": {name: [(h["hop"], h["domain"]) for h in hops or []] for name, hops in network.items()},
            "results": ordered(json.dumps(report["Results"])), "suggested": report["SuggestedProtocol"]}


def check_network_jobs(run: dict[str, object], traced: bool) -> dict[str, object]:
    assert run["exit"] == 0, run["log"]
    files: dict[str, str] = run["files"]  # type: ignore[assignment]
    assert set(files) >= NETWORK_FILES
    tasks = json.loads(files["task-result.json"])
    assert tasks["connectivity pre-checks"] == {"result": "success"}
    for job in NETWORK_JOBS[:2]:
        if traced:
            assert tasks[job] == {"result": "success"}, tasks[job]
        else:
            assert tasks[job]["result"] == "failure" and MISSING.fullmatch(tasks[job]["error"]), tasks[job]
    return {"files": sorted(files), "tasks": {k: v["result"] for k, v in tasks.items()},
            **network_shape(files, traced)}


@needs_real[0]
def test_our_diag_network_jobs_in_the_sandbox(tmp_path: Path) -> None:
    """Ours against ours, in the sandbox; with traceroute when it is installed, always without (PATH)."""
    found = sandbox_diag(tmp_path, "ours", ours=f"{sys.executable} -m tunnel_lab connector")
    check_network_jobs(found["ours-bare"], traced=False)
    if not TRACEROUTE:
        pytest.skip(f"{NO_TRACEROUTE}: only the runs without it were checked")
    check_network_jobs(found["ours"], traced=True)


@pytest.mark.parametrize("connector", ["ours", "real"])
@needs_real[0]
@needs_real[1]
def test_both_diags_network_files_have_the_same_shape(tmp_path: Path, connector: str) -> None:
    """The real cloudflared's `tunnel diag` and ours, against the same connector in the sandbox: the same
    files, task results and shapes; the same traceroute targets, hops and pre-check rows."""
    found = sandbox_diag(tmp_path, connector, real="cloudflared",
                         ours=f"{sys.executable} -m tunnel_lab connector")
    assert check_network_jobs(found["ours-bare"], False) == check_network_jobs(found["real-bare"], False)
    if not TRACEROUTE:
        pytest.skip(f"{NO_TRACEROUTE}: only the runs without it were compared")
    assert check_network_jobs(found["ours"], True) == check_network_jobs(found["real"], True)


def check_info_table(output: str) -> None:
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("CONNECTOR ID"))
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    assert len(rows) == 2
    # Which data centres a connector lands on is its own choice (the real cloudflared picks among the
    # four `--edge` addresses at random): check each row names its connections, one per data centre.
    edges = sorted((" ".join(row[5:]).split(", ") for row in rows), key=len)
    assert [len(e) for e in edges] == [2, 3], output
    for dcs in edges:
        assert len(set(dcs)) == len(dcs) and all(re.fullmatch(r"1xLAB[1-4]", dc) for dc in dcs), output


def test_our_info_lists_connectors_and_data_centres() -> None:
    outputs = run(INFO, "builtin", inside_netns=False)
    info, inverted = outputs["ours"]  # type: ignore[misc]
    assert info[0] == 0 and inverted[0] == 0
    check_info_table(info[1])
    rows = [line for line in inverted[1].splitlines() if line[:1].isalnum() and "LAB" in line]
    assert rows[0].endswith("1xLAB1, 1xLAB2, 1xLAB3 ")  # most connections first


@needs_real[0]
@needs_real[1]
def test_info_is_the_same_from_both_binaries() -> None:
    assert CLOUDFLARED is not None
    outputs = run(INFO, CLOUDFLARED, inside_netns=True)
    assert outputs["ours"] == outputs["real"]
    check_info_table(outputs["ours"][0][1])  # type: ignore[index]

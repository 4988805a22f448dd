"""`tunnel-lab up` as a real process: the printed curl lines work, and Ctrl-C/SIGTERM leave nothing behind."""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TIMEOUT = 60


def processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@contextmanager
def up(*args: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Start `tunnel-lab up ARGS`, read its banner up to the Ctrl-C line; always end it."""
    cmd = [sys.executable, "-m", "tunnel_lab", "up", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0) as proc:
        assert proc.stdout is not None
        out = b""
        try:
            # Raw reads: a buffered readline would keep the rest of the banner where select cannot see it.
            while b"Press Ctrl-C" not in out:
                ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
                chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
                assert chunk, f"no complete banner: {out!r}"
                out += chunk
            yield proc, out.decode().splitlines()
        finally:
            if proc.poll() is None:
                proc.kill()


def run_curl(line: str) -> dict[str, object]:
    argv = shlex.split(line)
    assert argv[0] == "curl"
    result = subprocess.run(
        [*argv, "-sS", "--max-time", "20"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


@pytest.mark.slow
def test_up_prints_working_curl_lines_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    ready_file, trace = tmp_path / "up.json", tmp_path / "edge.trace.jsonl"
    with up("--ready-file", str(ready_file), "--trace", str(trace)) as (proc, banner):
        assert any(f"protocol trace: {trace}" in line for line in banner)
        curls = [line.strip() for line in banner if line.strip().startswith("curl ")]
        http_line = next(c for c in curls if "--cacert" not in c and "Authorization" not in c)
        https_line = next(c for c in curls if "--cacert" in c)
        info = json.loads(ready_file.read_text())
        state = info["state"]
        for line in (http_line, https_line):
            echoed = run_curl(line)
            assert echoed["target"] == "/"
            assert ["Cf-Connecting-Ip", "127.0.0.1"] in echoed["headers"]  # it went through the edge
        assert any("app.lab.test" in str(h) for h in echoed["headers"])  # type: ignore[attr-defined]
        assert processes_mentioning(state)  # the lab's components name the state directory
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 0
    assert not Path(state).exists()
    assert processes_mentioning(state) == []
    # --trace: the edge traced the requests (the live view draws them from its ring, docs/live.md)
    kinds = [json.loads(line)["kind"] for line in trace.read_text().splitlines()]
    assert kinds.count("eyeball.request") == 2 and kinds[-1] == "trace.end"


@pytest.mark.slow
def test_up_with_your_own_server_and_a_kept_state_stops_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "origin.json"
    origin_cmd = [
        sys.executable,
        "-m",
        "tunnel_lab",
        "origin",
        "hello",
        "--listen",
        "127.0.0.1:0",
        "--ready-file",
        str(ready),
    ]
    with subprocess.Popen(origin_cmd, stdout=subprocess.PIPE, text=True) as origin:
        try:
            assert origin.stdout is not None
            select.select([origin.stdout], [], [], TIMEOUT)
            assert origin.stdout.readline(), "the origin did not start"
            url = json.loads(ready.read_text())["url"]
            state = tmp_path / "state"
            with up("--url", url, "--hostname", "mine.example.test", "--state", str(state)) as (proc, banner):
                line = next(
                    x.strip() for x in banner if x.strip().startswith("curl -H 'Host: mine.example.test'")
                )
                result = subprocess.run(
                    [*shlex.split(line.replace("/ ", "/_health ")), "-sS", "--max-time", "20"],
                    capture_output=True,
                    text=True,
                    timeout=TIMEOUT,
                )
                hello = subprocess.run(
                    [*shlex.split(line), "-sS", "--max-time", "20"],
                    capture_output=True,
                    text=True,
                    timeout=TIMEOUT,
                )
                assert result.returncode == 0 and hello.returncode == 0
                assert "hello" in hello.stdout.lower() or "cloudflared" in hello.stdout.lower()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=TIMEOUT) == 0
            assert (state / "state.db").exists()  # named by the user: kept
            assert processes_mentioning(str(state)) == []
        finally:
            origin.terminate()
            origin.wait(timeout=TIMEOUT)


def test_up_refuses_bad_arguments_before_starting_anything(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tunnel_lab", "up"]
    for args, expected in [
        (["--ha-connections", "2"], "--ha-connections 2 needs at least 3 data centres, there are 2"),
        (["--url", "127.0.0.1:8000"], "is not an origin URL"),
        (["--cloudflared", str(tmp_path / "nope")], "nope"),
        (["--topology", str(tmp_path / "missing.yaml")], "cannot read the topology"),
    ]:
        result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr


CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")


@pytest.mark.slow
@pytest.mark.cloudflared
@pytest.mark.skipif(
    not CLOUDFLARED, reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared"
)
def test_up_with_cloudflared_runs_in_a_namespace_the_printed_nsenter_line_reaches(tmp_path: Path) -> None:
    from tunnel_lab.lab.runner import netns

    ok, why = netns.available()
    if not ok:
        pytest.skip(f"no private network namespaces here: {why}")
    state = tmp_path / "state"
    with up("--cloudflared", str(CLOUDFLARED), "--state", str(state)) as (proc, banner):
        line = next(x.strip() for x in banner if x.strip().startswith("nsenter") and "curl -H 'Host:" in x)
        http = line.split(" curl ", 1)[1].rsplit(" ", 1)[1]  # the edge's eyeball address, only inside
        direct = subprocess.run(
            ["curl", "-sS", "--max-time", "5", http], capture_output=True, text=True, timeout=TIMEOUT
        )
        assert direct.returncode != 0  # the lab is not reachable from outside the namespace
        argv = shlex.split(line)
        result = subprocess.run(
            [*argv, "-sS", "--max-time", "20"], capture_output=True, text=True, timeout=TIMEOUT
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["target"] == "/"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 0
    assert processes_mentioning(str(state)) == []
    assert "Registered tunnel connection" in (state / "logs" / "connector.log").read_text()


@pytest.mark.slow
def test_the_documented_topology_comes_up_and_routes_both_hostnames(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "up.md").read_text()
    topology = tmp_path / "my-lab.yaml"
    topology.write_text(doc.split("```yaml\n", 1)[1].split("```", 1)[0])
    with up("--topology", str(topology)) as (proc, banner):
        lines = [x.strip() for x in banner if x.strip().startswith("curl -H 'Host: ")]
        api = next(x for x in lines if "api.lab.test" in x)
        files = next(x for x in lines if "files.lab.test" in x)
        assert run_curl(api)["target"] == "/"  # the echo origin
        assert files.endswith("/")
        argv = [
            *shlex.split(files + "status/201"),
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ]
        status = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
        assert status.stdout == "201"  # the stream origin's /status/NNN
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0

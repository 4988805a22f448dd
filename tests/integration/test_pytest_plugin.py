"""The pytest plugin (`lab/pytest_plugin.py`) as a user meets it: pytest runs of small test projects in a
fresh directory (pytester, in subprocesses: the lab's processes must not outlive them), the plugin loaded
through its `pytest11` entry point like any installed plugin."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interrupt import sigint_default

pytest_plugins = ["pytester"]

RUN_TIMEOUT = 240  # a whole inner pytest run, on a loaded 2-core machine
REAPER_TIMEOUT = 30  # the reaper's SIGTERM, 2 s of grace, SIGKILL and rmtree, on a loaded machine

# The "Done when": a project's own HTTP server, ten lines of test, a failover in the middle. It is
# docs/pytest.md's first example, as written.
DOC = Path(__file__).resolve().parents[2] / "docs" / "pytest.md"
TEN_LINES = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.M | re.S)[0]

SERVER_FIXTURE = """
import http.server, json, threading, pytest

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "ip": self.headers.get("Cf-Connecting-Ip")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
    def log_message(self, *args):
        pass

@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=RUN_TIMEOUT)


def test_done_when_a_project_tests_its_server_through_a_failover_under_xdist(
    pytester: pytest.Pytester,
) -> None:
    # Two copies, so that `-n 2` runs them at the same time, each worker with its own lab, the same
    # hostname in both.
    pytester.makepyfile(test_app=TEN_LINES, test_app_again=TEN_LINES)
    result = run(pytester, "-n", "2")
    result.assert_outcomes(passed=2)
    assert any("2 workers" in line for line in result.outlines), result.outlines[:10]


def test_eyeballs_faults_history_and_what_the_origin_received(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SERVER_FIXTURE)
    pytester.makepyfile(
        test_features="""
import asyncio, functools, json, trio, pytest

def test_http1_http2_https_and_what_the_server_received(tunnel_lab, server):
    site = tunnel_lab.expose(server)
    assert json.loads(bytes(site.get("/one?x=1").body_prefix))["path"] == "/one?x=1"
    assert site.get("/two", http2=True).http_version == "2"
    assert site.post("/three", body=b"payload", https=True).status == 200
    got = site.received()
    assert [(r.method, r.target) for r in got] == [("GET", "/one?x=1"), ("GET", "/two"), ("POST", "/three")]
    assert got[2].body == b"payload" and got[2].header("cf-connecting-ip")
    history = site.history()
    assert [h["path"] for h in history] == ["/one?x=1", "/two", "/three"]
    assert {h["outcome"] for h in history} == {"ok"}

def test_a_websocket_through_a_bundled_origin(tunnel_lab):
    site = tunnel_lab.expose(tunnel_lab.origin("ws-echo").url)
    result = site.websocket("/chat", ["hello", b"bytes"])
    assert (result.status, result.received) == (101, ["hello", b"bytes"])

def test_a_data_centre_fails_mid_request(tunnel_lab, server):
    site = tunnel_lab.expose(server)
    before = {c["location"] for c in site.connections()}
    site.failover(mid_request=True)
    during = site.get("/during")   # held at the server until its data centre is down
    lost = before - {c["location"] for c in site.connections()}
    assert len(lost) == 1
    # The edge retried the request on the surviving connection (a GET without a body), as Cloudflare does.
    assert during.status == 200, during.error
    [record] = site.history()
    assert record["location"] not in lost
    assert [r.path for r in site.received()] == ["/during", "/during"]
    assert site.get("/after").status == 200

def test_history_is_per_test(tunnel_lab, server):
    site = tunnel_lab.expose(server)
    site.get("/mine")
    assert [h["path"] for h in tunnel_lab.history()] == ["/mine"]

@pytest.mark.trio
async def test_from_trio_with_a_server_on_the_same_loop(tunnel_lab):
    async def handler(stream):
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\\r\\ncontent-length: 4\\r\\n\\r\\ntrio")
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        site = await tunnel_lab.aio.expose(listener.socket.getsockname()[1])
        response = await site.aio.get("/")
        assert bytes(response.body_prefix) == b"trio"
        nursery.cancel_scope.cancel()

def test_from_asyncio(tunnel_lab, server):
    async def main():
        site = await tunnel_lab.aio.expose(server)
        return await site.aio.get("/aio")
    assert asyncio.run(main()).status == 200
"""
    )
    result = run(pytester)
    result.assert_outcomes(passed=6)


def test_bad_input_fails_the_test_that_caused_it(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SERVER_FIXTURE)
    pytester.makepyfile(
        test_bad="""
import socket

def test_forgot_to_start_the_server(tunnel_lab):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # bound, never listening
    tunnel_lab.expose(port)

def test_routes_a_hostname_twice(tunnel_lab, server):
    tunnel_lab.expose(server, hostname="shared.lab.test")
    tunnel_lab.expose(server, hostname="shared.lab.test")

def test_reuses_the_hostname_after_the_previous_test(tunnel_lab, server):
    assert tunnel_lab.expose(server, hostname="shared.lab.test").get("/").status == 200

def test_fails_after_using_the_lab(tunnel_lab, server):
    site = tunnel_lab.expose(server)
    assert site.get("/").status == 418

def test_without_the_lab():
    pass
"""
    )
    result = run(pytester, "-rf")
    result.assert_outcomes(passed=2, failed=3)
    out = result.stdout.str()
    assert "\nnothing answers at 127.0.0.1:" in out
    assert "start the server before tunnel_lab.expose(" in out
    assert "shared.lab.test is already routed to a tunnel of this test" in out
    # The failed assertion comes with the components' last log lines, as the scenario runner's reports do.
    section = out.split("tunnel-lab: last log lines", 1)[1]
    assert "--- edge" in section and "--- connector-" in section
    assert "Registered tunnel connection" in section
    # The cause, not the plugin's insides.
    assert "_check_listening" not in out and "Errno" not in out and "During handling" not in out


def test_a_missing_cloudflared_fails_only_the_tests_that_use_the_lab(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_x="""
def test_uses_the_lab(tunnel_lab):
    pass

def test_does_not():
    pass
"""
    )
    result = run(pytester, "--tunnel-lab-cloudflared", str(pytester.path / "nope" / "cloudflared"))
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*--tunnel-lab-cloudflared: *nope/cloudflared: no such file*"])


def test_no_permission_for_the_namespace_is_named(pytester: pytest.Pytester) -> None:
    fake = pytester.path / "bin"
    fake.mkdir()
    # What unshare answers an unprivileged user.
    (fake / "unshare").write_text(
        "#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n"
    )
    (fake / "unshare").chmod(0o755)
    binary = pytester.path / "cloudflared"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    pytester.makepyfile(test_x="def test_uses_the_lab(tunnel_lab):\n    pass\n")
    pytester._monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    if _isolated():
        pytest.skip("this process already runs in a private network namespace: the plugin would not make one")
    result = run(pytester, "--tunnel-lab-cloudflared", str(binary))
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*cannot create the private network namespace*Operation not permitted*"])


def test_a_lab_that_cannot_start_names_the_cause(pytester: pytest.Pytester) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        pytester.makeini(f"[pytest]\ntunnel_lab_edge_flags = --api-listen 127.0.0.1:{port}\n")
        pytester.makepyfile(test_x="def test_a(tunnel_lab):\n    pass\n\ndef test_b(tunnel_lab):\n    pass\n")
        result = run(pytester)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "tunnel-lab: the lab did not start: edge did not start: edge exited with code 1 before it was ready",
        "--- edge (last lines)",
        "*",
        "tunnel-lab: cannot start the edge: *Address already in use",
    ])
    assert "During handling" not in result.stdout.str()


def test_the_plugin_is_inert_unless_its_fixtures_are_used(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_x="""
import sys

def test_nothing_of_the_lab_was_imported():
    assert "tunnel_lab.lab.pytest_plugin" in sys.modules
    assert not {"tunnel_lab.lab.api", "tunnel_lab.lab.runner.procs"} & set(sys.modules)
"""
    )
    run(pytester).assert_outcomes(passed=1)


@pytest.mark.parametrize("workers", [0, 2], ids=["plain", "xdist"])
def test_ctrl_c_leaves_nothing_running(pytester: pytest.Pytester, workers: int) -> None:
    pytester.makeconftest(SERVER_FIXTURE)
    pytester.makepyfile(
        test_wait="""
import os, threading, pytest

@pytest.mark.parametrize("n", [1, 2])
def test_waits_for_ctrl_c(tunnel_lab, server, n):
    tunnel_lab.expose(server)
    pids = [c.pid for c in tunnel_lab.lab.lab.components.values() if c.running]
    # Straight to the inherited stderr (with -s): what xdist workers print does not reach the terminal.
    os.write(2, f"LAB-UP {tunnel_lab.lab.state} {' '.join(map(str, pids))}\\n".encode())
    threading.Event().wait()
"""
    )
    xdist = ["-n", str(workers)] if workers else []
    with sigint_default():  # as from a terminal, even when this suite runs as a background job
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", *xdist, str(pytester.path)],
            cwd=pytester.path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    assert proc.stdout is not None
    seen: list[bytes] = []
    up: list[list[str]] = []  # [state, pid...] of each lab that is up
    try:
        with _deadline(RUN_TIMEOUT, proc):
            for line in proc.stdout:  # the inner tests say when their lab is up
                seen.append(line)
                if b"LAB-UP " in line:
                    up.append(line.decode().split("LAB-UP ", 1)[1].split())
                    if len(up) == max(workers, 1):
                        break
        assert len(up) == max(workers, 1), b"".join(seen).decode()
        children = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    assert "KeyboardInterrupt" in out, out
    for _state, *pids in up:
        assert set(map(int, pids)) <= children  # the components (and the reaper, the workers, ...)

    def leftovers() -> list[str]:
        left = [f"{pid}: {_cmdline(pid)}" for pid in sorted(children) if _alive(pid)]
        for state, *_pids in up:
            left += [f"{state} (the state directory)"] if Path(state).exists() else []
            left += _processes_mentioning(state)
        return left

    left = leftovers()
    if workers:
        # xdist's controller waits only so long for a worker to end (execnet's group terminate, 10 s) and
        # then kills it: a worker still stopping its lab on a loaded machine is killed, and its reaper
        # (lab/runner/reaper.py) stops that lab after pytest has exited. Nothing may outlive the reaper.
        deadline = time.monotonic() + REAPER_TIMEOUT
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = leftovers()
    assert not left, f"left behind: {left}\n{out}"


@pytest.mark.cloudflared
def test_a_real_cloudflared_behind_the_plugin(pytester: pytest.Pytester) -> None:
    binary = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
    if not binary:
        pytest.skip("set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared to run the plugin with a real one")
    pytester.makepyfile(test_app=TEN_LINES, test_app_again=TEN_LINES)
    result = run(pytester, "--tunnel-lab-cloudflared", binary)
    result.assert_outcomes(passed=2)


@contextlib.contextmanager
def _deadline(seconds: float, proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """Kill `proc` if the block is still waiting on it after `seconds` (its output then ends)."""
    timer = threading.Timer(seconds, proc.kill)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _isolated() -> bool:
    return {name for _, name in socket.if_nameindex()} == {"lo"}


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in status


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")[:200]
    except OSError:
        return ""


def _processes_mentioning(text: str) -> list[str]:
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    return [f"{pid}: {_cmdline(pid)}" for pid in pids if text in _cmdline(pid) and _alive(pid)]


def _descendants(root: int) -> set[int]:
    """Every process below `root` now (Linux /proc: the parent is the 4th field of /proc/PID/stat)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found

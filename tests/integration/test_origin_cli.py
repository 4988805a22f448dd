"""`tunnel-lab origin KIND` as a real process: ready file, start-up line, history file, signals, errors."""

from __future__ import annotations

import http.client
import json
import select
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TIMEOUT = 15


def origin_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunnel_lab", "origin", *args]


@contextmanager
def running(args: list[str]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start the origin, wait for its start-up line; always stop it."""
    proc = subprocess.Popen(origin_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        assert ready, "no start-up line"
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        yield proc, line
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


def test_echo_ready_file_request_history_and_sigterm(tmp_path: Path) -> None:
    ready_file, history = tmp_path / "ready.json", tmp_path / "history.jsonl"
    with running(["echo", "--listen", "127.0.0.1:0", "--ready-file", str(ready_file),
                  "--history", str(history)]) as (proc, line):
        ready = json.loads(ready_file.read_text())
        assert ready["pid"] == proc.pid and ready["kind"] == "echo"
        assert ready["url"] == f"http://{ready['address']}"
        assert line.strip() == f"origin echo listening on {ready['url']}"
        host, port = ready["address"].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        conn.request("POST", "/cli?q=1", body=b"abc", headers={"X-Test": "yes"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        conn.close()
        assert resp.status == 200 and doc["target"] == "/cli?q=1" and ["X-Test", "yes"] in doc["headers"]
        # A connection still open at shutdown does not hold the process up.
        idle = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        idle.connect()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
        idle.close()
    [record] = [json.loads(x) for x in history.read_text().splitlines()]
    assert (record["method"], record["target"], record["status"], record["body_length"]) == (
        "POST", "/cli?q=1", 200, 3)


def test_tls_origin_with_a_broken_certificate(tmp_path: Path) -> None:
    ready_file = tmp_path / "ready.json"
    state = tmp_path / "state"
    with running(["stream", "--listen", "127.0.0.1:0", "--tls", "expired", "--state", str(state),
                  "--ready-file", str(ready_file)]) as (proc, _):
        ready = json.loads(ready_file.read_text())
        assert ready["url"].startswith("https://127.0.0.1:") and ready["tls"] == "expired"
        port = ready["address"].rsplit(":", 1)[1]
        ctx = ssl.create_default_context(cafile=str(state / "pki" / "ca.pem"))
        conn = http.client.HTTPSConnection("localhost", int(port), context=ctx, timeout=TIMEOUT)
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
            conn.request("GET", "/status/200")
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 0


@pytest.mark.parametrize(("args", "code", "message"), [
    (["nope"], 2, "invalid choice: 'nope'"),
    (["echo", "--listen", "192.0.2.1:0"], 1, "loopback only"),
    (["echo", "--listen", "127.0.0.1"], 1, "want HOST:PORT"),
    (["echo", "--tls", "valid", "--hostname", "bad name!", "--state", "/dev/null/x"], 1,
     "tunnel-lab: --state: cannot create state directory"),
])
def test_bad_command_lines_exit_without_traceback(args: list[str], code: int, message: str) -> None:
    proc = subprocess.run(origin_command(*args), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == code
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr

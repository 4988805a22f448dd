"""`tunnel-lab netns -- COMMAND` as a real process: only lo, NXDOMAIN, exit status, nothing left, signals."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tunnel_lab.lab.runner import netns

TIMEOUT = 30
OK, WHY = netns.available()
needs_netns = pytest.mark.skipif(not OK, reason=f"no private network namespaces here: {WHY}")


def netns_command(*command: str) -> list[str]:
    return [sys.executable, "-m", "tunnel_lab", "netns", "--", *command]


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


INSIDE = """
import socket, subprocess, sys
names = sorted(name for _, name in socket.if_nameindex())
try:
    socket.getaddrinfo("cfd-features.argotunnel.com", 443)
    dns = "resolved"
except socket.gaierror as exc:
    dns = "nxdomain" if exc.errno == socket.EAI_NONAME else f"other {exc}"
server = socket.create_server(("127.0.0.2", 0))  # the extra data-centre addresses work
subprocess.Popen(["sleep", sys.argv[1]], start_new_session=True)  # left behind on purpose
print(names, dns, flush=True)
sys.exit(7)
"""


@needs_netns
def test_only_lo_nxdomain_exit_status_and_nothing_left() -> None:
    marker = f"{300 + uuid.uuid4().int % 1000}.{os.getpid()}"  # a sleep nobody else runs
    result = subprocess.run(
        netns_command(sys.executable, "-c", INSIDE, marker), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 7, result.stderr
    assert result.stdout.strip() == "['lo'] nxdomain"
    assert processes_mentioning(f"sleep\0{marker}") == []


@needs_netns
def test_sigterm_reaches_the_command_and_its_status_comes_back() -> None:
    script = "import signal, sys, time; print('up', flush=True); time.sleep(600)"
    with subprocess.Popen(
        netns_command(sys.executable, "-c", script), stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        assert ready and proc.stdout.readline().strip() == "up"
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                proc.kill()


def test_no_namespaces_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    # A PATH without util-linux: the namespace cannot be made, whatever this machine allows.
    env = {**os.environ, "PATH": str(tmp_path)}
    result = subprocess.run(netns_command("true"), capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tunnel-lab netns: cannot create a private network namespace: `unshare` (util-linux) is not installed"
    ]


@needs_netns
def test_missing_command_and_missing_argument() -> None:
    result = subprocess.run(
        netns_command("no-such-command-here"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 127
    assert "cannot run 'no-such-command-here'" in result.stderr
    result = subprocess.run(netns_command(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2 and "name the COMMAND to run" in result.stderr

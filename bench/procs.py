"""Start the lab's components as real processes for the bench, and read what they cost from /proc.

The bench is plain synchronous code (its load clients are blocking sockets and worker processes), so it
keeps this small `subprocess` wrapper rather than the scenario runner's trio one; the environment given to
children is the runner's (`lab.runner.procs.child_env`: no TUNNEL_* variables, which act as connector flags).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnel_lab.lab.runner.procs import TUNNEL_LAB, tail
from tunnel_lab.wire.errors import TunnelLabError

TICKS = os.sysconf("SC_CLK_TCK")


class BenchSetupError(TunnelLabError):
    """A component did not start or a workload could not run; the message names it and its log."""


@dataclass
class Usage:
    """CPU seconds and memory of one process at one moment."""

    cpu_s: float
    rss_mb: float
    peak_rss_mb: float


def usage_of(pid: int) -> Usage:
    """Read utime+stime, VmRSS and VmHWM of `pid` from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15 of stat)
    rss = peak = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return Usage(cpu, rss, peak)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM so the next reading is the peak of what follows (Linux >= 4.0; best effort)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def lab_command(*args: str) -> list[str]:
    """`tunnel-lab ARGS` as this very interpreter runs it (same venv, same checkout)."""
    return [*TUNNEL_LAB, *args]


class Component:
    """One child process with its log file; stopped with SIGTERM, then SIGKILL of its process group."""

    def __init__(self, name: str, argv: list[str], workdir: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = workdir / f"{name}.log"
        self.started_at = time.perf_counter()
        with open(self.log_path, "ab") as log:
            log.write(f"--- {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=dict(env) if env is not None else None, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def usage(self) -> Usage:
        try:
            return usage_of(self.pid)
        except OSError:
            return Usage(0.0, 0.0, 0.0)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(tail(self.log_path, lines))

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchSetupError(f"{self.name} exited with code {self.proc.returncode}; "
                                  f"last lines of {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def wait_ready_file(component: Component, path: Path, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        component.check_alive()
        if path.exists():
            with contextlib.suppress(ValueError):
                data = json.loads(path.read_text())
                if isinstance(data, dict):
                    return data
        time.sleep(0.02)
    raise BenchSetupError(f"{component.name} did not write {path} within {timeout:.0f}s; "
                          f"last lines of {component.log_path}:\n{component.log_tail()}")


def ready_connections(metrics: str) -> int:
    """The connector's `/ready` count (0 when it answers 503 or not at all)."""
    try:
        with urllib.request.urlopen(f"http://{metrics}/ready", timeout=1) as resp:
            return int(json.load(resp).get("readyConnections", 0))
    except urllib.error.HTTPError as exc:  # 503 still carries the JSON
        with contextlib.suppress(ValueError, OSError):
            return int(json.load(exc).get("readyConnections", 0))
        return 0
    except (OSError, ValueError):
        return 0


def parse_address(text: str) -> tuple[str, int]:
    """`127.0.0.1:8080`, `[::1]:8080` or `http://127.0.0.1:8080` -> (host, port)."""
    text = text.split("//", 1)[-1].rstrip("/")
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)

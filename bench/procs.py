"""Start the lab's components as real processes for the bench, and read what they cost from /proc."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


class BenchSetupError(Exception):
    """A component did not start; the message names it and points at its log."""


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


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM so the next reading is the peak of what follows (Linux >= 4.0; best effort)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def lab_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lab.cli", *args]


class Component:
    """One child process with its log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def usage(self) -> Usage:
        return usage_of(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchSetupError(f"{self.name} exited with code {self.proc.returncode}; "
                                  f"last log lines:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def wait_ready_file(component: Component, path: Path, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        component.check_alive()
        if path.exists():
            with contextlib.suppress(ValueError):
                return json.loads(path.read_text())
        time.sleep(0.02)
    raise BenchSetupError(f"{component.name} did not become ready in {timeout:.0f}s; "
                          f"last log lines:\n{component.log_tail()}")


def ready_connections(metrics: str) -> int:
    """The connector's `/ready` count (0 when it answers 503 or not at all)."""
    try:
        with urllib.request.urlopen(f"http://{metrics}/ready", timeout=1) as resp:
            return int(json.load(resp).get("readyConnections", 0))
    except (OSError, ValueError):
        return 0


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


@contextlib.contextmanager
def running(components: list[Component]) -> Iterator[None]:
    try:
        yield
    finally:
        for component in reversed(components):
            component.stop()

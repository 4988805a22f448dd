"""Stopping the runner from outside: SIGTERM handled like Ctrl-C, and a watchdog that cleans up after a
runner killed hard (SIGKILL, the OOM killer).

SIGTERM (how CI systems stop a job): `until_sigterm` cancels the run, so every scenario is torn down as
for Ctrl-C (the teardown is shielded), then raises `Terminated`; the runner exits `EXIT_SIGTERM`.

A runner that gets SIGINT or SIGTERM tears its labs down itself. One that is killed cannot, and a
parent-death signal does not help: trio starts processes from worker threads, and the kernel sends
PR_SET_PDEATHSIG when the *thread* that forked exits. So the runner starts this small process first
(`python -m lab.runner.reaper`, in its own session) and tells it, one line at a time on its stdin, which
component process groups and state directories exist. When that pipe reaches EOF without a final
`exit` line, the runner is gone: the reaper kills every group it still knows (SIGTERM, then SIGKILL)
and removes every state directory, then exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO

import trio

from tunnel_lab.wire.errors import TunnelLabError

GRACE = 2.0  # seconds between SIGTERM and SIGKILL for orphaned components
EXIT_SIGTERM = 128 + signal.SIGTERM


class Terminated(TunnelLabError):
    """SIGTERM arrived; every component was stopped and every state directory removed, as for Ctrl-C."""


async def until_sigterm(fn: Callable[..., Awaitable[None]], *args: object) -> None:
    """Run `fn`; a SIGTERM (how CI stops a job) cancels it, which tears each scenario down as Ctrl-C
    does (the teardown is shielded), then raises Terminated."""
    terminated = False
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal terminated
                async for _ in signals:
                    terminated = True
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            await fn(*args)
            nursery.cancel_scope.cancel()
    if terminated:
        raise Terminated


class Reaper:
    """The runner's handle on its reaper process; every method is a no-op until `start`."""

    def __init__(self) -> None:
        self._pipe: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the reaper (idempotent)."""
        if self._proc is not None:
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-m",
             "tunnel_lab.lab.runner.reaper"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        self._pipe = self._proc.stdin

    def stop(self) -> None:
        """The runner cleaned up itself: the reaper exits without acting."""
        self._send("exit")
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.close()
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        self._proc = self._pipe = None

    def watch_group(self, pgid: int) -> None:
        self._send(f"group {pgid}")

    def forget_group(self, pgid: int) -> None:
        self._send(f"-group {pgid}")

    def watch_path(self, path: os.PathLike[str] | str) -> None:
        self._send(f"path {os.fspath(path)}")

    def forget_path(self, path: os.PathLike[str] | str) -> None:
        self._send(f"-path {os.fspath(path)}")

    def _send(self, line: str) -> None:
        if self._pipe is None:
            return
        try:
            self._pipe.write(line.encode("utf-8", "surrogateescape") + b"\n")
            self._pipe.flush()
        except OSError:  # the reaper died: nothing more to tell it
            self._pipe = None


REAPER = Reaper()  # one per runner process (the process-wide resource it stands for)


def _kill_groups(groups: set[int]) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while groups and time.monotonic() < deadline:
        groups = {g for g in groups if _group_alive(g)}
        time.sleep(0.05)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def main() -> int:
    """Read the runner's lines until EOF; clean up unless the last line was `exit`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal is the runner's to handle
    groups: set[int] = set()
    paths: set[str] = set()
    for raw in sys.stdin.buffer:
        verb, _, arg = raw.rstrip(b"\n").decode("utf-8", "surrogateescape").partition(" ")
        if verb == "exit":
            return 0
        if verb in ("group", "-group") and arg.isdigit():
            (groups.add if verb == "group" else groups.discard)(int(arg))
        elif verb in ("path", "-path") and arg:
            (paths.add if verb == "path" else paths.discard)(arg)
    _kill_groups(groups)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Components as real processes: start with output captured to a log file, wait for a ready file, signal,
stop, and always clean up (own session so the whole process group can be killed). No PR_SET_PDEATHSIG:
trio starts processes from worker threads, and the kernel would kill the child when that thread retires;
the runner's reaper (`lab.runner.reaper`) kills the groups instead when the runner is killed hard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from tunnel_lab.lab.runner.forkserver import LAUNCHER, ForkedProcess, ForkServerError
from tunnel_lab.lab.runner.reaper import REAPER
from tunnel_lab.wire.errors import TunnelLabError
from tunnel_lab.wire.redact import redact_argv, redact_text

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
# `tunnel-lab` as this very interpreter runs it: the same venv, the same checkout.
TUNNEL_LAB: tuple[str, ...] = (sys.executable, "-m", "tunnel_lab")


class ComponentError(TunnelLabError):
    """A component did not start, exited early, or did not become ready."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A free port for components that cannot report theirs (a metrics port, an access listener).

    It is chosen *below* the kernel's ephemeral range, so no other component binding port 0 (or
    dialling out) can take it between now and the moment the component binds it, and never the same
    one twice in this process, so parallel scenarios do not collide either.
    """
    low, high = _ephemeral_range()
    bottom, top = _worker_slice(*((20_000, low - 1) if low > 20_000 else (high + 1, 65_535)))
    for _ in range(200):
        port = random.randint(bottom, top)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise ComponentError(f"no free port on {host} between {bottom} and {top}")


def _worker_slice(bottom: int, top: int) -> tuple[int, int]:
    """Under pytest-xdist (the plugin's labs), each worker process picks from its own slice of the range:
    `_HANDED_OUT` only keeps one process from handing a port out twice."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 1):
        return bottom, top
    index, n = int(worker[2:]), int(count)
    size = (top - bottom + 1) // n
    return bottom + index * size, bottom + (index + 1) * size - 1


def child_env(extra: Mapping[str, str] | None = None, *, home: str | None = None) -> dict[str, str]:
    """A clean environment: no TUNNEL_* variables (they act as connector flags), no proxies."""
    # SSLKEYLOGFILE: the components write their TLS key log there (docs/trace.md, "Key logs")
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "SYSTEMROOT", "TMPDIR", "SSLKEYLOGFILE")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if home:
        env["HOME"] = home
    if extra:
        env.update(extra)
    return env


def tail(path: Path, lines: int = 20) -> list[str]:
    """The last `lines` lines of a log file (empty if missing)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process so far (0 when it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (proc(5) fields 14, 15)
    except (OSError, IndexError, ValueError):
        return 0.0


class Component:
    """One process of the lab: `name` (edge, connector, origin:app, access:...), its command line and log."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str],
        ready_file: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env)
        self.ready_file = ready_file
        self.process: trio.Process | ForkedProcess | None = None
        self.ready: dict[str, Any] = {}
        self.starts = 0
        self.cpu = 0.0  # CPU seconds of the processes stopped so far (`stop`), for the operation history

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        if self.running:
            raise ComponentError(f"{self.name} is already running")
        if self.ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.ready_file.unlink()
        self.starts += 1
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as logf:
            logf.write(f"--- start #{self.starts}: {' '.join(redact_argv(self.argv))}\n".encode())
            logf.flush()
            self.process = await _forked(self.argv, self.env, stdout=logf.fileno(), stderr=logf.fileno())
            if self.process is None:
                self.process = await trio.lowlevel.open_process(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,
                )
        REAPER.watch_group(self.process.pid)  # its own session: pgid == pid
        log.debug("started component=%s pid=%s", self.name, self.process.pid)

    async def wait_ready_file(self, timeout: float) -> dict[str, Any]:
        """Wait until the ready file is written; fail fast if the process exits first."""
        assert self.ready_file is not None
        with trio.move_on_after(timeout):
            while True:
                if self.process is not None and self.process.returncode is not None:
                    raise ComponentError(
                        f"{self.name} exited with code {self.process.returncode} before it was ready"
                    )
                if self.ready_file.exists():
                    try:
                        self.ready = json.loads(self.ready_file.read_text())
                        return self.ready
                    except (json.JSONDecodeError, OSError):
                        pass  # written atomically by contract, but be lenient with a half-written file
                await trio.sleep(0.02)
        raise ComponentError(
            f"{self.name} did not write its ready file {self.ready_file} within {timeout:g}s"
        )

    def send_signal(self, sig: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)

    async def wait_exit(self, timeout: float) -> int | None:
        if self.process is None:
            return None
        with trio.move_on_after(timeout):
            return await self.process.wait()
        return None

    async def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM, wait `grace`, then SIGKILL the whole process group. Safe to call repeatedly."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.cpu += process_cpu(self.process.pid)
            self.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self.process.wait()
        self.kill_group()
        with trio.move_on_after(2):
            await self.process.wait()
        return self.process.returncode

    async def kill(self) -> None:
        """SIGKILL the whole process group at once (no graceful shutdown) and reap it."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.cpu += process_cpu(self.process.pid)
        self.kill_group()
        with trio.move_on_after(2):
            await self.process.wait()

    def kill_group(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        REAPER.forget_group(self.process.pid)


async def _forked(argv: Sequence[str], env: Mapping[str, str], *, stdout: int, stderr: int
                  ) -> ForkedProcess | None:
    """`tunnel-lab ARGS` forked by the run's fork server (lab/runner/forkserver.py) in its own session,
    stdin /dev/null; None when there is none or it cannot, and the caller execs instead."""
    launcher = LAUNCHER.get()
    if launcher is None or launcher.broken or list(argv[: len(TUNNEL_LAB)]) != list(TUNNEL_LAB):
        return None
    with open(os.devnull, "rb") as devnull:
        try:
            return await launcher.spawn(argv[len(TUNNEL_LAB):], env, [devnull.fileno(), stdout, stderr])
        except ForkServerError as exc:
            log.warning("%s; starting `%s` with exec", exc, " ".join(redact_argv(argv[3:5])))
            return None


async def concurrently(jobs: Sequence[Callable[[], Awaitable[object]]]) -> None:
    """Run `jobs` at once; the first to fail cancels the others and its exception is raised as itself
    (not in an exception group), so callers catch `ComponentError` as they would for one job."""
    failed: list[Exception] = []

    async with trio.open_nursery() as nursery:

        async def one(job: Callable[[], Awaitable[object]]) -> None:
            try:
                await job()
            except Exception as exc:  # handed to the caller below, whatever it is
                failed.append(exc)
                nursery.cancel_scope.cancel()

        for job in jobs:
            nursery.start_soon(one, job)
    if failed:
        raise failed[0]


async def run_command(
    argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, timeout: float = 30,
    redact: Callable[[str], str] = redact_text,
) -> str:
    """Run a short command (an admin step), log its output to `log_path`, return stdout; raise on failure."""
    with trio.fail_after(timeout):
        done = await _run_forked(argv, env)
        if done is None:
            result = await trio.run_process(
                list(argv),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=dict(env),
                stdin=subprocess.DEVNULL,
            )
            done = result.returncode, result.stdout, result.stderr
    code, out, err = done[0], done[1].decode("utf-8", "replace"), done[2].decode("utf-8", "replace")
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(redact(f"$ {' '.join(redact_argv(argv))}\n{out}{err}[exit {code}]\n"))
    if code != 0:
        shown = ["tunnel-lab", *argv[3:]] if list(argv[:3]) == list(TUNNEL_LAB) else list(argv)
        last = [line for line in (err or out).strip().splitlines() if line.strip()][-3:]
        raise ComponentError(f"`{' '.join(shown)}` failed (exit {code}): {' / '.join(last)}")
    return out


async def _run_forked(argv: Sequence[str], env: Mapping[str, str]) -> tuple[int, bytes, bytes] | None:
    """`run_command` through the fork server: (exit code, stdout, stderr), or None to exec instead."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        process = await _forked(argv, env, stdout=out_write, stderr=err_write)
    finally:
        os.close(out_write)  # the child has its own copies: EOF comes when it exits
        os.close(err_write)
    if process is None:
        os.close(out_read)
        os.close(err_read)
        return None
    captured: dict[int, bytearray] = {out_read: bytearray(), err_read: bytearray()}

    async def drain(fd: int) -> None:
        async with trio.lowlevel.FdStream(fd) as stream:
            while data := await stream.receive_some():
                captured[fd] += data

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, out_read)
            nursery.start_soon(drain, err_read)
        code = await process.wait()
    except BaseException:  # cancelled (the timeout, Ctrl-C): as trio.run_process does, kill it
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()
        raise
    return code, bytes(captured[out_read]), bytes(captured[err_read])

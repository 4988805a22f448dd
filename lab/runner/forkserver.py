"""A fork server: the lab's own processes forked from one interpreter that has already imported them.

A scenario starts four to eight `tunnel-lab` processes (origins, the edge, our connector, admin steps),
and each used to spend most of its start-up importing: 0.11 CPU-second an origin (`import trio` alone is
0.1), 0.25 the edge, 0.25 our connector, 0.065 an admin step. Of the 88-92 CPU-seconds the bundled
library took with our connector, 22-24 are left with this server
(bench/results/2026-12-04-library-forkserver.md). So `tunnel-lab run` starts it once
(`python -m tunnel_lab.lab.runner.forkserver`, in its own session); it imports every module those
processes need (`PRELOAD`), then forks a process for each `tunnel-lab ARGS` the runner asks for. The
child becomes what `python -m tunnel_lab ARGS` would have been: its own session, the runner's stdin,
stdout and stderr (passed over the socket), the environment the runner gives (os.environ replaced
whole), `sys.argv` as `-m tunnel_lab` sets it, then the same `lab.cli.main`; it leaves the server's
loop, and exits as the interpreter would but for the teardown of every module (`exit_child`).

The child is forked twice, so that it is not the server's child but the runner's: the runner is a child
subreaper (prctl PR_SET_CHILD_SUBREAPER), the orphan is handed to it, and it waits for it through a pidfd
as trio waits for its own children. Signals, process groups, exit codes and the CPU the runner reads from
/proc or gets from `wait4` stay what they were with exec.

What differs from exec: the child shares the server's hash seed and module state as imported (nothing
the lab's modules compute at import depends on the environment or the arguments); `random` reseeds
itself after a fork, OpenSSL too. Modules not in `PRELOAD` are imported in the child as before, so the
list only decides speed, never behaviour. `tunnel-lab run --no-fork-server` execs every process instead.

Protocol (a SOCK_SEQPACKET socket pair, one datagram a message): the server sends `ready` once it has
imported everything; then each request is a JSON object `{"args": [...], "env": {...}}` with
three file descriptors (stdin, stdout, stderr) as SCM_RIGHTS, and the answer `{"pid": N}` or
`{"error": TEXT}`. EOF on the socket (the runner exited, however) ends the server.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import ctypes
import gc
import importlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import trio

from tunnel_lab.wire.errors import TunnelLabError

log = logging.getLogger(__name__)

# What `tunnel-lab edge|connector|origin|tunnel|access` import once running (their command line modules
# import the rest lazily). Importing them all costs the server about 0.21 CPU-second, once.
PRELOAD = (
    "tunnel_lab.lab.cli",
    "tunnel_lab.lab.admin",
    "tunnel_lab.edge.cli",
    "tunnel_lab.edge.server",
    "tunnel_lab.edge.quic",
    "tunnel_lab.edge.udp",
    "tunnel_lab.connector.cli",
    "tunnel_lab.connector.runtime",
    "tunnel_lab.connector.edge_discovery",
    "tunnel_lab.connector.http1",
    "tunnel_lab.connector.management",
    "tunnel_lab.connector.metrics",
    "tunnel_lab.connector.quic_transport",
    "tunnel_lab.connector.quic_udp",
    "tunnel_lab.origin_fixtures.cli",
    "cryptography.hazmat.backends.openssl",  # loaded on first use of a key
    "encodings.idna",  # loaded on first use of a host name
)
MAIN = str(Path(__file__).resolve().parent.parent.parent / "tunnel_lab" / "__main__.py")  # -m's sys.argv[0]
_MAX_MESSAGE = 1 << 20
ROOM = "." * 8192  # the server's last argument: room for its children's command lines
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


# ---- the server ---------------------------------------------------------------------------------

@dataclass
class Launch:
    """What the forked child is to become."""

    args: list[str]
    env: dict[str, str]
    fds: list[int]


def serve(sock: socket.socket) -> Launch | None:
    """Answer requests until the runner hangs up (returns None); in a forked child, return its Launch."""
    for name in PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # the collector leaves the preloaded objects alone: fewer copied pages in each child
    try:
        return _answer(sock)
    except OSError:  # the runner hung up (bad input, Ctrl-C) before or while we answered: nothing to say
        return None


def _answer(sock: socket.socket) -> Launch | None:
    sock.send(b"ready")
    while True:
        message, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, 3)
        if not message:
            return None
        try:
            request = json.loads(message)
            launch = Launch([str(a) for a in request["args"]],
                            {str(k): str(v) for k, v in request["env"].items()}, list(fds))
            if len(fds) != 3:
                raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
            pid = _fork_orphan()
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            _close_all(fds)
            sock.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            continue
        if pid == 0:
            sock.close()
            return launch
        _close_all(fds)
        sock.send(json.dumps({"pid": pid}).encode())


def _fork_orphan() -> int:
    """Fork a child whose parent exits at once, so that it is handed to the runner (the subreaper).
    Returns 0 in the child and its pid in the server, once it has been handed over."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(read_end)
        try:
            pid = os.fork()
        except OSError:
            os._exit(1)  # the server reads no pid and reports the failure
        if pid == 0:
            os.close(write_end)
            return 0
        os.write(write_end, pid.to_bytes(4, "little"))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(middle, 0)  # once it has exited, its child is the runner's
    if len(data) != 4:
        raise OSError("fork failed in the intermediate process")
    return int.from_bytes(data, "little")


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def become(launch: Launch) -> int:
    """In the forked child: set up the process as exec would have, then run `tunnel-lab ARGS`."""
    os.setsid()
    for target, fd in enumerate(launch.fds):
        os.dup2(fd, target)
    _close_all([fd for fd in launch.fds if fd > 2])
    os.environ.clear()
    os.environ.update(launch.env)
    sys.argv = [MAIN, *launch.args]
    show_command_line([sys.executable, "-m", "tunnel_lab", *launch.args])
    from tunnel_lab.lab.cli import main

    return main(launch.args)


def show_command_line(argv: Sequence[str]) -> None:
    """Make /proc/self/cmdline (what `ps`, `pgrep -f` and the tests read) show `argv` as one line, as
    setproctitle(3) does: written over the server's own command line, whose last argument (`ROOM`) makes
    space for it, and ending in a NUL before the area's end (which then tells the kernel to stop there).
    Best effort: where /proc/self/mem cannot be written, the server's command line stays."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(") ", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: proc(5) fields 48 and 49
        title = " ".join(argv).encode("utf-8", "surrogateescape")[: end - start - 2] + b"\0"
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(title.ljust(end - start, b"."))
    except (OSError, ValueError, IndexError):
        pass


def exit_child(launch: Launch) -> NoReturn:
    """In the forked child: run it, then exit as the interpreter would (the traceback of an uncaught
    exception, SystemExit's code, atexit functions, flushed streams) but without tearing down every
    module: that touches every page inherited from the server, and copying them cost more CPU than the
    child's whole run (an admin step: 0.035 CPU-second with the teardown, 0.011 without)."""
    try:
        code = become(launch)
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        atexit._run_exitfuncs()  # logging.shutdown among them
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def main(argv: Sequence[str]) -> int:
    """`python -m tunnel_lab.lab.runner.forkserver FD ROOM`: serve on the inherited socket FD (ROOM: a
    long argument, the space each child's command line is written into)."""
    sock = socket.socket(fileno=int(argv[0]))
    launch = serve(sock)
    if launch is None:
        return 0
    exit_child(launch)


# ---- the runner's side --------------------------------------------------------------------------

class ForkedProcess:
    """A process the fork server started, now the runner's child: the part of `trio.Process` the runner
    uses (`pid`, `returncode`, `wait`)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)  # readable once the process has exited
        self._wait_lock = trio.Lock()

    @property
    def returncode(self) -> int | None:
        """The exit code (negative: the signal that ended it), or None while it runs. Reaps it when done."""
        if self._returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid != 0:
                self._returncode = os.waitstatus_to_exitcode(status)
        return self._returncode

    async def wait(self) -> int:
        async with self._wait_lock:  # one task at a time may wait on the pidfd
            while (code := self.returncode) is None:
                await trio.lowlevel.wait_readable(self._pidfd)
        return code

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self._pidfd)


class ForkServerError(TunnelLabError):
    """The fork server could not start a process (it is gone, or the fork failed)."""


class ForkServer:
    """The server process. Started without trio (`tunnel-lab run` starts it before it loads the scenario
    files, so that the server's imports overlap with that), closed once the run is over. Raises OSError
    where it cannot work (no pidfd, no subreaper)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        if not hasattr(os, "pidfd_open"):
            raise OSError("os.pidfd_open is missing (Linux 5.3 and Python 3.9 needed)")
        become_subreaper()
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            # It prints nothing unless it breaks: then on the runner's stderr, where the user looks.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tunnel_lab.lab.runner.forkserver", str(theirs.fileno()), ROOM],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=dict(env),
                pass_fds=(theirs.fileno(),), start_new_session=True)

    def close(self) -> None:
        """Hang up and end the server (it holds no state; what it forked belongs to the runner). Without
        the kill it would end on EOF, but only once it has finished importing."""
        self.socket.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class Launcher:
    """The runner's end of a fork server, in trio: `spawn` starts `tunnel-lab ARGS` as a forked process."""

    def __init__(self, server: ForkServer) -> None:
        self.server = server
        self.broken: str | None = None
        self._sock = trio.socket.from_stdlib_socket(server.socket)
        self._ready = trio.Event()
        self._lock = trio.Lock()

    async def wait_ready(self) -> None:
        """Wait for the server's `ready`; if it does not come, the launcher is `broken`, which makes the
        runner exec its processes as before."""
        try:
            if await self._sock.recv(64) != b"ready":
                raise OSError(f"it exited with code {self.server.process.poll()} before it was ready")
        except OSError as exc:
            self.broken = f"the fork server did not start: {exc}"
            log.warning("%s; components are started with exec", self.broken)
        finally:
            self._ready.set()

    async def spawn(self, args: Sequence[str], env: Mapping[str, str], fds: Sequence[int]) -> ForkedProcess:
        """Fork `tunnel-lab ARGS` with `fds` as its stdin, stdout and stderr. Raises ForkServerError."""
        await self._ready.wait()
        if self.broken is not None:
            raise ForkServerError(self.broken)
        request = json.dumps({"args": list(args), "env": dict(env)}).encode()
        async with self._lock:  # one request at a time: each answer follows its request
            try:
                await self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                      array.array("i", fds))])
                answer = await self._sock.recv(_MAX_MESSAGE)
            except OSError as exc:
                self.broken = f"the fork server is gone: {exc}"
                raise ForkServerError(self.broken) from exc
        if not answer:
            self.broken = f"the fork server exited with code {self.server.process.poll()}"
            raise ForkServerError(self.broken)
        reply = json.loads(answer)
        if "pid" not in reply:
            raise ForkServerError(f"the fork server could not start `tunnel-lab {' '.join(args[:2])}`: "
                                  f"{reply.get('error')}")
        return ForkedProcess(int(reply["pid"]))


def become_subreaper() -> None:
    """Make this process adopt its descendants' orphans (Linux), as the forked processes must be."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


# The launcher of the run in progress (`open_launcher`); None: exec every process.
LAUNCHER: ContextVar[Launcher | None] = ContextVar("LAUNCHER", default=None)


def start_server(env: Mapping[str, str]) -> ForkServer | None:
    """A fork server, or None (said once) where it cannot work."""
    try:
        return ForkServer(env)
    except OSError as exc:
        log.warning("no fork server (%s): components are started with exec", exc)
        return None


@contextlib.asynccontextmanager
async def open_launcher(server: ForkServer | None) -> AsyncIterator[Launcher | None]:
    """The tasks this one starts inside the block fork their processes from `server` (`LAUNCHER`);
    without one they exec them."""
    if server is None:
        yield None
        return
    launcher = Launcher(server)
    await launcher.wait_ready()
    token = LAUNCHER.set(launcher)
    try:
        yield launcher
    finally:
        LAUNCHER.reset(token)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

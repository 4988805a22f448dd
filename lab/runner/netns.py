"""A private network namespace for the whole run: only `lo` exists, DNS answers NXDOMAIN.

Used for `--connector cloudflared` (always) and `--isolate`. The runner re-executes itself as
`unshare --net --mount --pid --fork --mount-proc PYTHON -m lab.runner.cli ARGS` with a marker in the
environment; inside, `enter_inside()` brings `lo` up, bind-mounts a resolv.conf naming 127.0.0.1, and serves
a DNS stub on 127.0.0.1:53 that answers every query with NXDOMAIN (a real cloudflared looks up public names
at start-up whatever its flags; docs/protocol.md §10.4). The PID namespace ends every process with the runner.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from tunnel_lab.wire.errors import TunnelLabError

MARKER = "TUNNEL_LAB_NETNS_INSIDE"


class NetnsError(TunnelLabError):
    """The namespace could not be created or set up."""


def inside() -> bool:
    return os.environ.get(MARKER) == "1"


def available() -> tuple[bool, str]:
    """Can this machine give us a private network namespace? (ok, reason)."""
    if sys.platform != "linux":
        return False, "network namespaces need Linux"
    if shutil.which("unshare") is None:
        return False, "`unshare` (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return (
            False,
            f"unshare failed: {probe.stderr.strip() or probe.returncode} (needs root or CAP_SYS_ADMIN)",
        )
    return True, ""


# A new network, mount and PID namespace; the child is PID 1 there, and dies with unshare.
UNSHARE = ("unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child")


def reexec(argv: Sequence[str]) -> int:
    """Run `python -m lab.runner.cli ARGV` inside a fresh namespace; returns its exit code."""
    env = dict(os.environ)
    env[MARKER] = "1"
    cmd = [
        *UNSHARE,
        sys.executable,
        "-m",
        "tunnel_lab.lab.runner.cli",
        *argv,
    ]
    child = subprocess.Popen(cmd, env=env)
    # unshare blocks SIGTERM while it waits: hand a SIGTERM to the runner inside, which tears down.
    previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: _terminate_children(child.pid))
    try:
        return child.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the runner inside too (same process group): let it tear down; if it cannot,
        # unshare's --kill-child and the PID namespace end every process of the lab.
        try:
            child.wait(timeout=15)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            child.kill()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate_children(pid: int) -> None:
    """SIGTERM to the children of `pid` (Linux /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return
    for child in children:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(child), signal.SIGTERM)


def enter_inside(*, dns_stub: bool = True) -> None:
    """Set up the namespace from the inside: lo up, resolv.conf, DNS stub (unless the caller serves DNS
    itself, as `tunnel-lab sandbox` does). Idempotent per process."""
    _lo_up()
    tmp = tempfile.mkdtemp(prefix="tunnel-lab-netns-")
    resolv = os.path.join(tmp, "resolv.conf")
    with open(resolv, "w", encoding="ascii") as f:
        f.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    if os.path.exists("/etc/resolv.conf"):
        rc = subprocess.run(
            ["mount", "--bind", resolv, "/etc/resolv.conf"], capture_output=True, text=True, check=False
        )
        if rc.returncode != 0:
            raise NetnsError(f"cannot bind-mount resolv.conf: {rc.stderr.strip()}")
    # The mount holds the file's inode; the directory entry is no longer needed.
    shutil.rmtree(tmp, ignore_errors=True)
    if dns_stub:
        start_dns_stub()


def _lo_up() -> None:
    if shutil.which("ip"):
        rc = subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, text=True, check=False)
        if rc.returncode == 0:
            return
    # No iproute2: SIOCSIFFLAGS on lo with IFF_UP | IFF_LOOPBACK | IFF_RUNNING.
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14s", b"lo", 0x1 | 0x8 | 0x40, b"\x00" * 14)
        try:
            fcntl.ioctl(s.fileno(), 0x8914, ifreq)  # SIOCSIFFLAGS
        except OSError as exc:
            raise NetnsError(f"cannot bring lo up: {exc}") from exc


def nxdomain_answer(query: bytes) -> bytes | None:
    """The NXDOMAIN answer to a DNS query (same id and question; QR, RA, RCODE=3), None for junk."""
    if len(query) < 12:
        return None
    flags = 0x8000 | (int.from_bytes(query[2:4], "big") & 0x0100) | 0x0080 | 0x0003
    return query[:2] + flags.to_bytes(2, "big") + query[4:6] + bytes(6) + query[12:]


# Names the stub answers (name -> IPv4), registered by labs in this process: an Access team domain
# served by a lab edge, so that the real cloudflared can fetch its signing keys (docs/access.md).
_NAMES: dict[str, str] = {}
_NAMES_LOCK = threading.Lock()


def register_name(name: str, address: str) -> bool:
    """Have the stub answer `name` with `address`; False (nothing changed) if another lab holds it."""
    with _NAMES_LOCK:
        if _NAMES.get(name.lower(), address) != address:
            return False
        _NAMES[name.lower()] = address
        return True


def unregister_name(name: str, address: str) -> None:
    with _NAMES_LOCK:
        if _NAMES.get(name.lower()) == address:
            del _NAMES[name.lower()]


def stub_answer(query: bytes) -> bytes | None:
    """A registered name's A record (an empty answer for other types), else `nxdomain_answer`."""
    from tunnel_lab.wire import dns

    with _NAMES_LOCK:
        names = dict(_NAMES)
    if names:
        try:
            message = dns.decode_message(query)
        except dns.DnsFormatError:
            return nxdomain_answer(query)
        if not message.is_response and len(message.questions) == 1:
            question = message.questions[0]
            address = names.get(dns.canonical_name(question.name))
            if address is not None:
                answers = (dns.Record(name=question.name, rtype=dns.A, ttl=5, data=address),) \
                    if question.qtype == dns.A else ()
                return dns.encode_message(dns.reply(message, answers=answers))
    return nxdomain_answer(query)


def start_dns_stub(address: tuple[str, int] = ("127.0.0.1", 53)) -> socket.socket:
    """Serve `stub_answer` on UDP `address` in a daemon thread; returns the bound socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(address)

    def serve() -> None:
        while True:
            try:
                query, peer = sock.recvfrom(4096)
            except OSError:
                return
            answer = stub_answer(query)
            if answer is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(answer, peer)

    threading.Thread(target=serve, name="dns-stub", daemon=True).start()
    return sock


# --- `tunnel-lab netns -- COMMAND`: the namespace as a command ---------------------------------------------

NETNS_MODULE = "tunnel_lab.lab.runner.netns"


def isolated() -> bool:
    """Is this process in a network namespace whose only interface is `lo` (what `tunnel-lab netns` makes)?"""
    if sys.platform != "linux":
        return False
    try:
        return {name for _, name in socket.if_nameindex()} == {"lo"}
    except OSError:
        return False


def _exit_status(code: int) -> int:
    # Popen reports death by signal N as -N; a shell reports 128+N, which is what callers can read.
    return 128 - code if code < 0 else code


def _signal_children(pid: int, sig: int) -> None:
    """Send `sig` to the children of `pid` (unshare's one child is the namespace's first process)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return
    for child in children:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(child), sig)


def namespace_pid(unshare_pid: int) -> int | None:
    """The host PID of the namespace's first process (for `nsenter --target PID --net`), once it exists."""
    try:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def start_isolated(command: Sequence[str], *, env: dict[str, str] | None = None,
                   module: str = NETNS_MODULE) -> subprocess.Popen[bytes]:
    """Start `command` in a fresh namespace (lo up, DNS stub) and return the `unshare` process.

    The first process inside is `python -m lab.runner.netns -- COMMAND`: it sets the namespace up, runs
    COMMAND, passes SIGTERM/SIGHUP on to it and exits with its status; being PID 1 of its own PID
    namespace, its exit ends every process COMMAND left behind. `--kill-child` ends it if unshare dies.
    `module` replaces `lab.runner.netns` as that first process (`lab.sandbox` uses it).
    """
    cmd = [
        *UNSHARE,
        sys.executable,
        "-m",
        module,
        "--",
        *command,
    ]
    child_env = dict(os.environ if env is None else env)
    child_env[MARKER] = "1"
    return subprocess.Popen(cmd, env=child_env)


def run_isolated(
    command: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    forward: dict[int, int] | None = None,
    module: str = NETNS_MODULE,
) -> int:
    """Run `command` in a fresh namespace until it exits; return its exit status (128+N for signal N).

    `forward` maps a signal this process receives to the one COMMAND gets (default: SIGTERM and SIGHUP
    as themselves). SIGINT is not forwarded by default: Ctrl-C reaches every process of the terminal's
    foreground group, COMMAND included, and a second copy would look like a second Ctrl-C to it.
    """
    forward = dict(forward or {signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGHUP})
    child = start_isolated(command, env=env, module=module)

    def handler(sig: int, _frame: object) -> None:
        _signal_children(child.pid, forward[sig])

    previous = {sig: signal.signal(sig, handler) for sig in forward}
    if signal.SIGINT not in forward:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda _sig, _frame: None)
    try:
        return _exit_status(child.wait())
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _inside(command: Sequence[str]) -> int:
    """The namespace's first process: set up, run COMMAND, pass signals on, return its status."""
    try:
        enter_inside()
    except (NetnsError, OSError) as exc:
        print(f"tunnel-lab netns: cannot set the namespace up: {exc}", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    # A Python handler (not SIG_IGN, which a child would inherit) keeps Ctrl-C from ending this process
    # before COMMAND, which got the same Ctrl-C and decides for itself.
    signal.signal(signal.SIGINT, lambda _sig, _frame: None)
    try:
        child = subprocess.Popen(list(command), env=env)
    except OSError as exc:
        print(f"tunnel-lab netns: cannot run {command[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _frame: child.send_signal(s))
    return _exit_status(child.wait())


def main(argv: Sequence[str]) -> int:
    """`tunnel-lab netns [--] COMMAND [ARGS...]`: run COMMAND in the lab's private network namespace."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="tunnel-lab netns",
        usage="tunnel-lab netns [-h] -- COMMAND [ARGS...]",
        description="Run COMMAND in a private network namespace: only lo (127.0.0.0/8, ::1) exists and "
        "DNS answers NXDOMAIN to every name. Every process COMMAND started ends when it exits; the exit "
        "status is COMMAND's. Needs Linux, util-linux's unshare, and root or CAP_SYS_ADMIN.",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS...]")
    args = list(argv)
    if args and args[0] == "--":
        command = args[1:]
    else:
        command = parser.parse_args(args).command
        if command and command[0] == "--":
            command = command[1:]
    if not command:
        parser.print_usage(sys.stderr)
        print("tunnel-lab netns: error: name the COMMAND to run", file=sys.stderr)
        return 2
    ok, why = available()
    if not ok:
        print(f"tunnel-lab netns: cannot create a private network namespace: {why}", file=sys.stderr)
        return 2
    return run_isolated(command)


if __name__ == "__main__":
    if not inside():
        sys.exit(main(sys.argv[1:]))
    arguments = sys.argv[1:]
    sys.exit(_inside(arguments[1:] if arguments[:1] == ["--"] else arguments))

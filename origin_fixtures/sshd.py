"""`tunnel-lab origin sshd`: a real OpenSSH server on loopback, for `ssh` through a tunnel's ssh:// rule.

Debian's openssh-server (`sshd`) runs with keys and a configuration of its own in a fresh directory under
the state directory: a host key, and one client key (the only one it accepts, for any user; no
passwords). The ready file adds `client_key` (the private key's path) for the runner's `ssh` step. The
process stays in front of sshd and stops it on SIGTERM/SIGINT.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tunnel_lab.wire.errors import ConfigError

START_TIMEOUT = 20.0


def find_sshd() -> str | None:
    """The sshd binary, or None (Debian keeps it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("sshd")
    if found:
        return found
    return "/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run(host: str, port: int, state: Path, write_ready: Callable[[dict[str, object]], None]) -> int:
    """Run sshd on host:port (0: a free port) until a signal; returns sshd's exit status."""
    sshd = find_sshd()
    keygen = shutil.which("ssh-keygen")
    if sshd is None or keygen is None:
        raise ConfigError("OpenSSH's sshd and ssh-keygen are needed for the sshd origin",
                          hint="Debian: apt-get install openssh-server")
    state.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="sshd-", dir=state))
    for name in ("host", "client"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True)
    (home / "client.pub").replace(home / "authorized_keys")
    port = port or _free_port(host)
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress {host}\nHostKey {home / 'host'}\nPidFile {home / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPermitRootLogin yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory (Debian)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(home / "sshd_config")])
    stop = [False]

    def on_signal(_sig: int, _frame: object) -> None:
        stop[0] = True
        proc.terminate()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deadline = time.monotonic() + START_TIMEOUT
    while True:  # sshd says nothing when it listens: the port answering is the sign
        if proc.poll() is not None:
            print(f"tunnel-lab: origin sshd: sshd exited with {proc.returncode} before listening",
                  file=sys.stderr)
            return 1
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                break
        if time.monotonic() > deadline:
            proc.terminate()
            print(f"tunnel-lab: origin sshd: not listening on {host}:{port} after {START_TIMEOUT:g}s",
                  file=sys.stderr)
            return 1
        time.sleep(0.05)
    address = f"{host}:{port}"
    write_ready({"pid": os.getpid(), "kind": "sshd", "address": address, "url": f"ssh://{address}",
                 "tls": None, "history": None, "client_key": str(home / "client")})
    print(f"origin sshd listening on ssh://{address}", flush=True)
    code = proc.wait()
    return 0 if stop[0] else code

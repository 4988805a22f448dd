"""Where the lab keeps its state: one directory, named by the user, holding everything that must
outlive a process (the tunnel store, the PKI, credentials files, the management API token).

Resolution order: `--state DIR`, else env `TUNNEL_LAB_STATE`, else
`${XDG_STATE_HOME:-~/.local/state}/tunnel-lab`. See docs/architecture.md, "State directory".
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from tunnel_lab.wire.errors import ConfigError

ENV_STATE = "TUNNEL_LAB_STATE"


def default_state_dir() -> Path:
    """The state directory used when neither `--state` nor `TUNNEL_LAB_STATE` is given."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tunnel-lab"


def without_state(argv: Sequence[str]) -> Iterator[tuple[int, str]]:
    """(index, argument) for each command-line argument but a `--state DIR` or `--state=DIR`."""
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--state":
            skip = True
        elif not arg.startswith("--state="):
            yield i, arg


def state_dir(arg: str | os.PathLike[str] | None) -> Path:
    """Resolve the state directory (flag, env, default), create it (mode 0700) and return it absolute."""
    if arg is not None and str(arg) != "":
        path, source = Path(arg), "--state"
    elif os.environ.get(ENV_STATE):
        path, source = Path(os.environ[ENV_STATE]), ENV_STATE
    else:
        path, source = default_state_dir(), "default state directory"
    path = path.expanduser().absolute()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create state directory {path}: {exc.strerror or exc}",
                          source=source) from exc
    if not path.is_dir():
        raise ConfigError(f"state directory {path} is not a directory", source=source)
    return path


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) with mode 0700 if missing; return it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def db_path(state: Path) -> Path:
    """The SQLite tunnel store."""
    return state / "state.db"


def pki_dir(state: Path) -> Path:
    """The lab PKI: CA, edge certificate, host and broken certificates."""
    return state / "pki"


def credentials_dir(state: Path) -> Path:
    """Where `tunnel create` writes credentials files by default."""
    return state / "credentials"


def credentials_path(state: Path, tunnel_id: uuid.UUID) -> Path:
    """The default credentials file of a tunnel: `credentials/<uuid>.json`."""
    return credentials_dir(state) / f"{tunnel_id}.json"


def edge_json_path(state: Path) -> Path:
    """The running edge's bound addresses (written by the edge)."""
    return state / "edge.json"


def api_token_path(state: Path) -> Path:
    """The management API bearer token file."""
    return state / "api-token"


def api_token(state: Path) -> str:
    """Read the management API token, creating it (0600, 32 random bytes hex) on first use.

    Safe when two processes race: the file is created with O_EXCL, the loser reads the winner's.
    """
    return _secret_file(api_token_path(state), secrets.token_hex(32), "management API token")


def quic_reset_key(state: Path) -> bytes:
    """The key the edge derives QUIC stateless reset tokens from (32 random bytes, hex, 0600), created on
    first use: it outlives an edge restart, so the new edge can reset the connections of the old one."""
    path = state / "quic-reset-key"
    text = _secret_file(path, secrets.token_hex(32), "QUIC stateless reset key")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ConfigError("the QUIC stateless reset key is not 16 or more bytes in hex", source=str(path),
                          hint="delete it; the edge makes a new one")
    return key


def _secret_file(path: Path, fresh: str, what: str) -> str:
    """The one-line secret in `path`, written as `fresh` (0600, O_EXCL) if the file does not exist yet."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        # Written in one call; a racing reader that sees an empty file retries below.
        with os.fdopen(fd, "w") as fh:
            fh.write(fresh + "\n")
        return fresh
    for _ in range(100):
        text = path.read_text().strip()
        if text:
            return text
        time.sleep(0.01)
    raise ConfigError(f"{what} file is empty", source=str(path), hint="delete it and retry")

"""Finding secrets a lab run created in the files it wrote (issue 11: nothing secret in results).

`secrets_in(state)` lists what a scenario's state directory holds that must never be written anywhere
else (tunnel secrets, the API token, private key material); `leaks(data, secrets)` names those found in
`data`, literally or inside a base64 run (a `--token` wraps the secret in base64 JSON). Used by the
hostile tests and by `python -m lab.runner.leaks STATES RESULTS...`, which CI runs over the whole library.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

BASE64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{24,}={0,2}")


def secrets_in(state: Path) -> dict[str, str]:
    """Every secret a scenario's state directory holds, named by where it came from."""
    found: dict[str, str] = {}
    if (state / "api-token").exists():
        found["api-token"] = (state / "api-token").read_text().strip()
    # home/.cloudflared: what a scenario's `cli` steps wrote (`tunnel create`, `tunnel login`)
    for creds in [*state.glob("credentials/*.json"), *state.glob("credentials-*.json"),
                  *state.glob("home/.cloudflared/*.json")]:
        found[f"TunnelSecret of {creds.name}"] = json.loads(creds.read_text())["TunnelSecret"]
    cert = state / "home" / ".cloudflared" / "cert.pem"
    if cert.exists():
        with contextlib.suppress(ValueError, AttributeError):
            body = "".join(line for line in cert.read_text().splitlines() if not line.startswith("-----"))
            token = json.loads(base64.b64decode(body)).get("apiToken")
            if isinstance(token, str) and token:
                found["apiToken of cert.pem"] = token
    for key in state.glob("pki/*.key"):
        for i, line in enumerate(key.read_text().splitlines()):
            if not line.startswith("-----") and len(line) >= 24:
                found[f"{key.name} line {i}"] = line
    found.update(_access_keys(state / "state.db"))
    return found


def _access_keys(db: Path) -> dict[str, str]:
    """The Access signing keys' private lines (docs/access.md), when the store has any."""
    import sqlite3

    if not db.exists():
        return {}
    found: dict[str, str] = {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            rows = conn.execute("SELECT kid, pem FROM access_keys").fetchall()
    except sqlite3.Error:  # no Access table: nothing of Access was ever made
        return {}
    for kid, pem in rows:
        for i, line in enumerate(bytes(pem).decode().splitlines()):
            if not line.startswith("-----") and len(line) >= 24:
                found[f"Access signing key {str(kid)[:8]} line {i}"] = line
    return found


def leaks(data: bytes, secrets: dict[str, str]) -> list[str]:
    """Names of the secrets found in `data`, literally or inside a base64 run (a token)."""
    found = [name for name, value in secrets.items() if value.encode() in data]
    for m in BASE64_RUN.finditer(data):
        raw = m.group(0).replace(b"-", b"+").replace(b"_", b"/")
        try:
            decoded = base64.b64decode(raw + b"=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            continue
        found += [f"{name} (base64)" for name, value in secrets.items() if value.encode() in decoded]
    return found


def main(argv: Sequence[str]) -> int:
    """`STATES RESULTS...`: the kept state directories (`tunnel-lab-*` under STATES), then every folder
    or file the runs wrote. Exit 1, naming file and secret, when any secret shows; 2 when there is
    nothing to check (a broken set-up must not pass as clean)."""
    if len(argv) < 2:
        print("usage: python -m lab.runner.leaks STATES RESULTS...", file=sys.stderr)
        return 2
    secrets: dict[str, str] = {}
    states = sorted(Path(argv[0]).glob("tunnel-lab-*"))
    for state in states:
        secrets.update({f"{state.name}: {k}": v for k, v in secrets_in(state).items()})
    files = [p for arg in argv[1:] for p in ([Path(arg)] if Path(arg).is_file() else Path(arg).rglob("*"))
             if p.is_file()]
    if not states or not secrets or not files:
        print(f"leaks: nothing to check ({len(states)} state dirs, {len(secrets)} secrets, "
              f"{len(files)} files)", file=sys.stderr)
        return 2
    found = [(path, name) for path in files for name in leaks(path.read_bytes(), secrets)]
    for path, name in found:
        print(f"leaks: {path}: {name}", file=sys.stderr)
    print(f"leaks: {len(secrets)} secrets of {len(states)} scenarios looked for in {len(files)} files: "
          f"{len(found)} found")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`tunnel-lab login`: write the cert.pem that `cloudflared tunnel login` would fetch, for scripts.

The file is one PEM block of type `ARGO TUNNEL TOKEN` whose bytes are the JSON
`{"zoneID", "accountID", "apiToken"}` (cloudflared's credentials.OriginCert; `endpoint` is left out,
as Go does for an empty value): the lab zone, the lab account of the state directory and a freshly
issued API token that the lab's v4 API (`lab.v4api`) accepts.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tunnel_lab.lab.paths import db_path, state_dir
from tunnel_lab.lab.store import Store
from tunnel_lab.lab.v4base import load_accounts, mint_token
from tunnel_lab.wire.errors import TunnelLabError

PEM_TYPE = "ARGO TUNNEL TOKEN"


def origin_cert_pem(*, zone_id: str, account_id: str, api_token: str) -> bytes:
    """The cert.pem bytes, as Go's `pem.Encode` writes them (64-character base64 lines)."""
    payload = json.dumps({"zoneID": zone_id, "accountID": account_id, "apiToken": api_token},
                         separators=(",", ":")).encode()
    b64 = base64.b64encode(payload).decode("ascii")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return (f"-----BEGIN {PEM_TYPE}-----\n" + "\n".join(lines) + f"\n-----END {PEM_TYPE}-----\n").encode()


def issue_origin_cert(state: Path) -> bytes:
    """A new cert.pem for the lab account of `state` (a new API token each time)."""
    accounts = load_accounts(state)
    with Store(db_path(state)) as store:
        account = store.account_tag
    return origin_cert_pem(zone_id=accounts.zone_tag, account_id=account, api_token=mint_token(state))


def write_private(path: Path, data: bytes) -> None:
    """Create `path` (mode 0600, parents 0700), refusing to replace an existing file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunnel-lab login",
        description="Write a cert.pem for the lab account (what `cloudflared tunnel login` saves after the "
        "browser step): cloudflared's admin commands then talk to the lab's API with it.")
    p.add_argument("--state", metavar="DIR", help="state directory (env TUNNEL_LAB_STATE)")
    p.add_argument("--path", metavar="FILE", help="where to write it (default ~/.cloudflared/cert.pem, "
                   "the first place cloudflared looks)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    return p


def main(argv: Sequence[str]) -> int:
    """`tunnel-lab login [--state DIR] [--path FILE] [--force]`."""
    args = _parser().parse_args(list(argv))
    target = Path(args.path).expanduser() if args.path else Path.home() / ".cloudflared" / "cert.pem"
    try:
        state = state_dir(args.state)
        pem = issue_origin_cert(state)
        if args.force:
            target.unlink(missing_ok=True)
        write_private(target, pem)
    except FileExistsError:
        print(f"tunnel-lab login: {target} already exists; move it away or pass --force to replace it",
              file=sys.stderr)
        return 1
    except (TunnelLabError, OSError) as exc:
        print(f"tunnel-lab login: {exc}", file=sys.stderr)
        return 1
    print(f"You have successfully logged in to the lab.\nThe certificate was saved to {target}")
    return 0

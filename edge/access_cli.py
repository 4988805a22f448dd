"""What `cloudflared access login|token|curl|ssh` need from the Access edge (issue 13 item 2).

- **Metadata discovery:** a request to a protected hostname with `Cf-Access-Metadata-Request: true` is
  answered by the edge (200, no body) with `Cf-Access-Metadata`, an RS256 JWT signed with the team's key:
  `{type: "match", hostname, auth_domain, aud, app_hostname, iat}`; the CLI checks it against the team
  domain's JWKS.
- **The token check:** `?cloudflared_token_check=true` with credentials the policies admit is answered by
  the edge (200) instead of going to the origin; without them the usual 302 to the login page is what
  tells the CLI its token is missing or stale.
- **`/cdn-cgi/access/cli`** on the application: the page the CLI sends the user to. Signed in (the
  application's cookie) and admitted, the edge seals `{app_token, org_token}` to the CLI's public key
  (`token=`, `wire.access_transfer`) and keeps it for the transfer service; not signed in, the usual
  login redirect brings the user back here afterwards.
- **The transfer service:** `GET https://login.cloudflareaccess.org/transfer/<key>` on the eyeball
  listeners (and the management API's `GET /access/transfers/<key>`, which the sandbox's
  `login.cloudflareaccess.org` forwards to) holds the poll open until the sealed tokens are there.
- **The org token:** signing in on the team domain also sets a `CF_Authorization` cookie there (an org
  token: `aud` = the team domain, `type: org`); the login page, given a valid one, signs the user into
  another application without asking again (the CLI's org-token exchange follows those redirects).

The sealed tokens are handed out once and forgotten after ten minutes; the key in a poll's path is a
capability, so it is never logged whole.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import trio

from tunnel_lab.lab.access_store import AccessStore, App
from tunnel_lab.wire import jwt
from tunnel_lab.wire.access_transfer import Sealed, TransferError, parse_public_key, seal

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

TRANSFER_HOST = "login.cloudflareaccess.org"
TRANSFER_PREFIX = "/transfer/"
METADATA_REQUEST = b"cf-access-metadata-request"
METADATA = b"cf-access-metadata"
TOKEN_CHECK = "cloudflared_token_check"
CLI_PATH = "/cdn-cgi/access/cli"
HOLD_SECONDS = 45.0  # under the CLI's 60 s client timeout per poll; it polls 10 times
TRANSFER_TTL = 600.0
MAX_TRANSFERS = 256
ORG_SESSION = 86400.0


@dataclass
class _Slot:
    ready: trio.Event = field(default_factory=trio.Event)
    sealed: Sealed | None = None
    created: float = 0.0


class Transfers:
    """Sealed tokens waiting for their CLI, by the CLI's public key (memory only)."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}

    def _slot(self, key: str, now: float) -> _Slot:
        for old in [k for k, s in self._slots.items() if now - s.created > TRANSFER_TTL]:
            del self._slots[old]
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= MAX_TRANSFERS:
                self._slots.pop(next(iter(self._slots)))
            slot = self._slots[key] = _Slot(created=now)
        return slot

    def deposit(self, key: str, sealed: Sealed) -> None:
        """Keep the sealed tokens for `key` and wake a waiting poll."""
        slot = self._slot(key, time.monotonic())
        slot.sealed = sealed
        slot.ready.set()

    async def take(self, key: str, hold: float) -> Sealed | None:
        """The sealed tokens for `key` (once), waiting up to `hold` seconds; None if none came."""
        slot = self._slot(key, time.monotonic())
        with trio.move_on_after(hold):
            await slot.ready.wait()
        if slot.sealed is None:
            return None
        self._slots.pop(key, None)
        return slot.sealed


def short(key: str) -> str:
    """A transfer key as logs show it (a prefix: the whole key is a capability)."""
    return key[:8] + "..."


def metadata_token(access: AccessStore, app: App, host: str, now: float) -> str:
    """The `Cf-Access-Metadata` value for a request to `host` that `app` protects."""
    domain = str(app.body.get("domain") or app.host)
    return jwt.sign({"type": "match", "hostname": host, "auth_domain": access.auth_domain, "aud": app.aud,
                     "app_hostname": domain, "iat": int(now)}, access.signing_key())


def org_token(access: AccessStore, email: str, sub: str, now: float) -> str:
    """A team-wide token for a signed-in user (the team domain's `CF_Authorization`)."""
    return jwt.sign({"aud": [access.auth_domain], "iss": access.issuer, "iat": int(now), "nbf": int(now),
                     "exp": int(now + ORG_SESSION), "type": "org", "email": email, "sub": sub},
                    access.signing_key())


def org_user(access: AccessStore, token: str, now: float) -> tuple[str, str] | None:
    """(email, sub) of a valid org token, else None."""
    keys = {k.kid: k.private_key.public_key() for k in access.signing_keys()}
    try:
        claims = jwt.verify(token, keys)
        jwt.check_claims(claims, issuer=access.issuer, now=now, audience=[access.auth_domain])
    except jwt.JwtError as exc:
        log.info("access: org token refused: %s", exc)
        return None
    email, sub = claims.get("email"), claims.get("sub")
    if claims.get("type") != "org" or not isinstance(email, str) or not email:
        return None
    return email, sub if isinstance(sub, str) else ""


def cli_transfer_key(query_text: str) -> str | None:
    """The CLI's public key from a `/cdn-cgi/access/cli` query, if it is a well-formed one."""
    key = (urllib.parse.parse_qs(query_text).get("token") or [""])[0]
    try:
        parse_public_key(key)
    except TransferError:
        return None
    return key


def deposit_for_cli(transfers: Transfers, key: str, app_token: str, org: str) -> None:
    """Seal the tokens to the CLI's key and keep them for its poll."""
    transfers.deposit(key, seal(app_token, org, parse_public_key(key)))


def transfer_key_of_path(path: str) -> str | None:
    """`/transfer/<key>` -> key (well-formed), else None."""
    if not path.startswith(TRANSFER_PREFIX):
        return None
    key = urllib.parse.unquote(path[len(TRANSFER_PREFIX):])
    try:
        parse_public_key(key)
    except TransferError:
        return None
    return key


def api_transfer(gate: Any, key: str, hold: float) -> Any:
    """The management API's `GET /access/transfers/<key>?wait=S` (an awaitable of its JSON answer)."""

    async def answer() -> dict[str, Any]:
        sealed = await gate.transfers.take(key, hold)
        if sealed is None:
            return {"pending": True}
        return {"body": sealed.body.decode("ascii"), "service_public_key": sealed.sender_key}

    return answer()

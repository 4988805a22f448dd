"""`originRequest.access`: the connector checks `Cf-Access-Jwt-Assertion` before a request reaches the
origin, as cloudflared does (docs/access.md "Our connector"):

| request | answer |
|---|---|
| no `Cf-Access-Jwt-Assertion` | 403, empty body |
| signature, issuer `https://<team>.cloudflareaccess.com`, `exp` good; `aud` not in `audTag` | 403 |
| wrong issuer, expired, no `exp`, bad or unknown signature, not RS256, malformed | 502 (meta cloudflared) |

Signing keys come from `https://<teamName>.cloudflareaccess.com/cdn-cgi/access/certs`, cached per team
and fetched again when a token names a key id the cache lacks or no cached key verifies it (one fetch at a
time per team). The lab has no DNS for that name: `TUNNEL_LAB_ACCESS_ADDR=HOST:PORT` (the lab edge's
HTTPS eyeball listener) is dialled instead, with the team domain as SNI and Host; TLS is verified with the
system roots plus `--cacert` (the lab CA). Without the variable the name is resolved as usual (port 443).
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import h11
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from tunnel_lab.connector.settings import AccessConfig
from tunnel_lab.wire import jwt

log = logging.getLogger(__name__)

ADDR_ENV = "TUNNEL_LAB_ACCESS_ADDR"
HEADER = b"cf-access-jwt-assertion"
FETCH_TIMEOUT = 10.0
MAX_JWKS = 256 * 1024
HANDLER = "AccessJWTValidator"


@dataclass(frozen=True)
class Refusal:
    """The request does not go on: 403 (filtered, empty body) or 502 (the validator failed)."""

    status: int
    reason: str


class KeySet:
    """One team's signing keys, fetched on demand."""

    def __init__(self, team_domain: str, ca_file: str | None) -> None:
        self.team_domain = team_domain
        self.url = f"https://{team_domain}/cdn-cgi/access/certs"
        self._ca_file = ca_file
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._lock = trio.Lock()
        self._fetched = 0

    async def verify(self, token: str) -> dict[str, object]:
        """The token's claims when a key of the team signed it (fetching keys as needed)."""
        if self._fetched:
            try:
                return jwt.verify(token, self._keys)
            except jwt.UnknownKeyError:
                pass
            except jwt.JwtError as exc:
                if "signature" not in str(exc):
                    raise
        seen = self._fetched
        async with self._lock:
            if self._fetched == seen:  # nobody refreshed while we waited
                await self._refresh()
        return jwt.verify(token, self._keys)

    async def _refresh(self) -> None:
        body = await self._fetch()
        self._keys = jwt.parse_jwks(body)
        self._fetched += 1
        log.info("Fetched Access signing keys url=%s keys=%d", self.url, len(self._keys))

    async def _fetch(self) -> bytes:
        ctx = ssl.create_default_context()
        if self._ca_file:
            ctx.load_verify_locations(self._ca_file)
        addr = os.environ.get(ADDR_ENV, "").strip()
        host, port = self.team_domain, 443
        if addr:
            host, _, port_text = addr.rpartition(":")
            host, port = host.strip("[]"), int(port_text)
        try:
            with trio.fail_after(FETCH_TIMEOUT):
                tcp = await trio.open_tcp_stream(host, port)
                stream = trio.SSLStream(tcp, ctx, server_hostname=self.team_domain)
                async with stream:
                    return await _get(stream, self.team_domain, "/cdn-cgi/access/certs")
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError, h11.ProtocolError,
                ValueError) as exc:
            raise jwt.JwtError(f"fetching keys from {self.url}: {exc or type(exc).__name__}") from None


async def _get(stream: trio.SSLStream[trio.SocketStream], host: str, path: str) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(conn.send(h11.Request(method="GET", target=path, headers=[
        (b"host", host.encode()), (b"accept", b"application/json"), (b"connection", b"close")])) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    status, body = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_JWKS:
                raise ValueError(f"key set larger than {MAX_JWKS} bytes")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if status != 200:
        raise ValueError(f"status {status}")
    return bytes(body)


class AccessValidator:
    """Every team's key set of one connector (shared by its rules and connections)."""

    def __init__(self, ca_file: str | None) -> None:
        self._ca_file = ca_file
        self._sets: dict[str, KeySet] = {}

    def key_set(self, team: str) -> KeySet:
        domain = f"{team}.cloudflareaccess.com"
        if domain not in self._sets:
            self._sets[domain] = KeySet(domain, self._ca_file)
        return self._sets[domain]

    async def check(self, headers: Sequence[tuple[bytes, bytes]], config: AccessConfig) -> Refusal | None:
        """None when the request may go on; else how to refuse it."""
        token = next((bytes(v).decode("latin-1") for k, v in headers if bytes(k).lower() == HEADER), "")
        if not token:
            return Refusal(403, "no access token in request")
        key_set = self.key_set(config.team_name)
        try:
            claims = await key_set.verify(token)
            jwt.check_claims(claims, issuer=f"https://{key_set.team_domain}", now=time.time())
        except jwt.JwtError as exc:
            return Refusal(502, f"error while processing middleware handler {HANDLER}: {exc}")
        if set(jwt.audiences(claims)) & set(config.aud_tag):
            return None
        return Refusal(403, f"Invalid token in jwt: {jwt.audiences(claims)}")

"""Our access client's token side: what `cloudflared access login|token|curl` (and `access ssh|tcp` on a
protected hostname) do to get an Access token, against the lab edge (docs/access.md).

- **App discovery:** `HEAD <app>` with `Cf-Access-Metadata-Request: true` (no redirects followed); the
  `Cf-Access-Metadata` JWT names the team domain (must end in `.cloudflareaccess.com`), the `aud` and the
  application's hostname, and must verify against the team domain's JWKS
  (`https://<team>/cdn-cgi/access/certs`, cached in `~/.cloudflared/<team>-jwks` for a day).
- **Tokens** live where cloudflared keeps them: `~/.cloudflared/<app hostname>-<aud>-token` and
  `~/.cloudflared/<team>-org-token`; an expired one, or one for another `aud`, is removed.
- **Fetching a token:** a cached app token; else the org token exchanged by following the login redirect
  with it as the `CF_Authorization` cookie, up to the application's `/cdn-cgi/access/authorized`, whose
  cookie is the app token; else the browser flow: print `https://<app>/cdn-cgi/access/cli?...&token=<a
  fresh public key>` and long-poll `https://login.cloudflareaccess.org/transfer/<key>` for the sealed
  `{app_token, org_token}` (`wire.access_transfer`).
- **The token check:** `GET <app>?cloudflared_token_check=true` with the token: a 302 to
  `/cdn-cgi/access/login` means it is not (or no longer) good.

Blocking HTTP (`http.client`) with timeouts: these are one-shot CLI steps; `access ssh|tcp` runs them in a
thread. Every name is dialled as itself (the sandbox's DNS), or at `--edge-eyeball` when one is given
(outside the sandbox: the lab edge's HTTPS eyeball listener answers for every name), always over TLS
verified against the system roots plus `--cacert`.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import ssl
import sys
import time
import urllib.parse
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path

from tunnel_lab.wire import jwt
from tunnel_lab.wire.access_transfer import Recipient, TransferError
from tunnel_lab.wire.errors import OriginError

log = logging.getLogger(__name__)

ACCESS_SUFFIX = ".cloudflareaccess.com"
TRANSFER_URL = "https://login.cloudflareaccess.org/transfer/"
LOGIN_PATH = "/cdn-cgi/access/login"
AUTHORIZED_PATH = "/cdn-cgi/access/authorized"
METADATA_MAX_AGE = 86400.0
METADATA_SKEW = 300.0
JWKS_TTL = 86400.0
MAX_JWKS = 1 << 20
REQUEST_TIMEOUT = 10.0
POLL_TIMEOUT = 60.0
POLLS = 10
MAX_REDIRECTS = 10
USER_AGENT = "cloudflared/2026.8.2 (tunnel-lab)"


class AccessClientError(OriginError):
    """A step of the Access flow failed (discovery, token fetch, transfer); the message says which."""


@dataclass(frozen=True)
class AppInfo:
    auth_domain: str
    aud: str
    app_hostname: str


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def cookies(self) -> dict[str, tuple[str, str]]:
        """Set-Cookie values: name -> (value, expires attribute)."""
        out = {}
        for k, v in self.headers:
            if k.lower() == "set-cookie":
                jar: SimpleCookie = SimpleCookie()
                with contextlib.suppress(Exception):
                    jar.load(v)
                for name, morsel in jar.items():
                    out[name] = (morsel.value, morsel["expires"])
        return out


class Http:
    """HTTPS requests to a name, dialled as itself or at the edge's eyeball address."""

    def __init__(self, *, eyeball: str | None = None, cacert: str | None = None) -> None:
        self.eyeball = None
        self.tls = True
        if eyeball:
            self.tls = not eyeball.startswith("http://")
            text = eyeball.removeprefix("https://").removeprefix("http://").rstrip("/")
            host, _, port = text.rpartition(":")
            if not port.isdigit():
                raise AccessClientError(f"--edge-eyeball {eyeball!r} is not https://HOST:PORT")
            self.eyeball = (host.strip("[]"), int(port))
        try:
            self.context = ssl.create_default_context()
            if cacert:
                self.context.load_verify_locations(cacert)
        except (OSError, ssl.SSLError) as exc:
            raise AccessClientError(f"cannot load CA file {cacert}: {exc}") from None

    def request(self, method: str, url: str, headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
                *, timeout: float = REQUEST_TIMEOUT) -> Answer:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or 443
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            if self.eyeball is not None:
                raw = socket.create_connection(self.eyeball, timeout=timeout)
            else:
                raw = socket.create_connection((host, port), timeout=timeout)
            # A plain-HTTP eyeball (outside the sandbox, tests) carries the same requests without TLS.
            sock = self.context.wrap_socket(raw, server_hostname=host) if self.tls else raw
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            conn.sock = sock
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host if port == 443 else f"{host}:{port}")
            conn.putheader("User-Agent", USER_AGENT)
            for name, value in headers:
                conn.putheader(name, value)
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read(MAX_JWKS + 1) if method != "HEAD" else b""
            conn.close()
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            raise AccessClientError(f"{method} {parts.scheme}://{host}{parts.path}: {exc}") from None
        return Answer(resp.status, list(resp.getheaders()), body)


def config_dir() -> Path:
    path = Path(os.path.expanduser("~/.cloudflared"))
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def app_token_path(info: AppInfo) -> Path:
    name = f"{info.app_hostname}-{info.aud}-token".replace("/", "-").replace("*", "-")
    return config_dir() / name


def org_token_path(auth_domain: str) -> Path:
    return config_dir() / f"{auth_domain}-org-token".replace("/", "-")


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _claims(token: str) -> dict[str, object] | None:
    try:
        return jwt.decode(token).claims
    except jwt.JwtError:
        return None


def cached_app_token(info: AppInfo) -> str | None:
    """The stored app token if it is unexpired and for this `aud` (else it is removed)."""
    return _cached(app_token_path(info), info.aud)


def cached_org_token(auth_domain: str) -> str | None:
    return _cached(org_token_path(auth_domain), None)


def _cached(path: Path, aud: str | None) -> str | None:
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    claims = _claims(token)
    exp = claims.get("exp") if claims else None
    good = claims is not None and isinstance(exp, int | float) and exp > time.time()
    if good and aud is not None:
        good = aud in jwt.audiences(claims or {})
    if not good:
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return token


def remove_app_token(info: AppInfo) -> None:
    with contextlib.suppress(OSError):
        app_token_path(info).unlink()


def _jwks(client: Http, auth_domain: str, *, fresh: bool) -> dict[str, object]:
    cache = config_dir() / f"{auth_domain}-jwks"
    if not fresh:
        with contextlib.suppress(OSError, jwt.JwtError):
            if time.time() - cache.stat().st_mtime <= JWKS_TTL:
                return dict(jwt.parse_jwks(cache.read_bytes()))
    answer = client.request("GET", f"https://{auth_domain}/cdn-cgi/access/certs")
    if answer.status != 200:
        raise AccessClientError(f"JWKS endpoint https://{auth_domain}/cdn-cgi/access/certs returned status "
                                f"{answer.status}")
    if len(answer.body) > MAX_JWKS:
        raise AccessClientError(f"JWKS response body exceeds {MAX_JWKS} bytes")
    try:
        keys = jwt.parse_jwks(answer.body)
    except jwt.JwtError as exc:
        raise AccessClientError(f"failed to parse JWKS: {exc}") from None
    with contextlib.suppress(OSError):
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_bytes(answer.body)
        tmp.replace(cache)
    return dict(keys)


def get_app_info(client: Http, url: str) -> AppInfo:
    """Which Access application protects `url` (signed metadata, checked against the team's JWKS)."""
    answer = client.request("HEAD", url, [("Cf-Access-Metadata-Request", "true")], timeout=7.0)
    raw = answer.header("cf-access-metadata")
    if not raw:
        raise AccessClientError(f"failed to find Access application at {url}")
    claims = _claims(raw)
    if claims is None:
        raise AccessClientError("failed to parse metadata JWT")
    domain = str(claims.get("auth_domain") or "")
    auth_domain = (urllib.parse.urlsplit("https://" + domain).hostname or "").lower()
    if not auth_domain.endswith(ACCESS_SUFFIX):
        raise AccessClientError(f"metadata JWT auth_domain {domain!r} does not end with {ACCESS_SUFFIX!r}")
    try:
        verified = jwt.verify(raw, _jwks(client, auth_domain, fresh=False))  # type: ignore[arg-type]
    except jwt.JwtError:
        try:
            verified = jwt.verify(raw, _jwks(client, auth_domain, fresh=True))  # type: ignore[arg-type]
        except jwt.JwtError as exc:
            raise AccessClientError(f"metadata JWT verification failed: {exc}") from None
    host = urllib.parse.urlsplit(url).hostname or ""
    if str(verified.get("hostname", "")).lower() != host.lower():
        raise AccessClientError(f"metadata JWT hostname {verified.get('hostname')!r} does not match request "
                                f"host {host!r}")
    if verified.get("type") != "match":
        raise AccessClientError(f"metadata JWT type {verified.get('type')!r} is not match")
    aud = verified.get("aud")
    if not isinstance(aud, str) or not aud:
        raise AccessClientError("metadata JWT aud is empty")
    iat = verified.get("iat")
    now = time.time()
    if not isinstance(iat, int | float) or iat <= 0:
        raise AccessClientError("metadata JWT iat is missing or invalid")
    if iat < now - METADATA_MAX_AGE or iat > now + METADATA_SKEW:
        raise AccessClientError("metadata JWT iat is out of range")
    app_hostname = str(verified.get("app_hostname") or host)
    return AppInfo(auth_domain, aud, app_hostname)


def is_login_redirect(answer: Answer) -> bool:
    """cloudflared's test for "Access wants a sign-in": a 302 whose Location path is the login page."""
    if answer.status != 302:
        return False
    location = answer.header("location") or ""
    return urllib.parse.urlsplit(location).path.startswith(LOGIN_PATH)


def exchange_org_token(client: Http, url: str, org: str) -> str | None:
    """Follow `HEAD url`'s redirects with the org token on the login page; the app token that
    `/cdn-cgi/access/authorized` sets as its cookie, or None."""
    current = url
    for _ in range(MAX_REDIRECTS):
        path = urllib.parse.urlsplit(current).path
        headers = [("Cookie", f"CF_Authorization={org}")] if LOGIN_PATH in path else []
        answer = client.request("HEAD", current, headers, timeout=7.0)
        if AUTHORIZED_PATH in path:
            value, _expires = answer.cookies().get("CF_Authorization", ("", ""))
            return value or None
        location = answer.header("location")
        if answer.status not in (301, 302, 303, 307, 308) or not location:
            return None
        current = urllib.parse.urljoin(current, location)
    return None


def cli_url(url: str, info: AppInfo, key: str, *, host_only: bool) -> str:
    """The `/cdn-cgi/access/cli` link the user opens (query as cloudflared builds it)."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.update({"token": key, "aud": info.aud})
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "" if host_only else parts.path,
                                    urllib.parse.urlencode(sorted(query.items())), ""))
    query.update({"redirect_url": base, "send_org_token": "true", "edge_token_transfer": "true"})
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/cdn-cgi/access/cli",
                                    urllib.parse.urlencode(sorted(query.items())), ""))


def run_transfer(client: Http, url: str, info: AppInfo, *, host_only: bool) -> dict[str, str]:
    """The browser flow: print the link, long-poll the transfer service, open the sealed tokens."""
    recipient = Recipient()
    link = cli_url(url, info, recipient.public, host_only=host_only)
    print(f"Please open the following URL and log in with your Cloudflare account:\n\n{link}\n\n"
          "Leave cloudflared running to download the token automatically.", file=sys.stderr, flush=True)
    for _ in range(POLLS):
        answer = client.request("GET", TRANSFER_URL + recipient.public, timeout=POLL_TIMEOUT)
        if answer.status >= 500:
            raise AccessClientError(f"error on request {answer.status}: {answer.body[:200]!r}")
        if answer.status != 200:
            log.info("Waiting for login...")
            continue
        try:
            return recipient.open(answer.body, answer.header("service-public-key") or "")
        except TransferError as exc:
            raise AccessClientError(f"the transfer service's answer: {exc}") from None
    raise AccessClientError("Failed to fetch resource")


def fetch_token(client: Http, url: str, info: AppInfo, *, host_only: bool = False) -> str:
    """A usable app token: cached, exchanged from the org token, or through the browser flow."""
    token = cached_app_token(info)
    if token:
        return token
    org = cached_org_token(info.auth_domain)
    if org:
        exchanged = exchange_org_token(client, url, org)
        if exchanged:
            _write_secret(app_token_path(info), exchanged)
            return exchanged
        log.debug("failed to exchange org token for app token")
    tokens = run_transfer(client, url, info, host_only=host_only)
    if tokens.get("org_token"):
        _write_secret(org_token_path(info.auth_domain), tokens["org_token"])
    _write_secret(app_token_path(info), tokens["app_token"])
    return tokens["app_token"]


def token_is_valid(client: Http, url: str, info: AppInfo, headers: list[tuple[str, str]]) -> bool:
    token = fetch_token(client, url, info)
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query),
                                    ("cloudflared_token_check", "true")])
    check = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))
    answer = client.request("GET", check, [("Cf-Access-Token", token), *headers], timeout=5.0)
    return not is_login_redirect(answer)


def verify_token_at_edge(client: Http, url: str, info: AppInfo, headers: list[tuple[str, str]]) -> None:
    """Make sure the stored token passes the edge (fetching a new one once if it does not)."""
    if token_is_valid(client, url, info, headers):
        return
    remove_app_token(info)
    if not token_is_valid(client, url, info, headers):
        raise AccessClientError("failed to verify token")


def app_url(text: str) -> str:
    """A URL as cloudflared reads it: https:// added when missing, and forced."""
    if not text:
        raise AccessClientError("no input provided")
    if not text.startswith(("https://", "http://")):
        text = "https://" + text
    parts = urllib.parse.urlsplit(text)
    if not parts.hostname:
        raise AccessClientError("failed to parse Host")
    return urllib.parse.urlunsplit(("https", *parts[1:]))

"""Cloudflare Access at the lab edge: the gate in front of protected hostnames, and the team domain.

`gate` runs for every eyeball request before it is routed to a tunnel:

- the team domain (`<team>.cloudflareaccess.com`, `lab.cloudflareaccess.com` until renamed) is served
  here: `/cdn-cgi/access/certs` (the JWKS) and the login page `/cdn-cgi/access/login/<app host>` (an email,
  then a one-time code the edge logs at WARNING in one line meant for the user and lists in the
  management API's `access/login_codes`), which sends the browser to the application's
  `/cdn-cgi/access/authorized`, where the `CF_Authorization` cookie is set;
- a request to a protected application (docs/access.md) carries a service token
  (`Cf-Access-Client-Id` / `Cf-Access-Client-Secret`), a user token (`CF_Authorization` cookie or
  `Cf-Access-Token` header) or nothing; the policies decide (`wire.access_policy`). Allowed requests
  go on with `Cf-Access-Jwt-Assertion` (and `Cf-Access-Authenticated-User-Email` for a user); denied
  ones get a 403 page; a client without credentials a 302 to the login page.

Secrets stay out of logs and the request history: tokens, service-token secrets and codes are never
logged (the code only in its own line), the `authorized` URL is recorded without its query, and the
eyeball's own `Cf-Access-*` credentials are not passed to the origin.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import secrets
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from tunnel_lab.edge import access_cli, pages
from tunnel_lab.lab.access_store import AUTH_DOMAIN_SUFFIX, AccessStore, App
from tunnel_lab.wire import jwt
from tunnel_lab.wire.access_policy import Identity, decide, parse_duration

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

COOKIE = "CF_Authorization"
ASSERTION = b"cf-access-jwt-assertion"
USER_EMAIL = b"cf-access-authenticated-user-email"
# Credentials and Access fields an eyeball sends are never passed on (the edge sets its own).
STRIPPED = frozenset({ASSERTION, USER_EMAIL, b"cf-access-client-id", b"cf-access-client-secret",
                      b"cf-access-token"})
CODE_TTL = 600.0
MAX_CODES = 1000
MAX_FORM = 4096
MAX_ATTEMPTS = 5


@dataclass
class PendingCode:
    email: str
    code: str
    app_host: str
    expires: float
    attempts: int = 0


@dataclass
class LoginCodes:
    """One-time codes waiting to be typed on the login page (memory only; ten minutes each)."""

    pending: dict[str, PendingCode] = field(default_factory=dict)  # email -> code

    def issue(self, email: str, app_host: str, now: float) -> PendingCode:
        self._expire(now)
        if len(self.pending) >= MAX_CODES:
            self.pending.pop(next(iter(self.pending)))
        entry = PendingCode(email, f"{secrets.randbelow(10**6):06d}", app_host, now + CODE_TTL)
        self.pending[email] = entry
        return entry

    def redeem(self, email: str, code: str, now: float) -> bool:
        self._expire(now)
        entry = self.pending.get(email)
        if entry is None:
            return False
        entry.attempts += 1
        if secrets.compare_digest(entry.code, code.strip()):
            del self.pending[email]
            return True
        if entry.attempts >= MAX_ATTEMPTS:
            del self.pending[email]
        return False

    def listed(self, now: float) -> list[dict[str, Any]]:
        self._expire(now)
        return [{"email": e.email, "code": e.code, "app": e.app_host, "expires_in": round(e.expires - now)}
                for e in self.pending.values()]

    def _expire(self, now: float) -> None:
        for email in [e for e, p in self.pending.items() if p.expires <= now]:
            del self.pending[email]


class AccessGate:
    """Access state of one edge: the store's Access tables and the pending login codes."""

    def __init__(self, access: AccessStore) -> None:
        self.access = access
        self.codes = LoginCodes()
        self.transfers = access_cli.Transfers()
        self._apps: tuple[float, int, list[App]] = (0.0, -1, [])

    def app_for(self, host: str, path: str) -> App | None:
        # The store's version query costs a round trip: asked at most every 0.2 s on the request path.
        now = time.monotonic()
        checked, version, apps = self._apps
        if now - checked > 0.2:
            current = self.access.store.version()
            if current != version:
                apps = self.access.apps()
            self._apps = (now, current, apps)
        for app in apps:
            if app.host == host and app.covers(path):
                return app
        return None

    def app_on_host(self, host: str, aud: str) -> App | None:
        """For `/cdn-cgi/access/...` on a host whose applications cover paths only: the one named by
        `aud` (the CLI's `aud=`), else the host's first."""
        on_host = [a for a in self.access.apps() if a.host == host]
        return next((a for a in on_host if a.aud == aud), on_host[0] if on_host else None)


@dataclass
class Verdict:
    """What the gate decided: `answered` (the gate sent the response), or forward with `headers` added
    (None: the host is not protected and the request goes on untouched)."""

    answered: bool = False
    status: int = 0
    outcome: str = ""
    headers: Headers | None = None


def gate_of(edge: Any) -> AccessGate:
    """The edge's gate, made on first use from its store."""
    if edge.access is None:
        edge.access = AccessGate(AccessStore(edge.tunnels.store))
    gate: AccessGate = edge.access
    return gate


def _header(req: Any, name: bytes) -> str | None:
    for key, value in req.headers:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _cookie(req: Any, name: str) -> str | None:
    for key, value in req.headers:
        if key.lower() != b"cookie":
            continue
        for part in bytes(value).decode("latin-1").split(";"):
            k, sep, v = part.strip().partition("=")
            if sep and k == name:
                return v.strip().strip('"')
    return None


def _path(req: Any) -> str:
    target = str(req.target)
    if "://" in target:
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    return target


def for_history(req: Any) -> Any:
    """The request as the history records it: `/cdn-cgi/access/...` without its query (a sign-in token)."""
    target = str(req.target)
    if "/cdn-cgi/access/" in target and "?" in target:
        return dataclasses.replace(req, target=target.partition("?")[0])
    return req


def forward_headers(tunnel_headers: Headers, verdict: Verdict) -> Headers:
    """The tunnel request's fields without the eyeball's Access fields, plus the gate's."""
    if verdict.headers is None:
        return tunnel_headers
    return [(n, v) for n, v in tunnel_headers if n.lower() not in STRIPPED] + verdict.headers


async def gate(edge: Any, ex: Any, host: str, ray: str) -> Verdict:
    """Decide one eyeball request (see the module docstring)."""
    if host == access_cli.TRANSFER_HOST:
        return await _transfer_poll(edge, ex, ray)
    if host.endswith(AUTH_DOMAIN_SUFFIX):
        return await _team_domain(edge, ex, host, ray)
    the_gate = gate_of(edge)
    req = ex.request
    path = _path(req)
    route, _, query_text = path.partition("?")
    app = the_gate.app_for(host, route)
    if app is None and route.startswith("/cdn-cgi/access/"):
        app = the_gate.app_on_host(host, (urllib.parse.parse_qs(query_text).get("aud") or [""])[0])
    if app is None:
        return Verdict()
    access = the_gate.access
    now = time.time()
    if (_header(req, access_cli.METADATA_REQUEST) or "").strip().lower() == "true":
        return await _metadata(ex, access, app, host, now, ray)
    if path.startswith("/cdn-cgi/access/authorized"):
        return await _authorized(ex, app, access, path, ray)
    client_id = _header(req, b"cf-access-client-id")
    who = Identity(ip=str(req.client_ip))
    token: str | None = None
    if client_id is not None:
        token_id = access.check_service_token(client_id, _header(req, b"cf-access-client-secret") or "")
        if token_id is None:
            log.info("access: service token refused (unknown id or wrong secret) app=%s host=%r ray=%s",
                     app.id, host, ray)
            return await _deny(ex, app, ray, "The service token's client id or secret is wrong.")
        who = Identity(ip=who.ip, service_token_id=token_id)
    else:
        token = _header(req, b"cf-access-token") or _cookie(req, COOKIE)
        if token is not None:
            email = _user_of(token, access, app, now)
            if email is None:
                token = None
            else:
                who = Identity(ip=who.ip, email=email)
    decision, policy = decide(app.policies, who)
    which = policy.name if policy is not None else "-"
    if decision == "bypass":
        log.info("access: bypass policy=%r app=%s ray=%s", which, app.id, ray)
        return Verdict(headers=[])
    if decision in ("allow", "non_identity"):
        log.info("access: %s policy=%r app=%s who=%s ray=%s", decision, which, app.id,
                 who.email or f"service-token:{who.service_token_id}", ray)
        if route == access_cli.CLI_PATH:
            return await _cli(ex, the_gate, app, token, who, query_text, now, ray)
        if access_cli.TOKEN_CHECK in urllib.parse.parse_qs(query_text):
            # The CLI asks whether its credentials pass: answered here, the origin is not bothered.
            await _send(ex, 200, [(b"content-length", b"0")], b"")
            return Verdict(answered=True, status=200, outcome="access-token-check")
        if token is None:  # a service token: the edge signs an assertion for it
            token = _sign(access, app, now, common_name=client_id or "", sub="")
        headers = [(ASSERTION, token.encode("ascii"))]
        if who.email is not None:
            headers.append((USER_EMAIL, who.email.encode("utf-8")))
        return Verdict(headers=headers)
    if who.email is None and who.service_token_id is None:
        return await _login_redirect(ex, access, app, host, ray)
    log.info("access: denied policy=%r app=%s who=%s ray=%s", which, app.id,
             who.email or f"service-token:{who.service_token_id}", ray)
    return await _deny(ex, app, ray,
                       "Your identity is not allowed by this application's policies.")


async def _send(ex: Any, status: int, headers: Headers, body: bytes) -> None:
    """A complete small response (as edge.proxy.send_page; kept here so the proxy may import us)."""
    await ex.start_response(status, headers)
    if body and str(ex.request.method).upper() != "HEAD":
        await ex.send_body(body)
    await ex.finish()


def _user_of(token: str, access: AccessStore, app: App, now: float) -> str | None:
    """The email of a valid user token for this application, else None (forged, expired, another app's)."""
    keys = {k.kid: k.private_key.public_key() for k in access.signing_keys()}
    try:
        claims = jwt.verify(token, keys)
        jwt.check_claims(claims, issuer=access.issuer, now=now, audience=[app.aud])
    except jwt.JwtError as exc:
        log.info("access: token refused for app=%s: %s", app.id, exc)
        return None
    email = claims.get("email")
    return email if isinstance(email, str) and email else None


def _sign(access: AccessStore, app: App, now: float, **claims: Any) -> str:
    session = parse_duration(str(app.body.get("session_duration", "24h"))) or 86400.0
    body = {"aud": [app.aud], "iss": access.issuer, "iat": int(now), "nbf": int(now),
            "exp": int(now + session), "type": "app", "identity_nonce": secrets.token_hex(8), **claims}
    return jwt.sign(body, access.signing_key())


async def _deny(ex: Any, app: App, ray: str, detail: str) -> Verdict:
    headers, body = pages.error_page(403, f"Forbidden: access to {app.body.get('domain')!r} was denied. "
                                          f"{detail}", ray=ray)
    await _send(ex, 403, headers, body)
    return Verdict(answered=True, status=403, outcome="access-denied")


async def _login_redirect(ex: Any, access: AccessStore, app: App, host: str,
                          ray: str) -> Verdict:
    req = ex.request
    query = urllib.parse.urlencode({"kid": app.aud, "redirect_url": _path(req)})
    location = f"{req.scheme}://{access.auth_domain}/cdn-cgi/access/login/{host}?{query}"
    headers, body = pages.error_page(302, "Sign in through Cloudflare Access (lab).", ray=ray)
    await _send(ex, 302, [*headers, (b"location", location.encode())], body)
    log.info("access: no credentials, redirected to login app=%s ray=%s", app.id, ray)
    return Verdict(answered=True, status=302, outcome="access-login")


async def _metadata(ex: Any, access: AccessStore, app: App, host: str, now: float, ray: str) -> Verdict:
    """`Cf-Access-Metadata-Request: true`: which application protects this host, signed (access_cli)."""
    value = access_cli.metadata_token(access, app, host, now)
    await _send(ex, 200, [(access_cli.METADATA, value.encode("ascii")), (b"content-length", b"0")], b"")
    log.info("access: metadata for app=%s host=%r ray=%s", app.id, host, ray)
    return Verdict(answered=True, status=200, outcome="access-metadata")


async def _cli(ex: Any, the_gate: AccessGate, app: App, token: str | None, who: Identity, query_text: str,
               now: float, ray: str) -> Verdict:
    """`/cdn-cgi/access/cli?token=KEY...` for an admitted user: seal the tokens for the CLI's poll."""
    key = access_cli.cli_transfer_key(query_text)
    if key is None or token is None or who.email is None:
        why = ("This page is opened by `cloudflared access login`; its link carries token=<public key>."
               if key is None else "Only a signed-in user can hand a token to cloudflared.")
        headers, body = pages.error_page(400, why, ray=ray)
        await _send(ex, 400, headers, body)
        return Verdict(answered=True, status=400, outcome="access-cli")
    claims = jwt.decode(token).claims
    org = access_cli.org_token(the_gate.access, who.email, str(claims.get("sub") or ""), now)
    access_cli.deposit_for_cli(the_gate.transfers, key, token, org)
    log.info("access: token handed to cloudflared email=%s app=%s key=%s ray=%s", who.email, app.id,
             access_cli.short(key), ray)
    status, (headers, body) = 200, _page("cloudflared has your token",
                                         "You signed in; cloudflared fetches its token now. You can close "
                                         "this window.", "")
    await _send(ex, status, headers, body)
    return Verdict(answered=True, status=status, outcome="access-cli")


async def _transfer_poll(edge: Any, ex: Any, ray: str) -> Verdict:
    """`GET login.cloudflareaccess.org/transfer/KEY`: the sealed tokens, held open until they come."""
    key = access_cli.transfer_key_of_path(_path(ex.request).partition("?")[0])
    if key is None or str(ex.request.method).upper() != "GET":
        headers, body = pages.error_page(404, "No such transfer.", ray=ray)
        await _send(ex, 404, headers, body)
        return Verdict(answered=True, status=404, outcome="access-transfer")
    sealed = await gate_of(edge).transfers.take(key, access_cli.HOLD_SECONDS)
    if sealed is None:  # the CLI polls again (any status under 500 but 200)
        await _send(ex, 404, [(b"content-length", b"0")], b"")
        return Verdict(answered=True, status=404, outcome="access-transfer")
    log.info("access: transfer fetched key=%s ray=%s", access_cli.short(key), ray)
    await _send(ex, 200, [(b"content-type", b"text/plain"),
                          (b"service-public-key", sealed.sender_key.encode()),
                          (b"content-length", str(len(sealed.body)).encode())], sealed.body)
    return Verdict(answered=True, status=200, outcome="access-transfer")


def _cookie_header(value: str, token: str, *, secure: bool) -> bytes:
    """`Set-Cookie` for CF_Authorization, expiring with the token (the CLI reads `Expires`)."""
    exp = jwt.decode(token).claims.get("exp")
    expires = ""
    if isinstance(exp, int | float):
        expires = "; Expires=" + formatdate(float(exp), usegmt=True)
    return (f"{COOKIE}={value}; Path=/{expires}; HttpOnly; SameSite=Lax"
            + ("; Secure" if secure else "")).encode()


async def _authorized(ex: Any, app: App, access: AccessStore, path: str, ray: str) -> Verdict:
    """`/cdn-cgi/access/authorized?token=...&redirect_url=...` on the app: sets the cookie."""
    query = urllib.parse.parse_qs(path.partition("?")[2])
    token = (query.get("token") or [""])[0]
    target = (query.get("redirect_url") or ["/"])[0]
    if not target.startswith("/") or target.startswith("//"):
        target = "/"  # never an open redirect
    if _user_of(token, access, app, time.time()) is None:
        headers, body = pages.error_page(403, "The sign-in token is invalid, expired or for another "
                                              "application.", ray=ray)
        await _send(ex, 403, headers, body)
        return Verdict(answered=True, status=403, outcome="access-denied")
    cookie = _cookie_header(token, token, secure=ex.request.scheme == "https")
    headers, body = pages.error_page(302, "Signed in.", ray=ray)
    headers += [(b"location", target.encode()), (b"set-cookie", cookie)]
    await _send(ex, 302, headers, body)
    return Verdict(answered=True, status=302, outcome="access-authorized")


# ---- the team domain ------------------------------------------------------------------------------

async def _team_domain(edge: Any, ex: Any, host: str, ray: str) -> Verdict:
    the_gate = gate_of(edge)
    access = the_gate.access
    req = ex.request
    path = _path(req)
    route, _, query_text = path.partition("?")
    if host != access.auth_domain:
        headers, body = pages.error_page(404, f"{host!r} is not this lab's team domain "
                                              f"({access.auth_domain}).", ray=ray)
        await _send(ex, 404, headers, body)
        return Verdict(answered=True, status=404, outcome="access-team-domain")
    method = str(req.method).upper()
    if route == "/cdn-cgi/access/certs" and method in ("GET", "HEAD"):
        import json

        body = (json.dumps(access.jwks()) + "\n").encode()
        await _send(ex, 200, [(b"content-type", b"application/json"),
                                  (b"content-length", str(len(body)).encode())], body)
        return Verdict(answered=True, status=200, outcome="access-team-domain")
    if route.startswith("/cdn-cgi/access/login/") and method in ("GET", "HEAD", "POST"):
        app_host = route[len("/cdn-cgi/access/login/"):].lower()
        query = urllib.parse.parse_qs(query_text)
        aud = (query.get("kid") or [""])[0]
        redirect = (query.get("redirect_url") or ["/"])[0]
        app = next((a for a in access.apps() if a.host == app_host and (not aud or a.aud == aud)), None)
        if app is None:
            headers, body = pages.error_page(404, f"No Access application for {app_host!r}.", ray=ray)
            await _send(ex, 404, headers, body)
            return Verdict(answered=True, status=404, outcome="access-team-domain")
        form = await _read_form(ex) if method == "POST" else {}
        org_cookie = _cookie(req, COOKIE)
        org = access_cli.org_user(access, org_cookie, time.time()) if org_cookie and not form else None
        if org is not None:  # signed in to the team already: straight back to the application
            status, headers, body = _signed_in(access, app, req.scheme, redirect, org[0], ray)
        else:
            status, headers, body = _login_step(the_gate, app, req.scheme, route, query_text, redirect, form,
                                                ray)
        await _send(ex, status, headers, body)
        return Verdict(answered=True, status=status, outcome="access-login")
    headers, body = pages.error_page(404, f"The team domain has no page {route!r}.", ray=ray)
    await _send(ex, 404, headers, body)
    return Verdict(answered=True, status=404, outcome="access-team-domain")


async def _read_form(ex: Any) -> dict[str, str]:
    data = b""
    while (chunk := await ex.read_body()) is not None:
        data += chunk
        if len(data) > MAX_FORM:
            return {}
    fields = urllib.parse.parse_qs(data.decode("utf-8", "replace"))
    return {k: v[0] for k, v in fields.items() if v}


def _login_step(the_gate: AccessGate, app: App, scheme: str, route: str, query_text: str, redirect: str,
                form: dict[str, str], ray: str) -> tuple[int, Headers, bytes]:
    """The login page's three states: ask the email, ask the code, done (302 to the app)."""
    access = the_gate.access
    now = time.monotonic()
    action = html.escape(f"{route}?{query_text}")
    email = form.get("email", "").strip().lower()
    if email and "@" in email and "code" not in form:
        entry = the_gate.codes.issue(email, app.host, now)
        # The one line meant for the user: the code a real team would have e-mailed.
        log.warning("access login code for email=%s app=%s: %s (valid %ds)", email, app.host, entry.code,
                    int(CODE_TTL))
        return 200, *_page("Enter the code", f"A one-time code for {email} was written to the lab edge's "
                           "log (and is listed by the management API: access/login_codes).",
                           f'<form method="post" action="{action}">'
                           f'<input type="hidden" name="email" value="{html.escape(email)}">'
                           '<label>Code <input name="code" id="code" autocomplete="one-time-code"></label>'
                           '<button type="submit" id="submit">Sign in</button></form>')
    if email and "code" in form:
        if not the_gate.codes.redeem(email, form["code"], now):
            log.info("access login: wrong or expired code for email=%s app=%s ray=%s", email, app.host, ray)
            return 403, *_page("Wrong code", "That code is wrong or expired; ask for a new one.",
                               _email_form(action))
        status, headers, body = _signed_in(access, app, scheme, redirect, email, ray)
        now_s = time.time()
        org = access_cli.org_token(access, email, _sub(email), now_s)
        return status, [*headers, (b"set-cookie", _cookie_header(org, org, secure=scheme == "https"))], body
    return 200, *_page(f"Sign in to {app.body.get('name', app.host)}",
                       "Cloudflare Access (tunnel-lab): sign in with your email; the lab shows the one-time "
                       "code in its log.", _email_form(action))


def _sub(email: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, email))


def _signed_in(access: AccessStore, app: App, scheme: str, redirect: str, email: str,
               ray: str) -> tuple[int, Headers, bytes]:
    """A new application token for `email`: 302 to the application's `/cdn-cgi/access/authorized`."""
    token = _sign(access, app, time.time(), email=email, sub=_sub(email), country="XX")
    if not redirect.startswith("/") or redirect.startswith("//"):
        redirect = "/"
    query = urllib.parse.urlencode({"token": token, "redirect_url": redirect})
    location = f"{scheme}://{app.host}/cdn-cgi/access/authorized?{query}"
    log.info("access login: signed in email=%s app=%s ray=%s", email, app.host, ray)
    headers, body = pages.error_page(302, "Signed in; back to the application.", ray=ray)
    return 302, [*headers, (b"location", location.encode())], body


def _email_form(action: str) -> str:
    return (f'<form method="post" action="{action}">'
            '<label>Email <input name="email" id="email" type="email" autocomplete="email"></label>'
            '<button type="submit" id="submit">Send me a code</button></form>')


def _page(title: str, text: str, form: str) -> tuple[Headers, bytes]:
    body = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)} | "
            f"tunnel-lab Access</title></head><body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
            f"{form}</body></html>\n").encode()
    return [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store")], body


def api_login_codes(edge: Any) -> list[dict[str, Any]]:
    """The management API's `access/login_codes`."""
    return gate_of(edge).codes.listed(time.monotonic())


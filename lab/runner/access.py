"""A scenario's `topology.access` (docs/access.md): created through the edge's management API once the
edge is up, users signed in through the real login page, and the `${access...}` variables.

- `${access.team}`: the team domain;
- `${access.apps.NAME.aud}`: an application's audience tag;
- `${access.tokens.NAME.id|client_id|client_secret}`: a service token (the secret is registered with
  the run's redactor before anything can write it);
- `${access.users.NAME.cookie}`: the `CF_Authorization` value the login page gave that user (the runner
  walks the page as a browser would: the app's 302, the email form, the one-time code read from the
  management API, the `authorized` redirect);
- `${access.assertions.APP.good|expired|wrong-aud|no-exp|forged}`: assertions signed with the team's key
  (read from the store) for `originRequest.access` scenarios on hostnames the edge does not protect.
"""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

from tunnel_lab.lab.runner import client
from tunnel_lab.lab.runner.procs import ComponentError
from tunnel_lab.wire import jwt

API_PREFIX = "/client/v4/accounts"


async def setup_access(lab: Any) -> None:
    """Create the scenario's Access objects; fills `lab.access_vars` (the `access.*` variables) as it goes,
    so an application's policy can name a service token made just before."""
    spec: dict[str, Any] = lab.scenario.access or {}
    tunnels_list = await lab.api("GET", "/tunnels")
    if not tunnels_list:
        raise ComponentError("topology.access needs a tunnel (the account comes from it)")
    base = f"{API_PREFIX}/{tunnels_list[0]['account_tag']}/access"
    out: dict[str, str] = lab.access_vars
    team = spec.get("team")
    if team:
        await _call(lab, "PUT", f"{base}/organizations", {"auth_domain": f"{team}.cloudflareaccess.com"})
    org = await _call(lab, "GET", f"{base}/organizations")
    out["access.team"] = str(org["auth_domain"])
    for name in spec.get("service_tokens", []):
        token = await _call(lab, "POST", f"{base}/service_tokens", {"name": name})
        lab.redactor.add(token["client_secret"])
        for key in ("id", "client_id", "client_secret"):
            out[f"access.tokens.{name}.{key}"] = str(token[key])
    auds: dict[str, str] = {}
    for name, body in spec.get("apps", {}).items():
        app = await _call(lab, "POST", f"{base}/apps", lab.subst({"name": name, **body}))
        auds[name] = out[f"access.apps.{name}.aud"] = str(app["aud"])
    for name, user in spec.get("users", {}).items():
        cookie = await sign_in(lab, base, str(user["email"]), str(spec["apps"][user["app"]]["domain"]))
        lab.redactor.add(cookie)
        out[f"access.users.{name}.cookie"] = cookie
    if auds:
        out.update(_assertions(lab, out["access.team"], auds))


async def _call(lab: Any, method: str, path: str, body: Any = None) -> Any:
    answer = await lab.api(method, path, body)
    if not isinstance(answer, dict) or not answer.get("success"):
        raise ComponentError(f"Access API {method} {path}: {answer}")
    return answer["result"]


async def sign_in(lab: Any, base: str, email: str, domain: str) -> str:
    """The login page, walked with plain HTTP requests; returns the CF_Authorization value."""
    eyeball = str(lab.edge_ready["http"])
    host, _, path = domain.partition("/")
    path = "/" + path
    resp = await client.http_request(eyeball, host=host, path=path)
    location = _header(resp, "location")
    if resp.status != 302 or not location:
        raise ComponentError(f"sign-in of {email}: {host}{path} answered {resp.status}, not a 302 to log in")
    login = urllib.parse.urlsplit(location)
    target = f"{login.path}?{login.query}"
    form = [("content-type", "application/x-www-form-urlencoded")]
    resp = await client.http_request(eyeball, method="POST", host=login.netloc, path=target, headers=form,
                                     body=urllib.parse.urlencode({"email": email}).encode())
    if resp.status != 200:
        raise ComponentError(f"sign-in of {email}: the email form answered {resp.status}")
    codes = await _call(lab, "GET", f"{base}/login_codes")
    code = next((c["code"] for c in codes if c["email"] == email.lower()), None)
    if code is None:
        raise ComponentError(f"sign-in of {email}: no one-time code listed by the management API")
    resp = await client.http_request(eyeball, method="POST", host=login.netloc, path=target, headers=form,
                                     body=urllib.parse.urlencode({"email": email, "code": code}).encode())
    back = urllib.parse.urlsplit(_header(resp, "location"))
    if resp.status != 302 or back.path != "/cdn-cgi/access/authorized":
        raise ComponentError(f"sign-in of {email}: the code was not accepted ({resp.status})")
    resp = await client.http_request(eyeball, host=back.netloc, path=f"{back.path}?{back.query}")
    cookie = _header(resp, "set-cookie")
    if resp.status != 302 or not cookie.startswith("CF_Authorization="):
        raise ComponentError(f"sign-in of {email}: the application set no CF_Authorization cookie")
    return cookie.split(";")[0].split("=", 1)[1]


def _header(resp: client.Response, name: str) -> str:
    return next((v for k, v in resp.headers if k.lower() == name), "")


def _assertions(lab: Any, team: str, auds: dict[str, str]) -> dict[str, str]:
    from tunnel_lab.lab import paths
    from tunnel_lab.lab.access_store import AccessStore
    from tunnel_lab.lab.store import Store

    with Store(paths.db_path(lab.state)) as store:
        key = AccessStore(store).signing_key()
    now = int(time.time())
    out: dict[str, str] = {}
    for name, aud in auds.items():
        good = {"iss": f"https://{team}", "aud": [aud], "email": "assertion@lab.test", "sub": "lab",
                "iat": now, "exp": now + 3600}
        tokens = {
            "good": jwt.sign(good, key),
            "expired": jwt.sign({**good, "iat": now - 7200, "exp": now - 3600}, key),
            "wrong-aud": jwt.sign({**good, "aud": ["0" * 64]}, key),
            "no-exp": jwt.sign({k: v for k, v in good.items() if k != "exp"}, key),
            "forged": jwt.sign(good, jwt.SigningKey.generate(key.kid)),
        }
        for kind, token in tokens.items():
            lab.redactor.add(token)
            out[f"access.assertions.{name}.{kind}"] = token
    return out

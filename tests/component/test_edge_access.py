"""Access at the edge: the v4 API, the gate (login, cookie, service tokens, bypass, deny) and the team
domain (JWKS, login page), with plain HTTP clients against a running edge."""

from __future__ import annotations

import json
import logging
import time
import urllib.parse

import trio

from tests.component.test_edge_api import api
from tests.component.test_edge_support import (
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
)
from tunnel_lab.edge.access import gate_of
from tunnel_lab.wire import jwt

HOST = "app.test"
TEAM = "lab.cloudflareaccess.com"


async def setup(edge):
    acct = edge.state.tunnels.store.account_tag
    base = f"/client/v4/accounts/{acct}/access"
    status, token = await api(edge, "POST", f"{base}/service_tokens", {"name": "ci"})
    assert status == 200 and token["success"], token
    tok = token["result"]
    app = {"name": "app", "domain": HOST, "policies": [
        {"name": "staff", "decision": "allow", "include": [{"email_domain": {"domain": "example.test"}}]},
        {"name": "no-bob", "decision": "deny", "include": [{"email": {"email": "bob@example.test"}}]},
        {"name": "ci", "decision": "non_identity", "include": [{"service_token": {"token_id": tok["id"]}}]},
    ]}
    status, created = await api(edge, "POST", f"{base}/apps", app)
    assert status == 200, created
    bypass = {"name": "health", "domain": f"{HOST}/health",
              "policies": [{"name": "all", "decision": "bypass", "include": [{"everyone": {}}]}]}
    assert (await api(edge, "POST", f"{base}/apps", bypass))[0] == 200
    return base, created["result"], tok


async def login(edge, email: str, aud: str, path: str = "/page") -> str:
    """The login page with a plain HTTP client: returns the CF_Authorization cookie value."""
    eyeball = edge.bound["http"]
    r = await http_request(eyeball, "GET", path, host=HOST)
    assert r.status == 302
    location = urllib.parse.urlsplit(r.header(b"location").decode())
    assert location.netloc == TEAM and location.path == f"/cdn-cgi/access/login/{HOST}"
    assert urllib.parse.parse_qs(location.query) == {"kid": [aud], "redirect_url": [path]}
    target = f"{location.path}?{location.query}"
    r = await http_request(eyeball, "GET", target, host=TEAM)
    assert r.status == 200 and b'name="email"' in r.body
    form = [(b"content-type", b"application/x-www-form-urlencoded")]
    r = await http_request(eyeball, "POST", target, host=TEAM, headers=form,
                           body=urllib.parse.urlencode({"email": email}).encode())
    assert r.status == 200 and b'name="code"' in r.body
    acct = gate_of(edge.state).access.store.account_tag
    codes = (await api(edge, "GET", f"/accounts/{acct}/access/login_codes"))[1]["result"]
    code = next(c["code"] for c in codes if c["email"] == email)
    r = await http_request(eyeball, "POST", target, host=TEAM, headers=form,
                           body=urllib.parse.urlencode({"email": email, "code": "000000x"}).encode())
    assert r.status == 403  # a wrong code first: one of five attempts
    r = await http_request(eyeball, "POST", target, host=TEAM, headers=form,
                           body=urllib.parse.urlencode({"email": email, "code": code}).encode())
    assert r.status == 302
    back = urllib.parse.urlsplit(r.header(b"location").decode())
    assert back.netloc == HOST and back.path == "/cdn-cgi/access/authorized"
    r = await http_request(edge.bound["http"], "GET", f"{back.path}?{back.query}", host=HOST)
    assert r.status == 302 and r.header(b"location") == path.encode()
    cookie = r.header(b"set-cookie").decode()
    assert cookie.startswith("CF_Authorization=") and "HttpOnly" in cookie
    return cookie.split(";")[0].split("=", 1)[1]


async def test_access_end_to_end(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(30):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", HOST)
            await registered(nursery, edge, t, echo_handler)
            base, app, tok = await setup(edge)
            eyeball = edge.bound["http"]

            # the JWKS on the team domain
            r = await http_request(eyeball, "GET", "/cdn-cgi/access/certs", host=TEAM)
            assert r.status == 200
            keys = jwt.parse_jwks(r.body)
            assert b"PRIVATE" not in r.body and len(keys) == 1

            # anonymous: a redirect; a forged assertion from the eyeball is not passed on
            r = await http_request(eyeball, "GET", "/x", host=HOST,
                                   headers=[(b"Cf-Access-Jwt-Assertion", b"forged")])
            assert r.status == 302

            # a user of the allowed domain, through the login page
            cookie = await login(edge, "alice@example.test", app["aud"])
            r = await http_request(eyeball, "GET", "/page", host=HOST,
                                   headers=[(b"cookie", f"a=b; CF_Authorization={cookie}".encode()),
                                            (b"Cf-Access-Authenticated-User-Email", b"mallory@evil.test")])
            assert r.status == 200
            seen = dict(json.loads(r.body)["headers"])
            assert seen["cf-access-authenticated-user-email"] == "alice@example.test"
            claims = jwt.verify(seen["cf-access-jwt-assertion"], keys)
            jwt.check_claims(claims, issuer=f"https://{TEAM}", now=time.time(), audience=[app["aud"]])
            assert claims["email"] == "alice@example.test" and claims["sub"] and claims["iat"] <= time.time()
            # the same token in the Cf-Access-Token header
            r = await http_request(eyeball, "GET", "/page", host=HOST,
                                   headers=[(b"cf-access-token", cookie.encode())])
            assert r.status == 200

            # a denied user (deny beats allow) and a user of another domain
            for who in ("bob@example.test", "eve@evil.test"):
                c = await login(edge, who, app["aud"])
                r = await http_request(eyeball, "GET", "/page", host=HOST,
                                       headers=[(b"cookie", f"CF_Authorization={c}".encode())])
                assert r.status == 403 and b"denied" in r.body

            # a forged, an expired and another app's cookie: back to the login page
            key = jwt.SigningKey.generate(next(iter(keys)))
            now = time.time()
            good = {"iss": f"https://{TEAM}", "aud": [app["aud"]], "email": "alice@example.test",
                    "iat": int(now), "exp": int(now) + 60}
            real = gate_of(edge.state).access.signing_key()
            for bad in (jwt.sign(good, key), jwt.sign({**good, "exp": int(now) - 1}, real),
                        jwt.sign({**good, "aud": ["another-app"]}, real), cookie[:-5], "x" * 20000):
                r = await http_request(eyeball, "GET", "/page", host=HOST,
                                       headers=[(b"cookie", f"CF_Authorization={bad}".encode())])
                assert r.status == 302, bad[:40]

            # the service token, and a wrong secret
            creds = [(b"Cf-Access-Client-Id", tok["client_id"].encode()),
                     (b"Cf-Access-Client-Secret", tok["client_secret"].encode())]
            r = await http_request(eyeball, "GET", "/api", host=HOST, headers=creds)
            assert r.status == 200
            seen = dict(json.loads(r.body)["headers"])
            assert "cf-access-client-secret" not in seen and "cf-access-authenticated-user-email" not in seen
            claims = jwt.verify(seen["cf-access-jwt-assertion"], keys)
            assert claims["common_name"] == tok["client_id"] and claims["aud"] == [app["aud"]]
            r = await http_request(eyeball, "GET", "/api", host=HOST,
                                   headers=[creds[0], (b"Cf-Access-Client-Secret", b"wrong" * 10)])
            assert r.status == 403

            # the bypass path: no credentials needed, no assertion
            r = await http_request(eyeball, "GET", "/health/live", host=HOST,
                                   headers=[(b"Cf-Access-Jwt-Assertion", b"forged")])
            assert r.status == 200
            assert "cf-access-jwt-assertion" not in dict(json.loads(r.body)["headers"])

            # secrets: never in the history, only the code in its own log line
            history = json.dumps((await api(edge, "GET", "/history"))[1])
            assert tok["client_secret"] not in history and cookie not in history
            assert "token=" not in history
            # hpack's own DEBUG lines show header values; the edge's command line keeps them at WARNING.
            ours = [r for r in caplog.records if not r.name.startswith(("hpack", "h2"))]
            logged = "\n".join(r.getMessage() for r in ours
                               if not r.getMessage().startswith("access login code"))
            assert "access login code for email=alice@example.test" in "\n".join(r.getMessage() for r in ours)
            assert tok["client_secret"] not in logged and cookie not in logged
            assert real.to_pem().decode().splitlines()[1] not in logged
            listed = json.dumps((await api(edge, "GET", f"{base}/service_tokens"))[1])
            assert tok["client_secret"] not in listed and tok["client_id"] in listed


async def test_malformed_policy_is_refused_whole(tmp_path):
    with trio.fail_after(15):
        async with running_edge(tmp_path) as (edge, _nursery):
            base, app, _tok = await setup(edge)
            bad = {"name": "app2", "domain": "other.test", "policies": [
                {"name": "ok", "decision": "allow", "include": [{"everyone": {}}]},
                {"name": "broken", "decision": "allow", "include": [{"ip": {"ip": "300.1.1.1"}}]}]}
            status, answer = await api(edge, "POST", f"{base}/apps", bad)
            assert status == 400 and not answer["success"]
            message = answer["errors"][0]["message"]
            assert "policies[1] 'broken'.include[0].ip.ip" in message and "300.1.1.1" in message
            status, apps = await api(edge, "GET", f"{base}/apps")
            assert sorted(a["name"] for a in apps["result"]) == ["app", "health"]
            # a broken policy added to an existing application leaves it as it was
            status, answer = await api(edge, "POST", f"{base}/apps/{app['id']}/policies",
                                       {"name": "x", "decision": "maybe", "include": [{"everyone": {}}]})
            assert status == 400 and "'x'.decision" in answer["errors"][0]["message"]
            status, got = await api(edge, "GET", f"{base}/apps/{app['id']}")
            assert [p["name"] for p in got["result"]["policies"]] == ["staff", "no-bob", "ci"]
            # policy CRUD
            ops = {"name": "ops", "decision": "allow", "include": [{"ip": {"ip": "10.0.0.0/8"}}]}
            status, added = await api(edge, "POST", f"{base}/apps/{app['id']}/policies", ops)
            assert status == 200 and added["result"]["id"]
            pid = added["result"]["id"]
            assert (await api(edge, "DELETE", f"{base}/apps/{app['id']}/policies/{pid}"))[0] == 200
            assert (await api(edge, "DELETE", f"{base}/apps/{app['id']}/policies/{pid}"))[0] == 404
            assert (await api(edge, "GET", "/accounts/0000/access/apps"))[0] == 404
            assert (await api(edge, "POST", f"{base}/apps", None))[0] == 400

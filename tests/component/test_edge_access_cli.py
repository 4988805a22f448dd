"""What `cloudflared access` needs from the edge (edge/access_cli.py), with plain HTTP clients: metadata
discovery, the token check, `/cdn-cgi/access/cli` with the sealed transfer (on the eyeball and through the
management API), and the org token's sign-in without a second login."""

from __future__ import annotations

import time
import urllib.parse

import trio

from tests.component.test_edge_access import HOST, TEAM, login, setup
from tests.component.test_edge_api import api
from tests.component.test_edge_support import (
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
)
from tunnel_lab.wire import jwt
from tunnel_lab.wire.access_transfer import Recipient


async def test_metadata_token_check_cli_transfer_and_org_sign_in(tmp_path):
    with trio.fail_after(60):
        async with running_edge(tmp_path) as (edge, nursery):
            await registered(nursery, edge, make_tunnel(edge, "t1", HOST), echo_handler)
            _base, app, tok = await setup(edge)
            eyeball = edge.bound["http"]
            certs = await http_request(eyeball, "GET", "/cdn-cgi/access/certs", host=TEAM)
            keys = jwt.parse_jwks(certs.body)

            # metadata discovery: answered by the edge, signed with the team's key
            r = await http_request(eyeball, "HEAD", "/any", host=HOST,
                                   headers=[(b"cf-access-metadata-request", b"true")])
            assert r.status == 200
            meta = jwt.verify(r.header(b"cf-access-metadata").decode(), keys)
            assert meta["type"] == "match" and meta["hostname"] == HOST and meta["auth_domain"] == TEAM
            assert meta["aud"] == app["aud"] and meta["app_hostname"] == HOST
            assert abs(meta["iat"] - time.time()) < 600
            # a host without an application gets no metadata (it goes to the tunnel as before)
            r = await http_request(eyeball, "GET", "/x", host="other.test",
                                   headers=[(b"cf-access-metadata-request", b"true")])
            assert r.header(b"cf-access-metadata") is None

            # the token check: a good token is answered by the edge, a missing one is the login redirect
            cookie = await login(edge, "alice@example.test", app["aud"])
            check = "/?cloudflared_token_check=true"
            r = await http_request(eyeball, "GET", check, host=HOST,
                                   headers=[(b"cf-access-token", cookie.encode())])
            assert r.status == 200 and r.body == b""
            r = await http_request(eyeball, "GET", check, host=HOST)
            assert r.status == 302 and b"/cdn-cgi/access/login/" in r.header(b"location")
            r = await http_request(eyeball, "GET", check, host=HOST,
                                   headers=[(b"cf-access-client-id", tok["client_id"].encode()),
                                            (b"cf-access-client-secret", tok["client_secret"].encode())])
            assert r.status == 200

            # /cdn-cgi/access/cli: anonymous -> login, coming back here; signed in -> sealed for the CLI
            cli = Recipient()
            query = urllib.parse.urlencode({"token": cli.public, "aud": app["aud"], "send_org_token": "true",
                                            "edge_token_transfer": "true", "redirect_url": f"https://{HOST}/"})
            cli_path = f"/cdn-cgi/access/cli?{query}"
            r = await http_request(eyeball, "GET", cli_path, host=HOST)
            assert r.status == 302
            back = urllib.parse.parse_qs(urllib.parse.urlsplit(r.header(b"location").decode()).query)
            assert back["redirect_url"] == [cli_path]
            r = await http_request(eyeball, "GET", cli_path, host=HOST,
                                   headers=[(b"cookie", f"CF_Authorization={cookie}".encode())])
            assert r.status == 200 and b"cloudflared" in r.body
            r = await http_request(eyeball, "GET", f"/transfer/{cli.public}",
                                   host="login.cloudflareaccess.org")
            assert r.status == 200
            tokens = cli.open(r.body, r.header(b"service-public-key").decode())
            assert tokens["app_token"] == cookie
            org = jwt.verify(tokens["org_token"], keys)
            assert org["type"] == "org" and org["aud"] == [TEAM] and org["email"] == "alice@example.test"

            # the management API's view of the transfer service: a second CLI, fetched there
            other = Recipient()
            other_query = urllib.parse.urlencode({"token": other.public, "aud": app["aud"]})
            other_path = f"/cdn-cgi/access/cli?{other_query}"
            r = await http_request(eyeball, "GET", other_path, host=HOST,
                                   headers=[(b"cookie", f"CF_Authorization={cookie}".encode())])
            assert r.status == 200
            status, answer = await api(edge, "GET", f"/access/transfers/{other.public}?wait=0")
            assert status == 200
            assert other.open(answer["body"].encode(), answer["service_public_key"])["app_token"] == cookie
            status, answer = await api(edge, "GET", f"/access/transfers/{other.public}?wait=0")
            assert (status, answer) == (200, {"pending": True})  # handed out once
            status, _ = await api(edge, "GET", "/access/transfers/not*a*key")
            assert status == 404

            # a page without a key, and a transfer nobody deposited (no wait on the API)
            r = await http_request(eyeball, "GET", "/cdn-cgi/access/cli", host=HOST,
                                   headers=[(b"cookie", f"CF_Authorization={cookie}".encode())])
            assert r.status == 400

            # the org token signs the user in to the application without the form (cloudflared's exchange)
            login_path = f"/cdn-cgi/access/login/{HOST}?kid={app['aud']}&redirect_url=/"
            r = await http_request(eyeball, "HEAD", login_path, host=TEAM,
                                   headers=[(b"cookie", f"CF_Authorization={tokens['org_token']}".encode())])
            assert r.status == 302
            there = urllib.parse.urlsplit(r.header(b"location").decode())
            assert there.netloc == HOST and there.path == "/cdn-cgi/access/authorized"
            r = await http_request(eyeball, "HEAD", f"{there.path}?{there.query}", host=HOST)
            set_cookie = r.header(b"set-cookie").decode()
            assert r.status == 302 and "Expires=" in set_cookie
            app_token = set_cookie.split(";")[0].split("=", 1)[1]
            assert jwt.verify(app_token, keys)["email"] == "alice@example.test"
            # an app token is not an org token
            r = await http_request(eyeball, "GET", login_path, host=TEAM,
                                   headers=[(b"cookie", f"CF_Authorization={cookie}".encode())])
            assert r.status == 200 and b'name="email"' in r.body

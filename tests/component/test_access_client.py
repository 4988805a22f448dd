"""Our access client's token side (connector/access_client.py) against a running edge, every name dialled
at its HTTP eyeball listener: app discovery, the browser flow with the transfer poll, the token files,
the token check, the org-token exchange for a second application, and refusals named clearly."""

from __future__ import annotations

import urllib.parse

import pytest
import trio

from tests.component.test_edge_access import HOST, TEAM, setup
from tests.component.test_edge_api import api
from tests.component.test_edge_support import (
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
)
from tunnel_lab.connector import access_client as ac
from tunnel_lab.wire import jwt

OTHER = "other.test"


async def walk_link(edge, link: str, email: str) -> None:
    """What a browser does with the printed link: the login page, the code, back to the cli page."""
    eyeball = edge.bound["http"]
    parts = urllib.parse.urlsplit(link)
    r = await http_request(eyeball, "GET", f"{parts.path}?{parts.query}", host=parts.netloc)
    login = urllib.parse.urlsplit(r.header(b"location").decode())
    target = f"{login.path}?{login.query}"
    form = [(b"content-type", b"application/x-www-form-urlencoded")]
    await http_request(eyeball, "POST", target, host=TEAM, headers=form,
                       body=urllib.parse.urlencode({"email": email}).encode())
    acct = edge.state.tunnels.store.account_tag
    codes = (await api(edge, "GET", f"/accounts/{acct}/access/login_codes"))[1]["result"]
    code = next(c["code"] for c in codes if c["email"] == email)
    r = await http_request(eyeball, "POST", target, host=TEAM, headers=form,
                           body=urllib.parse.urlencode({"email": email, "code": code}).encode())
    back = urllib.parse.urlsplit(r.header(b"location").decode())
    r = await http_request(eyeball, "GET", f"{back.path}?{back.query}", host=HOST)
    cookie = r.header(b"set-cookie").decode().split(";")[0]
    r = await http_request(eyeball, "GET", r.header(b"location").decode(), host=HOST,
                           headers=[(b"cookie", cookie.encode())])
    assert r.status == 200


async def test_login_token_files_check_and_org_exchange(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with trio.fail_after(60):
        async with running_edge(tmp_path) as (edge, nursery):
            await registered(nursery, edge, make_tunnel(edge, "t1", HOST, OTHER), echo_handler)
            base, app, _tok = await setup(edge)
            staff = {"name": "staff", "decision": "allow",
                     "include": [{"email_domain": {"domain": "example.test"}}]}
            status, other = await api(edge, "POST", f"{base}/apps",
                                      {"name": "other", "domain": OTHER, "policies": [staff]})
            assert status == 200
            client = ac.Http(eyeball=f"http://{edge.bound['http']}")
            url = f"https://{HOST}/page"

            info = await trio.to_thread.run_sync(ac.get_app_info, client, url)
            assert info == ac.AppInfo(TEAM, app["aud"], HOST)
            assert (tmp_path / "home" / ".cloudflared" / f"{TEAM}-jwks").exists()

            # no token yet: the browser flow; the link is walked while the client polls
            fetched: list[str] = []
            links: list[str] = []
            printed, done = trio.Event(), trio.Event()
            made = ac.cli_url

            def cli_url(*args, **kwargs):  # the client built its link (it prints it next)
                links.append(made(*args, **kwargs))
                trio.from_thread.run_sync(printed.set)
                return links[0]

            monkeypatch.setattr(ac, "cli_url", cli_url)

            async def fetch() -> None:
                fetched.append(await trio.to_thread.run_sync(ac.fetch_token, client, url, info))
                done.set()

            nursery.start_soon(fetch)
            await printed.wait()
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(links[0]).query)
            assert query["edge_token_transfer"] == ["true"] and query["aud"] == [app["aud"]]
            await walk_link(edge, links[0], "alice@example.test")
            await done.wait()
            assert links[0] in capsys.readouterr().err  # what the user was told to open
            token = fetched[0]
            assert jwt.decode(token).claims["email"] == "alice@example.test"
            assert ac.cached_app_token(info) == token
            assert ac.cached_org_token(TEAM) is not None
            assert await trio.to_thread.run_sync(ac.token_is_valid, client, url, info, [])

            # another application of the team: the org token is exchanged, no second sign-in
            other_url = f"https://{OTHER}/"
            other_info = await trio.to_thread.run_sync(ac.get_app_info, client, other_url)
            assert other_info.aud == other["result"]["aud"]
            exchanged = await trio.to_thread.run_sync(ac.fetch_token, client, other_url, other_info)
            assert jwt.decode(exchanged).claims["aud"] == [other_info.aud]
            assert ac.cached_app_token(other_info) == exchanged

            # a token for another aud or expired in the file is removed, not used
            ac.app_token_path(info).write_text(exchanged)
            assert ac.cached_app_token(info) is None and not ac.app_token_path(info).exists()

            # refusals: no application; metadata that does not verify
            with pytest.raises(ac.AccessClientError, match="failed to find Access application"):
                await trio.to_thread.run_sync(ac.get_app_info, client, "https://unprotected.test/")
            await api(edge, "POST", f"{base}/keys/rotate")
            (tmp_path / "home" / ".cloudflared" / f"{TEAM}-jwks").write_text('{"keys": []}')
            info_again = await trio.to_thread.run_sync(ac.get_app_info, client, url)  # refetched keys
            assert info_again == info

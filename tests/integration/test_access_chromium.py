"""The Access login page in headless Chromium: an anonymous visit is sent to the team domain, the email
and the one-time code are typed into the forms, and the browser ends on the application with the
`CF_Authorization` cookie, the origin seeing the user's email and a valid assertion.

Chromium (tests/chromium.py) maps the two lab names to the edge and every other name to nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import trio

from tests.chromium import chromium, needs_chromium
from tests.component.test_edge_api import api
from tests.component.test_edge_support import echo_handler, make_tunnel, registered, running_edge
from tunnel_lab.edge.access import gate_of
from tunnel_lab.wire import jwt

HOST = "app.test"
TEAM = "lab.cloudflareaccess.com"
STEP_TIMEOUT = 60.0

pytestmark = needs_chromium


def _sign_in_with_chromium(address: str, profile: Path, codes: Any) -> dict[str, Any]:
    """Runs in a thread: the whole browser session; returns what the page showed."""
    port = address.rsplit(":", 1)[1]
    with chromium(profile, {f"{HOST}:80": f"127.0.0.1:{port}", f"{TEAM}:80": f"127.0.0.1:{port}"}) as page:
        page.navigate(f"http://{HOST}/page?x=1")
        login_url = page.evaluate("location.href")
        page.evaluate("document.getElementById('email').value = 'alice@example.test';"
                      "document.getElementById('submit').click()")
        page.wait_event("Page.loadEventFired")
        code_page = page.evaluate("document.body.innerText")
        code = next(c["code"] for c in codes() if c["email"] == "alice@example.test")
        page.evaluate(f"document.getElementById('code').value = '{code}';"
                      "document.getElementById('submit').click()")
        page.wait_event("Page.loadEventFired")
        errors = [e for e in page.console_errors if "/favicon.ico" not in e]  # the lab serves no icon
        assert not errors, errors
        return {"login_url": login_url, "code_page": code_page, "final_url": page.evaluate("location.href"),
                "body": page.evaluate("document.body.innerText"), "cookies": page.cookies(f"http://{HOST}/")}


async def test_login_page_in_headless_chromium(tmp_path: Path) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", HOST)
            await registered(nursery, edge, t, echo_handler)
            acct = edge.state.tunnels.store.account_tag
            staff = {"name": "staff", "decision": "allow",
                     "include": [{"email_domain": {"domain": "example.test"}}]}
            status, answer = await api(edge, "POST", f"/accounts/{acct}/access/apps",
                                       {"name": "app", "domain": HOST, "policies": [staff]})
            assert status == 200, answer
            aud = answer["result"]["aud"]
            gate = gate_of(edge.state)

            def codes() -> list[dict[str, Any]]:
                return gate.codes.listed(time.monotonic())

            seen = await trio.to_thread.run_sync(_sign_in_with_chromium, edge.bound["http"],
                                                 tmp_path / "profile", codes)
    assert seen["login_url"].startswith(f"http://{TEAM}/cdn-cgi/access/login/{HOST}?kid={aud}")
    assert "alice@example.test" in seen["code_page"]
    assert seen["final_url"] == f"http://{HOST}/page?x=1"
    headers = dict(json.loads(seen["body"])["headers"])
    assert headers["cf-access-authenticated-user-email"] == "alice@example.test"
    keys = {k.kid: k.private_key.public_key() for k in gate.access.signing_keys()}
    claims = jwt.verify(headers["cf-access-jwt-assertion"], keys)
    assert claims["aud"] == [aud] and claims["email"] == "alice@example.test"
    cookie = next(c for c in seen["cookies"] if c["name"] == "CF_Authorization")
    assert cookie["httpOnly"] and cookie["value"] == headers["cf-access-jwt-assertion"]

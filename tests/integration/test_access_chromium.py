"""The Access login page in headless Chromium: an anonymous visit is sent to the team domain, the email
and the one-time code are typed into the forms, and the browser ends on the application with the
`CF_Authorization` cookie, the origin seeing the user's email and a valid assertion.

Chromium is driven over its DevTools pipe (`--remote-debugging-pipe`: JSON messages ended by NUL on fds
3 and 4); its resolver maps the two lab names to the edge and every other name to nothing, so it can
reach only loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.component.test_edge_api import api
from tests.component.test_edge_support import echo_handler, make_tunnel, registered, running_edge
from tunnel_lab.edge.access import gate_of
from tunnel_lab.wire import jwt

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOST = "app.test"
TEAM = "lab.cloudflareaccess.com"
STEP_TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                                         "(apt-get install chromium)")


class DevTools:
    """A minimal DevTools client over the pipe: commands in order, events remembered by name."""

    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc = proc
        self._out = to_browser
        self._in = from_browser
        self._buffer = b""
        self._next = 0
        self.events: list[str] = []

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._in, 65536)
            if not chunk:
                raise RuntimeError(f"chromium closed its DevTools pipe (exit {self.proc.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(message))

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == self._next:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            if "method" in answer:
                self.events.append(str(answer["method"]))

    def wait_event(self, name: str) -> None:
        while name not in self.events:
            answer = self._read()
            if "method" in answer:
                self.events.append(str(answer["method"]))
        self.events.remove(name)


def _sign_in_with_chromium(address: str, profile: Path, codes: Any) -> dict[str, Any]:
    """Runs in a thread: the whole browser session; returns what the page showed."""
    port = address.rsplit(":", 1)[1]
    rules = f"MAP {HOST}:80 127.0.0.1:{port}, MAP {TEAM}:80 127.0.0.1:{port}, MAP * ~NOTFOUND"
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    argv = [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
            f"--user-data-dir={profile}", "--no-first-run", "--no-proxy-server",
            f"--host-resolver-rules={rules}", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-default-apps", "--no-pings", "--disable-extensions", "about:blank"]
    # chromium reads commands from fd 3 and writes answers to fd 4: bash puts the pipe ends there
    wrapper = ["bash", "-c", f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}', "chromium", *argv]
    proc = subprocess.Popen(wrapper, pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(to_browser_r)
    os.close(from_browser_w)
    tools = DevTools(proc, to_browser_w, from_browser_r)
    try:
        target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        tools.call("Page.enable", session=session)

        def evaluate(expression: str) -> Any:
            return tools.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                              session=session)["result"].get("value")

        tools.call("Page.navigate", {"url": f"http://{HOST}/page?x=1"}, session=session)
        tools.wait_event("Page.loadEventFired")
        login_url = evaluate("location.href")
        evaluate("document.getElementById('email').value = 'alice@example.test';"
                 "document.getElementById('submit').click()")
        tools.wait_event("Page.loadEventFired")
        code_page = evaluate("document.body.innerText")
        code = next(c["code"] for c in codes() if c["email"] == "alice@example.test")
        evaluate(f"document.getElementById('code').value = '{code}';"
                 "document.getElementById('submit').click()")
        tools.wait_event("Page.loadEventFired")
        return {"login_url": login_url, "code_page": code_page, "final_url": evaluate("location.href"),
                "body": evaluate("document.body.innerText"),
                "cookies": tools.call("Network.getCookies", {"urls": [f"http://{HOST}/"]},
                                      session=session)["cookies"]}
    finally:
        os.close(to_browser_w)
        os.close(from_browser_r)
        proc.kill()
        proc.wait()


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

"""Headless Chromium for the tests of browser-facing pages (Debian's `chromium`).

Chromium is driven over its DevTools pipe (`--remote-debugging-pipe`: JSON messages ended by NUL on
fds 3 and 4). Its resolver maps the names a test gives to loopback and every other name to nothing,
and background networking is off, so it reaches only the lab. Calls block: a trio test runs them with
`trio.to_thread.run_sync`, one at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                                            "(apt-get install chromium; .ci/run does)")


class Browser:
    """One page in a headless Chromium: navigate, evaluate JavaScript, wait for a condition.

    Console errors and uncaught exceptions of the page are collected in `console_errors`.
    """

    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc = proc
        self._out = to_browser
        self._in = from_browser
        self._buffer = b""
        self._next = 0
        self.events: list[str] = []
        self.console_errors: list[str] = []
        self.session = ""

    # ---- the DevTools pipe ------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._in, 65536)
            if not chunk:
                raise RuntimeError(f"chromium closed its DevTools pipe (exit {self.proc.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(message))

    def _event(self, message: dict[str, Any]) -> None:
        name = str(message["method"])
        params = message.get("params", {})
        if name == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console_errors.append(f"uncaught: {details.get('exception', {}).get('description')}"
                                       f" ({details.get('text')})")
        elif name == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.console_errors.append("console.error: " + " ".join(
                str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif name == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.console_errors.append(f"log: {entry.get('text')} ({entry.get('url', '')})")
        self.events.append(name)

    def call(self, method: str, params: dict[str, Any] | None = None, *, page: bool = True) -> Any:
        """One DevTools command (on the page's session unless `page=False`); its result."""
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if page and self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == self._next:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            if "method" in answer:
                self._event(answer)

    def wait_event(self, name: str) -> None:
        """Block until the page sends the DevTools event `name` (once per call)."""
        while name not in self.events:
            answer = self._read()
            if "method" in answer:
                self._event(answer)
        self.events.remove(name)

    # ---- what tests use ----------------------------------------------------------------------
    def navigate(self, url: str) -> None:
        """Load `url` and wait for its load event."""
        self.events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll a JavaScript expression until it is truthy; its value. The page updates on its own
        (server-sent events), so there is no event to wait for from here."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {timeout:g}s: {expression}\npage text:\n"
                                     + str(self.evaluate("document.body.innerText"))[:2000])
            time.sleep(0.05)

    def cookies(self, url: str) -> list[dict[str, Any]]:
        return list(self.call("Network.getCookies", {"urls": [url]})["cookies"])


@contextmanager
def chromium(profile: Path, hosts: dict[str, str] | None = None, *,
             flags: Sequence[str] = ()) -> Iterator[Browser]:
    """A headless Chromium with one blank page; `hosts` maps "name:port" to "127.0.0.1:port"; `flags`
    are more command-line switches."""
    assert CHROMIUM is not None, "use @needs_chromium"
    rules = ", ".join([*(f"MAP {name} {addr}" for name, addr in (hosts or {}).items()), "MAP * ~NOTFOUND",
                       "EXCLUDE 127.0.0.1"])
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    argv = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
            f"--user-data-dir={profile}", "--no-first-run", "--no-proxy-server", "--disable-quic",
            f"--host-resolver-rules={rules}", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-default-apps", "--no-pings", "--disable-extensions", *flags,
            "about:blank"]
    # chromium reads commands from fd 3 and writes answers to fd 4: bash puts the pipe ends there
    wrapper = ["bash", "-c", f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}', "chromium", *argv]
    proc = subprocess.Popen(wrapper, pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(to_browser_r)
    os.close(from_browser_w)
    browser = Browser(proc, to_browser_w, from_browser_r)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"}, page=False)["targetId"]
        browser.session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                       page=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable")
        yield browser
    finally:
        os.close(to_browser_w)
        os.close(from_browser_r)
        proc.kill()
        proc.wait()

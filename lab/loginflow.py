"""`cloudflared tunnel login` against the lab: the approve page and the long-poll transfer service.

cloudflared (token.RunTransfer) prints `https://dash.cloudflare.com/argotunnel?aud=&callback=
https://login.cloudflareaccess.org/<KEY>` (KEY: a fresh public key, standard base64) and then polls
`GET https://login.cloudflareaccess.org/<KEY>`: any answer below 500 other than 200 makes it poll
again, at most 10 times, each with a 60-second client timeout; a 200 body is the cert.pem. So the
lab holds each poll open for `hold` seconds (under cloudflared's timeout) and answers 404 when
nobody approved meanwhile; the approve page (POST) issues the cert.pem (`lab.login`) and wakes
the waiting poll. A cert.pem is handed out once, then forgotten.
"""

from __future__ import annotations

import html
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

CALLBACK_PREFIX = "https://login.cloudflareaccess.org/"
LOGIN_PATH = "/argotunnel"
APPROVE_PATH = "/argotunnel/approve"
HOLD_SECONDS = 45.0  # under cloudflared's 60 s client timeout per poll
MAX_PENDING = 64  # keys nobody approved yet: a client inventing keys must not grow this without end
MAX_KEY_LEN = 256


APPROVED_TTL = 600.0  # an approved cert.pem nobody fetched is dropped after this long


@dataclass
class _Transfer:
    ready: trio.Event = field(default_factory=trio.Event)
    pem: bytes | None = None
    waiters: int = 0
    approved_at: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Page:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _html(status: int, title: str, text: str) -> Page:
    body = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1>{text}</body></html>\n")
    return Page(status=status, content_type="text/html; charset=utf-8", body=body.encode())


def _key_of_callback(callback: str) -> str | None:
    if not callback.startswith(CALLBACK_PREFIX):
        return None
    key = callback[len(CALLBACK_PREFIX):]
    return key if 0 < len(key) <= MAX_KEY_LEN and key.isprintable() and " " not in key else None


class LoginTransfers:
    """Pending logins by KEY; `issue()` makes a new cert.pem (`lab.login.issue_origin_cert`)."""

    def __init__(self, issue: Callable[[], bytes], *, hold: float = HOLD_SECONDS) -> None:
        self._issue = issue
        self._hold = hold
        self._pending: dict[str, _Transfer] = {}

    def _slot(self, key: str) -> _Transfer | None:
        slot = self._pending.get(key)
        if slot is None:
            now = trio.current_time()
            for old in [k for k, v in self._pending.items()
                        if v.pem is not None and now - v.approved_at > APPROVED_TTL]:
                del self._pending[old]
            if len(self._pending) >= MAX_PENDING:
                return None
            slot = self._pending[key] = _Transfer()
        return slot

    @property
    def pending(self) -> int:
        """How many logins are waiting or approved and not fetched yet."""
        return len(self._pending)

    def login_page(self, query: str) -> Page:
        """GET dash.cloudflare.com/argotunnel?callback=...: the page where the user approves."""
        params = urllib.parse.parse_qs(query)
        callback = (params.get("callback") or [""])[-1]
        if _key_of_callback(callback) is None:
            return _html(400, "Login link not valid",
                         "<p>This page is opened by <code>cloudflared tunnel login</code>; the link it "
                         f"printed must carry <code>callback={html.escape(CALLBACK_PREFIX)}KEY</code>.</p>")
        return _html(200, "Authorize Cloudflare Tunnel (lab)",
                     "<p>cloudflared asks for a certificate for the lab's account and zone. The lab zone "
                     "holds any hostname you route.</p>"
                     f"<form method=\"post\" action=\"{APPROVE_PATH}\">"
                     f"<input type=\"hidden\" name=\"callback\" value=\"{html.escape(callback)}\">"
                     "<button type=\"submit\" id=\"authorize\">Authorize</button></form>")

    def approve(self, form: bytes) -> Page:
        """POST dash.cloudflare.com/argotunnel/approve: issue the cert.pem and wake the waiting poll."""
        params = urllib.parse.parse_qs(form.decode("utf-8", "replace"))
        key = _key_of_callback((params.get("callback") or [""])[-1])
        if key is None:
            return _html(400, "Login link not valid", "<p>Start again from the link cloudflared printed.</p>")
        slot = self._slot(key)
        if slot is None:
            return _html(503, "Too many pending logins", "<p>Try again in a minute.</p>")
        if slot.pem is None:
            slot.pem = self._issue()
            slot.approved_at = trio.current_time()
        slot.ready.set()
        return _html(200, "Success", "<p>cloudflared has the certificate now (or will have at its next "
                     "poll). You can close this window.</p>")

    async def poll(self, path: str) -> Page:
        """GET login.cloudflareaccess.org/KEY: the cert.pem once approved (held open until then)."""
        key = urllib.parse.unquote(path.lstrip("/"))
        if _key_of_callback(CALLBACK_PREFIX + key) is None:
            return Page(status=404, content_type="text/plain", body=b"no such login\n")
        slot = self._slot(key)
        if slot is None:
            return Page(status=429, content_type="text/plain", body=b"too many pending logins\n")
        slot.waiters += 1
        try:
            with trio.move_on_after(self._hold):
                await slot.ready.wait()
        finally:
            slot.waiters -= 1
        if slot.pem is None:
            if slot.waiters == 0 and self._pending.get(key) is slot:
                del self._pending[key]  # nobody approved and nobody waits: forget it (a poll brings it back)
            return Page(status=404, content_type="text/plain", body=b"waiting for login\n")
        self._pending.pop(key, None)
        return Page(status=200, content_type="application/x-pem-file", body=slot.pem)

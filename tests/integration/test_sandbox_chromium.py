"""The `tunnel login` approval page in headless Chromium, inside `tunnel-lab sandbox`.

A browser inside the sandbox opens the link that the login prints (dash.cloudflare.com, resolved by the
sandbox's DNS, served under the lab CA), presses Authorize, and the waiting long-poll on
login.cloudflareaccess.org gets the cert.pem. The login is the real `cloudflared tunnel login` when
TUNNEL_LAB_CLOUDFLARED names the binary, and otherwise a script that polls as cloudflared does.

Chromium does not read the system CA bundle the sandbox mounts (it keeps its own store), and no NSS
tool is at hand to add the lab CA there, so it is told to accept the key of the lab's dash.cloudflare.com
certificate (`--ignore-certificate-errors-spki-list`, which matches the certificates the server sends:
the leaf); any other certificate is still refused.
It is driven over its DevTools pipe (tests/chromium.py); its resolver sends dash.cloudflare.com to the
sandbox's service address and nothing else anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chromium import needs_chromium
from tunnel_lab.lab.runner import netns

CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240
OK, WHY = netns.available()

pytestmark = [
    needs_chromium,
    pytest.mark.skipif(not OK, reason=f"no private network namespaces here: {WHY}"),
]

# Runs inside the sandbox: argv[1] is "cloudflared" or "script", argv[2] the repository.
DRIVER = r'''
import base64, hashlib, json, os, secrets, signal, subprocess, sys, threading, urllib.error, urllib.request
signal.alarm(150)  # a browser step that never ends fails the run instead of hanging it
sys.path.insert(0, sys.argv[2])
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pathlib import Path
from tests.chromium import chromium

mode = sys.argv[1]
home = os.environ["HOME"]
out = {}
if mode == "cloudflared":
    login = subprocess.Popen(["cloudflared", "tunnel", "login"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    printed = []
    for line in login.stdout:
        printed.append(line)
        if "https://dash.cloudflare.com/argotunnel" in line:
            url = line[line.index("https://dash.cloudflare.com/argotunnel"):].split()[0]
            break
else:  # what cloudflared does: a fresh key in the callback, then a long-poll for it
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    url = f"https://dash.cloudflare.com/argotunnel?aud=&callback=https://login.cloudflareaccess.org/{key}"
    polled = {}

    def poll():  # as cloudflared: a 404 (nobody approved during the hold) means poll again
        for _ in range(10):
            try:
                with urllib.request.urlopen(f"https://login.cloudflareaccess.org/{key}", timeout=90) as resp:
                    polled["status"], polled["body"] = resp.status, resp.read().decode()
                    return
            except urllib.error.HTTPError as exc:
                polled["status"] = exc.code
                if exc.code != 404:
                    return

    poller = threading.Thread(target=poll)
    poller.start()
out["url"] = url

state = os.environ["TUNNEL_LAB_STATE"]
leaf_path = os.path.join(state, "pki", "hosts", "dash.cloudflare.com.pem")
leaf = x509.load_pem_x509_certificate(open(leaf_path, "rb").read())
spki = base64.b64encode(hashlib.sha256(leaf.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()).decode()
services = json.load(open(os.path.join(state, "sandbox.json")))["services"]
with chromium(Path(home) / "chromium", {"dash.cloudflare.com:443": services},
              flags=[f"--ignore-certificate-errors-spki-list={spki}"]) as browser:
    navigated = browser.call("Page.navigate", {"url": url})
    if navigated.get("errorText"):
        raise SystemExit(f"chromium could not open {url}: {navigated['errorText']}")
    browser.wait_event("Page.loadEventFired")
    out["page_url"] = browser.evaluate("location.href")
    out["page_title"] = browser.evaluate("document.title")
    browser.evaluate("document.getElementById('authorize').click()")
    browser.wait_event("Page.loadEventFired")
    out["after_url"] = browser.evaluate("location.href")
    out["after_text"] = browser.evaluate("document.body.innerText")
    out["console_errors"] = browser.console_errors

if mode == "cloudflared":
    rest, _ = login.communicate(timeout=120)
    out["login_status"] = login.returncode
    out["login_output"] = "".join(printed) + rest
    cert = open(os.path.join(home, ".cloudflared", "cert.pem")).read()
else:
    poller.join(timeout=120)
    out["login_status"] = 0 if polled.get("status") == 200 else polled.get("status")
    cert = polled.get("body", "")
out["cert_type"] = cert.splitlines()[0] if cert else ""
print(json.dumps(out))
'''


@pytest.mark.parametrize("mode", [
    "script",
    pytest.param("cloudflared", marks=pytest.mark.skipif(
        not CLOUDFLARED, reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared")),
])
def test_login_approved_in_headless_chromium(tmp_path: Path, mode: str) -> None:
    (tmp_path / "driver.py").write_text(DRIVER)
    argv = [sys.executable, "-m", "tunnel_lab", "sandbox", "--quiet", "--state", str(tmp_path / "state")]
    if mode == "cloudflared":
        assert CLOUDFLARED is not None
        argv += ["--cloudflared", str(Path(CLOUDFLARED).resolve())]
    result = subprocess.run([*argv, "--", sys.executable, "driver.py", mode, str(REPO)],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["page_url"] == seen["url"] and seen["page_title"] == "Authorize Cloudflare Tunnel (lab)", seen
    assert seen["after_url"] == "https://dash.cloudflare.com/argotunnel/approve", seen
    assert "cloudflared has the certificate now" in seen["after_text"], seen
    # The lab dashboard has no favicon; a 404 for the one the browser asks for on its own is expected.
    assert [e for e in seen["console_errors"] if "/favicon.ico" not in e] == [], seen
    assert seen["login_status"] == 0, seen
    assert seen["cert_type"] == "-----BEGIN ARGO TUNNEL TOKEN-----", seen
    if mode == "cloudflared":
        assert "You have successfully logged in" in seen["login_output"], seen

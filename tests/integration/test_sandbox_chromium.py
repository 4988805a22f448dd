"""The `tunnel login` approval page in headless Chromium, inside `tunnel-lab sandbox`.

A browser inside the sandbox opens the link that the login prints (dash.cloudflare.com, resolved by the
sandbox's DNS, served under the lab CA), presses Authorize, and the waiting long-poll on
login.cloudflareaccess.org gets the cert.pem. The login is the real `cloudflared tunnel login` when
TUNNEL_LAB_CLOUDFLARED names the binary, and otherwise a script that polls as cloudflared does.

Chromium does not read the system CA bundle the sandbox mounts (it keeps its own store), and no NSS
tool is at hand to add the lab CA there, so it is told to accept the key of the lab's dash.cloudflare.com
certificate (`--ignore-certificate-errors-spki-list`, which matches the certificates the server sends:
the leaf); any other certificate is still refused.
It is driven over its DevTools pipe (tests/chromium.py's client).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunnel_lab.lab.runner import netns

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240
OK, WHY = netns.available()

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None,
                       reason="Debian's chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(not OK, reason=f"no private network namespaces here: {WHY}"),
]

# Runs inside the sandbox: argv[1] is "cloudflared" or "script", argv[2] the repository, argv[3] chromium.
DRIVER = r'''
import base64, hashlib, json, os, secrets, signal, subprocess, sys, threading, urllib.error, urllib.request
signal.alarm(150)  # a browser step that never ends fails the run instead of hanging it
sys.path.insert(0, sys.argv[2])
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.chromium import Browser as DevTools

mode, chromium = sys.argv[1], sys.argv[3]
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

leaf_path = os.path.join(os.environ["TUNNEL_LAB_STATE"], "pki", "hosts", "dash.cloudflare.com.pem")
leaf = x509.load_pem_x509_certificate(open(leaf_path, "rb").read())
spki = base64.b64encode(hashlib.sha256(leaf.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()).decode()
to_r, to_w = os.pipe()
from_r, from_w = os.pipe()
argv = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
        f"--user-data-dir={home}/chromium", "--no-first-run", "--no-proxy-server",
        f"--ignore-certificate-errors-spki-list={spki}", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-pings",
        "--disable-extensions", "about:blank"]
proc = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{to_r} 4>&{from_w}', "chromium", *argv],
                        pass_fds=(to_r, from_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
os.close(to_r)
os.close(from_w)
tools = DevTools(proc, to_w, from_r)
try:
    target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    tools.session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    tools.call("Page.enable")

    def evaluate(expression):
        answer = tools.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return answer["result"].get("value")

    navigated = tools.call("Page.navigate", {"url": url})
    if navigated.get("errorText"):
        raise SystemExit(f"chromium could not open {url}: {navigated['errorText']}")
    tools.wait_event("Page.loadEventFired")
    out["page_url"] = evaluate("location.href")
    out["page_title"] = evaluate("document.title")
    evaluate("document.getElementById('authorize').click()")
    tools.wait_event("Page.loadEventFired")
    out["after_url"] = evaluate("location.href")
    out["after_text"] = evaluate("document.body.innerText")
finally:
    os.close(to_w)
    os.close(from_r)
    proc.kill()
    proc.wait()

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
    assert CHROMIUM is not None
    (tmp_path / "driver.py").write_text(DRIVER)
    argv = [sys.executable, "-m", "tunnel_lab", "sandbox", "--quiet", "--state", str(tmp_path / "state")]
    if mode == "cloudflared":
        assert CLOUDFLARED is not None
        argv += ["--cloudflared", str(Path(CLOUDFLARED).resolve())]
    result = subprocess.run([*argv, "--", sys.executable, "driver.py", mode, str(REPO), CHROMIUM],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["page_url"] == seen["url"] and seen["page_title"] == "Authorize Cloudflare Tunnel (lab)", seen
    assert seen["after_url"] == "https://dash.cloudflare.com/argotunnel/approve", seen
    assert "cloudflared has the certificate now" in seen["after_text"], seen
    assert seen["login_status"] == 0, seen
    assert seen["cert_type"] == "-----BEGIN ARGO TUNNEL TOKEN-----", seen
    if mode == "cloudflared":
        assert "You have successfully logged in" in seen["login_output"], seen

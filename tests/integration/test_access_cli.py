"""`cloudflared access login|token|curl|ssh` against the lab, inside `tunnel-lab sandbox`.

The real cloudflared (TUNNEL_LAB_CLOUDFLARED) runs a tunnel whose ingress sends `ssh.example.com` to a
real OpenSSH server (Debian's openssh-server; the test is skipped, saying so, without it) and
`web.example.com` to an origin that echoes the request's Access fields. Both hostnames are Access
applications (users of example.com, and any service token). Then, with no lab flag:

- an anonymous request is sent to the login page; the service token passes;
- `ssh -o ProxyCommand="cloudflared access ssh --hostname %h --service-token-id ID
  --service-token-secret SECRET"` runs a command on the sshd;
- `cloudflared access login https://web.example.com` prints its `/cdn-cgi/access/cli` link; the test
  signs in there as a browser would (email, the one-time code from the API) and cloudflared receives
  its tokens through the transfer service; `access token` prints the same token; `access curl` reaches
  the origin with a valid assertion;
- `access ssh` as the signed-in user (the org token gets it an app token for ssh.example.com without a
  second sign-in) runs a command on the sshd.

With `TUNNEL_LAB_ACCESS_CLIENT=builtin` the same flow runs with `tunnel-lab connector access` in place of
`cloudflared access` (the tunnel is still the real cloudflared's).
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

TIMEOUT = 300
OK, WHY = netns.available()
CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)

# Runs inside the sandbox. Waits (with deadlines) only for things that start on their own schedule:
# the sandbox's description file, the tunnel's connections, sshd's port, the CLI's printed link.
INSIDE = r'''
import http.cookiejar, json, os, re, shlex, socket, subprocess, sys, tempfile, threading, time
import urllib.parse, urllib.request

CLIENT = sys.argv[1].split()  # the access client: "cloudflared access" or "tunnel-lab connector access"
SSHD = sys.argv[2]
state = os.environ["TUNNEL_LAB_STATE"]
home = os.environ["HOME"]
out = {}

def until(what, check, seconds=60):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)

def read_json(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None

sandbox = until("sandbox.json", lambda: read_json(f"{state}/sandbox.json"))
api = "http://" + sandbox["edge_api"]
api_token = open(f"{state}/api-token").read().strip()

def call(method, path, body=None):
    req = urllib.request.Request(api + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {api_token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)

# sshd on 127.0.0.1:2222 with its own keys; the client's key is the only one it accepts.
d = tempfile.mkdtemp(prefix="sshd-")
subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/host"], check=True)
subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/client"], check=True)
os.rename(f"{d}/client.pub", f"{d}/authorized_keys")
open(f"{d}/sshd_config", "w").write(
    f"Port 2222\nListenAddress 127.0.0.1\nHostKey {d}/host\nPidFile {d}/sshd.pid\n"
    f"AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPermitRootLogin yes\n"
    "PasswordAuthentication no\nKbdInteractiveAuthentication no\n")
os.makedirs("/run/sshd", exist_ok=True)
sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", f"{d}/sshd_config"], stderr=open(f"{home}/sshd.log", "w"))

# The origin of web.example.com: echoes the Access fields it was given.
echo = r"""
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", 8000), H).serve_forever()
"""
origin = subprocess.Popen([sys.executable, "-c", echo])

subprocess.run(["tunnel-lab", "login"], check=True, capture_output=True)
subprocess.run(["cloudflared", "tunnel", "create", "lab"], check=True, capture_output=True)
for host in ("ssh.example.com", "web.example.com"):
    subprocess.run(["cloudflared", "tunnel", "route", "dns", "lab", host], check=True, capture_output=True)
open(f"{home}/config.yml", "w").write(
    "ingress:\n  - hostname: ssh.example.com\n    service: ssh://127.0.0.1:2222\n"
    "  - hostname: web.example.com\n    service: http://127.0.0.1:8000\n  - service: http_status:404\n")
tunnel = subprocess.Popen(["cloudflared", "tunnel", "--no-autoupdate", "--config", f"{home}/config.yml",
                           "run", "lab"], stdout=subprocess.DEVNULL, stderr=open(f"{home}/tunnel.log", "w"))
until("the tunnel's connections", lambda: call("GET", "/connections"))
until("sshd", lambda: socket.socket().connect_ex(("127.0.0.1", 2222)) == 0)

account = call("GET", "/tunnels")[0]["account_tag"]
policies = [{"name": "staff", "decision": "allow", "include": [{"email_domain": {"domain": "example.com"}}]},
            {"name": "robots", "decision": "non_identity", "include": [{"any_valid_service_token": {}}]}]
for host in ("ssh.example.com", "web.example.com"):
    call("POST", f"/accounts/{account}/access/apps", {"name": host.split(".")[0], "domain": host,
                                                      "policies": policies})
robot = call("POST", f"/accounts/{account}/access/service_tokens", {"name": "ci"})["result"]

class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
try:
    urllib.request.build_opener(NoRedirect).open("https://web.example.com/", timeout=30)
    out["anonymous"] = "passed"
except urllib.error.HTTPError as exc:
    out["anonymous"] = [exc.code, exc.headers.get("location", "")]

ssh = ["ssh", "-F", "/dev/null", "-i", f"{d}/client", "-o", "StrictHostKeyChecking=no", "-o",
       "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=60"]
client = " ".join(shlex.quote(a) for a in CLIENT)
proxy = (f"{client} ssh --hostname %h --service-token-id {robot['client_id']} "
         f"--service-token-secret {robot['client_secret']}")
done = subprocess.run([*ssh, "-o", f"ProxyCommand={proxy}", "root@ssh.example.com", "echo", "ssh-as-robot"],
                      capture_output=True, text=True, timeout=120)
out["ssh_robot"] = [done.returncode, done.stdout.strip(), done.stderr[-800:]]

# access login: follow the printed link as a browser would, sign in with the code from the API.
login = subprocess.Popen([*CLIENT, "login", "https://web.example.com"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
printed = []
def collect():
    for line in login.stderr:
        printed.append(line)
threading.Thread(target=collect, daemon=True).start()
LINK = re.compile(r"https://\S+/cdn-cgi/access/cli\S*")
link = until("the login link",
             lambda: next((m.group(0) for l in printed for m in [LINK.search(l)] if m), None))
jar = http.cookiejar.CookieJar()
browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
page = browser.open(link, timeout=30)
form_url = page.geturl()
browser.open(form_url, data=urllib.parse.urlencode({"email": "ann@example.com"}).encode(), timeout=30)
codes = call("GET", f"/accounts/{account}/access/login_codes")["result"]
code = next(c["code"] for c in codes if c["email"] == "ann@example.com")
form = {"email": "ann@example.com", "code": code}
final = browser.open(form_url, data=urllib.parse.urlencode(form).encode(), timeout=30)
out["cli_page"] = [final.status, urllib.parse.urlsplit(final.geturl()).path]
stdout, _ = login.communicate(timeout=120)
out["login"] = [login.returncode, stdout.strip()[-2000:], "".join(printed)[-800:]]
token = subprocess.run([*CLIENT, "token", "-app=https://web.example.com"], capture_output=True, text=True,
                       timeout=60)
out["token"] = [token.returncode, token.stdout.strip(), token.stderr[-500:]]
curl = subprocess.run([*CLIENT, "curl", "https://web.example.com/hello", "-s"], capture_output=True,
                      text=True, timeout=60)
out["curl"] = [curl.returncode, curl.stdout.strip(), curl.stderr[-500:]]
done = subprocess.run([*ssh, "-o", f"ProxyCommand={client} ssh --hostname %h", "root@ssh.example.com",
                       "echo", "ssh-as-ann"], capture_output=True, text=True, timeout=120)
out["ssh_user"] = [done.returncode, done.stdout.strip(), done.stderr[-800:]]
out["keys"] = call("GET", f"/accounts/{account}/access/keys")
print("RESULT " + json.dumps(out))
for p in (tunnel, sshd, origin):
    p.terminate()
'''


def run_flow(tmp_path: Path, client: str) -> dict[str, object]:
    assert CLOUDFLARED is not None and SSHD is not None
    argv = [sys.executable, "-m", "tunnel_lab", "sandbox", "--quiet", "--state", str(tmp_path / "state"),
            "--cloudflared", str(Path(CLOUDFLARED).resolve()), "--", sys.executable, "-c", INSIDE, client,
            SSHD]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    home = tmp_path / "state" / "home"
    logs = {name: (home / name).read_text()[-3000:] for name in ("tunnel.log", "sshd.log")
            if (home / name).exists()}
    edge = tmp_path / "state" / "logs" / "edge.log"
    assert lines, (done.returncode, done.stdout[-3000:], done.stderr[-3000:], logs,
                   edge.read_text()[-4000:] if edge.exists() else "")
    result: dict[str, object] = json.loads(lines[-1][len("RESULT "):])
    result["_logs"] = logs
    return result


needs = [
    pytest.mark.skipif(not OK, reason=f"no private network namespaces here: {WHY}"),
    pytest.mark.skipif(not CLOUDFLARED,
                       reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared"),
    pytest.mark.skipif(SSHD is None, reason="needs OpenSSH's sshd (Debian: apt-get install openssh-server)"),
]


@pytest.mark.parametrize("client", [
    pytest.param("cloudflared access", id="cloudflared"),
    pytest.param(f"{sys.executable} -m tunnel_lab connector access", id="builtin"),
])
@needs[0]
@needs[1]
@needs[2]
def test_access_cli_flow_through_the_sandbox(tmp_path: Path, client: str) -> None:
    out = run_flow(tmp_path, client)
    status, location = out["anonymous"]  # type: ignore[misc]
    assert status == 302 and "/cdn-cgi/access/login/web.example.com" in location, out
    assert out["ssh_robot"][:2] == [0, "ssh-as-robot"], out  # type: ignore[index]
    assert out["cli_page"] == [200, "/cdn-cgi/access/cli"], out
    code, printed, _ = out["login"]  # type: ignore[misc]
    assert code == 0, out
    token = out["token"][1]  # type: ignore[index]
    assert out["token"][0] == 0 and token.count(".") == 2 and token in printed, out  # type: ignore[index]
    code, body, _ = out["curl"]  # type: ignore[misc]
    assert code == 0, out
    seen = json.loads(body)
    assert seen["cf-access-authenticated-user-email"] == "ann@example.com", seen
    assert seen["cf-access-jwt-assertion"] == token, seen
    assert out["ssh_user"][:2] == [0, "ssh-as-ann"], out  # type: ignore[index]

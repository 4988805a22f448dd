"""`tunnel-lab sandbox` as a real process: the lab's DNS, API and CA inside, nothing changed outside.

The first test drives the sandbox from Python inside it (names, the API over HTTPS with the system
trust, our connector on a tunnel the API made). The second runs the documented flow with the real
cloudflared and no lab flag; it runs when TUNNEL_LAB_CLOUDFLARED names the binary.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunnel_lab.lab.runner import netns

TIMEOUT = 240
OK, WHY = netns.available()
needs_netns = pytest.mark.skipif(not OK, reason=f"no private network namespaces here: {WHY}")
WATCHED = ("/etc/resolv.conf", "/etc/ssl/certs/ca-certificates.crt")


def sandbox(tmp_path: Path, *command: str, cloudflared: str | None = None,
            flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tunnel_lab", "sandbox", "--quiet", "--state", str(tmp_path / "state"),
            *flags]
    if cloudflared:
        argv += ["--cloudflared", cloudflared]
    return subprocess.run([*argv, "--", *command], capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=tmp_path)


def fingerprints() -> dict[str, str]:
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in WATCHED if os.path.exists(p)}


# Runs inside the sandbox. Polls for the tunnel to come up with a deadline (the connector reports ready
# on its own schedule); every other step is a single request.
INSIDE = r'''
import base64, json, os, socket, ssl, subprocess, sys, time, urllib.request, urllib.error
from tunnel_lab.wire import dns

out = {}
def lookup(name):
    try:
        return sorted({ai[4][0] for ai in socket.getaddrinfo(name, 443, socket.AF_INET)})
    except socket.gaierror as exc:
        return "nxdomain" if exc.errno == socket.EAI_NONAME else f"error {exc}"
for name in ("api.cloudflare.com", "login.cloudflareaccess.org", "region1.v2.argotunnel.com", "example.net"):
    out[name] = lookup(name)

query = dns.Message(id=77, flags=dns.RD, questions=(dns.Question(
    name="_v2-origintunneld._tcp.argotunnel.com", qtype=dns.SRV),))
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(10)
    s.sendto(dns.encode_message(query), ("127.0.0.1", 53))
    reply = dns.decode_message(s.recv(4096))
out["srv"] = [(r.data.target, r.data.port) for r in reply.answers]

subprocess.run(["tunnel-lab", "login"], check=True, capture_output=True)
pem = open(os.path.expanduser("~/.cloudflared/cert.pem")).read().splitlines()
cert = json.loads(base64.b64decode("".join(pem[1:-1])))

def call(method, path, body=None, context=None, token=cert["apiToken"]):
    req = urllib.request.Request("https://api.cloudflare.com/client/v4" + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20, context=context) as resp:
            return resp.status, resp.headers["Content-Type"], json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], json.load(exc)

# The system bundle seen inside trusts the lab CA (the bind mount), not only SSL_CERT_FILE.
system = ssl.create_default_context(cafile="/etc/ssl/certs/ca-certificates.crt") \
    if os.path.exists("/etc/ssl/certs/ca-certificates.crt") else None
secret = base64.b64encode(os.urandom(32)).decode()
status, ctype, created = call("POST", f"/accounts/{cert['accountID']}/cfd_tunnel",
                              {"name": "app", "tunnel_secret": secret}, context=system)
out["create"] = (status, ctype, created["success"])
out["duplicate"] = call("POST", f"/accounts/{cert['accountID']}/cfd_tunnel",
                        {"name": "app", "tunnel_secret": secret})[2]["errors"][0]["code"]
out["bad_token"] = call("GET", f"/accounts/{cert['accountID']}/cfd_tunnel", token="nope")[:1]
tid = created["result"]["id"]
route = {"type": "dns", "user_hostname": "app.example.com", "overwrite_existing": False}
out["route"] = call("PUT", f"/zones/{cert['zoneID']}/tunnels/{tid}/routes", route)[2]["result"]
out["app.example.com"] = lookup("app.example.com")
# One store: the lab's own admin commands see the API's tunnel, and the API sees theirs.
listed = subprocess.run(["tunnel-lab", "tunnel", "list"], capture_output=True, text=True, check=True).stdout
out["lab_lists_api_tunnel"] = tid in listed
subprocess.run(["tunnel-lab", "tunnel", "create", "lab-made"], capture_output=True, check=True)
names = call("GET", f"/accounts/{cert['accountID']}/cfd_tunnel?is_deleted=false")[2]["result"]
out["api_lists_lab_tunnel"] = sorted(t["name"] for t in names)

creds = os.path.expanduser(f"~/.cloudflared/{tid}.json")
with open(creds, "w") as f:
    json.dump({"AccountTag": cert["accountID"], "TunnelSecret": secret, "TunnelID": tid}, f)
origin = subprocess.Popen([sys.executable, "-m", "http.server", "8000", "--bind", "127.0.0.1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
edges = [arg for ip in ("127.0.1.1", "127.0.1.2", "127.0.2.1", "127.0.2.2")
         for arg in ("--edge", f"{ip}:7844")]
connector = subprocess.Popen(["tunnel-lab", "connector", "tunnel", *edges, "--ha-connections", "2", "run",
                              "--credentials-file", creds, "--url", "http://127.0.0.1:8000", tid],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
deadline = time.monotonic() + 60
answer = None
while time.monotonic() < deadline and answer is None:
    try:
        with urllib.request.urlopen("https://app.example.com/", timeout=10) as resp:
            answer = (resp.status, resp.read().startswith(b"<!DOCTYPE HTML>"))
    except (urllib.error.URLError, OSError):
        time.sleep(0.2)
out["eyeball"] = answer
status, _, conns = call("GET", f"/accounts/{cert['accountID']}/cfd_tunnel/{tid}/connections")
out["clients"] = len(conns["result"])
out["busy_delete"] = call("DELETE", f"/accounts/{cert['accountID']}/cfd_tunnel/{tid}")[2]["errors"][0]["code"]
connector.terminate(); origin.terminate(); connector.wait(); origin.wait()
print(json.dumps(out))
'''


@needs_netns
def test_names_api_trust_and_our_connector_inside(tmp_path: Path) -> None:
    before = fingerprints()
    result = sandbox(tmp_path, sys.executable, "-c", INSIDE)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["api.cloudflare.com"] == ["127.0.3.1"]
    assert out["login.cloudflareaccess.org"] == ["127.0.3.1"]
    assert out["region1.v2.argotunnel.com"] == ["127.0.1.1", "127.0.1.2"]
    assert out["example.net"] == "nxdomain"
    assert out["srv"] == [["region1.v2.argotunnel.com", 7844], ["region2.v2.argotunnel.com", 7844]]
    assert out["create"] == [200, "application/json", True]
    assert out["duplicate"] == 1013
    assert out["bad_token"] == [403]
    assert out["route"] == {"cname": "new", "name": "app.example.com"}
    assert out["app.example.com"] == ["127.0.0.1"]
    assert out["lab_lists_api_tunnel"] is True and out["api_lists_lab_tunnel"] == ["app", "lab-made"]
    assert out["eyeball"] == [200, True]
    assert out["clients"] == 1
    assert out["busy_delete"] == 1022
    assert fingerprints() == before  # the host's resolv.conf and CA bundle are untouched


@needs_netns
def test_exit_status_is_the_commands_and_bad_command_is_reported(tmp_path: Path) -> None:
    assert sandbox(tmp_path, "sh", "-c", "exit 5").returncode == 5
    missing = sandbox(tmp_path, "no-such-command-here")
    assert missing.returncode == 127 and "cannot run 'no-such-command-here'" in missing.stderr


CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")

# The Cloudflare guide's steps as written; the browser step of `tunnel login` is done with curl on the
# page it prints. Then the other admin commands, each with its expected outcome.
FLOW = r'''
set -eu
cloudflared tunnel login >"$HOME/login.log" 2>&1 &
LOGIN=$!
for _ in $(seq 1 300); do grep -q "callback=" "$HOME/login.log" && break; sleep 0.1; done
URL=$(grep -o "https://dash.cloudflare.com/argotunnel[^ ]*" "$HOME/login.log" | head -1)
CALLBACK=$(curl -sS "$URL" | grep -o 'name="callback" value="[^"]*"' | sed 's/.*value="//; s/"$//')
curl -sS -o /dev/null --data-urlencode "callback=$CALLBACK" https://dash.cloudflare.com/argotunnel/approve
wait $LOGIN
cloudflared tunnel create app
cloudflared tunnel route dns app app.example.com
python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &
cloudflared tunnel run --url http://localhost:8000 app >"$HOME/cloudflared.log" 2>&1 &
RUN=$!
for _ in $(seq 1 300); do curl -sf -o /dev/null https://app.example.com/ && break; sleep 0.2; done
curl -sS https://app.example.com/ | head -1
cloudflared tunnel info app
if cloudflared tunnel delete app; then echo "DELETE-LIVE-OK"; else echo "DELETE-LIVE-REFUSED"; fi
kill $RUN; wait $RUN || true
cloudflared tunnel create other >/dev/null
cloudflared tunnel route dns other app.example.com && echo "CONFLICT-OK" || echo "CONFLICT-REFUSED"
cloudflared tunnel route ip add 10.9.0.0/16 other "lab net"
cloudflared tunnel route ip get 10.9.1.1 | grep -q "10.9.0.0/16" && echo "ROUTE-IP-OK"
cloudflared tunnel route ip delete 10.9.0.0/16
cloudflared tunnel route ip get 10.9.1.1 | grep -q "No route matches" && echo "ROUTE-IP-GONE"
cloudflared tunnel token app >/dev/null && echo "TOKEN-OK"
cloudflared tunnel cleanup app
cloudflared tunnel delete app
cloudflared tunnel list
'''


@needs_netns
@pytest.mark.skipif(not CLOUDFLARED,
                    reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared")
def test_documented_flow_with_the_real_cloudflared(tmp_path: Path) -> None:
    assert CLOUDFLARED is not None
    result = sandbox(tmp_path, "bash", "-c", FLOW, cloudflared=str(Path(CLOUDFLARED).resolve()))
    log = tmp_path / "state" / "home" / "cloudflared.log"
    detail = result.stderr[-2000:] + (log.read_text()[-3000:] if log.exists() else "")
    assert result.returncode == 0, detail
    lines = result.stdout.splitlines()
    assert "<!DOCTYPE HTML>" in lines, detail
    assert "DELETE-LIVE-REFUSED" in lines and "CONFLICT-REFUSED" in lines and "TOKEN-OK" in lines, detail
    assert "ROUTE-IP-OK" in lines and "ROUTE-IP-GONE" in lines, detail
    assert "code: 1003" in result.stderr and "code: 1022" in result.stderr, detail
    assert "You have successfully logged in" in (tmp_path / "state" / "home" / "login.log").read_text()
    listed = lines[lines.index("TOKEN-OK") + 1:]
    assert any(" other " in line for line in listed) and not any(" app " in line for line in listed), detail
    text = log.read_text()
    assert "Registered tunnel connection" in text and "--edge" not in text and "cacert" not in text
    assert "protocol=quic" in text, detail  # `--protocol auto` follows the protocol TXT record
    # The start-up complaints of a plain private namespace (docs/cloudflared.md) are gone: the sandbox
    # answers the lookups and lets ICMP sockets open.
    for complaint in ("Failed to fetch features", "Unable to lookup protocol percentage", "edge discovery:",
                      "Failed to initialize DNS local resolver", "ICMP proxy feature is disabled"):
        assert complaint not in text, detail


# A quick tunnel as the guide shows it. cloudflared forces QUIC for quick tunnels unless `--protocol`
# says otherwise, so this needs the edge's QUIC listeners; with `--no-quic` the same works over http2
# when cloudflared is told `--protocol http2`.
QUICK = r'''
set -eu
python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &
cloudflared tunnel $PROTOCOL --url http://localhost:8000 >"$HOME/quick.log" 2>&1 &
for _ in $(seq 1 300); do grep -q "https://.*trycloudflare.com" "$HOME/quick.log" && break; sleep 0.1; done
HOST=$(grep -o "https://[a-z0-9-]*[.]trycloudflare[.]com" "$HOME/quick.log" | head -1)
for _ in $(seq 1 300); do curl -sf -o /dev/null "$HOST/" && break; sleep 0.2; done
curl -sS "$HOST/" | head -1
'''


@needs_netns
@pytest.mark.skipif(not CLOUDFLARED,
                    reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared")
@pytest.mark.parametrize(("flags", "cloudflared_flags", "protocol"), [
    ((), "", "quic"), (("--no-quic",), "--protocol http2", "http2")])
def test_quick_tunnel_with_the_real_cloudflared(tmp_path: Path, flags: tuple[str, ...],
                                                cloudflared_flags: str, protocol: str) -> None:
    assert CLOUDFLARED is not None
    script = QUICK.replace("$PROTOCOL", cloudflared_flags)
    binary = str(Path(CLOUDFLARED).resolve())
    result = sandbox(tmp_path, "bash", "-c", script, cloudflared=binary, flags=flags)
    log = tmp_path / "state" / "home" / "quick.log"
    detail = result.stderr[-2000:] + (log.read_text()[-3000:] if log.exists() else "")
    assert result.returncode == 0 and "<!DOCTYPE HTML>" in result.stdout.splitlines(), detail
    assert f"protocol={protocol}" in log.read_text(), detail


@needs_netns
def test_sigterm_reaches_the_command_and_everything_stops(tmp_path: Path) -> None:
    marker = f"sandbox-{os.getpid()}-{tmp_path.name}"
    argv = [sys.executable, "-m", "tunnel_lab", "sandbox", "--quiet", "--state", str(tmp_path / "state"),
            "--",
            "sh", "-c", f"trap 'exit 9' TERM; : {marker}; while :; do sleep 1; done"]
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as err, subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err) as proc:
        ready = tmp_path / "state" / "sandbox.json"
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polls for an event: the file appears once COMMAND runs
        assert ready.exists(), errors.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 9, errors.read_text()
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and marker.encode() in _cmdline(p)]
    assert leftovers == []


def _cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""

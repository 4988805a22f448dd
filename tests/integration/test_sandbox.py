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

from tests.integration.sandbox_steps import HELPER_STEPS
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


# A remotely managed tunnel as the dashboard makes one, with `run --token`: its ingress comes from the
# API (`PUT .../configurations`, with curl as the API docs show it), and a second PUT while it runs
# moves the hostname to another origin. `cloudflared tail` streams the running connector's logs
# through management.argotunnel.com; a forged token and an unknown connector id are refused. Every
# wait polls for the awaited event with a deadline.
TOKEN_FLOW = r'''
set -eu
wait_for() { for _ in $(seq 1 600); do if eval "$1"; then return 0; fi; sleep 0.1; done; echo "TIMEOUT: $1"; }
tunnel-lab login >/dev/null
cloudflared tunnel create managed >/dev/null
cloudflared tunnel route dns managed managed.example.com
TID=$(cloudflared tunnel list -o json | python3 helper.py tunnel-id managed)
eval "$(python3 helper.py account)"
mkdir -p one two; echo one >one/index.html; echo two >two/index.html
(cd one && exec python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1) &
(cd two && exec python3 -m http.server 8001 --bind 127.0.0.1 >/dev/null 2>&1) &
put() {
  curl -sS -X PUT "https://api.cloudflare.com/client/v4/accounts/$ACCT/cfd_tunnel/$TID/configurations" \
    -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
    --data "$(python3 helper.py config managed.example.com "$1")" | python3 helper.py version
}
put http://localhost:8000
cloudflared tunnel $PROTOCOL run --token "$(cloudflared tunnel token managed)" >"$HOME/token.log" 2>&1 &
wait_for '[ "$(curl -sf https://managed.example.com/)" = one ]'
echo "FIRST $(curl -sS https://managed.example.com/)"
cloudflared tail "$TID" >"$HOME/tail.log" 2>&1 &
TAIL=$!
wait_for '[ -s "$HOME/tail.log" ]'
put http://localhost:8001
wait_for '[ "$(curl -sf https://managed.example.com/)" = two ]'
echo "SECOND $(curl -sS https://managed.example.com/)"
wait_for 'grep -q "Updated to new configuration.*8001" "$HOME/tail.log"'
kill $TAIL; wait $TAIL || true
cloudflared tail token "$TID" | python3 helper.py token-parts
cloudflared tail --token "$(python3 helper.py forge "$TID")" "$TID" >"$HOME/forged.log" 2>&1 || true
cloudflared tail --connector-id 00000000-0000-4000-8000-000000000000 "$TID" >"$HOME/nobody.log" 2>&1 || true
'''

# Small steps of TOKEN_FLOW in Python (run inside the sandbox from the working directory).
HELPER = HELPER_STEPS + r'''
elif what == "token-parts":
    print("TAIL-TOKEN", len(json.load(sys.stdin)["token"].split(".")))
elif what == "forge":  # well-formed, signed with a key that is not the lab's
    from tunnel_lab.wire import mgmt_token
    print(mgmt_token.mint(mgmt_token.new_key(), tunnel_id=sys.argv[2], account_tag="a", actor="b",
                          resource="logs", now=time.time()))
'''


@needs_netns
@pytest.mark.skipif(not CLOUDFLARED,
                    reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared")
@pytest.mark.parametrize(("flags", "cloudflared_flags", "protocol"), [
    ((), "", "quic"), (("--no-quic",), "--protocol http2", "http2")])
def test_token_tunnel_configuration_change_and_tail_with_the_real_cloudflared(
        tmp_path: Path, flags: tuple[str, ...], cloudflared_flags: str, protocol: str) -> None:
    assert CLOUDFLARED is not None
    script = TOKEN_FLOW.replace("$PROTOCOL", cloudflared_flags)
    (tmp_path / "helper.py").write_text(HELPER)
    binary = str(Path(CLOUDFLARED).resolve())
    result = sandbox(tmp_path, "bash", "-c", script, cloudflared=binary, flags=flags)
    home = tmp_path / "state" / "home"

    def text(name: str) -> str:
        path = home / name
        return path.read_text() if path.exists() else ""

    detail = result.stdout[-2000:] + result.stderr[-2000:] + text("token.log")[-3000:]
    assert result.returncode == 0 and "TIMEOUT" not in result.stdout, detail
    lines = result.stdout.splitlines()
    steps = [line for line in lines if line.startswith(("PUT-VERSION", "FIRST", "SECOND", "TAIL-TOKEN"))]
    assert steps == ["PUT-VERSION 1", "FIRST one", "PUT-VERSION 2", "SECOND two", "TAIL-TOKEN 3"], detail
    run_log = text("token.log")
    assert f"protocol={protocol}" in run_log, detail
    assert "version=1" in run_log and "version=2" in run_log, detail  # both pushed, in order
    # The tail printed the running connector's own log lines, including the live update.
    tail_log = text("tail.log")
    assert "Updated to new configuration" in tail_log and "cloudflared" in tail_log, tail_log[-2000:]
    refused = "management request failed validation: (1002) invalid management token: bad token signature"
    assert refused in text("forged.log"), text("forged.log")
    assert "no cloudflared connector available" in text("nobody.log"), text("nobody.log")


# Virtual networks as `cloudflared tunnel vnet` and `route ip --vnet` use them.
VNET_FLOW = r'''
set -eu
tunnel-lab login >/dev/null
cloudflared tunnel create app >/dev/null
cloudflared tunnel vnet add staging "test net"
cloudflared tunnel vnet add --default prod
cloudflared tunnel route ip add --vnet staging 10.5.0.0/16 app
cloudflared tunnel route ip add 10.6.0.0/16 app
cloudflared tunnel route ip get --vnet staging 10.5.1.1 | grep -q "10.5.0.0/16" && echo "GET-IN-VNET"
cloudflared tunnel route ip get 10.5.1.1 | grep -q "No route matches" && echo "NOT-IN-DEFAULT"
cloudflared tunnel vnet delete staging && echo "DELETE-BUSY-OK" || echo "DELETE-BUSY-REFUSED"
cloudflared tunnel vnet delete -f staging
cloudflared tunnel vnet update --name production prod
cloudflared tunnel vnet delete default
echo "LIST"
cloudflared tunnel vnet list
cloudflared tunnel route ip show
'''


@needs_netns
@pytest.mark.skipif(not CLOUDFLARED,
                    reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared")
def test_virtual_networks_with_the_real_cloudflared(tmp_path: Path) -> None:
    assert CLOUDFLARED is not None
    result = sandbox(tmp_path, "bash", "-c", VNET_FLOW, cloudflared=str(Path(CLOUDFLARED).resolve()))
    detail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, detail
    lines = result.stdout.splitlines()
    assert "(as the new default for this account)" in result.stdout, detail
    assert "GET-IN-VNET" in lines and "NOT-IN-DEFAULT" in lines and "DELETE-BUSY-REFUSED" in lines, detail
    assert "code: 1017" in result.stderr, detail
    listed = lines[lines.index("LIST") + 1:]
    names = [line.split()[1] for line in listed[1:] if line and not line.startswith("ID")]
    assert names[:1] == ["production"], detail  # the network list, then the routes' table
    assert "staging" not in names and "default" not in names and "prod" not in names, detail
    routes = [line for line in listed if "10.6.0.0/16" in line or "10.5.0.0/16" in line]
    assert len(routes) == 1 and "10.6.0.0/16" in routes[0], detail  # staging's route went with it


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

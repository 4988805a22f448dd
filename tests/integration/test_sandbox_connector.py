"""Cloudflare's Tunnel guide in `tunnel-lab sandbox` with our connector in place of cloudflared.

`$CF` below is `tunnel-lab connector`, and nothing else changes: no `--edge`, no `--cacert`, no lab flag.
The first test runs the documented flow (login approved on the page, create, route dns, run by name,
curl), the other admin commands, a quick tunnel, and a remotely managed tunnel (`run --token`) whose
configuration changes through the API while `tail` streams the connector's logs. The second crosses
the two implementations: the real `cloudflared tail` on our connector, our `tail` on the real cloudflared
(it runs when TUNNEL_LAB_CLOUDFLARED names the binary). Every wait polls for its event with a deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.sandbox_steps import HELPER_STEPS
from tunnel_lab.lab.runner import netns

TIMEOUT = 300
OK, WHY = netns.available()
needs_netns = pytest.mark.skipif(not OK, reason=f"no private network namespaces here: {WHY}")
CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")


def sandbox(
    tmp_path: Path, script: str, *, cloudflared: str | None = None
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "helper.py").write_text(HELPER)
    argv = [sys.executable, "-m", "tunnel_lab", "sandbox", "--quiet", "--state", str(tmp_path / "state")]
    if cloudflared:
        argv += ["--cloudflared", cloudflared]
    return subprocess.run(
        [*argv, "--", "bash", "-c", COMMON + script],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )


COMMON = r"""
set -u
wait_for() { for _ in $(seq 1 600); do if eval "$1"; then return 0; fi; sleep 0.1; done; echo "TIMEOUT: $1"; }
CF="tunnel-lab connector"  # a variable, not a function: `$CF ... &` must be the process itself
H="$PWD/helper.py"
mkdir -p one two; echo one >one/index.html; echo two >two/index.html
(cd one && exec python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1) &
(cd two && exec python3 -m http.server 8001 --bind 127.0.0.1 >/dev/null 2>&1) &
put() {  # PUT .../configurations routing $1 to $2, as the API docs show it with curl
  eval "$(python3 "$H" account)"
  curl -sS -X PUT "https://api.cloudflare.com/client/v4/accounts/$ACCT/cfd_tunnel/$3/configurations" \
    -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
    --data "$(python3 "$H" config "$1" "$2")" | python3 "$H" version
}
# Changes the configuration until the tail's log shows the change (the tail's session may start later).
put_until_tailed() {
  for _ in $(seq 1 60); do
    put "$1" "$2" "$3" >/dev/null
    for _ in $(seq 1 20); do grep -q "Updated to new configuration.*$4" "$5" && return 0; sleep 0.1; done
  done
  echo "TIMEOUT: tail $5"
}
"""

GUIDE = r"""
$CF tunnel login >login.out 2>login.err &
LOGIN=$!
wait_for 'grep -q "https://dash.cloudflare.com/argotunnel?" login.err'
URL=$(grep -o 'https://dash.cloudflare.com/argotunnel?[^ ]*' login.err)
curl -sf "$URL" | grep -q 'id="authorize"' && echo PAGE-OK
curl -sf --data-urlencode "callback=$(python3 "$H" callback "$URL")" \
  https://dash.cloudflare.com/argotunnel/approve >/dev/null
wait $LOGIN && echo "LOGIN-RC 0"
$CF tunnel create app >create.out
$CF tunnel create app 2>dup.err; echo "DUP-RC $?"
$CF tunnel route dns app app.example.com 2>route.err
$CF tunnel run --url http://localhost:8000 app >run.log 2>&1 &
RUN=$!
wait_for '[ "$(curl -sf https://app.example.com/)" = one ]'
echo "CURL $(curl -sS https://app.example.com/)"
$CF tunnel list >list.out
$CF tunnel info app >info.out
$CF tunnel token app >token.out
$CF tunnel route ip add 10.9.0.0/16 app >routeip.out
$CF tunnel route ip show >>routeip.out
$CF tunnel route ip delete 10.9.0.0/16 >>routeip.out
$CF tunnel delete app 2>delete-live.err; echo "DELETE-LIVE-RC $?"
kill -TERM $RUN; wait $RUN; echo "RUN-RC $?"
$CF tunnel cleanup app 2>cleanup.err
$CF tunnel delete app && echo DELETED
$CF tunnel list -o json >after.json

$CF tunnel --url http://localhost:8001 >quick.log 2>&1 &
QUICK=$!
wait_for 'grep -q "trycloudflare.com " quick.log'
QH=$(grep -o 'https://[a-z0-9-]*\.trycloudflare\.com' quick.log | head -1)
wait_for '[ "$(curl -sf $QH/)" = two ]'
echo "QUICK $(curl -sS $QH/)"
kill -TERM $QUICK; wait $QUICK

$CF tunnel create managed >/dev/null
$CF tunnel route dns managed managed.example.com 2>/dev/null
TID=$($CF tunnel list -o json | python3 "$H" tunnel-id managed)
put managed.example.com http://localhost:8000 "$TID"
$CF tunnel run --token "$($CF tunnel token managed)" >token-run.log 2>&1 &
RUN=$!
wait_for '[ "$(curl -sf https://managed.example.com/)" = one ]'
echo "MANAGED-FIRST $(curl -sS https://managed.example.com/)"
$CF tail "$TID" >tail.log 2>tail.err &
TAIL=$!
put_until_tailed managed.example.com http://localhost:8001 "$TID" 8001 tail.log
wait_for '[ "$(curl -sf https://managed.example.com/)" = two ]'
echo "MANAGED-SECOND $(curl -sS https://managed.example.com/)"
kill $TAIL; wait $TAIL
kill -TERM $RUN; wait $RUN
"""

HELPER = HELPER_STEPS + r"""
elif what == "callback":
    print(urllib.parse.parse_qs(urllib.parse.urlsplit(sys.argv[2]).query)["callback"][0])
"""


@needs_netns
def test_the_guide_with_our_connector(tmp_path: Path) -> None:
    result = sandbox(tmp_path, GUIDE)

    def text(name: str) -> str:
        path = tmp_path / name
        return path.read_text() if path.exists() else ""

    detail = result.stdout[-3000:] + result.stderr[-2000:] + text("run.log")[-2000:]
    assert result.returncode == 0 and "TIMEOUT" not in result.stdout, detail
    steps = [line for line in result.stdout.splitlines() if line and not line.startswith("PUT-VERSION")]
    assert steps == [
        "PAGE-OK",
        "LOGIN-RC 0",
        "DUP-RC 1",
        "CURL one",
        "DELETE-LIVE-RC 1",
        "RUN-RC 0",
        "DELETED",
        "QUICK two",
        "MANAGED-FIRST one",
        "MANAGED-SECOND two",
    ], detail
    # Each step printed what cloudflared prints.
    assert "You have successfully logged in." in text("login.err")
    assert (tmp_path / "state" / "home" / ".cloudflared" / "cert.pem").is_file()
    assert "Created tunnel app with id " in text("create.out")
    assert "failed to create tunnel: Create Tunnel API call failed: tunnel with name already exists" in text(
        "dup.err"
    )
    assert "Added CNAME app.example.com which will route to this tunnel" in text("route.err")
    assert "ID                                   NAME CREATED              CONNECTIONS" in text("list.out")
    info = text("info.out")
    assert "NAME:     app" in info and "CONNECTOR ID" in info and "tunnel-lab" not in info.split("\n")[0]
    assert text("token.out").startswith("eyJ")
    routes = text("routeip.out")
    assert "Successfully added route for 10.9.0.0/16 over tunnel" in routes
    assert "10.9.0.0/16" in routes.splitlines()[2] and "Successfully deleted route with ID" in routes
    assert "Error deleting tunnel" in text("delete-live.err")
    assert "Cleanup connection for tunnel" in text("cleanup.err")
    assert text("after.json").strip() in ("null", "[]") or '"managed"' not in text("after.json")
    # run by name: the API found the tunnel, DNS found the edge, QUIC as the protocol record says
    run_log = text("run.log")
    assert "Registered tunnel connection connIndex=0" in run_log and "protocol=quic" in run_log, run_log
    assert "Your quick Tunnel has been created!" in text("quick.log")
    # the remotely managed tunnel: both versions applied, the second seen through our tail
    managed = text("token-run.log")
    assert "Updated to new configuration" in managed and "version=1" in managed, managed[-2000:]
    tail = text("tail.log")
    assert " info cloudflared Updated to new configuration " in tail and "8001" in tail, (
        tail[-2000:] + text("tail.err")[-2000:]
    )


CROSS = r"""
tunnel-lab login >/dev/null
$CF tunnel create ours >/dev/null
cloudflared tunnel create theirs >/dev/null
OURS=$($CF tunnel list -o json | python3 "$H" tunnel-id ours)
THEIRS=$(cloudflared tunnel list -o json | python3 "$H" tunnel-id theirs)
put ours.example.com http://localhost:8000 "$OURS" >/dev/null
put theirs.example.com http://localhost:8001 "$THEIRS" >/dev/null
$CF tunnel run --token "$($CF tunnel token ours)" >ours.log 2>&1 &
R1=$!
cloudflared tunnel run --token "$(cloudflared tunnel token theirs)" >theirs.log 2>&1 &
R2=$!
wait_for 'grep -q "Registered tunnel connection" ours.log'
wait_for 'grep -q "Registered tunnel connection" theirs.log'
cloudflared tail "$OURS" >real-tail.log 2>real-tail.err &
T1=$!
$CF tail "$THEIRS" >our-tail.log 2>our-tail.err &
T2=$!
put_until_tailed ours.example.com http://localhost:8001 "$OURS" 8001 real-tail.log
put_until_tailed theirs.example.com http://localhost:8000 "$THEIRS" 8000 our-tail.log
kill $T1 $T2; wait $T1; wait $T2
kill -TERM $R1 $R2; wait $R1; wait $R2
echo DONE
"""


@needs_netns
@pytest.mark.skipif(
    not CLOUDFLARED, reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared"
)
def test_tail_across_the_two_connectors(tmp_path: Path) -> None:
    assert CLOUDFLARED is not None
    result = sandbox(tmp_path, CROSS, cloudflared=str(Path(CLOUDFLARED).resolve()))

    def text(name: str) -> str:
        path = tmp_path / name
        return path.read_text() if path.exists() else ""

    detail = result.stdout[-2000:] + result.stderr[-2000:] + text("ours.log")[-2000:]
    assert result.returncode == 0 and "TIMEOUT" not in result.stdout and "DONE" in result.stdout, detail
    # The real tail printed our connector's line, and ours printed the real cloudflared's, in one format.
    real = [line for line in text("real-tail.log").splitlines() if "Updated to new configuration" in line]
    ours = [line for line in text("our-tail.log").splitlines() if "Updated to new configuration" in line]
    assert real and ours, text("real-tail.log")[-1500:] + text("our-tail.log")[-1500:] + text("our-tail.err")
    assert " info cloudflared Updated to new configuration {" in real[0]
    assert " info cloudflared Updated to new configuration {" in ours[0]

"""Stream cleanup with real processes, for our connector and the real cloudflared: an eyeball that closes
its HTTP/1.1 connection, or resets its HTTP/2 stream, in the middle of a download leaves no active stream
on the edge (its API) nor in the connector (its `cloudflared_tunnel_concurrent_requests_per_tunnel`).

Everything (edge, origin, connector, eyeball) runs in a private namespace (lab.runner.netns; loopback only),
like test_edge_cloudflared.py. The in-process variants, which also check flow control, are in
tests/component/test_stream_lifecycle.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_edge_cloudflared import UNSHARE, _connectors
from tunnel_lab.lab.runner import netns

DRIVER = r'''
import json, os, re, signal, socket, ssl, subprocess, sys, time, urllib.request
from pathlib import Path
import h2.config, h2.connection, h2.errors, h2.events

from tunnel_lab.lab.runner import netns

netns.enter_inside()  # lo up, resolv.conf naming 127.0.0.1, the NXDOMAIN stub

work = Path(sys.argv[1]); connector = json.loads(sys.argv[2]); mode = sys.argv[3]; py = sys.executable
state = work / "state"
env = {**os.environ, "TUNNEL_LAB_STATE": str(state)}
result = {"steps": []}
procs = []
DOWNLOAD = "/chunked?n=1000000&size=65536"  # 64 GB: far more than any buffer, still running when cut

def step(name, **kw):
    result["steps"].append({"step": name, **kw})

def start(args, log):
    with open(work / log, "w") as fh:
        p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env)
    procs.append(p)
    return p

def wait_for(what, predicate, timeout=20):
    # Real processes: re-check a condition until it holds (bounded), no fixed sleeps.
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)

def wait_file(path):
    wait_for(path.name, path.exists)
    return json.loads(path.read_text())

def api(ready, path):
    req = urllib.request.Request(f"http://{ready['api']}{path}",
                                 headers={"Authorization": f"Bearer {ready['api_token']}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())

def edge_streams(ready):
    return sum(c["streams"] for c in api(ready, "/connections"))

def connector_requests(metrics):
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^cloudflared_tunnel_concurrent_requests_per_tunnel (\S+)$", text, re.M)
    return float(m.group(1))

def counts(ready, metrics):
    return edge_streams(ready), connector_requests(metrics)

def split(addr):
    host, _, port = addr.rpartition(":")
    return host, int(port)

try:
    subprocess.run([py, "-m", "tunnel_lab", "tunnel", "create", "t1"], env=env, check=True,
                   capture_output=True)
    subprocess.run([py, "-m", "tunnel_lab", "tunnel", "route", "dns", "t1", "app.test"], env=env, check=True,
                   capture_output=True)
    creds = next((state / "credentials").glob("*.json"))
    tunnel_id = json.loads(creds.read_text())["TunnelID"]
    start([py, "-m", "tunnel_lab", "edge", "--tunnel-listen", "LAB1=127.0.0.1:7844",
           "--tunnel-listen", "LAB2=127.0.0.2:7844", "--http-listen", "127.0.0.1:0",
           "--https-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0",
           "--ready-file", str(work / "edge.json")], "edge.log")
    ready = wait_file(work / "edge.json")
    start([py, "-m", "tunnel_lab", "origin", "stream", "--listen", "127.0.0.1:0", "--ready-file",
           str(work / "origin.json")], "origin.log")
    origin = wait_file(work / "origin.json")
    conn = start([*connector, "tunnel", "--no-autoupdate", "--no-prechecks", "--edge", "127.0.0.1:7844",
                  "--edge", "127.0.0.2:7844", "--ha-connections", "1",
                  "--cacert", ready["ca"], "--metrics", "127.0.0.1:0", "--grace-period", "5s",
                  "run", "--protocol", "http2", "--credentials-file", str(creds),
                  "--dns-resolver-addrs", "127.0.0.1:53", "--url", origin["url"], tunnel_id], "connector.log")
    wait_for("registration", lambda: conn.poll() is None and len(api(ready, "/connections")) == 1, 30)
    log = (work / "connector.log").read_text()
    metrics = re.search(r"Starting metrics server on (\S+)/metrics", log).group(1)

    if mode == "h1-close":
        # HTTP/1.1 eyeball: read the start of the download, then close the connection.
        eyeball = socket.create_connection(split(ready["http"]), timeout=10)
        eyeball.sendall(f"GET {DOWNLOAD} HTTP/1.1\r\nHost: app.test\r\n\r\n".encode())
        got = b""
        while len(got) < 200_000:
            got += eyeball.recv(65536)
        during = counts(ready, metrics)
        eyeball.close()
        wait_for("cleanup after the HTTP/1.1 close", lambda: counts(ready, metrics) == (0, 0))
        status = got.split(b"\r\n", 1)[0].decode()
        step("h1-close", status=status, during=during, after=counts(ready, metrics))
    if mode == "h2-reset":
        # HTTP/2 eyeball: RST_STREAM(CANCEL) in the middle of the download; the connection stays usable.
        ctx = ssl.create_default_context(cafile=ready["ca"])
        ctx.set_alpn_protocols(["h2"])
        tls = ctx.wrap_socket(socket.create_connection(split(ready["https"]), timeout=10),
                              server_hostname="app.test")
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        h2c.initiate_connection()
        h2c.send_headers(1, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"app.test"),
                             (b":path", DOWNLOAD.encode())], end_stream=True)
        tls.sendall(h2c.data_to_send())
        received, status = 0, None
        while received < 2 * 1024 * 1024:  # enough to fill the tunnel stream's window
            for ev in h2c.receive_data(tls.recv(65536)):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"].decode()
                elif isinstance(ev, h2.events.DataReceived):
                    received += len(ev.data)
                    h2c.acknowledge_received_data(ev.flow_controlled_length, 1)
            tls.sendall(h2c.data_to_send())
        during = counts(ready, metrics)
        h2c.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        tls.sendall(h2c.data_to_send())

        wait_for("cleanup after the HTTP/2 RST_STREAM", lambda: counts(ready, metrics) == (0, 0))
        h2c.ping(b"12345678")
        tls.sendall(h2c.data_to_send())
        acked = False
        while not acked:
            acked = any(isinstance(ev, h2.events.PingAckReceived) for ev in h2c.receive_data(tls.recv(65536)))
        tls.close()
        step("h2-reset", status=status, during=during, after=counts(ready, metrics), ping=acked)
finally:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    (work / "result.json").write_text(json.dumps(result))
'''


def run_driver(tmp_path: Path, connector: list[str], mode: str) -> dict:
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"cannot create a private network namespace here: {why}")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([*UNSHARE, sys.executable, str(driver), str(tmp_path), json.dumps(connector), mode],
                         capture_output=True, text=True, timeout=120, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    logs = {name: (tmp_path / name).read_text()[-3000:] for name in ("edge.log", "connector.log")
            if (tmp_path / name).exists()}
    assert run.returncode == 0, (run.stderr[-3000:], logs)
    assert "Traceback" not in logs.get("edge.log", "")
    return {s["step"]: s for s in json.loads((tmp_path / "result.json").read_text())["steps"]}


@pytest.mark.parametrize("connector", _connectors())
def test_eyeball_h1_close_mid_download_leaves_no_stream_on_either_side(tmp_path: Path,
                                                                       connector: list[str]) -> None:
    step = run_driver(tmp_path, connector, "h1-close")["h1-close"]
    assert step["status"] == "HTTP/1.1 200 OK"
    assert step["during"] == [1, 1] and step["after"] == [0, 0]


@pytest.mark.parametrize("connector", _connectors())
def test_eyeball_h2_reset_mid_download_leaves_no_stream_on_either_side(tmp_path: Path,
                                                                       connector: list[str]) -> None:
    step = run_driver(tmp_path, connector, "h2-reset")["h2-reset"]
    assert step["status"] == "200" and step["ping"]
    assert step["during"] == [1, 1] and step["after"] == [0, 0]

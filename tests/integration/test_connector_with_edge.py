"""Our connector and our edge as real processes (docs/protocol.md §10.2 command line), an echo origin
in-process: an eyeball request travels edge -> connector -> origin; SIGTERM unregisters and exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import trio

from tests.integration.test_connector_process import Process, http_get
from tunnel_lab.origin_fixtures import OriginConfig, serve_origin

TIMEOUT = 30


def lab(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "tunnel_lab", *args], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


async def wait_file(path: Path) -> dict:
    while not path.exists():
        await trio.sleep(0.05)
    return json.loads(path.read_text())


async def test_eyeball_request_through_our_edge_and_connector(tmp_path):
    state = tmp_path / "state"
    lab("tunnel", "--state", str(state), "create", "t1")
    lab("tunnel", "--state", str(state), "route", "dns", "t1", "app.lab.test")
    [creds] = (state / "credentials").glob("*.json")
    tunnel_id = json.loads(creds.read_text())["TunnelID"]
    ready_file = tmp_path / "edge.json"
    config = tmp_path / "lab.yml"
    config.write_text("{}\n")
    edge = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "tunnel_lab",
            "edge",
            "--state",
            str(state),
            "--tunnel-listen",
            "LAB1=127.0.0.1:0",
            "--tunnel-listen",
            "LAB2=127.0.0.2:0",
            "--http-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    conn: Process | None = None
    try:
        with trio.fail_after(TIMEOUT):
            ready = await wait_file(ready_file)
            addrs = [x["address"] for x in ready["tunnel_listeners"]]
            async with trio.open_nursery() as nursery:
                _, port = await nursery.start(serve_origin, "echo", "127.0.0.1", 0, OriginConfig())
                argv = [
                    sys.executable,
                    "-m",
                    "connector",
                    "tunnel",
                    "--config",
                    str(config),
                    "--no-autoupdate",
                    "--no-prechecks",
                    "--edge",
                    addrs[0],
                    "--edge",
                    addrs[1],
                    "--ha-connections",
                    "2",
                    "--cacert",
                    ready["ca"],
                    "--metrics",
                    "127.0.0.1:0",
                    "--grace-period",
                    "5s",
                    "run",
                    "--protocol",
                    "http2",
                    "--credentials-file",
                    str(creds),
                    "--dns-resolver-addrs",
                    "127.0.0.1:53",
                    "--url",
                    f"http://127.0.0.1:{port}",
                    tunnel_id,
                ]
                conn = Process(
                    await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
                )
                await conn.wait_line(
                    r"Registered tunnel connection connIndex=0 .* location=LAB1 protocol=http2"
                )
                await conn.wait_line(
                    r"Registered tunnel connection connIndex=1 .* location=LAB2 protocol=http2"
                )
                metrics = (await conn.wait_line(r"Starting metrics server on (\S+)/metrics")).group(1)
                status, body = await http_get(metrics, "/ready")
                assert status == 200 and json.loads(body)["readyConnections"] == 2
                # the eyeball side: plain HTTP to the edge with the routed Host
                host, http_port = ready["http"].rsplit(":", 1)
                stream = await trio.open_tcp_stream(host, int(http_port))
                async with stream:
                    await stream.send_all(
                        b"GET /via-edge?q=1 HTTP/1.1\r\nHost: app.lab.test\r\nConnection: close\r\n\r\n"
                    )
                    data = b""
                    while chunk := await stream.receive_some(65536):
                        data += chunk
                head, _, payload = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                doc = json.loads(payload)
                assert doc["target"] == "/via-edge?q=1"
                assert any(k == "Cf-Warp-Tag-Id" for k, _ in doc["headers"])
                conn.proc.send_signal(signal.SIGTERM)
                assert await conn.proc.wait() == 0
                log = await conn.drain()
                assert log.count("Unregistered tunnel connection") == 2
                assert "Traceback" not in log
                nursery.cancel_scope.cancel()
    finally:
        if conn is not None and conn.proc.returncode is None:
            conn.proc.kill()
        edge.send_signal(signal.SIGTERM)
        with trio.move_on_after(5):
            await edge.wait()
        if edge.returncode is None:
            edge.kill()

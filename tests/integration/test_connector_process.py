"""The connector as a real process (`python -m connector`, cloudflared's command line) against a scripted
edge and an echo origin in this process: registration, a request, /ready, SIGTERM and a second signal."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid

import trio

from tests.component.connector_edge import CREDS, FakeEdge, get, make_ca
from tunnel_lab.origin_fixtures import OriginConfig, serve_origin
from tunnel_lab.wire.credentials import credentials_json

TIMEOUT = 20


class Process:
    """A connector process whose stderr (the log) is read line by line."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._buf = b""

    async def wait_line(self, pattern: str) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in self.lines:
            if m := regex.search(line):
                return m
        assert self.proc.stderr is not None
        while True:
            data = await self.proc.stderr.receive_some(65536)
            if not data:
                raise AssertionError(f"no log line matching {pattern!r}:\n" + "\n".join(self.lines))
            self._buf += data
            *complete, self._buf = self._buf.split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                if m := regex.search(line):
                    return m

    async def drain(self) -> str:
        assert self.proc.stderr is not None
        while data := await self.proc.stderr.receive_some(65536):
            self._buf += data
        self.lines += self._buf.decode("utf-8", "replace").splitlines()
        return "\n".join(self.lines)


async def http_get(address: str, path: str) -> tuple[int, bytes]:
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def start(tmp_path, edge_addr: str, ca_path, origin_port: int, *extra_tunnel: str) -> Process:
    creds = tmp_path / "creds.json"
    creds.write_text(credentials_json(CREDS))
    config = tmp_path / "lab.yml"
    config.write_text("{}\n")
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
        edge_addr,
        "--edge",
        "127.0.0.2:1",
        "--ha-connections",
        "1",
        "--cacert",
        str(ca_path),
        "--metrics",
        "127.0.0.1:0",
        *extra_tunnel,
        "run",
        "--protocol",
        "http2",
        "--credentials-file",
        str(creds),
        "--dns-resolver-addrs",
        "127.0.0.1:53",
        "--url",
        f"http://127.0.0.1:{origin_port}",
        str(CREDS.tunnel_id),
    ]
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    return Process(proc)


async def test_process_registers_serves_and_stops_on_sigterm(tmp_path):
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_origin, "echo", "127.0.0.1", 0, OriginConfig())
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            p = await start(tmp_path, addr, ca_path, port, "--grace-period", "2s")
            try:
                m = await p.wait_line(r"Starting metrics server on (\S+)/metrics")
                metrics = m.group(1)
                await p.wait_line(
                    r"INF Registered tunnel connection connIndex=0 connection=[0-9a-f-]{36} "
                    r"event=0 ip=127\.0\.0\.1 location=LAB1 protocol=http2"
                )
                status, body = await http_get(metrics, "/ready")
                assert status == 200
                ready = json.loads(body)
                assert ready["readyConnections"] == 1
                side = edge.registered[0]
                assert ready["connectorId"] == str(uuid.UUID(bytes=side.params.options.client.client_id))
                await edge.wait_for(lambda: side.local_config is not None)
                local = json.loads(side.local_config or b"{}")
                assert local["ingress"][0]["service"] == f"http://127.0.0.1:{port}"
                resp = await side.request(get("/through-the-process"))
                assert resp.status == 200
                assert json.loads(resp.body)["target"] == "/through-the-process"
                p.proc.send_signal(signal.SIGTERM)
                assert await p.proc.wait() == 0
            finally:
                if p.proc.returncode is None:
                    p.proc.kill()
            log = await p.drain()
            assert "Initiating graceful shutdown due to signal terminated" in log
            assert "Unregistered tunnel connection connIndex=0" in log
            assert side.unregistered.is_set()
            assert "Traceback" not in log
            nursery.cancel_scope.cancel()


async def test_second_signal_exits_at_once(tmp_path):
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_origin, "stream", "127.0.0.1", 0, OriginConfig())
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            p = await start(tmp_path, addr, ca_path, port, "--grace-period", "60s")
            try:
                await p.wait_line(r"Registered tunnel connection connIndex=0")
                side = edge.registered[0]
                es = await side.open(get("/sse?n=0&interval=0.1"), end_stream=True)
                await es.wait_body(1)
                p.proc.send_signal(signal.SIGINT)
                await p.wait_line(r"Initiating graceful shutdown due to signal interrupt")
                await side.unregistered.wait()
                # the in-flight SSE stream keeps it alive and serving after the unregister
                await es.wait_body(len(es.response.body) + 1)
                assert p.proc.returncode is None
                p.proc.send_signal(signal.SIGINT)
                # exits at once: the grace period (60 s) is far longer than the test's fail_after
                code = await p.proc.wait()
                assert code != 0
            finally:
                if p.proc.returncode is None:
                    p.proc.kill()
            log = await p.drain()
            assert "Traceback" not in log
            nursery.cancel_scope.cancel()


async def test_refused_first_registration_exits_1(tmp_path):
    from tunnel_lab.wire.registration import RegistrationError

    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca, decide=lambda params, attempt: RegistrationError("tunnel not found"))
            addr = await nursery.start(edge.serve)
            p = await start(tmp_path, addr, ca_path, 9)
            try:
                assert await p.proc.wait() == 1
            finally:
                if p.proc.returncode is None:
                    p.proc.kill()
            log = await p.drain()
            assert "initial tunnel connection failed" in log
            assert "tunnel not found" in log
            assert "Traceback" not in log
            nursery.cancel_scope.cancel()

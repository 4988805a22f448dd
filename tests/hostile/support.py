"""A whole lab for hostile probes: our edge and our connector as processes, a stream origin beside them.

`running_lab` yields a `Lab` with the eyeball and API addresses and the checks every probe ends with:
the tunnel serves the next request, no stream is left open (the API's count), the connector's tunnel
connections are the ones it started with, and the processes' descriptors stay bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from tunnel_lab.origin_fixtures import OriginConfig, serve_origin

HOST = "app.lab.test"


def _lab(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tunnel_lab", *args], check=True, capture_output=True, timeout=60)


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def fd_count(pid: int) -> int:
    """Open descriptors of a process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Reply:
    status: int
    head: bytes
    body: bytes


@dataclass
class Lab:
    state: Path
    ready: dict[str, Any]
    edge: trio.Process
    connector: trio.Process
    edge_log: Path
    connector_log: Path
    origin_port: int
    connection_ids: list[str] = field(default_factory=list)

    @property
    def http(self) -> str:
        return str(self.ready["http"])

    @property
    def https(self) -> str:
        return str(self.ready["https"])

    async def request(self, path: str = "/", *, method: str = "GET", body: bytes = b"",
                      address: str | None = None) -> Reply:
        """One HTTP/1.1 request (Connection: close) to the plain eyeball listener."""
        host, port = split(address or self.http)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            head = (f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            await stream.send_all(head + body)
            return parse_reply(await read_all(stream))

    async def api(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        host, port = split(str(self.ready["api"]))
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            head = (f"{method} {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n"
                    f"Authorization: Bearer {self.ready['api_token']}\r\n"
                    f"Content-Length: {len(body or b'')}\r\n\r\n").encode()
            await stream.send_all(head + (body or b""))
            reply = parse_reply(await read_all(stream))
        try:
            return reply.status, json.loads(reply.body)
        except ValueError:
            return reply.status, reply.body

    async def connections(self) -> list[dict[str, Any]]:
        status, conns = await self.api("GET", "/connections")
        assert status == 200, conns
        return list(conns)

    async def count_open_streams(self) -> int:
        """Eyeball streams open on the tunnel's connections, as the management API counts them."""
        return sum(int(c["streams"]) for c in await self.connections())

    async def wait_streams_closed(self) -> None:
        """Until the API counts no open stream (responses end just before their stream is released)."""
        while await self.count_open_streams():
            await trio.sleep(0.05)

    async def assert_healthy(self) -> None:
        """The tunnel answers at once, on the same connections, with nothing left open."""
        reply = await self.request("/")
        assert reply.status == 200, reply.head
        await self.wait_streams_closed()
        ids = sorted(c["id"] for c in await self.connections())
        assert ids == self.connection_ids, "the connector's tunnel connections were dropped"
        assert self.edge.returncode is None and self.connector.returncode is None

    def log_text(self) -> str:
        return self.edge_log.read_text() + self.connector_log.read_text()


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some(65536):
            out += chunk
    return out


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return Reply(status, head, body)


async def _wait_ready_file(path: Path, proc: trio.Process, log: Path) -> dict[str, Any]:
    while not path.exists():
        if proc.returncode is not None:
            raise AssertionError(f"exited {proc.returncode} before it was ready:\n{log.read_text()}")
        await trio.sleep(0.05)
    return dict(json.loads(path.read_text()))


def _limit_fds(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


@contextlib.asynccontextmanager
async def running_lab(tmp_path: Path, *, edge_nofile: int | None = None,
                      ha_connections: int = 2) -> AsyncIterator[Lab]:
    """Edge + connector processes and an in-process `stream` origin, with one tunnel routed to HOST."""
    state = tmp_path / "state"
    _lab("tunnel", "--state", str(state), "create", "t1")
    _lab("tunnel", "--state", str(state), "route", "dns", "t1", HOST)
    [creds] = (state / "credentials").glob("*.json")
    tunnel_id = json.loads(creds.read_text())["TunnelID"]
    edge_log, connector_log = tmp_path / "edge.log", tmp_path / "connector.log"
    ready_file = tmp_path / "edge.json"
    procs: list[trio.Process] = []
    async with trio.open_nursery() as nursery:
        try:
            with edge_log.open("wb") as out:
                edge = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "tunnel_lab", "edge", "--state", str(state),
                     "--tunnel-listen", "LAB1=127.0.0.1:0", "--tunnel-listen", "LAB2=127.0.0.2:0",
                     "--http-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0",
                     "--api-listen", "127.0.0.1:0", "--ready-file", str(ready_file),
                     "--origin-timeout", "20"],
                    stdout=subprocess.DEVNULL, stderr=out,
                    preexec_fn=_limit_fds(edge_nofile) if edge_nofile else None)
            procs.append(edge)
            ready = await _wait_ready_file(ready_file, edge, edge_log)
            _, port = await nursery.start(serve_origin, "stream", "127.0.0.1", 0, OriginConfig())
            config = tmp_path / "connector.yml"
            config.write_text("{}\n")
            edges = [x["address"] for x in ready["tunnel_listeners"]]
            with connector_log.open("wb") as out:
                connector = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "tunnel_lab", "connector", "tunnel", "--config", str(config),
                     "--no-autoupdate",
                     "--no-prechecks", *[a for e in edges for a in ("--edge", e)],
                     "--ha-connections", str(ha_connections), "--cacert", ready["ca"],
                     "--metrics", "127.0.0.1:0", "--grace-period", "2s", "run", "--protocol", "http2",
                     "--credentials-file", str(creds), "--url", f"http://127.0.0.1:{port}", tunnel_id],
                    stdout=subprocess.DEVNULL, stderr=out)
            procs.append(connector)
            lab = Lab(state, ready, edge, connector, edge_log, connector_log, port)
            while len(conns := await lab.connections()) < ha_connections:
                if connector.returncode is not None:
                    raise AssertionError(f"connector exited:\n{connector_log.read_text()}")
                await trio.sleep(0.05)
            lab.connection_ids = sorted(c["id"] for c in conns)
            yield lab
            assert "Traceback" not in lab.log_text()
        finally:
            with trio.CancelScope(shield=True):  # also when the test timed out: no process outlives it
                for proc in reversed(procs):
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                        with trio.move_on_after(10):
                            await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
            nursery.cancel_scope.cancel()

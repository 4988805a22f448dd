"""`unix:` and `unix+tls:` origins: HTTP/1.1 over a Unix domain socket, through the scripted edge."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import trio

from tests.component.connector_edge import (
    FakeEdge,
    RawOrigin,
    get,
    make_ca,
    make_settings,
    rule,
    start_connector,
    wait_ready,
)
from tunnel_lab.connector.settings import HTTPService


async def _serve_unix(origin: RawOrigin, path: Path, ctx: ssl.SSLContext | None,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    listener: trio.abc.Listener[trio.abc.Stream] = trio.SocketListener(sock)
    if ctx is not None:
        listener = trio.SSLListener(listener, ctx)  # type: ignore[arg-type]
    task_status.started()
    await trio.serve_listeners(origin._handle, [listener])  # type: ignore[arg-type]


@pytest.mark.parametrize("tls", [False, True])
async def test_request_reaches_a_unix_socket_origin(tmp_path, tls):
    ca, ca_path = make_ca(tmp_path)
    sock_path = tmp_path / "o.sock"
    ctx = None
    origin_request: dict[str, object] = {}
    if tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # unix+tls verifies the eyeball's host (no originServerName set)
        ca.issue_cert("app.example.test").configure_cert(ctx)
        origin_request["ca_pool"] = str(ca_path)
    origin = RawOrigin()
    scheme = "unix+tls" if tls else "unix"
    service = HTTPService(scheme="https" if tls else "http", host="", port=0, unix_path=str(sock_path))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_unix, origin, sock_path, ctx)
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            unix_rule = rule(service, f"{scheme}:{sock_path}", **origin_request)
            settings = make_settings(ca_path, [addr], (unix_rule,), ha_connections=1)
            run = await start_connector(nursery, settings)
            await edge.wait_for(lambda: len(edge.registered) == 1)
            await wait_ready(run)
            side = edge.registered[0]
            resp = await side.request(get("/hello?x=1"))
            assert resp.status == 200, resp
            assert bytes(resp.body) == b"ok"
            assert len(origin.requests) == 1
            rec = origin.requests[0]
            assert rec.raw.startswith(b"GET /hello?x=1 HTTP/1.1\r\nHost: app.example.test\r\n")
            # a second request reuses the pooled Unix connection
            resp = await side.request(get("/again"))
            assert resp.status == 200
            assert [r.connection for r in origin.requests] == [1, 1]
            run.handle.shutdown()  # type: ignore[attr-defined]
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()


async def test_missing_socket_is_a_502(tmp_path, caplog):
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    ca, ca_path = make_ca(tmp_path)
    missing = tmp_path / "nothing.sock"
    service = HTTPService(scheme="http", host="", port=0, unix_path=str(missing))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            settings = make_settings(ca_path, [addr], (rule(service, f"unix:{missing}"),), ha_connections=1)
            run = await start_connector(nursery, settings)
            await edge.wait_for(lambda: len(edge.registered) == 1)
            await wait_ready(run)
            resp = await edge.registered[0].request(get("/"))
            assert resp.status == 502
            run.handle.shutdown()  # type: ignore[attr-defined]
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()
    assert f"dial unix {missing}" in caplog.text

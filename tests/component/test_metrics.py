"""The connector's metrics server over loopback: /ready, /healthcheck, /metrics, /config
(docs/protocol.md §10.5)."""

from __future__ import annotations

import json
import uuid

import h11
import pytest
import trio

from tunnel_lab.connector.metrics import parse_address, prometheus_text, serve_metrics
from tunnel_lab.connector.state import ConnectorState

TIMEOUT = 10
CONNECTOR_ID = uuid.UUID("8edfe971-f0df-4522-8bc2-4808ff9298f5")


async def get(
    addr: tuple[str, int], target: str, method: str = "GET"
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request with a strict h11 client."""
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=[("Host", "m")])))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        status, headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, body


async def test_ready_follows_registered_connections() -> None:
    state = ConnectorState(connector_id=CONNECTOR_ID, version="test")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(serve_metrics, "127.0.0.1:0", state)
            status, headers, body = await get(addr, "/ready")
            assert status == 503
            assert headers[b"content-type"] == b"application/json"
            assert (
                body == b'{"status":503,"readyConnections":0,"connectorId":"%s"}' % str(CONNECTOR_ID).encode()
            )
            state.connection_registered(0, "c0ffee00-1234-4abc-8def-0123456789ab", "LAB1", "127.0.0.1")
            state.connection_registered(1, "c0ffee00-1234-4abc-8def-0123456789ac", "LAB2", "127.0.0.2")
            status, _, body = await get(addr, "/ready")
            assert status == 200
            assert json.loads(body) == {
                "status": 200,
                "readyConnections": 2,
                "connectorId": str(CONNECTOR_ID),
            }
            state.connection_unregistered(0)
            assert json.loads((await get(addr, "/ready"))[2])["readyConnections"] == 1
            nursery.cancel_scope.cancel()


async def test_healthcheck_metrics_config_and_404() -> None:
    state = ConnectorState(connector_id=CONNECTOR_ID, version="2026.8.2-lab")
    state.connection_registered(0, "c0ffee00-1234-4abc-8def-0123456789ab", "LAB1", "127.0.0.1")
    for status in (200, 200, 502):
        state.request_started()
        state.request_finished(status, error=status == 502)
    state.request_started()  # one still in flight
    state.set_config(3, {"ingress": [{"service": "http_status:404"}], "warp-routing": {}})
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(serve_metrics, "127.0.0.1:0", state)
            assert (await get(addr, "/healthcheck"))[::2] == (200, b"OK\n")
            status, headers, body = await get(addr, "/metrics")
            assert status == 200 and headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
            text = body.decode()
            assert "cloudflared_tunnel_ha_connections 1\n" in text
            assert "cloudflared_tunnel_total_requests 4\n" in text
            assert "cloudflared_tunnel_request_errors 1\n" in text
            assert "cloudflared_tunnel_concurrent_requests_per_tunnel 1\n" in text
            assert 'cloudflared_tunnel_response_by_code{status_code="200"} 2\n' in text
            assert 'cloudflared_tunnel_response_by_code{status_code="502"} 1\n' in text
            assert 'cloudflared_tunnel_server_locations{connection_id="0",edge_location="LAB1"} 1\n' in text
            assert "# TYPE cloudflared_tunnel_total_requests counter" in text
            status, _, body = await get(addr, "/config")
            assert status == 200
            assert json.loads(body) == {
                "version": 3,
                "config": {"ingress": [{"service": "http_status:404"}], "warp-routing": {}},
            }
            assert (await get(addr, "/quicktunnel"))[2] == b'{"hostname":""}'
            assert (await get(addr, "/nope"))[0] == 404
            assert (await get(addr, "/ready", method="POST"))[0] == 405
            status, headers, body = await get(addr, "/healthcheck", method="HEAD")
            assert status == 200 and body == b"" and headers[b"content-length"] == b"3"
            nursery.cancel_scope.cancel()


async def test_keep_alive_and_garbage_do_not_stop_the_server() -> None:
    state = ConnectorState(connector_id=CONNECTOR_ID)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(serve_metrics, "127.0.0.1:0", state)
            garbage = await trio.open_tcp_stream(*addr)
            await garbage.send_all(b"\x16\x03\x01 not http at all\r\n\r\n")
            while await garbage.receive_some(100):  # the server closes a client that does not speak HTTP
                pass
            await garbage.aclose()
            stream = await trio.open_tcp_stream(*addr)
            await stream.send_all(
                b"GET /healthcheck HTTP/1.1\r\nHost: m\r\n\r\nGET /ready HTTP/1.1\r\nHost: m\r\n\r\n"
            )
            data = b""
            while data.count(b"HTTP/1.1 ") < 2:
                chunk = await stream.receive_some(65536)
                assert chunk
                data += chunk
            assert b"HTTP/1.1 200" in data and b"HTTP/1.1 503" in data
            await stream.aclose()
            assert (await get(addr, "/healthcheck"))[0] == 200
            nursery.cancel_scope.cancel()


async def test_localhost_0_falls_back_to_a_random_port_when_20241_to_20245_are_taken() -> None:
    state = ConnectorState(connector_id=CONNECTOR_ID)
    held = []
    try:
        for port in range(20241, 20246):
            try:
                held += await trio.open_tcp_listeners(port, host="127.0.0.1")
            except OSError:
                pytest.skip(f"port {port} is in use on this machine; cannot hold the known ports")
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                host, port = await nursery.start(serve_metrics, "localhost:0", state)
                assert host == "127.0.0.1" and not 20241 <= port <= 20245
                assert (await get((host, port), "/healthcheck"))[0] == 200
                nursery.cancel_scope.cancel()
    finally:
        for listener in held:
            await listener.aclose()


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:20241") == ("127.0.0.1", 20241)
    assert parse_address("localhost:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:9") == ("::1", 9)


def test_prometheus_label_escaping() -> None:
    state = ConnectorState(connector_id=CONNECTOR_ID)
    state.registration_failed('Unauthorized: "bad" secret')
    text = prometheus_text(state).decode()
    assert 'error="Unauthorized: \\"bad\\" secret"' in text


async def test_tunnel_ready_command_reads_ready() -> None:
    from tunnel_lab.connector import cli

    state = ConnectorState(connector_id=CONNECTOR_ID)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_metrics, "127.0.0.1:0", state)
            argv = ["tunnel", "--config", "/dev/null", "--metrics", f"{host}:{port}", "ready"]
            assert await trio.to_thread.run_sync(cli.main, argv) == 1
            state.connection_registered(0, "c", "LAB1", "127.0.0.1")
            assert await trio.to_thread.run_sync(cli.main, argv) == 0
            nursery.cancel_scope.cancel()

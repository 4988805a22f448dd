"""The connector's metrics server (docs/protocol.md §10.5): `/ready`, `/healthcheck`, `/metrics`, `/config`,
and the diagnostic endpoints that `tunnel diag` collects (`/diag/tunnel|system|configuration`,
`/debug/pprof/goroutine|heap`: connector.diag).

`/ready` is the lab's readiness probe: 200 `{"status":200,"readyConnections":N,"connectorId":"..."}`,
or 503 with `readyConnections` 0. `/metrics` is Prometheus text with cloudflared's metric names.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable
from typing import Any

import h11
import trio

from tunnel_lab.connector import diag
from tunnel_lab.connector.http1 import ClientGone, ServerConnection
from tunnel_lab.connector.state import ConnectorState

log = logging.getLogger(__name__)

# cloudflared's "localhost:0": try these, then a random port.
KNOWN_ADDRESSES = tuple(("127.0.0.1", p) for p in range(20241, 20246))
JSON = [("Content-Type", "application/json")]
TEXT = [("Content-Type", "text/plain; charset=utf-8")]
GO_JSON = TEXT  # cloudflared's diagnostic handlers set no type: Go's sniffing names JSON text/plain


def _json_line(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"  # as Go's json.Encoder writes


DIAG_ROUTES: dict[str, Callable[[ConnectorState], bytes]] = {
    "/diag/tunnel": lambda state: _json_line(diag.tunnel_state(state)),
    "/diag/system": lambda state: _json_line(diag.system_information(state.version)),
    "/diag/configuration": lambda state: _json_line(diag.configuration(state)),
    "/debug/pprof/goroutine": lambda _state: diag.task_dump(),
    "/debug/pprof/heap": lambda _state: diag.heap_dump(),
}


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` / `[v6]:port` -> (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host in ("", "localhost"):
        host = "127.0.0.1"
    return host, int(port)


async def _bind(address: str) -> trio.SocketListener:
    if address in ("localhost:0", ""):
        for host, port in KNOWN_ADDRESSES:
            try:
                return (await trio.open_tcp_listeners(port, host=host))[0]
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        return (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    host, port = parse_address(address)
    return (await trio.open_tcp_listeners(port, host=host))[0]


def ready_body(state: ConnectorState) -> tuple[int, bytes]:
    status = 200 if state.ready_connections > 0 else 503
    body = {"status": status, "readyConnections": state.ready_connections,
            "connectorId": str(state.connector_id)}
    return status, json.dumps(body, separators=(",", ":")).encode()


def _labels(**labels: Any) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels.items())
    return "{" + inner + "}"


def prometheus_text(state: ConnectorState) -> bytes:
    """The `/metrics` page in the Prometheus text format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            lines.append(f"{name}{labels} {shown}")

    metric("build_info", "gauge", "Build and version information",
           [(_labels(goversion="python", revision="", type="tunnel-lab", version=state.version), 1)])
    metric("cloudflared_tunnel_ha_connections", "gauge", "Number of active ha connections",
           [("", state.ready_connections)])
    metric("cloudflared_tunnel_total_requests", "counter",
           "Amount of requests proxied through all the tunnels", [("", state.total_requests)])
    metric("cloudflared_tunnel_request_errors", "counter", "Count of error proxying to origin",
           [("", state.request_errors)])
    metric("cloudflared_tunnel_concurrent_requests_per_tunnel", "gauge",
           "Concurrent requests proxied through each tunnel", [("", state.concurrent_requests)])
    metric("cloudflared_tunnel_max_concurrent_requests_per_tunnel", "gauge",
           "Largest number of concurrent requests proxied through each tunnel so far",
           [("", state.max_concurrent_requests)])
    metric("cloudflared_tunnel_response_by_code", "counter", "Count of responses by HTTP status code",
           [(_labels(status_code=code), n) for code, n in sorted(state.responses_by_code.items())])
    metric("cloudflared_tunnel_server_locations", "gauge",
           "Where each tunnel is connected to. 1 means current location, 0 means previous locations.",
           [(_labels(connection_id=idx, edge_location=loc), v)
            for (idx, loc), v in sorted(state.locations_seen.items())])
    metric("cloudflared_tunnel_tunnel_register_success", "counter",
           "Count of successful tunnel registrations",
           [(_labels(rpcName="registerConnection"), state.register_success)])
    metric("cloudflared_tunnel_tunnel_register_fail", "counter",
           "Count of tunnel registration errors by type",
           [(_labels(error=cause, rpcName="registerConnection"), n)
            for cause, n in sorted(state.register_fail.items())])
    metric("cloudflared_config_local_config_pushes", "counter",
           "Number of local configuration pushes to the edge", [("", state.local_config_pushes)])
    metric("cloudflared_config_local_config_pushes_errors", "counter",
           "Number of errors occurred during local configuration pushes",
           [("", state.local_config_push_errors)])
    metric("cloudflared_orchestration_config_version", "gauge", "Configuration Version",
           [("", state.config_version)])
    metric("cloudflared_tcp_active_sessions", "gauge",
           "Concurrent count of TCP sessions that are being proxied to any origin",
           [("", state.tcp_active_sessions)])
    metric("cloudflared_tcp_total_sessions", "counter",
           "Total count of TCP sessions that have been proxied to any origin",
           [("", state.tcp_total_sessions)])
    return ("\n".join(lines) + "\n").encode()


async def _handle(stream: trio.SocketStream, state: ConnectorState) -> None:
    conn = ServerConnection(stream)
    try:
        while True:
            got = await conn.next_request()
            if got is None:
                return
            request, _body = got
            target = request.target.decode("latin-1").split("?", 1)[0]
            if request.method not in (b"GET", b"HEAD"):
                await conn.respond(405, TEXT, b"Method Not Allowed\n")
            elif target == "/ready":
                status, body = ready_body(state)
                await conn.respond(status, JSON, body)
            elif target == "/healthcheck":
                await conn.respond(200, TEXT, b"OK\n")
            elif target == "/metrics":
                await conn.respond(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                                   prometheus_text(state))
            elif target == "/config":
                await conn.respond(200, JSON, json.dumps(state.versioned_config(),
                                                         separators=(",", ":")).encode())
            elif target in DIAG_ROUTES:
                await conn.respond(200, GO_JSON, DIAG_ROUTES[target](state))
            elif target == "/quicktunnel":
                await conn.respond(200, JSON, json.dumps({"hostname": state.quick_tunnel_url},
                                                         separators=(",", ":")).encode())
            else:
                await conn.respond(404, TEXT, b"404 page not found\n")
    except (ClientGone, h11.LocalProtocolError):
        return
    finally:
        await conn.aclose()


async def serve_metrics(address: str, state: ConnectorState, *,
                        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the metrics endpoints on `address` (`localhost:0` = cloudflared's 20241-20245 search).

    Reports the bound `(host, port)` through `task_status`; never returns.
    """
    listener = await _bind(address)
    sockname = listener.socket.getsockname()
    host, port = sockname[0], sockname[1]
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("Starting metrics server on %s/metrics", shown)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _handle(stream, state)
        except Exception:  # one bad client never stops the server
            log.debug("metrics client failed", exc_info=True)

    async with listener:
        task_status.started((host, port))
        await trio.serve_listeners(handler, [listener])

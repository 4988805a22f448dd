"""The v4 API on the edge's management port: the same endpoints as the sandbox's `api.cloudflare.com`
(`lab.v4api`), so `cloudflared tunnel --api-url https://127.0.0.1:PORT/client/v4 ...` works from a plain
shell, outside any namespace.

The decisions stay in `lab.v4api`; this shell feeds it the edge's own live connections, drops the ones
a cleanup or cascade names, and pushes stored remote configurations, all in-process. Requests carry a
cert.pem's API token (`tunnel-lab login`), not the management token: the paths below are answered as the
real API answers them, bad tokens included. docs/sandbox.md, "The v4 API outside the sandbox".
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from tunnel_lab.edge.state import EdgeState, connection_json
from tunnel_lab.edge.tunnel import TunnelConnection

log = logging.getLogger(__name__)

# The tunnel families of the v4 API. Other `/client/v4/...` paths on this port (Access, WAF) keep the
# management token.
_V4_PATH = re.compile(r"^/client/v4/(accounts/[^/]+/(cfd_tunnel|teamnet)(/|$)|zones/[^/]+/tunnels/)")


def is_v4_target(target: str) -> bool:
    """Whether a request target belongs to the v4 tunnel API (answered with cert.pem tokens)."""
    return _V4_PATH.match(target.split("?", 1)[0]) is not None


@dataclass
class _Shell:
    """What the edge keeps for this module (`EdgeState.v4api`): the API and a TLS context per address."""

    api: Any
    tls: dict[str, ssl.SSLContext] = field(default_factory=dict)


def _shell(edge: EdgeState[TunnelConnection]) -> _Shell:
    """The edge's shell state, made on first use over its state directory and store."""
    if edge.v4api is None:
        from tunnel_lab.lab.store import Store
        from tunnel_lab.lab.v4api import V4Api

        # Its own connection to the store: a write waiting on another process's lock never holds up the
        # request path's reads (edge.tunnels); it lives as long as the edge.
        edge.v4api = _Shell(V4Api(edge.config.state_dir, Store(edge.tunnels.db)))
    shell: _Shell = edge.v4api
    return shell


async def maybe_tls(edge: EdgeState[TunnelConnection], tcp: trio.SocketStream) -> trio.abc.Stream:
    """`tcp` itself for plain HTTP, or a TLS stream (handshake done) when the client starts TLS; the
    certificate is a lab-CA leaf for the address the client dialled (127.0.0.1 also names `localhost`)."""
    first = await tcp.socket.recv(1, socket.MSG_PEEK)
    if first != b"\x16":
        return tcp
    local = str(tcp.socket.getsockname()[0])
    tls = _shell(edge).tls
    if local not in tls:
        from tunnel_lab.lab.pki import LabPKI

        ctx = LabPKI(edge.config.state_dir).server_ssl_context("localhost" if local == "127.0.0.1" else local)
        ctx.set_alpn_protocols(["http/1.1"])
        tls[local] = ctx
    stream = trio.SSLStream(tcp, tls[local], server_side=True)
    await stream.do_handshake()
    return stream


async def answer(edge: EdgeState[TunnelConnection], method: str, target: str, headers: Mapping[str, str],
                 body: bytes) -> tuple[int, str, bytes]:
    """One v4 request: (status, content type, body)."""
    from tunnel_lab.edge.remote_config import push_to_connectors
    from tunnel_lab.lab.v4api import LiveConnection
    from tunnel_lab.lab.v4base import ApiRequest

    live = [LiveConnection.from_edge(connection_json(c)) for c in edge.registry.listed()]
    request = ApiRequest(method=method, target=target, headers=headers, body=body)
    # The store and STATE/v4api.json are shared with other processes and may wait on their locks: in a
    # worker thread, so the edge's loop keeps serving meanwhile (the store is safe across threads).
    response = await trio.to_thread.run_sync(_shell(edge).api.handle, request, live)
    for edge_id in response.disconnect:
        for conn in edge.registry.select({"connection": edge_id}):
            log.info("v4 api: dropping %s (connections cleanup or cascade delete)", conn.ident())
            conn.abort("cleaned up through the v4 API")
    if response.push is not None:
        push: dict[str, Any] = response.push
        results = await push_to_connectors(edge, str(push["tunnel_id"]), int(push["version"]), push["config"])
        log.info("v4 api: configuration version %s of tunnel %s pushed to %d connector(s)", push["version"],
                 push["tunnel_id"], len(results))
    return response.status, "application/json", response.encode()

"""`TunnelPair`: the real edge connection and the real connector connection, in one process.

Like h11's `ConnectionPair` for HTTP/1.1: an `edge.tunnel.H2TunnelConnection` (with a real `Edge`'s
state: store, registry, metrics) and a `connector.edge_conn.EdgeConnection` (with a real `Proxy`: ingress,
origin pool) talk over `trio.testing.memory_stream_pair`, handed to the connector through its `dial`
seam. No TLS and no listening sockets on the tunnel; origins, where a test needs one, are loopback
servers. Misbehaviour (what neither real side would send) stays with the scripted peers
(tests/component/connector_edge.py, test_edge_support.py).
No tests live here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing

from tests.component.test_edge_support import edge_config, make_tunnel
from tunnel_lab.connector.edge_conn import EdgeConnection
from tunnel_lab.connector.edge_errors import EdgeConnectionError
from tunnel_lab.connector.settings import IngressRule, TunnelSettings
from tunnel_lab.connector.streams import Proxy
from tunnel_lab.edge.server import Edge
from tunnel_lab.edge.tunnel import H2TunnelConnection
from tunnel_lab.wire.credentials import Credentials
from tunnel_lab.wire.eyeball import EyeballRequest, tunnel_request_headers

HOST = "app.pair.test"
EDGE_ADDRESS = "127.0.0.1:7844"


@dataclass
class TunnelPair:
    """Both ends of one registered tunnel connection (see the module docstring)."""

    edge: Edge
    edge_conn: H2TunnelConnection
    connector_conn: EdgeConnection
    proxy: Proxy
    shutdown: trio.Event  # set: the connector unregisters and drains, as on SIGTERM
    # the connector's unregisterConnection returned (the edge is draining)
    unregistered: trio.Event = field(default_factory=trio.Event)
    connector_done: trio.Event = field(default_factory=trio.Event)
    connector_error: BaseException | None = None

    async def stop_connector(self) -> None:
        """Graceful shutdown of the connector side; returns once its connection ended."""
        self.shutdown.set()
        await self.connector_done.wait()


def request_headers(method: str = "GET", target: str = "/", headers: tuple[tuple[bytes, bytes], ...] = (),
                    *, websocket: bool = False) -> list[tuple[bytes, bytes]]:
    """The fields the edge sends for an eyeball request to `HOST` (wire.eyeball, as edge/proxy.py does)."""
    req = EyeballRequest(method=method, target=target, headers=((b"Host", HOST.encode()), *headers),
                         scheme="https", client_ip="192.0.2.1", host=HOST)
    return tunnel_request_headers(req, ray="0123456789abcdef-LAB1", websocket=websocket)


@asynccontextmanager
async def open_tunnel_pair(tmp_path: Path, rules: tuple[IngressRule, ...], *, edge_trace: Any = None,
                           **settings: Any) -> AsyncIterator[TunnelPair]:
    """A registered TunnelPair whose connector serves `rules`; torn down on exit. `edge_trace`: a
    `transport.trace.Tracer` for the edge side (the connector's is `trace=` among the settings)."""
    edge = Edge(edge_config(tmp_path / "edge-state", drain_timeout=5.0))
    edge.state.trace = edge_trace
    tunnel = make_tunnel(edge, "pair", HOST)
    creds = Credentials(account_tag=tunnel.account_tag, tunnel_secret=tunnel.secret, tunnel_id=tunnel.id)
    options: dict[str, Any] = {"grace_period": 5.0, "retries": 0, "rpc_timeout": 5.0}
    options.update(settings)
    tunnel_settings = TunnelSettings(credentials=creds, edge_addrs=(EDGE_ADDRESS,), ingress_rules=rules,
                                     **options)
    edge_side, connector_side = trio.testing.memory_stream_pair()

    async def dial() -> trio.abc.Stream:
        return connector_side

    async with trio.open_nursery() as nursery:
        edge_conn = H2TunnelConnection(edge.state, edge_side, location="LAB1", remote="192.0.2.7:40000")
        edge.registry.add(edge_conn)
        nursery.start_soon(edge_conn.run)
        proxy = Proxy(tunnel_settings, nursery)
        registered = trio.Event()
        connector_conn = EdgeConnection(tunnel_settings, proxy, conn_index=0, address=EDGE_ADDRESS,
                                        dial=dial, on_registered=lambda _conn: registered.set(),
                                        on_unregistered=lambda _conn: pair.unregistered.set())
        pair = TunnelPair(edge, edge_conn, connector_conn, proxy, trio.Event())

        async def run_connector() -> None:
            try:
                await connector_conn.run(pair.shutdown)
            except EdgeConnectionError as exc:
                pair.connector_error = exc
            finally:
                pair.connector_done.set()

        nursery.start_soon(run_connector)
        with trio.fail_after(10):
            await registered.wait()
        assert edge_conn.state == "registered"  # set before its answer went out
        try:
            yield pair
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await proxy.pool.aclose()  # idle keep-alive connections to the test's origins

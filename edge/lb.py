"""Load balancers (`cloudflared tunnel route lb`): which tunnel of a load balancer's pools serves a request.

Pools are tried in the order they were added to the load balancer (Cloudflare's failover steering): the
first pool with a tunnel that has a routable connection serves, and within it requests go round robin
over those tunnels, so a pool of several tunnels spreads its requests and a tunnel without connections
is skipped. The store holds the load balancers (`lab.store.Store.route_lb`).
"""

from __future__ import annotations

from typing import Any

from tunnel_lab.edge.state import EdgeState
from tunnel_lab.edge.tunnel import TunnelConnection


def pick(edge: EdgeState[TunnelConnection], host: str) -> tuple[Any, TunnelConnection | None]:
    """(tunnel, connection) for a load balancer hostname; (a tunnel of it, None) when none of its tunnels
    is connected; (None, None) when `host` is not a load balancer or its pools have no tunnels left."""
    pools = edge.tunnels.load_balancer(host)
    if not pools:
        return None, None
    for pool in pools:
        up = [t for t in pool if edge.registry.routable(t.id)]
        if up:
            turn = edge.lb_turns.get(host, 0)
            edge.lb_turns[host] = turn + 1
            tunnel = up[turn % len(up)]
            return tunnel, edge.registry.pick(tunnel.id)
    first = next((t for pool in pools for t in pool), None)
    return first, None

"""Load balancers (`cloudflared tunnel route lb`): which tunnel of a load balancer's pools serves a request.

Pools are tried in the order they were added to the load balancer (Cloudflare's failover steering): the
first pool with a tunnel that has a routable connection serves, and within it requests go round robin
over those tunnels, so a pool of several tunnels spreads its requests and a tunnel without connections
is skipped. The store holds the load balancers (`lab.store.Store.route_lb`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunnel_lab.edge.state import EdgeState
from tunnel_lab.edge.tunnel import TunnelConnection


def choose(edge: EdgeState[TunnelConnection], host: str, *,
           elsewhere: Callable[[Any], bool] | None = None) -> Any:
    """The tunnel that serves a load balancer hostname (one round-robin turn); a tunnel of it when none is
    connected; None when `host` is not a load balancer or its pools have no tunnels left. `elsewhere(id)`:
    the tunnel has a routable connection in another process of a multi-process edge (edge.forward), which
    counts as connected."""
    pools = edge.tunnels.load_balancer(host)
    if not pools:
        return None
    for pool in pools:
        up = [t for t in pool if edge.registry.routable(t.id) or (elsewhere is not None and elsewhere(t.id))]
        if up:
            turn = edge.lb_turns.get(host, 0)
            edge.lb_turns[host] = turn + 1
            return up[turn % len(up)]
    return next((t for pool in pools for t in pool), None)


def pick(edge: EdgeState[TunnelConnection], host: str, *,
         chosen: Any = None) -> tuple[Any, TunnelConnection | None]:
    """(tunnel, connection) for a load balancer hostname, (a tunnel of it, None) when it has no connection
    here, (None, None) as `choose`. `chosen`: the tunnel already chosen for this request (edge.forward)."""
    tunnel = chosen if chosen is not None else choose(edge, host)
    return tunnel, edge.registry.pick(tunnel.id) if tunnel is not None else None

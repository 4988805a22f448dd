"""Quick tunnels: `POST https://api.trycloudflare.com/tunnel`, as `cloudflared tunnel --url URL` calls it.

No account, no token: the answer is `{success, result: {id, name, hostname, account_tag, secret}}`
(cloudflared's QuickTunnelResponse; `secret` is base64). The lab creates the tunnel in its store with a
random `*.trycloudflare.com` hostname routed to it, so the sandbox's DNS and eyeballs serve it at once.
"""

from __future__ import annotations

import base64
import secrets

from tunnel_lab.lab.store import Store
from tunnel_lab.lab.v4base import ApiResponse, V4ApiError

DOMAIN = "trycloudflare.com"
NAME_PREFIX = "quick-"
MAX_QUICK_TUNNELS = 100  # an anonymous endpoint: a client in a loop must not fill the store
_WORDS = ("amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor", "island", "juniper",
          "kestrel", "lagoon", "meadow", "nectar", "orchid", "prairie", "quartz", "river", "summit", "tundra",
          "upland", "valley", "willow", "yonder", "zephyr", "basin", "canyon", "dune", "estuary", "forest")


def _hostname() -> str:
    words = [secrets.choice(_WORDS) for _ in range(3)]
    return "-".join([*words, secrets.token_hex(2)]) + "." + DOMAIN


def create_quick_tunnel(store: Store, *, limit: int = MAX_QUICK_TUNNELS) -> ApiResponse:
    """Create a quick tunnel and route its hostname; the answer cloudflared reads."""
    existing = [t for t in store.list_tunnels() if t.name.startswith(NAME_PREFIX)]
    if len(existing) >= limit:
        raise V4ApiError(429, 1015, f"the lab holds {limit} quick tunnels already; delete some "
                         "with `tunnel-lab tunnel delete`")  # lab
    hostname = _hostname()
    tunnel = store.create_tunnel(NAME_PREFIX + hostname.split(".")[0])
    try:
        store.route_dns(tunnel, hostname)
    except BaseException:
        store.delete_tunnel(tunnel)  # nothing half-made
        raise
    result = {"id": str(tunnel.id), "name": tunnel.name, "hostname": hostname,
              "account_tag": tunnel.account_tag, "secret": base64.b64encode(tunnel.secret).decode("ascii")}
    return ApiResponse(status=200, body={"success": True, "result": result, "errors": []})

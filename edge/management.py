"""Management requests: `wss://management.argotunnel.com/logs?access_token=JWT[&connector_id=UUID]`.

`cloudflared tail` (and the dashboard) reach a connector's built-in management service through the
edge: the request arrives at the eyeball listeners with Host `management.argotunnel.com`; the edge
checks the token (`wire.mgmt_token`, signed with the lab key in the state directory), takes the
tunnel from its `tun.id` claim, picks a registered connection of that tunnel (of `connector_id` when
given) and forwards the request unchanged, as any eyeball request. The connector's internal ingress
rule for that Host answers it (cloudflared: `ingress.NewManagementRule`). How the real edge chooses
among connections is not public; the lab takes the lowest connIndex of the named connector.

Refusals are JSON in the shape `cloudflared tail` prints (`{"success": false, "errors": [{code,
message}]}`); the codes are the lab's.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from dataclasses import dataclass

from tunnel_lab.edge.state import EdgeState
from tunnel_lab.lab.remote_config import management_key
from tunnel_lab.transport.tunnel import Headers, TunnelConnection
from tunnel_lab.wire import mgmt_token
from tunnel_lab.wire.errors import TunnelLabError

HOSTNAME = "management.argotunnel.com"


@dataclass(frozen=True)
class Target:
    """Where a checked management request goes."""

    tunnel_id: uuid.UUID
    connector_id: uuid.UUID | None


@dataclass(frozen=True)
class Refusal:
    """The answer to a management request the edge does not forward."""

    status: int
    code: int
    message: str

    def page(self) -> tuple[Headers, bytes]:
        body = json.dumps({"success": False, "errors": [{"code": self.code, "message": self.message}]})
        return [(b"content-type", b"application/json")], body.encode() + b"\n"


def check(edge: EdgeState[TunnelConnection], target: str) -> Target | Refusal:
    """Check a management request's token and `connector_id` (the request target's query)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
    token = (query.get("access_token") or [""])[-1]
    if not token:
        return Refusal(400, 1001, "missing access_token query parameter")  # cloudflared's own text
    try:
        public = management_key(edge.config.state_dir).public_key()
    except TunnelLabError as exc:
        return Refusal(500, 1000, f"the lab edge cannot read its management key: {exc}")  # lab
    try:
        claims = mgmt_token.verify(token, public, now=time.time())
    except mgmt_token.JwtError as exc:
        return Refusal(401, 1002, f"invalid management token: {exc}")  # lab
    try:
        tunnel_id = uuid.UUID(claims.tunnel_id)
    except ValueError:
        return Refusal(401, 1002, "invalid management token: tun.id is not a UUID")  # lab
    connector = (query.get("connector_id") or [""])[-1]
    try:
        connector_id = uuid.UUID(connector) if connector else None
    except ValueError:
        return Refusal(400, 1003, f"connector_id {connector[:60]!r} is not a UUID")  # lab
    return Target(tunnel_id=tunnel_id, connector_id=connector_id)


def pick(edge: EdgeState[TunnelConnection], target: Target,
         exclude: list[TunnelConnection]) -> TunnelConnection | None:
    """A registered connection of the target's tunnel (and connector), lowest connIndex first."""
    conns = [c for c in edge.registry.routable(target.tunnel_id)
             if c not in exclude and c.registration is not None
             and (target.connector_id is None or c.registration.connector_id == target.connector_id)]
    conns.sort(key=lambda c: c.registration.conn_index if c.registration is not None else 0)
    return conns[0] if conns else None


def no_connector(target: Target) -> Refusal:
    """530, which tail reports as 'no cloudflared connector available or reachable'."""
    which = f"connector {target.connector_id}" if target.connector_id else "connector"
    return Refusal(530, 1004, f"no {which} of tunnel {target.tunnel_id} is connected")  # lab

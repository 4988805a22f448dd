"""The lab's Cloudflare v4 API for tunnels: what `cloudflared tunnel create|list|info|route dns|route ip|
token|delete|cleanup` and `run NAME` call, answered from the lab's store (`lab/store.py`).

No I/O here beyond the store: `V4Api.handle(request, live)` takes one request and the edge's live
connections and returns the answer; `lab/services.py` is the HTTPS shell. Facts from cloudflared's
`cfapi/` (paths, fields, the envelope): every answer is `application/json` with `success`, `errors`
(`[{code, message}]`), `messages` and `result` (`result_info` for lists); cloudflared reads the error
text only when `Content-Type` is exactly `application/json`. Times are RFC 3339 text.

Error codes: 9106 (no Authorization header), 10000 (a token the API does not know), 1013 (duplicate
tunnel name), 1003 (a hostname another tunnel holds; for load balancers the lab's choice), 7003/7000
(no such route) and 7001 (method) are what the real API answers (seen in public reports); the others
are marked `lab` below: chosen by us where the real code is not known, documented in docs/sandbox.md.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import time
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnel_lab.lab.remote_config import RemoteConfigs, check_config, management_key
from tunnel_lab.lab.store import Store, Tunnel, format_time, normalize_hostname
from tunnel_lab.lab.v4base import (
    MAX_BODY,
    MIN_SECRET_BYTES,
    PREFIX,
    Accounts,
    ApiRequest,
    ApiResponse,
    V4ApiError,
    existed_at,
    load_accounts,
    no_route,
    not_authenticated,
    paged,
    query_value,
    success,
)
from tunnel_lab.lab.v4teamnet import TeamnetRoutes
from tunnel_lab.wire import mgmt_token
from tunnel_lab.wire.credentials import make_token
from tunnel_lab.wire.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class LiveConnection:
    """One registered connection as the edge lists it (`GET /connections` on the management API)."""

    tunnel_id: str
    connector_id: str
    conn_index: int
    edge_id: str = ""  # the edge's own id of the connection (its management API's `id`)
    location: str
    remote: str
    client_version: str
    arch: str
    features: tuple[str, ...]
    registered_at: float

    @classmethod
    def from_edge(cls, item: Mapping[str, Any]) -> LiveConnection:
        return cls(tunnel_id=str(item.get("tunnel_id")), connector_id=str(item.get("connector_id")),
                   edge_id=str(item.get("id") or ""),
                   conn_index=int(item.get("conn_index") or 0), location=str(item.get("location") or ""),
                   remote=str(item.get("remote") or ""), client_version=str(item.get("client_version") or ""),
                   arch=str(item.get("arch") or ""), features=tuple(item.get("features") or ()),
                   registered_at=float(item.get("registered_at") or 0.0))

    @property
    def uuid(self) -> str:
        # cloudflared decodes a connection id as a UUID: a stable one per connector and index.
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tunnel-lab:{self.connector_id}/{self.conn_index}"))

    @property
    def origin_ip(self) -> str:
        host, _, _ = self.remote.rpartition(":")
        return host.strip("[]") or self.remote

    @property
    def opened_at(self) -> str:
        return format_time(datetime.datetime.fromtimestamp(self.registered_at, datetime.UTC))

    def as_connection(self) -> dict[str, Any]:
        return {"colo_name": self.location, "id": self.uuid, "is_pending_reconnect": False,
                "origin_ip": self.origin_ip, "opened_at": self.opened_at,
                "client_id": self.connector_id, "client_version": self.client_version}


# --- the API ------------------------------------------------------------------------------------------------

class V4Api:
    """The tunnel endpoints of the v4 API over one state directory."""

    def __init__(self, state: Path, store: Store) -> None:
        self.state = state
        self.store = store
        self.teamnet = TeamnetRoutes(state, store)
        self.configs = RemoteConfigs(state)

    def handle(self, request: ApiRequest, live: Sequence[LiveConnection] = ()) -> ApiResponse:
        """Answer one request; every failure is an error envelope, never an exception."""
        try:
            return self._dispatch(request, live)
        except V4ApiError as exc:
            return ApiResponse(status=exc.status, body=exc.envelope())
        except ConfigError as exc:  # the store refused the input (a name, a hostname)
            return ApiResponse(status=400, body=V4ApiError(400, 1001, exc.message).envelope())  # lab

    def _dispatch(self, request: ApiRequest, live: Sequence[LiveConnection]) -> ApiResponse:
        url = urllib.parse.urlsplit(request.target)
        path = url.path.rstrip("/")
        if not path.startswith(PREFIX + "/"):
            raise no_route(url.path)
        accounts = self._authenticate(request.headers)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        parts = path[len(PREFIX) + 1:].split("/")
        method = request.method
        account = self.store.account_tag
        if len(parts) >= 3 and parts[0] == "accounts" and parts[2] == "cfd_tunnel":
            if parts[1] != account:
                raise not_authenticated()
            rest = parts[3:]
            if not rest:
                self._allow(method, ("GET", "POST"), url.path)
                return self._list(query, live) if method == "GET" else self._create(request.body)
            tunnel = self._tunnel(rest[0])
            if len(rest) == 1:
                self._allow(method, ("GET", "DELETE"), url.path)
                if method == "GET":
                    return success(self._tunnel_json(tunnel, live))
                return self._delete(tunnel, query, live)
            if rest[1:] == ["token"]:
                self._allow(method, ("GET",), url.path)
                return success(make_token(tunnel.credentials()))
            if rest[1:] == ["connections"]:
                self._allow(method, ("GET", "DELETE"), url.path)
                if method == "GET":
                    return success(self._clients(tunnel, live))
                return self._cleanup(tunnel, query, live)
            if rest[1:] == ["configurations"]:
                self._allow(method, ("GET", "PUT"), url.path)
                return self._configuration(tunnel, method, request.body)
            if len(rest) == 3 and rest[1] == "management" and rest[2] in mgmt_token.RESOURCES:
                self._allow(method, ("POST",), url.path)
                return success(self._management_token(tunnel, rest[2], request.headers))
        elif len(parts) >= 4 and parts[0] == "accounts" and parts[2:4] == ["teamnet", "routes"]:
            if parts[1] != account:
                raise not_authenticated()
            return self.teamnet.handle(method, parts[4:], query, request.body)
        elif len(parts) >= 4 and parts[0] == "accounts" and parts[2:4] == ["teamnet", "virtual_networks"]:
            if parts[1] != account:
                raise not_authenticated()
            return self.teamnet.vnets.handle(method, parts[4:], query, request.body)
        elif len(parts) == 5 and parts[0] == "zones" and parts[2] == "tunnels" and parts[4] == "routes":
            if parts[1] != accounts.zone_tag:
                raise not_authenticated()
            tunnel = self._tunnel(parts[3])
            self._allow(method, ("PUT",), url.path)
            return self._route(tunnel, request.body)
        raise no_route(url.path)

    # -- plumbing

    def _authenticate(self, headers: Mapping[str, str]) -> Accounts:
        value = headers.get("authorization")
        if value is None:
            raise V4ApiError(400, 9106, "Missing X-Auth-Key, X-Auth-Email or Authorization headers")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise V4ApiError(400, 6003, "Invalid request headers",
                             [(6111, "Invalid format for Authorization header")])
        try:
            accounts = load_accounts(self.state)
        except ConfigError as exc:  # the lab's own file is broken: not the caller's mistake
            raise V4ApiError(500, 1000, str(exc)) from exc  # lab
        if not accounts.knows(token.strip()):
            raise not_authenticated()
        return accounts

    @staticmethod
    def _allow(method: str, allowed: Sequence[str], _path: str) -> None:
        if method not in allowed:
            raise V4ApiError(405, 7001, f"Method {method} not available for that URI.")

    def _tunnel(self, text: str) -> Tunnel:
        try:
            tunnel_id = uuid.UUID(text)
        except ValueError:
            raise no_route(text) from None
        tunnel = self.store.tunnel_by_id(tunnel_id)
        if tunnel is None:
            raise V4ApiError(404, 1002, "Tunnel not found")  # lab
        return tunnel

    @staticmethod
    def _json_body(body: bytes) -> dict[str, Any]:
        if len(body) > MAX_BODY:
            raise V4ApiError(413, 1004, f"request body over {MAX_BODY} bytes")  # lab
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as exc:
            where = f" at byte {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
            raise V4ApiError(400, 1001, f"Invalid JSON in the request body{where}") from None  # lab
        if not isinstance(value, dict):
            raise V4ApiError(400, 1001, "the request body must be a JSON object")  # lab
        return value

    def _connections(self, tunnel: Tunnel, live: Sequence[LiveConnection]) -> list[LiveConnection]:
        return [c for c in live if c.tunnel_id == str(tunnel.id)]

    def _tunnel_json(self, tunnel: Tunnel, live: Sequence[LiveConnection]) -> dict[str, Any]:
        conns = self._connections(tunnel, live)
        created = format_time(tunnel.created_at)
        return {
            "id": str(tunnel.id), "account_tag": tunnel.account_tag, "created_at": created,
            "deleted_at": None, "name": tunnel.name,
            "connections": [c.as_connection() for c in conns],
            "conns_active_at": min((c.opened_at for c in conns), default=None),
            "conns_inactive_at": None if conns else created,
            "tun_type": "cfd_tunnel", "metadata": {},
            "remote_config": self.configs.get(str(tunnel.id)) is not None,
            "status": "healthy" if conns else "inactive",
        }

    # -- endpoints

    def _create(self, body: bytes) -> ApiResponse:
        data = self._json_body(body)
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise V4ApiError(400, 1001, "name is required and must be a string")  # lab
        secret_text = data.get("tunnel_secret")
        if not isinstance(secret_text, str):
            raise V4ApiError(400, 1001, "tunnel_secret is required: base64 of at least 32 bytes")  # lab
        try:
            secret = base64.b64decode(secret_text, validate=True)
        except (binascii.Error, ValueError):
            raise V4ApiError(400, 1001, "tunnel_secret is not standard base64") from None  # lab
        if len(secret) < MIN_SECRET_BYTES:
            raise V4ApiError(400, 1001, f"tunnel_secret must be at least {MIN_SECRET_BYTES} bytes")  # lab
        if self.store.get_tunnel(name) is not None:
            raise V4ApiError(409, 1013, "You already have a tunnel with this name. Delete the existing "
                             "tunnel, or choose a different name for your new tunnel")
        try:
            tunnel = self.store.create_tunnel(name, secret=secret)
        except ConfigError as exc:
            if "already exists" in exc.message:  # created by someone else since the check above
                raise V4ApiError(409, 1013, "You already have a tunnel with this name. Delete the "
                                 "existing tunnel, or choose a different name for your new tunnel") from exc
            raise
        result = self._tunnel_json(tunnel, ())
        result["credentials_file"] = {"AccountTag": tunnel.account_tag, "TunnelID": str(tunnel.id),
                                      "TunnelName": tunnel.name, "TunnelSecret": secret_text}
        result["token"] = make_token(tunnel.credentials())
        return success(result)

    def _list(self, query: Mapping[str, list[str]], live: Sequence[LiveConnection]) -> ApiResponse:
        def one(key: str) -> str | None:
            return query_value(query, key)

        tunnels = self.store.list_tunnels()
        if one("is_deleted") == "true":
            tunnels = []  # a deleted tunnel leaves the lab's store at once
        if (name := one("name")) is not None:
            tunnels = [t for t in tunnels if t.name == name]
        if (prefix := one("name_prefix")) is not None:
            tunnels = [t for t in tunnels if t.name.startswith(prefix)]
        if (exclude := one("exclude_prefix")) is not None:
            tunnels = [t for t in tunnels if not t.name.startswith(exclude)]
        if (wanted := one("uuid")) is not None:
            tunnels = [t for t in tunnels if str(t.id) == wanted.lower()]
        if (when := existed_at(query)) is not None:
            tunnels = [t for t in tunnels if t.created_at <= when]
        return paged(query, [self._tunnel_json(t, live) for t in tunnels])

    def _delete(self, tunnel: Tunnel, query: Mapping[str, list[str]],
                live: Sequence[LiveConnection]) -> ApiResponse:
        cascade = query.get("cascade", ["false"])[-1] == "true"
        if self._connections(tunnel, live) and not cascade:
            raise V4ApiError(400, 1022, "Cannot delete tunnel because it has active connections. Stop the "
                             "connectors or delete with cascade.")  # lab
        result = self._tunnel_json(tunnel, ())
        self.store.delete_tunnel(tunnel)
        self.configs.forget(str(tunnel.id))
        result["deleted_at"] = format_time(datetime.datetime.now(datetime.UTC))
        # With cascade, the tunnel's live connections go too.
        return ApiResponse(status=200, body=success(result).body,
                           disconnect=tuple(c.edge_id for c in self._connections(tunnel, live)))

    def _clients(self, tunnel: Tunnel, live: Sequence[LiveConnection]) -> list[dict[str, Any]]:
        clients: dict[str, list[LiveConnection]] = {}
        for conn in self._connections(tunnel, live):
            clients.setdefault(conn.connector_id, []).append(conn)
        return [{"id": cid, "features": list(conns[0].features), "version": conns[0].client_version,
                 "arch": conns[0].arch, "run_at": min(c.opened_at for c in conns),
                 "conns": [c.as_connection() for c in conns]} for cid, conns in clients.items()]

    def _cleanup(self, tunnel: Tunnel, query: Mapping[str, list[str]],
                 live: Sequence[LiveConnection]) -> ApiResponse:
        client = query.get("client_id", [None])[-1]
        chosen = [c for c in self._connections(tunnel, live) if client is None or c.connector_id == client]
        # The edge drops them (as the real edge does with connections cleaned up); a connector still
        # running reconnects, as it would after any lost connection.
        return ApiResponse(status=200, body=success(None).body, disconnect=tuple(c.edge_id for c in chosen))

    def _configuration(self, tunnel: Tunnel, method: str, body: bytes) -> ApiResponse:
        """GET or PUT the tunnel's remote configuration; a PUT stores the next version and asks the
        shell to have the edge push it to the running connectors."""
        account = self.store.account_tag
        if method == "GET":
            current = self.configs.get(str(tunnel.id))
            if current is None:  # the tunnel is locally managed: the real API answers an empty config
                return success({"tunnel_id": str(tunnel.id), "account_id": account, "version": 0,
                                "config": None, "source": "local", "created_at": None})
            return success(current.as_result(account))
        data = self._json_body(body)
        try:
            config = check_config(data.get("config"))
        except ConfigError as exc:
            raise V4ApiError(400, 1001, f"{exc.source}: {exc.message}") from None  # lab
        stored = self.configs.put(str(tunnel.id), config)
        return ApiResponse(status=200, body=success(stored.as_result(account)).body,
                           push={"tunnel_id": str(tunnel.id), **stored.push_body()})

    def _management_token(self, tunnel: Tunnel, resource: str, headers: Mapping[str, str]) -> str:
        """A signed management token (what `cloudflared tail` presents to management.argotunnel.com).
        The actor is derived from the API token, so one login's new session replaces its old one."""
        api_token = headers.get("authorization", "").partition(" ")[2].strip()
        actor = hashlib.sha256(api_token.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return mgmt_token.mint(management_key(self.state), tunnel_id=str(tunnel.id),
                               account_tag=tunnel.account_tag, actor=actor, resource=resource,
                               now=time.time())

    def _route(self, tunnel: Tunnel, body: bytes) -> ApiResponse:
        data = self._json_body(body)
        kind = data.get("type")
        if kind == "lb":
            return self._route_lb(tunnel, data)
        if kind != "dns":
            raise V4ApiError(400, 1001, f"unknown route type {kind!r}: use dns or lb")  # lab
        hostname = data.get("user_hostname")
        overwrite = data.get("overwrite_existing", False)
        if not isinstance(hostname, str) or not isinstance(overwrite, bool):
            raise V4ApiError(400, 1001,  # lab
                             "user_hostname must be a string and overwrite_existing a boolean")
        name = normalize_hostname(hostname, allow_wildcard=True)
        if self.store.load_balancer(name) is not None:
            raise V4ApiError(400, 1003, f"Failed to create record {name} with err a load balancer "  # lab
                             "with that host already exists.")
        existing = self.store.find_route(name)
        if existing is not None and existing.tunnel_id == tunnel.id:
            return success({"cname": "unchanged", "name": name})
        if existing is not None and not overwrite:
            raise V4ApiError(400, 1003, f"Failed to create record {name} with err An A, AAAA, or CNAME "
                             "record with that host already exists.")
        self.store.route_dns(tunnel, name, overwrite=True)
        # An overwrite answers "new" too: cloudflared's cfapi notes that the API does not return "updated".
        return success({"cname": "new", "name": name})

    def _route_lb(self, tunnel: Tunnel, data: Mapping[str, Any]) -> ApiResponse:
        """`route lb`: the tunnel becomes an origin of the pool, the pool a pool of the load balancer."""
        lb_name, pool = data.get("lb_name"), data.get("lb_pool")
        if not isinstance(lb_name, str) or not isinstance(pool, str) or not lb_name or not pool:
            raise V4ApiError(400, 1001, "lb_name and lb_pool are required strings")  # lab
        name = normalize_hostname(lb_name)
        if self.store.find_route(name) is not None:
            raise V4ApiError(400, 1003, f"Failed to create load balancer {name} with err "  # lab
                             "An A, AAAA, or CNAME record with that host already exists.")
        lb_change, pool_change = self.store.route_lb(tunnel, name, pool)
        return success({"load_balancer": lb_change, "pool": pool_change})


def parse_live(payload: bytes) -> list[LiveConnection]:
    """The edge management API's `GET /connections` answer as `LiveConnection`s (bad items skipped)."""
    try:
        items = json.loads(payload)
    except ValueError:
        return []
    out = []
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and item.get("tunnel_id"):
            try:
                out.append(LiveConnection.from_edge(item))
            except (TypeError, ValueError):
                continue
    return out

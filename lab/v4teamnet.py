"""The v4 API's private-network routes (`/accounts/{acct}/teamnet/routes`), on the store's IP routes.

What `cloudflared tunnel route ip add|show|get|delete` call (cloudflared's cfapi/ip_route.go): list
with filters, add `{network, tunnel_id, comment[, virtual_network_id]}`, delete by route ID, and the
route for one IP. Virtual networks are `lab.v4vnets`; a route without one is in the default network.
A route's ID is derived from its network, which the store keeps unique (so one CIDR cannot be routed in
two virtual networks in the lab); comments and each route's virtual network are kept beside the store
in `STATE/v4api.json`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tunnel_lab.lab.store import Route, Store, format_time, parse_network
from tunnel_lab.lab.v4base import (
    ApiResponse,
    V4ApiError,
    existed_at,
    locked_accounts,
    no_route,
    paged,
    query_value,
    read_accounts,
    success,
    write_accounts,
)
from tunnel_lab.lab.v4vnets import VirtualNetworks
from tunnel_lab.wire.errors import ConfigError

MAX_COMMENT = 100  # lab: a bound on what is kept


def route_id(network: str) -> str:
    """A stable ID for the route of `network` (the store holds at most one route per network)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tunnel-lab:ip-route:{network}"))


class TeamnetRoutes:
    """The teamnet route endpoints over the store (and the comments file) of one state directory."""

    def __init__(self, state: Path, store: Store) -> None:
        self.state = state
        self.store = store
        self.vnets = VirtualNetworks(state, self._networks_in, self._drop)

    # -- comments and virtual networks of routes

    def _meta(self, key: str) -> dict[str, str]:
        with locked_accounts(self.state) as path:
            found = read_accounts(path).get(key)
        return {k: v for k, v in found.items() if isinstance(v, str)} if isinstance(found, dict) else {}

    def _comments(self) -> dict[str, str]:
        return self._meta("route_comments")

    def _set_meta(self, network: str, comment: str | None, vnet: str | None) -> None:
        with locked_accounts(self.state) as path:
            data = read_accounts(path)
            for key, value in (("route_comments", comment), ("route_vnets", vnet)):
                entries = data.setdefault(key, {})
                if value:
                    entries[network] = value
                else:
                    entries.pop(network, None)
            write_accounts(path, data)

    def _vnet_of(self) -> Callable[[Route], str]:
        """The virtual network of each route (routes made outside the API are in the default one)."""
        vnets, default = self._meta("route_vnets"), self.vnets.default_id()
        return lambda route: vnets.get(route.target, default)

    def _networks_in(self, vnet_id: str) -> list[str]:
        vnet_of = self._vnet_of()
        return [r.target for r in self.store.list_routes("ip") if vnet_of(r) == vnet_id]

    def _drop(self, networks: list[str]) -> None:
        for network in networks:
            self.store.delete_route(network, kind="ip")
            self._set_meta(network, None, None)

    def _json(self, route: Route, comments: Mapping[str, str], vnet_id: str) -> dict[str, Any]:
        return {"id": route_id(route.target), "network": route.target, "tunnel_id": str(route.tunnel_id),
                "tunnel_name": route.tunnel_name, "comment": comments.get(route.target, ""),
                "virtual_network_id": vnet_id,
                "created_at": format_time(route.created_at), "deleted_at": None}

    # -- endpoints

    def handle(self, method: str, rest: list[str], query: Mapping[str, list[str]],
               body: bytes) -> ApiResponse:
        """`rest`: the path after `teamnet/routes`."""
        if not rest:
            if method == "GET":
                return self._list(query)
            if method == "POST":
                return self._add(body)
        elif len(rest) == 1 and method == "DELETE":
            return self._delete(rest[0])
        elif len(rest) == 2 and rest[0] == "ip" and method == "GET":
            return self._by_ip(rest[1], query)
        elif not (len(rest) == 1 or (len(rest) == 2 and rest[0] == "ip")):
            raise no_route("/teamnet/routes/" + "/".join(rest))
        raise V4ApiError(405, 7001, f"Method {method} not available for that URI.")

    def _list(self, query: Mapping[str, list[str]]) -> ApiResponse:
        routes = self.store.list_routes("ip")
        if query_value(query, "is_deleted") == "true":
            routes = []  # a deleted route leaves the store at once
        vnet_of = self._vnet_of()
        if (vnet := query_value(query, "virtual_network_id")) is not None:
            wanted = self.vnets.resolve(vnet)
            routes = [r for r in routes if vnet_of(r) == wanted]
        try:
            subset_of = query_value(query, "network_subset")
            superset_of = query_value(query, "network_superset")
            if subset_of is not None:
                outer = parse_network(subset_of)
                routes = [r for r in routes if _subnet(parse_network(r.target), outer)]
            if superset_of is not None:
                inner = parse_network(superset_of)
                routes = [r for r in routes if _subnet(inner, parse_network(r.target))]
        except ConfigError as exc:
            raise V4ApiError(400, 1001, exc.message) from exc  # lab
        if (tunnel := query_value(query, "tunnel_id")) is not None:
            routes = [r for r in routes if str(r.tunnel_id) == tunnel.lower()]
        comments = self._comments()
        if (comment := query_value(query, "comment")) is not None:
            routes = [r for r in routes if comments.get(r.target, "") == comment]
        if (when := existed_at(query)) is not None:
            routes = [r for r in routes if r.created_at <= when]
        return paged(query, [self._json(r, comments, vnet_of(r)) for r in routes])

    def _add(self, body: bytes) -> ApiResponse:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise V4ApiError(400, 1001, "Invalid JSON in the request body") from None  # lab
        if not isinstance(data, dict):
            raise V4ApiError(400, 1001, "the request body must be a JSON object")  # lab
        network, tunnel_text, comment = data.get("network"), data.get("tunnel_id"), data.get("comment", "")
        if not isinstance(network, str) or not isinstance(tunnel_text, str) or not isinstance(comment, str):
            raise V4ApiError(400, 1001,  # lab
                             "network and tunnel_id are required strings; comment is a string")
        if len(comment) > MAX_COMMENT:
            raise V4ApiError(400, 1001, f"comment is longer than {MAX_COMMENT} characters")  # lab
        vnet = self.vnets.resolve(data.get("virtual_network_id"))
        try:
            tunnel = self.store.tunnel_by_id(uuid.UUID(tunnel_text))
        except ValueError:
            tunnel = None
        if tunnel is None:
            raise V4ApiError(404, 1002, f"Tunnel {tunnel_text} not found")  # lab
        try:
            route = self.store.route_ip(network, tunnel)
        except ConfigError as exc:
            status = 409 if "already exists" in exc.message else 400
            raise V4ApiError(status, 1014 if status == 409 else 1001, exc.message) from exc  # lab
        self._set_meta(route.target, comment, vnet)
        return success(self._json(route, {route.target: comment}, vnet))

    def _delete(self, text: str) -> ApiResponse:
        comments, vnet_of = self._comments(), self._vnet_of()
        for route in self.store.list_routes("ip"):
            if route_id(route.target) == text.lower():
                vnet = vnet_of(route)
                self.store.delete_route(route.target, kind="ip")
                self._set_meta(route.target, None, None)
                result = self._json(route, comments, vnet)
                result["deleted_at"] = format_time(datetime.datetime.now(datetime.UTC))
                return success(result)
        raise V4ApiError(404, 1002, f"Route {text} not found")  # lab

    def _by_ip(self, text: str, query: Mapping[str, list[str]]) -> ApiResponse:
        vnet = self.vnets.resolve(query_value(query, "virtual_network_id"))
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise V4ApiError(400, 1001, f"{text!r} is not an IP address") from None  # lab
        addr = ipaddress.ip_address(text)
        vnet_of = self._vnet_of()
        matching = [r for r in self.store.list_routes("ip")
                    if vnet_of(r) == vnet and addr in ipaddress.ip_network(r.target)]
        if not matching:
            return success({})  # no route: cloudflared reads a zero route and says so
        best = max(matching, key=lambda r: ipaddress.ip_network(r.target).prefixlen)
        return success(self._json(best, self._comments(), vnet))


def _subnet(inner: ipaddress.IPv4Network | ipaddress.IPv6Network,
            outer: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]

"""The v4 API's virtual networks (`/accounts/{acct}/teamnet/virtual_networks`).

What `cloudflared tunnel vnet add|list|update|delete` and `route ip ... --vnet` call (cloudflared's
cfapi/virtual_network.go): add `{name, comment, is_default_network}`, list with the filters `id`,
`name`, `is_default`, `is_deleted`, `per_page`, PATCH any of those three fields, DELETE with `force`.
The account always has one default network (the lab makes it, named `default`, on first use); making
another the default takes the flag from the old one.

Kept beside the store in `STATE/v4api.json` (`virtual_networks`, and `route_vnets`: the virtual
network of each IP route that is not in the default one). The lab's store holds one route per
network, so the same CIDR cannot be routed in two virtual networks (the real API allows it), and the
edge's WARP routing ignores virtual networks. Error codes are the lab's.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tunnel_lab.lab.store import format_time
from tunnel_lab.lab.v4base import (
    ApiResponse,
    V4ApiError,
    locked_accounts,
    no_route,
    paged,
    query_value,
    read_accounts,
    success,
    write_accounts,
)

MAX_NAME = 256  # lab
MAX_COMMENT = 256  # lab
DEFAULT_NAME = "default"  # lab: the name of the network made for an account that has none


class VirtualNetworks:
    """The virtual networks of one state directory; `routes_in(id)` lists the IP routes (networks) in one,
    `drop_routes(networks)` deletes routes (a forced delete)."""

    def __init__(self, state: Path, routes_in: Callable[[str], list[str]],
                 drop_routes: Callable[[list[str]], None]) -> None:
        self.state = state
        self._routes_in = routes_in
        self._drop_routes = drop_routes

    # -- storage

    def _load(self, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The networks in `data` (made with the default one if there is none yet); changes `data`."""
        nets = data.get("virtual_networks")
        if not isinstance(nets, dict) or not nets:
            nets = {str(uuid.uuid4()): {"name": DEFAULT_NAME, "comment": "", "is_default_network": True,
                                        "created_at": format_time(datetime.datetime.now(datetime.UTC))}}
            data["virtual_networks"] = nets
        return nets

    def all(self) -> dict[str, dict[str, Any]]:
        """Every network by ID (creating the default on first use)."""
        with locked_accounts(self.state) as path:
            data = read_accounts(path)
            had = isinstance(data.get("virtual_networks"), dict) and bool(data["virtual_networks"])
            nets = self._load(data)
            if not had:
                write_accounts(path, data)
        return nets

    def default_id(self) -> str:
        return next(i for i, n in self.all().items() if n.get("is_default_network"))

    def resolve(self, value: object) -> str:
        """The network ID a request names (`virtual_network_id`), the default when absent; 400 if unknown."""
        if value in (None, ""):
            return self.default_id()
        if not isinstance(value, str) or value.lower() not in self.all():
            raise V4ApiError(400, 1001, f"virtual network {value} does not exist")  # lab
        return value.lower()

    @staticmethod
    def _json(vnet_id: str, net: Mapping[str, Any]) -> dict[str, Any]:
        return {"id": vnet_id, "name": net.get("name", ""), "comment": net.get("comment", ""),
                "is_default_network": bool(net.get("is_default_network")),
                "created_at": net.get("created_at"), "deleted_at": None}

    # -- endpoints

    def handle(self, method: str, rest: list[str], query: Mapping[str, list[str]],
               body: bytes) -> ApiResponse:
        """`rest`: the path after `teamnet/virtual_networks`."""
        if not rest:
            if method == "GET":
                return self._list(query)
            if method == "POST":
                return self._add(_json_object(body))
        elif len(rest) == 1:
            if method == "PATCH":
                return self._update(rest[0].lower(), _json_object(body))
            if method == "DELETE":
                return self._delete(rest[0].lower(), query_value(query, "force") == "true")
        else:
            raise no_route("/teamnet/virtual_networks/" + "/".join(rest))
        raise V4ApiError(405, 7001, f"Method {method} not available for that URI.")

    def _list(self, query: Mapping[str, list[str]]) -> ApiResponse:
        items = [self._json(i, n) for i, n in self.all().items()]
        if query_value(query, "is_deleted") == "true":
            items = []  # a deleted network leaves the lab at once
        if (wanted := query_value(query, "id")) is not None:
            items = [v for v in items if v["id"] == wanted.lower()]
        if (name := query_value(query, "name")) is not None:
            items = [v for v in items if v["name"] == name]
        if (default := query_value(query, "is_default")) is not None:
            items = [v for v in items if v["is_default_network"] == (default == "true")]
        items.sort(key=lambda v: (v["created_at"] or "", v["name"]))
        return paged(query, items)

    def _add(self, data: dict[str, Any]) -> ApiResponse:
        name, comment = data.get("name"), data.get("comment", "")
        make_default = data.get("is_default_network", False)
        _check_fields(name, comment, make_default, name_required=True)
        with locked_accounts(self.state) as path:
            stored = read_accounts(path)
            nets = self._load(stored)
            if any(n.get("name") == name for n in nets.values()):
                raise V4ApiError(409, 1015, f"a virtual network named {name!r} already exists")  # lab
            if make_default:
                for n in nets.values():
                    n["is_default_network"] = False
            vnet_id = str(uuid.uuid4())
            nets[vnet_id] = {"name": name, "comment": comment, "is_default_network": bool(make_default),
                             "created_at": format_time(datetime.datetime.now(datetime.UTC))}
            write_accounts(path, stored)
        return success(self._json(vnet_id, nets[vnet_id]))

    def _update(self, vnet_id: str, data: dict[str, Any]) -> ApiResponse:
        name, comment = data.get("name"), data.get("comment")
        make_default = data.get("is_default_network")
        _check_fields(name, comment, make_default, name_required=False)
        with locked_accounts(self.state) as path:
            stored = read_accounts(path)
            nets = self._load(stored)
            net = _existing(nets, vnet_id)
            if name is not None and any(n.get("name") == name for i, n in nets.items() if i != vnet_id):
                raise V4ApiError(409, 1015, f"a virtual network named {name!r} already exists")  # lab
            if make_default is False and net.get("is_default_network"):
                raise V4ApiError(400, 1016, "the account needs a default virtual network: make another "
                                 "one the default instead")  # lab
            if name is not None:
                net["name"] = name
            if comment is not None:
                net["comment"] = comment
            if make_default:
                for n in nets.values():
                    n["is_default_network"] = False
                net["is_default_network"] = True
            write_accounts(path, stored)
        return success(self._json(vnet_id, net))

    def _delete(self, vnet_id: str, force: bool) -> ApiResponse:
        with locked_accounts(self.state) as path:
            stored = read_accounts(path)
            nets = self._load(stored)
            net = _existing(nets, vnet_id)
            if net.get("is_default_network"):
                raise V4ApiError(400, 1016, "the default virtual network cannot be deleted: make another one "
                                 "the default first")  # lab
        routes = self._routes_in(vnet_id)
        if routes and not force:
            raise V4ApiError(400, 1017, f"virtual network {net.get('name')!r} still has {len(routes)} IP "
                             "route(s): delete them first, or delete with --force")  # lab
        self._drop_routes(routes)
        with locked_accounts(self.state) as path:
            stored = read_accounts(path)
            self._load(stored).pop(vnet_id, None)
            write_accounts(path, stored)
        result = self._json(vnet_id, net)
        result["deleted_at"] = format_time(datetime.datetime.now(datetime.UTC))
        return success(result)


def _existing(nets: Mapping[str, dict[str, Any]], vnet_id: str) -> dict[str, Any]:
    net = nets.get(vnet_id)
    if net is None:
        raise V4ApiError(404, 1002, f"Virtual network {vnet_id} not found")  # lab
    return net


def _check_fields(name: object, comment: object, make_default: object, *, name_required: bool) -> None:
    missing = name is None and name_required
    if missing or (name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME)):
        raise V4ApiError(400, 1001, f"name must be a string of 1 to {MAX_NAME} characters")  # lab
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT):
        raise V4ApiError(400, 1001, f"comment must be a string of at most {MAX_COMMENT} characters")  # lab
    if make_default is not None and not isinstance(make_default, bool):
        raise V4ApiError(400, 1001, "is_default_network must be a boolean")  # lab


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise V4ApiError(400, 1001, "Invalid JSON in the request body") from None  # lab
    if not isinstance(data, dict):
        raise V4ApiError(400, 1001, "the request body must be a JSON object")  # lab
    return data

"""lab/v4vnets.py: virtual networks through the v4 API (`cloudflared tunnel vnet ...`, `route ip --vnet`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tunnel_lab.lab.store import Store
from tunnel_lab.lab.v4api import V4Api
from tunnel_lab.lab.v4base import ApiRequest, ApiResponse, mint_token


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as s:
        yield s


@pytest.fixture
def call(tmp_path: Path, store: Store) -> Any:
    api = V4Api(tmp_path, store)
    token = mint_token(tmp_path)

    def call(method: str, path: str, body: Any = None) -> ApiResponse:
        data = json.dumps(body).encode() if body is not None else b""
        target = f"/client/v4/accounts/{store.account_tag}/teamnet/{path}"
        return api.handle(ApiRequest(method=method, target=target,
                                     headers={"authorization": f"Bearer {token}"}, body=data))

    return call


def code(resp: ApiResponse) -> tuple[int, int]:
    return resp.status, resp.body["errors"][0]["code"]


def vnets(call: Any, query: str = "") -> list[dict[str, Any]]:
    resp = call("GET", "virtual_networks" + query)
    assert resp.status == 200, resp.body
    return list(resp.body["result"])


def test_the_account_has_a_default_network_and_a_new_one_can_take_over(call: Any) -> None:
    [default] = vnets(call)
    assert default["name"] == "default" and default["is_default_network"] is True
    added = call("POST", "virtual_networks",
                 {"name": "staging", "comment": "test", "is_default_network": True})
    assert added.status == 200 and added.body["result"]["is_default_network"] is True
    staging = added.body["result"]["id"]
    assert [v["name"] for v in vnets(call, "?is_default=true")] == ["staging"]
    assert [v["id"] for v in vnets(call, "?name=staging")] == [staging]
    assert vnets(call, f"?id={default['id']}")[0]["is_default_network"] is False
    assert vnets(call, "?is_deleted=true") == []


def test_update_and_delete(call: Any) -> None:
    [default] = vnets(call)
    lab = call("POST", "virtual_networks", {"name": "lab", "comment": ""}).body["result"]
    assert call("PATCH", f"virtual_networks/{lab['id']}", {"name": "lab2", "comment": "c"}).status == 200
    assert [(v["name"], v["comment"]) for v in vnets(call, "?name=lab2")] == [("lab2", "c")]
    # the default cannot be deleted nor stop being the default by itself
    assert code(call("DELETE", f"virtual_networks/{default['id']}")) == (400, 1016)
    undefault = call("PATCH", f"virtual_networks/{default['id']}", {"is_default_network": False})
    assert code(undefault) == (400, 1016)
    assert call("PATCH", f"virtual_networks/{lab['id']}", {"is_default_network": True}).status == 200
    assert call("DELETE", f"virtual_networks/{default['id']}").status == 200
    assert [v["name"] for v in vnets(call)] == ["lab2"]


@pytest.mark.parametrize(("body", "expected"), [
    ({}, (400, 1001)),
    ({"name": ""}, (400, 1001)),
    ({"name": "x", "comment": 3}, (400, 1001)),
    ({"name": "x", "is_default_network": "yes"}, (400, 1001)),
    ({"name": "default"}, (409, 1015)),
])
def test_add_bad_input_writes_nothing(call: Any, body: dict[str, Any], expected: tuple[int, int]) -> None:
    assert code(call("POST", "virtual_networks", body)) == expected
    assert [v["name"] for v in vnets(call)] == ["default"]


def test_routes_in_a_virtual_network(call: Any, store: Store) -> None:
    tunnel = store.create_tunnel("app")
    lab = call("POST", "virtual_networks", {"name": "lab"}).body["result"]["id"]
    added = call("POST", "routes", {"network": "10.5.0.0/16", "tunnel_id": str(tunnel.id),
                                    "virtual_network_id": lab})
    assert added.status == 200 and added.body["result"]["virtual_network_id"] == lab
    plain = call("POST", "routes", {"network": "10.6.0.0/16", "tunnel_id": str(tunnel.id)})
    default = vnets(call, "?is_default=true")[0]["id"]
    assert plain.body["result"]["virtual_network_id"] == default
    # lookups and listings are per virtual network
    found = call("GET", f"routes/ip/10.5.1.1?virtual_network_id={lab}").body["result"]
    assert found["network"] == "10.5.0.0/16"
    assert call("GET", "routes/ip/10.5.1.1").body["result"] == {}
    assert [r["network"] for r in call("GET", f"routes?virtual_network_id={lab}").body["result"]] == [
        "10.5.0.0/16"]
    assert code(call("GET", "routes?virtual_network_id=00000000-0000-4000-8000-000000000000")) == (400, 1001)
    # a network with routes is deleted only with force, and its routes go with it
    assert code(call("DELETE", f"virtual_networks/{lab}")) == (400, 1017)
    assert call("DELETE", f"virtual_networks/{lab}?force=true").status == 200
    assert [r.target for r in store.list_routes("ip")] == ["10.6.0.0/16"]

"""lab/v4teamnet.py: private-network routes through the v4 API (what `cloudflared tunnel route ip` calls)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tunnel_lab.lab.store import Store
from tunnel_lab.lab.v4api import V4Api
from tunnel_lab.lab.v4base import ApiRequest, ApiResponse, mint_token
from tunnel_lab.lab.v4teamnet import route_id


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as s:
        yield s


@pytest.fixture
def call(tmp_path: Path, store: Store) -> Any:
    api = V4Api(tmp_path, store)
    token = mint_token(tmp_path)

    def call(method: str, rest: str = "", body: Any = None, *, raw: bytes | None = None) -> ApiResponse:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        target = f"/client/v4/accounts/{store.account_tag}/teamnet/routes{rest}"
        return api.handle(ApiRequest(method=method, target=target,
                                     headers={"authorization": f"Bearer {token}"}, body=data))

    return call


def code(resp: ApiResponse) -> tuple[int, int]:
    return resp.status, resp.body["errors"][0]["code"]


def test_add_show_get_delete(call: Any, store: Store) -> None:
    tunnel = store.create_tunnel("app")
    added = call("POST", body={"network": "10.1.2.3/16", "tunnel_id": str(tunnel.id), "comment": "office"})
    assert added.status == 200 and added.body["result"]["network"] == "10.1.0.0/16"
    assert added.body["result"]["id"] == route_id("10.1.0.0/16")
    call("POST", body={"network": "10.1.5.0/24", "tunnel_id": str(tunnel.id)})
    shown = call("GET", "?is_deleted=false&tun_types=cfd_tunnel").body
    assert [(r["network"], r["comment"], r["tunnel_name"]) for r in shown["result"]] == [
        ("10.1.0.0/16", "office", "app"), ("10.1.5.0/24", "", "app")]
    assert [r["network"] for r in call("GET", "?comment=office").body["result"]] == ["10.1.0.0/16"]
    # The filters `route ip delete CIDR` uses to find one route: subset and superset of the same network.
    exact = call("GET", "?network_subset=10.1.0.0/16&network_superset=10.1.0.0/16").body["result"]
    assert [r["network"] for r in exact] == ["10.1.0.0/16"]
    assert [r["network"] for r in call("GET", "?network_superset=10.1.5.7/32").body["result"]] == [
        "10.1.0.0/16", "10.1.5.0/24"]
    assert call("GET", "/ip/10.1.5.9").body["result"]["network"] == "10.1.5.0/24"
    assert call("GET", "/ip/192.0.2.1").body["result"] == {}
    gone = call("DELETE", "/" + route_id("10.1.0.0/16"))
    assert gone.status == 200 and gone.body["result"]["deleted_at"]
    assert [r["network"] for r in call("GET").body["result"]] == ["10.1.5.0/24"]
    assert store.resolve_ip("10.1.9.9") is None


@pytest.mark.parametrize(("body", "expected"), [
    ({"network": "10.0.0.0/8"}, (400, 1001)),
    ({"network": "not-a-net", "tunnel_id": "T"}, (400, 1001)),
    ({"network": "10.0.0.0/8", "tunnel_id": str(uuid.UUID(int=3))}, (404, 1002)),
    ({"network": "10.0.0.0/8", "tunnel_id": "T", "virtual_network_id": str(uuid.UUID(int=4))}, (400, 1001)),
    ({"network": "10.0.0.0/8", "tunnel_id": "T", "comment": "x" * 101}, (400, 1001)),
    ({"network": "10.0.0.0/8", "tunnel_id": "T", "comment": 5}, (400, 1001)),
])
def test_add_bad_input_writes_nothing(call: Any, store: Store, body: dict[str, Any],
                                      expected: tuple[int, int]) -> None:
    tunnel = store.create_tunnel("app")
    if body.get("tunnel_id") == "T":
        body["tunnel_id"] = str(tunnel.id)
    assert code(call("POST", body=body)) == expected
    assert store.list_routes("ip") == []


def test_duplicate_and_malformed(call: Any, store: Store) -> None:
    tunnel = store.create_tunnel("app")
    assert call("POST", body={"network": "10.0.0.0/8", "tunnel_id": str(tunnel.id)}).status == 200
    assert code(call("POST", body={"network": "10.0.0.0/8", "tunnel_id": str(tunnel.id)})) == (409, 1014)
    assert code(call("POST", raw=b"{nope")) == (400, 1001)
    assert code(call("DELETE", "/" + str(uuid.UUID(int=9)))) == (404, 1002)
    assert code(call("GET", "/ip/not-an-ip")) == (400, 1001)
    assert code(call("GET", "?network_subset=bogus")) == (400, 1001)
    assert code(call("PUT")) == (405, 7001)
    assert code(call("GET", "/a/b/c")) == (400, 7003)

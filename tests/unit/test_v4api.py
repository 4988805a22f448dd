"""lab/v4api.py: the tunnel endpoints of the lab's v4 API, good and bad input (no sockets)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tunnel_lab.lab.login import origin_cert_pem
from tunnel_lab.lab.quicktunnel import create_quick_tunnel
from tunnel_lab.lab.store import Store
from tunnel_lab.lab.v4api import LiveConnection, V4Api, parse_live
from tunnel_lab.lab.v4base import ApiRequest, ApiResponse, V4ApiError, load_accounts, mint_token
from tunnel_lab.wire.credentials import parse_token

SECRET = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as s:
        yield s


@pytest.fixture
def api(tmp_path: Path, store: Store) -> V4Api:
    return V4Api(tmp_path, store)


@pytest.fixture
def token(tmp_path: Path) -> str:
    return mint_token(tmp_path)


class Client:
    def __init__(self, api: V4Api, token: str | None, live: tuple[LiveConnection, ...] = ()) -> None:
        self.api = api
        self.token = token
        self.live = live
        self.account = api.store.account_tag
        self.zone = load_accounts(api.state).zone_tag

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> ApiResponse:
        sent = dict(headers or {})
        if self.token is not None:
            sent.setdefault("authorization", f"Bearer {self.token}")
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        return self.api.handle(ApiRequest(method=method, target="/client/v4" + path, headers=sent, body=data),
                               self.live)

    def tunnels(self, suffix: str = "") -> str:
        return f"/accounts/{self.account}/cfd_tunnel{suffix}"

    def create(self, name: str = "app") -> dict[str, Any]:
        resp = self.call("POST", self.tunnels(), {"name": name, "tunnel_secret": SECRET})
        assert resp.status == 200, resp.body
        result: dict[str, Any] = resp.body["result"]
        return result


@pytest.fixture
def client(api: V4Api, token: str) -> Client:
    return Client(api, token)


def error(resp: ApiResponse) -> tuple[int, int, str]:
    assert resp.body["success"] is False and resp.body["result"] is None
    (err,) = resp.body["errors"]
    return resp.status, err["code"], err["message"]


def test_create_stores_the_secret_the_connector_will_present(client: Client, store: Store) -> None:
    result = client.create("app")
    tunnel = store.require_tunnel("app")
    assert result["id"] == str(tunnel.id) and result["name"] == "app"
    assert result["deleted_at"] is None and result["connections"] == []
    assert result["created_at"].endswith("Z")
    assert tunnel.secret == bytes(range(32)) and tunnel.account_tag == client.account
    assert parse_token(result["token"]).tunnel_secret == bytes(range(32))


def test_list_filters_and_pages(client: Client) -> None:
    for name in ("a1", "a2", "b1"):
        client.create(name)
    resp = client.call("GET", client.tunnels("?is_deleted=false&name=a2"))
    assert [t["name"] for t in resp.body["result"]] == ["a2"]
    resp = client.call("GET", client.tunnels("?name_prefix=a&per_page=1&page=2"))
    assert [t["name"] for t in resp.body["result"]] == ["a2"]
    assert resp.body["result_info"] == {"page": 2, "per_page": 1, "count": 1, "total_count": 2}
    past = client.call("GET", client.tunnels("?per_page=2&page=9"))
    assert past.status == 200 and past.body["result"] == []
    assert past.body["result_info"] == {"page": 9, "per_page": 2, "count": 0, "total_count": 3}
    assert client.call("GET", client.tunnels("?is_deleted=true")).body["result"] == []


def test_get_token_delete(client: Client, store: Store) -> None:
    created = client.create()
    one = client.call("GET", client.tunnels(f"/{created['id']}"))
    assert one.body["result"]["name"] == "app"
    token = client.call("GET", client.tunnels(f"/{created['id']}/token")).body["result"]
    assert isinstance(token, str) and str(parse_token(token).tunnel_id) == created["id"]
    gone = client.call("DELETE", client.tunnels(f"/{created['id']}"))
    assert gone.status == 200 and gone.body["result"]["deleted_at"]
    assert store.get_tunnel("app") is None
    assert error(client.call("GET", client.tunnels(f"/{created['id']}")))[:2] == (404, 1002)


def live_for(tunnel_id: str, connector: str = "c1", index: int = 0, edge_id: str = "") -> LiveConnection:
    return LiveConnection(tunnel_id=tunnel_id, connector_id=connector, conn_index=index, edge_id=edge_id,
                          location="LAB1",
                          remote="127.0.0.1:40000", client_version="2026.8.2", arch="linux_amd64",
                          features=("serialized_headers",), registered_at=1_800_000_000.0)


def test_connections_are_grouped_by_connector(api: V4Api, token: str, client: Client) -> None:
    tid = client.create()["id"]
    live = (live_for(tid, "c1", 0), live_for(tid, "c1", 1), live_for(str(uuid.uuid4()), "c9"))
    resp = Client(api, token, live).call("GET", client.tunnels(f"/{tid}/connections"))
    (active,) = resp.body["result"]
    assert active["id"] == "c1" and active["version"] == "2026.8.2" and len(active["conns"]) == 2
    conn = active["conns"][0]
    assert uuid.UUID(conn["id"]) and conn["origin_ip"] == "127.0.0.1" and conn["colo_name"] == "LAB1"
    assert conn["opened_at"] == "2027-01-15T08:00:00Z"
    listed = Client(api, token, live).call("GET", client.tunnels()).body["result"][0]
    assert listed["status"] == "healthy" and len(listed["connections"]) == 2


def test_delete_with_live_connections_needs_cascade(api: V4Api, token: str, client: Client,
                                                     store: Store) -> None:
    tid = client.create()["id"]
    busy = Client(api, token, (live_for(tid, edge_id="e1"),))
    assert error(busy.call("DELETE", client.tunnels(f"/{tid}")))[:2] == (400, 1022)
    assert store.get_tunnel("app") is not None  # nothing half-done
    gone = busy.call("DELETE", client.tunnels(f"/{tid}?cascade=true"))
    assert gone.status == 200 and gone.disconnect == ("e1",)
    assert store.get_tunnel("app") is None


def test_cleanup_names_the_connections_to_drop(api: V4Api, token: str, client: Client) -> None:
    tid = client.create()["id"]
    idle = client.call("DELETE", client.tunnels(f"/{tid}/connections"))
    assert idle.body["success"] is True and idle.disconnect == ()
    live = (live_for(tid, "c1", 0, "e1"), live_for(tid, "c1", 1, "e2"), live_for(tid, "c2", 0, "e3"),
            live_for(str(uuid.uuid4()), "c1", 0, "elsewhere"))
    busy = Client(api, token, live)
    assert busy.call("DELETE", client.tunnels(f"/{tid}/connections?client_id=other")).disconnect == ()
    assert busy.call("DELETE", client.tunnels(f"/{tid}/connections?client_id=c1")).disconnect == ("e1", "e2")
    assert busy.call("DELETE", client.tunnels(f"/{tid}/connections")).disconnect == ("e1", "e2", "e3")


def test_route_dns_new_unchanged_overwrite_and_conflict(client: Client, store: Store) -> None:
    one, two = client.create("one")["id"], client.create("two")["id"]

    def route(tid: str, host: str, overwrite: bool = False) -> ApiResponse:
        return client.call("PUT", f"/zones/{client.zone}/tunnels/{tid}/routes",
                           {"type": "dns", "user_hostname": host, "overwrite_existing": overwrite})

    assert route(one, "App.Example.com").body["result"] == {"cname": "new", "name": "app.example.com"}
    assert route(one, "app.example.com").body["result"]["cname"] == "unchanged"
    status, code, message = error(route(two, "app.example.com"))
    assert (status, code) == (400, 1003) and "already exists" in message
    assert store.resolve_hostname("app.example.com").name == "one"  # type: ignore[union-attr]
    assert route(two, "app.example.com", True).body["result"]["cname"] == "new"
    assert store.resolve_hostname("app.example.com").name == "two"  # type: ignore[union-attr]
    assert error(route(one, "not a host"))[:2] == (400, 1001)


def test_lb_routes_answer_what_changed_as_cfapi_reads_it(client: Client, store: Store) -> None:
    one, two, three = (client.create(n)["id"] for n in ("one", "two", "three"))

    def lb(tid: str, name: str, pool: str) -> ApiResponse:
        return client.call("PUT", f"/zones/{client.zone}/tunnels/{tid}/routes",
                           {"type": "lb", "lb_name": name, "lb_pool": pool})

    def changed(resp: ApiResponse) -> tuple[str, str]:
        assert resp.status == 200, resp.body
        return resp.body["result"]["load_balancer"], resp.body["result"]["pool"]

    assert changed(lb(one, "LB.example.com", "pool-a")) == ("new", "new")
    assert changed(lb(one, "lb.example.com", "pool-a")) == ("unchanged", "unchanged")
    assert changed(lb(two, "lb.example.com", "pool-a")) == ("unchanged", "updated")
    assert changed(lb(three, "lb.example.com", "pool-b")) == ("updated", "new")
    assert changed(lb(one, "lb.example.com", "pool-b")) == ("unchanged", "updated")
    assert changed(lb(two, "other.example.com", "pool-a")) == ("new", "unchanged")
    assert changed(lb(three, "third.example.com", "pool-a")) == ("new", "updated")
    assert changed(lb(one, "fourth.example.com", "pool-c")) == ("new", "new")
    assert changed(lb(one, "fourth.example.com", "pool-b")) == ("updated", "unchanged")
    pools = store.load_balancer("lb.example.com:443")
    assert pools is not None
    assert [[t.name for t in pool] for pool in pools] == [["one", "two", "three"], ["three", "one"]]
    assert store.is_routed("lb.example.com") and store.resolve_hostname("lb.example.com") is None


def test_lb_route_bad_input_and_conflicts_write_nothing(client: Client, store: Store) -> None:
    one = client.create("one")["id"]
    path = f"/zones/{client.zone}/tunnels/{one}/routes"
    client.call("PUT", path, {"type": "dns", "user_hostname": "app.example.com"})
    client.call("PUT", path, {"type": "lb", "lb_name": "lb.example.com", "lb_pool": "p"})
    before = store.version()
    for body in ({"type": "lb", "lb_name": "lb.example.com"}, {"type": "lb", "lb_pool": "p"},
                 {"type": "lb", "lb_name": 5, "lb_pool": "p"}, {"type": "lb", "lb_name": "", "lb_pool": "p"},
                 {"type": "lb", "lb_name": "not a host", "lb_pool": "p"},
                 {"type": "lb", "lb_name": "*.example.com", "lb_pool": "p"},
                 {"type": "lb", "lb_name": "x.example.com", "lb_pool": "-bad"},
                 {"type": "lb", "lb_name": "x.example.com", "lb_pool": "has space"}):
        assert error(client.call("PUT", path, body))[:2] == (400, 1001), body
    assert error(client.call("PUT", path, raw=b'{"type": "lb",'))[:2] == (400, 1001)
    # A hostname is a DNS route or a load balancer, never both, whichever came first.
    status, code, message = error(client.call("PUT", path, {"type": "lb", "lb_name": "app.example.com",
                                                             "lb_pool": "p"}))
    assert (status, code) == (400, 1003) and "already exists" in message
    for overwrite in (False, True):
        status, code, message = error(client.call("PUT", path, {
            "type": "dns", "user_hostname": "lb.example.com", "overwrite_existing": overwrite}))
        assert (status, code) == (400, 1003) and "load balancer" in message
    assert store.version() == before
    other = client.call("PUT", f"/zones/{client.zone}/tunnels/{uuid.uuid4()}/routes",
                        {"type": "lb", "lb_name": "x.example.com", "lb_pool": "p"})
    assert error(other)[:2] == (404, 1002)
    wrong_zone = client.call("PUT", f"/zones/{'0' * 32}/tunnels/{one}/routes",
                             {"type": "lb", "lb_name": "x.example.com", "lb_pool": "p"})
    assert error(wrong_zone)[:2] == (403, 10000)
    assert Client(client.api, "lab-wrong").call("PUT", path, {
        "type": "lb", "lb_name": "x.example.com", "lb_pool": "p"}).status == 403
    assert store.version() == before


def test_deleting_a_tunnel_takes_it_out_of_its_pools(client: Client, store: Store) -> None:
    one, two = (client.create(n)["id"] for n in ("one", "two"))
    for tid in (one, two):
        client.call("PUT", f"/zones/{client.zone}/tunnels/{tid}/routes",
                    {"type": "lb", "lb_name": "lb.example.com", "lb_pool": "p"})
    assert client.call("DELETE", client.tunnels(f"/{one}")).status == 200
    pools = store.load_balancer("lb.example.com")
    assert pools is not None and [[t.name for t in p] for p in pools] == [["two"]]


@pytest.mark.parametrize(("headers", "token", "expected"), [
    ({}, None, (400, 9106)),
    ({"authorization": "Basic abc"}, None, (400, 6003)),
    ({"authorization": "Bearer "}, None, (400, 6003)),
    ({}, "lab-not-a-token", (403, 10000)),
])
def test_authentication(api: V4Api, client: Client, headers: dict[str, str], token: str | None,
                        expected: tuple[int, int]) -> None:
    resp = Client(api, token).call("GET", client.tunnels(), headers=headers)
    assert error(resp)[:2] == expected


def test_another_account_or_zone_is_refused(client: Client) -> None:
    assert error(client.call("GET", "/accounts/" + "0" * 32 + "/cfd_tunnel"))[:2] == (403, 10000)
    tid = client.create()["id"]
    assert error(client.call("PUT", f"/zones/{'0' * 32}/tunnels/{tid}/routes",
                             {"type": "dns", "user_hostname": "a.b"}))[:2] == (403, 10000)


@pytest.mark.parametrize(("raw", "what"), [
    (b"{", "Invalid JSON in the request body at byte 1"),
    (b"[]", "must be a JSON object"),
    (b'{"name": 5, "tunnel_secret": "x"}', "name is required"),
    (b'{"name": "app"}', "tunnel_secret is required"),
    (b'{"name": "app", "tunnel_secret": "!!"}', "not standard base64"),
    (b'{"name": "app", "tunnel_secret": "YWJj"}', "at least 32 bytes"),
    (b'{"name": "a b", "tunnel_secret": "' + SECRET.encode() + b'"}', "invalid tunnel name"),
    (b'{"name": "' + str(uuid.uuid4()).encode() + b'", "tunnel_secret": "' + SECRET.encode() + b'"}',
     "a UUID cannot be a tunnel name"),
])
def test_create_bad_input_writes_nothing(client: Client, store: Store, raw: bytes, what: str) -> None:
    status, _code, message = error(client.call("POST", client.tunnels(), raw=raw))
    assert status == 400 and what in message
    assert store.list_tunnels() == []


def test_create_duplicate_name_is_409_1013(client: Client, store: Store) -> None:
    client.create("app")
    again = client.call("POST", client.tunnels(), {"name": "app", "tunnel_secret": SECRET})
    status, code, message = error(again)
    assert (status, code) == (409, 1013) and "already have a tunnel with this name" in message
    assert len(store.list_tunnels()) == 1


def test_unknown_fields_are_ignored(client: Client) -> None:
    resp = client.call("POST", client.tunnels(), {"name": "x", "tunnel_secret": SECRET, "config_src": "local",
                                                   "surprise": [1]})
    assert resp.status == 200


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/nowhere", (400, 7003)),
    ("PATCH", "/accounts/{a}/cfd_tunnel", (405, 7001)),
    ("GET", "/accounts/{a}/cfd_tunnel/not-a-uuid", (400, 7003)),
    ("GET", "/accounts/{a}/cfd_tunnel/" + str(uuid.UUID(int=1)), (404, 1002)),
    ("GET", "/accounts/{a}/cfd_tunnel?page=0", (400, 1001)),
    ("GET", "/accounts/{a}/cfd_tunnel?per_page=5000", (400, 1001)),
    ("GET", "/accounts/{a}/cfd_tunnel?existed_at=yesterday", (400, 1001)),
])
def test_routes_and_parameters(client: Client, method: str, path: str, expected: tuple[int, int]) -> None:
    assert error(client.call(method, path.replace("{a}", client.account)))[:2] == expected


def test_outside_the_prefix(api: V4Api) -> None:
    resp = api.handle(ApiRequest(method="GET", target="/"))
    assert error(resp)[:2] == (400, 7003)


def test_tokens_are_kept_as_hashes(tmp_path: Path) -> None:
    token = mint_token(tmp_path)
    text = (tmp_path / "v4api.json").read_text()
    assert token not in text and load_accounts(tmp_path).knows(token)
    assert not load_accounts(tmp_path).knows(token + "x")


def test_corrupt_accounts_file_is_a_clear_error(tmp_path: Path, store: Store) -> None:
    (tmp_path / "v4api.json").write_text("{nope")
    resp = V4Api(tmp_path, store).handle(ApiRequest(method="GET", target="/client/v4/accounts/x/cfd_tunnel",
                                                    headers={"authorization": "Bearer t"}))
    status, _code, message = error(resp)
    assert status == 500 and "API accounts" in message and "delete it to start over" in message


def test_parse_live_skips_junk() -> None:
    good = {"tunnel_id": str(uuid.UUID(int=5)), "connector_id": "c", "conn_index": 1, "location": "LAB1",
            "remote": "[::1]:5", "registered_at": 0, "id": "7"}
    junk = [{"tunnel_id": None}, 7, {"tunnel_id": "t", "conn_index": "x"}]
    lives = parse_live(json.dumps([good, *junk]).encode())
    assert [(c.origin_ip, c.edge_id) for c in lives] == [("::1", "7")]
    assert parse_live(b"not json") == []


def test_origin_cert_pem_is_what_cloudflared_decodes() -> None:
    pem = origin_cert_pem(zone_id="z" * 32, account_id="a" * 32, api_token="t" * 80).decode()
    lines = pem.splitlines()
    assert lines[0] == "-----BEGIN ARGO TUNNEL TOKEN-----" and lines[-1] == "-----END ARGO TUNNEL TOKEN-----"
    assert all(len(line) <= 64 for line in lines[1:-1]) and len(lines[1]) == 64
    assert json.loads(base64.b64decode("".join(lines[1:-1]))) == {
        "zoneID": "z" * 32, "accountID": "a" * 32, "apiToken": "t" * 80}


def test_quick_tunnel_is_created_and_routed(store: Store) -> None:
    resp = create_quick_tunnel(store)
    result = resp.body["result"]
    assert resp.status == 200 and resp.body["success"] is True
    assert result["hostname"].endswith(".trycloudflare.com") and result["name"].startswith("quick-")
    tunnel = store.resolve_hostname(result["hostname"])
    assert tunnel is not None and str(tunnel.id) == result["id"]
    assert base64.b64decode(result["secret"]) == tunnel.secret and result["account_tag"] == tunnel.account_tag


def test_quick_tunnels_are_bounded(store: Store) -> None:
    create_quick_tunnel(store, limit=2)
    create_quick_tunnel(store, limit=2)
    with pytest.raises(V4ApiError) as info:
        create_quick_tunnel(store, limit=2)
    assert info.value.status == 429 and len(store.list_tunnels()) == 2


# --- remote configurations and management tokens -------------------------------------------------------

CONFIG = {"ingress": [{"hostname": "app.example.com", "service": "http://localhost:8000"},
                      {"service": "http_status:404"}],
          "warp-routing": {"enabled": False}}


def test_configuration_put_versions_and_asks_for_a_push(client: Client) -> None:
    tunnel = client.create()
    path = client.tunnels(f"/{tunnel['id']}/configurations")
    empty = client.call("GET", path)
    assert empty.status == 200 and empty.body["result"]["config"] is None
    assert client.call("GET", client.tunnels(f"/{tunnel['id']}")).body["result"]["remote_config"] is False
    first = client.call("PUT", path, {"config": CONFIG})
    assert first.status == 200, first.body
    assert first.body["result"]["version"] == 1 and first.body["result"]["config"] == CONFIG
    assert first.body["result"]["tunnel_id"] == tunnel["id"]
    assert first.body["result"]["source"] == "cloudflare"
    assert first.push == {"tunnel_id": tunnel["id"], "version": 1, "config": CONFIG}
    second = client.call("PUT", path, {"config": {"ingress": [{"service": "http_status:503"}]}})
    assert second.body["result"]["version"] == 2 and second.push is not None and second.push["version"] == 2
    got = client.call("GET", path).body["result"]
    assert got["version"] == 2 and got["config"] == {"ingress": [{"service": "http_status:503"}]}
    assert client.call("GET", client.tunnels(f"/{tunnel['id']}")).body["result"]["remote_config"] is True
    # deleting the tunnel forgets its configuration
    assert client.call("DELETE", client.tunnels(f"/{tunnel['id']}")).status == 200
    assert client.api.configs.get(tunnel["id"]) is None


@pytest.mark.parametrize(("config", "where"), [
    ("text", "config"),
    ({"ingress": {"service": "x"}}, "config.ingress"),
    ({"ingress": [{"hostname": "a.example.com"}, {"service": "http_status:404"}]},
     "config.ingress[0].service"),
    ({"ingress": [{"hostname": "a.example.com", "service": "http://x"}]}, "config.ingress[0]"),
    ({"ingress": [{"service": "http://x", "path": "^/api"}]}, "config.ingress[0]"),
    ({"ingress": [{"service": "http://x"}], "originRequest": []}, "config.originRequest"),
])
def test_configuration_bad_input_says_where_and_keeps_the_old_version(client: Client, config: Any,
                                                                       where: str) -> None:
    tunnel = client.create()
    path = client.tunnels(f"/{tunnel['id']}/configurations")
    assert client.call("PUT", path, {"config": CONFIG}).status == 200
    resp = client.call("PUT", path, {"config": config})
    status, code, message = error(resp)
    assert (status, code) == (400, 1001) and message.startswith(where + ":"), message
    assert resp.push is None and client.call("GET", path).body["result"]["version"] == 1


def test_configuration_of_an_unknown_tunnel_and_bad_json(client: Client) -> None:
    missing = client.tunnels(f"/{uuid.uuid4()}/configurations")
    assert error(client.call("PUT", missing, {"config": CONFIG}))[:2] == (404, 1002)
    tunnel = client.create()
    assert error(client.call("PUT", client.tunnels(f"/{tunnel['id']}/configurations"), raw=b"{"))[:2] == (
        400, 1001)
    wrong = client.call("POST", client.tunnels(f"/{tunnel['id']}/configurations"), {})
    assert error(wrong)[:2] == (405, 7001)


def test_management_token_is_an_es256_jwt_the_edge_accepts(client: Client, tmp_path: Path) -> None:
    import time

    from tunnel_lab.lab.remote_config import management_key
    from tunnel_lab.wire import mgmt_token

    tunnel = client.create()
    resp = client.call("POST", client.tunnels(f"/{tunnel['id']}/management/logs"))
    assert resp.status == 200, resp.body
    token = resp.body["result"]
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == "ES256"  # the only algorithm cloudflared's management.ParseToken accepts
    claims = mgmt_token.verify(token, management_key(tmp_path).public_key(), now=time.time())
    assert (claims.tunnel_id, claims.account_tag, claims.resource) == (tunnel["id"], client.account, "logs")
    assert claims.actor
    # another login is another actor; the same login is the same actor
    public = management_key(tmp_path).public_key()
    again = client.call("POST", client.tunnels(f"/{tunnel['id']}/management/logs")).body["result"]
    assert mgmt_token.verify(again, public, now=time.time()).actor == claims.actor
    other = Client(client.api, mint_token(tmp_path))
    theirs = other.call("POST", client.tunnels(f"/{tunnel['id']}/management/logs")).body["result"]
    assert mgmt_token.verify(theirs, public, now=time.time()).actor != claims.actor
    assert error(client.call("POST", client.tunnels(f"/{tunnel['id']}/management/shell")))[:2] == (400, 7003)
    assert error(client.call("GET", client.tunnels(f"/{tunnel['id']}/management/logs")))[:2] == (405, 7001)
    assert error(Client(client.api, None).call(
        "POST", client.tunnels(f"/{tunnel['id']}/management/logs")))[:2] == (400, 9106)

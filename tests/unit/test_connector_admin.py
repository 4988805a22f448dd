"""connector.admin: cloudflared's admin commands against a scripted API (no sockets).

`FakeApi` answers the requests cfapi builds as the lab's v4 API would, and records them, so each test
checks both sides: what was sent (method, URL, headers, body) and what the user sees (stdout, the log
lines, files, the exit code).
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tunnel_lab.connector import admin, cfapi
from tunnel_lab.wire import credentials as wc
from tunnel_lab.wire.origin_cert import OriginCert, encode_origin_cert

TID = uuid.UUID("11111111-2222-4333-8444-555555555555")
OTHER = uuid.UUID("66666666-7777-4888-8999-000000000000")
CONNECTOR = uuid.UUID("aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee")
API = "https://api.example/client/v4"
Handler = Callable[[cfapi.ApiRequest], cfapi.ApiResponse]


def ok(result: Any, **info: int) -> cfapi.ApiResponse:
    doc: dict[str, Any] = {"success": True, "errors": [], "messages": [], "result": result}
    if info:
        doc["result_info"] = info
    return cfapi.ApiResponse(200, "application/json", json.dumps(doc).encode())


def fail(status: int, code: int, message: str) -> cfapi.ApiResponse:
    doc = {"success": False, "errors": [{"code": code, "message": message}], "messages": [], "result": None}
    return cfapi.ApiResponse(status, "application/json", json.dumps(doc).encode())


def tunnel_json(
    tid: uuid.UUID = TID, name: str = "app", conns: int = 0, deleted: str | None = None
) -> dict[str, Any]:
    return {
        "id": str(tid),
        "name": name,
        "created_at": "2026-12-04T20:03:40Z",
        "deleted_at": deleted,
        "connections": [
            {
                "colo_name": f"LAB{i % 2 + 1}",
                "id": str(uuid.uuid4()),
                "is_pending_reconnect": False,
                "origin_ip": "127.0.0.1",
                "opened_at": "2026-12-04T20:03:41Z",
            }
            for i in range(conns)
        ],
    }


class FakeApi:
    """Routes (method, path) to handlers; records every request with its headers."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.sent: list[tuple[cfapi.ApiRequest, dict[str, str]]] = []

    def on(self, method: str, path: str, handler: Handler | cfapi.ApiResponse) -> None:
        self.routes[(method, path)] = handler if callable(handler) else (lambda _req, r=handler: r)

    def __call__(self, req: cfapi.ApiRequest, headers: dict[str, str], timeout: float) -> cfapi.ApiResponse:
        self.sent.append((req, headers))
        path = req.url.removeprefix(API).split("?", 1)[0]
        handler = self.routes.get((req.method, path))
        if handler is None:
            return fail(404, 1002, f"no route {req.method} {path}")
        return handler(req)

    def urls(self) -> list[str]:
        return [f"{r.method} {r.url.removeprefix(API)}" for r, _ in self.sent]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("TUNNEL_CRED_FILE", "TUNNEL_ORIGIN_CERT", "TUNNEL_LIST_SORT_BY", "TUNNEL_CREATE_SECRET"):
        monkeypatch.delenv(name, raising=False)
    cert_dir = tmp_path / ".cloudflared"
    cert_dir.mkdir()
    (cert_dir / "cert.pem").write_bytes(encode_origin_cert(OriginCert("ZONE", "ACCT", "TOKEN")))
    return tmp_path


def run(api: FakeApi, *words: str, tunnel: dict[str, Any] | None = None) -> tuple[int, str]:
    inv = admin.parse_invocation(list(words), {"api-url": API, **(tunnel or {})}, env={})
    assert inv is not None
    out = io.StringIO()
    code = admin.run(inv, prog="tunnel-lab connector", out=out, transport=api)
    return code, out.getvalue()


def by_name(*tunnels: dict[str, Any]) -> Handler:
    def handler(req: cfapi.ApiRequest) -> cfapi.ApiResponse:
        query = req.url.split("?", 1)[1]
        found = [
            t
            for t in tunnels
            if f"name={t['name']}&" in query + "&"
            or f"uuid={t['id']}" in query
            or ("name=" not in query and "uuid=" not in query)
        ]
        return ok(found, count=len(found), per_page=20, total_count=len(found))

    return handler


def test_create_sends_the_secret_and_writes_the_credentials_file(home: Path) -> None:
    api = FakeApi()
    api.on("POST", "/accounts/ACCT/cfd_tunnel", lambda req: ok({**tunnel_json(), "token": "tok"}))
    code, out = run(api, "create", "app")
    assert code == 0
    req, headers = api.sent[0]
    assert headers["Authorization"] == "Bearer TOKEN" and headers["Accept"] == "application/json;version=1"
    assert headers["Content-Type"] == "application/json"
    secret = json.loads(req.body or b"")["tunnel_secret"]
    path = home / ".cloudflared" / f"{TID}.json"
    assert out == (
        f"Tunnel credentials written to {path}. cloudflared chose this file based on where your origin "
        "certificate was found. Keep this file secret. To revoke these credentials, delete the tunnel.\n"
        f"\nCreated tunnel app with id {TID}\n"
    )
    creds = wc.parse_credentials_file(path.read_text(), str(path))
    assert (creds.account_tag, creds.tunnel_id) == ("ACCT", TID)
    assert wc.credentials_json(creds) == path.read_text() and secret in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o400


def test_create_conflict_and_a_file_that_exists(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeApi()
    api.on("POST", "/accounts/ACCT/cfd_tunnel", fail(409, 1013, "dup"))
    assert run(api, "create", "app")[0] == 1
    assert (
        capsys.readouterr().err
        == "failed to create tunnel: Create Tunnel API call failed: tunnel with name already exists\n"
    )
    api.on("POST", "/accounts/ACCT/cfd_tunnel", ok(tunnel_json()))
    api.on("DELETE", f"/accounts/ACCT/cfd_tunnel/{TID}", ok(None))
    taken = home / "taken.json"
    taken.write_text("{}")
    assert run(api, "create", "--cred-file", str(taken), "app")[0] == 1
    err = capsys.readouterr().err
    assert f"The file-writing error is: {taken} already exists" in err
    assert "The tunnel was deleted, because the tunnel can't be run without the credentials file" in err
    assert api.urls()[-1] == f"DELETE /accounts/ACCT/cfd_tunnel/{TID}?cascade=true"


def test_usage_errors_exit_255(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(FakeApi(), "create")[0] == admin.USAGE_EXIT
    assert capsys.readouterr().err == (
        '"cloudflared tunnel create" requires exactly 1 argument, the name of tunnel '
        "to create.\nSee 'tunnel-lab connector tunnel create --help'.\n"
    )
    assert run(FakeApi(), "route", "dns", "x")[0] == admin.USAGE_EXIT
    assert "See 'tunnel-lab connector route dns --help'." in capsys.readouterr().err


def test_list_pages_until_the_total_and_prints_the_table(home: Path) -> None:
    api = FakeApi()
    pages = {1: [tunnel_json(TID, "b", conns=3)], 2: [tunnel_json(OTHER, "a")]}

    def page(req: cfapi.ApiRequest) -> cfapi.ApiResponse:
        n = int(req.url.rsplit("page=", 1)[1].split("&")[0])
        return ok(pages[n], count=1, per_page=1, total_count=2)

    api.on("GET", "/accounts/ACCT/cfd_tunnel", page)
    code, out = run(api, "list")
    assert code == 0
    assert api.urls() == [
        "GET /accounts/ACCT/cfd_tunnel?is_deleted=false&page=1",
        "GET /accounts/ACCT/cfd_tunnel?is_deleted=false&page=2",
    ]
    assert out.splitlines() == [
        "You can obtain more detailed information for each tunnel with `cloudflared tunnel info <name/uuid>`",
        "ID                                   NAME CREATED              CONNECTIONS    ",
        f"{OTHER} a    2026-12-04T20:03:40Z                ",
        f"{TID} b    2026-12-04T20:03:40Z 2xLAB1, 1xLAB2 ",
    ]


def test_list_json_and_empty(home: Path) -> None:
    api = FakeApi()
    api.on("GET", "/accounts/ACCT/cfd_tunnel", ok([], count=0, per_page=20, total_count=0))
    assert run(api, "list", "-o", "json") == (0, "null\n")
    assert run(api, "list")[1].startswith("No tunnels were found for the given filter flags.")
    api.on("GET", "/accounts/ACCT/cfd_tunnel", ok([tunnel_json()], count=1, per_page=20, total_count=1))
    doc = json.loads(run(api, "list", "--output=json")[1])
    assert doc[0]["id"] == str(TID) and doc[0]["deleted_at"] == "0001-01-01T00:00:00Z"


def test_list_reports_api_errors_with_the_page(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeApi()
    api.on("GET", "/accounts/ACCT/cfd_tunnel", fail(403, 10000, "Authentication error"))
    assert run(api, "list")[0] == 1
    assert capsys.readouterr().err == (
        "Error Parsing page 1: REST request failed: Failed to list tunnels: code: "
        "10000, reason: Authentication error\n"
    )


def test_info_by_name(home: Path) -> None:
    api = FakeApi()
    api.on("GET", "/accounts/ACCT/cfd_tunnel", by_name(tunnel_json()))
    client = {
        "id": str(CONNECTOR),
        "features": [],
        "version": "2026.8.2",
        "arch": "linux_amd64",
        "run_at": "2026-12-04T20:05:00Z",
        "conns": tunnel_json(conns=2)["connections"],
    }
    api.on("GET", f"/accounts/ACCT/cfd_tunnel/{TID}/connections", ok([client]))
    code, out = run(api, "info", "app")
    assert code == 0
    assert out.splitlines() == [
        "NAME:     app",
        f"ID:       {TID}",
        "CREATED:  2026-12-04 20:03:40 +0000 UTC",
        "",
        "CONNECTOR ID                         CREATED              ARCHITECTURE VERSION  ORIGIN IP "
        "EDGE           ",
        f"{CONNECTOR} 2026-12-04T20:05:00Z linux_amd64  2026.8.2 127.0.0.1 1xLAB1, 1xLAB2 ",
    ]
    api.on("GET", f"/accounts/ACCT/cfd_tunnel/{TID}/connections", ok([]))
    assert run(api, "info", str(TID))[1] == f"Your tunnel {TID} does not have any active connection.\n"


def test_names_that_are_no_tunnel(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeApi()
    api.on("GET", "/accounts/ACCT/cfd_tunnel", by_name())
    assert run(api, "token", "nope")[0] == 1
    assert (
        capsys.readouterr().err
        == "error parsing tunnel ID: nope is neither the ID nor the name of any of your "
        "tunnels\n"
    )
    assert run(api, "delete", "nope")[0] == 1
    assert capsys.readouterr().err == "there should only be 1 non-deleted Tunnel named nope\n"


def test_delete_removes_the_credentials_file(home: Path) -> None:
    api = FakeApi()
    api.on("GET", f"/accounts/ACCT/cfd_tunnel/{TID}", ok(tunnel_json()))
    api.on("DELETE", f"/accounts/ACCT/cfd_tunnel/{TID}", ok(None))
    creds = home / ".cloudflared" / f"{TID}.json"
    creds.write_text("{}")
    assert run(api, "delete", "-f", str(TID)) == (0, "")
    assert not creds.exists() and api.urls()[-1].endswith("?cascade=true")
    api.on("GET", f"/accounts/ACCT/cfd_tunnel/{TID}", ok(tunnel_json(deleted="2026-12-04T21:00:00Z")))
    assert run(api, "delete", str(TID))[0] == 1


def test_cleanup_logs_and_never_fails(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    api = FakeApi()
    api.on("DELETE", f"/accounts/ACCT/cfd_tunnel/{TID}/connections", fail(503, 1000, "edge down"))
    with caplog.at_level(logging.INFO):
        assert run(api, "cleanup", "-c", str(CONNECTOR), str(TID)) == (0, "")
    assert api.urls() == [f"DELETE /accounts/ACCT/cfd_tunnel/{TID}/connections?client_id={CONNECTOR}"]
    messages = [r.getMessage() for r in caplog.records]
    assert f"Cleanup connection for tunnel {TID} for connector-id {CONNECTOR}" in messages
    assert any("Error cleaning up connections for tunnel" in m and "code: 1000" in m for m in messages)


def test_token_prints_or_writes_credentials(home: Path) -> None:
    api = FakeApi()
    creds = wc.Credentials(account_tag="ACCT", tunnel_secret=b"s" * 32, tunnel_id=TID)
    api.on("GET", f"/accounts/ACCT/cfd_tunnel/{TID}/token", ok(wc.make_token(creds)))
    assert run(api, "token", str(TID)) == (0, wc.make_token(creds) + "\n")
    target = home / "out.json"
    assert run(api, "token", "--cred-file", str(target), str(TID)) == (0, "")
    assert wc.parse_credentials_file(target.read_text(), "x") == creds


def test_route_dns_logs_the_summary(
    home: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    api = FakeApi()
    api.on("PUT", f"/zones/ZONE/tunnels/{TID}/routes", ok({"cname": "new", "name": "app.example.com"}))
    with caplog.at_level(logging.INFO):
        assert run(api, "route", "dns", "--overwrite-dns", str(TID), "app.example.com") == (0, "")
    assert json.loads(api.sent[0][0].body or b"")["overwrite_existing"] is True
    assert f"Added CNAME app.example.com which will route to this tunnel tunnelID={TID}" in caplog.messages
    assert run(api, "route", "dns", str(TID), "bad host!")[0] == 1
    assert capsys.readouterr().err == "bad host! is not a valid hostname\n"
    api.on("PUT", f"/zones/ZONE/tunnels/{TID}/routes", fail(400, 1003, "record exists"))
    assert run(api, "route", "dns", str(TID), "app.example.com")[0] == 1
    assert capsys.readouterr().err == "Failed to add route: code: 1003, reason: record exists\n"


def test_route_ip(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeApi()
    route = {
        "id": str(OTHER),
        "network": "10.0.0.0/8",
        "tunnel_id": str(TID),
        "comment": "lab",
        "created_at": "2026-12-04T20:03:40Z",
        "deleted_at": None,
        "tunnel_name": "app",
    }
    api.on("POST", "/accounts/ACCT/teamnet/routes", ok(route))
    api.on("GET", "/accounts/ACCT/teamnet/routes", ok([route], count=1, per_page=20, total_count=1))
    api.on("DELETE", f"/accounts/ACCT/teamnet/routes/{OTHER}", ok(route))
    api.on("GET", "/accounts/ACCT/teamnet/routes/ip/10.1.2.3", ok(route))
    api.on("GET", "/accounts/ACCT/teamnet/routes/ip/192.0.2.1", ok({}))
    assert run(api, "route", "ip", "add", "10.0.0.1/8", str(TID), "lab") == (
        0,
        f"Successfully added route for 10.0.0.0/8 over tunnel {TID}\n",
    )
    assert json.loads(api.sent[-1][0].body or b"") == {
        "network": "10.0.0.0/8",
        "tunnel_id": str(TID),
        "comment": "lab",
    }
    table = run(api, "route", "ip", "show")[1].splitlines()
    assert table[0].split() == [
        "ID",
        "NETWORK",
        "VIRTUAL",
        "NET",
        "ID",
        "COMMENT",
        "TUNNEL",
        "ID",
        "TUNNEL",
        "NAME",
        "CREATED",
        "DELETED",
    ]
    assert table[1].split() == [
        str(OTHER),
        "10.0.0.0/8",
        "default",
        "lab",
        str(TID),
        "app",
        "2026-12-04T20:03:40Z",
        "-",
    ]
    assert run(api, "route", "ip", "delete", "10.0.0.0/8") == (
        0,
        f"Successfully deleted route with ID {OTHER}\n",
    )
    assert "network_subset=10.0.0.0%2F8" in api.urls()[-2]
    assert run(api, "route", "ip", "get", "10.1.2.3")[1].splitlines()[1].startswith(str(OTHER))
    assert run(api, "route", "ip", "get", "192.0.2.1") == (0, "No route matches the IP 192.0.2.1\n")
    assert run(api, "route", "ip", "add", "nope", str(TID))[0] == 1
    assert capsys.readouterr().err.endswith("Invalid network CIDR: invalid CIDR address: nope\n")


def test_without_an_origin_certificate(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    if any(os.path.isfile(os.path.join(d, "cert.pem")) for d in admin.CONFIG_DIRS if not d.startswith("~")):
        pytest.skip("this machine has a cert.pem in a system directory cloudflared searches")
    assert run(FakeApi(), "list")[0] == 1
    assert capsys.readouterr().err == "Error locating origin cert: client didn't specify origincert path\n"
    assert any("Cannot determine default origin certificate path" in m for m in caplog.messages)
    bad = tmp_path / "bad.pem"
    bad.write_text("garbage\n")
    assert run(FakeApi(), "list", tunnel={"origincert": str(bad)})[0] == 1
    assert capsys.readouterr().err == "Error decoding origin cert: missing token in the certificate\n"


def test_login_polls_until_approved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    pem = encode_origin_cert(OriginCert("ZONE", "ACCT", "TOKEN"))
    answers = [
        cfapi.ApiResponse(404, "text/plain", b"waiting"),
        cfapi.ApiResponse(200, "application/x-pem-file", pem),
    ]
    polled: list[str] = []

    def transport(req: cfapi.ApiRequest, headers: dict[str, str], timeout: float) -> cfapi.ApiResponse:
        polled.append(req.url)
        assert timeout == admin.POLL_TIMEOUT
        return answers.pop(0)

    inv = admin.parse_invocation(["login"], {}, env={})
    assert inv is not None
    assert admin.run(inv, prog="p", transport=transport) == 0
    err = capsys.readouterr().err
    url = err.split("\n\n")[1]
    key = polled[0].removeprefix("https://login.cloudflareaccess.org/")
    assert (
        url
        == f"https://dash.cloudflare.com/argotunnel?aud=&callback=https%3A%2F%2Flogin.cloudflareaccess.org%2F"
        f"{key.replace('=', '%3D')}"
    )
    assert polled == [polled[0]] * 2 and len(key) == 44
    cert = tmp_path / ".cloudflared" / "cert.pem"
    assert cert.read_bytes() == pem and stat.S_IMODE(cert.stat().st_mode) == 0o600
    # a second login refuses to overwrite, and exits 0 as cloudflared does
    assert admin.run(inv, prog="p", transport=transport) == 0


def test_login_gives_up_after_ten_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    count = 0

    def transport(req: cfapi.ApiRequest, headers: dict[str, str], timeout: float) -> cfapi.ApiResponse:
        nonlocal count
        count += 1
        return cfapi.ApiResponse(404, "text/plain", b"")

    inv = admin.parse_invocation(["login"], {}, env={})
    assert inv is not None
    assert admin.run(inv, prog="p", transport=transport) == 1
    assert count == admin.POLL_ATTEMPTS and capsys.readouterr().err.endswith("Failed to fetch resource\n")
    assert not os.path.exists(tmp_path / ".cloudflared" / "cert.pem")


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["a\tbb\t", "ccc\td\t"], ["a   bb ", "ccc d  "]),
        (["title", "x\ty\t", "xx\t"], ["title", "x  y ", "xx "]),
        (["no tabs"], ["no tabs"]),
    ],
)
def test_tabwrite_lays_out_cells_as_go(lines: list[str], expected: list[str]) -> None:
    assert admin.tabwrite(lines).splitlines() == expected


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("app.example.com", True),
        ("*.example.com", True),
        ("bücher.example", True),
        ("a b", False),
        ("-x.example", False),
        ("", False),
    ],
)
def test_hostname_validation(name: str, valid: bool) -> None:
    assert admin.valid_hostname(name) is valid


def test_unknown_flags_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert admin.parse_invocation(["list", "--help"], {}, env={}) is None
    with pytest.raises(admin.UsageError, match="flag provided but not defined: -bogus"):
        admin.parse_invocation(["list", "--bogus"], {}, env={})
    help_text = admin.help_text(["route", "dns"], "p")
    assert "--overwrite-dns, -f" in help_text and "--help, -h" in help_text


VNET = uuid.UUID("99999999-8888-4777-8666-555555555555")


def vnet_json(name: str = "lan", default: bool = False) -> dict[str, Any]:
    return {
        "id": str(VNET),
        "name": name,
        "comment": "c",
        "is_default_network": default,
        "created_at": "2026-12-04T20:03:40Z",
        "deleted_at": None,
    }


def test_vnet_commands(home: Path) -> None:
    api = FakeApi()
    api.on("POST", "/accounts/ACCT/teamnet/virtual_networks", ok(vnet_json(default=True)))
    api.on("GET", "/accounts/ACCT/teamnet/virtual_networks", ok([vnet_json()]))
    api.on("PATCH", f"/accounts/ACCT/teamnet/virtual_networks/{VNET}", ok(vnet_json()))
    api.on("DELETE", f"/accounts/ACCT/teamnet/virtual_networks/{VNET}", ok(vnet_json()))
    code, out = run(api, "vnet", "add", "-d", "lan", "c")
    assert code == 0 and out.startswith(
        f"Successfully added virtual 'network' lan with ID: {VNET} (as the new default for this account) \n"
    )
    assert json.loads(api.sent[-1][0].body or b"") == {
        "name": "lan",
        "comment": "c",
        "is_default_network": True,
    }
    table = run(api, "vnet", "list", "--is-default=false")[1].splitlines()
    assert table[0].split() == ["ID", "NAME", "IS", "DEFAULT", "COMMENT", "CREATED", "DELETED"]
    assert table[1].split() == [str(VNET), "lan", "false", "c", "2026-12-04T20:03:40Z", "-"]
    assert api.urls()[-1].endswith("/virtual_networks?is_default=false&is_deleted=false")
    assert run(api, "vnet", "update", "--comment", "new", "lan") == (
        0,
        "Successfully updated virtual network 'lan'\n",
    )
    assert json.loads(api.sent[-1][0].body or b"") == {"comment": "new"}
    assert api.urls()[-2].endswith("/virtual_networks?is_deleted=false&name=lan")
    assert run(api, "vnet", "delete", "-f", "lan") == (0, "Successfully deleted virtual network 'lan'\n")
    assert api.urls()[-1].endswith(f"/virtual_networks/{VNET}?force=true")


def test_routes_in_a_virtual_network(home: Path) -> None:
    api = FakeApi()
    api.on("GET", "/accounts/ACCT/teamnet/virtual_networks", ok([vnet_json()]))
    api.on("POST", "/accounts/ACCT/teamnet/routes", ok({}))
    api.on("GET", "/accounts/ACCT/teamnet/routes/ip/10.0.0.1", ok({}))
    assert run(api, "route", "ip", "add", "--vnet", "lan", "10.0.0.0/8", str(TID))[0] == 0
    assert json.loads(api.sent[-1][0].body or b"")["virtual_network_id"] == str(VNET)
    assert run(api, "route", "ip", "get", "--vnet", str(VNET), "10.0.0.1")[0] == 0
    assert api.urls()[-1].endswith(f"/routes/ip/10.0.0.1?virtual_network_id={VNET}")


def test_unknown_subcommands_have_no_help_topic() -> None:
    for words in (["vnet", "bogus"], ["route", "ip", "bogus"], ["route", "bogus"]):
        with pytest.raises(admin.NoHelpTopic, match="No help topic for 'bogus'"):
            admin.parse_invocation(words, {}, env={})

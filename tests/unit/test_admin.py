"""lab.admin: `tunnel-lab tunnel ...` and `tunnel-lab pki ...` end to end, in process."""

from __future__ import annotations

import datetime
import json
import os
import re
import stat
import uuid
from pathlib import Path

import pytest

from tunnel_lab.lab import cli
from tunnel_lab.lab.admin import pki_main, tunnel_main
from tunnel_lab.lab.store import Store
from tunnel_lab.wire.credentials import parse_credentials_file, parse_token

UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


class Lab:
    """Runs admin commands against one state directory and captures their output."""

    def __init__(self, state: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.state = state
        self.capsys = capsys

    def run(self, *argv: str, main: object = tunnel_main) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--state", str(self.state), *argv])  # type: ignore[operator]
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    def ok(self, *argv: str, main: object = tunnel_main) -> str:
        code, out, err = self.run(*argv, main=main)
        assert code == 0, err
        return out

    def fails(self, *argv: str, code: int = 1, main: object = tunnel_main) -> str:
        got, out, err = self.run(*argv, main=main)
        assert got == code, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tunnel-lab: "), err
        return lines[0]

    def store(self) -> Store:
        return Store(self.state / "state.db")


@pytest.fixture
def lab(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Lab:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("TUNNEL_LAB_STATE", raising=False)
    return Lab(tmp_path / "state", capsys)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- create ----------------------------------------------------------------------------------------

def test_create_writes_private_credentials(lab: Lab) -> None:
    out = lab.ok("create", "web")
    m = re.search(rf"Created tunnel web with id ({UUID_RE})", out)
    assert m, out
    tid = uuid.UUID(m.group(1))
    path = lab.state / "credentials" / f"{tid}.json"
    assert f"Tunnel credentials written to {path}." in out
    assert mode(path) == 0o400
    assert mode(lab.state) == 0o700
    raw = json.loads(path.read_text())
    assert list(raw) == ["AccountTag", "TunnelSecret", "TunnelID", "Endpoint"]
    creds = parse_credentials_file(path.read_text(), str(path))
    with lab.store() as store:
        tunnel = store.require_tunnel("web")
    assert (creds.tunnel_id, creds.tunnel_secret) == (tid, tunnel.secret)
    assert creds.account_tag == tunnel.account_tag
    assert tunnel.credentials_file == str(path)


def test_create_with_credentials_file_and_json_output(lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "creds.json"
    info = json.loads(lab.ok("create", "api", "--credentials-file", str(target), "--output", "json"))
    assert info["name"] == "api" and info["credentials_file"] == str(target)
    assert parse_credentials_file(target.read_text(), "t").tunnel_id == uuid.UUID(info["id"])
    assert mode(target) == 0o400
    # The alias cloudflared also accepts.
    lab.ok("create", "api2", "--cred-file", str(tmp_path / "creds2.json"))
    assert (tmp_path / "creds2.json").exists()


def test_create_errors_leave_nothing_behind(lab: Lab, tmp_path: Path) -> None:
    lab.ok("create", "web")
    assert "'web' already exists" in lab.fails("create", "web")
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    assert "already exists" in lab.fails("create", "x", "--credentials-file", str(existing))
    assert existing.read_text() == "{}"
    cloudflared = Path(os.environ["HOME"]) / ".cloudflared"
    cloudflared.mkdir()
    assert "refusing to write under" in lab.fails("create", "x", "--credentials-file",
                                                  str(cloudflared / "x.json"))
    assert not list(cloudflared.iterdir())
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert "directory does not exist" in lab.fails("create", "x", "--credentials-file",
                                                   str(not_a_dir / "x.json"))
    # The directory exists but the file cannot be created: the tunnel is rolled back.
    assert "was not created" in lab.fails("create", "x", "--credentials-file", "/proc/tunnel-lab-x.json")
    assert "is a directory" in lab.fails("create", "x", "--credentials-file", str(tmp_path))
    assert "invalid tunnel name" in lab.fails("create", "a b")
    with lab.store() as store:
        assert [t.name for t in store.list_tunnels()] == ["web"]


# -- routes ----------------------------------------------------------------------------------------

def test_route_dns(lab: Lab) -> None:
    lab.ok("create", "web")
    lab.ok("create", "api")
    out = lab.ok("route", "dns", "web", "App.Example.com")
    assert re.fullmatch(rf"Added CNAME app.example.com which will route to this tunnel tunnelID={UUID_RE}\n",
                        out)
    assert "already configured to route to your tunnel" in lab.ok("route", "dns", "web", "app.example.com")
    assert "already routed to tunnel web" in lab.fails("route", "dns", "api", "app.example.com")
    assert "Added CNAME" in lab.ok("route", "dns", "--overwrite-dns", "api", "app.example.com")
    lab.ok("route", "dns", "web", "*.example.com")
    assert "invalid hostname" in lab.fails("route", "dns", "web", "bad..name")
    assert "neither the ID nor the name" in lab.fails("route", "dns", "ghost", "x.example.com")
    with lab.store() as store:
        assert store.resolve_hostname("app.example.com:443").name == "api"  # type: ignore[union-attr]
        assert store.resolve_hostname("www.example.com").name == "web"  # type: ignore[union-attr]


def test_route_lb(lab: Lab) -> None:
    lab.ok("create", "web")
    lab.ok("create", "api")
    assert "Load balancer lb.example.com (new) uses pool p1 (new)" in lab.ok("route", "lb", "web",
                                                                             "lb.example.com", "p1")
    assert "(unchanged) uses pool p1 (updated)" in lab.ok("route", "lb", "api", "lb.example.com", "p1")
    lab.ok("route", "dns", "web", "app.example.com")
    assert "cannot also be a load balancer" in lab.fails("route", "lb", "api", "app.example.com", "p1")
    assert "is a load balancer" in lab.fails("route", "dns", "--overwrite-dns", "api", "lb.example.com")
    assert "not a valid pool name" in lab.fails("route", "lb", "api", "x.example.com", ".p")
    with lab.store() as store:
        pools = store.load_balancer("lb.example.com")
        assert pools is not None and [[t.name for t in p] for p in pools] == [["web", "api"]]


def test_route_ip_forms_and_show(lab: Lab) -> None:
    lab.ok("create", "web")
    lab.ok("create", "vpn")
    assert "Successfully added route for 10.0.0.0/8 over tunnel" in lab.ok("route", "ip", "add", "10.0.0.0/8",
                                                                          "web")
    lab.ok("route", "ip", "10.1.0.0/16", "vpn")  # the short form
    lab.ok("--state", str(lab.state), "route", "ip", "fd00::/8", "vpn")
    assert "already exists" in lab.fails("route", "ip", "add", "10.0.0.0/8", "vpn")
    assert "invalid IP network" in lab.fails("route", "ip", "add", "10.0.0.0/99", "vpn")
    assert "invalid IP network" in lab.fails("route", "ip", "nonsense", "vpn")
    table = lab.ok("route", "ip", "show")
    assert table.splitlines()[0].split() == ["NETWORK", "TUNNEL", "ID", "TUNNEL", "NAME", "CREATED"]
    assert len(table.splitlines()) == 4
    shown = json.loads(lab.ok("route", "ip", "list", "--output", "json"))
    assert [(r["target"], r["tunnel_name"]) for r in shown] == [
        ("10.0.0.0/8", "web"), ("10.1.0.0/16", "vpn"), ("fd00::/8", "vpn")]
    assert "Successfully deleted route for 10.1.0.0/16" in lab.ok("route", "ip", "delete", "10.1.0.0/16")
    with lab.store() as store:
        assert store.resolve_ip("10.1.2.3").name == "web"  # type: ignore[union-attr]


def test_empty_listings(lab: Lab) -> None:
    assert "No tunnels were found" in lab.ok("list")
    assert json.loads(lab.ok("list", "--output", "json")) == []
    assert "No routes were found" in lab.ok("route", "ip", "show")


# -- list, info, token, delete ---------------------------------------------------------------------

def test_list_and_info(lab: Lab) -> None:
    lab.ok("create", "web")
    lab.ok("route", "dns", "web", "app.example.com")
    lab.ok("route", "ip", "10.0.0.0/8", "web")
    lab.ok("create", "idle")
    out = lab.ok("list")
    assert out.splitlines()[1].split() == ["ID", "NAME", "CREATED", "ROUTES"]
    assert re.search(rf"{UUID_RE}\s+web\s+\S+Z\s+app.example.com, 10.0.0.0/8", out)
    listed = json.loads(lab.ok("list", "-o", "json"))
    assert [(t["name"], t["routes"]) for t in listed] == [("web", ["app.example.com", "10.0.0.0/8"]),
                                                          ("idle", [])]
    assert all("secret" not in json.dumps(t).lower() for t in listed)
    info = lab.ok("info", "web")
    assert "NAME:        web" in info and "app.example.com" in info and "10.0.0.0/8" in info
    data = json.loads(lab.ok("info", listed[0]["id"], "--output", "json"))
    assert data["name"] == "web" and len(data["routes"]) == 2
    assert "none" in lab.ok("info", "idle")
    assert "neither the ID nor the name" in lab.fails("info", "ghost")


def test_token_and_cred_file(lab: Lab, tmp_path: Path) -> None:
    lab.ok("create", "web")
    token = lab.ok("token", "web").strip()
    creds = parse_token(token)
    with lab.store() as store:
        tunnel = store.require_tunnel("web")
    assert (creds.account_tag, creds.tunnel_secret, creds.tunnel_id) == (tunnel.account_tag, tunnel.secret,
                                                                         tunnel.id)
    target = tmp_path / "from-token.json"
    assert f"Tunnel credentials written to {target}" in lab.ok("token", "web", "--cred-file", str(target))
    assert parse_credentials_file(target.read_text(), "t") == parse_credentials_file(
        Path(tunnel.credentials_file or "").read_text(), "t")
    assert mode(target) == 0o400
    assert "already exists" in lab.fails("token", "web", "--cred-file", str(target))
    assert "neither the ID nor the name" in lab.fails("token", "ghost")


def test_delete_removes_routes_and_credentials(lab: Lab, tmp_path: Path) -> None:
    lab.ok("create", "web")
    custom = tmp_path / "api.json"
    lab.ok("create", "api", "--credentials-file", str(custom))
    lab.ok("route", "dns", "web", "*.example.com")
    lab.ok("route", "ip", "10.0.0.0/8", "web")
    lab.ok("route", "dns", "api", "api.example.com")
    with lab.store() as store:
        web = store.require_tunnel("web")
    default_creds = lab.state / "credentials" / f"{web.id}.json"
    assert default_creds.exists()
    assert "neither the ID nor the name" in lab.fails("delete", "web", "ghost")  # all or nothing
    assert default_creds.exists()
    assert f"Deleted tunnel web with id {web.id}" in lab.ok("delete", str(web.id))
    assert not default_creds.exists()
    lab.ok("delete", "-f", "api")
    assert not custom.exists()
    with lab.store() as store:
        assert store.list_tunnels() == [] and store.list_routes() == []


# -- usage, --state, dispatch ----------------------------------------------------------------------

def test_usage_errors_exit_2(lab: Lab) -> None:
    assert "invalid choice" in lab.fails("frobnicate", code=2)
    assert "required" in lab.fails("create", code=2)
    assert "required" in lab.fails("route", "dns", "web", code=2)
    assert "unrecognized arguments: --bogus" in lab.fails("create", "--bogus", "x", code=2)
    assert "tunnel-lab tunnel create --help" in lab.fails("create", "--output", "xml", "x", code=2)
    assert "required" in lab.fails(code=2)
    code, out, _ = lab.run("--help")
    assert code == 0 and "create" in out


def test_state_flag_at_both_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNNEL_LAB_STATE", raising=False)
    outer, inner = tmp_path / "outer", tmp_path / "inner"
    assert tunnel_main(["--state", str(outer), "create", "a"]) == 0
    assert tunnel_main(["create", "--state", str(inner), "b"]) == 0
    assert tunnel_main(["--state", str(outer), "create", "--state", str(inner), "c"]) == 0  # inner wins
    assert tunnel_main(["route", "--state", str(inner), "ip", "--state", str(inner), "10.0.0.0/8", "b"]) == 0
    monkeypatch.setenv("TUNNEL_LAB_STATE", str(outer))
    assert tunnel_main(["create", "d"]) == 0
    with Store(outer / "state.db") as s:
        assert [t.name for t in s.list_tunnels()] == ["a", "d"]
    with Store(inner / "state.db") as s:
        assert [t.name for t in s.list_tunnels()] == ["b", "c"]
        assert s.resolve_ip("10.0.0.1").name == "b"  # type: ignore[union-attr]
    capsys.readouterr()


def test_dispatch_through_the_tunnel_lab_command(lab: Lab) -> None:
    code = cli.main(["tunnel", "--state", str(lab.state), "create", "via-cli"])
    assert code == 0
    assert cli.main(["pki", "--state", str(lab.state), "show"]) == 0
    with lab.store() as store:
        assert store.get_tunnel("via-cli") is not None


# -- pki -------------------------------------------------------------------------------------------

def test_pki_show(lab: Lab) -> None:
    out = lab.ok("show", main=pki_main)
    assert f"CA certificate:      {lab.state / 'pki' / 'ca.pem'}" in out
    assert re.search(r"SHA-256 fingerprint: ([0-9A-F]{2}:){31}[0-9A-F]{2}\n", out)
    assert "Edge SANs:           h2.cftunnel.com, quic.cftunnel.com, probe.cftunnel.com, cftunnel.com, " \
           "*.cftunnel.com" in out
    assert "Edge valid until:" in out
    data = json.loads(lab.ok("show", "--output", "json", main=pki_main))
    assert data["ca"]["sha256"] in out and data["edge"]["sans"][0] == "h2.cftunnel.com"
    assert mode(Path(data["ca"]["key"])) == 0o600


def test_pki_issue(lab: Lab) -> None:
    out = lab.ok("issue", "app.example.com", main=pki_main)
    cert = lab.state / "pki" / "hosts" / "app.example.com.pem"
    assert out == f"Certificate: {cert}\nKey:         {cert.with_suffix('.key')}\n"
    assert cert.exists()
    assert lab.ok("issue", "APP.example.com", main=pki_main) == out  # same name, same files
    broken = json.loads(lab.ok("issue", "app.example.com", "--kind", "expired", "-o", "json", main=pki_main))
    assert broken["kind"] == "expired" and broken["sans"] == ["app.example.com"]
    assert datetime.datetime.fromisoformat(broken["not_after"]) < datetime.datetime.now(datetime.UTC)
    ip = json.loads(lab.ok("issue", "127.0.0.2", "-o", "json", main=pki_main))
    assert ip["sans"] == ["127.0.0.2"]
    assert "invalid choice" in lab.fails("issue", "x.test", "--kind", "rotten", code=2, main=pki_main)
    assert "invalid hostname" in lab.fails("issue", "bad..name", main=pki_main)

"""lab.access_admin: `tunnel-lab access app|policy|service-token` and `tunnel-lab waf rules`, in process,
against one state directory; what they write is what the API's store reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tunnel_lab.lab import cli
from tunnel_lab.lab.access_store import AccessStore
from tunnel_lab.lab.paths import db_path
from tunnel_lab.lab.store import Store
from tunnel_lab.lab.waf_store import WafStore

STAFF = {"name": "staff", "decision": "allow", "include": [{"email_domain": {"domain": "example.test"}}]}
DENY_BOB = {"name": "no-bob", "decision": "deny", "include": [{"email": {"email": "bob@example.test"}}]}


class Lab:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.state = tmp_path / "state"
        self.dir = tmp_path
        self.capsys = capsys

    def run(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = cli.main([argv[0], "--state", str(self.state), *argv[1:]])
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self.run(*argv)
        assert code == 0, err
        return out

    def fails(self, *argv: str, code: int = 1) -> str:
        got, out, err = self.run(*argv)
        assert got == code, (out, err)
        assert err.startswith("tunnel-lab: ") and err.count("\n") == 1, err
        return err

    def json(self, *argv: str) -> Any:
        return json.loads(self.ok(*argv, "--output", "json"))

    def file(self, name: str, content: object) -> str:
        path = self.dir / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)

    def store(self) -> Store:
        return Store(db_path(self.state))


@pytest.fixture
def lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Lab:
    return Lab(tmp_path, capsys)


def test_app_add_list_show_delete(lab: Lab) -> None:
    out = lab.ok("access", "app", "add", "web", "app.test", "--policies", lab.file("p.json", [STAFF]))
    assert "Created Access application web for app.test" in out
    app = lab.json("access", "app", "add", "health", "app.test/health", "--session-duration", "30m")
    assert app["domain"] == "app.test/health" and app["session_duration"] == "30m"
    assert len(app["aud"]) == 64 and app["policies"] == []

    listed = lab.json("access", "app", "list")
    assert [a["name"] for a in listed] == ["web", "health"]
    table = lab.ok("access", "app", "list")
    assert table.splitlines()[0].split() == ["ID", "NAME", "DOMAIN", "POLICIES", "AUD"]

    shown = lab.json("access", "app", "show", "web")
    assert shown["policies"][0]["name"] == "staff"
    text = lab.ok("access", "app", "show", "web")
    assert "include email_domain=example.test" in text and "DOMAIN:   app.test" in text
    # by id and by aud too
    assert lab.json("access", "app", "show", shown["id"])["name"] == "web"
    assert lab.json("access", "app", "show", shown["aud"])["name"] == "web"

    # the API's store sees what the CLI wrote
    with lab.store() as store:
        found = AccessStore(store).app_for("app.test", "/page")
        assert found is not None and found.aud == shown["aud"]
        assert [p.name for p in found.policies] == ["staff"]

    assert "Deleted Access application web" in lab.ok("access", "app", "delete", "web")
    assert [a["name"] for a in lab.json("access", "app", "list")] == ["health"]
    lab.ok("access", "app", "delete", "health")
    assert "No Access applications" in lab.ok("access", "app", "list")


def test_app_add_bad_input_saves_nothing(lab: Lab) -> None:
    typo = {"name": "x", "decision": "alow", "include": [{"everyone": {}}]}
    bad_policy = lab.file("bad.json", [STAFF, typo])
    err = lab.fails("access", "app", "add", "web", "app.test", "--policies", bad_policy)
    assert "policies[1] 'x'.decision: 'alow' is not one of" in err
    err = lab.fails("access", "app", "add", "web", "app.test", "--policies",
                    lab.file("rule.yaml", "- {name: p, decision: allow, include: [{colour: {}}]}\n"))
    assert "policies[0] 'p'.include[0]" in err
    assert "session_duration" in lab.fails("access", "app", "add", "web", "app.test",
                                           "--session-duration", "forever")
    assert "not JSON or YAML (line 1)" in lab.fails("access", "app", "add", "web", "app.test", "--policies",
                                                     lab.file("broken.yaml", "[{"))
    assert "No such file" in lab.fails("access", "app", "add", "web", "app.test", "--policies",
                                       str(lab.dir / "missing.json"))
    assert "application 'web'.policies: must be a list" in lab.fails(
        "access", "app", "add", "web", "app.test", "--policies", lab.file("p.yaml", "policies: 3\n"))
    assert lab.json("access", "app", "list") == []
    one = lab.json("access", "app", "add", "one", "one.test", "--policies", lab.file("one.json", STAFF))
    assert [p["name"] for p in one["policies"]] == ["staff"]
    lab.ok("access", "app", "delete", "one")
    lab.ok("access", "app", "add", "web", "app.test")
    assert "already protects 'app.test'" in lab.fails("access", "app", "add", "web2", "app.test")
    assert "no Access application 'nope'" in lab.fails("access", "app", "show", "nope")
    # delete is all or nothing
    assert "'nope'" in lab.fails("access", "app", "delete", "web", "nope")
    assert len(lab.json("access", "app", "list")) == 1
    # usage errors: exit 2
    lab.fails("access", "app", "add", "web", code=2)
    lab.fails("access", "app", "frobnicate", code=2)


def test_policy_add_list_delete(lab: Lab) -> None:
    lab.ok("access", "app", "add", "web", "app.test")
    staff = lab.file("staff.yaml",
                     "name: staff\ndecision: allow\ninclude:\n  - email_domain: {domain: example.test}\n")
    out = lab.ok("access", "policy", "add", "web", staff)
    assert "Added policy staff (allow) to web" in out
    added = lab.json("access", "policy", "add", "web", lab.file("bob.json", [DENY_BOB]))
    assert [p["name"] for p in added] == ["no-bob"]
    policies = lab.json("access", "policy", "list", "web")
    assert [p["name"] for p in policies] == ["staff", "no-bob"]
    assert "no-bob" in lab.ok("access", "policy", "list", "web")

    # a bad policy: named in the error, nothing added (not even the good one beside it)
    err = lab.fails("access", "policy", "add", "web",
                    lab.file("two.json", [STAFF | {"name": "ok"}, {"name": "bad", "decision": "allow"}]))
    assert "policies[3] 'bad'.include: needs at least one rule" in err
    err = lab.fails("access", "policy", "add", "web", lab.file("n.json", "[1]"))
    assert "application 'web' policies[2]: must be an object" in err
    assert "no policy in the file" in lab.fails("access", "policy", "add", "web", lab.file("e.json", "[]"))
    assert len(lab.json("access", "policy", "list", "web")) == 2

    # delete by name or id
    assert "Deleted policy no-bob" in lab.ok("access", "policy", "delete", "web", "no-bob")
    staff_id = policies[0]["id"]
    lab.ok("access", "policy", "delete", "web", staff_id)
    assert "no policy 'staff'" in lab.fails("access", "policy", "delete", "web", "staff")
    assert lab.json("access", "policy", "list", "web") == []
    assert "none (everyone is refused" in lab.ok("access", "policy", "list", "web")
    assert "no Access application 'other'" in lab.fails("access", "policy", "list", "other")


def test_service_token_secret_shown_once(lab: Lab) -> None:
    out = lab.ok("access", "service-token", "create", "ci")
    secret = next(line.split()[-1] for line in out.splitlines() if line.startswith("Client Secret:"))
    client_id = next(line.split()[-1] for line in out.splitlines() if line.startswith("Client ID:"))
    assert len(secret) == 64
    made = lab.json("access", "service-token", "create", "deploy", "--duration", "forever")
    assert made["client_secret"] and "expires_at" not in made

    listed = lab.json("access", "service-token", "list")
    assert sorted(t["name"] for t in listed) == ["ci", "deploy"]
    assert all("client_secret" not in t for t in listed)
    table = lab.ok("access", "service-token", "list")
    assert "ci" in table and client_id in table and "never" in table
    for text in (table, json.dumps(listed)):
        assert secret not in text and made["client_secret"] not in text
    with lab.store() as store:
        token_id = AccessStore(store).check_service_token(client_id, secret)
        assert token_id is not None and AccessStore(store).check_service_token(client_id, "x" * 64) is None
        assert secret.encode() not in db_path(lab.state).read_bytes()

    assert "name must be a non-empty string" in lab.fails("access", "service-token", "create", " ")
    assert "'ci'.duration: '1y' is not like 8760h" in lab.fails("access", "service-token", "create", "ci",
                                                                 "--duration", "1y")
    assert "no service token 'nope'" in lab.fails("access", "service-token", "delete", "ci", "nope")
    assert len(lab.json("access", "service-token", "list")) == 2
    assert "Deleted service token ci" in lab.ok("access", "service-token", "delete", "ci")
    lab.ok("access", "service-token", "delete", made["client_id"])
    assert "No service tokens" in lab.ok("access", "service-token", "list")


def test_client_commands_still_reach_the_access_client(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["access", "--help"])
    out = capsys.readouterr().out
    assert code == 0 and "app|policy|service-token" in out and "tcp" in out
    code = cli.main(["access", "frob"])
    assert code == 2 and "unknown subcommand 'frob'" in capsys.readouterr().err


CUSTOM = ("rules:\n"
          "  - {id: no-admin, expression: 'http.request.uri.path contains \"/admin\"', action: block}\n"
          "  - {id: watch, expression: 'http.request.method eq \"POST\"', action: log}\n")
RATE = [{"id": "api", "expression": "http.request.uri.path contains \"/api\"", "characteristics": ["ip.src"],
         "period": 10, "requests_per_period": 20}]


def test_waf_rules_set_show_clear(lab: Lab) -> None:
    out = lab.ok("waf", "rules", "set", lab.file("custom.yaml", CUSTOM))
    assert "Set 2 rule(s) in http_request_firewall_custom: no-admin, watch" in out
    got = lab.json("waf", "rules", "set", lab.file("rate.json", RATE), "--phase", "ratelimit")
    assert got["phase"] == "http_ratelimit" and got["rules"][0]["id"] == "api"
    shown = lab.json("waf", "rules", "show")
    assert [r["id"] for r in shown["http_request_firewall_custom"]] == ["no-admin", "watch"]
    text = lab.ok("waf", "rules", "show")
    assert "block" in text and "20/10s" in text and "ip.src" in text
    with lab.store() as store:
        custom, rate = WafStore(store).rules()
        assert len(custom) == 2 and len(rate) == 1

    # a bad rule: named, and the old rules stay
    bad = lab.file("bad.yaml", "- {id: b, expression: 'http.host eq', action: block}\n")
    err = lab.fails("waf", "rules", "set", bad)
    assert "http_request_firewall_custom: rules[0] 'b'.expression: the expression ends too early" in err
    err = lab.fails("waf", "rules", "set", lab.file("bad2.json", [{"id": "x", "expression": "http.host",
                                                                   "action": "explode"}]))
    assert "'x'" in err and "action" in err
    assert "rules must be a list" in lab.fails("waf", "rules", "set", lab.file("s.json", '"x"'))
    lab.fails("waf", "rules", "set", lab.file("c.json", CUSTOM), "--phase", "nope", code=2)
    assert len(lab.json("waf", "rules", "show", "--phase", "custom")["http_request_firewall_custom"]) == 2

    assert "Cleared the rules of http_ratelimit" in lab.ok("waf", "rules", "clear", "--phase", "ratelimit")
    assert lab.json("waf", "rules", "show", "--phase", "ratelimit") == {"http_ratelimit": []}
    lab.ok("waf", "rules", "clear")
    assert "http_request_firewall_custom: no rules" in lab.ok("waf", "rules", "show")

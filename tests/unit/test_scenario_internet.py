"""`topology.internet` scenarios (the connector's own commands): the loader's checks say what and where;
the addresses, the cert.pem reader and the mount-namespace wrapper, without processes."""

from __future__ import annotations

import base64
import json
import random
import textwrap
from pathlib import Path

import pytest

from tunnel_lab.lab.runner import internet
from tunnel_lab.lab.runner.loader import ConfigError, parse_scenario

FLOW = textwrap.dedent("""\
    name: flow
    description: the guide
    topology:
      internet: true
      origins:
        app: {kind: echo}
    steps:
      - cli: {args: tunnel login, approve_login: true}
      - cli: {args: tunnel create app, save: {id: 'with id (\\S+)'}}
      - cli: 'tunnel route dns app app.example.com'
      - cli: {args: 'tunnel run --url ${origins.app.url} app', background: true}
      - wait: {log: {regex: 'connIndex=(\\d)', save: first}}
      - v4_api:
          method: GET
          path: /accounts/${cert.account}/cfd_tunnel/${vars.id}
          expect: {json: {result.name: app}}
      - request: {host: app.example.com, path: '/${vars.first}'}
      - connector: {action: sigstop}
    """)


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_scenario(text, "flow.yaml")
    return info.value


def test_flow_builds_with_four_data_centres() -> None:
    sc = parse_scenario(FLOW, "flow.yaml")
    assert sc.internet and sc.connector is None
    assert [d.name for d in sc.datacentres] == ["LAB1", "LAB2", "LAB3", "LAB4"]
    assert [s.action for s in sc.steps][:3] == ["cli", "cli", "cli"] and sc.steps[2].spec.startswith("tunnel")


def test_cli_and_cert_need_internet() -> None:
    err = error_of(FLOW.replace("  internet: true\n", ""))
    assert err.line == 14 and "${cert.account} needs topology.internet: true" in str(err)
    text = FLOW.replace("  internet: true\n", "").replace("${cert.account}", "acct")
    err = error_of(text)
    assert err.line == 7 and "step 1 (cli, line 7): cli needs topology.internet: true" in str(err)


def test_internet_excludes_datacenters_and_connector() -> None:
    err = error_of(FLOW.replace("  internet: true\n", "  internet: true\n  datacenters: [A, B]\n"))
    assert err.line == 5 and "topology.datacenters and topology.internet exclude each other" in str(err)


def test_variable_saved_later_is_refused() -> None:
    text = FLOW.replace("path: '/${vars.first}'", "path: '/${vars.later}'")
    err = error_of(text)
    assert err.line == 17 and "${vars.later}: no earlier step saves 'later'" in str(err)
    # saved by a later step, not an earlier one
    moved = FLOW.replace("tunnel login, approve_login: true}", "'tunnel info ${vars.id}'}")
    assert "no earlier step saves 'id'" in str(error_of(moved))


def test_background_has_no_exit_to_check() -> None:
    text = FLOW.replace("app', background: true}", "app', background: true, expect: {exit: 0}}")
    err = error_of(text)
    assert err.line == 11 and "a background command has no exit to check: expect" in str(err)


def test_bad_regex_and_bad_quoting_say_where() -> None:
    err = error_of(FLOW.replace("'with id (\\S+)'", "'with id ('"))
    assert err.line == 9 and "save id: bad regex" in str(err)
    err = error_of(FLOW.replace("cli: 'tunnel route dns app app.example.com'",
                                "cli: 'tunnel route dns \"app app.example.com'"))
    assert err.line == 10 and "cannot split the arguments" in str(err)


def test_unknown_cli_key_and_bad_v4_method() -> None:
    err = error_of(FLOW.replace("approve_login: true", "aprove_login: true"))
    assert err.line == 8 and "unknown key 'aprove_login'" in str(err)
    assert "did you mean 'approve_login'" in str(err)
    err = error_of(FLOW.replace("method: GET", "method: FETCH"))
    assert err.line == 14 and "steps[5].v4_api.method" in str(err)


def test_connector_start_needs_topology_connector() -> None:
    err = error_of(FLOW.replace("{action: sigstop}", "{action: restart}"))
    assert "the topology has no connector to start" in str(err)


def test_allocate_skips_a_network_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: set[str] = set()
    monkeypatch.setattr(internet, "_free", lambda address, port, kinds: address not in taken)
    first = internet.allocate(random.Random(1))
    taken.add(first.dns)
    second = internet.allocate(random.Random(1))
    assert second.dns != first.dns and second.dns.startswith("127.")
    assert len(set(second.edges)) == 4 and list(second.regions) == list(internet.REGION_NAMES)
    monkeypatch.setattr(internet, "_free", lambda address, port, kinds: False)
    with pytest.raises(internet.InternetError, match="no free loopback network"):
        internet.allocate(random.Random(1))


def test_read_cert(tmp_path: Path) -> None:
    body = base64.b64encode(json.dumps({"zoneID": "z", "accountID": "a", "apiToken": "t"}).encode()).decode()
    pem = tmp_path / "cert.pem"
    pem.write_text(f"-----BEGIN ARGO TUNNEL TOKEN-----\n{body}\n-----END ARGO TUNNEL TOKEN-----\n")
    assert internet.read_cert(pem) == {"zoneID": "z", "accountID": "a", "apiToken": "t"}
    pem.write_text("-----BEGIN ARGO TUNNEL TOKEN-----\nnot base64 json\n-----END ARGO TUNNEL TOKEN-----\n")
    with pytest.raises(internet.InternetError, match=r"no readable cert\.pem"):
        internet.read_cert(pem)
    with pytest.raises(internet.InternetError, match="run `tunnel login` first"):
        internet.read_cert(tmp_path / "missing.pem")


def test_wrap_binds_the_resolver_then_becomes_the_command(tmp_path: Path) -> None:
    net = internet.Internet(internet.allocate(random.Random(2)), tmp_path / "resolv.conf", "/ca.pem")
    argv = net.wrap(["cloudflared", "tunnel", "create", "app"])
    assert argv[:3] == ["unshare", "--mount", "sh"]
    assert argv[-5:] == [str(tmp_path / "resolv.conf"), "cloudflared", "tunnel", "create", "app"]
    env = net.env(tmp_path)
    assert env["SSL_CERT_FILE"] == "/ca.pem" and env["HOME"] == str(tmp_path)
    assert not any(k.startswith("TUNNEL_") for k in env)


# Several connectors at once (one per tunnel of a load balancer's pool): a background cli step names one.
TWO = textwrap.dedent("""\
    name: two
    description: two connectors
    topology:
      internet: true
      origins:
        app: {kind: echo}
    steps:
      - cli: {args: tunnel login, approve_login: true}
      - cli: {args: 'tunnel run --url ${origins.app.url} web1', background: true, connector: web1}
      - cli: {args: 'tunnel run --url ${origins.app.url} web2', background: true, connector: web2}
      - wait: {log: {component: 'connector:web2', regex: Registered}}
      - connector: {action: sigterm, name: web1}
      - wait: {exit: {connector: web1}}
    """)


def test_named_background_connectors() -> None:
    sc = parse_scenario(TWO, "two.yaml")
    assert [s.spec.get("connector") for s in sc.steps[1:3]] == ["web1", "web2"]
    assert sc.steps[4].spec == {"action": "sigterm", "name": "web1"}


def test_named_connector_must_be_started_earlier() -> None:
    err = error_of(TWO.replace("{action: sigterm, name: web1}", "{action: sigterm, name: web3}"))
    assert err.line == 12 and "connector step: no earlier step starts a connector named 'web3'" in str(err)
    assert "earlier ones: web1, web2" in str(err)
    err = error_of(TWO.replace("component: 'connector:web2'", "component: 'connector:web9'"))
    assert err.line == 11 and "log component: no earlier step starts a connector named 'web9'" in str(err)
    err = error_of(TWO.replace("{exit: {connector: web1}}", "{exit: {connector: later}}"))
    assert err.line == 13 and "wait exit: no earlier step starts a connector named 'later'" in str(err)
    # started in the same parallel block is not earlier
    start = "  - cli: {args: 'tunnel run --url ${origins.app.url} web2', background: true, connector: web2}\n"
    wait = "  - wait: {log: {component: 'connector:web2', regex: Registered}}\n"
    text = TWO.replace(start + wait, "  - parallel:\n    " + start + "    " + wait)
    assert "no earlier step starts a connector named 'web2'" in str(error_of(text))


def test_named_connector_is_background_only_and_not_restarted() -> None:
    err = error_of(TWO.replace("web1', background: true, connector: web1}", "web1', connector: web1}"))
    assert err.line == 9 and "`connector` names a background command and needs background: true" in str(err)
    err = error_of(TWO.replace("{action: sigterm, name: web1}", "{action: restart, name: web1}"))
    assert err.line == 12 and "connector 'web1' cannot restart" in str(err)


def test_connector_name_is_checked_by_the_schema() -> None:
    err = error_of(TWO.replace("connector: web1}", "connector: 'Web 1'}"))
    assert err.line == 9 and "steps[1].cli.connector" in str(err)
    err = error_of(TWO.replace("name: web1}", "nmae: web1}"))
    assert "unknown key 'nmae'" in str(err) and "did you mean 'name'" in str(err)


def test_load_balancer_scenarios_keep_one_edge_process() -> None:
    # The round-robin turn and the connections a load balancer picks from are each edge process's own.
    from tunnel_lab.lab.runner.lab import _multiprocess_edge_serves

    assert _multiprocess_edge_serves(parse_scenario(FLOW, "flow.yaml"))
    dns = "cli: 'tunnel route dns app app.example.com'"
    lb = FLOW.replace(dns, "cli: 'tunnel route lb app lb.example.com p'")
    assert not _multiprocess_edge_serves(parse_scenario(lb, "flow.yaml"))
    nested = FLOW.replace("  - cli: 'tunnel route dns app app.example.com'\n",
                          "  - parallel:\n      - cli: {args: 'tunnel route lb app lb.example.com p'}\n")
    assert not _multiprocess_edge_serves(parse_scenario(nested, "flow.yaml"))
    body = "      body: {type: lb, lb_name: lb.example.com, lb_pool: p}\n"
    api = FLOW.replace("method: GET\n", "method: PUT\n" + body)
    assert not _multiprocess_edge_serves(parse_scenario(api, "flow.yaml"))

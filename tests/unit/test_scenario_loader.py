"""Scenario files: validation errors name file:line and what was expected; the library is valid;
selection and sharding behave."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.lab.runner import loader
from tunnel_lab.lab.runner.cli import collect, library_dir, main
from tunnel_lab.lab.runner.loader import (
    ConfigError,
    matches,
    parse_duration,
    parse_scenario,
    parse_shard,
    shard,
)

ROOT = Path(__file__).resolve().parents[2]

GOOD = textwrap.dedent("""\
    name: sample
    description: a sample
    tags: [requests, http1]
    topology:
      origins:
        app: {kind: echo}
      tunnels:
        main: {dns: [app.lab.test]}
      connector:
        tunnel: main
        url: ${origins.app.url}
    steps:
      - request:
          host: app.lab.test
          expect: {status: 200}
    """)


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_scenario(text, "sample.yaml")
    return info.value


def test_good_scenario_builds() -> None:
    sc = parse_scenario(GOOD, "sample.yaml")
    assert sc.name == "sample"
    assert [d.address for d in sc.datacentres] == ["127.0.0.1", "127.0.0.2"]
    assert sc.connector is not None and sc.connector.ha_connections == 1 and sc.connector.wait_ready == 1
    assert sc.steps[0].action == "request" and sc.steps[0].line == 13


def test_yaml_syntax_error_names_the_line() -> None:
    err = error_of(GOOD.replace("expect: {status: 200}", "expect: {status: 200"))
    assert err.source == "sample.yaml"
    assert err.line == 16
    assert str(err).startswith("sample.yaml:16: invalid YAML")


def test_libyaml_and_the_pure_parser_read_the_library_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    # parse_yaml takes libyaml's node tree (faster); data and line numbers must not depend on it
    files = sorted((ROOT / "scenarios").glob("*.yaml"))
    fast = [loader.parse_yaml(f.read_text(), f.name) for f in files]
    monkeypatch.delattr(loader.yaml, "CSafeLoader", raising=False)
    pure = [loader.parse_yaml(f.read_text(), f.name) for f in files]
    assert [(d.data, d.lines) for d in fast] == [(d.data, d.lines) for d in pure]


def test_a_syntax_error_is_worded_by_the_pure_parser() -> None:
    text = GOOD.replace("expect: {status: 200}", "expect: {status: 200")
    with pytest.raises(loader.yaml.MarkedYAMLError) as pure:
        loader.yaml.compose(text, Loader=loader.yaml.SafeLoader)
    assert f"invalid YAML: {pure.value.problem}" in str(error_of(text))


def test_unknown_key_names_line_and_suggests() -> None:
    err = error_of(GOOD.replace("expect: {status: 200}", "expect: {stauts: 200}"))
    assert err.line == 15
    assert "unknown key 'stauts'" in str(err)
    assert "did you mean 'status'" in str(err)


def test_wrong_type_says_what_was_expected() -> None:
    err = error_of(GOOD.replace("{status: 200}", "{status: ok}"))
    assert err.line == 15
    assert "steps[0].request.expect.status: expected a integer or a list" in str(err)


def test_missing_required_key() -> None:
    err = error_of(GOOD.replace("description: a sample\n", ""))
    assert err.line == 1
    assert "missing required key 'description'" in str(err)


def test_enum_lists_the_choices() -> None:
    err = error_of(GOOD.replace("kind: echo", "kind: ecko"))
    assert err.line == 6
    assert "expected one of: echo, hello, stream" in str(err)


def test_step_needs_exactly_one_action() -> None:
    text = GOOD + "  - sleep: 1\n    request: {host: x}\n"
    err = error_of(text)
    assert err.line == 16
    assert "exactly one action" in str(err)


def test_step_without_action() -> None:
    err = error_of(GOOD + "  - name: nothing\n")
    assert err.line == 16
    assert "found none" in str(err)


def test_unknown_variable_and_unknown_origin() -> None:
    err = error_of(GOOD.replace("${origins.app.url}", "${origin.app.url}"))
    assert err.line == 11 and "unknown variable ${origin.app.url}" in str(err)
    err = error_of(GOOD.replace("${origins.app.url}", "${origins.api.url}"))
    assert err.line == 11 and "unknown origin 'api'" in str(err)


def test_ha_connections_need_more_datacentres() -> None:
    err = error_of(GOOD.replace("tunnel: main\n", "tunnel: main\n    ha_connections: 2\n"))
    assert err.line == 11
    assert "needs at least 3 data centres" in str(err)


def test_datacentres_on_ipv6_loopback_listen_in_brackets_and_others_are_refused() -> None:
    ipv6 = GOOD.replace("topology:\n", 'topology:\n  datacenters: [{name: V6A, address: "::1"}, V4]\n')
    sc = parse_scenario(ipv6, "sample.yaml")
    assert [dc.listen() for dc in sc.datacentres] == ["[::1]:0", "127.0.0.2:0"]
    assert [dc.ipv6 for dc in sc.datacentres] == [True, False]
    for bad in ("::2", "2001:db8::1", "10.0.0.1"):
        dcs = f'topology:\n  datacenters: [{{name: X, address: "{bad}"}}]\n'
        err = error_of(GOOD.replace("topology:\n", dcs))
        assert err.line == 5 and "is not loopback" in str(err) and "::1" in str(err), bad


def test_duplicate_key() -> None:
    err = error_of(GOOD.replace("tags: [requests, http1]\n", "tags: [a]\ntags: [b]\n"))
    assert err.line == 4 and "duplicate key 'tags'" in str(err)


def test_connector_names_unknown_tunnel() -> None:
    err = error_of(GOOD.replace("tunnel: main", "tunnel: other"))
    assert err.line == 10 and "not a tunnel" in str(err)


def test_empty_and_non_mapping_files() -> None:
    assert error_of("").line == 1
    err = error_of("- just\n- a list\n")
    assert "expected a mapping" in str(err)


def test_bad_regex_in_log_wait() -> None:
    err = error_of(GOOD + "  - wait: {log: {regex: '(unclosed'}}\n")
    assert err.line == 16 and "bad regex" in str(err)


def test_repeat_only_on_traffic_steps() -> None:
    err = error_of(GOOD + "  - repeat: 3\n    sleep: 1\n")
    assert err.line == 16 and "repeat/concurrency" in str(err)


def test_parallel_children_get_nested_indexes() -> None:
    text = GOOD + "  - parallel:\n      - sleep: 0.1\n      - {after: 0.2, sleep: 1}\n"
    sc = parse_scenario(text, "s.yaml")
    par = sc.steps[1]
    assert [c.index for c in par.children] == ["2.1", "2.2"]
    assert par.children[1].after == 0.2
    assert par.children[1].line == 18


def test_when_is_a_wait_condition_checked_like_a_wait_step() -> None:
    text = GOOD + ("  - parallel:\n      - sleep: 1\n      - {when: {metric: {component: connector, name: m, "
                   "min: 5}}, after: 0.1, sleep: 0}\n")
    step = parse_scenario(text, "s.yaml").steps[1].children[1]
    assert step.when == {"metric": {"component": "connector", "name": "m", "min": 5}} and step.after == 0.1
    err = error_of(GOOD + "  - {when: {log: {regex: '(unclosed'}}, sleep: 0}\n")
    assert err.line == 16 and "bad regex" in str(err)
    err = error_of(GOOD + "  - {when: {timeout: 3}, sleep: 0}\n")
    assert err.line == 16 and "when needs one of ready, connections, log, metric, exit" in str(err)
    err = error_of(GOOD + "  - {when: {metrics: {name: m}}, sleep: 0}\n")
    assert "unknown key 'metrics'" in str(err)


def test_duration_forms() -> None:
    assert parse_duration(2) == 2.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2s") == 2.0
    assert parse_duration("1m") == 60.0
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_schema_refs_resolve() -> None:
    schema = loader.schema()
    text = json.dumps(schema)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        target = schema
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        assert isinstance(target, dict)


def test_the_library_is_valid_and_large_enough() -> None:
    scenarios, errors = collect([])
    assert errors == []
    assert len(scenarios) >= 30
    assert library_dir().resolve() == (ROOT / "scenarios").resolve()
    assert len({s.name for s in scenarios}) == len(scenarios)
    # every file's name matches its scenario name, so `-k` and the file agree
    for sc in scenarios:
        assert Path(sc.source).stem == sc.name


def test_packaged_library_points_at_the_same_files() -> None:
    packaged = ROOT / "lab" / "scenarios"
    names = sorted(p.name for p in (ROOT / "scenarios").glob("*.yaml"))
    assert sorted(p.name for p in packaged.glob("*.yaml")) == names


# --- selection and sharding ---------------------------------------------------------------------------------


def _named(name: str, tags: tuple[str, ...] = ()) -> loader.Scenario:
    sc = parse_scenario(GOOD.replace("name: sample", f"name: {name}"), f"{name}.yaml")
    return loader.Scenario(**{**sc.__dict__, "tags": tags})


def test_k_expressions() -> None:
    sc = _named("failover-goaway", ("failover", "ha"))
    assert matches(sc, None)
    assert matches(sc, "goaway")
    assert matches(sc, "GOAWAY")
    assert matches(sc, "ha and failover")
    assert not matches(sc, "failover and not goaway")
    assert matches(sc, "(tls or ha) and not sigterm")
    with pytest.raises(ConfigError):
        matches(sc, "failover and")


@given(
    st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True), unique=True, max_size=30),
    st.integers(min_value=1, max_value=8),
)
def test_shards_partition_the_selection(names: list[str], total: int) -> None:
    items = [loader.Scenario(**{**BASE.__dict__, "name": n}) for n in names]
    parts = [shard(items, i, total) for i in range(1, total + 1)]
    flat = [s.name for p in parts for s in p]
    assert sorted(flat) == sorted(names)
    assert len(flat) == len(set(flat))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


BASE = parse_scenario(GOOD, "base.yaml")


@pytest.mark.parametrize("text", ["0/3", "4/3", "a/b", "1", "1/0"])
def test_bad_shard(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_shard(text)
    assert "--shard" in str(info.value)


def test_good_shard() -> None:
    assert parse_shard(" 2/4 ") == (2, 4)


# --- the command line refuses bad files before starting anything ---------------------------------


def test_cli_reports_every_bad_file_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "good.yaml").write_text(GOOD)
    bad = GOOD.replace("name: sample", "name: other").replace("kind: echo", "kind: 7")
    (tmp_path / "bad.yaml").write_text(bad)
    (tmp_path / "worse.yaml").write_text("name: [unclosed\n")
    code = main([str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{tmp_path / 'bad.yaml'}:6:" in err
    assert f"{tmp_path / 'worse.yaml'}:2: invalid YAML" in err
    assert "nothing was started" in err
    assert "Traceback" not in err


def test_cli_duplicate_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)
    assert main(["--check", str(tmp_path)]) == 2
    assert "is also used by" in capsys.readouterr().err


def test_cli_list_and_select(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("alpha", "beta", "gamma"):
        (tmp_path / f"{name}.yaml").write_text(GOOD.replace("name: sample", f"name: {name}"))
    assert main(["--list", "-k", "alpha or gamma", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "gamma" in out and "beta" not in out


def test_cli_missing_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["/nonexistent/scenarios"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_cli_cloudflared_needs_a_binary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TUNNEL_LAB_CLOUDFLARED", raising=False)
    (tmp_path / "a.yaml").write_text(GOOD)
    assert main(["--connector", "cloudflared", str(tmp_path)]) == 2
    assert "needs --cloudflared PATH" in capsys.readouterr().err
    assert main(["--connector", "cloudflared", "--cloudflared", str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert f"--cloudflared {tmp_path / 'nope'}: no such file" in capsys.readouterr().err


UDP = textwrap.dedent("""\
    name: udp-sample
    description: UDP through the tunnel
    topology:
      origins:
        dns: {kind: dns}
      tunnels:
        main: {ip: [127.0.0.0/8]}
      connector:
        tunnel: main
        protocol: quic
        warp_routing: true
    steps:
      - udp: {target: "${origins.dns.address}", dns: {name: a.test, type: A}, count: 2,
              expect: {answers: [192.0.2.1]}}
    """)


def test_udp_step_and_connector_protocol() -> None:
    sc = parse_scenario(UDP, "udp.yaml")
    assert sc.connector is not None and sc.connector.protocol == "quic"
    assert sc.steps[0].action == "udp" and sc.steps[0].spec["count"] == 2


def test_udp_step_errors_name_the_line() -> None:
    err = error_of(UDP.replace('target: "${origins.dns.address}", ', ""))
    assert err.line == 13 and "target" in str(err)
    err = error_of(UDP.replace("protocol: quic", "protocol: udp"))
    assert err.line == 10 and "protocol" in str(err) and "'udp'" in str(err)
    err = error_of(UDP.replace("type: A", "type: MX"))
    assert err.line == 13 and "AAAA" in str(err)

"""topology.access in scenarios: validated at load time with the rule at fault and the file line."""

from __future__ import annotations

import textwrap

import pytest

from tunnel_lab.lab.runner.loader import ConfigError, parse_scenario

BASE = textwrap.dedent("""\
    name: sample
    description: a sample
    topology:
      origins:
        app: {kind: echo}
      tunnels:
        main: {dns: [app.lab.test]}
      access:
        service_tokens: [ci]
        apps:
          main:
            domain: app.lab.test
            policies:
              - {name: staff, decision: allow, include: [RULE]}
        users:
          alice: {email: alice@example.test, app: USERAPP}
      connector:
        tunnel: main
        url: ${origins.app.url}
    steps:
      - request:
          host: app.lab.test
          headers: {Cookie: "CF_Authorization=${VAR}"}
    """)


def scenario(rule: str = "{everyone: {}}", user_app: str = "main",
             var: str = "access.users.alice.cookie") -> str:
    return BASE.replace("RULE", rule).replace("USERAPP", user_app).replace("VAR", var)


def test_good_access_topology() -> None:
    sc = parse_scenario(scenario(), "s.yaml")
    assert sc.access is not None and sc.access["service_tokens"] == ["ci"]
    for var in ("access.team", "access.apps.main.aud", "access.tokens.ci.client_secret",
                "access.assertions.main.expired", "access.assertions.main.wrong-aud"):
        parse_scenario(scenario(var=var), "s.yaml")


@pytest.mark.parametrize(("kwargs", "message", "line"), [
    ({"rule": "{emial: {email: a@b.test}}"}, "policies[0] 'staff'.include[0]: unknown rule 'emial'", 11),
    ({"rule": "{ip: {ip: 10.0.0.0/33}}"}, "include[0].ip.ip: '10.0.0.0/33' is not", 11),
    ({"user_app": "other"}, "user 'alice' signs in to 'other'", 16),
    ({"var": "access.users.bob.cookie"}, "names an unknown user 'bob'", 23),
    ({"var": "access.tokens.cd.client_id"}, "names an unknown token 'cd'", 23),
    ({"var": "access.assertions.main.stale"}, "unknown variable", 23),
])
def test_bad_access_topology(kwargs: dict, message: str, line: int) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(scenario(**kwargs), "s.yaml")
    assert message in str(info.value)
    assert info.value.line == line


def test_unknown_key_in_access() -> None:
    with pytest.raises(ConfigError, match="colour"):
        parse_scenario(scenario().replace("service_tokens: [ci]", "colour: red"), "s.yaml")

"""`run --protocol`: the connector argument, `http2_only` scenarios and steps, `CONNECTOR-quic` deviations."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnel_lab.lab.runner.cli import build_parser
from tunnel_lab.lab.runner.engine import ScenarioResult, apply_known_deviation, skip_reason
from tunnel_lab.lab.runner.lab import RunOptions
from tunnel_lab.lab.runner.loader import ConfigError, Scenario, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
name: t
description: d
timeout: 30
{extra}topology:
  origins:
    app: {{kind: echo}}
  tunnels:
    main: {{dns: [app.lab.test]}}
  connector:
    tunnel: main
    url: ${{origins.app.url}}
steps:
  - request: {{host: app.lab.test}}
  - name: only over http2
    http2_only: the reason
    request: {{host: app.lab.test, path: /x}}
"""


def _scenario(extra: str = "") -> Scenario:
    return parse_scenario(BASE.format(extra=extra), "t.yaml")


def test_the_flag_reaches_the_run_options() -> None:
    args = build_parser().parse_args(["--protocol", "quic"])
    assert args.protocol == "quic"
    assert build_parser().parse_args([]).protocol == "http2"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--protocol", "h3"])
    assert RunOptions().protocol == "http2"


def test_http2_only_scenarios_are_skipped_over_quic_with_the_reason() -> None:
    sc = _scenario("http2_only: no trailers over QUIC\n")
    assert skip_reason(sc, RunOptions(protocol="quic")) == "http2 only: no trailers over QUIC"
    assert skip_reason(sc, RunOptions(protocol="http2")) is None
    trailers = load_scenario(ROOT / "scenarios" / "http-trailers.yaml")
    assert "trailers" in (skip_reason(trailers, RunOptions(protocol="quic")) or "")


def test_steps_carry_their_http2_only_reason() -> None:
    sc = _scenario()
    first, second = sc.steps
    assert (first.http2_only, second.http2_only) == ("", "the reason")


def test_an_empty_reason_is_refused_with_the_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scenario(BASE.format(extra='http2_only: ""\n'), "t.yaml")
    assert str(caught.value).startswith("t.yaml:4: ")
    assert "http2_only: must not be empty" in str(caught.value)


def test_quic_deviations_replace_the_connectors_own_over_quic_only() -> None:
    sc = load_scenario(ROOT / "scenarios" / "registration-unauthorized.yaml")
    reason = sc.known_deviations["cloudflared-quic"]
    over_quic = ScenarioResult("s", "s.yaml", "failed", step="step 1")
    apply_known_deviation(sc, "cloudflared", over_quic, protocol="quic")
    assert (over_quic.status, over_quic.deviation) == ("deviation", reason)
    over_http2 = ScenarioResult("s", "s.yaml", "failed", step="step 1")
    apply_known_deviation(sc, "cloudflared", over_http2, protocol="http2")
    assert (over_http2.status, over_http2.deviation) == ("failed", "")
    builtin = ScenarioResult("s", "s.yaml", "failed", step="step 1")
    apply_known_deviation(sc, "builtin", builtin, protocol="quic")
    assert builtin.status == "failed"

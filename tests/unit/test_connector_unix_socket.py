"""`unix:` / `unix+tls:` ingress services and `--unix-socket`: parsing, validation, local configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_connector_cli import TUNNEL_ID, settings_for
from tests.unit.test_connector_cli import lab as lab  # a fixture
from tunnel_lab.connector import cli, ingress
from tunnel_lab.connector.flags import FLAGS
from tunnel_lab.connector.settings import HTTPService, OriginRequestConfig
from tunnel_lab.wire.errors import ConfigError


def _rules(raw: list[dict[str, object]]) -> tuple[ingress.IngressRule, ...]:
    return ingress.parse_ingress(raw, source="t.yml", defaults=OriginRequestConfig())


def test_unix_services_parse() -> None:
    rs = _rules([{"hostname": "a.test", "service": "unix:/run/app.sock"},
                 {"hostname": "b.test", "service": "unix+tls:/run/tls.sock"},
                 {"service": "http_status:404"}])
    assert rs[0].service == HTTPService(scheme="http", host="", port=0, unix_path="/run/app.sock")
    assert rs[0].service_text == "unix:/run/app.sock"
    assert rs[1].service == HTTPService(scheme="https", host="", port=0, unix_path="/run/tls.sock")
    assert rs[1].service.tls  # type: ignore[union-attr]
    assert rs[1].service_text == "unix+tls:/run/tls.sock"


@pytest.mark.parametrize("service", ["unix:", "unix+tls:"])
def test_unix_service_needs_a_path(service: str) -> None:
    with pytest.raises(ConfigError, match="no socket path"):
        _rules([{"service": service}])


def test_bastion_still_refused() -> None:
    with pytest.raises(ConfigError, match="not supported by tunnel-lab's connector"):
        _rules([{"service": "bastion"}])


def test_ingress_validate_accepts_unix(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (lab / "u.yml").write_text("ingress:\n  - hostname: a.test\n    service: unix:/tmp/a.sock\n"
                               "  - service: unix+tls:/tmp/b.sock\n")
    assert cli.main(["tunnel", "--config", "u.yml", "ingress", "validate"]) == 0
    assert capsys.readouterr().out == "Validating rules from u.yml\nOK\n"
    assert cli.main(["tunnel", "--config", "u.yml", "ingress", "rule", "https://a.test/x"]) == 0
    assert "service: unix:/tmp/a.sock" in capsys.readouterr().out


def test_unix_socket_flag_builds_a_catch_all_rule(lab: Path) -> None:
    flag = next(f for f in FLAGS if f.name == "unix-socket")
    assert flag.support == "yes"
    argv = ["tunnel", "--edge", "127.0.0.1:1", "run", "--unix-socket", "/tmp/o.sock",
            "--credentials-file", "creds.json", TUNNEL_ID]
    settings, _ = settings_for(argv)
    (rule,) = settings.ingress_rules
    assert rule.hostname is None and rule.path is None
    assert rule.service == HTTPService(scheme="http", host="", port=0, unix_path="/tmp/o.sock")
    doc = json.loads(settings.local_config_json)
    assert doc["ingress"][0]["service"] == "unix:/tmp/o.sock"
    env_settings, _ = settings_for([a for a in argv if a not in ("--unix-socket", "/tmp/o.sock")],
                                   {"TUNNEL_UNIX_SOCKET": "/tmp/e.sock"})
    assert env_settings.ingress_rules[0].service_text == "unix:/tmp/e.sock"


def test_unix_service_in_local_config(lab: Path) -> None:
    (lab / "u.yml").write_text("ingress:\n  - hostname: a.test\n    service: unix+tls:/tmp/b.sock\n"
                               "  - service: http_status:404\n")
    settings, _ = settings_for(["tunnel", "--config", "u.yml", "--edge", "127.0.0.1:1", "run",
                                "--credentials-file", "creds.json", TUNNEL_ID])
    doc = json.loads(settings.local_config_json)
    assert [r["service"] for r in doc["ingress"]] == ["unix+tls:/tmp/b.sock", "http_status:404"]

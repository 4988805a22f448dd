"""The connector's command line: cloudflared's flag levels, environment, config file, settings, errors."""

from __future__ import annotations

import base64
import json
import shutil
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.golden import VECTORS, VECTORS_GO126
from tunnel_lab.connector import cli
from tunnel_lab.connector.config import format_go_duration, parse_go_duration
from tunnel_lab.connector.flags import FLAGS, Flag, UsageError, parse_level
from tunnel_lab.connector.settings import (
    HelloWorldService,
    HTTPService,
    StatusService,
    StreamService,
    TunnelSettings,
)
from tunnel_lab.wire.credentials import credentials_json, make_token, parse_credentials_file
from tunnel_lab.wire.errors import ConfigError

TUNNEL_ID = "6ff42ae2-765d-4adf-8112-31c55c1551ef"
OTHER_ID = "11111111-2222-4333-8444-555555555555"


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with the vectors' credentials, a CA file and an empty HOME (no stray config)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in list(__import__("os").environ):
        if name.startswith("TUNNEL_") or name in ("NO_AUTOUPDATE", "NO_TLS_VERIFY", "STDIN_CONTROL"):
            monkeypatch.delenv(name)
    shutil.copy(VECTORS / "creds.json", tmp_path / "creds.json")
    shutil.copy(VECTORS / "ingress-config-B.yml", tmp_path / "config-b.yml")
    (tmp_path / "ca.pem").write_text("")
    (tmp_path / "LAB.yml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Any:
    """`main` installs the connector's log handlers on the root logger; put it back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def settings_for(argv: list[str], env: dict[str, str] | None = None) -> tuple[TunnelSettings, list[str]]:
    command = cli.parse_command(argv)
    settings, _res, notes = cli.prepare_run(command, env or {})
    return settings, notes


def vector_payload(path: Path) -> dict[str, Any]:
    """The updateLocalConfiguration JSON that the real cloudflared sent in a capture."""
    doc = json.loads(path.read_text())
    text = json.dumps(doc)
    marker = b"__configuration_flags".hex()
    start = text.index(marker) - len(b'{"'.hex())
    hex_run = text[start:]
    end = next(i for i, c in enumerate(hex_run) if c not in "0123456789abcdef")
    raw = bytes.fromhex(hex_run[: end - end % 2])
    depth = 0
    for i, byte in enumerate(raw):
        depth += {ord("{"): 1, ord("}"): -1}.get(byte, 0)
        if depth == 0:
            return json.loads(raw[: i + 1])
    raise AssertionError("no JSON payload found")


def argv_of(path: Path) -> list[str]:
    return list(json.loads(path.read_text())["cloudflared_argv"])


# --- the exact command lines -------------------------------------------------------------------------


def test_protocol_md_5_4_command_line_parses(lab: Path) -> None:
    argv = (
        "tunnel --config LAB.yml --no-autoupdate --no-prechecks --edge 127.0.0.1:7844 --edge 127.0.0.2:7844 "
        "--ha-connections 1 --cacert ca.pem --metrics 127.0.0.1:20241 --grace-period 5s run --protocol http2 "
        "--credentials-file creds.json --dns-resolver-addrs 127.0.0.1:53 --url http://127.0.0.1:8081 "
        f"{OTHER_ID}"
    ).split()
    settings, notes = settings_for(argv)
    assert settings.edge_addrs == ("127.0.0.1:7844", "127.0.0.2:7844")
    assert settings.ha_connections == 1
    assert settings.ca_cert == "ca.pem"
    assert settings.metrics == "127.0.0.1:20241"
    assert settings.grace_period == 5.0
    # The UUID argument overrides TunnelID from the credentials file.
    assert settings.credentials.tunnel_id == uuid.UUID(OTHER_ID)
    assert settings.credentials.account_tag == "0123456789abcdef0123456789abcdef"
    assert len(settings.ingress_rules) == 1
    rule = settings.ingress_rules[0]
    assert rule.service == HTTPService(scheme="http", host="127.0.0.1", port=8081)
    # Accepted silently (it has no effect here): the documented line gives no warning.
    assert notes == []
    assert json.loads(settings.local_config_json) == {
        "__configuration_flags": {"metrics": "127.0.0.1:20241", "no-autoupdate": "true", "protocol": "http2"},
        "ingress": [{"service": "http://127.0.0.1:8081", "originRequest": {}}],
        "warp-routing": {},
    }


@pytest.mark.parametrize(
    ("capture", "config_src"),
    [
        (VECTORS / "A01-control-stream-register.json", None),
        (VECTORS / "B01-control-stream-register-ingress-config.json", "config-b.yml"),
        (VECTORS_GO126 / "D12b-control-stream-register.json", None),
        (VECTORS_GO126 / "E-transcript.json", None),
    ],
)
def test_local_config_json_matches_cloudflared(lab: Path, capture: Path, config_src: str | None) -> None:
    argv = argv_of(capture)
    settings, _ = settings_for(argv)
    assert json.loads(settings.local_config_json) == vector_payload(capture)


def test_run_e_no_chunked_encoding_reaches_the_rule(lab: Path) -> None:
    settings, _ = settings_for(argv_of(VECTORS_GO126 / "E-transcript.json"))
    assert settings.ingress_rules[0].origin_request.disable_chunked_encoding is True
    assert settings.ha_connections == 2  # 4 requested, two --edge addresses


def test_ha_capped_message_is_cloudflareds(lab: Path) -> None:
    _, notes = settings_for(
        ["tunnel", "--edge", "127.0.0.1:1", "run", "--credentials-file", "creds.json", TUNNEL_ID]
    )
    assert "You requested 4 HA connections but I can give you at most 1." in notes


def test_env_only_form(lab: Path) -> None:
    env = {
        "TUNNEL_EDGE": "127.0.0.1:7844,127.0.0.2:7844",
        "TUNNEL_CACERT": "ca.pem",
        "TUNNEL_TRANSPORT_PROTOCOL": "http2",
        "TUNNEL_CRED_FILE": "creds.json",
        "TUNNEL_NO_PRECHECKS": "true",
        "NO_AUTOUPDATE": "true",
        "TUNNEL_METRICS": "127.0.0.1:20241",
        "TUNNEL_DNS_RESOLVER_ADDRS": "127.0.0.1:53",
        "TUNNEL_URL": "http://127.0.0.1:8081",
        "TUNNEL_GRACE_PERIOD": "1m30s",
        "NO_TLS_VERIFY": "true",
    }
    settings, _ = settings_for(["tunnel", "run", TUNNEL_ID], env)
    assert settings.edge_addrs == ("127.0.0.1:7844", "127.0.0.2:7844")
    assert settings.ca_cert == "ca.pem"
    assert settings.grace_period == 90.0
    assert settings.metrics == "127.0.0.1:20241"
    assert settings.ingress_rules[0].origin_request.no_tls_verify is True
    flags = json.loads(settings.local_config_json)["__configuration_flags"]
    assert flags == {"metrics": "127.0.0.1:20241", "no-autoupdate": "true", "protocol": "http2"}


def test_flag_beats_env_beats_config(lab: Path) -> None:
    (lab / "c.yml").write_text("retries: 7\nloglevel: warn\nmetrics: 127.0.0.1:1\ngrace-period: 10s\n")
    env = {"TUNNEL_RETRIES": "9", "TUNNEL_METRICS": "127.0.0.1:2"}
    argv = [
        "tunnel",
        "--config",
        "c.yml",
        "--edge",
        "127.0.0.1:1",
        "--metrics",
        "127.0.0.1:3",
        "run",
        "--credentials-file",
        "creds.json",
        TUNNEL_ID,
    ]
    settings, _ = settings_for(argv, env)
    assert settings.metrics == "127.0.0.1:3"  # flag
    assert settings.retries == 9  # env over config
    assert settings.loglevel == "warn"  # config over default
    assert settings.grace_period == 10.0
    flags = json.loads(settings.local_config_json)["__configuration_flags"]
    assert flags == {"loglevel": "warn", "metrics": "127.0.0.1:3", "retries": "9"}


def test_run_level_value_wins_over_tunnel_level(lab: Path) -> None:
    argv = [
        "tunnel",
        "--edge",
        "127.0.0.1:1",
        "--url",
        "http://127.0.0.1:1",
        "run",
        "--credentials-file",
        "creds.json",
        "--url",
        "http://127.0.0.1:2",
        TUNNEL_ID,
    ]
    settings, _ = settings_for(argv)
    assert settings.ingress_rules[0].service_text == "http://127.0.0.1:2"


def test_config_file_sets_tunnel_credentials_edge_and_ingress(lab: Path) -> None:
    (lab / "full.yml").write_text(
        f"tunnel: {TUNNEL_ID}\n"
        "credentials-file: creds.json\n"
        "edge: [127.0.0.1:7844, 127.0.0.2:7844]\n"
        "ha-connections: 2\n"
        "protocol: http2\n"
        "no-autoupdate: true\n"
        "originRequest:\n  connectTimeout: 10s\n  noTLSVerify: true\n"
        "warp-routing:\n  connectTimeout: 2s\n"
        "ingress:\n"
        "  - hostname: '*.example.test'\n    path: ^/api\n    service: https://127.0.0.1:8443\n"
        "    originRequest:\n      originServerName: api.internal\n"
        "  - hostname: ssh.example.test\n    service: ssh://127.0.0.1\n"
        "  - service: http_status:404\n"
    )
    settings, _ = settings_for(["tunnel", "--config", "full.yml", "run"])
    assert settings.credentials.tunnel_id == uuid.UUID(TUNNEL_ID)
    assert settings.ha_connections == 2
    first, second, last = settings.ingress_rules
    assert first.service == HTTPService(scheme="https", host="127.0.0.1", port=8443)
    assert first.origin_request.connect_timeout == 10.0
    assert first.origin_request.origin_server_name == "api.internal"
    assert second.service == StreamService(scheme="ssh", host="127.0.0.1", port=22)
    assert last.service == StatusService(status=404)
    assert settings.warp_routing.connect_timeout == 2.0
    doc = json.loads(settings.local_config_json)
    assert doc["__configuration_flags"] == {"no-autoupdate": "true", "protocol": "http2"}
    assert doc["ingress"][0] == {
        "hostname": "*.example.test",
        "path": "^/api",
        "service": "https://127.0.0.1:8443",
        "originRequest": {"connectTimeout": 10, "originServerName": "api.internal", "noTLSVerify": True},
    }
    assert doc["ingress"][1]["service"] == "ssh://127.0.0.1:22"
    assert doc["warp-routing"] == {"connectTimeout": 2}


def test_url_is_ignored_with_config_ingress(lab: Path) -> None:
    argv = argv_of(VECTORS / "B01-control-stream-register-ingress-config.json")
    argv.insert(argv.index("run") + 1, "--url")
    argv.insert(argv.index("--url") + 1, "http://127.0.0.1:9999")
    settings, notes = settings_for(argv)
    assert [r.service_text for r in settings.ingress_rules][-1] == "http://127.0.0.1:8080"
    assert any(n.startswith("--url is ignored") for n in notes)


def test_default_config_search_path(lab: Path) -> None:
    cfdir = lab / "home" / ".cloudflared"
    cfdir.mkdir()
    (cfdir / "config.yml").write_text("loglevel: debug\n")
    settings, notes = settings_for(
        ["tunnel", "--edge", "127.0.0.1:1", "run", "--credentials-file", "creds.json", TUNNEL_ID]
    )
    assert settings.loglevel == "debug"
    assert not any("Cannot determine default configuration path" in n for n in notes)


def test_no_rules_gives_503_and_a_warning(lab: Path) -> None:
    settings, notes = settings_for(
        ["tunnel", "--edge", "127.0.0.1:1", "run", "--credentials-file", "creds.json", TUNNEL_ID]
    )
    assert settings.ingress_rules[0].service == StatusService(status=503)
    assert any("will return 503" in n for n in notes)
    assert json.loads(settings.local_config_json)["ingress"] == [
        {"service": "http_status:503", "originRequest": {}}
    ]


def test_hello_world_flag(lab: Path) -> None:
    settings, _ = settings_for(
        [
            "tunnel",
            "--edge",
            "127.0.0.1:1",
            "run",
            "--credentials-file",
            "creds.json",
            "--hello-world",
            TUNNEL_ID,
        ]
    )
    assert settings.ingress_rules[0].service == HelloWorldService()


def test_origin_flags_build_the_single_rule(lab: Path) -> None:
    argv = [
        "tunnel",
        "--edge",
        "127.0.0.1:1",
        "run",
        "--credentials-file",
        "creds.json",
        "--url",
        "https://o:8443",
        "--origin-server-name",
        "o.test",
        "--http-host-header",
        "h.test",
        "--proxy-connect-timeout",
        "1m30s",
        "--origin-ca-pool",
        "pool.pem",
        TUNNEL_ID,
    ]
    settings, _ = settings_for(argv)
    cfg = settings.ingress_rules[0].origin_request
    assert (cfg.origin_server_name, cfg.http_host_header, cfg.connect_timeout, cfg.ca_pool) == (
        "o.test",
        "h.test",
        90.0,
        "pool.pem",
    )
    assert json.loads(settings.local_config_json)["ingress"][0]["originRequest"] == {
        "connectTimeout": 90,
        "httpHostHeader": "h.test",
        "originServerName": "o.test",
        "caPool": "pool.pem",
    }


def test_tags_features_post_quantum(lab: Path) -> None:
    argv = [
        "tunnel",
        "--edge",
        "127.0.0.1:1",
        "--tag",
        "env=lab",
        "--tag",
        "team=net",
        "run",
        "--credentials-file",
        "creds.json",
        "-F",
        "extra_feature",
        "--post-quantum",
        TUNNEL_ID,
    ]
    settings, notes = settings_for(argv)
    assert settings.tags == (("env", "lab"), ("team", "net"))
    assert "extra_feature" in settings.features and "postquantum" in settings.features
    assert settings.post_quantum
    assert any("post-quantum" in n for n in notes)


# --- credentials ----------------------------------------------------------------------------------


def test_token_and_token_file(lab: Path) -> None:
    creds = parse_credentials_file((lab / "creds.json").read_text(), "creds.json")
    token = make_token(creds)
    settings, _ = settings_for(["tunnel", "--edge", "127.0.0.1:1", "run", "--token", token])
    assert settings.credentials == creds
    (lab / "token.txt").write_text(token + "\n")
    settings, _ = settings_for(["tunnel", "--edge", "127.0.0.1:1", "run", "--token-file", "token.txt"])
    assert settings.credentials == creds
    settings, _ = settings_for(["tunnel", "--edge", "127.0.0.1:1", "run"], {"TUNNEL_TOKEN": token})
    assert settings.credentials == creds


def test_credentials_contents_wins_over_file(lab: Path) -> None:
    creds = parse_credentials_file((lab / "creds.json").read_text(), "creds.json")
    other = credentials_json(
        type(creds)(account_tag="acct2", tunnel_secret=b"x" * 32, tunnel_id=uuid.UUID(OTHER_ID))
    )
    settings, _ = settings_for(
        [
            "tunnel",
            "--edge",
            "127.0.0.1:1",
            "run",
            "--credentials-file",
            "creds.json",
            "--credentials-contents",
            other,
            "some-name",
        ]
    )
    assert settings.credentials.account_tag == "acct2"
    assert settings.credentials.tunnel_id == uuid.UUID(OTHER_ID)  # a name: TunnelID from the credentials


def test_credentials_file_found_beside_default_dirs(lab: Path) -> None:
    cfdir = lab / "home" / ".cloudflared"
    cfdir.mkdir()
    shutil.copy(lab / "creds.json", cfdir / f"{TUNNEL_ID}.json")
    settings, _ = settings_for(["tunnel", "--edge", "127.0.0.1:1", "run", TUNNEL_ID])
    assert settings.credentials.tunnel_id == uuid.UUID(TUNNEL_ID)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["tunnel", "--edge", "127.0.0.1:1", "run", "--credentials-file", "creds.json"],
            "requires the ID or name",
        ),
        (
            ["tunnel", "--edge", "127.0.0.1:1", "run", "--credentials-file", "creds.json", "a", "b"],
            "only one argument",
        ),
    ],
)
def test_run_usage_errors(lab: Path, argv: list[str], expected: str) -> None:
    with pytest.raises(UsageError, match=expected):
        settings_for(argv)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["tunnel", "--edge", "127.0.0.1:1", "run", "--token", "not-a-token"],
            "Provided Tunnel token is not valid",
        ),
        (
            ["tunnel", "--edge", "127.0.0.1:1", "run", "--credentials-file", "missing.json", TUNNEL_ID],
            "doesn't exist",
        ),
        (["tunnel", "run", "--credentials-file", "creds.json", TUNNEL_ID], "no edge address"),
        (
            ["tunnel", "--edge", "nonsense", "run", "--credentials-file", "creds.json", TUNNEL_ID],
            "invalid edge address",
        ),
        (
            [
                "tunnel",
                "--edge",
                "127.0.0.1:1",
                "run",
                "--protocol",
                "udp",
                "--credentials-file",
                "creds.json",
                TUNNEL_ID,
            ],
            "Unknown protocol udp, available protocols: auto, http2, quic",
        ),
        (
            [
                "tunnel",
                "--edge",
                "127.0.0.1:1",
                "run",
                "--protocol",
                "carrier-pigeon",
                "--credentials-file",
                "creds.json",
                TUNNEL_ID,
            ],
            "Unknown protocol",
        ),
        (
            [
                "tunnel",
                "--edge",
                "127.0.0.1:1",
                "--grace-period",
                "5m",
                "run",
                "--credentials-file",
                "creds.json",
                TUNNEL_ID,
            ],
            "grace-period must be equal or less than 3m0s",
        ),
        (
            [
                "tunnel",
                "--edge",
                "127.0.0.1:1",
                "run",
                "--url",
                "http://127.0.0.1:1",
                "--unix-socket",
                "/tmp/s",
                "--credentials-file",
                "creds.json",
                TUNNEL_ID,
            ],
            "unix-socket",
        ),
        (
            [
                "tunnel",
                "--edge",
                "127.0.0.1:1",
                "--tag",
                "novalue",
                "run",
                "--credentials-file",
                "creds.json",
                TUNNEL_ID,
            ],
            "KEY=VALUE",
        ),
    ],
)
def test_config_errors(lab: Path, argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        settings_for(argv)


def test_bad_credentials_file_names_file_and_key(lab: Path) -> None:
    (lab / "bad.json").write_text(f'{{"AccountTag": "a", "TunnelSecret": "!!!", "TunnelID": "{TUNNEL_ID}"}}')
    with pytest.raises(ConfigError) as info:
        settings_for(["tunnel", "--edge", "127.0.0.1:1", "run", "--credentials-file", "bad.json", TUNNEL_ID])
    assert "bad.json" in str(info.value) and "TunnelSecret" in str(info.value)


@pytest.mark.parametrize(("proto", "token", "initial", "fallback"), [
    ("auto", False, "http2", False),  # cloudflared offline: no TXT answer for a credentials file
    ("auto", True, "quic", True),
    ("h2mux", False, "http2", False),
    ("http2", True, "http2", False),
    ("quic", False, "quic", False),
    ("QUIC", True, "quic", False),
])
def test_protocol_choice(lab: Path, proto: str, token: bool, initial: str, fallback: bool) -> None:
    """connection/protocol.go NewProtocolSelector, as it resolves offline."""
    if token:
        creds = json.loads((lab / "creds.json").read_text())
        raw = json.dumps({"a": creds["AccountTag"], "s": creds["TunnelSecret"], "t": creds["TunnelID"]})
        source = ["--token", base64.b64encode(raw.encode()).decode()]
    else:
        source = ["--credentials-file", "creds.json", TUNNEL_ID]
    settings, notes = settings_for(["tunnel", "--edge", "127.0.0.1:1", "run", "-p", proto, *source])
    assert settings.credentials.tunnel_id == uuid.UUID(TUNNEL_ID)
    assert (settings.protocol, settings.protocol_can_fall_back) == (initial, fallback)
    assert any("h2mux is no longer a supported protocol" in n for n in notes) == (proto == "h2mux")


# --- flag levels (urfave/cli wording) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["tunnel", "--dns-resolver-addrs", "127.0.0.1:53", "run"], "-dns-resolver-addrs"),
        (["tunnel", "--token", "x", "run"], "-token"),
        (["tunnel", "run", "--edge", "127.0.0.1:1"], "-edge"),
        (["tunnel", "run", "--ha-connections", "2"], "-ha-connections"),
        (["tunnel", "--no-such-flag", "run"], "-no-such-flag"),
    ],
)
def test_flag_on_the_wrong_level(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"Incorrect Usage. flag provided but not defined: {flag}" in err
    assert "Traceback" not in err


def test_go_flag_syntax_forms() -> None:
    command = cli.parse_command(
        [
            "tunnel",
            "-edge=127.0.0.1:1",
            "--ha-connections=2",
            "-no-autoupdate",
            "run",
            "--no-tls-verify=false",
            "--url",
            "-weird-but-a-value",
            "X",
        ]
    )
    assert command.tunnel.values["edge"] == ["127.0.0.1:1"]
    assert command.tunnel.values["ha-connections"] == 2
    assert command.tunnel.values["no-autoupdate"] is True
    assert command.run is not None
    assert command.run.values["no-tls-verify"] is False
    assert command.run.values["url"] == "-weird-but-a-value"
    assert command.args == ["X"]


def test_bad_flag_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tunnel", "--grace-period", "soon", "run"]) == 1
    assert 'invalid value "soon" for flag -grace-period' in capsys.readouterr().err
    assert cli.main(["tunnel", "--retries", "many", "run"]) == 1
    assert "-retries" in capsys.readouterr().err


def test_bad_env_value_names_the_variable(lab: Path) -> None:
    with pytest.raises(ConfigError, match="TUNNEL_RETRIES"):
        settings_for(["tunnel", "--edge", "127.0.0.1:1", "run", TUNNEL_ID], {"TUNNEL_RETRIES": "lots"})


# --- YAML errors with line numbers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("edge: [127.0.0.1:1\nloglevel: debug\n", 2, "invalid YAML"),
        ("loglevel: debug\nretries: many\n", 2, "retries: expected int"),
        ("grace-period: 5\n", 1, "duration"),
        ("ingress:\n  - hostname: a.test\n    service: http://127.0.0.1:1\n", 2, "last ingress rule"),
        (
            "ingress:\n  - service: http://127.0.0.1:1\n  - hostname: a.test\n    service: http://x:1\n",
            2,
            "will match every hostname",
        ),
        (
            "ingress:\n  - hostname: a.test\n    service: http://127.0.0.1:1/path\n"
            "  - service: http_status:404\n",
            3,
            "don't support proxying to a different path",
        ),
        (
            "ingress:\n  - hostname: a.test:8080\n    service: http://127.0.0.1:1\n"
            "  - service: http_status:404\n",
            2,
            "Hostname cannot contain a port",
        ),
        ("ingress:\n  - service: http_status:1000\n", 2, "invalid HTTP status code"),
        (
            "ingress:\n  - hostname: a.*.test\n    service: http://x:1\n  - service: http_status:404\n",
            2,
            "at most one wildcard",
        ),
        (
            "ingress:\n  - hostname: a.test\n    path: '(['\n    service: http://x:1\n"
            "  - service: http_status:404\n",
            3,
            "invalid regex",
        ),
        (
            "originRequest:\n  connectTimeout: forever\ningress:\n  - service: http://x:1\n",
            2,
            "invalid duration",
        ),
        ("- just\n- a list\n", 1, "must be a mapping"),
        ("loglevel: debug\nloglevel: info\n", 2, "defined twice"),
    ],
)
def test_yaml_errors_have_file_and_line(lab: Path, text: str, line: int, needle: str) -> None:
    (lab / "bad.yml").write_text(text)
    with pytest.raises(ConfigError) as info:
        settings_for(
            [
                "tunnel",
                "--config",
                "bad.yml",
                "--edge",
                "127.0.0.1:1",
                "run",
                "--credentials-file",
                "creds.json",
                TUNNEL_ID,
            ]
        )
    assert info.value.source == "bad.yml"
    assert info.value.line == line
    assert needle in str(info.value)
    assert str(info.value).startswith(f"bad.yml:{line}: ")


def test_main_prints_config_errors_without_traceback(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (lab / "bad.yml").write_text("ingress:\n  - hostname: a.test\n    service: http://127.0.0.1:1\n")
    code = cli.main(
        [
            "tunnel",
            "--config",
            "bad.yml",
            "--edge",
            "127.0.0.1:1",
            "run",
            "--credentials-file",
            "creds.json",
            TUNNEL_ID,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "tunnel-lab: bad.yml:2: The last ingress rule must match all URLs" in err
    assert "Traceback" not in err


def test_missing_config_file(lab: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        settings_for(["tunnel", "--config", "nope.yml", "--edge", "127.0.0.1:1", "run", TUNNEL_ID])


def test_unknown_config_keys_are_warned_with_lines(lab: Path) -> None:
    (lab / "c.yml").write_text("loglevel: info\nfrobnicate: 3\n")
    _, notes = settings_for(
        [
            "tunnel",
            "--config",
            "c.yml",
            "--edge",
            "127.0.0.1:1",
            "run",
            "--credentials-file",
            "creds.json",
            TUNNEL_ID,
        ]
    )
    assert any(n.startswith("c.yml:2: unused key 'frobnicate'") for n in notes)


def test_refused_and_warned_flags(lab: Path) -> None:
    with pytest.raises(ConfigError, match="socks5"):
        settings_for(
            [
                "tunnel",
                "--socks5",
                "--edge",
                "127.0.0.1:1",
                "run",
                "--credentials-file",
                "creds.json",
                TUNNEL_ID,
            ]
        )
    _, notes = settings_for(
        [
            "tunnel",
            "--region",
            "us",
            "--label",
            "x",
            "--edge",
            "127.0.0.1:1",
            "run",
            "--credentials-file",
            "creds.json",
            TUNNEL_ID,
        ]
    )
    # --label is used now (the management service's host_details), so only --region warns
    assert any(n.startswith("--region") for n in notes) and not any(n.startswith("--label") for n in notes)


# --- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("300ms", 0.3),
        ("1h", 3600.0),
        ("0", 0.0),
        ("1.5s", 1.5),
        ("2h45m", 9900.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5 s", "1x", "--1s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5, "5s"), (90, "1m30s"), (86400, "24h0m0s"), (0, "0s"), (0.5, "500ms"), (3600, "1h0m0s")],
)
def test_go_duration_strings(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text


# --- help, version, other commands --------------------------------------------------------------


def test_help_reads_like_cloudflared(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tunnel", "--help"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "NAME:",
        "USAGE:",
        "COMMANDS:",
        "OPTIONS:",
        "--edge value",
        "[$TUNNEL_EDGE]",
        "--grace-period value",
        "(default: 30s)",
        "--no-autoupdate",
    ):
        assert needle in out
    assert cli.main(["tunnel", "run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--token value" in out and "--credentials-file value, --cred-file value" in out
    assert cli.main(["--help"]) == 0
    assert "tunnel" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert "version 2026.8.2" in capsys.readouterr().out


def test_tunnel_without_run(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (lab / "t.yml").write_text(f"tunnel: {TUNNEL_ID}\n")
    assert cli.main(["tunnel", "--config", "t.yml"]) == 1
    assert f"tunnel run` to start tunnel {TUNNEL_ID}" in capsys.readouterr().err


def test_run_hands_settings_to_the_runtime(
    lab: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[TunnelSettings] = []

    async def run_tunnel(settings: TunnelSettings) -> int:
        seen.append(settings)
        return 0

    fake = types.ModuleType("tunnel_lab.connector.runtime")
    fake.run_tunnel = run_tunnel  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tunnel_lab.connector.runtime", fake)
    monkeypatch.setattr("tunnel_lab.connector.runtime", fake, raising=False)
    code = cli.main(
        [
            "tunnel",
            "--edge",
            "127.0.0.1:1",
            "--loglevel",
            "debug",
            "run",
            "--credentials-file",
            "creds.json",
            "--url",
            "http://127.0.0.1:9",
            TUNNEL_ID,
        ]
    )
    assert code == 0
    assert len(seen) == 1 and seen[0].loglevel == "debug"
    err = capsys.readouterr().err
    assert "INF Settings: map[credentials-file:creds.json edge:[127.0.0.1:1] loglevel:debug" in err
    assert f"INF Generated Connector ID: {seen[0].connector_id}" in err
    assert "Initial protocol http2" in err


def test_python_dash_m_connector_is_the_same_entry_point() -> None:
    import tunnel_lab.connector.__main__ as entry

    assert entry.main is cli.main


# --- tunnel ingress validate / rule ------------------------------------------------------------------

INGRESS_YML = """\
ingress:
  - hostname: app.example.test
    path: ^/api/
    service: http://127.0.0.1:8001
  - hostname: "*.example.test"
    service: https://127.0.0.1:8443
  - service: http_status:404
"""


def test_ingress_validate_ok(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (lab / "i.yml").write_text(INGRESS_YML)
    assert cli.main(["tunnel", "--config", "i.yml", "ingress", "validate"]) == 0
    assert capsys.readouterr().out == "Validating rules from i.yml\nOK\n"


def test_ingress_validate_failure_and_unused_keys(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (lab / "bad.yml").write_text("ingress:\n  - hostname: a.test\n    service: http://127.0.0.1:1\n")
    assert cli.main(["tunnel", "--config", "bad.yml", "ingress", "validate"]) == 1
    captured = capsys.readouterr()
    assert "Validating rules from bad.yml" in captured.out
    assert "Validation failed: bad.yml:2: The last ingress rule must match all URLs" in captured.err
    (lab / "extra.yml").write_text(INGRESS_YML + "frobnicate: 1\n")
    assert cli.main(["tunnel", "--config", "extra.yml", "ingress", "validate"]) == 0
    out = capsys.readouterr().out
    assert "Warning: unused keys detected in your config file" in out and "frobnicate" in out
    (lab / "empty.yml").write_text("loglevel: info\n")
    assert cli.main(["tunnel", "--config", "empty.yml", "ingress", "validate"]) == 1
    assert "doesn't contain any ingress rules" in capsys.readouterr().err


def test_ingress_validate_json_and_url_conflict(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = json.dumps(
        {"ingress": [{"hostname": "a.test", "service": "http://x:1"}, {"service": "http_status:404"}]}
    )
    assert cli.main(["tunnel", "ingress", "validate", "--json", rules]) == 0
    assert capsys.readouterr().out == "Validating rules from cmdline flag --json\nOK\n"
    (lab / "i.yml").write_text(INGRESS_YML)
    assert cli.main(["tunnel", "--config", "i.yml", "--url", "http://x:1", "ingress", "validate"]) == 1
    assert "can't set the --url flag" in capsys.readouterr().err


def test_ingress_validate_without_any_config(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tunnel", "ingress", "validate"]) == 1
    assert "No configuration file was found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "index", "service"),
    [
        ("https://app.example.test/api/users", 0, "http://127.0.0.1:8001"),
        ("https://app.example.test:8443/web", 1, "https://127.0.0.1:8443"),
        ("http://other.test/", 2, "http_status:404"),
    ],
)
def test_ingress_rule(
    lab: Path, capsys: pytest.CaptureFixture[str], url: str, index: int, service: str
) -> None:
    (lab / "i.yml").write_text(INGRESS_YML)
    assert cli.main(["tunnel", "--config", "i.yml", "ingress", "rule", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Using rules from i.yml\nMatched rule #{index}\n")
    assert f"\tservice: {service}" in out


def test_ingress_rule_needs_a_url_with_a_host(lab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (lab / "i.yml").write_text(INGRESS_YML)
    assert cli.main(["tunnel", "--config", "i.yml", "ingress", "rule"]) == 1
    assert "expects a single argument" in capsys.readouterr().err
    assert cli.main(["tunnel", "--config", "i.yml", "ingress", "rule", "just/a/path"]) == 1
    assert "doesn't have a hostname" in capsys.readouterr().err


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f.name)
def test_every_flag_is_accepted_exactly_on_its_levels(flag: Flag) -> None:
    value = {"bool": [], "dur": ["5s"], "int": ["3"], "uint": ["3"]}.get(flag.kind, ["v"])
    for level in ("T", "R"):
        for name in flag.names:
            argv = [("--" if len(name) > 1 else "-") + name, *value]
            if level in flag.levels:
                assert parse_level(argv, level).args == []
            else:
                with pytest.raises(UsageError, match=f"flag provided but not defined: -{name}$"):
                    parse_level(argv, level)


def test_flag_after_the_tunnel_argument_is_explained(lab: Path) -> None:
    with pytest.raises(UsageError, match="must come before the tunnel argument"):
        settings_for(
            [
                "tunnel",
                "--edge",
                "127.0.0.1:1",
                "run",
                "--credentials-file",
                "creds.json",
                TUNNEL_ID,
                "--url",
                "http://x:1",
            ]
        )


def test_false_booleans_do_not_warn(lab: Path) -> None:
    _, notes = settings_for(
        [
            "tunnel",
            "--edge",
            "127.0.0.1:1",
            "--post-quantum=false",
            "run",
            "--credentials-file",
            "creds.json",
            TUNNEL_ID,
        ]
    )
    assert not any("post-quantum" in n for n in notes)


@pytest.mark.parametrize(
    "error",
    [
        ExceptionGroup("nursery", [ConfigError("metrics address taken", source="--metrics")]),
        OSError(98, "Address already in use"),
        ExceptionGroup("outer", [ExceptionGroup("inner", [OSError(13, "Permission denied", "ca.pem")])]),
    ],
)
def test_runtime_errors_become_one_line(
    lab: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: BaseException
) -> None:
    async def run_tunnel(settings: TunnelSettings) -> int:
        raise error

    fake = types.ModuleType("tunnel_lab.connector.runtime")
    fake.run_tunnel = run_tunnel  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tunnel_lab.connector.runtime", fake)
    monkeypatch.setattr("tunnel_lab.connector.runtime", fake, raising=False)
    code = cli.main(["tunnel", "--edge", "127.0.0.1:1", "run", "--credentials-file", "creds.json", TUNNEL_ID])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tunnel-lab: ")


def test_secrets_are_never_logged(
    lab: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def run_tunnel(settings: TunnelSettings) -> int:
        return 0

    fake = types.ModuleType("tunnel_lab.connector.runtime")
    fake.run_tunnel = run_tunnel  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tunnel_lab.connector.runtime", fake)
    monkeypatch.setattr("tunnel_lab.connector.runtime", fake, raising=False)
    creds_text = (lab / "creds.json").read_text()
    token = make_token(parse_credentials_file(creds_text, "creds.json"))
    monkeypatch.setenv("TUNNEL_TOKEN", token)
    monkeypatch.setenv("SECRET_ID", "s3cr3t-value")
    assert (
        cli.main(
            [
                "tunnel",
                "--edge",
                "127.0.0.1:1",
                "--bastion=false",
                "run",
                "--credentials-contents",
                creds_text,
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert (
        token not in err
        and "s3cr3t-value" not in err
        and "WSQ+2zDXQRqrBJbySwGBr3k2pMDsoESAn0NG82nH9dA=" not in err
    )
    assert "TUNNEL_TOKEN:*****" in err and "token:*****" in err


# --- issue 18: edge discovery, quick tunnels, admin commands --------------------------------------------


def discovered(percentages: dict[str, int] | None) -> Any:
    from tunnel_lab.connector.edge_discovery import Discovery

    def discover(ip_version: str) -> Discovery:
        assert ip_version == "auto"
        return Discovery(addresses=("127.0.1.1:7844", "127.0.2.1:7844"), protocol_percentages=percentages)

    return discover


def test_without_edge_the_edge_is_discovered_and_the_protocol_record_followed(lab: Path) -> None:
    command = cli.parse_command(["tunnel", "run", "--credentials-file", "creds.json", TUNNEL_ID])
    res, notes = cli.resolve_run(command, {})
    settings = cli.build_settings(res, command.args, notes, discover=discovered({"quic": 100, "http2": 100}))
    assert settings.edge_addrs == ("127.0.1.1:7844", "127.0.2.1:7844") and settings.ha_connections == 2
    assert (settings.protocol, settings.protocol_can_fall_back) == ("quic", True)
    settings = cli.build_settings(res, command.args, [], discover=discovered(None))
    assert settings.protocol == "http2"  # no answer: cloudflared starts with http2


def test_edge_ip_version_filters_discovered_regions_and_a_bind_address_overrides_it(lab: Path) -> None:
    from tunnel_lab.connector.edge_discovery import Discovery

    regions = (("[2001:db8:1::1]:7844", "127.0.1.1:7844"), ("[2001:db8:2::1]:7844", "127.0.2.1:7844"))

    def settings_for(*flags: str, found: tuple[tuple[str, ...], ...] = regions) -> tuple[Any, list[str]]:
        command = cli.parse_command(["tunnel", *flags, "run", "--credentials-file", "creds.json", TUNNEL_ID])
        res, notes = cli.resolve_run(command, {})
        discovery = Discovery(addresses=(), protocol_percentages=None, regions=found)
        return cli.build_settings(res, command.args, notes, discover=lambda _v: discovery), notes

    settings, notes = settings_for("--edge-ip-version", "6", "--edge-bind-address", "127.0.0.1")
    assert (settings.edge_ip_version, settings.edge_regions, settings.ha_connections) == ("4", regions, 2)
    assert 'Overriding edge-ip-version error="IPv4 bind address is specified, but edge-ip-version is IPv6" ' \
        "edgeIPVersion=4" in notes
    settings, notes = settings_for("--edge-ip-version", "6", found=(regions[0][1:], regions[1][1:]))
    assert settings.ha_connections == 0  # the supervisor then fails as cloudflared does (no free address)
    assert "You requested 4 HA connections but I can give you at most 0." in notes
    with pytest.raises(ConfigError, match="invalid value for edge-ip-version: 5"):
        settings_for("--edge-ip-version", "5")
    with pytest.raises(ConfigError, match="invalid value for edge-bind-address: nope"):
        settings_for("--edge-bind-address", "nope")


def test_a_quick_tunnel_runs_its_own_credentials_on_one_connection(lab: Path) -> None:
    from tunnel_lab.connector.cfapi import QuickTunnel

    quick = QuickTunnel(id=uuid.UUID(OTHER_ID), name="q", hostname="a-b.trycloudflare.com",
                        account_tag="acct", secret=b"s" * 32)
    command = cli.parse_command(["tunnel", "--url", "http://127.0.0.1:8000", "run"])
    res, notes = cli.resolve_run(command, {})
    settings = cli.build_settings(res, [], notes, discover=discovered(None), quick=quick)
    assert settings.credentials.tunnel_id == uuid.UUID(OTHER_ID)
    assert settings.credentials.account_tag == "acct"
    assert (settings.ha_connections, settings.protocol, settings.quick_tunnel_url) == (
        1, "quic", "a-b.trycloudflare.com")


def test_admin_commands_are_routed_and_unknown_flags_answered_as_urfave(
    lab: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.parse_command(["tunnel", "--origincert", "c.pem", "route", "dns", "a", "b"]).path == (
        "tunnel", "admin")
    assert cli.main(["tunnel", "list", "--bogus"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Incorrect Usage: flag provided but not defined: -bogus\n\nNAME:\n")
    assert cli.main(["tunnel", "create"]) == 255
    assert "requires exactly 1 argument" in capsys.readouterr().err
    assert cli.main(["tunnel", "--origincert", "missing.pem", "list"]) == 1
    err = capsys.readouterr().err
    assert "Error locating origin cert: cannot find a valid certificate at the path" in err


def test_ascii_box() -> None:
    assert cli.ascii_box(["ab", "c"]) == ["+------+", "|  ab  |", "|  c   |", "+------+"]

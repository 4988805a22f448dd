"""Ingress rules: validation, matching, remote configuration, JSON views (docs/protocol.md §8, §4.3, §3.8)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.connector import ingress
from tunnel_lab.connector.settings import (
    HelloWorldService,
    HTTPService,
    IngressRule,
    OriginRequestConfig,
    StatusService,
    StreamService,
    WarpRoutingConfig,
)
from tunnel_lab.wire.errors import ConfigError, StreamConversionError

DEFAULTS = OriginRequestConfig()


def rules(raw: list[dict[str, Any]], **kw: Any) -> tuple[IngressRule, ...]:
    return ingress.parse_ingress(raw, source="t.yml", defaults=DEFAULTS, **kw)


RULES = rules(
    [
        {"hostname": "app.example.test", "service": "http://127.0.0.1:8001"},
        {"hostname": "app.example.test", "path": r"^/api/", "service": "http://127.0.0.1:8002"},
        {"hostname": "*.example.test", "path": r"\.png$", "service": "http://127.0.0.1:8003"},
        {"hostname": "*.example.test", "service": "https://127.0.0.1:8004"},
        {"hostname": "bücher.example", "service": "http_status:418"},
        {"hostname": "ssh.lab.test", "service": "ssh://127.0.0.1:2222"},
        {"service": "http_status:404"},
    ]
)


@pytest.mark.parametrize(
    ("host", "path", "index"),
    [
        ("app.example.test", "/", 0),
        ("app.example.test:8443", "/api/x", 0),  # first match wins even though rule 1 is more specific
        ("img.example.test", "/a/b.png", 2),
        (
            "img.example.test",
            "/a/b.png.txt",
            3,
        ),  # the regex is searched in the path (no query: the caller strips it)
        ("deep.sub.example.test", "/", 3),  # wildcard is a suffix match
        ("example.test", "/", 6),  # the bare domain is not covered by *.example.test
        ("bücher.example", "/", 4),
        ("xn--bcher-kva.example", "/", 4),  # punycode form of the rule's hostname
        ("xn--bcher-kva.example:443", "/", 4),
        ("ssh.lab.test", "/", 5),
        ("unknown.test", "/", 6),
        ("[::1]:8080", "/", 6),
    ],
)
def test_match_rule(host: str, path: str, index: int) -> None:
    assert ingress.match_rule(RULES, host, path).index == index


def test_path_rule_on_a_host() -> None:
    rs = rules(
        [
            {"hostname": "a.test", "path": "^/api", "service": "http://127.0.0.1:1"},
            {"hostname": "a.test", "service": "http://127.0.0.1:2"},
            {"path": "/static/", "service": "http://127.0.0.1:3"},  # path-only rule: any host
            {"service": "http_status:404"},
        ]
    )
    assert ingress.match_rule(rs, "a.test", "/api/v1").index == 0
    assert ingress.match_rule(rs, "a.test", "/web").index == 1
    assert ingress.match_rule(rs, "b.test", "/x/static/y").index == 2  # regex search, not anchored
    assert ingress.match_rule(rs, "b.test", "/x").index == 3


def test_path_is_matched_percent_decoded_like_go() -> None:
    rs = rules([{"path": "^/a b$", "service": "http://127.0.0.1:1"}, {"service": "http_status:404"}])
    assert ingress.match_rule(rs, "x.test", "/a%20b").index == 0
    assert ingress.match_rule(rs, "x.test", "/a%2Xb").index == 1


def test_services_parsed() -> None:
    rs = rules(
        [
            {"hostname": "a", "service": "ws://127.0.0.1:9"},
            {"hostname": "b", "service": "wss://example.test"},
            {"hostname": "c", "service": "tcp://127.0.0.1"},
            {"hostname": "d", "service": "rdp://[::1]"},
            {"hostname": "e", "service": "hello_world"},
            {"hostname": "f", "service": "http://[::1]:8080"},
            {"service": "http_status:503"},
        ]
    )
    assert rs[0].service == HTTPService(scheme="http", host="127.0.0.1", port=9)
    assert rs[1].service == HTTPService(scheme="https", host="example.test", port=443)
    assert rs[2].service == StreamService(scheme="tcp", host="127.0.0.1", port=7864)
    assert rs[2].service_text == "tcp://127.0.0.1:7864"
    assert rs[3].service == StreamService(scheme="rdp", host="::1", port=3389)
    assert rs[3].service_text == "rdp://[::1]:3389"
    assert rs[4].service == HelloWorldService()
    assert rs[5].service == HTTPService(scheme="http", host="::1", port=8080)
    assert rs[5].service_text == "http://[::1]:8080"
    assert rs[6].service == StatusService(status=503)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ([{"hostname": "a", "service": "http://x:1"}], "last ingress rule must match all URLs"),
        (
            [{"hostname": "*", "service": "http://x:1"}, {"service": "http://y:1"}],
            "will match every hostname",
        ),
        ([{"service": "http://x:1/p"}], "don't support proxying to a different path"),
        ([{"service": "127.0.0.1:8080"}], "scheme and a hostname"),
        ([{"service": "http_status:99"}], "invalid HTTP status code: 99"),
        ([{"service": "http_status:abc"}], "invalid HTTP status code"),
        ([{"service": "bastion"}], "not supported by tunnel-lab's connector"),
        (
            [{"hostname": "a:1", "service": "http://x:1"}, {"service": "http_status:404"}],
            "cannot contain a port",
        ),
        ([{"hostname": "a.*", "service": "http://x:1"}, {"service": "http_status:404"}], "wildcard"),
        (
            [{"hostname": "a", "path": "(", "service": "http://x:1"}, {"service": "http_status:404"}],
            "Rule #1 has an invalid regex",
        ),
        ([{"hostname": "a"}, {"service": "http_status:404"}], "has no service"),
        (["service: x"], "must be a mapping"),
        ([{"service": "http://x:1", "originRequest": {"connectTimeout": 5}}], "invalid duration"),
        ([{"service": "http://x:1", "originRequest": {"noTLSVerify": "yes"}}], "true or false"),
        ([{"service": "http://x:1", "originRequest": {"keepAliveConnections": "many"}}], "integer"),
    ],
)
def test_validation_errors(raw: list[Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        rules(raw)
    assert info.value.source == "t.yml"


def test_error_lines_come_from_line_of() -> None:
    lines = {("ingress", 1): 7, ("ingress", 1, "hostname"): 8}

    def line_of(*keys: Any) -> int | None:
        return lines.get(tuple(keys))

    with pytest.raises(ConfigError) as info:
        rules(
            [{"service": "http://x:1", "hostname": "a"}, {"hostname": "b:1", "service": "http://x:1"}],
            line_of=line_of,
        )
    assert info.value.line == 8


def test_catch_all_star_and_url_and_hello() -> None:
    rs = rules([{"hostname": "*", "service": "http://127.0.0.1:1"}])
    assert ingress.match_rule(rs, "anything", "/").index == 0
    single = ingress.parse_ingress(None, source="", defaults=DEFAULTS, url="localhost:8080")
    assert single[0].service == HTTPService(scheme="http", host="localhost", port=8080)
    assert single[0].service_text == "http://localhost:8080"
    hello = ingress.parse_ingress(None, source="", defaults=DEFAULTS, url="http://x:1", hello_world=True)
    assert hello[0].service == HelloWorldService()
    warnings: list[str] = []
    none = ingress.parse_ingress(None, source="", defaults=DEFAULTS, warnings=warnings)
    assert none[0].service == StatusService(status=503) and warnings == [ingress.NO_RULES_WARNING]


def test_origin_request_inheritance_and_warnings() -> None:
    defaults = ingress.parse_origin_request(
        {"connectTimeout": "5s", "noTLSVerify": True}, DEFAULTS, source="t.yml", where="originRequest"
    )
    warnings: list[str] = []
    rs = ingress.parse_ingress(
        [
            {
                "hostname": "a",
                "service": "https://x:1",
                "originRequest": {"noTLSVerify": False, "caPool": "p.pem", "proxyType": "socks", "bogus": 1},
            },
            {"service": "http://y:1"},
        ],
        source="t.yml",
        defaults=defaults,
        warnings=warnings,
    )
    assert rs[0].origin_request.connect_timeout == 5.0
    assert rs[0].origin_request.no_tls_verify is False
    assert rs[0].origin_request.ca_pool == "p.pem"
    assert rs[1].origin_request.no_tls_verify is True
    assert any("proxyType" in w for w in warnings) and any("bogus" in w for w in warnings)
    assert ingress.rules_json(rs) == [
        {
            "hostname": "a",
            "service": "https://x:1",
            "originRequest": {"connectTimeout": 5, "caPool": "p.pem"},
        },
        {"service": "http://y:1", "originRequest": {"connectTimeout": 5, "noTLSVerify": True}},
    ]


def test_local_config_json_shape() -> None:
    payload = ingress.local_config_json(
        {"protocol": "http2", "loglevel": "debug"},
        RULES[-2:],
        WarpRoutingConfig(connect_timeout=1.5, max_active_flows=10),
    )
    assert payload.startswith(b'{"__configuration_flags":{"loglevel":"debug","protocol":"http2"},"ingress":[')
    doc = json.loads(payload)
    assert doc["ingress"][0] == {
        "hostname": "ssh.lab.test",
        "service": "ssh://127.0.0.1:2222",
        "originRequest": {},
    }
    assert doc["warp-routing"] == {"connectTimeout": 1.5, "maxActiveFlows": 10}
    assert b"__configuration_flags" not in ingress.local_config_json({}, RULES, WarpRoutingConfig())


# --- remote configuration ------------------------------------------------------------------------


def remote(version: int, config: Any) -> bytes:
    return json.dumps({"version": version, "config": config}).encode()


def test_parse_remote_config() -> None:
    body = remote(
        3,
        {
            "originRequest": {"connectTimeout": 7},
            "ingress": [
                {
                    "hostname": "a.test",
                    "service": "http://127.0.0.1:1",
                    "originRequest": {"noTLSVerify": True},
                },
                {"service": "http_status:404"},
            ],
            "warp-routing": {"connectTimeout": 2, "maxActiveFlows": 5},
        },
    )
    version, rs, warp = ingress.parse_remote_config(body)
    assert version == 3
    assert rs[0].origin_request.connect_timeout == 7.0 and rs[0].origin_request.no_tls_verify
    assert rs[1].service == StatusService(status=404)
    assert warp == WarpRoutingConfig(connect_timeout=2.0, max_active_flows=5)


def test_remote_config_keys_are_case_insensitive_like_go() -> None:
    body = json.dumps(
        {
            "Version": 1,
            "Config": {
                "Ingress": [{"Service": "http://127.0.0.1:1", "OriginRequest": {"notlsverify": True}}]
            },
        }
    )
    version, rs, _ = ingress.parse_remote_config(body.encode())
    assert version == 1 and rs[0].origin_request.no_tls_verify


def test_remote_config_empty_ingress_means_503() -> None:
    _, rs, _ = ingress.parse_remote_config(remote(0, {"ingress": []}))
    assert rs[0].service == StatusService(status=503)


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b'{"version": "one"}', b'{"version": 4294967296}'])
def test_remote_config_undecodable(body: bytes) -> None:
    with pytest.raises(StreamConversionError):
        ingress.parse_remote_config(body)


@pytest.mark.parametrize(
    "config",
    [
        {"ingress": [{"hostname": "a", "service": "http://x:1"}]},  # last rule not catch-all
        {
            "ingress": [{"service": "http://x:1", "originRequest": {"connectTimeout": "5s"}}]
        },  # JSON wants seconds
        {"ingress": "nope"},
        "nope",
    ],
)
def test_remote_config_invalid(config: Any) -> None:
    with pytest.raises(ConfigError):
        ingress.parse_remote_config(remote(1, config))


def test_remote_config_version_first() -> None:
    version, config = ingress.remote_config_version(remote(9, {"ingress": "invalid"}))
    assert version == 9 and config == {"ingress": "invalid"}


# --- properties ---------------------------------------------------------------------------------------

label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
hostnames = st.lists(label, min_size=1, max_size=4).map(".".join)


@given(hostnames, hostnames, st.integers(min_value=1, max_value=65535))
def test_wildcard_is_a_suffix_match_and_port_is_ignored(sub: str, domain: str, port: int) -> None:
    rs = rules([{"hostname": f"*.{domain}", "service": "http://127.0.0.1:1"}, {"service": "http_status:404"}])
    assert ingress.match_rule(rs, f"{sub}.{domain}:{port}", "/").index == 0
    assert ingress.match_rule(rs, domain, "/").index == 1


@given(hostnames, st.text(max_size=30))
def test_unmatched_requests_fall_to_the_last_rule(host: str, path: str) -> None:
    rs = rules(
        [{"hostname": "never.invalid", "service": "http://127.0.0.1:1"}, {"service": "http_status:404"}]
    )
    assert ingress.match_rule(rs, host, path) is rs[-1]


@given(st.lists(hostnames, min_size=1, max_size=5, unique=True))
def test_rules_json_round_trips_through_remote_config(hosts: list[str]) -> None:
    raw = [{"hostname": h, "service": f"http://127.0.0.1:{i + 1}"} for i, h in enumerate(hosts)]
    raw.append({"service": "http_status:404"})
    rs = rules(raw)
    _, again, _ = ingress.parse_remote_config(remote(1, {"ingress": ingress.rules_json(rs)}))
    assert again == rs


@pytest.mark.parametrize(
    ("authority", "host"),
    [("a.test:80", "a.test"), ("a.test", "a.test"), ("[::1]:80", "::1"), ("::1", "::1"), ("[::1]", "[::1]")],
)
def test_strip_port(authority: str, host: str) -> None:
    assert ingress.strip_port(authority) == host


@pytest.mark.parametrize(
    ("authority", "ok"),
    [
        ("127.0.0.1:80", True),
        ("[::1]:22", True),
        ("a.test:80", False),
        ("127.0.0.1", False),
        ("127.0.0.1:0", False),
    ],
)
def test_is_ip_port(authority: str, ok: bool) -> None:
    assert ingress.is_ip_port(authority) is ok

"""connector.tail: flags, filters, the WebSocket target and the printed lines (cloudflared's tail)."""

from __future__ import annotations

import base64
import json

import pytest

from tunnel_lab.connector import tail
from tunnel_lab.connector.flags import UsageError
from tunnel_lab.connector.management import ManagementError


def token(iss: str = "") -> str:
    def b64(doc: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    claims = {"tun": {"id": "t", "account_tag": "a"}, "actor": {"id": "me"}, "iss": iss}
    return f"{b64({'alg': 'ES256'})}.{b64(claims)}.c2ln"


def test_flags_environment_and_the_token_subcommand() -> None:
    opts = tail.parse_tail(
        ["--level", "info", "--event", "http", "--event=tcp", "TID"], {"TUNNEL_MANAGEMENT_CONNECTOR": "c"}
    )
    assert opts.args == ["TID"] and opts.get("level") == "info" and opts.get("event") == ["http", "tcp"]
    assert opts.get("connector-id") == "c" and opts.get("sample") == "1.0"
    assert tail.parse_tail(["token", "TID"], {}).subcommand == "token"
    with pytest.raises(UsageError, match="flag provided but not defined: -nope"):
        tail.parse_tail(["--nope"], {})


def test_filters_as_cloudflared_sends_them() -> None:
    assert tail.parse_filters(tail.parse_tail([], {})) == {"level": "debug", "sampling": 1}
    got = tail.parse_filters(tail.parse_tail(["--event", "http", "--level", "warn", "--sample", "0.5"], {}))
    assert got == {"events": ["http"], "level": "warn", "sampling": 0.5}
    assert tail.parse_filters(tail.parse_tail(["--level", "", "--sample", "0.2"], {})) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--level", "loud"], "invalid --level filter provided"),
        (["--event", "smtp"], "invalid --event filter provided"),
        (["--sample", "0"], "invalid --sample value provided"),
        (["--sample", "1.5"], "invalid --sample value provided"),
    ],
)
def test_bad_filters(argv: list[str], message: str) -> None:
    with pytest.raises(ManagementError, match=message):
        tail.parse_filters(tail.parse_tail(argv, {}))


def test_the_target() -> None:
    t = token()
    host, target = tail.build_target(tail.parse_tail([], {}), t)
    assert (host, target) == ("management.argotunnel.com", f"/logs?access_token={t}")
    opts = tail.parse_tail(["--connector-id", "8EDFE971-F0DF-4522-8BC2-4808FF9298F5"], {})
    assert tail.build_target(opts, t)[1].endswith("&connector_id=8edfe971-f0df-4522-8bc2-4808ff9298f5")
    assert (
        tail.build_target(tail.parse_tail([], {}), token(iss="fed-tunnelstore"))[0]
        == "management.fed.argotunnel.com"
    )
    with pytest.raises(ManagementError, match="failed to determine if token is FED"):
        tail.build_target(tail.parse_tail([], {}), "x.y")
    with pytest.raises(ManagementError, match="unabled to parse 'connector-id'"):
        tail.build_target(tail.parse_tail(["--connector-id", "nope"], {}), t)


def test_lines_print_as_cloudflared_prints_them() -> None:
    event = {
        "time": "2026-12-04T20:17:58Z",
        "level": "info",
        "message": "Updated to new configuration",
        "fields": {"version": 2, "config": "<x & y>"},
    }
    assert tail.format_line(event) == (
        "2026-12-04T20:17:58Z info cloudflared Updated to new configuration "
        '{"config":"\\u003cx \\u0026 y\\u003e","version":2}'
    )
    assert tail.format_line({"time": "t", "message": "m", "event": "http"}) == "t debug http m null"
    assert json.loads(tail.format_json({**event, "event": ""})) == {k: v for k, v in event.items()}
    assert list(json.loads(tail.format_json({"fields": {}, "message": "m", "time": "t"}))) == [
        "time",
        "message",
    ]

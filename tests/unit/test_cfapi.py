"""connector.cfapi: cloudflared's v4 API requests and how it reads the answers."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tunnel_lab.connector import cfapi
from tunnel_lab.connector.cfapi import ApiError, ApiResponse

TID = uuid.UUID("11111111-2222-4333-8444-555555555555")
CLIENT = cfapi.ApiClient("https://api.example/client/v4/", "ACCT", "ZONE")


def test_requests_are_cloudflareds() -> None:
    create = CLIENT.create_tunnel("app", b"\x01" * 32)
    assert (create.method, create.url) == ("POST", "https://api.example/client/v4/accounts/ACCT/cfd_tunnel")
    assert json.loads(create.body or b"") == {
        "name": "app",
        "tunnel_secret": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
    }
    assert CLIENT.delete_tunnel(TID, True).url.endswith(f"/cfd_tunnel/{TID}?cascade=true")
    assert CLIENT.delete_tunnel(TID, False).url.endswith(f"/cfd_tunnel/{TID}")
    assert CLIENT.tunnel_token(TID).url.endswith(f"/cfd_tunnel/{TID}/token")
    assert CLIENT.management_token(TID).method == "POST"
    assert CLIENT.management_token(TID).url.endswith(f"/cfd_tunnel/{TID}/management/logs")
    assert CLIENT.cleanup_connections(TID, None).url.endswith(f"/{TID}/connections")
    assert CLIENT.cleanup_connections(TID, TID).url.endswith(f"/{TID}/connections?client_id={TID}")
    dns = CLIENT.route_dns(TID, "app.example.com", False)
    assert (dns.method, dns.url) == ("PUT", f"https://api.example/client/v4/zones/ZONE/tunnels/{TID}/routes")
    assert json.loads(dns.body or b"") == {
        "type": "dns",
        "user_hostname": "app.example.com",
        "overwrite_existing": False,
    }
    assert CLIENT.route_by_ip("10.0.0.1").url.endswith("/teamnet/routes/ip/10.0.0.1")
    assert CLIENT.delete_route(TID).method == "DELETE"


def test_queries_are_sorted_as_go_encodes_them() -> None:
    filt = cfapi.TunnelFilter({"name": "a b", "is_deleted": "false"})
    assert CLIENT.list_tunnels(filt, 2).url.endswith("/cfd_tunnel?is_deleted=false&name=a%20b&page=2")
    routes = CLIENT.list_routes({"is_deleted": "false", "network_superset": "10.0.0.0/8"}, 1)
    assert routes.url.endswith(
        "/teamnet/routes?is_deleted=false&network_superset=10.0.0.0%2F8&page=1&tun_types=cfd_tunnel"
    )


@pytest.mark.parametrize("name", ["", str(TID)])
def test_create_refuses_what_cloudflared_refuses(name: str) -> None:
    with pytest.raises(ApiError, match="tunnel name required" if not name else "UUIDs as tunnel names"):
        CLIENT.create_tunnel(name, b"x" * 32)


def envelope(**fields: object) -> bytes:
    return json.dumps({"success": True, "errors": [], "messages": [], "result": None, **fields}).encode()


def test_envelope_result_and_paging() -> None:
    env = cfapi.decode_envelope(
        ApiResponse(
            200,
            "application/json",
            envelope(result=[1], result_info={"count": 1, "per_page": 20, "total_count": 1, "page": 1}),
        )
    )
    assert (env.result, env.count, env.per_page, env.total_count) == ([1], 1, 20, 1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "failed to decode response"),
        (b"[]", "failed to decode response"),
        (envelope(success=False), "API call failed"),
        (envelope(errors=[{"code": 1003, "message": "taken"}]), "^code: 1003, reason: taken$"),
        (
            envelope(errors=[{"code": 1, "message": "a"}, {"code": 2, "message": "b"}]),
            r"^API errors: code: 1, reason: a; code: 2, reason: b; $",
        ),
    ],
)
def test_envelope_errors(body: bytes, message: str) -> None:
    with pytest.raises(ApiError, match=message):
        cfapi.decode_envelope(ApiResponse(200, "application/json", body))


def test_status_errors_read_the_body_only_for_exactly_application_json() -> None:
    body = envelope(success=False, errors=[{"code": 10000, "message": "Authentication error"}])
    error = cfapi.status_error("list tunnels", ApiResponse(403, "application/json", body))
    assert str(error) == "Failed to list tunnels: code: 10000, reason: Authentication error"
    assert (
        str(cfapi.status_error("x", ApiResponse(403, "application/json; charset=utf-8", body)))
        == "unauthorized"
    )
    assert str(cfapi.status_error("x", ApiResponse(400, "text/plain", b""))) == "incorrect request parameters"
    assert str(cfapi.status_error("x", ApiResponse(404, "", b""))) == "not found"
    assert (
        str(cfapi.status_error("get tunnel", ApiResponse(503, "", b"")))
        == "API call to get tunnel failed with status 503: Service Unavailable"
    )
    assert cfapi.status_error("delete tunnel", ApiResponse(200, "application/json", envelope())) is None


def test_times_print_as_go_prints_them() -> None:
    t = cfapi.parse_time("2026-12-04T20:03:40.123456789Z")
    assert cfapi.go_rfc3339(t) == "2026-12-04T20:03:40Z"
    assert cfapi.go_time_string(t) == "2026-12-04 20:03:40.123456 +0000 UTC"
    assert cfapi.go_time_string(cfapi.parse_time("2026-12-04T20:03:40Z")) == "2026-12-04 20:03:40 +0000 UTC"
    east = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert cfapi.go_rfc3339(east) == "2026-01-02T03:04:05+02:00"
    assert cfapi.go_time_string(east) == "2026-01-02 03:04:05 +0200 +0200"
    assert cfapi.parse_time(None) == cfapi.ZERO_TIME == datetime(1, 1, 1, tzinfo=UTC)
    assert cfapi.go_rfc3339(cfapi.ZERO_TIME) == "0001-01-01T00:00:00Z"
    with pytest.raises(ApiError, match="bad time"):
        cfapi.parse_time("yesterday")


def test_models_decode_and_refuse_the_wrong_types() -> None:
    tunnel = cfapi.Tunnel.from_json(
        {
            "id": str(TID),
            "name": "app",
            "created_at": "2026-12-04T20:03:40Z",
            "deleted_at": None,
            "connections": [
                {
                    "colo_name": "LAB1",
                    "id": str(TID),
                    "is_pending_reconnect": False,
                    "origin_ip": "127.0.0.1",
                    "opened_at": "2026-12-04T20:03:41Z",
                }
            ],
        }
    )
    assert tunnel.connections[0].colo_name == "LAB1" and tunnel.deleted_at == cfapi.ZERO_TIME
    assert tunnel.to_json()["deleted_at"] == "0001-01-01T00:00:00Z"
    with pytest.raises(ApiError, match="not a UUID"):
        cfapi.Tunnel.from_json({"id": "nope"})
    with pytest.raises(ApiError, match="not an object"):
        cfapi.ActiveClient.from_json([])
    with pytest.raises(ApiError, match="not a list"):
        cfapi.Tunnel.from_json({"id": str(TID), "connections": {}})
    assert cfapi.DetailedRoute.from_json({}).is_zero


def test_quick_tunnel_answers() -> None:
    good = json.dumps(
        {
            "success": True,
            "result": {
                "id": str(TID),
                "name": "q",
                "hostname": "a.trycloudflare.com",
                "account_tag": "acct",
                "secret": "AAAA",
            },
        }
    ).encode()
    quick = cfapi.decode_quick_tunnel(good)
    assert (quick.id, quick.hostname, quick.secret) == (TID, "a.trycloudflare.com", b"\0\0\0")
    assert "AAAA" not in repr(quick)
    with pytest.raises(ApiError, match="failed to unmarshal quick Tunnel"):
        cfapi.decode_quick_tunnel(b"<html>")
    with pytest.raises(ApiError, match="failed to parse quick Tunnel ID: invalid UUID length: 0"):
        cfapi.decode_quick_tunnel(json.dumps({"success": False, "errors": [{"code": 1}]}).encode())

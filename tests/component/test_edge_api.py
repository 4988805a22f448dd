"""The management API and fault injection."""

from __future__ import annotations

import json
import ssl

import trio

from tests.component.test_edge_support import (
    connector,
    dial_edge,
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
    wait_history,
)
from tunnel_lab.wire.registration import ConnectionDetails, RegistrationError


async def api(edge, method: str, path: str, body=None, *, token: str | None = None):
    headers = [(b"authorization", f"Bearer {token or edge.api_token}".encode())]
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        headers.append((b"content-type", b"application/json"))
    r = await http_request(edge.bound["api"], method, path, host="api", headers=headers, body=data)
    ctype = r.header(b"content-type") or b""
    return r.status, (json.loads(r.body) if ctype.startswith(b"application/json") else r.body)


async def test_api_auth_and_read_routes(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            assert (await api(edge, "GET", "/healthz", token="wrong"))[0] == 200
            assert (await api(edge, "GET", "/tunnels", token="wrong"))[0] == 401
            status, tunnels = await api(edge, "GET", "/tunnels")
            assert status == 200 and tunnels[0]["id"] == str(t.id) and "secret" not in tunnels[0]
            status, routes = await api(edge, "GET", "/routes")
            assert routes[0]["target"] == "app.test"
            status, ca = await api(edge, "GET", "/ca")
            assert ca.startswith(b"-----BEGIN CERTIFICATE-----")
            conn = await registered(nursery, edge, t, echo_handler, conn_index=0)
            await conn.push_config({"ingress": [{"service": "http_status:404"}]})
            status, conns = await api(edge, "GET", "/connections")
            assert len(conns) == 1
            c = conns[0]
            assert (c["tunnel_id"], c["location"], c["conn_index"], c["state"]) == (str(t.id), "LAB1", 0,
                                                                                     "registered")
            assert c["client_version"] == "test-1.0" and "serialized_headers" in c["features"]
            status, config = await api(edge, "GET", f"/config/{t.id}")
            assert config == {"ingress": [{"service": "http_status:404"}]}
            assert (await api(edge, "GET", "/config/nope"))[0] == 404
            await http_request(edge.bound["http"], "GET", "/x", host="app.test")
            await wait_history(edge, 1)
            status, history = await api(edge, "GET", "/history?since=0")
            assert history[0]["path"] == "/x" and history[0]["status"] == 200
            assert history[0]["connection"] == c["id"]
            assert (await api(edge, "GET", f"/history?since={history[0]['seq']}"))[1] == []
            status, metrics = await api(edge, "GET", "/metrics")
            assert b'tunnel_lab_edge_requests_total{outcome="ok",status="200"} 1' in metrics
            assert b'tunnel_lab_edge_connections{location="LAB1",state="registered"} 1' in metrics
            assert (await api(edge, "GET", "/nope"))[0] == 404
            assert (await api(edge, "POST", "/faults", {"kind": "bogus"}))[0] == 400


async def test_refuse_and_delay_registrations(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1")
            status, fault = await api(edge, "POST", "/faults", {"kind": "refuse-registrations",
                                                                "cause": "Unauthorized: lag", "count": 1,
                                                                "should_retry": True})
            assert status == 200 and fault["id"].startswith("f")
            async with connector(nursery, edge) as conn:
                result = await conn.register(t)
                assert result == RegistrationError(cause="Unauthorized: lag", should_retry=True)
            assert (await api(edge, "GET", "/faults"))[1] == []  # used up
            await api(edge, "POST", "/faults", {"kind": "delay-registrations", "seconds": 0.3, "count": 1})
            async with connector(nursery, edge) as conn:
                start = trio.current_time()
                assert isinstance(await conn.register(t), ConnectionDetails)
                assert trio.current_time() - start >= 0.3


async def test_drop_goaway_and_reset_streams(tmp_path):
    release = trio.Event()

    async def hold(s):
        await s.respond(200, [])
        await s.send(b"partial")
        await release.wait()

    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            a = await registered(nursery, edge, t, hold, conn_index=0)
            b = await registered(nursery, edge, t, echo_handler, location="LAB2", conn_index=1)
            replies = []

            async def req():
                replies.append(await http_request(edge.bound["http"], "GET", "/", host="app.test"))

            nursery.start_soon(req)  # round robin: goes to a
            with trio.fail_after(5):
                while not a.opened:
                    await trio.sleep(0.01)
            _, out = await api(edge, "POST", "/faults", {"kind": "reset-streams", "location": "LAB1"})
            assert out["affected"] == 1
            with trio.fail_after(5):
                while not replies:
                    await trio.sleep(0.01)
            assert replies[0].status == 200 and not replies[0].complete
            _, out = await api(edge, "POST", "/faults", {"kind": "goaway", "tunnel_id": str(t.id),
                                                              "conn_index": 1, "error_code": 0})
            assert out["affected"] == 1
            with trio.fail_after(5):
                while b.goaway is None:
                    await trio.sleep(0.01)
            assert [c.location for c in edge.registry.routable(t.id)] == ["LAB1"]
            _status, out = await api(edge, "POST", "/faults", {"kind": "drop-connection", "location": "LAB1"})
            assert out["affected"] == 1
            await a.closed.wait()
            r = await http_request(edge.bound["http"], "GET", "/", host="app.test")
            assert r.status == 530
            release.set()


async def test_dc_down_up_and_swap_cert(tmp_path):
    with trio.fail_after(15):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await registered(nursery, edge, t, echo_handler, location="LAB2")
            port = edge.listeners["LAB2"].port
            status, out = await api(edge, "POST", "/faults", {"kind": "dc-down", "location": "LAB2"})
            assert status == 200 and out["closed"] == 1
            await conn.closed.wait()
            try:
                await trio.open_tcp_stream("127.0.0.2", port)
            except OSError:
                pass
            else:
                raise AssertionError("LAB2 still accepts connections")
            status, faults = await api(edge, "GET", "/faults")
            assert [f["kind"] for f in faults] == ["dc-down"]
            await api(edge, "POST", "/faults", {"kind": "dc-up", "location": "LAB2"})
            assert edge.listeners["LAB2"].port == port
            await registered(nursery, edge, t, echo_handler, location="LAB2")
            # swap-cert: the connector's verification now fails
            status, out = await api(edge, "POST", "/faults", {"kind": "swap-cert", "location": "LAB1",
                                                              "cert": "expired"})
            assert status == 200
            try:
                await dial_edge(edge, "LAB1")
            except trio.BrokenResourceError as exc:
                assert isinstance(exc.__cause__, ssl.SSLCertVerificationError)
                assert "expired" in str(exc.__cause__)
            else:
                raise AssertionError("expired certificate accepted")
            status, out = await api(edge, "DELETE", "/faults")
            assert out["cleared"]
            tls = await dial_edge(edge, "LAB1")
            await tls.aclose()
            assert (await api(edge, "POST", "/faults", {"kind": "dc-down", "location": "NOPE"}))[0] == 404


async def test_latency_fault(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, echo_handler)
            _status, fault = await api(edge, "POST", "/faults", {"kind": "latency", "ms": 300})
            start = trio.current_time()
            r = await http_request(edge.bound["http"], "GET", "/", host="app.test")
            assert r.status == 200 and trio.current_time() - start >= 0.3
            assert (await api(edge, "DELETE", f"/faults/{fault['id']}"))[0] == 200
            assert (await api(edge, "DELETE", f"/faults/{fault['id']}"))[0] == 404

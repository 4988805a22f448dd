"""The edge's tunnel side: TLS, HTTP/2 setup, the control stream and registration."""

from __future__ import annotations

import uuid

import trio

from tests.component.test_edge_support import (
    ScriptedConnector,
    connector,
    dial_edge,
    make_tunnel,
    registered,
    running_edge,
)
from tunnel_lab.wire.registration import ConnectionDetails, RegistrationError


async def noop(s):  # pragma: no cover - never called in these tests
    await s.respond(200, end=True)


async def test_register_ok_and_connection_listed(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            async with connector(nursery, edge, location="LAB2") as conn:
                result = await conn.register(t, conn_index=3)
                assert isinstance(result, ConnectionDetails)
                assert result.location_name == "LAB2"
                assert len(result.uuid.bytes) == 16
                assert result.tunnel_is_remotely_managed is False
                # the control stream as docs/protocol.md §3.4 describes it
                headers = dict(conn.control_headers)
                assert headers[b"cf-cloudflared-proxy-connection-upgrade"] == b"control-stream"
                assert conn.h2.streams[1].state_machine.state.name != "HALF_CLOSED_REMOTE"
                listed = edge.registry.listed()
                assert [c.id for c in listed] == [str(result.uuid)]
                assert listed[0].registration.conn_index == 3
                assert listed[0].state == "registered"
                await conn.push_config({"ingress": [{"service": "http://127.0.0.1:1"}]})
                assert b"127.0.0.1:1" in edge.pushed_configs[str(t.id)]


async def test_wrong_secret_is_unauthorized_and_closed(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1")
            async with connector(nursery, edge) as conn:
                result = await conn.register(t, secret=b"x" * 32)
                assert isinstance(result, RegistrationError)
                assert "Unauthorized" in result.cause
                await conn.closed.wait()  # the edge closes shortly after a refusal
                assert conn.goaway is not None
            assert edge.registry.listed() == []


async def test_unknown_tunnel_is_unauthorized(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1")
            t.id = uuid.uuid4()
            async with connector(nursery, edge) as conn:
                result = await conn.register(t)
                assert result == RegistrationError(cause="Unauthorized: Invalid tunnel secret")
                await conn.closed.wait()


async def test_duplicate_conn_index_same_location_is_edupconn(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1")
            connector_id = uuid.uuid4()
            async with connector(nursery, edge) as first:
                assert isinstance(await first.register(t, connector_id=connector_id), ConnectionDetails)
                async with connector(nursery, edge) as second:
                    result = await second.register(t, connector_id=connector_id)
                    assert isinstance(result, RegistrationError) and result.cause == "EDUPCONN"
                    await second.closed.wait()
                # the same index at another data centre, or another connector: fine
                async with connector(nursery, edge, location="LAB2") as third:
                    assert isinstance(await third.register(t, connector_id=connector_id), ConnectionDetails)
                async with connector(nursery, edge) as fourth:
                    assert isinstance(await fourth.register(t), ConnectionDetails)


async def test_probe_handshake_then_close_and_garbage_are_tolerated(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1")
            probe = await dial_edge(edge, server_name="probe.cftunnel.com")
            await probe.aclose()
            garbage = await dial_edge(edge)
            await garbage.send_all(b"GET / HTTP/1.1\r\n\r\n" * 10)
            with trio.fail_after(5):
                while await garbage.receive_some(65536):
                    pass
            await garbage.aclose()
            # plain TCP garbage (no TLS at all)
            lst = edge.listeners["LAB1"]
            raw = await trio.open_tcp_stream(lst.host, lst.port)
            await raw.send_all(b"\x00" * 100)
            await raw.aclose()
            # a good connector still registers
            conn = await registered(nursery, edge, t, noop)
            assert len(edge.registry.listed()) == 1
            await conn.transport.aclose()


async def test_bad_capnp_disconnects_only_that_connection(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1")
            good = await registered(nursery, edge, t, noop)
            before = [c.id for c in edge.registry.listed()]
            async with connector(nursery, edge) as bad:
                with trio.fail_after(5):
                    while bad.control_headers is None:
                        await trio.sleep(0.01)
                bad.h2.send_headers(1, [(b":status", b"200")])
                bad.h2.send_data(1, b"\x05\x00\x00\x00" + b"\xff" * 60)  # 6 segments, nonsense sizes
                await bad.flush()
                await bad.closed.wait()
            # the bad connection never registered; the good one is still listed and open
            assert len(before) == 1 and [c.id for c in edge.registry.listed()] == before
            assert not good.closed.is_set()


async def test_unregister_drains_then_goaway_and_close(tmp_path):
    release = trio.Event()

    async def slow(s):
        await release.wait()
        await s.respond(200, [(b"Content-Length", b"2")])
        await s.send(b"ok", end=True)

    from tests.component.test_edge_support import http_request

    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await registered(nursery, edge, t, slow)
            replies = []

            async def request():
                replies.append(await http_request(edge.bound["http"], "GET", "/", host="app.test"))

            nursery.start_soon(request)
            with trio.fail_after(5):
                while not conn.opened:
                    await trio.sleep(0.01)
            await conn.unregister()
            assert edge.registry.listed()[0].state == "draining"
            assert edge.registry.routable(t.id) == []
            assert not conn.closed.is_set()
            release.set()
            await conn.closed.wait()
            assert conn.goaway is not None
            with trio.fail_after(5):
                while not replies:
                    await trio.sleep(0.01)
            assert replies[0].status == 200 and replies[0].body == b"ok"


async def test_control_stream_headers_and_settings(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            tls = await dial_edge(edge)
            conn = ScriptedConnector(tls)
            await nursery.start(conn.run)
            with trio.fail_after(5):
                while conn.control_headers is None:
                    await trio.sleep(0.01)
            assert conn.h2.remote_settings.max_header_list_size >= 1024 * 1024
            assert conn.h2.remote_settings.enable_push == 0
            pseudo = [n for n, _ in conn.control_headers if n.startswith(b":")]
            assert pseudo == [b":method", b":scheme", b":authority", b":path"]
            await tls.aclose()


async def test_graceful_shutdown_drains_in_flight_streams(tmp_path):
    from tests.component.test_edge_support import _running_edge, http_request

    release = trio.Event()

    async def slow(s):
        await release.wait()
        await s.respond(200, [(b"Content-Length", b"4")])
        await s.send(b"done", end=True)

    with trio.fail_after(10):
        async with _running_edge(tmp_path, shutdown_timeout=5) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await registered(nursery, edge, t, slow)
            replies = []

            async def request():
                replies.append(await http_request(edge.bound["http"], "GET", "/", host="app.test"))

            nursery.start_soon(request)
            with trio.fail_after(5):
                while not conn.opened:
                    await trio.sleep(0.01)
            port = edge.listeners["LAB1"].port
            edge.request_shutdown()
            with trio.fail_after(5):
                while edge.listeners["LAB1"].up:
                    await trio.sleep(0.01)
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
            except OSError:
                pass
            else:
                raise AssertionError("the tunnel listener still accepts during shutdown")
            assert not edge.stopped.is_set()
            release.set()
            await edge.stopped.wait()
            assert replies and replies[0].status == 200 and replies[0].body == b"done"
            assert conn.goaway is not None
            await conn.closed.wait()


async def test_ping_flood_disconnects_that_connection_only(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1")
            good = await registered(nursery, edge, t, noop)
            async with connector(nursery, edge) as bad:
                for i in range(1100):
                    bad.h2.ping(i.to_bytes(8, "big"))
                await bad.flush()
                await bad.closed.wait()
            assert not good.closed.is_set() and len(edge.registry.listed()) == 1

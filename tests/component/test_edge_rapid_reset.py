"""HTTP/2 rapid reset on the HTTPS eyeball listener (issue 11, defect 1): HEADERS + RST_STREAM pairs in one
write must not leak tunnel streams or wedge the tunnel."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio

from tests.component.test_edge_eyeball import h2_get, tls_to
from tests.component.test_edge_support import (
    Address,
    http_request,
    make_tunnel,
    registered,
    running_edge,
    wait_history,
)

BIG = b"d" * (2 * 1024 * 1024)


async def big_download(s):
    if s.header(b":path") == b"/small":
        await s.respond(200, [(b"Content-Length", b"2")])
        await s.send(b"ok", end=True)
        return
    await s.respond(200, [(b"Content-Length", str(len(BIG)).encode())])
    await s.send(BIG, end=True)


def rapid_reset_bytes(authority: bytes, pairs: int) -> bytes:
    """A client preface plus `pairs` HEADERS + RST_STREAM(CANCEL) pairs, all in one buffer."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    for _ in range(pairs):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority),
                                (b":path", b"/big")], end_stream=True)
        conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    return conn.data_to_send()


async def test_rapid_reset_leaks_no_tunnel_stream_and_the_tunnel_keeps_serving(tmp_path):
    pairs = 40
    with trio.fail_after(30):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),)) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, big_download)
            [conn] = edge.registry.all()
            tls = await tls_to(edge, "app.test", ["h2"])
            async with tls:
                await tls.send_all(rapid_reset_bytes(b"app.test", pairs))
                # every reset request is recorded exactly once, as a reset, never as `status 0, ok`
                history = await wait_history(edge, pairs)
            assert {(e["status"], e["outcome"]) for e in history} == {(0, "eyeball-reset")}
            # the tunnel serves the next requests at once, on HTTP/1.1 and HTTP/2 ...
            r = await http_request(edge.bound["http"], "GET", "/small", host="app.test")
            assert r.status == 200 and r.body == b"ok"
            tls = await tls_to(edge, "app.test", ["h2"])
            async with tls:
                results = await h2_get(tls, "app.test", ["/big", "/small"])
            assert results["/big"][2] == BIG and results["/small"][2] == b"ok"
            # ... and not one stream is left open on the tunnel connection
            await wait_history(edge, pairs + 3)
            assert conn.active_streams == 0, sorted(conn.streams)


async def receive_goaway(tls: trio.SSLStream) -> int | None:
    """Read until the edge closes; the error code of its GOAWAY, if one came."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    code = None
    while data := await tls.receive_some(65536):
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            break
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                code = int(ev.error_code)
    return code


async def test_handlers_per_eyeball_connection_are_capped_even_for_reset_streams(tmp_path, caplog):
    with trio.fail_after(30):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),),
                                eyeball_max_streams=5) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, big_download)
            tls = await tls_to(edge, "app.test", ["h2"])
            async with tls:
                await tls.send_all(rapid_reset_bytes(b"app.test", 40))
                await wait_history(edge, 5)
                r = await http_request(edge.bound["http"], "GET", "/small", host="app.test")
            assert r.status == 200
            assert len(edge.history.since(0)) == 6  # 35 pairs were refused before any handler ran
            assert "limit eyeball_max_streams" in caplog.text


async def test_a_reset_flood_gets_goaway_enhance_your_calm(tmp_path, caplog):
    with trio.fail_after(30):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),),
                                eyeball_reset_limit=10) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, big_download)
            tls = await tls_to(edge, "app.test", ["h2"])
            async with tls:
                await tls.send_all(rapid_reset_bytes(b"app.test", 40))
                assert await receive_goaway(tls) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert "limit eyeball_reset_limit" in caplog.text
            r = await http_request(edge.bound["http"], "GET", "/small", host="app.test")
            assert r.status == 200

"""The edge's eyeball side: routing, streams, bodies with flow control, trailers, errors, retries."""

from __future__ import annotations

import hashlib
import json

import h11
import trio

from tests.component.test_edge_support import (
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
    split,
    wait_history,
)


async def test_get_is_routed_with_edge_headers(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, echo_handler)
            r = await http_request(edge.bound["http"], "GET", "/p?q=1", host="app.test",
                                   headers=[(b"X-Custom", b"v"), (b"Keep-Alive", b"5"), (b"TE", b"gzip"),
                                            (b"X-Forwarded-For", b"10.0.0.1")])
            assert r.status == 200 and r.header(b"x-origin") == b"echo"
            seen = json.loads(r.body)["headers"]
            names = [n for n, _ in seen]
            d = dict(seen)
            assert d[":method"] == "GET" and d[":path"] == "/p?q=1" and d[":authority"] == "app.test"
            assert d[":scheme"] == "http"
            assert d["x-custom"] == "v"
            assert d["cf-connecting-ip"] == "127.0.0.1"
            assert d["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
            assert d["cf-ray"].endswith("-LAB1") and len(d["cf-ray"].split("-")[0]) == 16
            assert r.header(b"cf-ray") == d["cf-ray"].encode()
            for banned in ("connection", "keep-alive", "te", "host", "transfer-encoding", "upgrade"):
                assert banned not in names
            history = await wait_history(edge, 1)
            assert history[-1]["status"] == 200 and history[-1]["host"] == "app.test"
            assert history[-1]["ray"] == d["cf-ray"] and history[-1]["location"] == "LAB1"


async def test_unknown_host_404_and_no_connection_530(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, _nursery):
            r = await http_request(edge.bound["http"], "GET", "/", host="nowhere.test")
            assert r.status == 404 and b"nowhere.test" in r.body and b"route dns" in r.body
            make_tunnel(edge, "t1", "*.apps.test")  # a route added while the edge runs
            r = await http_request(edge.bound["http"], "GET", "/", host="a.apps.test:8080")
            assert r.status == 530 and b"Error 1033" in r.body


async def test_large_upload_and_download_with_small_windows(tmp_path):
    """A 1 MiB body each way through 64 KiB stream windows: flow control both ways, nothing lost."""
    body = bytes(range(256)) * 4096

    async def handler(s):
        got = await s.read_all()
        digest = hashlib.sha256(got).hexdigest().encode()
        await s.respond(200, [(b"X-Up", digest)])  # no content-length: chunked to the eyeball
        for i in range(0, len(got), 10000):
            await s.send(got[i:i + 10000])
        await s.send(b"", end=True)

    with trio.fail_after(20):
        async with running_edge(tmp_path, stream_window=65535) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler, initial_window=65535)
            r = await http_request(edge.bound["http"], "POST", "/up", host="app.test", body=body)
            assert r.status == 200 and r.complete
            assert r.header(b"x-up") == hashlib.sha256(body).hexdigest().encode()
            assert r.body == body
            r = await http_request(edge.bound["http"], "PUT", "/up", host="app.test",
                                   chunks=[body[:5000], body[5000:70000]])
            assert r.body == body[:70000]


async def test_trailers_both_ways(tmp_path):
    async def handler(s):
        await s.read_all()
        assert s.trailers == [(b"x-req-sum", b"abc")]
        await s.respond(200, [(b"Content-Type", b"text/plain")])
        await s.send(b"data")
        await s.send_trailers([(b"x-checksum", b"123")])

    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler)
            host, port = split(edge.bound["http"])
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n"
                                      b"TE: trailers\r\n\r\n3\r\nabc\r\n0\r\nX-Req-Sum: abc\r\n\r\n")
                raw = b""
                while not raw.endswith(b"\r\n\r\n") or b"x-checksum" not in raw.lower():
                    raw += await stream.receive_some(65536)
            assert raw.startswith(b"HTTP/1.1 200")
            assert b"4\r\ndata\r\n0\r\nx-checksum: 123\r\n\r\n" in raw


async def test_connector_502_reset_midway_and_bad_status(tmp_path):
    async def handler(s):
        path = s.header(b":path")
        if path == b"/down":
            await s.respond_error(502)
        elif path == b"/reset":
            await s.respond(200, [(b"Content-Length", b"100")])
            await s.send(b"x" * 10)
            await s.reset(2)
        elif path == b"/reset-chunked":
            await s.respond(200, [])
            await s.send(b"x" * 10)
            await s.reset(2)
        elif path == b"/404":
            await s.respond(404, [(b"Content-Length", b"3")])
            await s.send(b"nop", end=True)

    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler)
            addr = edge.bound["http"]
            r = await http_request(addr, "GET", "/down", host="app.test")
            assert r.status == 502 and b"could not reach the origin" in r.body
            r = await http_request(addr, "GET", "/404", host="app.test")
            assert (r.status, r.body) == (404, b"nop")
            for path in ("/reset", "/reset-chunked"):
                r = await http_request(addr, "GET", path, host="app.test")
                assert r.status == 200 and not r.complete, path  # aborted, no fake success
            outcomes = [e["outcome"] for e in await wait_history(edge, 4)]
            assert outcomes == ["connector-error", "ok", "aborted", "aborted"]
            # the connection survived all of it
            assert len(edge.registry.routable(t.id)) == 1


async def test_origin_timeout_524(tmp_path):
    async def handler(s):
        await trio.sleep(5)  # never answers within the edge's origin timeout

    with trio.fail_after(10):
        async with running_edge(tmp_path, origin_timeout=0.3) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler)
            r = await http_request(edge.bound["http"], "GET", "/slow", host="app.test")
            assert r.status == 524


async def test_oversized_response_headers_502(tmp_path):
    # its own edge with the default origin timeout: with 0.3 s a loaded machine answered 524 here
    async def handler(s):
        await s.respond(200, [(b"X-Big", b"a" * 5000)] * 3)
        await s.send(b"", end=True)

    with trio.fail_after(10):
        async with running_edge(tmp_path, max_response_headers=8000) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler)
            r = await http_request(edge.bound["http"], "GET", "/big", host="app.test")
            assert r.status == 502 and b"limit" in r.body
            r = await http_request(edge.bound["http"], "GET", "/big", host="app.test")
            assert r.status == 502
            assert len(edge.registry.routable(t.id)) == 1  # only the streams paid


async def test_round_robin_and_retry_on_another_connection(tmp_path):
    seen: list[str] = []

    def handler_for(name):
        async def handler(s):
            seen.append(name)
            if name == "dying":
                await s.conn.transport.aclose()  # the connection dies before the response
                return
            await s.respond(200, [(b"Content-Length", b"1")])
            await s.send(name.encode(), end=True)
        return handler

    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler_for("a"), location="LAB1", conn_index=0)
            await registered(nursery, edge, t, handler_for("b"), location="LAB2", conn_index=1)
            bodies = [(await http_request(edge.bound["http"], "GET", "/", host="app.test")).body
                      for _ in range(4)]
            assert sorted(bodies) == [b"a", b"a", b"b", b"b"]
            await registered(nursery, edge, t, handler_for("dying"), location="LAB1", conn_index=2)
            statuses = set()
            for _ in range(3):
                r = await http_request(edge.bound["http"], "GET", "/", host="app.test")
                statuses.add(r.status)
            assert statuses == {200}
            assert "dying" in seen
            # a POST is not retried
            await registered(nursery, edge, t, handler_for("dying"), location="LAB2", conn_index=3)
            addr = edge.bound["http"]
            results = [(await http_request(addr, "POST", "/", host="app.test", body=b"x")).status
                       for _ in range(3)]
            assert 502 in results


async def test_websocket_upgrade_and_bytes_both_ways(tmp_path):
    async def handler(s):
        assert s.header(b"cf-cloudflared-proxy-connection-upgrade") == b"websocket"
        assert s.header(b"upgrade") is None and s.header(b"connection") is None
        await s.respond(200, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                              (b"Sec-Websocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")])
        while (chunk := await s.read()) is not None:
            await s.send(chunk.upper())
        await s.send(b"", end=True)

    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler)
            host, port = split(edge.bound["http"])
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\n"
                                      b"Connection: Upgrade\r\n"
                                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                      b"Sec-WebSocket-Version: 13\r\n\r\nhello")
                raw = b""
                while b"HELLO" not in raw:
                    raw += await stream.receive_some(65536)
                assert raw.startswith(b"HTTP/1.1 101 ")
                assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in raw.lower()
                await stream.send_all(b"more")
                raw = b""
                while b"MORE" not in raw:
                    raw += await stream.receive_some(65536)
                await stream.send_eof()
                with trio.fail_after(5):
                    while await stream.receive_some(65536):
                        pass


async def test_websocket_refused_is_an_ordinary_response(tmp_path):
    async def handler(s):
        await s.respond(403, [(b"Content-Length", b"2")])
        await s.send(b"no", end=True)

    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler)
            r = await http_request(edge.bound["http"], "GET", "/ws", host="app.test",
                                   headers=[(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                                            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                                            (b"Sec-WebSocket-Version", b"13")])
            assert (r.status, r.body) == (403, b"no")


async def test_malformed_oversized_and_keepalive(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path, max_request_headers=4096) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, echo_handler)
            host, port = split(edge.bound["http"])

            async def raw_exchange(data: bytes) -> bytes:
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(data)
                    out = b""
                    with trio.fail_after(5):
                        while chunk := await stream.receive_some(65536):
                            out += chunk
                    return out

            assert (await raw_exchange(b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400")
            big = b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
            assert (await raw_exchange(big)).startswith(b"HTTP/1.1 431")
            assert (await raw_exchange(b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400")
            # keep-alive: two requests on one connection
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                for _ in range(2):
                    await stream.send_all(conn.send(h11.Request(method="GET", target="/",
                                                                headers=[("Host", "app.test")])))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                    while True:
                        ev = conn.next_event()
                        if ev is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(65536))
                        elif isinstance(ev, h11.EndOfMessage):
                            break
                    conn.start_next_cycle()


async def test_trickling_client_times_out(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path, eyeball_header_timeout=0.3, eyeball_idle_timeout=0.3) as (edge, _):
            host, port = split(edge.bound["http"])
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: a")
                out = b""
                with trio.fail_after(3):
                    while chunk := await stream.receive_some(65536):
                        out += chunk
                assert out.startswith(b"HTTP/1.1 408")


async def test_connector_stream_limit_is_honoured_by_queueing(tmp_path):
    """With SETTINGS_MAX_CONCURRENT_STREAMS 2 (control stream + 1), requests queue instead of failing."""
    active = 0
    peak = 0

    async def handler(s):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await trio.sleep(0.05)
        active -= 1
        await s.respond(200, [(b"Content-Length", b"2")])
        await s.send(b"ok", end=True)

    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler, max_concurrent_streams=2)
            statuses = []

            async def one():
                statuses.append((await http_request(edge.bound["http"], "GET", "/", host="app.test")).status)

            async with trio.open_nursery() as inner:
                for _ in range(5):
                    inner.start_soon(one)
            assert statuses == [200] * 5
            assert peak == 1


async def test_eyeball_gone_mid_upload_resets_the_stream(tmp_path):
    resets = []

    async def handler(s):
        try:
            while await s.read() is not None:
                pass
        except ConnectionResetError:
            resets.append(s.id)

    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await registered(nursery, edge, t, handler)
            host, port = split(edge.bound["http"])
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100000\r\n\r\n"
                                  + b"x" * 1000)
            with trio.fail_after(5):
                while not conn.opened:
                    await trio.sleep(0.01)
            await stream.aclose()
            with trio.fail_after(5):
                while not resets:
                    await trio.sleep(0.01)
            assert (await wait_history(edge, 1))[0]["outcome"] == "eyeball-closed"
            assert len(edge.registry.routable(t.id)) == 1


async def test_expect_100_continue(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, echo_handler)
            host, port = split(edge.bound["http"])
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n"
                                      b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
                interim = b""
                while b"\r\n\r\n" not in interim:
                    interim += await stream.receive_some(65536)
                assert interim.startswith(b"HTTP/1.1 100 ")
                await stream.send_all(b"hello")
                raw = interim.split(b"\r\n\r\n", 1)[1]
                while chunk := await stream.receive_some(65536):
                    raw += chunk
            assert raw.startswith(b"HTTP/1.1 200 ")
            assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["body"] == "hello"

"""HTTPS eyeballs (SNI certificates, HTTP/1.1 and HTTP/2 by ALPN) and the CONNECT proxy."""

from __future__ import annotations

import hashlib
import ipaddress
import json

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from tests.component.test_edge_support import (
    Address,
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
    split,
)
from tunnel_lab.lab.runner.engine import ipv6_loopback_missing

NO_IPV6 = ipv6_loopback_missing()


async def tls_to(edge, server_name: str, alpn: list[str]) -> trio.SSLStream:
    host, port = split(edge.bound["https"])
    ctx = edge.pki.client_ssl_context()
    ctx.set_alpn_protocols(alpn)
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=server_name)
    try:
        await tls.do_handshake()
    except BaseException:
        await tcp.aclose()
        raise
    return tls


async def h2_get(tls: trio.SSLStream, authority: str, paths: list[str], body: bytes | None = None):
    """Concurrent requests on one HTTP/2 connection; returns {path: (status, headers, body)}."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    ids = {}
    for path in paths:
        sid = conn.get_next_available_stream_id()
        ids[sid] = path
        method = b"POST" if body is not None else b"GET"
        conn.send_headers(sid, [(b":method", method), (b":scheme", b"https"),
                                (b":authority", authority.encode()), (b":path", path.encode())],
                          end_stream=body is None)
        if body is not None:
            for i in range(0, len(body), 16384):
                conn.send_data(sid, body[i:i + 16384], end_stream=i + 16384 >= len(body))
    await tls.send_all(conn.data_to_send())
    results: dict[str, list] = {p: [0, [], b""] for p in paths}
    done: set[int] = set()
    while len(done) < len(ids):
        data = await tls.receive_some(65536)
        assert data, "connection closed early"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                hd = dict(ev.headers)
                results[ids[ev.stream_id]][0] = int(hd[b":status"])
                results[ids[ev.stream_id]][1] = list(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                results[ids[ev.stream_id]][2] += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                done.add(ev.stream_id)
        await tls.send_all(conn.data_to_send())
    return {p: tuple(v) for p, v in results.items()}


async def test_https_sni_certificate_and_http11(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),)) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, echo_handler)
            tls = await tls_to(edge, "app.test", ["http/1.1"])  # verifies the lab-CA leaf for app.test
            async with tls:
                assert tls.selected_alpn_protocol() == "http/1.1"
                await tls.send_all(b"GET /s HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
                raw = b""
                while chunk := await tls.receive_some(65536):
                    raw += chunk
            assert raw.startswith(b"HTTP/1.1 200")
            seen = dict(json.loads(raw.split(b"\r\n\r\n", 1)[1])["headers"])
            assert seen[":scheme"] == "https" and seen["x-forwarded-proto"] == "https"
            # another routed name gets its own lab-CA leaf (verified against that name) ...
            edge.tunnels.store.route_dns(t.id, "other.test")
            other = await tls_to(edge, "other.test", ["http/1.1"])
            sans = [v for _, v in other.getpeercert()["subjectAltName"]]
            await other.aclose()
            assert "other.test" in sans and "app.test" not in sans
            # ... and so does an unrouted name (issued on demand): the edge's 404 page, verified TLS
            unrouted = await tls_to(edge, "unrouted.test", ["http/1.1"])
            async with unrouted:
                assert "unrouted.test" in [v for _, v in unrouted.getpeercert()["subjectAltName"]]
                await unrouted.send_all(b"GET / HTTP/1.1\r\nHost: unrouted.test\r\nConnection: close\r\n\r\n")
                raw = b""
                while chunk := await unrouted.receive_some(65536):
                    raw += chunk
            assert raw.startswith(b"HTTP/1.1 404") and b"unrouted.test" in raw


async def test_https_http2_eyeball_concurrent_streams(tmp_path):
    big = b"z" * 300_000

    async def handler(s):
        path = s.header(b":path")
        if path == b"/big":
            await s.respond(200, [(b"Content-Length", str(len(big)).encode())])
            await s.send(big, end=True)
        elif path == b"/up":
            data = await s.read_all()
            digest = hashlib.sha256(data).hexdigest().encode()
            await s.respond(200, [(b"Content-Length", str(len(digest)).encode())])
            await s.send(digest, end=True)
        else:
            await echo_handler(s)

    with trio.fail_after(15):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),)) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler)
            tls = await tls_to(edge, "app.test", ["h2", "http/1.1"])
            async with tls:
                assert tls.selected_alpn_protocol() == "h2"
                results = await h2_get(tls, "app.test", ["/a", "/big", "/c"])
            assert results["/big"][0] == 200 and results["/big"][2] == big
            assert results["/a"][0] == 200
            seen = dict(json.loads(results["/a"][2])["headers"])
            assert seen[":authority"] == "app.test" and seen[":path"] == "/a"
            names = [n for n, _ in results["/a"][1]]
            assert b"connection" not in names and b"x-origin" in names
            tls = await tls_to(edge, "app.test", ["h2"])
            async with tls:
                up = big[:60000]  # within the default 64 KiB window of this simple client
                results = await h2_get(tls, "app.test", ["/up"], body=up)
            assert results["/up"][2] == hashlib.sha256(up).hexdigest().encode()


async def test_connect_proxy_to_private_network(tmp_path):
    async def tcp_echo(s):
        assert s.header(b":method") == b"CONNECT"
        assert s.header(b":authority") == b"10.1.2.3:22"
        assert s.header(b"cf-cloudflared-proxy-src").startswith(b"tcp://127.0.0.1:")
        await s.respond(200, [])
        while (chunk := await s.read()) is not None:
            await s.send(chunk)
        await s.send(b"", end=True)

    with trio.fail_after(10):
        async with running_edge(tmp_path, warp_listen=Address("127.0.0.1", 0)) as (edge, nursery):
            t = make_tunnel(edge, "t1")
            edge.tunnels.store.route_ip("10.1.0.0/16", t.id)
            await registered(nursery, edge, t, tcp_echo)
            host, port = split(edge.bound["warp"])
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"CONNECT 10.1.2.3:22 HTTP/1.1\r\nHost: 10.1.2.3:22\r\n\r\n"
                                      b"SSH-2.0-x\r\n")
                raw = b""
                while b"SSH-2.0-x" not in raw:
                    raw += await stream.receive_some(65536)
                assert raw.startswith(b"HTTP/1.1 200")
                await stream.send_eof()
                rest = b""
                while chunk := await stream.receive_some(65536):
                    rest += chunk
            for target, status in ((b"10.9.9.9:22", b"404"), (b"example.com:22", b"400")):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(b"CONNECT " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                    raw = b""
                    while chunk := await stream.receive_some(65536):
                        raw += chunk
                    assert raw.startswith(b"HTTP/1.1 " + status), raw[:40]
            assert ipaddress.ip_address("10.1.2.3") in ipaddress.ip_network("10.1.0.0/16")


async def test_plain_http_proxy_request_is_forwarded_over_a_tcp_stream(tmp_path):
    """`curl -x PROXY http://10.1.2.3:8080/x`: absolute-form GET, sent origin-form over the stream."""
    seen = []

    async def tcp_origin(s):
        assert s.header(b":authority") == b"10.1.2.3:8080"
        await s.respond(200, [])
        head = b""
        while b"\r\n\r\n" not in head:
            head += await s.read() or b""
        seen.append(head)
        await s.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi", end=True)

    with trio.fail_after(10):
        async with running_edge(tmp_path, warp_listen=Address("127.0.0.1", 0)) as (edge, nursery):
            t = make_tunnel(edge, "t1")
            edge.tunnels.store.route_ip("10.1.0.0/16", t.id)
            await registered(nursery, edge, t, tcp_origin)
            host, port = split(edge.bound["warp"])
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"GET http://10.1.2.3:8080/x?y=1 HTTP/1.1\r\nHost: 10.1.2.3:8080\r\n"
                                      b"Proxy-Connection: keep-alive\r\n\r\n")
                raw = b""
                while chunk := await stream.receive_some(65536):
                    raw += chunk
            assert raw.endswith(b"\r\n\r\nhi") and raw.startswith(b"HTTP/1.1 200 OK")
            assert seen[0].startswith(b"GET /x?y=1 HTTP/1.1\r\n")
            assert b"Connection: close" in seen[0] and b"Proxy-Connection" not in seen[0]


async def test_http2_eyeball_stream_reset_when_the_tunnel_stream_fails(tmp_path):
    async def handler(s):
        if s.header(b":path") == b"/fail":
            await s.respond(200, [])
            await s.send(b"partial")
            await s.reset(2)
        else:
            await s.respond(200, [(b"Content-Length", b"2")])
            await s.send(b"ok", end=True)

    with trio.fail_after(10):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),)) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler)
            tls = await tls_to(edge, "app.test", ["h2"])
            async with tls:
                results = await h2_get(tls, "app.test", ["/fail", "/fine"])
            assert results["/fine"][2] == b"ok"
            assert results["/fail"][0] == 200 and results["/fail"][2] == b"partial"
            outcomes = sorted(e["outcome"] for e in edge.history.since(0))
            assert outcomes == ["aborted", "ok"]


@pytest.mark.skipif(NO_IPV6 is not None, reason=f"no IPv6 on this machine: {NO_IPV6}")
async def test_eyeball_listeners_on_ipv4_and_ipv6_serve_the_same_routes(tmp_path):
    """Repeated --http-listen / --https-listen: every address serves; the ready file keeps the first
    under "http"/"https" (what the runner, `up` and the bench read) and lists them all."""
    both = (Address("127.0.0.1", 0), Address("::1", 0))
    with trio.fail_after(10):
        async with running_edge(tmp_path, http_listens=both, https_listens=both) as (edge, nursery):
            info = edge.ready_info()
            assert info["http"] == info["http_listeners"][0] and info["https"] == info["https_listeners"][0]
            assert [a.startswith("[::1]:") for a in info["http_listeners"]] == [False, True]
            assert [a.startswith("[::1]:") for a in info["https_listeners"]] == [False, True]
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, echo_handler)
            clients = []
            for address in info["http_listeners"]:
                r = await http_request(address, "GET", "/", host="app.test")
                assert r.status == 200 and r.header(b"x-origin") == b"echo", address
                clients.append(dict(json.loads(r.body)["headers"])["cf-connecting-ip"])
            assert clients == ["127.0.0.1", "::1"]
            ctx = edge.pki.client_ssl_context()
            for address in info["https_listeners"]:
                tcp = await trio.open_tcp_stream(*split(address))
                tls = trio.SSLStream(tcp, ctx, server_hostname="app.test")
                async with tls:
                    await tls.send_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
                    head = await tls.receive_some(65536)
                assert head.startswith(b"HTTP/1.1 200 "), (address, head[:80])

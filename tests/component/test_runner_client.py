"""The runner's eyeball clients against real in-process servers on loopback: the origin fixtures (HTTP/1.1,
WebSocket, TCP), a tiny HTTP/2 server over TLS (trustme), and a scripted CONNECT proxy."""

from __future__ import annotations

import contextlib
import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from functools import partial

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trustme

from tunnel_lab.lab.runner import client
from tunnel_lab.origin_fixtures.server import serve_origin


@pytest.fixture
async def origin(nursery: trio.Nursery) -> AsyncIterator[dict[str, str]]:
    addrs = {}
    for kind in ("echo", "stream", "misbehave", "ws-echo", "tcp-echo"):
        host, port = await nursery.start(serve_origin, kind, "127.0.0.1", 0)
        addrs[kind] = f"{host}:{port}"
    yield addrs


async def test_h11_download_digest_streaming_and_trailers(origin: dict[str, str]) -> None:
    with trio.fail_after(10):
        big = await client.http_request(
            origin["stream"], host="files.test", path="/large?bytes=300000&seed=2"
        )
        assert big.error is None and big.status == 200
        assert big.body_length == 300000
        assert big.body_sha256 == big.header("X-Body-Sha256")
        assert big.chunks >= 2  # digested as it came, not in one piece
        sse = await client.http_request(origin["stream"], host="files.test", path="/sse?n=3&interval=0.05")
        assert sse.sse_events == 3 and sse.chunks >= 2
        tr = await client.http_request(
            origin["stream"], host="files.test", path="/trailers", headers=[("TE", "trailers")]
        )
        assert ("x-trailer-note", "sent after the body") in [(n.lower(), v) for n, v in tr.trailers]


async def test_h11_uploads_reach_the_origin_intact(origin: dict[str, str]) -> None:
    with trio.fail_after(10):
        for chunked in (False, True):
            resp = await client.http_request(
                origin["echo"],
                method="PUT",
                host="app.test",
                path="/u",
                body=client.generated_body(500000, 9),
                body_length=500000,
                chunked=chunked,
            )
            echo = json.loads(bytes(resp.body_prefix))
            assert echo["body_length"] == 500000 == resp.sent_length
            assert echo["body_sha256"] == resp.sent_sha256 == client.generated_sha256(500000, 9)
            assert echo["framing"] == ("chunked" if chunked else "content-length")
            assert ["Host", "app.test"] in echo["headers"]


async def test_h11_broken_answers_become_errors(origin: dict[str, str]) -> None:
    with trio.fail_after(10):
        cut = await client.http_request(origin["misbehave"], host="bad.test", path="/close-mid-body")
        assert cut.status == 200 and cut.error is not None and "incomplete" in cut.error
        reset = await client.http_request(origin["misbehave"], host="bad.test", path="/reset")
        assert reset.status == 0 and reset.error is not None
        refused = await client.http_request("127.0.0.1:1", host="x.test")
        assert refused.error is not None and "cannot connect" in refused.error


async def test_websocket_and_tcp(origin: dict[str, str]) -> None:
    with trio.fail_after(10):
        ws = await client.websocket_exchange(
            origin["ws-echo"], host="ws.test", path="/", messages=["one", "ünï", b"\x00" * 70000]
        )
        assert ws.error is None and ws.status == 101
        assert ws.received == ["one", "ünï", b"\x00" * 70000]
        stream = await client.connect(origin["tcp-echo"])
        async with stream:
            payload = bytes(range(256)) * 1000
            assert await client.tcp_echo_roundtrip(stream, payload) == payload


async def _fake_proxy(stream: trio.SocketStream) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    target = head.split(b" ")[1]
    if target.endswith(b":9"):
        await stream.send_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        return
    await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def test_connect_proxy(nursery: trio.Nursery) -> None:
    [listener] = await nursery.start(partial(trio.serve_tcp, _fake_proxy, 0, host="127.0.0.1"))
    proxy = f"127.0.0.1:{listener.socket.getsockname()[1]}"
    with trio.fail_after(10):
        status, stream, _line = await client.connect_via_proxy(proxy, "127.0.0.1:4000")
        assert status == 200 and stream is not None
        async with stream:
            assert await client.tcp_echo_roundtrip(stream, b"hello") == b"hello"
        status, stream, line = await client.connect_via_proxy(proxy, "127.0.0.1:9")
        assert status == 502 and stream is None and "Bad Gateway" in line


# --- HTTP/2 ---------------------------------------------------------------------------------------


async def _h2_server(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Answer each request with a JSON summary of what arrived, streamed, with a trailer."""
    with contextlib.suppress(trio.BrokenResourceError):  # a client that gave up on the handshake
        await _h2_serve(stream)


async def _h2_serve(stream: trio.SSLStream[trio.SocketStream]) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    bodies: dict[int, hashlib._Hash] = {}
    sizes: dict[int, int] = {}
    heads: dict[int, list[tuple[str, str]]] = {}
    while data := await stream.receive_some(65536):
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                bodies[ev.stream_id], sizes[ev.stream_id] = hashlib.sha256(), 0
                heads[ev.stream_id] = [(str(n), str(v)) for n, v in ev.headers]
            elif isinstance(ev, h2.events.DataReceived):
                bodies[ev.stream_id].update(ev.data)
                sizes[ev.stream_id] += len(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                sid = ev.stream_id
                doc = json.dumps(
                    {"headers": heads[sid], "length": sizes[sid], "sha256": bodies[sid].hexdigest()}
                )
                conn.send_headers(sid, [(":status", "200"), ("content-type", "application/json")])
                conn.send_data(sid, doc.encode()[:10])
                conn.send_data(sid, doc.encode()[10:])
                conn.send_headers(sid, [("x-checksum", "done")], end_stream=True)
        await stream.send_all(conn.data_to_send())


async def test_h2_client(nursery: trio.Nursery, tmp_path: trio.Path) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("h2.lab.test").configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["h2"])
    ca_path = str(tmp_path) + "/ca.pem"
    ca.cert_pem.write_to_path(ca_path)
    [listener] = await nursery.start(
        partial(trio.serve_ssl_over_tcp, _h2_server, 0, server_ctx, host="127.0.0.1")
    )
    address = f"127.0.0.1:{listener.transport_listener.socket.getsockname()[1]}"
    with trio.fail_after(10):
        # 300 kB: more than the default 64 kB window, so the client must wait for WINDOW_UPDATEs
        resp = await client.http_request(
            address,
            method="POST",
            host="h2.lab.test",
            path="/up",
            headers=[("cookie", "a=1"), ("cookie", "b=2")],
            body=client.generated_body(300000, 1),
            body_length=300000,
            ca_path=ca_path,
            http2=True,
        )
    assert resp.error is None and resp.status == 200 and resp.http_version == "2"
    doc = json.loads(bytes(resp.body_prefix))
    assert doc["length"] == 300000 and doc["sha256"] == resp.sent_sha256
    assert [":authority", "h2.lab.test"] in doc["headers"] and ["cookie", "a=1; b=2"] in doc["headers"]
    assert resp.trailers == [("x-checksum", "done")]
    with trio.fail_after(10):
        wrong = await client.http_request(address, host="h2.lab.test", http2=True)  # not trusting the CA
    assert wrong.error is not None and "TLS handshake" in wrong.error

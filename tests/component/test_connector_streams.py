"""Streams through the connector: a scripted edge in front, real origin fixtures behind (loopback)."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trustme
from wsproto.frame_protocol import FrameProtocol, Opcode

from tests.component.connector_edge import (
    FakeEdge,
    connector_streams,
    count_request_streams,
    get,
    http_rule,
    make_ca,
    make_settings,
    rule,
    start_connector,
    status_rule,
    wait_ready,
    wait_until,
)
from tunnel_lab.connector.settings import HTTPService, StreamService
from tunnel_lab.origin_fixtures import OriginConfig, serve_origin
from tunnel_lab.wire.headers import deserialize_response_headers

pytestmark = [pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning")]



@asynccontextmanager
async def tunnel(tmp_path, rules, **kw):
    """Edge + connector, registered; yields (side, running, nursery)."""
    ca, ca_path = make_ca(tmp_path)
    async with trio.open_nursery() as nursery:
        edge = FakeEdge(ca)
        addr = await nursery.start(edge.serve)
        run = await start_connector(nursery, make_settings(ca_path, [addr], tuple(rules), **kw))
        await edge.wait_for(lambda: len(edge.registered) == 1)
        await wait_ready(run)
        yield edge.registered[0], run, nursery
        run.handle.shutdown()
        assert await run.exit_code() == 0
        nursery.cancel_scope.cancel()


async def origin(nursery, kind, ssl_context=None):
    _host, port = await nursery.start(
        serve_origin, kind, "127.0.0.1", 0, OriginConfig(ssl_context=ssl_context)
    )
    return port


def user_headers(resp) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for k, v in deserialize_response_headers(resp.header(b"cf-cloudflared-response-headers")):
        out.setdefault(k, []).append(v)
    return out


async def test_get_post_and_large_bodies_through_echo(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            port = await origin(on, "echo")
            async with tunnel(tmp_path, [http_rule(port)]) as (side, run, _):
                resp = await side.request(
                    get(
                        "/hello?x=1",
                        extra=[(b"user-agent", b"t/1"), (b"x-custom", b"a"), (b"x-custom", b"b")],
                    )
                )
                assert resp.status == 200
                assert resp.header(b"cf-cloudflared-response-meta") == b'{"src":"origin"}'
                headers = user_headers(resp)
                assert headers[b"X-Origin"] == [b"echo"]
                doc = json.loads(resp.body)
                assert doc["method"] == "GET" and doc["target"] == "/hello?x=1"
                sent = [tuple(h) for h in doc["headers"]]
                assert ("Host", "app.example.test") in sent
                assert ("Cf-Warp-Tag-Id", str(run.handle.supervisor.settings.connector_id)) in sent
                assert ("Connection", "keep-alive") in sent
                assert [v for k, v in sent if k == "X-Custom"] == ["a", "b"]
                # a 1.5 MB upload: more than the 1 MiB windows, so WINDOW_UPDATEs must flow
                body = os.urandom(1_500_000)
                resp = await side.request(
                    get("/up", method="POST", extra=[(b"content-length", b"1500000")]), body
                )
                doc = json.loads(resp.body)
                assert doc["framing"] == "content-length"
                assert doc["body_length"] == len(body)
                assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
                # without content-length: chunked to the origin
                resp = await side.request(get("/up2", method="POST"), b"x" * 100_000)
                doc = json.loads(resp.body)
                assert doc["framing"] == "chunked" and doc["body_length"] == 100_000
            on.cancel_scope.cancel()


async def test_large_download_and_backpressure(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            port = await origin(on, "stream")
            async with tunnel(tmp_path, [http_rule(port)]) as (side, _run, _):
                es = await side.open(get("/large?bytes=3000000&seed=7"), end_stream=True)
                es.auto_ack = False
                resp = await es.headers()
                assert resp.status == 200
                # the edge gives no credit: the connector stops within the edge's windows (65535)
                await es.wait_body(60000)
                stalled = len(resp.body)
                await trio.testing.wait_all_tasks_blocked(0.1)  # nothing more can move
                assert len(resp.body) == stalled <= 65535
                assert not resp.ended
                es.auto_ack = True
                side.h2.acknowledge_received_data(len(resp.body), es.stream_id)
                await side.flush()
                resp = await es.finished()
                assert len(resp.body) == 3_000_000
                assert (
                    hashlib.sha256(resp.body).hexdigest().encode() == user_headers(resp)[b"X-Body-Sha256"][0]
                )
                assert resp.header(b"content-length") == b"3000000"
            on.cancel_scope.cancel()


async def test_sse_flushes_every_event_and_trailers_and_gzip(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            port = await origin(on, "stream")
            async with tunnel(tmp_path, [http_rule(port)]) as (side, _run, _):
                es = await side.open(get("/sse?n=3&interval=0.3"), end_stream=True)
                resp = await es.headers()
                assert resp.status == 200
                assert user_headers(resp)[b"Content-Type"] == [b"text/event-stream"]
                first = await es.wait_body(1)
                assert first.startswith(b"id: 0") and not resp.ended  # before the next event exists
                resp = await es.finished()
                assert resp.body.count(b"data: event") == 3
                # trailers become HTTP/2 trailers
                resp = await side.request(get("/trailers"))
                assert resp.body == b"trailers part 0\ntrailers part 1\ntrailers part 2\n"
                trailers = dict(resp.trailers)
                assert trailers[b"x-body-sha256"] == hashlib.sha256(bytes(resp.body)).hexdigest().encode()
                assert b"x-trailer-note" in trailers
                # we added Accept-Encoding: gzip, so we gunzip transparently
                resp = await side.request(get("/gzip"))
                headers = user_headers(resp)
                assert b"Content-Encoding" not in headers
                assert resp.status == 200 and b"gzip" not in bytes(resp.body)[:2]
                # the eyeball asked for gzip itself: passed through untouched
                resp = await side.request(get("/gzip", extra=[(b"accept-encoding", b"gzip")]))
                assert user_headers(resp)[b"Content-Encoding"] == [b"gzip"]
                assert bytes(resp.body)[:2] == b"\x1f\x8b"
            on.cancel_scope.cancel()


async def test_origin_errors_give_502_and_spare_other_streams(tmp_path, caplog):
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            bad = await origin(on, "misbehave")
            good = await origin(on, "echo")
            # a port nobody listens on
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.1", 0))
            closed_port = sock.getsockname()[1]
            sock.close()
            rules = [
                rule(
                    HTTPService(scheme="http", host="127.0.0.1", port=bad),
                    "bad",
                    index=0,
                    hostname="bad.test",
                ),
                rule(
                    HTTPService(scheme="http", host="127.0.0.1", port=closed_port),
                    "down",
                    index=1,
                    hostname="down.test",
                ),
                http_rule(good),
            ]
            async with tunnel(tmp_path, rules) as (side, _run, _):
                slow = await side.open(get("/sse"), end_stream=True)  # unrelated, stays fine
                resp = await side.request(get("/", authority="down.test"))
                assert resp.status == 502
                assert resp.header(b"cf-cloudflared-response-meta") == b'{"src":"cloudflared"}'
                assert resp.header(b"content-length") == b"0"
                assert resp.header(b"cf-cloudflared-response-headers") is None
                for path in ("/malformed-status", "/garbage", "/reset"):
                    resp = await side.request(get(path, authority="bad.test"))
                    assert resp.status == 502, path
                # 256 KiB of origin headers go on to the edge, as from cloudflared (Go's client takes up to
                # 10 MB): refusing an oversized head is the edge's call (docs/protocol.md §12.3)
                resp = await side.request(get("/huge-headers", authority="bad.test"))
                assert resp.status == 200
                assert len(resp.header(b"cf-cloudflared-response-headers") or b"") > 256 * 1024
                # 100 of 1000 bytes: HEADERS and body were still in Go's 4 KiB response buffer, so the
                # stream is reset before any answer, as cloudflared does
                resp = await side.request(get("/close-mid-body", authority="bad.test"))
                assert resp.status is None and resp.reset == 2 and not resp.body
                # 10000 of 20000: more than a buffer left before the origin gave up, then INTERNAL_ERROR
                # (how much of the rest left depends on the origin's read sizes, as with bufio in Go)
                resp = await side.request(get("/close-mid-body?bytes=20000&sent=10000", authority="bad.test"))
                assert resp.status == 200 and resp.reset == 2
                assert 4096 <= len(resp.body) <= 10000
                assert (await slow.finished()).status == 200
                resp = await side.request(get("/still-fine"))
                assert resp.status == 200
            on.cancel_scope.cancel()
    assert "Unable to reach the origin service" in caplog.text
    assert "connection refused" in caplog.text


async def test_origin_tls_verification(tmp_path, caplog):
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    origin_ca = trustme.CA()
    cert = origin_ca.issue_cert("origin.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    pool = tmp_path / "origin-ca.pem"
    origin_ca.cert_pem.write_to_path(str(pool))
    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            port = await origin(on, "echo", ctx)
            svc = HTTPService(scheme="https", host="127.0.0.1", port=port)
            rules = [
                rule(svc, "untrusted", index=0, hostname="untrusted.test", origin_server_name="origin.test"),
                rule(svc, "wrong-name", index=1, hostname="wrong.test", ca_pool=str(pool)),
                rule(
                    svc,
                    "pinned",
                    index=2,
                    hostname="ok.test",
                    ca_pool=str(pool),
                    origin_server_name="origin.test",
                ),
                rule(svc, "sni", index=3, hostname="origin.test", ca_pool=str(pool), match_sni_to_host=True),
                rule(svc, "insecure", index=4, no_tls_verify=True),
            ]
            async with tunnel(tmp_path, rules) as (side, _run, _):
                assert (await side.request(get("/", authority="untrusted.test"))).status == 502
                assert (await side.request(get("/", authority="wrong.test"))).status == 502
                assert (await side.request(get("/", authority="ok.test"))).status == 200
                assert (await side.request(get("/", authority="origin.test:443"))).status == 200
                assert (await side.request(get("/", authority="any.test"))).status == 200
            on.cancel_scope.cancel()
    # Go's wording, as cloudflared logs it (connector.x509_text)
    text = caplog.text
    assert "tls: failed to verify certificate: x509: certificate signed by unknown authority" in text
    assert ("tls: failed to verify certificate: x509: cannot validate certificate for 127.0.0.1 because it "
            "doesn't contain any IP SANs") in text


async def test_websocket_to_http_origin_and_to_tcp_rule(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            ws_port = await origin(on, "ws-echo")
            tcp_port = await origin(on, "tcp-echo")
            rules = [
                rule(
                    StreamService(scheme="tcp", host="127.0.0.1", port=tcp_port),
                    f"tcp://127.0.0.1:{tcp_port}",
                    index=0,
                    hostname="tcp.test",
                ),
                rule(HTTPService(scheme="http", host="127.0.0.1", port=ws_port), "ws", index=1),
            ]
            async with tunnel(tmp_path, rules) as (side, _run, _):
                ws_headers = [
                    (b"cf-cloudflared-proxy-connection-upgrade", b"websocket"),
                    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                    (b"sec-websocket-version", b"13"),
                ]
                for authority in ("ws.test", "tcp.test"):
                    es = await side.open(get("/ws", authority=authority, extra=ws_headers))
                    resp = await es.headers()
                    assert resp.status == 200, authority
                    uh = user_headers(resp)
                    assert uh[b"Sec-Websocket-Accept"] == [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="]
                    client = FrameProtocol(client=True, extensions=[])
                    await es.send(client.send_data(b"hello through the tunnel", fin=True))
                    got = b""
                    while True:
                        data = await es.wait_body(len(got) + 1)
                        client.receive_bytes(data[len(got) :])
                        got = data
                        frames = list(client.received_frames())
                        payload = b"".join(
                            f.payload for f in frames if f.opcode in (Opcode.BINARY, Opcode.TEXT)
                        )
                        if payload:
                            break
                    if isinstance(payload, str):
                        payload = payload.encode()
                    assert payload == b"hello through the tunnel", authority
                    await es.send(b"", end_stream=True)
                    resp = await es.finished()
                    assert resp.ended or resp.reset == 0
            on.cancel_scope.cancel()


async def test_tcp_streams(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            port = await origin(on, "tcp-echo")
            async with tunnel(tmp_path, [status_rule()]) as (side, _run, _):
                es = await side.open(
                    [
                        (b":method", b"CONNECT"),
                        (b":authority", f"127.0.0.1:{port}".encode()),
                        (b"cf-cloudflared-proxy-src", b"tcp://198.51.100.7:40000"),
                    ]
                )
                resp = await es.headers()
                assert resp.status == 200
                assert resp.header(b"cf-cloudflared-response-headers") == b""
                assert resp.header(b"cf-cloudflared-response-meta") == b'{"src":"origin"}'
                await es.send(b"ping\n")
                assert await es.wait_body(5) == b"ping\n"
                await es.send(b"", end_stream=True)
                resp = await es.finished()
                assert resp.ended
                # not IP:port -> 502 from cloudflared
                resp = await side.request(
                    get("/", authority="example.com:22", extra=[(b"cf-cloudflared-proxy-src", b"x")])
                )
                assert resp.status == 502
                assert resp.header(b"cf-cloudflared-response-meta") == b'{"src":"cloudflared"}'
            on.cancel_scope.cancel()


async def test_go_400_for_connection_specific_headers(tmp_path):
    with trio.fail_after(10):
        async with tunnel(tmp_path, [status_rule(200)]) as (side, _run, _):
            resp = await side.request(get("/", extra=[(b"te", b"gzip")]))
            assert resp.status == 400
            assert bytes(resp.body) == b'request header "TE" may only be "trailers" in HTTP/2\n'
            assert resp.header(b"cf-cloudflared-response-meta") is None
            resp = await side.request(get("/", extra=[(b"connection", b"close")]))
            assert bytes(resp.body) == b'request header "Connection" is not valid in HTTP/2\n'
            resp = await side.request(get("/", extra=[(b"te", b"trailers")]))
            assert resp.status == 200


async def test_update_configuration_streams(tmp_path, caplog):
    caplog.set_level("INFO", logger="tunnel_lab.connector")

    async def update(side, body: bytes):
        return await side.request(
            [
                (b":method", b"PUT"),
                (b":scheme", b"https"),
                (b":authority", b"cftunnel.com"),
                (b":path", b"/"),
                (b"cf-cloudflared-proxy-connection-upgrade", b"update-configuration"),
            ],
            body,
        )

    with trio.fail_after(10):
        async with tunnel(tmp_path, [status_rule(404)]) as (side, run, _):
            config = {
                "ingress": [
                    {"hostname": "tea.test", "service": "http_status:418"},
                    {"service": "http_status:204"},
                ]
            }
            resp = await update(side, json.dumps({"version": 3, "config": config}).encode())
            assert resp.status == 200
            assert bytes(resp.body) == b'{"lastAppliedVersion":3,"err":null}'
            assert (await side.request(get("/", authority="tea.test"))).status == 418
            assert (await side.request(get("/", authority="x.test"))).status == 204
            assert run.handle.state.versioned_config()["version"] == 3
            # an older or equal version is not applied
            resp = await update(side, json.dumps({"version": 3, "config": {"ingress": []}}).encode())
            assert bytes(resp.body) == b'{"lastAppliedVersion":3,"err":null}'
            assert (await side.request(get("/", authority="x.test"))).status == 204
            # an invalid config: the error is an empty object
            bad = {"ingress": [{"hostname": "a.test", "service": "http_status:200"}]}
            resp = await update(side, json.dumps({"version": 4, "config": bad}).encode())
            assert bytes(resp.body) == b'{"lastAppliedVersion":3,"err":{}}'
            # not JSON at all: 502 from cloudflared
            resp = await update(side, b"not json")
            assert resp.status == 502
    assert "Updated to new configuration" in caplog.text


async def test_graceful_shutdown_keeps_serving_in_flight_streams(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            port = await origin(on, "stream")
            ca, ca_path = make_ca(tmp_path)
            async with trio.open_nursery() as nursery:
                edge = FakeEdge(ca)
                addr = await nursery.start(edge.serve)
                # A grace period far beyond the test's fail_after: the exit must come from the last
                # stream ending, not from the grace period running out (no wall-clock bound needed).
                run = await start_connector(
                    nursery, make_settings(ca_path, [addr], (http_rule(port),), grace_period=600)
                )
                await edge.wait_for(lambda: len(edge.registered) == 1)
                await wait_ready(run)
                side = edge.registered[0]
                es = await side.open(get("/sse?n=4&interval=0.2"), end_stream=True)
                await es.wait_body(1)
                run.handle.shutdown()
                await side.unregistered.wait()
                resp = await es.finished()  # the in-flight stream completes after the unregister
                assert resp.ended and resp.body.count(b"data: event") == 4
                assert await run.exit_code() == 0
                nursery.cancel_scope.cancel()
            on.cancel_scope.cancel()


async def test_edge_reset_cancels_the_origin_request(tmp_path):
    """RST_STREAM from the edge mid-response: the connector closes the origin connection and forgets the
    stream; both sides count 0 active request streams, and the connection keeps serving."""
    origin_closed = trio.Event()
    origin_sending = trio.Event()

    async def endless(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(65536)
            if not data:
                return
            head += data
        if head.startswith(b"GET /again "):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        origin_sending.set()
        try:
            while await stream.receive_some(65536):  # b"": the connector closed the origin request
                pass
        except trio.BrokenResourceError:
            pass
        origin_closed.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            on.start_soon(trio.serve_listeners, endless, listeners)
            async with tunnel(tmp_path, [http_rule(port)]) as (side, run, _):
                es = await side.open(get("/endless"), end_stream=True)
                assert await es.wait_body(5) == b"hello"
                await origin_sending.wait()
                assert count_request_streams(side) == 1 and connector_streams(run) == 1
                side.h2.reset_stream(es.stream_id, 8)
                await side.flush()
                await origin_closed.wait()
                await wait_until(lambda: connector_streams(run) == 0)
                assert count_request_streams(side) == 0
                assert es.response.reset is None and not es.response.ended  # nothing came after the reset
                again = await side.request(get("/again"))  # served by a fresh origin request
                assert again.status == 200 and bytes(again.body) == b"ok"
                assert connector_streams(run) == 0
            on.cancel_scope.cancel()


async def test_hello_world_service_started_on_demand(tmp_path):
    from tunnel_lab.connector.settings import HelloWorldService

    with trio.fail_after(20):
        async with tunnel(tmp_path, [rule(HelloWorldService(), "hello_world")]) as (side, run, _):
            resp = await side.request(get("/_health"))
            assert resp.status == 200 and bytes(resp.body) == b"ok"
            resp = await side.request(get("/"))
            assert resp.status == 200
            assert user_headers(resp)[b"Content-Type"] == [b"text/html; charset=utf-8"]
            assert run.handle.proxy._hello is not None


async def test_tcp_flow_limit_and_edge_goaway(tmp_path):
    from tunnel_lab.connector.settings import WarpRoutingConfig

    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            port = await origin(on, "tcp-echo")
            warp = WarpRoutingConfig(max_active_flows=1)
            async with tunnel(tmp_path, [status_rule()], warp_routing=warp) as (side, run, _):
                connect = [
                    (b":method", b"CONNECT"),
                    (b":authority", f"127.0.0.1:{port}".encode()),
                    (b"cf-cloudflared-proxy-src", b"tcp://198.51.100.7:40000"),
                ]
                first = await side.open(connect)
                assert (await first.headers()).status == 200
                second = await side.open(connect)
                resp = await second.headers()
                assert resp.status == 502
                assert resp.header(b"cf-cloudflared-response-meta") == (
                    b'{"src":"cloudflared","flow_rate_limited":true}'
                )
                await first.send(b"", end_stream=True)
                await first.finished()
                # a GOAWAY from the edge: the connector answers with its own and stays registered
                side.h2.close_connection()
                await side.flush()
                await side.edge.wait_for(lambda: side.goaway is not None)
                assert side.goaway == 0
                assert run.handle.ready_connections == 1
            on.cancel_scope.cancel()


async def test_request_trailers_reach_the_origin_when_declared(tmp_path):
    from tests.component.connector_edge import RawOrigin

    origin = RawOrigin()
    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            port = await on.start(origin.serve)
            async with tunnel(tmp_path, [http_rule(port)]) as (side, _run, _):
                es = await side.open(
                    get("/t", method="POST", extra=[(b"trailer", b"x-sum"), (b"te", b"trailers")])
                )
                await es.send(b"body")
                side.h2.send_headers(
                    es.stream_id, [(b"x-sum", b"42"), (b"x-undeclared", b"no")], end_stream=True
                )
                await side.flush()
                assert (await es.finished()).status == 200
            on.cancel_scope.cancel()
    raw = origin.requests[0].raw
    assert b"Trailer: X-Sum\r\n" in raw
    assert raw.endswith(b"4\r\nbody\r\n0\r\nX-Sum: 42\r\n\r\n")


async def test_upload_backpressure_reaches_the_edge(tmp_path):
    """An origin that stops reading stalls the edge's upload (window not returned), then it resumes."""
    total = 24 * 1024 * 1024
    reading = trio.Event()
    received = 0

    async def slow_origin(stream: trio.SocketStream) -> None:
        nonlocal received
        await reading.wait()
        while received < total:
            data = await stream.receive_some(1 << 16)
            if not data:
                return
            received += len(data)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as on:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            on.start_soon(trio.serve_listeners, slow_origin, listeners)
            async with tunnel(tmp_path, [http_rule(port)]) as (side, _run, _):
                es = await side.open(
                    get("/up", method="POST", extra=[(b"content-length", str(total).encode())])
                )
                sent = 0
                done = trio.Event()

                async def upload() -> None:
                    nonlocal sent
                    chunk = b"u" * (1 << 16)
                    for i in range(total // len(chunk)):
                        await es.send(chunk, end_stream=i == total // len(chunk) - 1)
                        sent += len(chunk)
                    done.set()

                on.start_soon(upload)
                # Everything in this test runs in this trio run: when every task is blocked, the edge is
                # stuck on flow control (a busy machine only delays this, it cannot fake it).
                await trio.testing.wait_all_tasks_blocked(0.1)
                # what the edge got rid of: the windows (1 MiB) plus what the sockets hold, not 24 MiB
                assert not done.is_set() and 0 < sent < 4 * 1024 * 1024, sent
                reading.set()
                await done.wait()
                assert (await es.finished()).status == 200
            on.cancel_scope.cancel()
    assert received >= total


async def test_drain_ends_when_the_last_stream_ends_even_if_more_arrived(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            port = await origin(on, "stream")
            ca, ca_path = make_ca(tmp_path)
            async with trio.open_nursery() as nursery:
                edge = FakeEdge(ca)
                addr = await nursery.start(edge.serve)
                # grace period far beyond the test's fail_after: the exit must come from the streams ending
                settings = make_settings(ca_path, [addr], (http_rule(port),), grace_period=600)
                run = await start_connector(nursery, settings)
                await edge.wait_for(lambda: len(edge.registered) == 1)
                await wait_ready(run)
                side = edge.registered[0]
                first = await side.open(get("/sse?n=3&interval=0.1"), end_stream=True)
                await first.wait_body(1)
                run.handle.shutdown()
                await side.rpc_aborted.wait()  # the connector is draining now
                second = await side.open(get("/sse?n=5&interval=0.1"), end_stream=True)  # during the drain
                assert (await second.finished()).ended
                assert (await first.finished()).ended
                assert await run.exit_code() == 0
                nursery.cancel_scope.cancel()
            on.cancel_scope.cancel()


async def test_a_stalled_upload_does_not_block_other_streams(tmp_path):
    """Connection-level credit returns on arrival: one stream stuck at its window leaves room for others."""
    stuck = trio.Event()

    async def never_reads(stream: trio.SocketStream) -> None:
        await stuck.wait()

    with trio.fail_after(20):
        async with trio.open_nursery() as on:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            slow_port = listeners[0].socket.getsockname()[1]
            on.start_soon(trio.serve_listeners, never_reads, listeners)
            echo_port = await origin(on, "echo")
            rules = [
                rule(
                    HTTPService(scheme="http", host="127.0.0.1", port=slow_port), "slow", hostname="slow.test"
                ),
                rule(HTTPService(scheme="http", host="127.0.0.1", port=echo_port), "echo", index=1),
            ]
            async with tunnel(tmp_path, rules) as (side, _run, _):
                blocked = await side.open(get("/", authority="slow.test", method="POST"))

                async def push() -> None:
                    await blocked.send(b"s" * (4 << 20))

                on.start_soon(push)
                await trio.testing.wait_all_tasks_blocked(0.1)  # the slow stream used its whole window
                body = b"e" * (3 << 20)
                resp = await side.request(get("/other", method="POST"), body)
                assert resp.status == 200
                assert json.loads(resp.body)["body_length"] == len(body)
                side.h2.reset_stream(blocked.stream_id, 8)
                await side.flush()
            on.cancel_scope.cancel()

"""The hello-world origin over loopback: /, /uptime, /_health, /sse, /ws, with and without TLS."""

from __future__ import annotations

import functools
import json
import ssl

import h11
import pytest
import trio
import trustme
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage

from tunnel_lab.connector.hello import serve_hello_world
from tunnel_lab.connector.websocket import websocket_accept

TIMEOUT = 10


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


async def connect(addr: tuple[str, int], ca: trustme.CA | None) -> trio.abc.Stream:
    tcp = await trio.open_tcp_stream(*addr)
    if ca is None:
        return tcp
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    tls = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
    await tls.do_handshake()
    return tls


async def request(
    stream: trio.abc.Stream,
    target: str,
    *,
    method: str = "GET",
    body: bytes = b"",
    max_body: int | None = None,
) -> tuple[h11.Response, bytes]:
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "hello.test"), ("X-Test", "yes")]
    if body:
        headers.append(("Content-Length", str(len(body))))
    await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)))
    if body:
        await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))
    response: h11.Response | None = None
    data = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            data += event.data
            if max_body is not None and len(data) >= max_body:
                break
        elif isinstance(event, h11.EndOfMessage):
            break
    assert response is not None
    return response, data


@pytest.mark.parametrize("use_tls", [True, False])
async def test_pages(ca: trustme.CA, use_tls: bool) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(
                lambda task_status: serve_hello_world(
                    "127.0.0.1",
                    0,
                    ssl_context=server_context(ca) if use_tls else None,
                    tls=use_tls,
                    task_status=task_status,
                )
            )
            stream = await connect(addr, ca if use_tls else None)
            resp, body = await request(stream, "/some/page?x=1", method="POST", body=b"hi there")
            assert resp.status_code == 200
            assert dict(resp.headers)[b"content-type"] == b"text/html; charset=utf-8"
            page = body.decode()
            assert "Congrats! You created a tunnel!" in page
            assert "Method: POST" in page and "Request URL: /some/page?x=1" in page
            assert "Host: hello.test" in page and "Header: X-Test, Value: [yes]" in page
            assert "Body: hi there" in page
            # keep-alive: more requests on the same connection
            resp, body = await request(stream, "/_health")
            assert (resp.status_code, body) == (200, b"ok")
            # a Go net/http server: Date, no Server, a small whole body with its length
            names = [name for name, _ in resp.headers]
            assert b"date" in names and b"server" not in names
            assert dict(resp.headers)[b"content-length"] == b"2"
            resp, body = await request(stream, "/uptime")
            doc = json.loads(body)
            assert dict(resp.headers)[b"content-type"] == b"application/json"
            assert set(doc) == {"startTime", "uptime"} and doc["startTime"].endswith("Z")
            assert doc["uptime"].endswith("s")
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_self_made_certificate_when_no_context() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(serve_hello_world, "127.0.0.1", 0)
            tcp = await trio.open_tcp_stream(*addr)
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            tls = trio.SSLStream(tcp, ctx, server_hostname="localhost")
            resp, body = await request(tls, "/_health")
            assert (resp.status_code, body) == (200, b"ok")
            await tls.aclose()
            nursery.cancel_scope.cancel()


async def test_sse_counts(ca: trustme.CA) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(
                lambda task_status: serve_hello_world("127.0.0.1", 0, tls=False, task_status=task_status)
            )
            stream = await connect(addr, None)
            resp, body = await request(stream, "/sse?freq=20ms", max_body=len(b"0\n\n1\n\n2\n\n"))
            assert resp.status_code == 200
            assert dict(resp.headers)[b"content-type"] == b"text/event-stream; charset=utf-8"
            assert body.startswith(b"0\n\n1\n\n2\n\n")
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_websocket_echo(ca: trustme.CA) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(
                lambda task_status: serve_hello_world(
                    "127.0.0.1", 0, ssl_context=server_context(ca), task_status=task_status
                )
            )
            stream = await connect(addr, ca)
            ws = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(ws.send(Request(host="hello.test", target="/ws")))
            got: list[object] = []

            async def pump() -> None:
                data = await stream.receive_some(65536)
                assert data
                ws.receive_data(bytes(data))
                got.extend(ws.events())

            while not any(isinstance(e, AcceptConnection) for e in got):
                await pump()
            await stream.send_all(ws.send(TextMessage(data="héllo")))
            await stream.send_all(ws.send(BytesMessage(data=b"\x00\x01\x02")))
            while sum(isinstance(e, (TextMessage, BytesMessage)) for e in got) < 2:
                await pump()
            messages = [e for e in got if isinstance(e, (TextMessage, BytesMessage))]
            assert messages[0].data == "héllo" and messages[1].data == b"\x00\x01\x02"
            await stream.send_all(ws.send(CloseConnection(code=1000)))
            while not any(isinstance(e, CloseConnection) for e in got):
                await pump()
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_ws_without_upgrade_is_400() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(
                lambda task_status: serve_hello_world("127.0.0.1", 0, tls=False, task_status=task_status)
            )
            stream = await connect(addr, None)
            resp, _ = await request(stream, "/ws")
            assert resp.status_code == 400
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_bodies_over_go_s_2_kib_buffer_are_chunked() -> None:
    """net/http sends a handler's body with Content-Length only when it ended within 2 KiB."""
    from tunnel_lab.connector.http1 import ServerConnection

    async def serve(stream: trio.SocketStream) -> None:
        conn = ServerConnection(stream)
        while (got := await conn.next_request()) is not None:
            size = int(got[0].target.decode().lstrip("/"))
            await conn.respond(200, [("Content-Type", "text/plain")], b"x" * size)
        await conn.aclose()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
            stream = await trio.open_tcp_stream(*listeners[0].socket.getsockname()[:2])
            resp, body = await request(stream, "/2048")
            assert dict(resp.headers).get(b"content-length") == b"2048" and len(body) == 2048
            resp, body = await request(stream, "/2049")
            headers = dict(resp.headers)
            assert b"content-length" not in headers and headers[b"transfer-encoding"] == b"chunked"
            assert len(body) == 2049
            await stream.aclose()
            nursery.cancel_scope.cancel()


def test_websocket_accept_rfc6455_example() -> None:
    assert websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

"""The connector's TLS stream to the edge (`EdgeTLSStream`) against trio's own TLS server side."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trio
import trustme

from connector.edge_conn import EDGE_SNI, EdgeTLSStream

Handler = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]


def _contexts(trusted: bool = True) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(EDGE_SNI).configure_cert(server)
    client = ssl.create_default_context()
    (ca if trusted else trustme.CA()).configure_trust(client)
    return server, client


async def _with_server(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, handler: Handler,
                       body: Callable[[EdgeTLSStream], Awaitable[None]]) -> None:
    async def serve(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            await handler(stream)
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = EdgeTLSStream(tcp, client_ctx, server_hostname=EDGE_SNI)
        try:
            await body(client)
        finally:
            await client.aclose()
        nursery.cancel_scope.cancel()


async def test_one_receive_returns_every_record_that_arrived():
    server_ctx, client_ctx = _contexts()
    payload = bytes(range(256)) * 400  # 100 KiB: seven TLS records
    sent = trio.Event()

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        assert await stream.receive_some() == b"ping"
        await stream.send_all(payload)
        sent.set()
        await stream.aclose()  # close_notify

    async def body(client: EdgeTLSStream) -> None:
        await client.do_handshake()
        await client.send_all(b"ping")
        await sent.wait()
        await trio.sleep(0.05)  # everything is in our socket buffer now
        got = await client.receive_some()
        assert len(got) > 16384  # more than one record in one receive
        while len(got) < len(payload):
            more = await client.receive_some()
            assert more
            got += more
        assert got == payload
        assert await client.receive_some() == b""  # the server's close_notify
        assert await client.receive_some() == b""

    with trio.fail_after(10):
        await _with_server(server_ctx, client_ctx, handler, body)


async def test_eof_without_close_notify_is_a_broken_stream():
    server_ctx, client_ctx = _contexts()

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.send_all(b"hello")
        await stream.transport_stream.aclose()  # TCP close, no close_notify

    async def body(client: EdgeTLSStream) -> None:
        await client.do_handshake()
        assert await client.receive_some() == b"hello"
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.receive_some()
        assert isinstance(info.value.__cause__, ssl.SSLError)

    with trio.fail_after(10):
        await _with_server(server_ctx, client_ctx, handler, body)


async def test_untrusted_certificate_fails_the_handshake_with_the_verify_error():
    server_ctx, client_ctx = _contexts(trusted=False)

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.receive_some()

    async def body(client: EdgeTLSStream) -> None:
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.do_handshake()
        cause = info.value.__cause__
        assert isinstance(cause, ssl.SSLCertVerificationError)
        assert cause.verify_message

    with trio.fail_after(10):
        await _with_server(server_ctx, client_ctx, handler, body)

"""transport.tls: the memory-BIO TLS client (the connector's stream to the edge) against trio's own TLS
server side, and the edge's batching of TLS records already buffered in trio's SSLStream."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
import trustme

from connector.edge_dial import EDGE_SNI
from transport.tls import TLSClientStream, take_buffered_tls

Handler = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]


def _contexts(trusted: bool = True) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(EDGE_SNI).configure_cert(server)
    client = ssl.create_default_context()
    (ca if trusted else trustme.CA()).configure_trust(client)
    return server, client


async def _with_server(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, handler: Handler,
                       body: Callable[[TLSClientStream], Awaitable[None]]) -> None:
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
        client = TLSClientStream(tcp, client_ctx, server_hostname=EDGE_SNI)
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

    async def body(client: TLSClientStream) -> None:
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

    async def body(client: TLSClientStream) -> None:
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

    async def body(client: TLSClientStream) -> None:
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.do_handshake()
        cause = info.value.__cause__
        assert isinstance(cause, ssl.SSLCertVerificationError)
        assert cause.verify_message

    with trio.fail_after(10):
        await _with_server(server_ctx, client_ctx, handler, body)


async def _tls_pair() -> tuple[trio.SSLStream, trio.SSLStream]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("edge.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    left, right = trio.testing.memory_stream_pair()
    server = trio.SSLStream(left, server_ctx, server_side=True)
    client = trio.SSLStream(right, client_ctx, server_hostname="edge.test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


async def test_reader_takes_every_buffered_tls_record_in_one_pass():
    with trio.fail_after(10):
        server, client = await _tls_pair()
        payload = bytes(range(256)) * 256  # 64 KiB: four 16 KiB TLS records
        await client.send_all(payload)
        first = await server.receive_some(65536)
        assert len(first) < len(payload)  # trio hands out one record per call
        got = take_buffered_tls(server, first)
        assert got == payload  # the rest came from the buffer, in order, nothing lost or doubled
        # Nothing buffered: unchanged; later data still flows through receive_some.
        assert take_buffered_tls(server, b"x") == b"x"
        await client.send_all(b"more")
        assert await server.receive_some(65536) == b"more"


async def test_reader_batching_leaves_other_streams_alone():
    left, _right = trio.testing.memory_stream_pair()
    assert take_buffered_tls(left, b"abc") == b"abc"


async def test_trio_ssl_stream_still_has_the_internals_we_read():
    """take_buffered_tls reads these trio internals; a trio that renames them would silently make it a
    no-op (every TLS record a reader pass again): fail here instead."""
    with trio.fail_after(10):
        server, _client = await _tls_pair()
    assert isinstance(server._ssl_object, ssl.SSLObject)  # type: ignore[attr-defined]
    assert isinstance(server._incoming, ssl.MemoryBIO)  # type: ignore[attr-defined]

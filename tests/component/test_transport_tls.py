"""transport.tls.TLSStream: the memory-BIO TLS stream, as a client (the connector's stream to the edge)
against trio's own TLS server side, and as a server (the edge's listeners) against trio's client side."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
import trustme

from tunnel_lab.connector.edge_dial import EDGE_SNI
from tunnel_lab.transport.tls import TLSStream

Handler = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]


def _contexts(trusted: bool = True) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(EDGE_SNI).configure_cert(server)
    client = ssl.create_default_context()
    (ca if trusted else trustme.CA()).configure_trust(client)
    return server, client


async def _with_server(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, handler: Handler,
                       body: Callable[[TLSStream], Awaitable[None]]) -> None:
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
        client = TLSStream(tcp, client_ctx, server_hostname=EDGE_SNI)
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

    async def body(client: TLSStream) -> None:
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

    async def body(client: TLSStream) -> None:
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

    async def body(client: TLSStream) -> None:
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.do_handshake()
        cause = info.value.__cause__
        assert isinstance(cause, ssl.SSLCertVerificationError)
        assert cause.verify_message

    with trio.fail_after(10):
        await _with_server(server_ctx, client_ctx, handler, body)


async def _tls_pair(make_pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]
                    = trio.testing.memory_stream_pair) -> tuple[TLSStream, trio.SSLStream[trio.abc.Stream]]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("edge.test").configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["h2"])
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_ctx.set_alpn_protocols(["h2"])
    left, right = make_pair()
    server = TLSStream(left, server_ctx, server_side=True)
    client = trio.SSLStream(right, client_ctx, server_hostname="edge.test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


async def test_server_side_reads_every_received_record_in_one_pass():
    with trio.fail_after(10):
        server, client = await _tls_pair()
        assert server.selected_alpn_protocol() == "h2"
        payload = bytes(range(256)) * 256  # 64 KiB: four 16 KiB TLS records
        await client.send_all(payload)
        assert await server.receive_some() == payload  # one receive, in order, nothing lost or doubled
        await server.send_all(b"back")
        assert await client.receive_some(65536) == b"back"
        await client.send_all(b"more")
        assert await server.receive_some(2) == b"mo"  # max_bytes holds; the rest waits, decrypted
        assert await server.receive_some() == b"re"


async def test_server_side_sends_the_alert_of_a_refused_handshake():
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("edge.test").configure_cert(server_ctx)
    server_ctx.sni_callback = lambda *_: ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    left, right = trio.testing.memory_stream_pair()
    server = TLSStream(left, server_ctx, server_side=True)
    client = trio.SSLStream(right, client_ctx, server_hostname="edge.test")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async def serve() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await server.do_handshake()
                await left.aclose()

            nursery.start_soon(serve)
            with pytest.raises(trio.BrokenResourceError) as info:
                await client.do_handshake()
    assert "UNRECOGNIZED_NAME" in str(info.value.__cause__).upper()  # the alert, not a bare EOF


class _Stallable(trio.abc.Stream):
    """A memory stream whose sends can be made to hang (a peer that stopped reading)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.stalled = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.stalled:
            await trio.sleep_forever()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _stallable_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    left, right = trio.testing.memory_stream_pair()
    return _Stallable(left), right


async def test_no_close_notify_after_a_write_cut_short():
    with trio.fail_after(10):
        server, client = await _tls_pair(_stallable_pair)
        assert isinstance(server.transport_stream, _Stallable)
        server.transport_stream.stalled = True
        cut = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            async def write() -> None:
                with cut:
                    await server.send_all(b"x" * (1 << 20))  # nobody reads: cut short

            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            cut.cancel()
        await server.aclose()  # no close_notify after half a record: the stream just closes
        with pytest.raises(trio.BrokenResourceError):  # the client sees a broken stream, not a clean end
            while await client.receive_some(1 << 20):
                pass

"""The edge's fast paths keep behaviour: a held-back response head still goes out before the edge
waits for the connector, and the tunnel reader's batch of buffered TLS records loses nothing."""

from __future__ import annotations

import ssl

import trio
import trio.testing
import trustme

from edge.tunnel import _take_buffered_tls
from tests.component.test_edge_support import make_tunnel, registered, running_edge, split


async def test_streamed_response_head_arrives_before_any_body(tmp_path):
    """The HTTP/1.1 eyeball gets the head of a response whose body has not started (SSE-like)."""
    head_seen = trio.Event()

    async def handler(s):
        await s.respond(200, [(b"Content-Type", b"text/event-stream")])
        with trio.fail_after(5):
            await head_seen.wait()  # no body until the eyeball has the head
        await s.send(b"data: 1\n\n", end=True)

    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler)
            host, port = split(edge.bound["http"])
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"GET /events HTTP/1.1\r\nHost: app.test\r\n\r\n")
                raw = b""
                while b"\r\n\r\n" not in raw:
                    raw += await stream.receive_some(65536)
                assert raw.startswith(b"HTTP/1.1 200")
                assert b"data: 1" not in raw
                head_seen.set()
                while b"0\r\n\r\n" not in raw:
                    raw += await stream.receive_some(65536)
            assert b"data: 1\n\n" in raw


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
        got = _take_buffered_tls(server, first)
        assert got == payload  # the rest came from the buffer, in order, nothing lost or doubled
        # Nothing buffered: unchanged; later data still flows through receive_some.
        assert _take_buffered_tls(server, b"x") == b"x"
        await client.send_all(b"more")
        assert await server.receive_some(65536) == b"more"


async def test_reader_batching_leaves_other_streams_alone():
    left, _right = trio.testing.memory_stream_pair()
    assert _take_buffered_tls(left, b"abc") == b"abc"

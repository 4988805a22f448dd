"""The edge's fast paths keep behaviour: a held-back response head still goes out before the edge
waits for the connector (the TLS read batching is tested in test_transport_tls.py)."""

from __future__ import annotations

import trio

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

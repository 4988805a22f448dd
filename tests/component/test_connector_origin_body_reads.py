"""Content-Length response bodies from the origin in many pieces: every byte arrives in order, the message
ends, bytes after it make the connection not reusable, and a body cut short is an error."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tunnel_lab.connector.origin_client import OriginConnection, OriginTarget
from tunnel_lab.wire.errors import OriginError
from tunnel_lab.wire.http1 import Body, End, ResponseHead


async def _events(conn: OriginConnection) -> tuple[bytes, list[str]]:
    body = bytearray()
    kinds: list[str] = []
    while True:
        ev = await conn.next_event()
        kinds.append(type(ev).__name__)
        if isinstance(ev, Body):
            body += ev.data
        if isinstance(ev, End):
            return bytes(body), kinds


async def test_body_in_many_pieces_then_an_unsolicited_response():
    body = bytes(range(256)) * 1200  # 300 KiB
    ours, theirs = trio.testing.memory_stream_pair()
    conn = OriginConnection(ours, OriginTarget("http", "127.0.0.1", 1), None)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async def origin() -> None:
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                await theirs.send_all(head + body[:10])
                view = memoryview(body)[10:]
                while len(view) > 30001:
                    await theirs.send_all(view[:30001])
                    view = view[30001:]
                    await trio.sleep(0.001)
                # the body's last bytes and a whole response nobody asked for in one piece
                await theirs.send_all(bytes(view) + b"HTTP/1.1 204 No Content\r\n\r\n")

            nursery.start_soon(origin)
            conn.start_request("GET", websocket=False)
            assert isinstance(await conn.next_event(), ResponseHead)
            got, kinds = await _events(conn)
            assert got == body
            assert kinds.count("Body") > 3  # it did come in pieces
            # a response nobody asked for: the connection is not reused (Go: "Unsolicited response
            # received on idle HTTP channel")
            assert not conn.reusable


async def test_body_cut_short_is_an_origin_error():
    ours, theirs = trio.testing.memory_stream_pair()
    conn = OriginConnection(ours, OriginTarget("http", "127.0.0.1", 1), None)
    with trio.fail_after(10):
        conn.start_request("GET", websocket=False)
        await theirs.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        assert isinstance(await conn.next_event(), ResponseHead)
        await theirs.send_all(b"x" * 5000)
        got = 0
        with pytest.raises(OriginError, match="malformed HTTP response"):
            ev = await conn.next_event()
            got += len(ev.data)
            await theirs.aclose()
            while True:
                ev = await conn.next_event()
                got += len(ev.data)
        assert got == 5000

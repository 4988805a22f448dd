"""Content-Length response bodies from the origin: read past h11's buffer (keeping h11's count), every
byte still arrives in order, the message still ends, and a body cut short is still an error."""

from __future__ import annotations

import h11
import pytest
import trio
import trio.testing

from tunnel_lab.connector.origin_client import OriginConnection, OriginTarget
from tunnel_lab.wire.errors import OriginError


async def _events(conn: OriginConnection) -> tuple[bytes, list[str]]:
    body = bytearray()
    kinds: list[str] = []
    while True:
        ev = await conn.next_event()
        kinds.append(type(ev).__name__)
        if isinstance(ev, h11.Data):
            body += ev.data
        if isinstance(ev, h11.EndOfMessage):
            return bytes(body), kinds


async def test_body_in_many_pieces_then_the_next_response():
    body = bytes(range(256)) * 1200  # 300 KiB
    ours, theirs = trio.testing.memory_stream_pair()
    conn = OriginConnection(ours, OriginTarget("http", "127.0.0.1", 1), None)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async def origin() -> None:
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                await theirs.send_all(head + body[:10])
                view = memoryview(body)[10:]
                while len(view) > 1:
                    await theirs.send_all(view[:30001])
                    view = view[30001:]
                    await trio.sleep(0.001)
                # the last byte and the whole next response in one piece
                await theirs.send_all(bytes(view) + b"HTTP/1.1 204 No Content\r\n\r\n")

            nursery.start_soon(origin)
            conn.start_request("GET", websocket=False)
            assert isinstance(await conn.next_event(), h11.Response)
            got, kinds = await _events(conn)
            assert got == body
            assert kinds.count("Data") > 3  # it did come in pieces
            assert conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE
            conn.h11.start_next_cycle()
            conn.start_request("GET", websocket=False)
            second = await conn.next_event()
            assert isinstance(second, h11.Response) and second.status_code == 204


async def test_body_cut_short_is_an_origin_error():
    ours, theirs = trio.testing.memory_stream_pair()
    conn = OriginConnection(ours, OriginTarget("http", "127.0.0.1", 1), None)
    with trio.fail_after(10):
        conn.start_request("GET", websocket=False)
        await theirs.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        assert isinstance(await conn.next_event(), h11.Response)
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

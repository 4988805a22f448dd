"""HTTP/1.1 request bodies with Content-Length: the edge reads them past h11's buffer (keeping h11's count)
but the connector still gets every byte in order, the next pipelined request is still served, and a body
cut short is still a failed upload."""

from __future__ import annotations

import hashlib

import trio

from tests.component.test_edge_support import make_tunnel, registered, running_edge, split


async def _digest_handler(s) -> None:
    body = await s.read_all()
    answer = f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
    await s.respond(200, [(b"content-length", str(len(answer)).encode())])
    await s.send(answer, end=True)


async def _read_responses(stream: trio.SocketStream, count: int) -> list[bytes]:
    raw = b""
    bodies: list[bytes] = []
    while len(bodies) < count:
        head_end = raw.find(b"\r\n\r\n")
        if head_end >= 0:
            head = raw[:head_end].lower()
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(raw) >= head_end + 4 + length:
                bodies.append(raw[head_end + 4: head_end + 4 + length])
                raw = raw[head_end + 4 + length:]
                continue
        data = await stream.receive_some(65536)
        assert data, "edge closed early"
        raw += data
    return bodies


async def test_large_body_in_many_pieces_then_a_pipelined_request(tmp_path):
    body = bytes(range(256)) * 4099  # ~1 MiB, not a multiple of any read size
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, _digest_handler)
            host, port = split(edge.bound["http"])
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"POST /a HTTP/1.1\r\nHost: app.test\r\n"
                                      b"Content-Length: %d\r\n\r\n" % len(body) + body[:1000])
                view = memoryview(body)[1000:]
                step = 70001
                while len(view) > 1:
                    await stream.send_all(view[:step])
                    view = view[step:]
                    await trio.sleep(0)
                # the body's last byte and a whole second request in one segment
                await stream.send_all(bytes(view) + b"POST /b HTTP/1.1\r\nHost: app.test\r\n"
                                      b"Content-Length: 5\r\n\r\nhello")
                first, second = await _read_responses(stream, 2)
    assert first == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
    assert second == f"5 {hashlib.sha256(b'hello').hexdigest()}".encode()


async def test_body_cut_short_is_not_delivered_as_complete(tmp_path):
    seen: list[bytes] = []
    outcome: list[str] = []
    ended = trio.Event()

    async def handler(s) -> None:
        try:
            while (chunk := await s.read()) is not None:
                seen.append(chunk)
            outcome.append("END_STREAM")
        except ConnectionResetError:
            outcome.append("reset")
        finally:
            ended.set()

    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, handler)
            host, port = split(edge.bound["http"])
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"POST /a HTTP/1.1\r\nHost: app.test\r\nContent-Length: 300000\r\n\r\n")
            await trio.sleep(0.05)
            await stream.send_all(b"x" * 100000)
            await trio.sleep(0.05)
            await stream.aclose()
            await ended.wait()
    assert outcome == ["reset"]  # never a clean end of a 300000-byte body
    assert sum(len(c) for c in seen) <= 100000

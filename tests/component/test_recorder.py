"""`lab.recorder.Recorder`: a relay on loopback in front of a scripted server; bytes pass unchanged."""

from __future__ import annotations

import functools

import trio

from tunnel_lab.lab.recorder import Recorder

REQUESTS = (
    b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
    b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
)
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_bytes_pass_unchanged_and_each_request_is_recorded() -> None:
    got = bytearray()
    hook_saw: list[int] = []

    async def server(stream: trio.SocketStream) -> None:
        while len(got) < len(REQUESTS):
            got.extend(await stream.receive_some(65536))
        await stream.send_all(ANSWER * 2)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(functools.partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            recorder = Recorder(f"127.0.0.1:{port}")
            address = await nursery.start(recorder.serve)

            async def hook() -> None:
                hook_saw.append(len(got))  # runs before the request's bytes go on

            recorder.on_request = hook
            client = await trio.open_tcp_stream("127.0.0.1", int(address.rsplit(":", 1)[1]))
            async with client:
                await client.send_all(REQUESTS)
                answer = bytearray()
                while len(answer) < 2 * len(ANSWER):
                    answer.extend(await client.receive_some(65536))
            nursery.cancel_scope.cancel()
    assert bytes(got) == REQUESTS and bytes(answer) == ANSWER * 2
    records = [(r.method, r.target, r.body) for r in recorder.records]
    assert records == [("GET", "/one", b""), ("POST", "/two", b"abc")]
    assert hook_saw == [0] and recorder.on_request is None  # once, then disarmed


async def test_a_server_that_is_down_closes_the_connection_as_it_would_without_the_relay() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with trio.socket.socket() as unused:
                await unused.bind(("127.0.0.1", 0))
                port = unused.getsockname()[1]
            recorder = Recorder(f"127.0.0.1:{port}")
            address = await nursery.start(recorder.serve)
            client = await trio.open_tcp_stream("127.0.0.1", int(address.rsplit(":", 1)[1]))
            async with client:
                assert await client.receive_some(100) == b""
            nursery.cancel_scope.cancel()
    assert recorder.records == []

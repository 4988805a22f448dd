"""Attacks on the plain HTTP/1.1 eyeball listener: smuggling shapes, malformed bodies, slowloris, and bad
management API bodies, against a running lab."""

from __future__ import annotations

import contextlib

import pytest
import trio

from tests.hostile.support import HOST, Lab, fd_count, read_all, running_lab, split

# (request bytes, status the edge answers); none of these may reach the origin as a request
REFUSED = {
    "cl-te": (b"POST /smuggle HTTP/1.1\r\nHost: %s\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: %s\r\n\r\n", 400),
    "te-cl": (b"POST /smuggle HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
              b"5c\r\nGET /smuggled HTTP/1.1\r\nHost: %s\r\n\r\n0\r\n\r\n", 400),
    "cl-cl": (b"POST /smuggle HTTP/1.1\r\nHost: %s\r\nContent-Length: 6\r\nContent-Length: 5\r\n\r\n"
              b"abcdef", 400),
    "te-obfuscated": (b"POST /smuggle HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: xchunked\r\n\r\n"
                      b"0\r\n\r\n", 400),
    "obs-fold": (b"POST /smuggle HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: identity\r\n chunked\r\n\r\n"
                 b"0\r\n\r\n", 400),
    "space-before-colon": (b"POST /smuggle HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding : chunked\r\n\r\n"
                           b"0\r\n\r\n", 400),
    "http-9.9": (b"GET /smuggle HTTP/9.9\r\nHost: %s\r\n\r\n", 505),
}
# these heads are fine, so they reach the connector, whose stream is reset: 400 to the eyeball
BAD_BODIES = {
    "bad-chunk-size": (b"POST /body HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nabc\r\n0\r\n\r\n"),
    "short-body": b"POST /body HTTP/1.1\r\nHost: %s\r\nContent-Length: 100\r\n\r\nonly this",
}


async def exchange(lab: Lab, data: bytes) -> bytes:
    host, port = split(lab.http)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(data.replace(b"%s", HOST.encode()))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_eof()
        return await read_all(stream)


@pytest.fixture
async def lab(tmp_path):
    async with running_lab(tmp_path) as running:
        yield running


async def test_smuggling_shapes_are_refused_and_never_reach_the_origin(lab):
    with trio.fail_after(60):
        for name, (data, status) in REFUSED.items():
            answer = await exchange(lab, data)
            assert answer.startswith(b"HTTP/1.1 %d " % status), (name, answer[:100])
        for name, data in BAD_BODIES.items():
            answer = await exchange(lab, data)
            assert answer.startswith(b"HTTP/1.1 400 "), (name, answer[:100])
        await lab.assert_healthy()
        _, history = await lab.api("GET", "/history")
        assert not [e for e in history if e["path"] in ("/smuggle", "/smuggled")]


async def test_slowloris_does_not_starve_other_eyeballs(lab):
    with trio.fail_after(60):
        host, port = split(lab.http)
        edge_fds = fd_count(lab.edge.pid)
        slow: list[trio.SocketStream] = []
        try:
            for _ in range(200):  # each sends part of a head, then nothing
                stream = await trio.open_tcp_stream(host, port)
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nX-A: ")
                slow.append(stream)
            for _ in range(3):
                await lab.assert_healthy()
        finally:
            for stream in slow:
                with contextlib.suppress(OSError):
                    await stream.aclose()
        while fd_count(lab.edge.pid) > edge_fds + 8:  # the edge closes its side of each
            await trio.sleep(0.05)


async def test_bad_api_bodies_leave_the_running_lab_serving(lab):
    with trio.fail_after(60):
        for body in (b'{"kind": "goaway", "location": "LAB1", "error_code": [1]}',
                     b'{"kind": "goaway", "location": "LAB1", "error_code": 99999999999999999999}',
                     b'{"kind": "latency", "ms": 1e309}', b"[" * 50000, b'{"kind": "latency", "ms": -5}'):
            status, answer = await lab.api("POST", "/faults", body)
            assert status == 400, answer
        status, faults = await lab.api("GET", "/faults")
        assert status == 200 and faults == []
        await lab.assert_healthy()

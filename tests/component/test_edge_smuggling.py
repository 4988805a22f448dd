"""Request smuggling and malformed HTTP/1.1 on the plain eyeball listener (issue 11, defects 2 and 6): the
edge answers 400/505 itself and forwards nothing, and the tunnel keeps serving."""

from __future__ import annotations

import pytest
import trio

from tests.component.test_edge_support import (
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
    split,
)


async def raw_exchange(address: str, data: bytes) -> bytes:
    """Send `data`, half-close, read until the edge closes."""
    host, port = split(address)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(data)
        await stream.send_eof()
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
    return out


CASES = {
    "cl-te": (b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"0\r\n\r\n", b"HTTP/1.1 400 ", 0),
    "te-cl": (b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n"
              b"0\r\n\r\n", b"HTTP/1.1 400 ", 0),
    "http-9.9": (b"GET / HTTP/9.9\r\nHost: app.test\r\n\r\n", b"HTTP/1.1 505 ", 0),
    # these reach the connector (the head is fine), which sees its stream reset
    "bad-chunk-size": (b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nabc\r\n0\r\n\r\n", b"HTTP/1.1 400 ", 1),
    "short-body": (b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100\r\n\r\nonly this",
                   b"HTTP/1.1 400 ", 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_malformed_requests_are_answered_by_the_edge(tmp_path, case):
    data, status_line, streams = CASES[case]
    with trio.fail_after(15):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            connector = await registered(nursery, edge, t, echo_handler)
            out = await raw_exchange(edge.bound["http"], data)
            assert out.startswith(status_line), out[:200]
            assert len(connector.opened) == streams
            r = await http_request(edge.bound["http"], "GET", "/next", host="app.test")
            assert r.status == 200
            [conn] = edge.registry.all()
            assert conn.active_streams == 0


async def test_an_oversized_head_gets_431_and_a_warning_naming_the_limit(tmp_path, caplog):
    with trio.fail_after(15):
        async with running_edge(tmp_path, max_request_headers=4096) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, echo_handler)
            for big in (b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"a" * 4090 + b"\r\n\r\n"):
                assert (await raw_exchange(edge.bound["http"], big)).startswith(b"HTTP/1.1 431")
            assert caplog.text.count("limit max_request_headers") == 2
            assert all(r.levelname == "WARNING" for r in caplog.records if "max_request_headers" in r.message)


async def test_a_malformed_request_after_a_good_one_on_the_same_connection_gets_400(tmp_path):
    with trio.fail_after(15):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, echo_handler)
            out = await raw_exchange(edge.bound["http"], b"GET /a HTTP/1.1\r\nHost: app.test\r\n\r\n"
                                     b"GET /b HTTP/1.1\r\nHost: app.test\r\nBad Name: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ")
    assert out.count(b"HTTP/1.1 400 ") == 1, out[-300:]

"""Hostile management API bodies (issue 11, item 6): each gets a clear 4xx, never a traceback or a
half-applied fault, and the tunnel keeps serving."""

from __future__ import annotations

import contextlib
import json

import pytest
import trio

from tests.component.test_edge_support import (
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
)

BAD = {
    "goaway error_code a list": (b'{"kind": "goaway", "location": "LAB1", "error_code": [1]}', 400),
    "goaway error_code out of range": (b'{"kind": "goaway", "location": "LAB1", '
                                       b'"error_code": 99999999999999999999}', 400),
    "goaway error_code negative": (b'{"kind": "goaway", "location": "LAB1", "error_code": -1}', 400),
    "latency infinite": (b'{"kind": "latency", "ms": 1e309}', 400),
    "latency Infinity literal": (b'{"kind": "latency", "ms": Infinity}', 400),
    "latency NaN": (b'{"kind": "latency", "ms": NaN}', 400),
    "latency negative": (b'{"kind": "latency", "ms": -5}', 400),
    "latency huge": (b'{"kind": "latency", "ms": 1e12}', 400),
    "delay negative": (b'{"kind": "delay-registrations", "seconds": -1}', 400),
    "count a bool": (b'{"kind": "latency", "ms": 1, "count": true}', 400),
    "selector not a string": (b'{"kind": "drop-connection", "location": ["LAB1"]}', 400),
    "conn_index a string": (b'{"kind": "reset-streams", "tunnel_id": "x", "conn_index": "0"}', 400),
    "nested 50000 deep": (b"[" * 50000 + b"]" * 50000, 400),
    "over 1 MiB": (b'{"kind": "latency", "ms": 1, "pad": "' + b"x" * (1024 * 1024) + b'"}', 413),
}


async def raw_post(address: str, token: str, body: bytes) -> tuple[int, bytes]:
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(b"POST /faults HTTP/1.1\r\nHost: api\r\nConnection: close\r\n"
                              b"Authorization: Bearer " + token.encode() + b"\r\n"
                              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        with contextlib.suppress(trio.BrokenResourceError):  # 413: closed before reading it all
            await stream.send_all(body)
        raw = b""
        try:
            while chunk := await stream.receive_some(65536):
                raw += chunk
        except trio.BrokenResourceError:
            pass
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]) if head else 0, payload


@pytest.mark.parametrize("case", sorted(BAD))
async def test_bad_fault_bodies_get_a_clear_answer(tmp_path, case):
    body, status = BAD[case]
    with trio.fail_after(15):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            await registered(nursery, edge, t, echo_handler)
            got, payload = await raw_post(edge.bound["api"], edge.api_token, body)
            assert got == status, payload
            assert "error" in json.loads(payload)
            assert edge.faults.active == {}
            [conn] = edge.registry.all()
            assert not conn.goaway_sent and conn.routable
            r = await http_request(edge.bound["http"], "GET", "/", host="app.test")
            assert r.status == 200

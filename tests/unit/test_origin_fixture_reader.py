"""The origin fixtures' lenient request reader and response builders (origin_fixtures.http1), no sockets."""

from __future__ import annotations

import contextlib
import hashlib

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.origin_fixtures.bodies import BLOCK, body_sha256, generate_body
from tunnel_lab.origin_fixtures.http1 import (
    NEED_DATA,
    BodyData,
    ConnectionClosed,
    EndOfRequest,
    Framing,
    RequestHead,
    RequestParseError,
    RequestReader,
    chunk,
    last_chunk,
    response_head,
)


def read_all(wire: bytes, cuts: list[int]) -> list[object]:
    """Feed `wire` in pieces cut at `cuts`, then EOF; return every event (body data merged per request)."""
    reader = RequestReader()
    events: list[object] = []
    pieces = [wire[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(wire)], strict=True)]
    body = bytearray()

    def drain() -> bool:
        nonlocal body
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                return False
            if isinstance(event, BodyData):
                body += event.data
                continue
            if isinstance(event, EndOfRequest):
                events.append(bytes(body))
                body = bytearray()
                events.append(event)
                reader.start_next_request()
                continue
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return True

    for piece in pieces:
        if not piece:
            continue  # feeding b"" would mean EOF
        reader.feed(piece)
        drain()
    reader.feed(b"")
    drain()
    return events


header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_0123456789",
                       min_size=1, max_size=12).filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding"))
header_values = st.binary(max_size=30).map(
    lambda v: bytes(b for b in v if b not in b"\r\n\x00").strip(b" \t"))


@given(headers=st.lists(st.tuples(header_names, header_values), max_size=6),
       chunks=st.lists(st.binary(min_size=1, max_size=50), max_size=6),
       trailers=st.lists(st.tuples(header_names, header_values), max_size=2),
       cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
def test_chunked_request_then_keep_alive(headers, chunks, trailers, cuts) -> None:
    head1 = b"POST /up?x=1 HTTP/1.1\r\n" + b"".join(
        n.encode() + b": " + v + b"\r\n" for n, v in headers) + b"Transfer-Encoding: chunked\r\n\r\n"
    wire1 = head1 + b"".join(b"%X;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks) + last_chunk(
        [(n, v) for n, v in trailers])
    wire2 = b"GET /next HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    wire = wire1 + wire2
    events = read_all(wire, [c % (len(wire) + 1) for c in cuts])
    first, body1, end1, second, body2, end2, closed = events
    assert isinstance(first, RequestHead) and isinstance(second, RequestHead)
    assert first.raw == head1 and first.framing is Framing.CHUNKED
    assert list(first.headers[:-1]) == [(n.encode(), v) for n, v in headers]
    assert body1 == b"".join(chunks)
    assert isinstance(end1, EndOfRequest) and list(end1.trailers) == [(n.encode(), v) for n, v in trailers]
    assert (second.method, second.target, second.content_length) == (b"GET", b"/next", 3)
    assert body2 == b"abc" and end2 == EndOfRequest()
    assert isinstance(closed, ConnectionClosed)


@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_give_events_or_a_parse_error(data: bytes) -> None:
    with contextlib.suppress(RequestParseError):
        read_all(data, [len(data) // 2])


@pytest.mark.parametrize("wire", [
    b"GET / HTTP/1.1\r\nHost: h\r\n",  # EOF inside the head
    b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",  # EOF inside the body
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",  # EOF inside a chunk
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\n Name : v\r\n\r\n",
])
def test_unframeable_requests_raise_parse_errors(wire: bytes) -> None:
    with pytest.raises(RequestParseError, match="origin fixture: "):
        read_all(wire, [])


def test_http10_keep_alive_and_obs_fold() -> None:
    events = read_all(b"GET / HTTP/1.0\r\nX-A: one\r\n two\r\n\r\n", [])
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.headers == ((b"X-A", b"one two"),)
    assert not head.keep_alive and head.http_version == b"1.0"


def test_responses_parse_with_a_strict_client() -> None:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
    client.send(h11.EndOfMessage())
    client.receive_data(response_head(200, [("Transfer-Encoding", "chunked"), ("Trailer", "X-T")])
                        + chunk(b"hello") + chunk(b"") + chunk(b" world") + last_chunk([("X-T", "1")]))
    events: list[h11.Event] = []
    while isinstance(event := client.next_event(), h11.Event):
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    assert isinstance(events[0], h11.Response) and events[0].status_code == 200
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"hello world"
    end = events[-1]
    assert isinstance(end, h11.EndOfMessage)
    assert list(end.headers) == [(b"x-t", b"1")]


@given(nbytes=st.integers(min_value=0, max_value=3 * BLOCK), block=st.integers(min_value=1, max_value=BLOCK))
def test_generated_bodies_do_not_depend_on_the_piece_size(nbytes: int, block: int) -> None:
    whole = b"".join(generate_body(nbytes, 5))
    assert len(whole) == nbytes
    assert b"".join(generate_body(nbytes, 5, block=block)) == whole
    # A prefix of a longer body is the shorter body: sizes share their bytes.
    assert b"".join(generate_body(nbytes + 10, 5))[:nbytes] == whole


def test_generated_digest() -> None:
    assert body_sha256(1000, 3) == hashlib.sha256(b"".join(generate_body(1000, 3))).hexdigest()
    assert body_sha256(1000, 3) != body_sha256(1000, 4)

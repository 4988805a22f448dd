"""wire.http1: the httptools readers and the response writer, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire.http1 import (
    Body,
    Closed,
    End,
    Event,
    Http1Error,
    Informational,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    ResponseWriter,
)

CHUNKED_POST = (b"POST /x HTTP/1.1\r\nHost: App \r\nX-Odd:  a b  \r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\nT1: v1\r\n\r\n")
NEXT_GET = b"GET /next HTTP/1.1\r\nHost: app\r\n\r\n"


def _body(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Body))


def test_a_chunked_request_with_trailers_then_a_pipelined_one() -> None:
    events = RequestReader(1024).feed(CHUNKED_POST + NEXT_GET)
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.http_version) == (b"POST", b"/x", b"1.1")
    assert head.headers == [(b"host", b"App"), (b"x-odd", b"a b"), (b"transfer-encoding", b"chunked")]
    assert head.keep_alive and not head.upgrade and not head.expects_continue
    assert events[1] == Body(b"abcde")  # the pieces of one read as one event
    assert events[2] == End([(b"t1", b"v1")])
    assert isinstance(events[3], RequestHead) and events[3].target == b"/next"
    assert events[4] == End([])


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_any_split_of_the_bytes_gives_the_same_request(cuts: list[int]) -> None:
    data = CHUNKED_POST + NEXT_GET
    reader = RequestReader(1024)
    events: list[Event] = []
    pos = 0
    for cut in cuts:
        events += reader.feed(data[pos:pos + cut])
        pos += cut
    events += reader.feed(data[pos:])
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"/x", b"/next"]
    assert heads[0].headers[1] == (b"x-odd", b"a b")
    assert _body(events) == b"abcde"
    assert [e.trailers for e in events if isinstance(e, End)] == [[(b"t1", b"v1")], []]
    assert reader.idle


def test_http_9_9_reaches_the_edge_which_answers_505() -> None:
    v99 = RequestReader(1024).feed(b"GET / HTTP/9.9\r\nHost: a\r\n\r\n")[0]
    assert isinstance(v99, RequestHead) and v99.http_version == b"9.9"


SMUGGLING = [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nContent-Length: 5\r\n\r\nabcdef",
]


@pytest.mark.parametrize("data", [*SMUGGLING,
    b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nFolded: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"\x16\x03\x01\x02\x00garbage",
])
def test_malformed_requests_are_400(data: bytes) -> None:
    with pytest.raises(Http1Error, match=r"^malformed request: ") as info:
        RequestReader(1024).feed(data)
    assert info.value.status == 400


def test_a_head_growing_past_the_limit_is_431_but_a_long_body_is_not() -> None:
    reader = RequestReader(100)
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n")
    with pytest.raises(Http1Error) as info:
        for _ in range(10):
            reader.feed(b"X-Pad: " + b"p" * 20 + b"\r\n")
    assert info.value.status == 431
    body = RequestReader(100)
    body.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
    # a read with a body's end and the next head's start: the body bytes are not head bytes
    assert _body(body.feed(b"x" * 1000 + b"GET / HTTP/1.1\r\nHo")) == b"x" * 1000


def test_expect_continue_and_http10() -> None:
    head = RequestReader(1024).feed(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\n"
                                    b"Content-Length: 1\r\n\r\n")[0]
    assert isinstance(head, RequestHead) and head.expects_continue
    old = RequestReader(1024).feed(b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")[0]
    assert isinstance(old, RequestHead) and not old.keep_alive  # one request per HTTP/1.0 connection


def test_an_upgrade_holds_the_bytes_after_it_until_told() -> None:
    reader = RequestReader(1024)
    events = reader.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                         + NEXT_GET[:10])
    assert isinstance(events[0], RequestHead) and events[0].upgrade
    assert reader.feed(NEXT_GET[10:]) == []
    assert reader.held == NEXT_GET
    assert not reader.idle
    resumed = reader.resume()  # the upgrade was refused: the bytes were the next request
    assert isinstance(resumed[0], RequestHead) and resumed[0].target == b"/next"


def test_eof_inside_a_request_is_an_error_and_between_requests_is_not() -> None:
    reader = RequestReader(1024)
    reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(Http1Error, match="middle of a request"):
        reader.feed_eof()
    done = RequestReader(1024)
    done.feed(NEXT_GET)
    done.feed_eof()


def _response(*chunks: bytes, method: str = "GET", eof: bool = False) -> tuple[ResponseReader, list[Event]]:
    reader = ResponseReader(4096)
    reader.expect(method)
    events: list[Event] = []
    for chunk in chunks:
        events += reader.feed(chunk)
    if eof:
        events += reader.feed_eof()
    return reader, events


def test_a_response_after_100_continue_keeps_field_name_case() -> None:
    reader, events = _response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-Case: v \r\n"
                               b"Content-Length: 2\r\n\r\nhi")
    assert events == [Informational(100, []),
                      ResponseHead(status=200, reason=b"OK", http_version=b"1.1",
                                   headers=[(b"X-Case", b"v"), (b"Content-Length", b"2")]),
                      Body(b"hi"), End([])]
    assert reader.reusable


def test_a_head_response_has_no_body_and_the_connection_goes_on() -> None:
    reader, events = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method="HEAD")
    assert [type(e) for e in events] == [ResponseHead, End]
    assert reader.reusable
    reader.expect("GET")
    events = reader.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert [type(e) for e in events] == [ResponseHead, End]


def test_a_body_until_eof_ends_there_and_is_not_reusable() -> None:
    reader, events = _response(b"HTTP/1.1 200 OK\r\n\r\nsome", b" bytes", eof=True)
    assert _body(events) == b"some bytes" and type(events[-1]) is End
    assert not reader.reusable


def test_eof_in_a_counted_body_or_a_head_is_an_error_and_before_a_response_is_closed() -> None:
    with pytest.raises(Http1Error, match="middle of a response body"):
        _response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", eof=True)
    with pytest.raises(Http1Error, match="middle of a response head"):
        _response(b"HTTP/1.1 200 OK\r\nContent-Le", eof=True)
    assert _response(eof=True)[1] == [Closed()]


@pytest.mark.parametrize("data", [b"HTTP/1.1 2x0 OK\r\n\r\n", b"\x00\x01garbage\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"])
def test_garbage_responses_are_errors(data: bytes) -> None:
    with pytest.raises(Http1Error, match=r"^malformed response: "):
        _response(data)


def test_a_response_nobody_asked_for_makes_the_connection_not_reusable() -> None:
    reader, events = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
                               b"HTTP/1.1 204 No Content\r\n\r\n")
    assert [type(e) for e in events] == [ResponseHead, Body, End]
    assert not reader.reusable
    later, _ = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    later.feed(b"junk")
    assert not later.reusable


def test_switching_protocols_holds_the_new_protocol_bytes() -> None:
    reader, events = _response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                               b"Connection: Upgrade\r\n\r\n\x81\x02hi", b"more")
    assert events == [Informational(101, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")])]
    assert reader.held == b"\x81\x02himore"


def test_response_writer_framing() -> None:
    chunked = ResponseWriter(http_version=b"1.1", method=b"GET", keep_alive=True)
    head = chunked.head(200, b"OK", [(b"x", b"1")])
    assert head == b"HTTP/1.1 200 OK\r\nx: 1\r\ntransfer-encoding: chunked\r\n\r\n"
    assert chunked.data(b"") == b""
    assert chunked.data(b"hello") == b"5\r\nhello\r\n"
    assert chunked.end([(b"t", b"v")]) == b"0\r\nt: v\r\n\r\n"
    assert not chunked.must_close

    counted = ResponseWriter(http_version=b"1.1", method=b"GET", keep_alive=True)
    counted.head(200, b"OK", [(b"Content-Length", b"3")])
    with pytest.raises(Http1Error, match="allows 3 more"):
        counted.data(b"four")
    assert counted.data(b"ab") == b"ab"
    with pytest.raises(Http1Error, match="1 bytes short"):
        counted.end()

    old = ResponseWriter(http_version=b"1.0", method=b"GET", keep_alive=False)
    assert old.head(200, b"OK", []).endswith(b"connection: close\r\n\r\n") and old.must_close
    assert old.data(b"raw") == b"raw"

    head_only = ResponseWriter(http_version=b"1.1", method=b"HEAD", keep_alive=True)
    head_only.head(200, b"OK", [(b"content-length", b"10")])
    assert head_only.data(b"x") == b"" and head_only.end() == b""
    with pytest.raises(Http1Error, match="not one number"):
        ResponseWriter(http_version=b"1.1", method=b"GET", keep_alive=True).head(
            200, b"OK", [(b"content-length", b"1"), (b"content-length", b"2")])


def test_request_and_writer_round_trip_through_a_response_reader() -> None:
    writer = ResponseWriter(http_version=b"1.1", method=b"GET", keep_alive=True)
    wire = writer.head(200, b"OK", [(b"a", b"b")]) + writer.data(b"x" * 70000) + writer.end([(b"t", b"1")])
    _, events = _response(wire)
    assert _body(events) == b"x" * 70000
    assert events[-1] == End([(b"t", b"1")])


def test_a_parse_error_after_a_complete_head_comes_after_the_head() -> None:
    reader = RequestReader(1024)
    events = reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert [type(e) for e in events] == [RequestHead]  # forwarded first, as h11 did
    with pytest.raises(Http1Error, match="chunk size"):
        reader.feed(b"more")
    with pytest.raises(Http1Error, match="chunk size"):
        reader.feed_eof()
    response = ResponseReader(1024)
    response.expect("GET")
    assert [type(e) for e in response.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")] \
        == [ResponseHead]
    with pytest.raises(Http1Error, match="chunk size"):
        response.feed_eof()


@pytest.mark.parametrize("value", [b"a\x0bb", b"\x0cab", b"ab\x1c", b"a\x7fb"])
def test_control_bytes_in_a_field_value_are_refused_both_ways(value: bytes) -> None:
    # wire.eyeball and wire.origin rely on it (docs/mutation-report.md: their strip() survivors)
    with pytest.raises(Http1Error, match="header value char"):
        RequestReader(1024).feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + value + b"\r\n\r\n")
    with pytest.raises(Http1Error, match="header value char"):
        _response(b"HTTP/1.1 200 OK\r\nX: " + value + b"\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("version", [b"HTTP/1.10", b"HTTP/10.1", b"HTTP/1.1.1"])
def test_only_one_digit_each_side_of_the_version_dot(version: bytes) -> None:
    with pytest.raises(Http1Error):
        RequestReader(1024).feed(b"GET / " + version + b"\r\nHost: a\r\n\r\n")

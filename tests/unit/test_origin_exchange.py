"""Properties of wire.origin.OriginExchange, driven like the connector shell drives it.

Each test counts with `hypothesis.event` whether an example reached its assertions; the strategies only
make valid inputs, so every example should (`pytest --hypothesis-show-statistics` shows the figures).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass

import h11
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.unit.test_origin_properties import authorities, h2_headers, parse_with_h11, paths
from tunnel_lab.wire.errors import OriginError, ResponseBodyError, StreamConversionError, TunnelLabError
from tunnel_lab.wire.origin import (
    HANDLER_BUFFER_SIZE,
    MAX_BUFFERED_BODY,
    BodyEncoder,
    EndStream,
    Framing,
    OriginExchange,
    OriginOptions,
    RequestState,
    ResponseState,
    SendData,
    SendHeaders,
    SendTrailers,
    TunnelAction,
    TunnelRequest,
    tunnel_response_headers,
    tunnel_trailers,
    with_sniffed_type,
)

OPTS = OriginOptions(connector_id="7b62af18-9c7a-49b5-aa80-0f6cb2a55d6e")
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"]


def exchange(method: str = "GET", *, end_stream: bool = True, extra: list[tuple[str, str]] | None = None,
             opts: OriginOptions = OPTS, websocket: bool = False) -> OriginExchange:
    req = TunnelRequest.from_h2_headers(h2_headers(method, "a.test", "/", extra or []), end_stream)
    return OriginExchange(req, opts, websocket=websocket, origin="127.0.0.1:8080")


# --- the request side -----------------------------------------------------------------------------

@dataclass
class RequestCase:
    method: str
    end_stream: bool
    chunks: list[bytes]
    length: str  # "absent", "exact", "short" (declared less than sent)
    no_chunked: bool
    probe_times_out: bool
    trailers: list[tuple[str, str]]
    declare_trailers: bool


request_cases = st.builds(
    RequestCase,
    method=st.sampled_from(METHODS),
    end_stream=st.booleans(),
    chunks=st.lists(st.binary(max_size=24), max_size=4),
    length=st.sampled_from(["absent", "exact", "short"]),
    no_chunked=st.booleans(),
    probe_times_out=st.booleans(),
    trailers=st.lists(st.tuples(st.sampled_from(["x-sum", "x-other"]), st.sampled_from(["1", "ab"])),
                      max_size=2),
    declare_trailers=st.booleans(),
)


def drive_request(case: RequestCase, authority: str, path: str) -> tuple[OriginExchange, bytes, bytes]:
    """Play the connector's request side; returns the exchange, the bytes written and the body sent."""
    chunks = [] if case.end_stream else [c for c in case.chunks if c]
    body = b"".join(chunks)
    extra = []
    if case.length != "absent" and not case.end_stream:
        extra.append(("content-length", str(len(body) // 2 if case.length == "short" else len(body))))
    if case.declare_trailers:
        extra.append(("trailer", "X-Sum"))
    req = TunnelRequest.from_h2_headers(h2_headers(case.method, authority, path, extra), case.end_stream)
    opts = OriginOptions(connector_id="c", disable_chunked_encoding=case.no_chunked)
    ex = OriginExchange(req, opts, origin="127.0.0.1:8080")
    stream = list(chunks)  # what the tunnel stream still holds
    probe = None
    if ex.needs_probe and not case.probe_times_out:
        probe = body[:1]
        if stream:
            stream[0] = stream[0][1:]
    ex.start(probe)
    if ex.request_state is RequestState.BUFFERING:
        for chunk in stream:
            ex.buffer_body(chunk)
        stream = []
        ex.end_buffered_body()
    wire = ex.request_head()
    if ex.has_request_body:
        wire += ex.request_pending()
        for chunk in stream:
            if not ex.wants_request_body:
                break
            wire += ex.request_data(chunk)
        wire += ex.request_end([(k.encode(), v.encode()) for k, v in case.trailers])
        ex.request_written()
    return ex, wire, body


@given(request_cases, authorities, paths)
def test_the_request_bytes_parse_with_h11_and_carry_the_body(case: RequestCase, authority: str,
                                                              path: str) -> None:
    ex, wire, body = drive_request(case, authority, path)
    event("reached the request assertions")
    request, seen, leftover = parse_with_h11(wire)
    assert request.method.decode() == case.method
    assert leftover == b""
    oreq = ex.origin_request
    assert oreq is not None and ex.request_state is RequestState.DONE
    if oreq.framing is Framing.CONTENT_LENGTH:
        assert seen == body[:oreq.content_length]  # a body longer than declared is cut at the length
    else:
        assert seen == body
    if oreq.framing is Framing.NONE:
        assert not ex.has_request_body
    # declared trailers travel, others never do
    trailer_names = {k.lower() for k, _ in h11_trailers(wire)}
    if oreq.framing is Framing.CHUNKED and case.declare_trailers:
        assert trailer_names == ({b"x-sum"} & {k.encode() for k, _ in case.trailers})
    else:
        assert trailer_names == set()


def h11_trailers(data: bytes) -> list[tuple[bytes, bytes]]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.EndOfMessage):
            return list(ev.headers)


def test_a_buffered_body_over_the_bound_fails_with_the_cause() -> None:
    opts = OriginOptions(connector_id="c", disable_chunked_encoding=True)
    ex = exchange("POST", end_stream=False, opts=opts)
    ex.start()
    assert ex.request_state is RequestState.BUFFERING
    ex.buffer_body(b"x" * MAX_BUFFERED_BODY)
    with pytest.raises(StreamConversionError, match=r"^the request body is over 33554432 bytes: too large to "
                                                    r"send without chunked encoding or a Content-Length$"):
        ex.buffer_body(b"x")
    assert ex.request_state is RequestState.FAILED


def test_the_probed_byte_goes_first_as_a_chunk() -> None:
    ex = exchange("GET", end_stream=False)
    assert ex.needs_probe
    assert ex.start(b"a").framing is Framing.CHUNKED
    assert ex.request_head().endswith(b"\r\n\r\n")
    assert ex.request_pending() == b"1\r\na\r\n"
    assert ex.request_pending() == b""  # only once
    assert ex.request_data(b"bc") == b"2\r\nbc\r\n"
    assert ex.request_end() == b"0\r\n\r\n"
    assert not ex.reusable()  # the response has not ended
    ex.request_written()
    ex.response_head(200, [(b"Content-Length", b"0")])
    ex.response_end()
    assert ex.reusable()


def test_events_out_of_order_are_project_errors() -> None:
    ex = exchange()
    with pytest.raises(StreamConversionError, match="origin request is start, not head"):
        ex.request_head()
    with pytest.raises(StreamConversionError, match="origin request is start, not buffering"):
        ex.buffer_body(b"x")
    with pytest.raises(StreamConversionError, match="origin request is start, not body"):
        ex.request_data(b"x")
    ex.start()
    with pytest.raises(StreamConversionError, match="origin request is head, not start"):
        ex.start()
    with pytest.raises(StreamConversionError, match="origin request is head, not ended"):
        ex.request_written()
    with pytest.raises(OriginError, match="origin response event while the response is waiting"):
        ex.response_data(b"x")
    with pytest.raises(OriginError, match="while the response is waiting"):
        ex.response_end()
    ex.response_head(204, [])
    with pytest.raises(OriginError, match="while the response is body"):
        ex.response_head(200, [])
    with pytest.raises(OriginError, match="while the response is body"):
        ex.informational(100, [])


def test_a_failed_request_body_keeps_its_cause_and_the_connection_is_not_reused() -> None:
    ex = exchange("POST", end_stream=False, extra=[("content-length", "3")])
    ex.start()
    ex.request_head()
    ex.request_data(b"ab")
    ex.request_failed(OriginError("broken pipe"))
    assert ex.request_error == "broken pipe" and ex.request_state is RequestState.FAILED
    ex.response_head(200, [(b"Content-Length", b"0")])
    ex.response_end()
    assert ex.response_complete and not ex.reusable()


def test_a_raw_body_never_leaves_the_connection_reusable() -> None:
    req = TunnelRequest.from_h2_headers([(b":method", b"CONNECT"), (b":authority", b"a.test:1")], False)
    ex = OriginExchange(req, OPTS, origin="127.0.0.1:8080")
    assert ex.start().framing is Framing.RAW
    ex.request_head()
    assert ex.wants_request_body and ex.request_data(b"xyz") == b"xyz"
    ex.request_end()
    ex.request_written()
    ex.response_head(200, [(b"Content-Length", b"0")])
    ex.response_end()
    assert ex.response_complete and not ex.reusable()


def test_no_request_body_means_no_body_task_and_reuse() -> None:
    ex = exchange("GET", end_stream=True)
    ex.start()
    ex.request_head()
    assert not ex.has_request_body and ex.request_state is RequestState.DONE
    assert not ex.reusable()  # no response yet
    ex.response_head(200, [(b"Content-Length", b"2")])
    ex.response_data(b"ok")
    ex.response_end()
    assert ex.reusable()


# --- the response side ----------------------------------------------------------------------------

@dataclass
class ResponseCase:
    method: str
    status: int
    framing: str  # "length", "chunked", "close"
    gzipped: bool
    chunks: list[bytes]
    trailers: list[tuple[bytes, bytes]]
    content_type: bytes | None


response_cases = st.builds(
    ResponseCase,
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    status=st.sampled_from([200, 201, 204, 206, 301, 304, 404, 500, 503]),
    framing=st.sampled_from(["length", "chunked", "close"]),
    gzipped=st.booleans(),
    chunks=st.lists(st.one_of(st.binary(max_size=40), st.binary(min_size=4000, max_size=18000)), max_size=3),
    trailers=st.lists(st.tuples(st.sampled_from([b"X-Sum", b"Content-Type", b"x-b"]),
                                st.sampled_from([b"1", b"v"])), max_size=2),
    content_type=st.sampled_from([None, b"text/plain", b"text/event-stream", b"application/grpc"]),
)


@dataclass
class Played:
    actions: list[TunnelAction]
    body: bytes  # what the eyeball should get
    ex: OriginExchange


def play_response(case: ResponseCase) -> Played:
    """The origin's response as h11 would hand it over, through the exchange."""
    ex = exchange(case.method)
    ex.start()
    ex.request_head()
    if ex.has_request_body:  # an empty POST still goes chunked, as Go sends it
        ex.request_end()
        ex.request_written()
    bodiless = case.method == "HEAD" or case.status in (204, 304)
    body = b"" if bodiless else b"".join(case.chunks)
    sent = gzip.compress(body, mtime=0) if case.gzipped and not bodiless else body
    headers: list[tuple[bytes, bytes]] = []
    if case.content_type is not None:
        headers.append((b"Content-Type", case.content_type))
    if case.gzipped:
        headers.append((b"Content-Encoding", b"gzip"))
    if case.framing == "length" and case.status not in (204, 304):
        whole = b"".join(case.chunks)
        length = len(gzip.compress(whole, mtime=0) if case.gzipped else whole)  # a HEAD answer's too
        headers.append((b"Content-Length", b"%d" % (length if case.method == "HEAD" else len(sent))))
    elif case.framing == "chunked" and not bodiless:
        headers.append((b"Transfer-Encoding", b"chunked"))
    actions = list(ex.response_head(case.status, headers))
    pieces = [sent[i:i + 5000] for i in range(0, len(sent), 5000)] if sent else []
    for piece in pieces:
        actions += ex.response_data(piece)
    trailers = case.trailers if case.framing == "chunked" and not bodiless else []
    actions += ex.response_end(trailers)
    return Played(actions, b"" if case.method == "HEAD" else body, ex)


@given(response_cases)
def test_the_tunnel_stream_is_one_well_formed_response(case: ResponseCase) -> None:
    played = play_response(case)
    event("reached the response assertions")
    actions = played.actions
    heads = [a for a in actions if isinstance(a, SendHeaders)]
    assert len(heads) == 1 and actions[0] is heads[0]  # HEADERS first, once
    # exactly one action ends the stream, and it is the last one
    ends = [a for a in actions if (isinstance(a, SendHeaders | SendData) and a.end_stream)
            or isinstance(a, SendTrailers | EndStream)]
    assert ends == [actions[-1]]
    data = b"".join(a.data for a in actions if isinstance(a, SendData))
    assert data == played.body
    fields = dict(heads[0].fields)
    if b"content-length" in fields and case.method != "HEAD":
        assert int(fields[b"content-length"]) == len(data)
    if case.gzipped and case.method != "HEAD" and case.status not in (204, 304):
        assert b"content-length" not in fields  # Go's transport gunzipped: the length is gone
    # HEADERS end the stream exactly when nothing follows them
    assert heads[0].end_stream == (len(actions) == 1)
    trailers = [a for a in actions if isinstance(a, SendTrailers)]
    bodiless = case.method == "HEAD" or case.status in (204, 304)
    expected = tunnel_trailers(case.trailers) if case.framing == "chunked" and not bodiless else []
    if trailers or expected:
        event("trailers sent")
        assert [t.fields for t in trailers] == [expected]
    assert played.ex.response_complete and played.ex.reusable()


@given(response_cases)
def test_a_buffered_response_leaves_in_4k_pieces_and_a_streamed_one_at_once(case: ResponseCase) -> None:
    ex = exchange(case.method if case.method != "HEAD" else "GET")
    ex.start()
    ex.request_head()
    if case.status in (204, 304):
        case.status = 200
    headers = [(b"Content-Type", case.content_type)] if case.content_type is not None else []
    body = b"".join(case.chunks)
    streamed = case.framing != "length" or case.content_type in (b"text/event-stream", b"application/grpc")
    if case.framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    first = ex.response_head(case.status, headers)
    event("reached the flush assertions")
    assert bool(first) == streamed  # a streamed response's HEADERS leave at once
    writes = [ex.response_data(chunk) for chunk in case.chunks]
    for chunk, out in zip(case.chunks, writes, strict=True):
        datas = [a.data for a in out if isinstance(a, SendData)]
        if streamed:
            assert datas == ([chunk] if chunk else [])
        else:
            assert all(len(d) >= HANDLER_BUFFER_SIZE for d in datas)  # Go's 4 KiB bufio.Writer
    left = b"".join(a.data for out in writes for a in out if isinstance(a, SendData))
    assert body.startswith(left) and len(body) - len(left) <= (0 if streamed else HANDLER_BUFFER_SIZE)
    if not streamed and left:  # the held HEADERS leave with the first bytes
        first_out = next(out for out in writes if out)
        assert isinstance(first_out[0], SendHeaders) and isinstance(first_out[1], SendData)


@given(st.sampled_from(["GET", "HEAD"]), st.binary(min_size=1, max_size=30), st.booleans())
def test_origin_failures_map_to_the_right_errors(method: str, data: bytes, closed: bool) -> None:
    ex = exchange(method)
    ex.start()
    ex.request_head()
    before = ex.body_error(OriginError("origin x closed the connection"))
    assert type(before) is OriginError  # before the head: a 502 with the cause as read
    ex.response_head(200, [(b"Transfer-Encoding", b"chunked")])
    ex.response_data(data)
    event("reached the failure assertions")
    if method == "HEAD":
        # the HEADERS already ended the stream; a close only makes the connection unusable
        assert ex.response_closed() == [] and ex.response_state is ResponseState.CLOSED
        assert not ex.reusable()
        return
    if closed:
        with pytest.raises(ResponseBodyError, match=r"^unexpected EOF$"):
            ex.response_closed()
    else:
        err = ex.body_error(OriginError("peer closed connection without sending complete message body"))
        assert isinstance(err, ResponseBodyError) and str(err) == "unexpected EOF"
        other = ex.body_error(OriginError("reset by peer"))
        assert isinstance(other, ResponseBodyError) and str(other) == "reset by peer"
        assert ex.body_error(other) is other


def test_closed_before_the_head_names_the_origin() -> None:
    ex = exchange()
    ex.start()
    ex.request_head()
    message = r"^origin 127\.0\.0\.1:8080 closed the connection before answering$"
    with pytest.raises(OriginError, match=message) as info:
        ex.response_closed()
    assert not isinstance(info.value, ResponseBodyError)


@given(st.binary(min_size=1, max_size=64))
def test_a_corrupt_gzip_body_is_a_body_error(junk: bytes) -> None:
    ex = exchange()
    ex.start()
    ex.request_head()
    ex.response_head(200, [(b"Content-Encoding", b"gzip")])
    good = gzip.compress(b"hello", mtime=0)
    try:
        ex.response_data(good[:10] + bytes([good[10] ^ 0xFF]) + junk)
        ex.response_end()
    except ResponseBodyError as exc:
        event("reached the gzip assertion")
        assert "gzip response body from the origin" in str(exc)
    else:
        raise AssertionError("a corrupt gzip body went through")


def test_a_truncated_gzip_body_is_a_body_error_at_the_end() -> None:
    ex = exchange()
    ex.start()
    ex.request_head()
    ex.response_head(200, [(b"Content-Encoding", b"gzip")])
    ex.response_data(gzip.compress(b"hello", mtime=0)[:12])
    with pytest.raises(ResponseBodyError, match="ended early"):
        ex.response_end()


def test_websocket_upgrade_and_informational_responses() -> None:
    ex = exchange(websocket=True)
    ex.start()
    ex.request_head()
    assert ex.informational(100, []) == []  # swallowed
    [headers] = ex.informational(101, [(b"Upgrade", b"websocket")])
    assert isinstance(headers, SendHeaders) and headers.fields[0] == (b":status", b"200")
    assert not headers.end_stream and ex.response_state is ResponseState.UPGRADED
    assert not ex.response_complete and not ex.reusable()
    plain = exchange()
    plain.start()
    plain.request_head()
    assert plain.informational(101, []) == [] and plain.response_state is ResponseState.WAITING


@given(st.lists(st.sampled_from(["start", "head", "pending", "data", "end", "written", "rhead", "rdata",
                                 "rend", "closed", "info"]), max_size=12))
def test_any_call_order_raises_only_project_errors(calls: list[str]) -> None:
    ex = exchange("POST", end_stream=False)
    steps = {
        "start": ex.start, "head": ex.request_head, "pending": ex.request_pending,
        "data": lambda: ex.request_data(b"x"), "end": ex.request_end, "written": ex.request_written,
        "rhead": lambda: ex.response_head(200, [(b"Content-Length", b"1")]),
        "rdata": lambda: ex.response_data(b"x"), "rend": ex.response_end, "closed": ex.response_closed,
        "info": lambda: ex.informational(103, []),
    }
    for name in calls:
        try:
            steps[name]()
        except TunnelLabError:
            event("a project error")
    event("reached the end of the calls")


# --- details pinned for mutation testing (docs/mutation-report.md) ---------------------------------

def test_before_start_nothing_is_sent_and_nothing_is_reusable() -> None:
    ex = exchange("POST", end_stream=False)
    assert not ex.has_request_body and not ex.wants_request_body and not ex.reusable()
    assert ex.origin_request is None and ex.request_error is None and not ex.headers_sent


def test_a_content_length_body_stops_at_its_length() -> None:
    ex = exchange("POST", end_stream=False, extra=[("content-length", "3")])
    ex.start()
    ex.request_head()
    assert ex.wants_request_body
    assert ex.request_data(b"ab") == b"ab" and ex.wants_request_body
    assert ex.request_data(b"cde") == b"c"  # what goes past the declared length is dropped
    assert not ex.wants_request_body  # the shell reads no further
    assert ex.request_end() == b""


def test_declared_trailers_pass_whatever_their_case() -> None:
    ex = exchange("POST", end_stream=False, extra=[("trailer", "x-sum")])
    ex.start()
    ex.request_head()
    ex.request_data(b"a")
    assert ex.request_end([(b"X-Sum", b"1"), (b"x-other", b"2")]) == b"0\r\nX-Sum: 1\r\n\r\n"


def test_the_eyeball_s_accept_encoding_means_no_gunzip() -> None:
    body = gzip.compress(b"hello", mtime=0)
    ex = exchange("GET", extra=[("accept-encoding", "gzip")])
    ex.start()
    ex.request_head()
    head = ex.response_head(200, [(b"Content-Encoding", b"gzip"), (b"Content-Length", b"%d" % len(body))])
    assert head == []  # Go's buffer holds a Content-Length response's HEADERS
    assert ex.response_data(body) == []
    headers, data = ex.response_end()
    assert isinstance(headers, SendHeaders) and (b"content-length", b"%d" % len(body)) in headers.fields
    assert data == SendData(data=body, end_stream=True)


def test_a_gunzipped_response_streams_because_go_drops_its_length() -> None:
    body = gzip.compress(b"hello", mtime=0)
    ex = exchange("GET")
    ex.start()
    ex.request_head()
    length = b"%d" % len(body)
    [headers] = ex.response_head(200, [(b"Content-Encoding", b"gzip"), (b"Content-Length", length)])
    assert isinstance(headers, SendHeaders) and not headers.end_stream
    assert all(name not in (b"content-length", b"content-type") for name, _ in headers.fields)
    assert ex.response_data(body) == [SendData(data=b"hello")]
    assert ex.response_end() == [EndStream()]


def test_held_headers_get_the_sniffed_content_type() -> None:
    for end in (False, True):
        ex = exchange("GET")
        ex.start()
        ex.request_head()
        ex.response_head(200, [(b"Content-Length", b"5000" if not end else b"6")])
        if end:
            assert ex.response_data(b"<html>") == []
            actions = ex.response_end()
        else:
            actions = ex.response_data(b"<html>" + b"x" * 4994)
        headers = actions[0]
        assert isinstance(headers, SendHeaders) and not headers.end_stream
        assert (b"content-type", b"text/html; charset=utf-8") in headers.fields


@pytest.mark.parametrize(("connection", "http10", "kept"), [
    (b"close", True, True),  # HTTP/1.0: Go keeps the field
    (b"close", None, False),  # HTTP/1.1 (the default): Go takes it out and records the close
    (b"keep-alive, close", None, False),
    (b"close,x", None, False),
    (b"Xclose", None, True),  # not the close token
    (b"keep-alive", None, True),
])
def test_a_connection_close_is_go_s_not_the_eyeball_s(connection: bytes, http10: bool | None,
                                                      kept: bool) -> None:
    ex = exchange("GET")
    ex.start()
    ex.request_head()
    head = [(b"Connection", connection)]
    actions = ex.response_head(200, head) if http10 is None else ex.response_head(200, head, http10=http10)
    [headers] = actions
    assert isinstance(headers, SendHeaders)
    serialized = dict(headers.fields)[b"cf-cloudflared-response-headers"]
    assert (b"Q29ubmVjdGlvbg" in serialized) == kept  # base64 of "Connection"


def test_a_head_response_keeps_its_length_unchecked() -> None:
    ex = exchange("HEAD")
    ex.start()
    ex.request_head()
    [headers] = ex.response_head(200, [(b"Content-Length", b"12x"), (b"Content-Encoding", b"gzip")])
    assert isinstance(headers, SendHeaders) and headers.end_stream
    assert (b"content-length", b"12x") in headers.fields
    get = exchange("GET")
    get.start()
    get.request_head()
    with pytest.raises(OriginError, match="bad Content-Length"):
        get.response_head(200, [(b"Content-Length", b"12x")])


def test_a_one_byte_buffered_body_has_a_length() -> None:
    opts = OriginOptions(connector_id="c", disable_chunked_encoding=True)
    ex = exchange("POST", end_stream=False, opts=opts)
    ex.start()
    ex.buffer_body(b"a")
    assert ex.end_buffered_body().content_length == 1
    assert b"\r\nContent-Length: 1\r\n" in ex.request_head()


def test_go_s_words_for_a_body_cut_short() -> None:
    for text in ("origin closed the connection",
                 "peer closed connection without sending complete message body"):
        ex = exchange()
        ex.start()
        ex.request_head()
        ex.response_head(200, [])
        assert str(ex.body_error(OriginError(text))) == "unexpected EOF"


def test_a_buffered_body_goes_first_with_its_length() -> None:
    opts = OriginOptions(connector_id="c", disable_chunked_encoding=True)
    ex = exchange("POST", end_stream=False, opts=opts)
    ex.start()
    ex.buffer_body(b"ab")
    ex.buffer_body(b"cd")
    oreq = ex.end_buffered_body()
    assert oreq.framing is Framing.CONTENT_LENGTH and oreq.content_length == 4 and ex.origin_request is oreq
    assert b"\r\nContent-Length: 4\r\n" in ex.request_head()
    assert ex.request_pending() == b"abcd"
    assert not ex.wants_request_body  # the whole body was read before the head


def test_a_short_body_fails_go_s_length_check() -> None:
    ex = exchange("POST", end_stream=False, extra=[("content-length", "5")])
    ex.start()
    ex.request_head()
    ex.request_data(b"ab")
    with pytest.raises(StreamConversionError, match=r"^http: ContentLength=5 with Body length 2$"):
        ex.request_end()


def test_a_websocket_request_is_never_probed_and_asks_for_the_upgrade() -> None:
    ex = exchange("GET", end_stream=False, websocket=True)
    assert not ex.needs_probe
    ex.start()
    head = ex.request_head()
    assert b"\r\nConnection: Upgrade\r\n" in head and b"\r\nUpgrade: websocket\r\n" in head
    assert ex.request_state is RequestState.DONE and ex.headers_sent is False


def test_a_probe_that_read_eof_means_no_body() -> None:
    ex = exchange("GET", end_stream=False)
    assert ex.start(b"").framing is Framing.NONE
    assert not ex.has_request_body
    timed_out = exchange("GET", end_stream=False)
    assert timed_out.start(None).framing is Framing.CHUNKED


def test_connection_close_default_is_http11() -> None:
    fields = tunnel_response_headers(200, [(b"Connection", b"close")])
    assert b"Q29ubmVjdGlvbg" not in dict(fields)[b"cf-cloudflared-response-headers"]


def test_connect_stays_raw_under_no_chunked_encoding() -> None:
    req = TunnelRequest.from_h2_headers([(b":method", b"CONNECT"), (b":authority", b"a.test:1")], False)
    opts = OriginOptions(connector_id="c", disable_chunked_encoding=True)
    ex = OriginExchange(req, opts, origin="127.0.0.1:8080")
    assert ex.start().framing is Framing.RAW
    assert ex.origin_request is not None and ex.origin_request.target == "a.test:1"


def test_a_buffered_request_must_get_its_length_before_encoding() -> None:
    message = r"^frame a BUFFERED request with OriginRequest\.with_body_length first$"
    with pytest.raises(ValueError, match=message):
        BodyEncoder(Framing.BUFFERED)


def test_the_sniffed_type_goes_last_without_a_length() -> None:
    fields = [(b":status", b"200"), (b"x-a", b"1")]
    assert with_sniffed_type(fields, b"<html>") == [*fields, (b"content-type", b"text/html; charset=utf-8")]

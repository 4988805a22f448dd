"""Properties of wire.eyeball.EyeballExchange, driven like the edge shell drives it.

Each property counts with `hypothesis.event` whether an example reached its assertions; the strategies
make valid heads and valid connector answers, so every example should
(`pytest --hypothesis-show-statistics` shows the figures).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tunnel_lab.wire.errors import StreamConversionError, TunnelLabError
from tunnel_lab.wire.eyeball import (
    HOP_BY_HOP,
    IDEMPOTENT,
    MAX_TRIES,
    Answer,
    EyeballExchange,
    EyeballRequest,
    EyeballResponse,
    EyeballState,
    Next,
    RequestRefused,
    h2_response_fields,
    is_websocket_request,
)
from tunnel_lab.wire.headers import META_CLOUDFLARED
from tunnel_lab.wire.origin import error_response_headers, tunnel_response_headers

RAY = "8f3a00112233c1d4-LAB1"
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "get"]
LOWER_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"

names = st.text(LOWER_TOKEN, min_size=1, max_size=10).map(str.encode)
values = st.text("".join(chr(c) for c in range(0x21, 0x7F)), max_size=12).map(str.encode)
special = st.sampled_from([
    (b"content-length", b"0"), (b"content-length", b"12"), (b"content-length", b"x"),
    (b"transfer-encoding", b"chunked"), (b"connection", b"upgrade"), (b"upgrade", b"websocket"),
    (b"connection", b"keep-alive, x-drop"), (b"x-drop", b"1"), (b"te", b"trailers"), (b"keep-alive", b"5"),
])
head_fields = st.lists(st.one_of(st.tuples(names, values), st.tuples(names, values), special), max_size=8)


def request(method: str = "GET", headers: tuple[tuple[bytes, bytes], ...] = ()) -> EyeballRequest:
    return EyeballRequest(method=method, target="/p", headers=headers, scheme="https",
                          client_ip="203.0.113.9", host="app.test")


# --- request heads --------------------------------------------------------------------------------

@given(st.sampled_from(METHODS), st.sampled_from([b"1.1"] * 6 + [b"1.0", b"2.0", b"0.9"]), head_fields,
       st.sampled_from([None, b"", *[b"app.test"] * 6]), st.sampled_from([80, 8192, 8192]))
def test_an_h1_head_is_refused_exactly_as_the_rules_say(method: str, version: bytes,
                                                        fields: list[tuple[bytes, bytes]], host: bytes | None,
                                                        limit: int) -> None:
    headers = ([(b"host", host)] if host is not None else []) + fields
    size = 2 + sum(len(n) + len(v) + 4 for n, v in headers)
    names_seen = {n for n, _ in headers}
    if not version.startswith(b"1."):
        expected: int | None = 505
    elif b"content-length" in names_seen and b"transfer-encoding" in names_seen:
        expected = 400
    elif size > limit:
        expected = 431
    elif not host:
        expected = 400
    else:
        expected = None
    try:
        ex = EyeballExchange.from_h1(method=method.encode(), target=b"/p", http_version=version,
                                     headers=headers, scheme="http", client_ip="192.0.2.1",
                                     max_head_size=limit)
    except RequestRefused as exc:
        event(f"reached: refused with {exc.status}")
        assert exc.status == expected
        assert exc.detail and str(exc)
        if expected == 431:
            assert exc.detail == "The request's header fields are too large."
            assert str(exc) == f"request head of {size} bytes over {limit}"
        if expected == 400 and not host and b"transfer-encoding" not in names_seen:
            assert str(exc) == exc.detail == "The request has no Host header."
        return
    event("reached: accepted")
    assert expected is None
    assert ex.request.host == "app.test" and ex.request.method == method and ex.request.target == "/p"
    assert ex.request.scheme == "http" and ex.request.client_ip == "192.0.2.1"
    assert ex.websocket == is_websocket_request(headers)
    first_framing = next(((n, v) for n, v in headers if n in (b"content-length", b"transfer-encoding")), None)
    if first_framing is None:
        assert not ex.has_body
    else:
        assert ex.has_body == (first_framing[0] == b"transfer-encoding" or first_framing[1] != b"0")
    assert ex.state is EyeballState.ROUTING and ex.tries == 0
    assert ex.end_stream == (not ex.has_body and not ex.websocket)


pseudo_fields = st.fixed_dictionaries({}, optional={
    name: st.sampled_from([b"GET", b"/", b"a.test", b""]) for name in (b":method", b":path", b":authority")})


@given(pseudo_fields.map(lambda d: list(d.items())), st.one_of(st.none(), st.just(b"b.test")), st.booleans())
def test_an_h2_head_needs_a_method_and_a_host(pseudo: list[tuple[bytes, bytes]], host: bytes | None,
                                              ended: bool) -> None:
    fields = pseudo + ([(b"host", host)] if host is not None else []) + [(b"x-a", b"1")]
    given_ = dict(pseudo)
    try:
        ex = EyeballExchange.from_h2(fields, ended=ended, client_ip="192.0.2.1")
    except StreamConversionError as exc:
        event("reached: refused")
        assert b":method" not in given_ or not (given_.get(b":authority") or host)
        assert "without :method, or without :authority and host" in str(exc)
        return
    event("reached: accepted")
    assert ex.request.method == given_[b":method"].decode()
    assert ex.request.host == (given_.get(b":authority") or host or b"").decode()
    assert ex.request.target == given_.get(b":path", b"/").decode()
    assert ex.request.headers == tuple(f for f in fields if not f[0].startswith(b":"))
    assert ex.request.scheme == "https" and ex.request.client_ip == "192.0.2.1"
    assert ex.has_body is not ended and not ex.websocket


# --- retries ---------------------------------------------------------------------------------------

@dataclass
class Failure:
    opening: bool  # the stream could not be opened (else it failed before the response head)
    retryable: bool
    no_capacity: bool
    bad_body: bool
    body_eof: bool
    upload_failed: bool
    response_started: bool


failures = st.builds(Failure, opening=st.booleans(), retryable=st.booleans(), no_capacity=st.booleans(),
                     bad_body=st.booleans(), body_eof=st.booleans(), upload_failed=st.booleans(),
                     response_started=st.booleans())


@given(st.sampled_from(METHODS), st.booleans(), st.booleans(), st.lists(failures, min_size=1, max_size=4))
def test_a_request_is_retried_only_where_it_is_safe_and_at_most_once(method: str, has_body: bool,
                                                                     websocket: bool,
                                                                     sequence: list[Failure]) -> None:
    ex = EyeballExchange(request(method), has_body=has_body, websocket=websocket)
    for failure in sequence:
        fields = ex.open_stream(RAY)
        assert ex.state is EyeballState.OPENING and dict(fields)[b"cf-ray"] == RAY.encode()
        if failure.opening:
            retry = ex.may_retry_open(failure.retryable)
            assert retry == (failure.retryable and ex.tries < MAX_TRIES)
            answer = ex.open_failed(retryable=failure.retryable, no_capacity=failure.no_capacity)
            assert ex.state is EyeballState.ANSWERED
            if failure.no_capacity:
                assert answer == Answer(503, "overloaded")
            elif failure.retryable:
                assert answer == Answer(530, "no-connection")
            else:
                assert answer == Answer(502, "stream-failed")
            if retry:
                continue
            event("reached: open failure answered")
            return
        ex.stream_opened()
        assert ex.state is EyeballState.WAITING
        # a bad body implies a failed upload, as in the shell
        upload_failed = failure.upload_failed or failure.bad_body
        decision = ex.stream_failed(retryable=failure.retryable, bad_body=failure.bad_body,
                                    body_eof=failure.body_eof, upload_failed=upload_failed,
                                    response_started=failure.response_started)
        if failure.bad_body and not failure.response_started:
            assert decision == Answer(400, "eyeball-closed" if failure.body_eof else "bad-request")
        elif upload_failed:
            assert decision is Next.GONE
        elif decision is Next.RETRY:
            assert failure.retryable and method.upper() in IDEMPOTENT and not has_body and not websocket
            assert ex.tries < MAX_TRIES
            continue
        else:
            assert not (failure.retryable and method.upper() in IDEMPOTENT and ex.end_stream
                        and ex.tries < MAX_TRIES)
            assert decision == Answer(502, "stream-failed")
        event("reached: stream failure decided")
        return
    event("reached: out of failures")
    assert ex.tries <= MAX_TRIES


def test_the_edge_s_own_answers() -> None:
    ex = EyeballExchange(request(), has_body=False)
    assert ex.timed_out() == Answer(524, "timeout") and ex.state is EyeballState.ANSWERED
    assert ex.connection_lost() == Answer(502, "connection-lost")
    assert ex.bad_response() == Answer(502, "bad-response")
    assert ex.oversized_response() == Answer(502, "oversized-headers")


# --- the response ------------------------------------------------------------------------------------

origin_fields = st.lists(st.one_of(
    st.tuples(st.sampled_from([b"X-A", b"Cf-Ray", b"Connection", b"Keep-Alive", b"Trailer", b"Te",
                               b"Upgrade", b"X-Drop", b"Content-Type"]), values),
    st.just((b"Connection", b"X-Drop")),
    st.just((b"Sec-Websocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")),
), max_size=6)


@given(st.sampled_from(METHODS), st.booleans(), st.sampled_from([101, 200, 204, 206, 304, 404, 500, 502]),
       origin_fields, st.sampled_from([None, b"0", b"5"]), st.booleans())
def test_the_eyeball_response_follows_the_tunnel_response(method: str, websocket: bool, status: int,
                                                          fields: list[tuple[bytes, bytes]],
                                                          length: bytes | None, from_connector: bool) -> None:
    origin = list(fields)
    if length is not None:
        origin.append((b"Content-Length", length))
    if status == 101:
        origin += [(b"Upgrade", b"websocket"), (b"Sec-Websocket-Accept", b"x")]
    tunnel = error_response_headers(META_CLOUDFLARED, status) if from_connector else \
        tunnel_response_headers(status, origin, head=method.upper() == "HEAD")
    ex = EyeballExchange(request(method), has_body=False, websocket=websocket)
    ex.open_stream(RAY)
    ex.stream_opened()
    resp = ex.response(tunnel)
    event("reached the response assertions")
    names_out = [n.lower() for n, _ in resp.headers]
    upgrade = websocket and status == 101 and not from_connector
    if upgrade:
        assert resp.outcome == "websocket" and resp.status == 101 and b"cf-ray" not in names_out[-1:]
        assert (resp.bodiless, resp.body_length) == (False, None) and ex.state is EyeballState.RESPONDING
        assert b"upgrade" in names_out and b"content-length" not in names_out
        assert [f for f in resp.headers if f[0].lower() == b"connection"] == \
            [f for f in origin if f[0] == b"Connection"]  # kept as the origin sent it
        return
    if from_connector and status >= 500:
        assert resp == EyeballResponse(status=status, headers=[], outcome="connector-error", bodiless=False,
                                       body_length=None)
        assert ex.state is EyeballState.ANSWERED
        return
    assert resp.outcome == "ok" and ex.state is EyeballState.RESPONDING
    assert resp.status == (200 if status == 101 and not from_connector else status)
    # the ray names the response, once, last; an origin's own cf-ray never passes
    assert resp.headers[-1] == (b"cf-ray", RAY.encode()) and names_out.count(b"cf-ray") == 1
    # hop-by-hop fields, and those the origin's Connection names, stay behind
    assert not set(names_out) & HOP_BY_HOP
    if (b"Connection", b"X-Drop") in origin:
        assert b"x-drop" not in names_out
    tunnel_length = dict(tunnel).get(b"content-length")
    bodiless = method.upper() == "HEAD" or resp.status in (204, 304) or tunnel_length == b"0"
    assert resp.bodiless == bodiless
    assert resp.body_length == (None if bodiless or tunnel_length is None else int(tunnel_length))


def test_a_malformed_tunnel_response_is_a_project_error() -> None:
    ex = EyeballExchange(request(), has_body=False)
    ex.open_stream(RAY)
    with pytest.raises(TunnelLabError, match="is not a 3-digit status"):
        ex.response([(b":status", b"2000")])
    assert ex.state is EyeballState.OPENING  # nothing was decided


@given(st.integers(100, 599), st.lists(st.tuples(
    st.sampled_from([b"Connection", b"Keep-Alive", b"Proxy-Connection", b"Transfer-Encoding", b"Upgrade",
                     b"TE", b"X-A", b"Content-Type", b"cf-ray"]), values), max_size=6))
def test_h2_response_fields_drop_connection_specific_ones(status: int,
                                                          fields: list[tuple[bytes, bytes]]) -> None:
    out = h2_response_fields(status, fields)
    event("reached the h2 field assertions")
    assert out[0] == (b":status", str(status).encode())
    dropped = (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te")
    assert out[1:] == [(n.lower(), v) for n, v in fields if n.lower() not in dropped]


# --- details pinned for mutation testing (docs/mutation-report.md) ---------------------------------

def test_a_head_of_exactly_the_limit_passes() -> None:
    headers = [(b"host", b"app.test"), (b"x-a", b"1")]
    size = len(b"/p") + (4 + 8 + 4) + (3 + 1 + 4)
    head = {"method": b"GET", "target": b"/p", "http_version": b"1.1", "headers": headers, "scheme": "https",
            "client_ip": "192.0.2.1"}
    assert EyeballExchange.from_h1(**head, max_head_size=size).request.host == "app.test"
    with pytest.raises(RequestRefused, match=f"^request head of {size} bytes over {size - 1}$"):
        EyeballExchange.from_h1(**head, max_head_size=size - 1)


def test_the_first_host_field_names_the_host() -> None:
    ex = EyeballExchange.from_h1(method=b"GET", target=b"/", http_version=b"1.1",
                                 headers=[(b"host", b"one.test"), (b"host", b"two.test")], scheme="https",
                                 client_ip="192.0.2.1", max_head_size=8192)
    assert ex.request.host == "one.test" and ex.request.headers[0] == (b"host", b"one.test")


def test_stream_failure_defaults_and_a_fresh_exchange() -> None:
    ex = EyeballExchange(request(), has_body=False)
    assert (ex.state, ex.tries, ex.ray, ex.websocket) == (EyeballState.ROUTING, 0, "", False)
    assert ex.stream_failed(retryable=False) == Answer(502, "stream-failed")
    assert ex.stream_failed(retryable=False, bad_body=True) == Answer(400, "bad-request")
    assert ex.stream_failed(retryable=True) is Next.RETRY  # tries 0: a bodiless GET may go elsewhere


def h1(headers: list[tuple[bytes, bytes]], version: bytes = b"1.1") -> EyeballExchange:
    return EyeballExchange.from_h1(method=b"GET", target=b"/", http_version=version,
                                   headers=[(b"host", b"app.test"), *headers], scheme="https",
                                   client_ip="192.0.2.1", max_head_size=8192)


def test_the_refusal_messages() -> None:
    with pytest.raises(RequestRefused, match=r"^The request has both Content-Length and Transfer-Encoding "
                                             r"\(RFC 9112 section 6\.1\)$"):
        h1([(b"content-length", b"1"), (b"transfer-encoding", b"chunked")])
    with pytest.raises(RequestRefused, match=r"^HTTP version '2\.0' is not supported \(HTTP/1\.x only\)$"):
        h1([], b"2.0")
    with pytest.raises(StreamConversionError,
                       match=r"^eyeball HTTP/2 request without :method, or without :authority and host$"):
        EyeballExchange.from_h2([(b":path", b"/")], ended=True, client_ip="192.0.2.1")


def test_which_h1_requests_have_a_body_or_a_websocket() -> None:
    assert h1([(b"content-length", b"1")]).has_body
    assert h1([(b"content-length", b"x")]).has_body  # unparsable: h11 would have refused; never lose a body
    assert not h1([(b"content-length", b"0")]).has_body
    ws = h1([(b"connection", b"Upgrade"), (b"upgrade", b"websocket")])
    assert ws.websocket and not ws.end_stream
    for ended in (True, False):
        assert EyeballExchange.from_h2([(b":method", b"GET"), (b":authority", b"a")], ended=ended,
                                       client_ip="192.0.2.1").has_body is (not ended)


def test_at_most_two_tries_and_only_bodiless_idempotent_requests_retry() -> None:
    ex = EyeballExchange(request("GET"), has_body=False)
    ex.open_stream(RAY)
    assert ex.tries == 1 and ex.may_retry_open(True) and ex.stream_failed(retryable=True) is Next.RETRY
    ex.open_stream(RAY)
    assert ex.tries == 2 and not ex.may_retry_open(True)
    assert ex.stream_failed(retryable=True) == Answer(502, "stream-failed")
    upload = EyeballExchange(request("GET"), has_body=True)
    upload.open_stream(RAY)
    assert upload.stream_failed(retryable=True) == Answer(502, "stream-failed")
    post = EyeballExchange(request("POST"), has_body=False)
    post.open_stream(RAY)
    assert post.stream_failed(retryable=True) == Answer(502, "stream-failed")


def test_204_and_304_are_bodiless_whatever_their_length() -> None:
    for status in (204, 304):
        ex = EyeballExchange(request("GET"), has_body=False)
        ex.open_stream(RAY)
        resp = ex.response([(b":status", str(status).encode()), (b"cf-cloudflared-response-meta",
                                                                   b'{"src":"origin"}')])
        assert resp.bodiless and resp.body_length is None


def test_a_websocket_stream_carries_the_marker() -> None:
    ex = EyeballExchange(request("GET"), has_body=False, websocket=True)
    assert (b"cf-cloudflared-proxy-connection-upgrade", b"websocket") in ex.open_stream(RAY)
    assert (b"cf-cloudflared-proxy-connection-upgrade", b"websocket") not in \
        EyeballExchange(request("GET"), has_body=False).open_stream(RAY)

"""wire.origin: tunnel stream -> HTTP/1.1 origin request, origin response -> tunnel response."""

from __future__ import annotations

import gzip

import pytest

from tunnel_lab.wire.errors import OriginError, StreamConversionError
from tunnel_lab.wire.headers import META_FLOW_LIMITED, deserialize_response_headers
from tunnel_lab.wire.origin import (
    BodyEncoder,
    Framing,
    Gunzipper,
    OriginOptions,
    TunnelRequest,
    bad_request_response,
    build_origin_request,
    error_response_headers,
    forbidden_request_header,
    go_host_header,
    go_request_uri,
    needs_body_probe,
    should_gunzip,
    strip_gzip_headers,
    tunnel_response_headers,
    tunnel_trailers,
)

OPTS = OriginOptions(connector_id="11111111-2222-4333-8444-555555555555")
NOCHUNK = OriginOptions(connector_id=OPTS.connector_id, disable_chunked_encoding=True)


def h2(method: str = "GET", path: str = "/", authority: str = "app.example.test",
       extra: list[tuple[bytes, bytes]] | None = None, scheme: str = "https") -> list[tuple[bytes, bytes]]:
    return [(b":method", method.encode()), (b":scheme", scheme.encode()),
            (b":authority", authority.encode()), (b":path", path.encode()), *(extra or [])]


def request(method: str = "GET", *, end_stream: bool = True, path: str = "/",
            extra: list[tuple[bytes, bytes]] | None = None,
            authority: str = "app.example.test") -> TunnelRequest:
    return TunnelRequest.from_h2_headers(h2(method, path, authority, extra), end_stream)


# --- TunnelRequest.from_h2_headers ------------------------------------------------------------------

def test_from_h2_headers_fields() -> None:
    req = request("POST", end_stream=False, path="/a?b=1", extra=[(b"x-a", b"1"), (b"cookie", b"c=1")])
    assert (req.method, req.scheme, req.path) == ("POST", "https", "/a?b=1")
    assert req.authority == "app.example.test"
    assert req.headers == ((b"x-a", b"1"), (b"cookie", b"c=1"))
    assert req.end_stream is False


def test_from_h2_headers_accepts_str_and_connect() -> None:
    req = TunnelRequest.from_h2_headers([(":method", "CONNECT"), (":authority", "10.0.0.1:22")], False)
    assert (req.method, req.authority, req.path, req.scheme) == ("CONNECT", "10.0.0.1:22", "", "")


def test_authority_falls_back_to_host_header() -> None:
    req = TunnelRequest.from_h2_headers(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h.test")], True)
    assert req.authority == "h.test"


@pytest.mark.parametrize("headers", [
    [(b":scheme", b"https"), (b":path", b"/")],  # no method
    [(b":method", b"GET"), (b":scheme", b"https")],  # no path
    [(b":method", b"GET"), (b":path", b"/")],  # no scheme
    [(b":method", b"GET"), (b":scheme", b"ftp"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"x")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a b")],
    [(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b"x", b"1"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":status", b"200")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"X-Upper", b"1")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"x y", b"1")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"x", b"a\x00b")],
    [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")],
    [(b":method", b"CONNECT")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a%zz")],
])
def test_from_h2_headers_rejects_what_go_resets(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(StreamConversionError):
        TunnelRequest.from_h2_headers(headers, True)


# --- Go's 400 for connection-specific fields (go1.26 D11) ---------------------------------------------

@pytest.mark.parametrize(("field", "message"), [
    ((b"connection", b"close"), 'request header "Connection" is not valid in HTTP/2'),
    ((b"te", b"gzip"), 'request header "TE" may only be "trailers" in HTTP/2'),
    ((b"keep-alive", b"timeout=5"), 'request header "Keep-Alive" is not valid in HTTP/2'),
    ((b"proxy-connection", b"keep-alive"), 'request header "Proxy-Connection" is not valid in HTTP/2'),
    ((b"upgrade", b"websocket"), 'request header "Upgrade" is not valid in HTTP/2'),
    ((b"transfer-encoding", b"chunked"), 'request header "Transfer-Encoding" is not valid in HTTP/2'),
    ((b"te", b"trailers"), None),
    ((b"te", b""), None),
    ((b"x-connection", b"close"), None),
])
def test_forbidden_request_header_messages(field: tuple[bytes, bytes], message: str | None) -> None:
    assert forbidden_request_header(h2(extra=[field])) == message


def test_forbidden_order_and_repeated_te() -> None:
    both = [(b"upgrade", b"x"), (b"connection", b"y")]
    assert forbidden_request_header(both) == 'request header "Connection" is not valid in HTTP/2'
    assert forbidden_request_header([(b"te", b"trailers"), (b"te", b"trailers")]) is not None


def test_bad_request_response_shape() -> None:
    fields, body = bad_request_response('request header "Connection" is not valid in HTTP/2')
    assert body == b'request header "Connection" is not valid in HTTP/2\n' and len(body) == 51
    assert fields == [(b":status", b"400"), (b"content-type", b"text/plain; charset=utf-8"),
                      (b"x-content-type-options", b"nosniff"), (b"content-length", b"51")]
    assert not any(k.startswith(b"cf-") for k, _ in fields)


# --- the head -------------------------------------------------------------------------------------

def test_head_order_and_names_like_a02() -> None:
    req = request(extra=[(b"user-agent", b"vectors-test/1.0"), (b"accept", b"*/*"),
                         (b"x-custom-header", b"custom value 1"), (b"x-multi", b"first"),
                         (b"x-multi", b"second"),
                         (b"cookie", b"c1=v1"), (b"cookie", b"c2=v2"), (b"cf-ray", b"8f00000000000001-LAB"),
                         (b"cf-connecting-ip", b"203.0.113.7")], path="/hello?x=1&y=two")
    out = build_origin_request(req, OPTS)
    assert out.head_bytes() == (
        b"GET /hello?x=1&y=two HTTP/1.1\r\nHost: app.example.test\r\nUser-Agent: vectors-test/1.0\r\n"
        b"Accept: */*\r\nCf-Connecting-Ip: 203.0.113.7\r\nCf-Ray: 8f00000000000001-LAB\r\n"
        b"Cf-Warp-Tag-Id: 11111111-2222-4333-8444-555555555555\r\nConnection: keep-alive\r\n"
        b"Cookie: c1=v1; c2=v2\r\nX-Custom-Header: custom value 1\r\nX-Multi: first\r\nX-Multi: second\r\n"
        b"Accept-Encoding: gzip\r\n\r\n")
    assert out.framing is Framing.NONE and out.added_accept_encoding


def test_user_agent_absent_or_empty_is_not_written() -> None:
    for extra in ([], [(b"user-agent", b"")], [(b"user-agent", b""), (b"user-agent", b"x")]):
        out = build_origin_request(request(extra=extra), OPTS)
        assert b"User-Agent" not in out.head_bytes()
    out = build_origin_request(request(extra=[(b"user-agent", b"a"), (b"user-agent", b"b")]), OPTS)
    assert [v for k, v in out.headers if k == b"User-Agent"] == [b"a"]


def test_proxy_upgrade_header_is_removed_and_request_headers_header_kept() -> None:
    extra = [(b"cf-cloudflared-proxy-connection-upgrade", b"websocket"),
             (b"cf-cloudflared-request-headers", b"x")]
    out = build_origin_request(request(extra=extra), OPTS)
    names = [k for k, _ in out.headers]
    assert b"Cf-Cloudflared-Proxy-Connection-Upgrade" not in names
    assert b"Cf-Cloudflared-Request-Headers" in names


def test_accept_encoding_rules() -> None:
    assert build_origin_request(request("HEAD"), OPTS).added_accept_encoding is False
    ranged = build_origin_request(request(extra=[(b"range", b"bytes=0-1")]), OPTS)
    assert ranged.added_accept_encoding is False
    given_ae = build_origin_request(request(extra=[(b"accept-encoding", b"br")]), OPTS)
    assert not given_ae.added_accept_encoding
    assert given_ae.headers[1] == (b"Accept-Encoding", b"br")  # sorted in, not last
    empty = build_origin_request(request(extra=[(b"accept-encoding", b"")]), OPTS)
    assert empty.added_accept_encoding and empty.headers[-1] == (b"Accept-Encoding", b"gzip")


def test_tags_and_host_override() -> None:
    opts = OriginOptions(connector_id="cid", http_host_header="internal.test",
                         tags=(("env", "lab"), ("ID", "extra")))
    out = build_origin_request(request(extra=[(b"x-forwarded-host", b"old")]), opts)
    assert out.headers[0] == (b"Host", b"internal.test")
    assert [v for k, v in out.headers if k == b"X-Forwarded-Host"] == [b"app.example.test"]
    assert [v for k, v in out.headers if k == b"Cf-Warp-Tag-Env"] == [b"lab"]
    assert [v for k, v in out.headers if k == b"Cf-Warp-Tag-Id"] == [b"extra", b"cid"]


def test_edge_sent_warp_tag_is_kept_before_ours() -> None:
    out = build_origin_request(request(extra=[(b"cf-warp-tag-id", b"edge")]), OPTS)
    assert [v for k, v in out.headers if k == b"Cf-Warp-Tag-Id"] == [b"edge", OPTS.connector_id.encode()]


def test_bad_tag_is_refused() -> None:
    with pytest.raises(StreamConversionError):
        build_origin_request(request(), OriginOptions(connector_id="c", tags=(("a b", "v"),)))


def test_websocket_request_shape_like_a11() -> None:
    req = request(end_stream=False, path="/ws", extra=[
        (b"cf-cloudflared-proxy-connection-upgrade", b"websocket"), (b"sec-websocket-key", b"k=="),
        (b"sec-websocket-version", b"8"), (b"user-agent", b"ua")])
    assert not needs_body_probe(req, OPTS, websocket=True)
    out = build_origin_request(req, OPTS, websocket=True)
    assert out.head_bytes() == (
        b"GET /ws HTTP/1.1\r\nHost: app.example.test\r\nUser-Agent: ua\r\n"
        b"Cf-Warp-Tag-Id: 11111111-2222-4333-8444-555555555555\r\nConnection: Upgrade\r\n"
        b"Sec-Websocket-Key: k==\r\nSec-Websocket-Version: 13\r\nUpgrade: websocket\r\n"
        b"Accept-Encoding: gzip\r\n\r\n")
    assert out.framing is Framing.NONE


def test_trailer_declaration_is_rewritten() -> None:
    req = request("POST", end_stream=False, extra=[(b"trailer", b"x-sum, content-length"), (b"x-a", b"1")])
    out = build_origin_request(req, OPTS)
    assert [k for k, _ in out.headers][:4] == [b"Host", b"Transfer-Encoding", b"Trailer", b"Cf-Warp-Tag-Id"]
    assert (b"Trailer", b"X-Sum") in out.headers
    enc = BodyEncoder(out.framing)
    assert enc.encode(b"ab") + enc.end([(b"x-sum", b" 9 ")]) == b"2\r\nab\r\n0\r\nX-Sum: 9\r\n\r\n"


def test_header_values_are_trimmed_like_go() -> None:
    out = build_origin_request(request(extra=[(b"x-a", b"  v  \t"), (b"user-agent", b" ua ")]), OPTS)
    assert (b"X-A", b"v") in out.headers and (b"User-Agent", b"ua") in out.headers


# --- host and target --------------------------------------------------------------------------------

@pytest.mark.parametrize(("authority", "host"), [
    ("app.example.test", b"app.example.test"),
    ("app.example:8443", b"app.example:8443"),
    ("bücher.example", b"xn--bcher-kva.example"),
    ("bücher.example:8443", b"xn--bcher-kva.example:8443"),
    ("Bücher.example", b"xn--Bcher-kva.example"),  # Go's Punycode profile does not lower-case
    ("[::1]:80", b"[::1]:80"),
    ("[fe80::1%25eth0]:80", b"[fe80::1]:80"),
    ("bad host", b""),
    ("a/b", b""),
    ("", b""),
])
def test_go_host_header(authority: str, host: bytes) -> None:
    assert go_host_header(authority) == host


@pytest.mark.parametrize(("path", "uri"), [
    ("/", "/"), ("/a?b=c d", "/a?b=c d"), ("/a%2Fb", "/a%2Fb"), ("/a;b,c:d@e$&+=", "/a;b,c:d@e$&+="),
    ("/ü", "/%C3%BC"), ("/a%20b/ü", "/a%20b/%C3%BC"), ("/!'()*[]", "/!'()*[]"), ("/a\"b", "/a%22b"),
    ("/x?", "/x?"), ("*", "*"), ("//a//b", "//a//b"),
])
def test_go_request_uri(path: str, uri: str) -> None:
    assert go_request_uri(path) == uri


@pytest.mark.parametrize("path", ["/%", "/%zz", "/a%2"])
def test_go_request_uri_bad_escapes(path: str) -> None:
    with pytest.raises(StreamConversionError):
        go_request_uri(path)


def test_connect_target_is_the_host() -> None:
    req = TunnelRequest.from_h2_headers([(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:22")], False)
    out = build_origin_request(req, OPTS)
    assert out.head_bytes().startswith(b"CONNECT 10.0.0.1:22 HTTP/1.1\r\nHost: 10.0.0.1:22\r\n")
    assert out.framing is Framing.RAW


# --- body framing: the go1.26 table ------------------------------------------------------------------

def framing_of(method: str, *, end_stream: bool, cl: bytes | None = None, opts: OriginOptions = OPTS,
               probe: bytes | None = None) -> tuple[Framing, int | None, list[tuple[bytes, bytes]]]:
    extra = [(b"content-length", cl)] if cl is not None else []
    out = build_origin_request(request(method, end_stream=end_stream, extra=extra), opts, probe=probe)
    framing_headers = [(k, v) for k, v in out.headers if k in (b"Content-Length", b"Transfer-Encoding")]
    return out.framing, out.content_length, framing_headers


CHUNKED_HDR = [(b"Transfer-Encoding", b"chunked")]


@pytest.mark.parametrize(("case", "args", "expected"), [
    ("D01", dict(method="POST", end_stream=True), (Framing.CHUNKED, None, CHUNKED_HDR)),
    ("D02", dict(method="POST", end_stream=True, cl=b"0"), (Framing.CHUNKED, None, CHUNKED_HDR)),
    ("D03", dict(method="PUT", end_stream=False, cl=b"0"), (Framing.CHUNKED, None, CHUNKED_HDR)),
    ("D04", dict(method="DELETE", end_stream=True), (Framing.NONE, None, [])),
    ("D04b", dict(method="DELETE", end_stream=False, probe=b"d"), (Framing.CHUNKED, None, CHUNKED_HDR)),
    ("probe EOF", dict(method="DELETE", end_stream=False, probe=b""), (Framing.NONE, None, [])),
    ("probe timeout", dict(method="GET", end_stream=False, probe=None), (Framing.CHUNKED, None, CHUNKED_HDR)),
    ("D05", dict(method="OPTIONS", end_stream=True), (Framing.NONE, None, [])),
    ("D06", dict(method="HEAD", end_stream=True), (Framing.NONE, None, [])),
    ("D07", dict(method="POST", end_stream=False), (Framing.CHUNKED, None, CHUNKED_HDR)),
    ("D07c", dict(method="POST", end_stream=False, cl=b"11"),
     (Framing.CONTENT_LENGTH, 11, [(b"Content-Length", b"11")])),
    ("GET with length", dict(method="GET", end_stream=False, cl=b"5"),
     (Framing.CONTENT_LENGTH, 5, [(b"Content-Length", b"5")])),
    ("PATCH empty", dict(method="PATCH", end_stream=True), (Framing.CHUNKED, None, CHUNKED_HDR)),
    ("bad length", dict(method="POST", end_stream=False, cl=b"abc"), (Framing.CHUNKED, None, CHUNKED_HDR)),
    ("END_STREAM wins", dict(method="POST", end_stream=True, cl=b"7"), (Framing.CHUNKED, None, CHUNKED_HDR)),
    ("D08", dict(method="POST", end_stream=False, cl=b"11", opts=NOCHUNK),
     (Framing.CONTENT_LENGTH, 11, [(b"Content-Length", b"11")])),
    ("D08b", dict(method="POST", end_stream=True, cl=b"0", opts=NOCHUNK), (Framing.NONE, None, [])),
    ("D08c", dict(method="POST", end_stream=True, opts=NOCHUNK), (Framing.NONE, None, [])),
    ("D08d", dict(method="GET", end_stream=True, opts=NOCHUNK), (Framing.NONE, None, [])),
    # cloudflared writes these bodies raw after an unframed head (docs/protocol.md §12.1); we buffer them
    ("D09", dict(method="POST", end_stream=False, opts=NOCHUNK), (Framing.BUFFERED, None, [])),
    ("no-chunk GET open", dict(method="GET", end_stream=False, opts=NOCHUNK), (Framing.BUFFERED, None, [])),
    ("no-chunk negative", dict(method="POST", end_stream=False, cl=b"-3", opts=NOCHUNK),
     (Framing.BUFFERED, None, [])),
])
def test_framing_table(case: str, args: dict, expected: tuple) -> None:
    assert framing_of(**args) == expected, case


def test_a_buffered_body_is_sent_with_its_length_where_go_writes_the_framing_header() -> None:
    out = build_origin_request(request("POST", end_stream=False, extra=[(b"user-agent", b"t/1")]), NOCHUNK)
    assert out.framing is Framing.BUFFERED
    framed = out.with_body_length(11)
    names = [name for name, _ in framed.headers]
    assert names[:3] == [b"Host", b"User-Agent", b"Content-Length"]
    assert (framed.framing, framed.content_length) == (Framing.CONTENT_LENGTH, 11)
    assert framed.head_bytes().replace(b"Content-Length: 11\r\n", b"") == out.head_bytes()
    no_agent = build_origin_request(request("POST", end_stream=False), NOCHUNK).with_body_length(2)
    assert [name for name, _ in no_agent.headers][:2] == [b"Host", b"Content-Length"]
    empty = out.with_body_length(0)
    assert (empty.framing, empty.content_length, empty.headers) == (Framing.NONE, None, out.headers)
    with pytest.raises(ValueError, match="BUFFERED"):
        framed.with_body_length(3)
    with pytest.raises(ValueError, match="with_body_length"):
        BodyEncoder(Framing.BUFFERED)


def test_no_chunked_with_length_but_no_body_fails_like_go() -> None:
    with pytest.raises(StreamConversionError, match="ContentLength=7"):
        framing_of("POST", end_stream=True, cl=b"7", opts=NOCHUNK)


@pytest.mark.parametrize(("method", "end_stream", "cl", "opts", "probe"), [
    ("GET", False, None, OPTS, True), ("HEAD", False, None, OPTS, True), ("DELETE", False, b"0", OPTS, True),
    ("OPTIONS", False, None, OPTS, True), ("PROPFIND", False, None, OPTS, True),
    ("SEARCH", False, None, OPTS, True), ("GET", True, None, OPTS, False),
    ("GET", False, b"3", OPTS, False), ("POST", False, None, OPTS, False),
    ("GET", False, None, NOCHUNK, False), ("PUT", False, None, OPTS, False),
])
def test_needs_body_probe(method: str, end_stream: bool, cl: bytes | None, opts: OriginOptions,
                          probe: bool) -> None:
    extra = [(b"content-length", cl)] if cl is not None else []
    assert needs_body_probe(request(method, end_stream=end_stream, extra=extra), opts) is probe


def test_body_encoder() -> None:
    enc = BodyEncoder(Framing.CHUNKED)
    assert enc.encode(b"") == b""
    assert enc.encode(b"x" * 23) == b"17\r\n" + b"x" * 23 + b"\r\n"
    assert enc.end() == b"0\r\n\r\n"
    assert enc.end() == b""
    with pytest.raises(StreamConversionError):
        enc.encode(b"late")
    raw = BodyEncoder(Framing.RAW)
    assert raw.encode(b"abc") == b"abc" and raw.end() == b""
    with pytest.raises(StreamConversionError):
        BodyEncoder(Framing.NONE).encode(b"x")
    cl = BodyEncoder(Framing.CONTENT_LENGTH, 3)
    assert cl.encode(b"ab") == b"ab"
    with pytest.raises(StreamConversionError, match="ContentLength=3 with Body length 2"):
        cl.end()
    over = BodyEncoder(Framing.CONTENT_LENGTH, 1)
    with pytest.raises(StreamConversionError):
        over.encode(b"ab")


def test_body_encoder_overflow_check_counts_every_chunk() -> None:
    """Go's length check: the bytes so far may reach Content-Length exactly, never pass it, over any
    number of chunks; the error says both numbers."""
    enc = BodyEncoder(Framing.CONTENT_LENGTH, 3)
    assert enc.encode(b"ab") == b"ab" and enc.encode(b"c") == b"c" and enc.sent == 3
    with pytest.raises(StreamConversionError, match=r"^http: ContentLength=3 with Body length 4$"):
        enc.encode(b"d")
    exact = BodyEncoder(Framing.CONTENT_LENGTH, 3)
    assert exact.encode(b"abc") == b"abc" and exact.end() == b""
    with pytest.raises(StreamConversionError, match=r"^http: ContentLength=1 with Body length 2$"):
        BodyEncoder(Framing.CONTENT_LENGTH, 1).encode(b"ab")
    no_body = r"^2 request body bytes, but the origin request has no body$"
    with pytest.raises(StreamConversionError, match=no_body):
        BodyEncoder(Framing.NONE).encode(b"xy")
    ended = BodyEncoder(Framing.RAW)
    ended.end()
    with pytest.raises(StreamConversionError, match=r"^request body data after its end$"):
        ended.encode(b"x")


# --- the response ------------------------------------------------------------------------------------

def decoded(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return deserialize_response_headers(dict(fields)[b"cf-cloudflared-response-headers"])


def test_tunnel_response_headers_shape() -> None:
    fields = tunnel_response_headers(200, [(b"content-type", b"text/plain"), (b"Content-Length", b"5"),
                                           (b"x-multi", b"a"), (b"X-MULTI", b"b"), (b"cf-int-x", b"1")])
    assert fields[0] == (b":status", b"200")
    assert fields[2] == (b"cf-cloudflared-response-meta", b'{"src":"origin"}')
    assert fields[-1] == (b"content-length", b"5")
    assert decoded(fields) == [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5"),
                               (b"X-Multi", b"a"), (b"X-Multi", b"b")]


def test_tunnel_response_101_and_websocket_headers() -> None:
    fields = tunnel_response_headers(101, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                                           (b"Sec-WebSocket-Accept", b"abc=")])
    assert fields[0] == (b":status", b"200")
    assert decoded(fields) == [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                               (b"Sec-Websocket-Accept", b"abc=")]
    assert not any(k == b"content-length" for k, _ in fields)


def test_chunked_response_drops_framing_fields() -> None:
    fields = tunnel_response_headers(200, [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"9"),
                                           (b"Trailer", b"X-T"), (b"Content-Type", b"text/event-stream")])
    assert decoded(fields) == [(b"Content-Type", b"text/event-stream")]
    assert not any(k == b"content-length" for k, _ in fields)


def test_head_response_keeps_content_length() -> None:
    fields = tunnel_response_headers(200, [(b"Content-Length", b"154")], head=True)
    assert (b"content-length", b"154") in fields


def test_duplicate_content_length() -> None:
    fields = tunnel_response_headers(200, [(b"Content-Length", b"3"), (b"Content-Length", b"3")])
    assert decoded(fields) == [(b"Content-Length", b"3")]
    with pytest.raises(OriginError):
        tunnel_response_headers(200, [(b"Content-Length", b"3"), (b"Content-Length", b"4")])
    with pytest.raises(OriginError):
        tunnel_response_headers(200, [(b"Content-Length", b"x")])
    with pytest.raises(OriginError):
        tunnel_response_headers(200, [(b"Transfer-Encoding", b"gzip")])
    with pytest.raises(OriginError):
        tunnel_response_headers(42, [])


def test_tracing_header_goes_outside() -> None:
    fields = tunnel_response_headers(200, [(b"Cf-Int-Cloudflared-Tracing", b"abc")])
    assert (b"cf-int-cloudflared-tracing", b"abc") in fields
    assert decoded(fields) == []


def test_error_response_headers() -> None:
    assert error_response_headers() == [(b":status", b"502"),
                                        (b"cf-cloudflared-response-meta", b'{"src":"cloudflared"}'),
                                        (b"content-length", b"0")]
    assert error_response_headers(META_FLOW_LIMITED)[1][1] == META_FLOW_LIMITED


def test_tunnel_trailers() -> None:
    out = tunnel_trailers([(b"X-Trailer-One", b"t1"), (b"content-length", b"1"), (b"A", b"1"), (b"A", b"0"),
                           (b"bad name", b"x"), (b"X-Ctl", b"a\x01")])
    assert out == [(b"a", b"1"), (b"a", b"0"), (b"x-trailer-one", b"t1")]


# --- gzip ---------------------------------------------------------------------------------------------

def test_should_gunzip() -> None:
    gz = [(b"Content-Encoding", b"gzip"), (b"Content-Length", b"64")]
    assert should_gunzip(True, 200, gz)
    assert should_gunzip(True, 200, [(b"content-encoding", b"GZIP")])
    assert not should_gunzip(False, 200, gz)
    assert not should_gunzip(True, 200, gz, head=True)
    assert not should_gunzip(True, 204, gz)
    assert not should_gunzip(True, 200, [(b"Content-Encoding", b"gzip"), (b"Content-Length", b"0")])
    assert not should_gunzip(True, 200, [(b"Content-Encoding", b"br")])
    assert strip_gzip_headers([(b"Content-Type", b"t"), *gz]) == [(b"Content-Type", b"t")]


def test_gunzipper_streams_and_handles_members() -> None:
    data = gzip.compress(b"hello ") + gzip.compress(b"world")
    gun = Gunzipper()
    out = b"".join(gun.feed(data[i:i + 3]) for i in range(0, len(data), 3)) + gun.finish()
    assert out == b"hello world"
    assert Gunzipper().finish() == b""


def test_gunzipper_errors() -> None:
    gun = Gunzipper()
    gun.feed(gzip.compress(b"abc")[:-3])
    with pytest.raises(OriginError, match="ended early"):
        gun.finish()
    with pytest.raises(OriginError, match="corrupt"):
        Gunzipper().feed(b"not gzip at all")
    with pytest.raises(OriginError):
        Gunzipper().feed(gzip.compress(b"a") + b"\x00\x00\x00\x00")

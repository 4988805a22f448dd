"""wire.origin details pinned by mutation testing (docs/mutation-report.md): Go's numeric bounds, framing
at 0 and 1 byte, exact error messages, trailer order, gzip decisions at their edges."""

from __future__ import annotations

import gzip
import re
import zlib

import pytest

from tests.unit.test_origin import NOCHUNK, OPTS, request
from tunnel_lab.wire.errors import OriginError, StreamConversionError
from tunnel_lab.wire.origin import (
    BodyEncoder,
    Framing,
    Gunzipper,
    OriginOptions,
    OriginRequest,
    TunnelRequest,
    build_origin_request,
    go_host_header,
    go_request_uri,
    needs_body_probe,
    should_gunzip,
    tunnel_response_headers,
)

MAX_I64 = 2**63 - 1


def framing_of(out: OriginRequest) -> tuple[Framing, list[tuple[bytes, bytes]]]:
    return out.framing, [(k, v) for k, v in out.headers if k in (b"Content-Length", b"Transfer-Encoding")]


def test_h2_content_length_bounds() -> None:
    assert request(end_stream=False).h2_content_length() == -1  # unknown
    at_max = request(end_stream=False, extra=[(b"content-length", str(MAX_I64).encode())])
    assert at_max.h2_content_length() == MAX_I64
    too_big = request(end_stream=False, extra=[(b"content-length", str(2**63).encode())])
    assert too_big.h2_content_length() == 0  # unparsable for Go: treated as 0


def test_no_chunked_encoding_takes_content_length_within_int64() -> None:
    for value, expect in ((str(MAX_I64), MAX_I64), (str(2**63), None), ("-9223372036854775808", None),
                          ("+5", 5), ("+200", 200)):
        req = request("POST", end_stream=False, extra=[(b"content-length", value.encode())])
        out = build_origin_request(req, NOCHUNK)
        if expect is None:
            assert out.framing is not Framing.CONTENT_LENGTH or out.content_length != 2**63, value
        else:
            assert framing_of(out) == (Framing.CONTENT_LENGTH, [(b"Content-Length", str(expect).encode())])
    # -2^63 parses (Go's int64 minimum) and, being negative, means "unknown": no length sent (our connector
    # then reads the body first to learn it: docs/protocol.md §12.1)
    low = build_origin_request(request("POST", end_stream=False,
                                       extra=[(b"content-length", b"-9223372036854775808")]), NOCHUNK)
    lower = build_origin_request(request("POST", end_stream=False,
                                         extra=[(b"content-length", b"-9223372036854775809")]), NOCHUNK)
    assert low.framing is Framing.BUFFERED and lower.framing is Framing.BUFFERED


def test_probe_only_without_a_usable_length() -> None:
    assert needs_body_probe(request(end_stream=False, extra=[(b"content-length", b"0")]), OPTS)
    assert not needs_body_probe(request(end_stream=False, extra=[(b"content-length", b"1")]), OPTS)


def test_framing_at_zero_and_one_byte() -> None:
    one = build_origin_request(request("GET", end_stream=False, extra=[(b"content-length", b"1")]), OPTS)
    assert framing_of(one) == (Framing.CONTENT_LENGTH, [(b"Content-Length", b"1")])
    # a nil body (a WebSocket) still gets "Content-Length: 0" for the methods that usually have a body
    for method in ("POST", "PUT", "PATCH"):
        empty = build_origin_request(request(method, end_stream=True), OPTS, websocket=True)
        assert framing_of(empty) == (Framing.CONTENT_LENGTH, [(b"Content-Length", b"0")]), method
    for method in ("GET", "DELETE"):
        assert framing_of(build_origin_request(request(method), OPTS, websocket=True)) == (Framing.NONE, [])
    ended = r"^http: ContentLength=1 with Body length 0 \(the stream ended on its HEADERS\)$"
    with pytest.raises(StreamConversionError, match=ended):
        # only --no-chunked-encoding takes the length from the header when the stream already ended
        build_origin_request(request("POST", end_stream=True, extra=[(b"content-length", b"1")]), NOCHUNK)


def test_build_refusals_say_what() -> None:
    bad_method = request()
    object.__setattr__(bad_method, "method", "GE T")
    with pytest.raises(StreamConversionError, match=r"^invalid method 'GE T'$"):
        build_origin_request(bad_method, OPTS)
    tagged = OriginOptions(connector_id="c", tags=(("a b", "1"),))
    with pytest.raises(StreamConversionError, match=r"^tag 'a b'='1' makes an invalid header$"):
        build_origin_request(request(), tagged)


def test_odd_bytes_survive_in_target_tags_and_forwarded_host() -> None:
    req = request(path="/%E9", authority="a.test")
    object.__setattr__(req, "authority", "\udce9.test")
    object.__setattr__(req, "path", "/\udce9")
    out = build_origin_request(req, OriginOptions(connector_id="c", http_host_header="h.test",
                                                  tags=(("n", "v\udce9"),)))
    assert out.head_bytes().startswith(b"GET /%E9 HTTP/1.1\r\n")
    headers = dict(out.headers)
    assert headers[b"X-Forwarded-Host"] == b"\xe9.test"
    raw_query = request(path="/?q")
    object.__setattr__(raw_query, "path", "/?\udce9")  # the query goes out verbatim, raw byte included
    assert build_origin_request(raw_query, OPTS).head_bytes().startswith(b"GET /?\xe9 HTTP/1.1\r\n")
    assert headers[b"Cf-Warp-Tag-N"] == b"v\xe9"
    # an undecodable byte in a tag's name makes it no token: refused as such, not a UnicodeError
    with pytest.raises(StreamConversionError, match="makes an invalid header"):
        build_origin_request(request(), OriginOptions(connector_id="c", tags=(("n\udce9", "v"),)))


def test_declared_trailers_skip_framing_names() -> None:
    out = build_origin_request(
        request("POST", end_stream=False,
                extra=[(b"trailer", b" transfer-encoding ,trailer,\tcontent-length, x-b ,X-A\t"),
                       (b"te", b"trailers")]),
        OPTS)
    assert out.trailer_names == (b"X-A", b"X-B")
    assert (b"Trailer", b"X-A,X-B") in out.headers


def test_request_trailers_sorted_by_name_repeats_in_order() -> None:
    enc = BodyEncoder(Framing.CHUNKED)
    assert enc.end([(b"x-b", b"2"), (b"x-a", b"1"), (b"X-B", b"1")]) == (
        b"0\r\nX-A: 1\r\nX-B: 2\r\nX-B: 1\r\n\r\n")
    # Go's Header.write: CR and LF inside a value become spaces, then the value is trimmed
    assert BodyEncoder(Framing.CHUNKED).end([(b"x-a", b" a\rb\nc\t")]) == b"0\r\nX-A: a b c\r\n\r\n"


def test_origin_request_records_the_host_it_wrote() -> None:
    out = build_origin_request(request(authority="app.example.test"), OPTS)
    assert out.host == b"app.example.test" == dict(out.headers)[b"Host"]


def test_from_h2_headers_refusals_say_what() -> None:
    base = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]
    cases = [
        ([*base, (b":protocol", b"x")], r"^unknown request pseudo-header b':protocol'$"),
        ([*base, (b":path", b"/x")], r"^pseudo-header b':path' repeated$"),
        ([*base, (b"X-A", b"1")], r"^invalid request header name b'X-A'$"),
        ([base[0], (b"x-a", b"1"), *base[1:]], r"^pseudo-header b':scheme' after a regular header$"),
    ]
    long_path = b"/" + b"a" * 100
    more = [
        ([*base, (b"x-a", b"a\x00")], r"^invalid value for request header 'x-a'$"),
        ([(b":scheme", b"https"), (b":path", b"/")], r"^request without :method$"),
        ([(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")],
         r"^CONNECT request needs :authority and no :path or :scheme$"),
        ([(b":method", b"GET"), (b":scheme", b"ftp"), (b":path", b"/")],
         r"^request :scheme b'ftp' is not http or https$"),
        ([(b":method", b"GET"), (b":scheme", b"https")], r"^request without :path$"),
        ([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"a" + long_path)],
         "^" + re.escape(f"request :path {(b'a' + long_path)[:80]!r} is not origin-form") + "$"),
        ([(b":method", b"GET"), (b":scheme", b"https"), (b":path", long_path + b"\x7f")],
         "^" + re.escape(f"request :path {long_path[:80]!r} holds a control byte or space") + "$"),
    ]
    for fields, message in cases + more:
        with pytest.raises(StreamConversionError, match=message):
            TunnelRequest.from_h2_headers(fields, True)


def test_from_h2_headers_keeps_odd_bytes_and_falls_back_to_host() -> None:
    odd = TunnelRequest.from_h2_headers(
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"\xff.test"), (b":path", b"/\xfe")],
        True)
    assert (odd.authority, odd.path) == ("\udcff.test", "/\udcfe")
    star = TunnelRequest.from_h2_headers([(b":method", b"OPTIONS"), (b":scheme", b"https"), (b":path", b"*")],
                                         True)
    assert star.path == "*" and star.authority == ""
    hosted = TunnelRequest.from_h2_headers(
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"host", b"h.test")], True)
    assert hosted.authority == "h.test"


def test_go_host_header_punycode_and_ports() -> None:
    # Characterisation of PunycodeHostPort as implemented (non-ASCII hosts only reach the split).
    cases = {
        "bücher.test:8080": b"xn--bcher-kva.test:8080",
        "bücher.test": b"xn--bcher-kva.test",
        "[ü::1]:80": b"[xn--::1-goa]:80",
        "ü:1:2": b"xn--:1:2-zra",
        "[ü]x:80": b"xn--[]x:80-3ya",
        "ü]:80": b"xn--]:80-zra",
        "[ü:80": b"xn--[:80-0ra",
        "ü[x]:80": b"xn--[x]:80-2ya",
        "\udcff.test": b"xn--zn7c.test",  # an undecodable byte becomes U+FFFD, then punycode
        ":80ü": b"",
        "ü:": b"xn--tda",
        "[a]:1%]": b"[a]:1]",  # a zone is cut from the last "%" before the last "]"
        "[ü:]:%": b"[xn--:-dha]:%",
        "[%[": b"[%[",
        "[%%]": b"[%]",
        "[": b"[",
        "[ü]]:": b"xn--[]]:-0ra",  # SplitHostPort fails: the whole value is one name
        "[[ü]:": b"xn--[[]:-1ra",
        "]ü:": b"xn--]:-xka",
        "ü[:": b"xn--[:-wka",
    }
    assert {host: go_host_header(host) for host in cases} == cases


def test_response_refusals_say_what() -> None:
    unsupported = r"^origin response has unsupported transfer encoding b'gzip, chunked'$"
    with pytest.raises(OriginError, match=unsupported):
        tunnel_response_headers(200, [(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")])
    multiple = r"^origin response has multiple Content-Length headers \[b'1', b'2'\]$"
    with pytest.raises(OriginError, match=multiple):
        tunnel_response_headers(200, [(b"Content-Length", b"1"), (b"Content-Length", b"2")])
    bad = b"x" * 50
    with pytest.raises(OriginError) as exc:
        tunnel_response_headers(200, [(b"Content-Length", bad)])
    assert str(exc.value) == f"origin response has a bad Content-Length {bad[:40]!r}"
    assert tunnel_response_headers(200, [(b"Content-Length", bad)], head=True)  # HEAD: not checked
    assert tunnel_response_headers(999, [])[0] == (b":status", b"999")
    with pytest.raises(OriginError, match=r"^origin response status 1000 is out of range$"):
        tunnel_response_headers(1000, [])


def test_should_gunzip_edges() -> None:
    gz = [(b"Content-Encoding", b"gzip")]
    assert not should_gunzip(True, 100, gz) and not should_gunzip(True, 304, gz)
    assert should_gunzip(True, 305, gz) and should_gunzip(True, 200, gz)
    assert not should_gunzip(True, 200, [(b"Content-Encoding", b"gzipX")])
    assert not should_gunzip(True, 200, [(b"Content-Encoding", b"gzip\x0b")])
    assert should_gunzip(True, 200, [*gz, (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"0")])
    assert not should_gunzip(True, 200, [*gz, (b"Content-Length", b"0")])
    assert should_gunzip(True, 200, [*gz, (b"Content-Length", b"0X")])


def test_gunzipper_takes_gzip_only() -> None:
    assert Gunzipper().feed(gzip.compress(b"hi")) == b"hi"
    with pytest.raises(OriginError, match="corrupt"):
        Gunzipper().feed(zlib.compress(b"hi"))  # zlib framing is not gzip
    two = Gunzipper()
    assert two.feed(gzip.compress(b"a") + gzip.compress(b"b")) == b"ab"
    with pytest.raises(OriginError, match="corrupt"):
        Gunzipper().feed(gzip.compress(b"a") + zlib.compress(b"b"))  # nor after a first gzip member
    assert two.finish() == b""
    cut = Gunzipper()
    cut.feed(gzip.compress(b"abc")[:5])
    early = r"^gzip response body from the origin ended early \(unexpected EOF\)$"
    with pytest.raises(OriginError, match=early):
        cut.finish()


def test_go_request_uri_escapes() -> None:
    assert go_request_uri("/a%41b/c") == "/a%41b/c"  # validly encoded: kept as sent
    assert go_request_uri("/é?q=é") == "/%C3%A9?q=é"  # the path re-escaped, the query verbatim
    assert go_request_uri("/a b%20c") == "/a%20b%20c"
    assert go_request_uri("*") == "*"
    bad = "/" + "a" * 90 + "%zz"
    with pytest.raises(StreamConversionError) as exc:
        go_request_uri(bad)
    assert str(exc.value) == f"request path {bad.encode()[:80]!r} has a bad % escape"

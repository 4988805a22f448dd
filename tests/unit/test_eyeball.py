"""wire.eyeball: eyeball request -> tunnel stream fields, tunnel response -> eyeball response."""

from __future__ import annotations

import re

import h11
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tunnel_lab.wire.errors import HeaderSerializationError, StreamConversionError, TunnelLabError
from tunnel_lab.wire.eyeball import (
    EyeballRequest,
    TunnelResponse,
    eyeball_response_headers,
    is_websocket_request,
    new_ray_id,
    request_head_error,
    tunnel_request_headers,
    tunnel_response,
)
from tunnel_lab.wire.headers import (
    StreamType,
    classify_stream,
    is_token,
    is_valid_value,
    serialize_response_headers,
)
from tunnel_lab.wire.origin import (
    OriginOptions,
    TunnelRequest,
    build_origin_request,
    forbidden_request_header,
    tunnel_response_headers,
)

RAY = "8f3a00112233c1d4-LAB1"


def eyeball(
    headers: list[tuple[bytes, bytes]],
    *,
    method: str = "GET",
    target: str = "/x?y=1",
    scheme: str = "https",
    host: str = "app.test",
) -> EyeballRequest:
    return EyeballRequest(
        method=method,
        target=target,
        headers=tuple(headers),
        scheme=scheme,
        client_ip="203.0.113.9",
        host=host,
    )


# --- request ---------------------------------------------------------------------------------------


def test_tunnel_request_headers_example() -> None:
    req = eyeball(
        [
            (b"Host", b"app.test"),
            (b"User-Agent", b"curl/8"),
            (b"Connection", b"keep-alive, X-Drop"),
            (b"X-Drop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Forwarded-For", b"10.0.0.1"),
            (b"Cf-Connecting-Ip", b"6.6.6.6"),
            (b"TE", b"trailers"),
            (b"Accept", b"*/*"),
        ]
    )
    assert tunnel_request_headers(req, ray=RAY) == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"app.test"),
        (b":path", b"/x?y=1"),
        (b"user-agent", b"curl/8"),
        (b"te", b"trailers"),
        (b"accept", b"*/*"),
        (b"cf-ray", RAY.encode()),
        (b"cf-connecting-ip", b"203.0.113.9"),
        (b"x-forwarded-for", b"10.0.0.1, 203.0.113.9"),
        (b"x-forwarded-proto", b"https"),
        (b"cf-visitor", b'{"scheme":"https"}'),
        (b"cdn-loop", b"cloudflare"),
    ]


def test_websocket_request_is_signalled_only_by_the_internal_header() -> None:
    headers = [
        (b"Host", b"app.test"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    assert is_websocket_request(headers)
    out = tunnel_request_headers(eyeball(headers), ray=RAY, websocket=True)
    names = [k for k, _ in out]
    assert b"upgrade" not in names and b"connection" not in names
    assert (b"cf-cloudflared-proxy-connection-upgrade", b"websocket") in out
    assert (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==") in out
    assert classify_stream(out) is StreamType.WEBSOCKET


@pytest.mark.parametrize(
    ("headers", "ws"),
    [
        ([(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], True),
        ([(b"upgrade", b"WebSocket"), (b"connection", b"keep-alive, Upgrade")], True),
        ([(b"Upgrade", b"h2c"), (b"Connection", b"Upgrade")], False),
        ([(b"Upgrade", b"websocket")], False),
        ([(b"Connection", b"upgrade")], False),
    ],
)
def test_is_websocket_request(headers: list[tuple[bytes, bytes]], ws: bool) -> None:
    assert is_websocket_request(headers) is ws


def test_internal_headers_cannot_be_injected() -> None:
    req = eyeball(
        [
            (b"cf-cloudflared-proxy-connection-upgrade", b"control-stream"),
            (b"Cf-Cloudflared-Proxy-Src", b"tcp://1.2.3.4:5"),
            (b"cf-int-x", b"1"),
            (b"CF-Ray", b"fake"),
        ]
    )
    out = tunnel_request_headers(req, ray=RAY)
    assert classify_stream(out) is StreamType.HTTP
    assert [v for k, v in out if k == b"cf-ray"] == [RAY.encode()]
    assert not any(k.startswith((b"cf-cloudflared-", b"cf-int-")) for k, _ in out)


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/a", "/a"),
        ("*", "*"),
        ("http://h.test/p?q=1", "/p?q=1"),
        ("https://h.test", "/"),
        ("http://h?x", "/?x"),
    ],
)
def test_targets_become_origin_form(target: str, path: str) -> None:
    out = tunnel_request_headers(eyeball([], target=target), ray=RAY)
    assert dict(out)[b":path"] == path.encode()


def test_unconvertible_target() -> None:
    with pytest.raises(StreamConversionError):
        tunnel_request_headers(eyeball([], target="h.test:443"), ray=RAY)


def test_existing_cdn_loop_and_extra() -> None:
    out = tunnel_request_headers(
        eyeball([(b"CDN-Loop", b"other")], scheme="http"), ray=RAY, extra=[(b"X-Lab", b"1")]
    )
    assert dict(out)[b"cdn-loop"] == b"other, cloudflare"
    assert dict(out)[b"cf-visitor"] == b'{"scheme":"http"}'
    assert out[-1] == (b"x-lab", b"1")


def test_te_other_than_trailers_is_dropped() -> None:
    for value in (b"gzip", b"trailers, deflate"):
        out = tunnel_request_headers(eyeball([(b"TE", value)]), ray=RAY)
        assert not any(k == b"te" for k, _ in out)
        assert forbidden_request_header(out) is None


def test_new_ray_id() -> None:
    assert new_ray_id("LAB1", bytes(range(8))) == "0001020304050607-LAB1"
    with pytest.raises(ValueError):
        new_ray_id("LAB", b"123")


@given(
    st.binary(min_size=8, max_size=16),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=6),
)
def test_ray_ids_have_the_documented_shape(rand: bytes, location: str) -> None:
    assert re.fullmatch(r"[0-9a-f]{16}-[A-Z0-9]+", new_ray_id(location, rand))


# --- request properties ------------------------------------------------------------------------------

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
hop_names = st.sampled_from(
    [
        "Connection",
        "connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Transfer-Encoding",
        "Upgrade",
        "TE",
        "te",
        "Trailer",
        "Host",
        "X-Forwarded-For",
        "Cookie",
        "cf-cloudflared-proxy-src",
        "Cf-Cloudflared-Proxy-Connection-Upgrade",
        "X-A",
        "x-b",
    ]
)
eyeball_names = st.one_of(hop_names, st.text(TOKEN, min_size=1, max_size=10))
eyeball_values = st.one_of(
    st.sampled_from(
        [
            "trailers",
            "close",
            "keep-alive",
            "Upgrade",
            "websocket",
            "X-A, x-b",
            "chunked",
            "control-stream",
            "update-configuration",
            "tcp://1.2.3.4:5",
            "",
        ]
    ),
    st.text("".join(chr(c) for c in range(0x20, 0x7F)), max_size=16),
)
eyeball_headers = st.lists(st.tuples(eyeball_names, eyeball_values), max_size=10).map(
    lambda pairs: [(k.encode(), v.encode()) for k, v in pairs]
)
CONNECTION_SPECIFIC = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}


@given(eyeball_headers, st.booleans(), st.sampled_from(["http", "https"]))
def test_the_edge_never_emits_a_connection_specific_field(
    headers: list[tuple[bytes, bytes]], websocket: bool, scheme: str
) -> None:
    out = tunnel_request_headers(eyeball(headers, scheme=scheme), ray=RAY, websocket=websocket)
    names = [k for k, _ in out]
    assert forbidden_request_header(out) is None  # Go's HTTP/2 server would answer 400 otherwise
    assert not set(names) & CONNECTION_SPECIFIC
    assert all(v == b"trailers" for k, v in out if k == b"te") and names.count(b"te") <= 1
    assert all(k == k.lower() for k in names)
    assert names[:4] == [b":method", b":scheme", b":authority", b":path"]
    assert not any(k.startswith(b":") for k in names[4:])
    named = {t.strip().lower() for k, v in headers if k.lower() == b"connection" for t in v.split(b",")}
    assert not (
        set(names[4:])
        & named
        - {
            b"cf-ray",
            b"cf-connecting-ip",
            b"x-forwarded-for",
            b"x-forwarded-proto",
            b"cf-visitor",
            b"cdn-loop",
        }
    )
    # The connector side accepts it, and the eyeball cannot change the stream's type.
    req = TunnelRequest.from_h2_headers(out, end_stream=True)
    assert classify_stream(out) is (StreamType.WEBSOCKET if websocket else StreamType.HTTP)
    assert req.authority == "app.test"
    assert dict(out)[b"x-forwarded-for"].endswith(b"203.0.113.9")
    assert [v for k, v in out if k == b"cf-ray"] == [RAY.encode()]


@given(eyeball_headers)
def test_eyeball_request_reaches_the_origin_as_valid_http1(headers: list[tuple[bytes, bytes]]) -> None:
    """Edge -> connector -> origin, all sans-I/O: h11 parses what the origin gets."""
    fields = tunnel_request_headers(eyeball(headers), ray=RAY)
    req = TunnelRequest.from_h2_headers(fields, end_stream=True)
    out = build_origin_request(req, OriginOptions(connector_id="c"))
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(out.head_bytes())
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    got = {k: v for k, v in event.headers}
    assert got[b"host"] == b"app.test" and got[b"cf-ray"] == RAY.encode()
    assert got[b"connection"] == b"keep-alive"
    assert isinstance(conn.next_event(), h11.EndOfMessage)


# --- response ---------------------------------------------------------------------------------------


def test_tunnel_response_origin() -> None:
    fields = tunnel_response_headers(
        200,
        [(b"Content-Type", b"application/json"), (b"Content-Length", b"2"), (b"Connection", b"keep-alive")],
    )
    fields += [(b"content-type", b"text/plain; charset=utf-8"), (b"date", b"x")]
    resp = tunnel_response(fields, request_was_websocket=False)
    assert (resp.status, resp.src, resp.content_length, resp.websocket_upgrade) == (200, "origin", 2, False)
    assert eyeball_response_headers(resp) == [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"2"),
    ]


def test_tunnel_response_upgrade() -> None:
    fields = tunnel_response_headers(
        101,
        [
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ],
    )
    resp = tunnel_response(fields, request_was_websocket=True)
    assert resp.websocket_upgrade and resp.eyeball_status == 101 and resp.status == 200
    assert [k for k, _ in eyeball_response_headers(resp)] == [
        b"Upgrade",
        b"Connection",
        b"Sec-Websocket-Accept",
    ]
    # The same answer to a plain request is no upgrade.
    assert not tunnel_response(fields, request_was_websocket=False).websocket_upgrade


def test_websocket_refused_by_the_origin_is_an_ordinary_response() -> None:
    fields = tunnel_response_headers(403, [(b"Content-Length", b"0"), (b"Connection", b"close")])
    resp = tunnel_response(fields, request_was_websocket=True)
    assert not resp.websocket_upgrade and resp.eyeball_status == 403
    assert eyeball_response_headers(resp) == [(b"Content-Length", b"0")]


def test_cloudflared_error_and_flow_limit() -> None:
    resp = tunnel_response(
        [
            (b":status", b"502"),
            (b"cf-cloudflared-response-meta", b'{"src":"cloudflared","flow_rate_limited":true}'),
            (b"content-length", b"0"),
        ],
        request_was_websocket=False,
    )
    assert (resp.src, resp.flow_rate_limited, resp.headers, resp.content_length) == (
        "cloudflared",
        True,
        [],
        0,
    )


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ([], StreamConversionError, r":status None is not a 3-digit status"),
        ([(b":status", b"20")], StreamConversionError, r":status b'20' is not a 3-digit status"),
        ([(b":status", b"abc")], StreamConversionError, r":status b'abc' is not a 3-digit status"),
        (
            [(b":status", b"200"), (b"cf-cloudflared-response-meta", b"{")],
            HeaderSerializationError,
            r"cf-cloudflared-response-meta b'\{' is not JSON",
        ),
        (
            [(b":status", b"200"), (b"cf-cloudflared-response-meta", b'{"src":1}')],
            StreamConversionError,
            r"cf-cloudflared-response-meta src 1 is not a string",
        ),
        (
            [(b":status", b"200"), (b"cf-cloudflared-response-headers", b"QQ")],
            HeaderSerializationError,
            r"pair 0 b'QQ' does not have the form name:value",
        ),
    ],
)
def test_malformed_tunnel_responses(
    fields: list[tuple[bytes, bytes]], error: type[TunnelLabError], match: str
) -> None:
    with pytest.raises(error, match=match):
        tunnel_response(fields, request_was_websocket=False)


# Well-formed tunnel responses whose origin headers hold any bytes: what reaches the eyeball must
# still be a valid HTTP/1.1 field (token name, no CR/LF/NUL in the value).
any_origin_headers = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from([b"Connection", b"Upgrade", b"Trailer", b"Sec-WebSocket-Accept", b"X-A"]),
            st.text(TOKEN, min_size=1, max_size=8).map(str.encode),
            st.binary(max_size=8),
        ),
        st.one_of(
            st.sampled_from([b"x-a", b"close", b"websocket", b"a\r\nb", b"\x00"]),
            st.text("".join(chr(c) for c in range(0x20, 0x7F)), max_size=10).map(str.encode),
            st.binary(max_size=12),
        ),
    ),
    min_size=1,
    max_size=8,
)
metas = st.one_of(
    st.none(),
    st.sampled_from([b'{"src":"origin"}', b'{"src":"cloudflared"}', b'{"flow_rate_limited":true}']),
)


def _tunnel_fields(status: int, meta: bytes | None, headers: list[tuple[bytes, bytes]], raw: bool
                   ) -> list[tuple[bytes, bytes]]:
    """The response HEADERS: the origin's fields serialized, or (Go's own answer, no meta) plain fields."""
    fields = [(b":status", str(status).encode())]
    if raw and meta is None:
        return fields + [(k, v) for k, v in headers if k]
    if meta is not None:
        fields.append((b"cf-cloudflared-response-meta", meta))
    return [*fields, (b"cf-cloudflared-response-headers", serialize_response_headers(headers))]


valid_tunnel_responses = st.builds(_tunnel_fields, st.integers(100, 999), metas, any_origin_headers,
                                   st.booleans())


@given(valid_tunnel_responses, st.booleans())
def test_well_formed_tunnel_responses_give_valid_eyeball_fields(
    fields: list[tuple[bytes, bytes]], websocket: bool
) -> None:
    resp = tunnel_response(fields, request_was_websocket=websocket)  # well-formed: never raises
    assert resp.status == int(fields[0][1])
    out = eyeball_response_headers(resp)
    event(f"eyeball fields: {min(len(out), 3)}+" if out else "eyeball fields: none")
    for name, value in out:
        assert is_token(name) and is_valid_value(value)
        assert b"\r" not in value and b"\n" not in value
    kept = {k.lower() for k, _ in out}
    if not resp.websocket_upgrade:
        assert not kept & {b"connection", b"upgrade", b"trailer", b"transfer-encoding", b"te"}
        named = {t.strip(b" \t").lower() for k, v in resp.headers if k.lower() == b"connection"
                 and is_valid_value(v) for t in v.split(b",")}
        assert not kept & named


def test_eyeball_response_drops_trailer_and_the_fields_connection_names() -> None:
    """`Trailer` is hop-by-hop, and so is every field that `Connection` lists."""
    origin = [(b"Trailer", b"X-Sum"), (b"Connection", b"x-private, close"), (b"X-Private", b"1"),
              (b"X-Kept", b"2")]
    resp = tunnel_response(
        [(b":status", b"200"), (b"cf-cloudflared-response-meta", b'{"src":"origin"}'),
         (b"cf-cloudflared-response-headers", serialize_response_headers(origin))],
        request_was_websocket=False,
    )
    assert resp.headers == origin
    assert eyeball_response_headers(resp) == [(b"X-Kept", b"2")]


response_names = st.one_of(
    st.sampled_from(
        [b":status", b"cf-cloudflared-response-meta", b"cf-cloudflared-response-headers", b"content-length"]
    ),
    st.binary(max_size=10),
)
response_values = st.one_of(
    st.sampled_from([b"200", b"101", b'{"src":"origin"}', b"QQ:Yg", b"5", b"{}"]), st.binary(max_size=20)
)


@given(st.lists(st.tuples(response_names, response_values), max_size=8), st.booleans())
def test_tunnel_response_arbitrary_fields_raise_only_project_errors(
    fields: list[tuple[bytes, bytes]], websocket: bool
) -> None:
    try:
        resp = tunnel_response(fields, request_was_websocket=websocket)
    except (StreamConversionError, HeaderSerializationError) as exc:
        event(f"rejected: {type(exc).__name__}")
        return
    event("accepted")
    assert 0 <= resp.status <= 999
    for name, value in eyeball_response_headers(resp):
        assert name and b"\r" not in value and b"\n" not in value


def test_the_well_formed_property_reaches_its_assertions() -> None:
    """Counting check: the property above is not vacuous (every example decodes; most give fields)."""
    seen: list[int] = []

    @settings(max_examples=200, derandomize=True, database=None)
    @given(valid_tunnel_responses, st.booleans())
    def count(fields: list[tuple[bytes, bytes]], websocket: bool) -> None:
        resp = tunnel_response(fields, request_was_websocket=websocket)
        seen.append(len(eyeball_response_headers(resp)))

    count()
    assert len(seen) >= 100
    assert sum(1 for n in seen if n) >= len(seen) // 2, seen


origin_headers = st.lists(
    st.tuples(
        st.text(TOKEN, min_size=1, max_size=10).map(str.encode),
        st.text("".join(chr(c) for c in range(0x21, 0x7F)), max_size=10).map(str.encode),
    ),
    max_size=8,
)


@given(st.integers(100, 599), origin_headers, st.booleans())
def test_response_round_trip_connector_to_edge(
    status: int, headers: list[tuple[bytes, bytes]], ws: bool
) -> None:
    headers = [
        (k, v) for k, v in headers if k.lower() not in (b"transfer-encoding", b"content-length", b"trailer")
    ]
    resp = tunnel_response(tunnel_response_headers(status, headers), request_was_websocket=ws)
    assert resp.status == (200 if status == 101 else status)
    assert resp.src == "origin"
    kept = [
        (k, v)
        for k, v in headers
        if not k.lower().startswith((b"cf-int-", b"cf-cloudflared-", b"cf-proxy-"))
        or k.lower() in (b"connection", b"upgrade", b"sec-websocket-accept")
    ]
    assert sorted((k.lower(), v) for k, v in resp.headers) == sorted((k.lower(), v) for k, v in kept)
    # What the edge decoded serializes back to the same field the connector sent.
    again = tunnel_response(tunnel_response_headers(status, resp.headers), request_was_websocket=ws)
    assert again.headers == resp.headers


def test_tunnel_response_is_frozen() -> None:
    resp = TunnelResponse(200, [], "origin", False, None)
    with pytest.raises(AttributeError):
        resp.status = 201  # type: ignore[misc]


@pytest.mark.parametrize(("version", "headers", "status"), [
    (b"1.1", [(b"Host", b"a"), (b"Content-Length", b"6"), (b"Transfer-Encoding", b"chunked")], 400),
    (b"1.1", [(b"transfer-encoding", b"chunked"), (b"content-length", b"6")], 400),
    (b"1.0", [(b"Content-Length", b"6"), (b"Transfer-Encoding", b"identity")], 400),
    (b"9.9", [(b"Host", b"a")], 505),
    (b"2.0", [(b"Host", b"a")], 505),
    (b"1.1", [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")], None),
    (b"1.1", [(b"Host", b"a"), (b"Content-Length", b"6")], None),
    (b"1.0", [(b"Host", b"a")], None),
])
def test_request_head_error(version: bytes, headers: list[tuple[bytes, bytes]], status: int | None) -> None:
    refused = request_head_error(version, headers)
    assert (refused[0] if refused else None) == status


# --- pinned by mutation testing (docs/mutation-report.md) --------------------------------------------

@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("http://a.test:80/p?q", "/p?q"),
        ("http://a.test?x=1/y", "/?x=1/y"),  # the query starts before any slash
        ("http://a.test", "/"),
        ("HTTPS://a/b", "/b"),
        ("http:///x", "/x"),  # empty authority: the path starts at once
        ("http://?a/b", "/?a/b"),
        ("http://?a", "/?a"),
        ("http://a/b://c", "/b://c"),
        ("http://a/b/c", "/b/c"),
        ("http://a?x?y/z", "/?x?y/z"),
    ],
)
def test_absolute_form_targets_become_origin_form(target: str, path: str) -> None:
    fields = dict(tunnel_request_headers(eyeball([], target=target), ray=RAY))
    assert fields[b":path"] == path.encode()


def test_targets_that_cannot_become_a_path_say_so() -> None:
    long_target = "ftp://" + "a" * 100
    with pytest.raises(StreamConversionError) as exc:
        tunnel_request_headers(eyeball([], target=long_target), ray=RAY)
    assert str(exc.value) == f"request target {long_target[:80]!r} cannot become an HTTP/2 :path"
    with pytest.raises(StreamConversionError, match="request target 'http' cannot"):
        tunnel_request_headers(eyeball([], target="http"), ray=RAY)


def test_eyeball_request_headers_become_bytes_and_odd_bytes_survive() -> None:
    req = EyeballRequest(method="GET", target="/\udcfe", headers=(("X-A", "1"),), scheme="https",
                         client_ip="203.0.113.9", host="a\udcff.test")
    assert req.headers == ((b"X-A", b"1"),)
    fields = dict(tunnel_request_headers(req, ray=RAY))
    assert fields[b":authority"] == b"a\xff.test" and fields[b":path"] == b"/\xfe"


def test_invalid_fields_are_dropped_one_by_one_and_te_trailers_kept_once() -> None:
    fields = tunnel_request_headers(
        eyeball([(b"x a", b"bad name"), (b"x-b", b"bad\x00value"), (b"x-c", b"trailing control\x0b"),
                 (b"te", b"trailers"), (b"TE", b"trailers"), (b"x-d", b"kept")]),
        ray=RAY,
    )
    regular = [(k, v) for k, v in fields[4:] if not k.startswith((b"cf-", b"x-forwarded", b"cdn-"))]
    assert regular == [(b"te", b"trailers"), (b"x-d", b"kept")]


def test_connection_tokens_are_matched_case_insensitively() -> None:
    fields = tunnel_request_headers(eyeball([(b"Connection", b"X"), (b"x", b"1"), (b"y", b"2")]), ray=RAY)
    names = [k for k, _ in fields]
    assert b"x" not in names and b"y" in names


def test_go_own_answer_keeps_only_its_regular_fields() -> None:
    """No meta and no serialized field: Go's own 400; its HTTP/2 date and content-length are not the
    origin's, nor are pseudo or cf- fields."""
    resp = tunnel_response(
        [(b":status", b"400"), (b"content-type", b"text/plain; charset=utf-8"), (b"date", b"x"),
         (b"content-length", b"12"), (b"cf-ray", b"r"), (b"x-content-type-options", b"nosniff")],
        request_was_websocket=False,
    )
    assert resp.src is None and resp.content_length == 12
    assert resp.headers == [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"x-content-type-options", b"nosniff")]


def _upgrade_answer(headers: list[tuple[bytes, bytes]]) -> TunnelResponse:
    return tunnel_response(
        [(b":status", b"200"), (b"cf-cloudflared-response-meta", b'{"src":"origin"}'),
         (b"cf-cloudflared-response-headers", serialize_response_headers(headers))],
        request_was_websocket=True,
    )


def test_websocket_upgrade_needs_both_upgrade_and_accept() -> None:
    accept = (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    assert _upgrade_answer([(b"Upgrade", b"websocket"), accept]).websocket_upgrade
    assert not _upgrade_answer([(b"Upgrade", b"websocket")]).websocket_upgrade
    assert not _upgrade_answer([(b"Upgrade", b"h2c"), accept]).websocket_upgrade


def test_upgrade_response_drops_the_other_hop_by_hop_fields() -> None:
    kept = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), (b"X-A", b"1")]
    dropped = [(b"Keep-Alive", b"timeout=5"), (b"Proxy-Connection", b"x"), (b"Transfer-Encoding", b"chunked"),
               (b"TE", b"trailers"), (b"Trailer", b"X-Sum"), (b"Content-Length", b"0")]
    resp = _upgrade_answer(kept + dropped)
    assert resp.websocket_upgrade and resp.eyeball_status == 101
    assert eyeball_response_headers(resp) == kept


def test_new_ray_id_needs_eight_bytes() -> None:
    assert new_ray_id("LAB1", bytes(range(9))) == "0001020304050607-LAB1"
    with pytest.raises(ValueError, match=r"^new_ray_id needs 8 random bytes, got 7$"):
        new_ray_id("LAB1", bytes(7))

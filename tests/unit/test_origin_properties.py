"""Properties of wire.origin: every origin request we produce is valid HTTP/1.1 carrying the stream's body."""

from __future__ import annotations

import contextlib
import gzip
from dataclasses import dataclass

import h11
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tunnel_lab.wire.errors import OriginError, StreamConversionError
from tunnel_lab.wire.headers import canonical_header_name, deserialize_response_headers, is_token
from tunnel_lab.wire.origin import (
    BodyEncoder,
    Framing,
    Gunzipper,
    OriginOptions,
    OriginRequest,
    TunnelRequest,
    build_origin_request,
    forbidden_request_header,
    go_request_uri,
    needs_body_probe,
    tunnel_response_headers,
    tunnel_trailers,
)

LOWER_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
CONNECTION_SPECIFIC = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"]
# Names whose handling has its own tests; random headers avoid them.
RESERVED = {
    "content-length",
    "host",
    "te",
    "trailer",
    "cf-cloudflared-proxy-connection-upgrade",
    "user-agent",
    "accept-encoding",
    "range",
    "cookie",
    "cf-warp-tag-id",
    "x-forwarded-host",
    "expect",
    *CONNECTION_SPECIFIC,
}

methods = st.sampled_from(
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "SEARCH", "PURGE"]
)
labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10)
hosts = st.lists(labels, min_size=1, max_size=3).map(".".join)
authorities = st.tuples(hosts, st.one_of(st.none(), st.integers(1, 65535))).map(
    lambda hp: hp[0] if hp[1] is None else f"{hp[0]}:{hp[1]}"
)
path_chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/=&;:@!$'()*+,"
paths = st.tuples(
    st.text(path_chars, max_size=20), st.one_of(st.none(), st.text(path_chars + "?", max_size=12))
).map(lambda pq: "/" + pq[0] + ("" if pq[1] is None else "?" + pq[1]))
names = st.text(LOWER_TOKEN, min_size=1, max_size=12).filter(lambda n: n not in RESERVED)
values = st.text("".join(chr(c) for c in range(0x20, 0x7F)), max_size=20)
fields = st.lists(st.tuples(names, values), max_size=6)
bodies = st.lists(st.binary(max_size=24), max_size=4)


@dataclass
class Exchange:
    method: str
    end_stream: bool
    chunks: list[bytes]
    length_mode: str
    no_chunked: bool
    probe_times_out: bool
    extra: list[tuple[str, str]]
    user_agent: str | None
    te_trailers: bool


exchanges = st.builds(
    Exchange,
    method=methods,
    end_stream=st.booleans(),
    chunks=bodies,
    length_mode=st.sampled_from(["absent", "exact"]),
    no_chunked=st.booleans(),
    probe_times_out=st.booleans(),
    extra=fields,
    user_agent=st.one_of(st.none(), st.just(""), st.text(path_chars, min_size=1, max_size=10)),
    te_trailers=st.booleans(),
)


def h2_headers(
    method: str, authority: str, path: str, extra: list[tuple[str, str]]
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
        *((k.encode(), v.encode()) for k, v in extra),
    ]


def parse_with_h11(data: bytes) -> tuple[h11.Request, bytes, bytes]:
    """The request h11 parses, the body it sees, and the bytes it left unparsed."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request = None
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise AssertionError(f"h11 stopped at {event!r} on {data!r}")
    assert request is not None
    return request, body, conn.trailing_data[0]


def run_exchange(
    ex: Exchange, authority: str, path: str, opts: OriginOptions
) -> tuple[bytes, bytes, Framing, TunnelRequest, list[tuple[bytes, bytes]]]:
    """Play the connector: probe if Go would, build the head, frame the stream's DATA."""
    chunks = [] if ex.end_stream else list(ex.chunks)
    body = b"".join(chunks)
    extra = list(ex.extra)
    if ex.user_agent is not None:
        extra.append(("user-agent", ex.user_agent))
    if ex.te_trailers:
        extra.append(("te", "trailers"))
    if ex.length_mode == "exact":
        extra.append(("content-length", str(len(body))))
    req = TunnelRequest.from_h2_headers(h2_headers(ex.method, authority, path, extra), ex.end_stream)
    probe = None
    if needs_body_probe(req, opts) and not ex.probe_times_out:
        probe = body[:1]  # b"" = EOF at once
        rest, dropped = [], False
        for chunk in chunks:
            if chunk and not dropped:
                chunk, dropped = chunk[1:], True
            rest.append(chunk)
        chunks = ([probe] if probe else []) + rest
    out = build_origin_request(req, opts, probe=probe)
    framing = out.framing
    if framing is Framing.BUFFERED:  # the connector reads the whole body first (docs/protocol.md §12.1)
        out = out.with_body_length(len(body))
    encoder = BodyEncoder(out.framing, out.content_length)
    wire = out.head_bytes() + b"".join(encoder.encode(c) for c in chunks) + encoder.end()
    return wire, body, framing, req, out.headers


@given(exchanges, authorities, paths)
def test_every_origin_request_parses_with_h11_and_carries_the_body(
    ex: Exchange, authority: str, path: str
) -> None:
    opts = OriginOptions(
        connector_id="7b62af18-9c7a-49b5-aa80-0f6cb2a55d6e", disable_chunked_encoding=ex.no_chunked
    )
    wire, body, framing, _req, _ = run_exchange(ex, authority, path, opts)
    request, seen, leftover = parse_with_h11(wire)
    assert request.method.decode() == ex.method
    assert request.target.decode() == go_request_uri(path) == path
    assert [v for k, v in request.headers if k == b"host"] == [authority.encode()]
    # every body reaches the origin whole, --no-chunked-encoding without a length included (where
    # cloudflared loses it: go1.26 D09/D09b, docs/protocol.md §12.1)
    assert seen == body and leftover == b""
    if framing is Framing.NONE:
        assert body == b""


@given(exchanges, authorities, paths, st.one_of(st.none(), authorities))
def test_host_is_the_authority_or_the_override(
    ex: Exchange, authority: str, path: str, override: str | None
) -> None:
    opts = OriginOptions(connector_id="c", http_host_header=override, disable_chunked_encoding=ex.no_chunked)
    _, _, _, _, headers = run_exchange(ex, authority, path, opts)
    assert headers[0] == (b"Host", (override or authority).encode())
    assert [k for k, _ in headers].count(b"Host") == 1
    forwarded = [v for k, v in headers if k == b"X-Forwarded-Host"]
    assert forwarded == ([authority.encode()] if override else [])


@given(exchanges, authorities, paths)
def test_head_order_is_gos(ex: Exchange, authority: str, path: str) -> None:
    opts = OriginOptions(connector_id="c", disable_chunked_encoding=ex.no_chunked)
    _, body, framing, _req, headers = run_exchange(ex, authority, path, opts)
    names = [k for k, _ in headers]
    i = 1
    if ex.user_agent:
        assert names[i] == b"User-Agent"
        i += 1
    if framing is Framing.CHUNKED:
        assert headers[i] == (b"Transfer-Encoding", b"chunked")
        i += 1
    elif framing is Framing.CONTENT_LENGTH or (framing is Framing.BUFFERED and body):
        assert names[i] == b"Content-Length"
        i += 1
    end = len(names) - 1 if names[-1] == b"Accept-Encoding" and headers[-1][1] == b"gzip" else len(names)
    middle = names[i:end]
    assert middle == sorted(middle)
    assert (
        b"Content-Length" not in middle and b"Transfer-Encoding" not in middle and b"User-Agent" not in middle
    )
    assert all(canonical_header_name(n) == n for n in names)
    # Repeated names keep the order the edge sent them in.
    for name in {k for k, _ in ex.extra}:
        canon = canonical_header_name(name.encode())
        sent = [v.strip(" \t").encode() for k, v in ex.extra if canonical_header_name(k.encode()) == canon]
        assert [v for k, v in headers if k == canon][: len(sent)] == sent
    added = names[-1] == b"Accept-Encoding"
    assert added == (ex.method != "HEAD")


connection_fields = st.lists(
    st.tuples(
        st.sampled_from([*CONNECTION_SPECIFIC, "te", "x-a", "cookie", "te"]),
        st.sampled_from(["trailers", "", "close", "keep-alive", "websocket", "chunked", "gzip", "x"]),
    ),
    max_size=4,
)


@given(connection_fields, st.booleans(), st.booleans())
def test_only_allowed_connection_fields_reach_the_origin(
    extra: list[tuple[str, str]], websocket: bool, end_stream: bool
) -> None:
    headers = h2_headers("GET", "a.test", "/", extra)
    message = forbidden_request_header(headers)
    names = {k for k, _ in extra}
    te = [v for k, v in extra if k == "te"]
    expect_forbidden = (
        bool(names & set(CONNECTION_SPECIFIC)) or len(te) > 1 or (te and te[0] not in ("trailers", ""))
    )
    assert (message is not None) == bool(expect_forbidden)
    if message is not None:
        assert message.startswith("request header ") and message.endswith("HTTP/2")
        return
    req = TunnelRequest.from_h2_headers(headers, end_stream)
    out = build_origin_request(req, OriginOptions(connector_id="c"), websocket=websocket)
    got: dict[bytes, list[bytes]] = {}
    for k, v in out.headers:
        got.setdefault(k, []).append(v)
    if websocket:
        assert got[b"Connection"] == [b"Upgrade"] and got[b"Upgrade"] == [b"websocket"]
        assert got[b"Sec-Websocket-Version"] == [b"13"]
        assert b"Transfer-Encoding" not in got and b"Content-Length" not in got
    else:
        assert got[b"Connection"] == [b"keep-alive"] and b"Upgrade" not in got
    assert got.get(b"Te", [b"trailers"]) in ([b"trailers"], [b""])
    assert b"Keep-Alive" not in got and b"Proxy-Connection" not in got
    assert got.get(b"Transfer-Encoding", [b"chunked"]) == [b"chunked"]


# --- decoders never raise anything but project errors ------------------------------------------------

raw_fields = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from(
                [
                    b":method",
                    b":path",
                    b":scheme",
                    b":authority",
                    b":status",
                    b"host",
                    b"content-length",
                    b"cookie",
                    b"trailer",
                    b"user-agent",
                ]
            ),
            st.binary(max_size=8),
        ),
        st.one_of(
            st.sampled_from([b"GET", b"CONNECT", b"https", b"/", b"*", b"a.test", b"1", b"-1"]),
            st.binary(max_size=12),
        ),
    ),
    max_size=8,
)


def assert_well_formed_head(out: OriginRequest) -> None:
    """The head is one HTTP/1.1 request that h11 parses, every field a token name and a CR/LF-free value."""
    head = out.head_bytes()
    assert head.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in head[:-4]
    for name, value in out.headers:
        assert is_token(name) and b"\r" not in value and b"\n" not in value, (name, value)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    request = conn.next_event()
    assert isinstance(request, h11.Request), request
    assert request.method.decode() == out.method


# Valid request streams (what Go's HTTP/2 server would accept) with field values using every byte
# allowed in a value, obs-text included: building the origin request must succeed every time.
value_bytes = st.binary(max_size=12).map(
    lambda b: bytes(c for c in b if (c >= 0x20 and c != 0x7F) or c == 0x09)
)
valid_names = st.one_of(
    st.sampled_from(["cookie", "trailer", "user-agent", "accept-encoding", "range", "expect", "x-a"]),
    names,
)
valid_fields = st.lists(st.tuples(valid_names.map(str.encode), value_bytes), max_size=6)


@dataclass
class ValidStream:
    headers: list[tuple[bytes, bytes]]
    end_stream: bool
    opts: OriginOptions
    websocket: bool
    probe: bytes | None


@st.composite
def valid_streams(draw: st.DrawFn) -> ValidStream:
    method = draw(methods)
    end_stream = draw(st.booleans())
    fields = draw(valid_fields)
    if draw(st.booleans()):
        fields.append((b"te", b"trailers"))
    if not end_stream and draw(st.booleans()):
        fields.append((b"content-length", str(draw(st.integers(0, 1 << 40))).encode()))
    headers = [
        (b":method", method.encode()),
        (b":scheme", draw(st.sampled_from([b"http", b"https"]))),
        (b":authority", draw(authorities).encode()),
        (b":path", draw(paths).encode()),
        *fields,
    ]
    opts = OriginOptions(
        connector_id="c",
        disable_chunked_encoding=draw(st.booleans()),
        http_host_header=draw(st.one_of(st.none(), authorities)),
    )
    probe = draw(st.one_of(st.none(), st.just(b""), st.just(b"x")))
    return ValidStream(headers, end_stream, opts, draw(st.booleans()), probe)


@given(valid_streams())
def test_valid_streams_always_make_a_well_formed_origin_request(stream: ValidStream) -> None:
    assert forbidden_request_header(stream.headers) is None
    req = TunnelRequest.from_h2_headers(stream.headers, stream.end_stream)
    out = build_origin_request(req, stream.opts, websocket=stream.websocket, probe=stream.probe)
    event(f"framing: {out.framing.value}")
    assert_well_formed_head(out)


def test_the_valid_stream_property_reaches_its_assertions() -> None:
    """Counting check: every generated valid stream gets through to a parsed head."""
    reached: list[bool] = []

    @settings(max_examples=200, derandomize=True, database=None)
    @given(valid_streams())
    def count(stream: ValidStream) -> None:
        req = TunnelRequest.from_h2_headers(stream.headers, stream.end_stream)
        out = build_origin_request(req, stream.opts, websocket=stream.websocket, probe=stream.probe)
        assert_well_formed_head(out)
        reached.append(any(bytes([c]) >= b"\x80" for _, v in out.headers for c in v))

    count()
    assert len(reached) >= 100
    assert any(reached)  # obs-text values really reach the head


# Arbitrary (mostly invalid) fields, alone or after a valid stream's: decoding raises only
# StreamConversionError, and whatever gets through still makes a well-formed head.
invalid_fields = st.one_of(
    raw_fields, st.tuples(valid_streams(), raw_fields).map(lambda pair: pair[0].headers + pair[1])
)


@given(invalid_fields, st.booleans(), st.booleans(), st.booleans(), st.sampled_from([None, b"", b"x"]))
def test_arbitrary_request_headers_raise_only_project_errors(
    headers: list[tuple[bytes, bytes]],
    end_stream: bool,
    websocket: bool,
    no_chunked: bool,
    probe: bytes | None,
) -> None:
    try:
        req = TunnelRequest.from_h2_headers(headers, end_stream)
        opts = OriginOptions(connector_id="c", disable_chunked_encoding=no_chunked, http_host_header=None)
        needs_body_probe(req, opts, websocket=websocket)
        out = build_origin_request(req, opts, websocket=websocket, probe=probe)
    except StreamConversionError:
        event("rejected")
        return
    event("accepted")
    assert_well_formed_head(out)


@given(st.text(max_size=30))
def test_go_request_uri_arbitrary(path: str) -> None:
    try:
        uri = go_request_uri(path)
    except StreamConversionError:
        return
    assert uri.partition("?")[0].isascii()
    with contextlib.suppress(StreamConversionError):
        assert go_request_uri(uri) == uri  # a re-serialised target is stable


response_fields = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from(
                [
                    b"Content-Length",
                    b"transfer-encoding",
                    b"Trailer",
                    b"Connection",
                    b"cf-int-x",
                    b":status",
                    b"Cf-Int-Cloudflared-Tracing",
                ]
            ),
            st.binary(max_size=10),
        ),
        st.one_of(st.sampled_from([b"chunked", b"5", b"x"]), st.binary(max_size=10)),
    ),
    max_size=8,
)


@given(st.integers(0, 1200), response_fields, st.booleans())
def test_arbitrary_origin_responses_raise_only_origin_errors(
    status: int, headers: list[tuple[bytes, bytes]], head: bool
) -> None:
    try:
        fields = tunnel_response_headers(status, headers, head=head)
    except OriginError:
        return
    as_dict = dict(fields)
    assert as_dict[b":status"] == (b"200" if status == 101 else str(status).encode())
    for name, _ in deserialize_response_headers(as_dict[b"cf-cloudflared-response-headers"]):
        assert name.lower() not in (b"transfer-encoding", b"trailer")
    tunnel_trailers(headers)


@given(st.binary(max_size=300), st.integers(1, 50))
def test_gunzipper_arbitrary_bytes(data: bytes, step: int) -> None:
    gun = Gunzipper()
    try:
        for i in range(0, len(data), step):
            gun.feed(data[i : i + step])
        gun.finish()
    except OriginError:
        pass


@given(st.lists(st.binary(max_size=100), min_size=1, max_size=3), st.integers(1, 40))
def test_gunzipper_round_trip(members: list[bytes], step: int) -> None:
    data = b"".join(gzip.compress(m) for m in members)
    gun = Gunzipper()
    out = b"".join(gun.feed(data[i : i + step]) for i in range(0, len(data), step)) + gun.finish()
    assert out == b"".join(members)


@given(st.lists(st.binary(max_size=30), max_size=6))
def test_chunked_encoder_is_decoded_by_h11(chunks: list[bytes]) -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    enc = BodyEncoder(Framing.CHUNKED)
    _, body, rest = parse_with_h11(head + b"".join(enc.encode(c) for c in chunks) + enc.end())
    assert body == b"".join(chunks) and rest == b""


@given(st.lists(st.binary(max_size=20), max_size=5), st.integers(0, 80))
def test_content_length_encoder_enforces_the_declared_length(chunks: list[bytes], declared: int) -> None:
    enc = BodyEncoder(Framing.CONTENT_LENGTH, declared)
    sent = b""
    try:
        for chunk in chunks:
            sent += enc.encode(chunk)
        sent += enc.end()
    except StreamConversionError:
        assert len(b"".join(chunks)) != declared
        return
    assert sent == b"".join(chunks) and len(sent) == declared


@given(methods, st.sampled_from([None, "0"]), fields)
def test_probe_result_decides_the_framing(
    method: str, length: str | None, extra: list[tuple[str, str]]
) -> None:
    headers = h2_headers(method, "a.test", "/", extra + ([("content-length", length)] if length else []))
    req = TunnelRequest.from_h2_headers(headers, end_stream=False)
    opts = OriginOptions(connector_id="c")
    if not needs_body_probe(req, opts):
        assert method not in ("GET", "HEAD", "DELETE", "OPTIONS", "PROPFIND", "SEARCH")
        assert build_origin_request(req, opts).framing is Framing.CHUNKED
        return
    assert build_origin_request(req, opts, probe=b"").framing is Framing.NONE
    assert build_origin_request(req, opts, probe=b"x").framing is Framing.CHUNKED
    assert build_origin_request(req, opts, probe=None).framing is Framing.CHUNKED  # the probe timed out

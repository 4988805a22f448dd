"""wire.quic_stream: stream signatures, ConnectRequest/ConnectResponse codecs, the http2-style translation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import capnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tunnel_lab.wire.quic_stream as qs
from tunnel_lab.wire.capnp import frame_message
from tunnel_lab.wire.eyeball import EyeballRequest, tunnel_request_headers, tunnel_response
from tunnel_lab.wire.headers import META_CLOUDFLARED, META_FLOW_LIMITED, RESPONSE_META
from tunnel_lab.wire.quic_stream import (
    DATA_STREAM_SIGNATURE,
    RPC_STREAM_SIGNATURE,
    ConnectionType,
    ConnectRequest,
    ConnectResponse,
    QuicStreamError,
    StreamHeadReader,
    StreamKind,
    connect_request_from_headers,
    connect_response_for_http,
    encode_connect_request,
    encode_connect_response,
    headers_from_connect_response,
    http_fields_from_connect_request,
)

capnp.remove_import_hook()
schema: Any = capnp.load(str(Path(qs.__file__).with_name("quic_metadata.capnp")))

# Text values: any string, including header bytes that are not UTF-8 (carried as surrogate escapes).
_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
texts = st.one_of(st.text(_chars, max_size=40),
                  st.binary(max_size=20).filter(lambda b: b"\0" not in b).map(
                      lambda b: b.decode("utf-8", "surrogateescape")))
metadata = st.lists(st.tuples(texts, texts), max_size=8).map(tuple)
requests = st.builds(ConnectRequest, dest=texts, type=st.sampled_from(list(ConnectionType)),
                     metadata=metadata)
responses = st.builds(ConnectResponse, error=texts, metadata=metadata)


def _feed_in_pieces(reader: StreamHeadReader, data: bytes, cuts: list[int]) -> qs.StreamHead:
    points = sorted({min(c, len(data)) for c in cuts} | {len(data)})
    start, head = 0, None
    for point in points:
        if head is None:
            head = reader.feed(data[start:point])
        start = point
    assert head is not None
    return head


def test_signatures_and_version_are_cloudflareds() -> None:
    assert bytes.fromhex("0a36cd12a13e") == DATA_STREAM_SIGNATURE
    assert bytes.fromhex("52bb825cdb65") == RPC_STREAM_SIGNATURE
    assert qs.PROTOCOL_VERSION == b"01"
    assert qs.rpc_stream_preamble() == RPC_STREAM_SIGNATURE


def test_schema_ids() -> None:
    assert int(schema.schema.node.id) == 0xB29021EF7421CC32
    assert int(schema.ConnectRequest.schema.node.id) == 0xC47116A1045E4061
    assert int(schema.ConnectResponse.schema.node.id) == 0xB1032EC91CEF8727
    assert int(schema.Metadata.schema.node.id) == 0xE1446B97BFD1CD37


@given(requests, st.lists(st.integers(0, 300), max_size=6), st.binary(max_size=50))
def test_request_round_trip_in_any_pieces(request: ConnectRequest, cuts: list[int], body: bytes) -> None:
    head = _feed_in_pieces(StreamHeadReader(expect="request"), encode_connect_request(request) + body, cuts)
    assert head.kind is StreamKind.DATA
    assert head.version == b"01"
    assert head.message == request
    assert head.rest == body[:len(head.rest)]
    assert body.startswith(head.rest)


@given(responses, st.lists(st.integers(0, 300), max_size=6))
def test_response_round_trip_in_any_pieces(response: ConnectResponse, cuts: list[int]) -> None:
    data = encode_connect_response(response) + b"body"
    head = _feed_in_pieces(StreamHeadReader(expect="response"), data, cuts)
    assert head.message == response


@given(requests.filter(lambda r: all(_utf8(t) for kv in r.metadata for t in kv) and _utf8(r.dest)))
def test_request_bytes_are_what_pycapnp_writes_and_reads(request: ConnectRequest) -> None:
    ours = qs.connect_request_message(request)
    theirs = schema.ConnectRequest.new_message(
        dest=request.dest, type=int(request.type),
        metadata=[{"key": k, "val": v} for k, v in request.metadata])
    with schema.ConnectRequest.from_bytes(ours) as decoded:
        assert decoded.dest == request.dest
        assert decoded.type.raw == int(request.type)
        assert [(m.key, m.val) for m in decoded.metadata] == list(request.metadata)
    assert qs.decode_connect_request(capnp_segments(theirs.to_bytes())) == request


@given(responses.filter(lambda r: all(_utf8(t) for kv in r.metadata for t in kv) and _utf8(r.error)))
def test_response_bytes_are_what_pycapnp_reads_and_writes(response: ConnectResponse) -> None:
    ours = qs.connect_response_message(response)
    with schema.ConnectResponse.from_bytes(ours) as decoded:
        assert decoded.error == response.error
        assert [(m.key, m.val) for m in decoded.metadata] == list(response.metadata)
    theirs = schema.ConnectResponse.new_message(
        error=response.error, metadata=[{"key": k, "val": v} for k, v in response.metadata])
    assert qs.decode_connect_response(capnp_segments(theirs.to_bytes())) == response


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def capnp_segments(framed: bytes) -> list[bytes]:
    from tunnel_lab.wire.capnp import unframe

    return unframe(framed)


def test_empty_texts_are_null_pointers_like_go() -> None:
    # Go's capnp writes "" as a null pointer: an empty ConnectResponse is the root and two null pointers.
    assert qs.connect_response_message(ConnectResponse()) == bytes.fromhex(
        "0000000003000000" "0000000000000200" "0000000000000000" "0000000000000000")


def test_rpc_stream_head() -> None:
    reader = StreamHeadReader(expect="request", allow_rpc=True)
    assert reader.feed(RPC_STREAM_SIGNATURE[:3]) is None
    head = reader.feed(RPC_STREAM_SIGNATURE[3:] + b"\x00rpc")
    assert head is not None
    assert (head.kind, head.version, head.message, head.rest) == (StreamKind.RPC, b"", None, b"\x00rpc")
    with pytest.raises(RuntimeError, match="already read"):
        reader.feed(b"more")


@pytest.mark.parametrize(("data", "match"), [
    (b"GET / HTTP/1.1\r\n", r"unknown stream signature 474554202f20 \(data is 0a36cd12a13e"),
    (RPC_STREAM_SIGNATURE, "RPC stream signature where only data streams"),
    (DATA_STREAM_SIGNATURE + b"x1", r"data stream version b'x1' is not two digits"),
    (DATA_STREAM_SIGNATURE + b"01" + b"\xff\xff\xff\xff", "malformed ConnectResponse: capnp framing"),
])
def test_bad_heads_say_what_is_wrong(data: bytes, match: str) -> None:
    with pytest.raises(QuicStreamError, match=match):
        StreamHeadReader(expect="response").feed(data)


def test_oversized_head_is_refused_before_buffering() -> None:
    announce = (0).to_bytes(4, "little") + (1 << 20).to_bytes(4, "little")
    reader = StreamHeadReader(expect="request", max_head_bytes=4096)
    with pytest.raises(QuicStreamError, match="limit is 4096"):
        reader.feed(DATA_STREAM_SIGNATURE + b"01" + announce)


def test_unknown_connection_type_and_bad_text() -> None:
    from tunnel_lab.wire.capnp import MessageBuilder

    msg = MessageBuilder()
    root = msg.init_root(1, 2)
    root.set_u16(0, 7)
    with pytest.raises(QuicStreamError, match=r"ConnectRequest.type 7 is not http \(0\)"):
        qs.decode_connect_request(msg.segments())
    msg = MessageBuilder()
    msg.init_root(1, 2).set_data(0, b"no-nul")
    with pytest.raises(QuicStreamError, match=r"ConnectRequest\.dest: Text is not NUL-terminated"):
        qs.decode_connect_request(msg.segments())
    with pytest.raises(QuicStreamError, match="malformed ConnectRequest: capnp"):
        qs.decode_connect_request([b"\x01\x00\x00\x00\xff\xff\x00\x00"])
    with pytest.raises(ValueError, match="expect is 'request' or 'response'"):
        StreamHeadReader(expect="other")


def test_frame_of_decoded_message_is_stable() -> None:
    request = ConnectRequest(dest="https://a.test/x?y", type=ConnectionType.HTTP,
                             metadata=(("HttpMethod", "GET"), ("HttpHost", "a.test")))
    data = encode_connect_request(request)
    assert data[:8] == DATA_STREAM_SIGNATURE + b"01"
    assert data[8:] == frame_message(capnp_segments(data[8:]))


# ---- translation -------------------------------------------------------------------------------

def _eyeball(method: str = "GET", target: str = "/p?q=1", headers: tuple[tuple[bytes, bytes], ...] = (),
             host: str = "app.test") -> EyeballRequest:
    return EyeballRequest(method=method, target=target, headers=((b"Host", host.encode()), *headers),
                          scheme="https", client_ip="127.0.0.9", host=host)


def test_http_request_metadata() -> None:
    extra = ((b"X-Two", b"a"), (b"x-two", b"b"), (b"Accept", b"*/*"))
    fields = tunnel_request_headers(_eyeball(headers=extra), ray="00ff-LAB")
    request = connect_request_from_headers(fields, has_body=False)
    assert request.type is ConnectionType.HTTP
    assert request.dest == "https://app.test/p?q=1"
    assert request.metadata[:4] == (("HttpHeader:X-Two", "a"), ("HttpHeader:X-Two", "b"),
                                    ("HttpHeader:Accept", "*/*"), ("HttpHeader:Cf-Ray", "00ff-LAB"))
    assert request.metadata[-2:] == (("HttpHost", "app.test"), ("HttpMethod", "GET"))
    assert not any(k.startswith("HttpHeader::") for k, _ in request.metadata)
    assert "HttpHeader:Transfer-Encoding" not in dict(request.metadata)


def test_body_without_length_is_announced_chunked() -> None:
    fields = tunnel_request_headers(_eyeball("POST"), ray="r")
    assert ("HttpHeader:Transfer-Encoding", "chunked") in connect_request_from_headers(
        fields, has_body=True).metadata
    with_length = tunnel_request_headers(_eyeball("POST", headers=((b"Content-Length", b"3"),)), ray="r")
    request = connect_request_from_headers(with_length, has_body=True)
    assert request.get("HttpHeader:Content-Length") == "3"
    assert request.get("HttpHeader:Transfer-Encoding") is None


def test_websocket_and_tcp_requests() -> None:
    fields = tunnel_request_headers(_eyeball(headers=((b"Sec-WebSocket-Key", b"k"),)), ray="r",
                                    websocket=True)
    request = connect_request_from_headers(fields, has_body=False)
    assert request.type is ConnectionType.WEBSOCKET
    assert request.get("HttpHeader:Cf-Cloudflared-Proxy-Connection-Upgrade") == "websocket"
    assert request.get("HttpHeader:Transfer-Encoding") is None  # a WebSocket's body is the upgraded bytes
    tcp = [(b":method", b"CONNECT"), (b":authority", b"10.1.2.3:22"),
           (b"cf-cloudflared-proxy-src", b"tcp://127.0.0.1:5555"), (b"cf-ray", b"r")]
    assert connect_request_from_headers(tcp, has_body=False) == ConnectRequest(
        dest="10.1.2.3:22", type=ConnectionType.TCP)
    control = [(b":method", b"GET"), (b"cf-cloudflared-proxy-connection-upgrade", b"control-stream")]
    with pytest.raises(QuicStreamError, match="a control stream has no QUIC data-stream form"):
        connect_request_from_headers(control, has_body=False)


def test_request_fields_round_trip_through_the_connector_view() -> None:
    extra = ((b"Content-Length", b"2"), (b"X-A", b"1"))
    fields = tunnel_request_headers(_eyeball("PUT", headers=extra), ray="r")
    request = connect_request_from_headers(fields, has_body=True)
    view = http_fields_from_connect_request(request)
    assert (view.method, view.host, view.dest, view.websocket) == ("PUT", "app.test", "https://app.test/p?q=1",
                                                                  False)
    assert (b"X-A", b"1") in view.headers
    assert (b"Content-Length", b"2") in view.headers
    bad = ConnectRequest(dest="/", type=ConnectionType.HTTP, metadata=(("HttpHeader:A:B", "v"),))
    with pytest.raises(QuicStreamError, match="is not HttpHeader:<Name>"):
        http_fields_from_connect_request(bad)
    with pytest.raises(QuicStreamError, match="tcp ConnectRequest carries no HTTP request"):
        http_fields_from_connect_request(ConnectRequest(dest="a:1", type=ConnectionType.TCP))


def test_response_translates_to_what_the_proxy_reads() -> None:
    answer = connect_response_for_http(200, [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"),
                                             (b"Set-Cookie", b"b=2"), (b"Content-Length", b"5")])
    assert answer.metadata[0] == ("HttpStatus", "200")
    fields = headers_from_connect_response(answer, request_type=ConnectionType.HTTP)
    resp = tunnel_response(fields, request_was_websocket=False)
    assert (resp.status, resp.src, resp.content_length) == (200, "origin", 5)
    assert resp.headers == [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"),
                            (b"Set-Cookie", b"b=2"), (b"Content-Length", b"5")]


def test_websocket_101_reads_as_an_upgrade() -> None:
    answer = connect_response_for_http(101, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                                             (b"Sec-Websocket-Accept", b"xyz")])
    fields = headers_from_connect_response(answer, request_type=ConnectionType.WEBSOCKET)
    resp = tunnel_response(fields, request_was_websocket=True)
    assert resp.websocket_upgrade
    assert resp.eyeball_status == 101


def test_errors_read_as_the_connectors_own_answer() -> None:
    error = ConnectResponse(error="dial tcp 127.0.0.1:9: connect: connection refused",
                            metadata=(("HttpStatus", "502"),))
    assert headers_from_connect_response(error, request_type=ConnectionType.HTTP) == [
        (b":status", b"502"), (RESPONSE_META, META_CLOUDFLARED)]
    limited = ConnectResponse(error="too many", metadata=(("FlowConnectRateLimited", "true"),))
    assert headers_from_connect_response(limited, request_type=ConnectionType.TCP) == [
        (b":status", b"502"), (RESPONSE_META, META_FLOW_LIMITED)]
    assert headers_from_connect_response(ConnectResponse(), request_type=ConnectionType.TCP) == [
        (b":status", b"200")]
    with pytest.raises(QuicStreamError, match="without an error has no HttpStatus"):
        headers_from_connect_response(ConnectResponse(), request_type=ConnectionType.HTTP)
    with pytest.raises(QuicStreamError, match=r"HttpStatus '20' is not a 3-digit status"):
        headers_from_connect_response(ConnectResponse(metadata=(("HttpStatus", "20"),)),
                                      request_type=ConnectionType.HTTP)


@given(st.lists(st.tuples(st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z"),
                          st.from_regex(rb"\A[\x21-\x7e]{0,20}\Z")), max_size=6),
       st.integers(200, 599))
def test_any_origin_head_survives_the_trip(headers: list[tuple[bytes, bytes]], status: int) -> None:
    answer = connect_response_for_http(status, headers)
    wire_bytes = encode_connect_response(answer)
    head = StreamHeadReader(expect="response").feed(wire_bytes)
    assert head is not None and isinstance(head.message, ConnectResponse)
    resp = tunnel_response(headers_from_connect_response(head.message, request_type=ConnectionType.HTTP),
                           request_was_websocket=False)
    assert resp.status == status
    control = (b"cf-cloudflared-", b"cf-int-", b"cf-proxy-")
    kept = [(k, v) for k, v in headers if not k.lower().startswith(control)]
    assert sorted(resp.headers) == sorted(kept)

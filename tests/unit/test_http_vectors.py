"""Golden tests: wire.origin / wire.eyeball against the HTTP exchanges captured from real cloudflared.

For every exchange with an `origin_request_raw` we rebuild the origin request from the edge's HEADERS,
the END_STREAM flag and DATA frames, and the run's flags, and compare it byte for byte (the connector id
in `Cf-Warp-Tag-Id` is taken from the capture: it is random per run). Response HEADERS are decoded with
`tunnel_response` and rebuilt from the origin's response head with `tunnel_response_headers`.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import h11
import pytest

from tests.golden import Vector, vector_params
from tunnel_lab.wire.eyeball import eyeball_response_headers, tunnel_response
from tunnel_lab.wire.headers import StreamType, classify_stream, deserialize_response_headers
from tunnel_lab.wire.origin import (
    BodyEncoder,
    Framing,
    Gunzipper,
    OriginOptions,
    OriginRequest,
    TunnelRequest,
    bad_request_response,
    build_origin_request,
    forbidden_request_header,
    needs_body_probe,
    should_gunzip,
    strip_gzip_headers,
    tunnel_response_headers,
    tunnel_trailers,
)

# DATA frames closer together than this were already buffered when Go read the body: one chunk (D07b).
MERGE_WINDOW = 0.005
WEBSOCKET_UPGRADES = {"A11-websocket", "B04-websocket-to-tcp-ingress-rule"}


def _text_bytes(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _is_origin_exchange(v: Vector) -> bool:
    return bool(v.data.get("origin_request_raw")) and classify_stream(v.edge_headers()) in (
        StreamType.HTTP,
        StreamType.WEBSOCKET,
    )


def _body_reads(v: Vector) -> list[bytes]:
    """The edge's DATA payloads grouped as Go's body reads saw them (frames close in time merge)."""
    reads: list[bytes] = []
    last_t = None
    for frame in v.stream_frames("edge->cloudflared"):
        if frame["type"] != "DATA":
            continue
        data = bytes.fromhex(frame.get("data_hex", ""))
        if reads and last_t is not None and frame["t"] - last_t < MERGE_WINDOW:
            reads[-1] += data
        else:
            reads.append(data)
        last_t = frame["t"]
    return [r for r in reads if r]


def rebuild(v: Vector) -> tuple[OriginRequest, bytes, bytes]:
    """Our origin request for this exchange: (request, full bytes we would write, the stream's body)."""
    head_text = v.data["origin_requests"][0]["request_head_text"]
    match = re.search(r"Cf-Warp-Tag-Id: (\S+)\r\n", head_text)
    assert match, f"{v.name}: no Cf-Warp-Tag-Id in the captured head"
    opts = OriginOptions(
        connector_id=match.group(1), disable_chunked_encoding="--no-chunked-encoding" in v.argv
    )
    websocket = classify_stream(v.edge_headers()) is StreamType.WEBSOCKET
    req = TunnelRequest.from_h2_headers(v.edge_headers(), v.edge_end_stream_on_headers())
    assert forbidden_request_header(req.headers) is None
    reads = [] if websocket else _body_reads(v)
    body = b"".join(reads)
    probe = None
    if needs_body_probe(req, opts, websocket=websocket):
        probe = body[:1]  # every captured probe found its byte (or EOF) within 200 ms
        reads = ([probe, body[1:]] if len(body) > 1 else [probe]) if body else []
    out = build_origin_request(req, opts, websocket=websocket, probe=probe)
    if out.framing is Framing.BUFFERED:  # we learn the length first (docs/protocol.md §12.1)
        return out, out.with_body_length(len(body)).head_bytes() + body, body
    encoder = BodyEncoder(out.framing, out.content_length)
    wire = out.head_bytes() + b"".join(encoder.encode(r) for r in reads) + encoder.end()
    return out, wire, body


def h11_body(data: bytes) -> tuple[bytes, bytes]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    body = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert event is not h11.NEED_DATA, f"incomplete request: {data[:200]!r}"
        if isinstance(event, h11.Data):
            body += event.data
    return body, conn.trailing_data[0]


@pytest.mark.parametrize("v", vector_params(_is_origin_exchange))
def test_origin_request_head_is_byte_exact(v: Vector) -> None:
    out, _, _ = rebuild(v)
    captured = v.data["origin_requests"][0]["request_head_text"]
    start = captured.index(f"{out.method} ")  # D09c: bytes left over by D09b precede the request line
    assert out.head_bytes() == _text_bytes(captured[start:])


@pytest.mark.parametrize("v", vector_params(_is_origin_exchange))
def test_origin_request_body_matches(v: Vector) -> None:
    out, wire, body = rebuild(v)
    ours, leftover = h11_body(wire)
    raw = v.data["origin_requests"][0]["request_raw"]
    captured_text = v.data["origin_request_raw"]
    if out.framing is Framing.BUFFERED:
        # --no-chunked-encoding without a length: cloudflared's origin saw no body and the bytes trailed
        # (D09, D09b; docs/protocol.md §12.1). Ours reads the body first and frames it with its length.
        assert h11_body(_text_bytes(captured_text))[0] == b""
        framed = out.with_body_length(len(body))
        ours, leftover = h11_body(framed.head_bytes() + body)
        assert ours == body and leftover == b""
        return
    assert ours == body and leftover == b""
    if captured_text.startswith(out.method + " ") and "text" in raw:
        assert h11_body(_text_bytes(captured_text))[0] == body
    if captured_text.startswith(out.method + " "):
        # Whole request byte-exact, chunk boundaries included (raw bodies over 4 KiB: by sha256).
        assert (len(wire), hashlib.sha256(wire).hexdigest()) == (raw["length"], raw["sha256"])


def test_the_tricky_exchanges_are_covered() -> None:
    names = {p.id for p in vector_params(_is_origin_exchange)}
    assert {
        "D04b-delete-with-body-no-content-length",
        "D07-post-three-data-frames-no-content-length",
        "D07b-post-three-data-frames-back-to-back-no-content-length",
        "D09-post-no-content-length-no-chunked-encoding",
        "D09c-get-after-d09b-same-origin-connection",
        "A11-websocket",
        "D10a-get-authority-non-ascii",
        "A04-post-100k",
    } <= names


# --- responses ---------------------------------------------------------------------------------------


def _has_serialized(v: Vector) -> bool:
    return "response_user_headers_deserialized" in v.data and any(
        k == "cf-cloudflared-response-headers" for k, _ in v.data.get("response_headers") or []
    )


@pytest.mark.parametrize("v", vector_params(_has_serialized))
def test_captured_serialized_headers_decode(v: Vector) -> None:
    value = dict(v.response_header_list())[b"cf-cloudflared-response-headers"]
    assert deserialize_response_headers(value) == v.deserialized()


@pytest.mark.parametrize("v", vector_params(lambda v: bool(v.data.get("response_headers"))))
def test_tunnel_response_of_captured_headers(v: Vector) -> None:
    fields = v.response_header_list()
    websocket = classify_stream(v.edge_headers()) is StreamType.WEBSOCKET
    resp = tunnel_response(fields, request_was_websocket=websocket)
    assert resp.status == int(v.data["response_status"])
    meta = v.data.get("response_meta_parsed")
    assert resp.src == (meta or {}).get("src")
    if "response_user_headers_deserialized" in v.data:
        assert resp.headers == v.deserialized()
    length = dict(fields).get(b"content-length")
    assert resp.content_length == (int(length) if length is not None else None)
    assert resp.websocket_upgrade is (v.name in WEBSOCKET_UPGRADES)
    assert resp.eyeball_status == (101 if v.name in WEBSOCKET_UPGRADES else resp.status)
    eyeball = eyeball_response_headers(resp)
    names = {k.lower() for k, _ in eyeball}
    if resp.websocket_upgrade:
        assert {b"upgrade", b"connection", b"sec-websocket-accept"} <= names
    else:
        assert not names & {b"connection", b"upgrade", b"transfer-encoding", b"keep-alive"}
    if resp.src is None:
        # Go's own 400 (D11): no cloudflared headers; its text/plain type is kept for the eyeball.
        assert resp.status == 400 and (b"content-type", b"text/plain; charset=utf-8") in resp.headers


def _has_origin_response(v: Vector) -> bool:
    return _is_origin_exchange(v) and bool(v.data["origin_requests"][0].get("origin_response_head_text"))


def _parse_response_head(text: str) -> tuple[int, list[tuple[bytes, bytes]]]:
    lines = _text_bytes(text).split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip()))
    return status, headers


@pytest.mark.parametrize("v", vector_params(_has_origin_response))
def test_tunnel_response_headers_rebuild_the_capture(v: Vector) -> None:
    out, _, _ = rebuild(v)
    origin = v.data["origin_requests"][0]
    status, headers = _parse_response_head(origin["origin_response_head_text"])
    head = out.method == "HEAD"
    gunzip = should_gunzip(out.added_accept_encoding, status, headers, head=head)
    assert gunzip is (v.name.startswith("A09"))
    if gunzip:
        headers = strip_gzip_headers(headers)
    fields = tunnel_response_headers(status, headers, head=head)
    captured = v.response_header_list()
    ours = dict(fields)
    assert ours[b":status"] == dict(captured)[b":status"]
    assert ours[b"cf-cloudflared-response-meta"] == dict(captured)[b"cf-cloudflared-response-meta"]
    # Go serializes from a map: compare as multisets, and repeats in order.
    mine = deserialize_response_headers(ours[b"cf-cloudflared-response-headers"])
    assert Counter(mine) == Counter(v.deserialized())
    for name in {n for n, _ in mine}:
        assert [x for n, x in mine if n == name] == [x for n, x in v.deserialized() if n == name]
    lengths = [x for k, x in captured if k == b"content-length"]
    assert [x for k, x in fields if k == b"content-length"] == lengths
    if gunzip:
        gun = Gunzipper()
        body = gun.feed(bytes.fromhex(origin["origin_response_body_hex"])) + gun.finish()
        assert body == bytes.fromhex(v.data["response_body"]["hex"])


@pytest.mark.parametrize("v", vector_params(lambda v: bool(v.data.get("response_trailers"))))
def test_trailers_like_the_capture(v: Vector) -> None:
    trailers = [(k.encode(), x.encode()) for k, x in v.data["response_trailers"]]
    canonical = [(k.title(), x) for k, x in trailers]  # what Go's client read from the origin
    assert tunnel_trailers(canonical) == trailers


# --- Go's own 400 (D11) --------------------------------------------------------------------------------


@pytest.mark.parametrize("v", vector_params(lambda v: v.name.startswith("D11")))
def test_forbidden_headers_get_gos_400(v: Vector) -> None:
    message = forbidden_request_header(v.edge_headers())
    if v.data.get("response_status") != "400":
        assert message is None  # D11b: te: trailers is allowed
        return
    assert message is not None
    fields, body = bad_request_response(message)
    assert body == _text_bytes(v.data["response_body"]["text"])
    captured = [(k, x) for k, x in v.response_header_list() if k != b"date"]
    assert fields == captured

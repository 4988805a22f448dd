"""wire.quic_stream against the data streams captured from the real cloudflared over QUIC (tests/vectors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tunnel_lab.wire.eyeball import tunnel_response
from tunnel_lab.wire.quic_stream import (
    ConnectionType,
    ConnectRequest,
    ConnectResponse,
    StreamHeadReader,
    StreamKind,
    encode_connect_response,
    headers_from_connect_response,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "cloudflared-2026.8.2-quic" / "data-streams.json"
STREAMS: dict[str, dict[str, Any]] = {s["name"]: s for s in json.loads(VECTORS.read_text())["streams"]}


def _answer(name: str) -> tuple[ConnectResponse, bytes, bytes]:
    raw = bytes.fromhex(STREAMS[name]["connector_to_edge"])
    head = StreamHeadReader(expect="response").feed(raw)
    assert head is not None and head.kind is StreamKind.DATA and head.version == b"01"
    assert isinstance(head.message, ConnectResponse)
    return head.message, head.rest, raw[:len(raw) - len(head.rest)]


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_cloudflareds_heads_are_what_our_encoder_writes(name: str) -> None:
    response, _, head_bytes = _answer(name)
    assert encode_connect_response(response) == head_bytes
    assert STREAMS[name]["connector_fin"] is True


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_our_request_heads_decode(name: str) -> None:
    head = StreamHeadReader(expect="request").feed(bytes.fromhex(STREAMS[name]["edge_to_connector_head"]))
    assert head is not None and isinstance(head.message, ConnectRequest)
    assert head.message.type is ConnectionType.HTTP
    assert head.rest == b""


@pytest.mark.parametrize(("name", "status", "length"), [("Q01", 200, 915), ("Q02", 200, 981)])
def test_answered_requests(name: str, status: int, length: int) -> None:
    response, body, _ = _answer(name)
    assert response.error == ""
    assert response.metadata[0] == ("HttpStatus", str(status))
    assert sorted(k for k, _ in response.metadata[1:]) == [
        "HttpHeader:Content-Length", "HttpHeader:Content-Type", "HttpHeader:X-Origin"]
    assert response.get("HttpHeader:Content-Length") == str(length) == str(len(body))
    resp = tunnel_response(headers_from_connect_response(response, request_type=ConnectionType.HTTP),
                           request_was_websocket=False)
    assert (resp.status, resp.src, resp.content_length) == (status, "origin", length)
    assert STREAMS[name]["eyeball_status"] == status


def test_an_http_status_rule_answers_with_a_status_only() -> None:
    response, body, _ = _answer("Q03")
    assert response == ConnectResponse(metadata=(("HttpStatus", "418"),))
    assert body == b""


def test_an_origin_that_is_down_is_an_error_without_metadata() -> None:
    response, body, _ = _answer("Q04")
    assert response.error.startswith("Unable to reach the origin service.")
    assert response.metadata == ()
    assert body == b""
    fields = headers_from_connect_response(response, request_type=ConnectionType.HTTP)
    resp = tunnel_response(fields, request_was_websocket=False)
    assert (resp.status, resp.src) == (502, "cloudflared")
    assert STREAMS["Q04"]["eyeball_status"] == 502

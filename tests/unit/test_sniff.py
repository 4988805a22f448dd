"""wire.sniff: Go's DetectContentType as the WHATWG MIME Sniffing standard defines it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire.origin import tunnel_response_headers, with_sniffed_type
from wire.sniff import sniff_content_type


@pytest.mark.parametrize(("data", "expected"), [
    (b'{"hello": "world"}', "text/plain; charset=utf-8"),  # JSON is text (vector A06)
    (b"GET /d01 HTTP/1.1\r\nHost: app\r\n\r\n", "text/plain; charset=utf-8"),  # the echo origin (D01)
    (b"  \n<!DOCTYPE html><html>", "text/html; charset=utf-8"),
    (b"<HtMl>", "text/html; charset=utf-8"),
    (b"<p>hi", "text/html; charset=utf-8"),
    (b"<pre>", "text/plain; charset=utf-8"),  # <p must be followed by a space or >
    (b"<!-- c -->", "text/html; charset=utf-8"),
    (b"<?xml version='1.0'?>", "text/xml; charset=utf-8"),
    (b"%PDF-1.7", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"),
    (b"GIF89a...", "image/gif"),
    (b"\xff\xd8\xff\xe0", "image/jpeg"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "image/webp"),
    (b"RIFF\x10\x00\x00\x00WAVEfmt ", "audio/wave"),
    (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom", "video/mp4"),
    (b"\x1f\x8b\x08\x00", "application/x-gzip"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x00asm\x01\x00\x00\x00", "application/wasm"),
    (b"\xef\xbb\xbfhello", "text/plain; charset=utf-8"),
    (b"\xfe\xff\x00h", "text/plain; charset=utf-16be"),
    (b"hello\x00world", "application/octet-stream"),
    (b"\x1b[0m colour", "text/plain; charset=utf-8"),  # ESC is not a binary byte
])
def test_signatures(data: bytes, expected: str) -> None:
    assert sniff_content_type(data) == expected


def test_only_the_first_512_bytes_count() -> None:
    assert sniff_content_type(b"a" * 512 + b"\x00") == "text/plain; charset=utf-8"
    assert sniff_content_type(b"a" * 511 + b"\x00") == "application/octet-stream"


@given(st.binary(max_size=600))
def test_always_a_type(data: bytes) -> None:
    assert "/" in sniff_content_type(data)


def test_the_sniffed_field_goes_before_content_length_and_not_for_an_empty_body() -> None:
    fields = tunnel_response_headers(200, [(b"Content-Length", b"2"), (b"Content-Type", b"application/json")])
    sniffed = with_sniffed_type(fields, b"{}")
    names = [name for name, _ in sniffed]
    assert names.index(b"content-type") == names.index(b"content-length") - 1
    assert dict(sniffed)[b"content-type"] == b"text/plain; charset=utf-8"
    assert with_sniffed_type(fields, b"") == fields


def test_go_takes_connection_close_out_of_an_http11_response_only() -> None:
    def serialized(http10: bool) -> bytes:
        fields = tunnel_response_headers(200, [(b"Connection", b"Close"), (b"X-A", b"1")], http10=http10)
        return dict(fields)[b"cf-cloudflared-response-headers"]

    assert b"Q29ubmVjdGlvbg" not in serialized(False)  # base64 of "Connection"
    assert b"Q29ubmVjdGlvbg" in serialized(True)
    kept = tunnel_response_headers(200, [(b"Connection", b"keep-alive")])
    assert b"Q29ubmVjdGlvbg" in dict(kept)[b"cf-cloudflared-response-headers"]

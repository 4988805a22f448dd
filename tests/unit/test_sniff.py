"""wire.sniff: Go's DetectContentType as the WHATWG MIME Sniffing standard defines it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire.origin import tunnel_response_headers, with_sniffed_type
from tunnel_lab.wire.sniff import sniff_content_type


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


def _ftyp(box: int, *brands: bytes, total: int | None = None) -> bytes:
    """An ISO media box header: size, `ftyp`, then 4-byte fields (major brand, minor version, brands...)."""
    data = box.to_bytes(4, "big") + b"ftyp" + b"".join(brands)
    return data + b"\x20" * ((total or box) - len(data))


# the box size starts with a NUL byte, so whatever is not mp4 is binary
OCTETS = "application/octet-stream"


@pytest.mark.parametrize(("data", "expected"), [
    (_ftyp(12, b"mp42"), "video/mp4"),  # the smallest box: the major brand alone
    (_ftyp(24, b"isom", b"\0\0\0\0", b"mp41", b"avc1"), "video/mp4"),  # a compatible brand after the version
    (_ftyp(24, b"isom", b"\0\0\0\0", b"avc1", b"mp41"), "video/mp4"),
    (_ftyp(20, b"isom", b"mp41", b"avc1"), OCTETS),  # the minor version is not a brand
    (_ftyp(24, b"isom", b"\0\0\0\0", b"xmp4", b"avc1"), OCTETS),  # brands are aligned
    (_ftyp(20, b"isom", b"\0\0\0\0", b"avc1"), OCTETS),  # no mp4 brand
    (_ftyp(17, b"mp42", total=20), OCTETS),  # a box size that is not a multiple of 4
    (_ftyp(260, b"mp42", total=20), OCTETS),  # a box longer than the data
    (b"\x00\x00\x00\x14moovmp42\x00\x00\x00\x00mp42", OCTETS),  # not an ftyp box
    (_ftyp(12, b"mp42")[:11], OCTETS),  # fewer than 12 bytes
])
def test_mp4_needs_an_ftyp_box_with_an_mp4_brand(data: bytes, expected: str) -> None:
    assert sniff_content_type(data) == expected


@pytest.mark.parametrize(("data", "expected"), [
    (b"<p", "text/plain; charset=utf-8"),  # a marker needs a byte after it (Go: len(data) < len(sig)+1)
    (b"<HTML", "text/plain; charset=utf-8"),
    (b"<p ", "text/html; charset=utf-8"),
    # the font signature masks its first 34 bytes out: any bytes there, then "LP"
    (b"\x01" * 34 + b"LP", "application/vnd.ms-fontobject"),
    (bytes(34) + b"LP", "application/vnd.ms-fontobject"),
    (b"\x01" * 34 + b"Lp", "application/octet-stream"),
])
def test_markers_need_a_terminating_byte_and_masks_ignore_masked_bytes(data: bytes, expected: str) -> None:
    assert sniff_content_type(data) == expected


@pytest.mark.parametrize(("data", "expected"), [
    # the standard's binary bytes are 00-08, 0B, 0E-1A, 1C-1F; TAB LF FF CR and ESC (1B) are text
    (b"a\x0bb", "application/octet-stream"),
    (b"a\x08b", "application/octet-stream"),
    (b"a\x0eb\x1ac\x1c", "application/octet-stream"),
    (b"a\x1fb", "application/octet-stream"),
    (b"a\tb\nc\x0cd\re\x1bf ", "text/plain; charset=utf-8"),
    # the whitespace skipped before markup is TAB LF FF CR and space
    (b"\t\n\x0c\r <html>", "text/html; charset=utf-8"),
    (b"\x0b<html>", "application/octet-stream"),
])
def test_binary_bytes_and_leading_whitespace(data: bytes, expected: str) -> None:
    assert sniff_content_type(data) == expected

"""Go's content sniffing (`http.DetectContentType`), for the `content-type` field of a response HEADERS.

cloudflared's HTTP/2 response carries the origin's headers serialized in `cf-cloudflared-response-headers`,
so the HTTP/2 header map Go's server writes has no Content-Type; Go's server then sniffs one from the first
bytes of the body that leave and adds it as a plain `content-type` field (docs/protocol.md §5.4; vectors A06
and D01-D11: a JSON body is sniffed as `text/plain; charset=utf-8`). The edge ignores it, but it is on the
wire, so our connector sends the same. The algorithm is the WHATWG MIME Sniffing standard's "identify an
unknown MIME type" without scriptable types, which is what Go implements: markup signatures after leading
whitespace, then exact and masked byte signatures, then text versus binary. Pure: no I/O.
"""

from __future__ import annotations

import functools

SNIFF_LEN = 512  # only the first 512 bytes are looked at

_WHITESPACE = b"\t\n\x0c\r "
_TAG_END = b" >"

# HTML opening markers (case-insensitive, after whitespace; a tag-terminating byte must follow)
_HTML_MARKERS = (
    b"<!DOCTYPE HTML", b"<HTML", b"<HEAD", b"<SCRIPT", b"<IFRAME", b"<H1", b"<DIV", b"<FONT", b"<TABLE",
    b"<A", b"<STYLE", b"<TITLE", b"<B", b"<BODY", b"<BR", b"<P", b"<!--",
)

# (pattern, mask or None for an exact prefix, type): byte signatures in the standard's order
_SIGNATURES: tuple[tuple[bytes, bytes | None, str], ...] = (
    (b"%PDF-", None, "application/pdf"),
    (b"%!PS-Adobe-", None, "application/postscript"),
    (b"\xfe\xff\x00\x00", b"\xff\xff\x00\x00", "text/plain; charset=utf-16be"),
    (b"\xff\xfe\x00\x00", b"\xff\xff\x00\x00", "text/plain; charset=utf-16le"),
    (b"\xef\xbb\xbf\x00", b"\xff\xff\xff\x00", "text/plain; charset=utf-8"),
    (b"\x00\x00\x01\x00", None, "image/x-icon"),
    (b"\x00\x00\x02\x00", None, "image/x-icon"),
    (b"BM", None, "image/bmp"),
    (b"GIF87a", None, "image/gif"),
    (b"GIF89a", None, "image/gif"),
    (b"RIFF\x00\x00\x00\x00WEBPVP", b"\xff\xff\xff\xff\x00\x00\x00\x00" + b"\xff" * 6, "image/webp"),
    (b"\x89PNG\r\n\x1a\n", None, "image/png"),
    (b"\xff\xd8\xff", None, "image/jpeg"),
    (b"FORM\x00\x00\x00\x00AIFF", b"\xff\xff\xff\xff\x00\x00\x00\x00\xff\xff\xff\xff", "audio/aiff"),
    (b"ID3", None, "audio/mpeg"),
    (b"OggS\x00", None, "application/ogg"),
    (b"MThd\x00\x00\x00\x06", None, "audio/midi"),
    (b"RIFF\x00\x00\x00\x00AVI ", b"\xff\xff\xff\xff\x00\x00\x00\x00\xff\xff\xff\xff", "video/avi"),
    (b"RIFF\x00\x00\x00\x00WAVE", b"\xff\xff\xff\xff\x00\x00\x00\x00\xff\xff\xff\xff", "audio/wave"),
)
_LATE_SIGNATURES: tuple[tuple[bytes, bytes | None, str], ...] = (
    (b"\x1a\x45\xdf\xa3", None, "video/webm"),
    (bytes(34) + b"LP", b"\x00" * 34 + b"\xff\xff", "application/vnd.ms-fontobject"),
    (b"\x00\x01\x00\x00", None, "font/ttf"),
    (b"OTTO", None, "font/otf"),
    (b"ttcf", None, "font/collection"),
    (b"wOFF", None, "font/woff"),
    (b"wOF2", None, "font/woff2"),
    (b"\x1f\x8b\x08", None, "application/x-gzip"),
    (b"PK\x03\x04", None, "application/zip"),
    (b"Rar!\x1a\x07\x00", None, "application/x-rar-compressed"),
    (b"Rar!\x1a\x07\x01\x00", None, "application/x-rar-compressed"),
    (b"\x00asm", None, "application/wasm"),
)
# bytes that make data binary (the standard's "binary data bytes")
_BINARY = frozenset(range(0x00, 0x09)) | {0x0B} | frozenset(range(0x0E, 0x1B)) | frozenset(range(0x1C, 0x20))
_NOT_BINARY = bytes(b for b in range(256) if b not in _BINARY)


@functools.cache  # one entry per signature of the tables above
def _as_ints(pattern: bytes, mask: bytes) -> tuple[int, int, int]:
    """A masked signature as (length, mask, pattern & mask), big-endian integers: one AND and one
    compare per body instead of a loop over bytes."""
    n = min(len(pattern), len(mask))
    mask_int = int.from_bytes(mask[:n], "big")
    return n, mask_int, int.from_bytes(pattern[:n], "big") & mask_int


def _matches(data: bytes, pattern: bytes, mask: bytes) -> bool:
    """A masked signature (the callers test exact prefixes with `startswith` themselves)."""
    if len(data) < len(pattern):
        return False
    n, mask_int, want = _as_ints(pattern, mask)
    return int.from_bytes(data[:n], "big") & mask_int == want


def _is_mp4(data: bytes) -> bool:
    """An ISO base media file: a first box of type `ftyp` whose brands include one starting with `mp4`."""
    if len(data) < 12:
        return False
    box = int.from_bytes(data[:4], "big")
    if len(data) < box or box % 4 or data[4:8] != b"ftyp":
        return False
    for start in range(8, box, 4):
        if start == 12:
            continue  # the minor version, not a brand
        if data[start:start + 3] == b"mp4":
            return True
    return False


def sniff_content_type(data: bytes) -> str:
    """The Content-Type Go's server would give a body starting with `data` (always a valid type)."""
    data = data[:SNIFF_LEN]
    start = len(data) - len(data.lstrip(_WHITESPACE))
    markup = data[start:]
    upper = markup.upper()
    for marker in _HTML_MARKERS:
        if upper.startswith(marker) and len(markup) > len(marker) and markup[len(marker)] in _TAG_END:
            return "text/html; charset=utf-8"
    if markup.startswith(b"<?xml"):
        return "text/xml; charset=utf-8"
    for pattern, mask, ctype in _SIGNATURES:
        # exact prefixes inline: this runs on every buffered response's first bytes
        if data.startswith(pattern) if mask is None else _matches(data, pattern, mask):
            return ctype
    if _is_mp4(data):
        return "video/mp4"
    for pattern, mask, ctype in _LATE_SIGNATURES:
        if data.startswith(pattern) if mask is None else _matches(data, pattern, mask):
            return ctype
    if not data.translate(None, _NOT_BINARY):  # what is left are binary bytes: none, so text
        return "text/plain; charset=utf-8"
    return "application/octet-stream"

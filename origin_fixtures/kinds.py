"""What each HTTP origin kind answers: `echo`, `stream` and `misbehave` (docs/origins.md).

Every handler is called after the request body was read (and digested) and returns whether the
connection may carry another request.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import trio

from tunnel_lab.origin_fixtures.bodies import body_sha256 as generated_sha256
from tunnel_lab.origin_fixtures.bodies import generate_body
from tunnel_lab.origin_fixtures.conn import BodyInfo, Conn
from tunnel_lab.origin_fixtures.http1 import RequestHead
from tunnel_lab.wire.errors import TunnelLabError

Handler = Callable[[Conn, RequestHead, BodyInfo], Awaitable[bool]]

# Above this, the /large digest is computed in a worker thread so the fixture keeps serving.
THREAD_DIGEST_BYTES = 8 << 20
GZIP_LENGTH_LIMIT = 1 << 20


def echo_document(head: RequestHead, body: BodyInfo) -> dict[str, Any]:
    """The echo origin's JSON answer (docs/architecture.md, "Origin kinds and the echo format")."""
    return {
        "method": head.method.decode("latin-1"),
        "target": head.target.decode("latin-1"),
        "http_version": head.http_version.decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in head.headers],
        "head": head.raw.decode("latin-1"),
        "framing": head.framing.value,
        "body_length": body.length,
        "body_sha256": body.sha256,
        "body": body.prefix.decode("latin-1"),
    }


def _json_body(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc) + "\n").encode("ascii")


async def handle_echo(conn: Conn, head: RequestHead, body: BodyInfo) -> bool:
    """`echo`: 200 with the request as received, as JSON."""
    return await conn.respond(head, 200, [("Content-Type", "application/json")],
                              _json_body(echo_document(head, body)))


# --- parameters ---------------------------------------------------------------------------------


class BadParameter(TunnelLabError, ValueError):
    """A query parameter the fixture cannot use (answered with 400)."""


def _split(head: RequestHead) -> tuple[str, dict[str, str]]:
    parts = urlsplit(head.target.decode("latin-1"))
    return parts.path or "/", dict(parse_qsl(parts.query, keep_blank_values=True))


def seconds(text: str) -> float:
    """A duration: `1.5`, `1.5s`, `250ms`."""
    value = text.strip()
    scale = 1.0
    if value.endswith("ms"):
        value, scale = value[:-2], 0.001
    elif value.endswith("s"):
        value = value[:-1]
    try:
        result = float(value) * scale
    except ValueError:
        raise BadParameter(f"{text!r} is not a duration") from None
    if not 0 <= result <= 86400:
        raise BadParameter(f"{text!r} is out of range")
    return result


def _int(params: dict[str, str], name: str, default: int, lo: int = 0, hi: int = 1 << 40) -> int:
    if name not in params:
        return default
    try:
        value = int(params[name])
    except ValueError:
        raise BadParameter(f"{name}={params[name]!r} is not an integer") from None
    if not lo <= value <= hi:
        raise BadParameter(f"{name}={value} is outside {lo}..{hi}")
    return value


def _secs(params: dict[str, str], name: str, default: float) -> float:
    return seconds(params[name]) if name in params else default


def _flag(params: dict[str, str], name: str) -> bool:
    return params.get(name, "0").lower() in ("1", "true", "yes", "")


def _pattern(label: str, size: int) -> bytes:
    if size <= 0:
        return b""
    unit = label.encode("ascii")
    return (unit * (size // len(unit) + 1))[:size]


# --- stream ---------------------------------------------------------------------------------------


async def _chunked(conn: Conn, head: RequestHead, params: dict[str, str]) -> bool:
    n = _int(params, "n", 5, 0, 1 << 30)
    size = _int(params, "size", 16, 1, 16 << 20)
    interval = _secs(params, "interval", 0.0)
    await conn.send_head(head, 200, [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked")])
    if head.method == b"HEAD":
        return head.keep_alive
    for i in range(n):
        if i and interval:
            await trio.sleep(interval)
        await conn.send_chunk(_pattern(f"chunk {i} ", size - 1) + b"\n")
    await conn.end_chunks()
    return head.keep_alive


async def _sse(conn: Conn, head: RequestHead, params: dict[str, str]) -> bool:
    n = _int(params, "n", 5, 0, 1 << 30)  # 0: until the client goes away
    interval = _secs(params, "interval", 0.1)
    await conn.send_head(head, 200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                                     ("Transfer-Encoding", "chunked")])
    if head.method == b"HEAD":
        return head.keep_alive
    i = 0
    while n == 0 or i < n:
        if i and interval:
            await trio.sleep(interval)
        await conn.send_chunk(b"id: %d\ndata: event %d\n\n" % (i, i))
        i += 1
    await conn.end_chunks()
    return head.keep_alive


TRAILER_PARTS = (b"trailers part 0\n", b"trailers part 1\n", b"trailers part 2\n")


async def _trailers(conn: Conn, head: RequestHead, params: dict[str, str]) -> bool:
    digest = hashlib.sha256(b"".join(TRAILER_PARTS)).hexdigest()
    await conn.send_head(head, 200, [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked"),
                                     ("Trailer", "X-Body-Sha256, X-Trailer-Note")])
    if head.method == b"HEAD":
        return head.keep_alive
    for part in TRAILER_PARTS:
        await conn.send_chunk(part)
    await conn.end_chunks([("X-Body-Sha256", digest), ("X-Trailer-Note", "sent after the body")])
    return head.keep_alive


async def _large(conn: Conn, head: RequestHead, params: dict[str, str]) -> bool:
    nbytes = _int(params, "bytes", 1 << 20)
    seed = _int(params, "seed", 0, -(1 << 63), 1 << 63)
    chunked = _flag(params, "chunked")
    if nbytes > THREAD_DIGEST_BYTES:
        digest = await trio.to_thread.run_sync(generated_sha256, nbytes, seed)
    else:
        digest = generated_sha256(nbytes, seed)
    framing: list[tuple[str | bytes, str | bytes | int]] = (
        [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", nbytes)])
    await conn.send_head(head, 200, [("Content-Type", "application/octet-stream"),
                                     ("X-Body-Sha256", digest), ("X-Body-Seed", seed), *framing])
    if head.method == b"HEAD":
        return head.keep_alive
    for piece in generate_body(nbytes, seed):
        if chunked:
            await conn.send_chunk(piece)
        else:
            await conn.send(piece)
    if chunked:
        await conn.end_chunks()
    return head.keep_alive


def gzip_text(nbytes: int) -> Iterator[bytes]:
    """The uncompressed `/gzip` body: `nbytes` of numbered text lines."""
    left, i = nbytes, 0
    while left > 0:
        block = b"".join(b"line %08d: the quick brown fox jumps over the lazy dog\n" % (i + j)
                         for j in range(512))
        i += 512
        piece = block[:left]
        left -= len(piece)
        yield piece


async def _gzip(conn: Conn, head: RequestHead, params: dict[str, str]) -> bool:
    nbytes = _int(params, "bytes", 4096, 0, 1 << 34)
    plain = hashlib.sha256()
    for piece in gzip_text(nbytes):
        plain.update(piece)
    headers: list[tuple[str | bytes, str | bytes | int]] = [
        ("Content-Type", "text/plain"), ("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding"),
        ("X-Uncompressed-Length", nbytes), ("X-Uncompressed-Sha256", plain.hexdigest())]
    if nbytes <= GZIP_LENGTH_LIMIT:
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
        data = b"".join(compressor.compress(p) for p in gzip_text(nbytes)) + compressor.flush()
        return await conn.respond(head, 200, headers, data)
    await conn.send_head(head, 200, [*headers, ("Transfer-Encoding", "chunked")])
    if head.method == b"HEAD":
        return head.keep_alive
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    for piece in gzip_text(nbytes):
        await conn.send_chunk(compressor.compress(piece))
    await conn.send_chunk(compressor.flush())
    await conn.end_chunks()
    return head.keep_alive


async def _slow(conn: Conn, head: RequestHead, params: dict[str, str]) -> bool:
    delay = _secs(params, "delay", 1.0)
    await trio.sleep(delay)
    return await conn.respond(head, 200, [("Content-Type", "text/plain")], b"slow: waited %g s\n" % delay)


async def _trickle(conn: Conn, head: RequestHead, params: dict[str, str]) -> bool:
    nbytes = _int(params, "bytes", 10, 0, 1 << 20)
    interval = _secs(params, "interval", 0.1)
    chunked = _flag(params, "chunked")
    framing: list[tuple[str | bytes, str | bytes | int]] = (
        [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", nbytes)])
    await conn.send_head(head, 200, [("Content-Type", "text/plain"), *framing])
    if head.method == b"HEAD":
        return head.keep_alive
    data = _pattern("trickle.", nbytes)
    for i in range(nbytes):
        if i and interval:
            await trio.sleep(interval)
        byte = data[i : i + 1]
        await (conn.send_chunk(byte) if chunked else conn.send(byte))
    if chunked:
        await conn.end_chunks()
    return head.keep_alive


async def _status(conn: Conn, head: RequestHead, path: str) -> bool:
    text = path.removeprefix("/status/")
    if not (text.isdigit() and len(text) == 3 and 200 <= int(text) <= 999):
        raise BadParameter(f"/status/{text}: want a status code 200..999")
    status = int(text)
    return await conn.respond(head, status, [("Content-Type", "text/plain")], b"status %d\n" % status)


async def _upload(conn: Conn, head: RequestHead, body: BodyInfo) -> bool:
    doc = {"body_length": body.length, "body_sha256": body.sha256, "framing": head.framing.value}
    return await conn.respond(head, 200, [("Content-Type", "application/json")], _json_body(doc))


STREAM_PATHS = ("/chunked", "/sse", "/trailers", "/large", "/gzip", "/slow", "/trickle", "/status/NNN",
                "/upload")


async def handle_stream(conn: Conn, head: RequestHead, body: BodyInfo) -> bool:
    """`stream`: chunked, SSE, trailers, large, gzip, slow, trickle, status and upload endpoints."""
    path, params = _split(head)
    try:
        if path == "/chunked":
            return await _chunked(conn, head, params)
        if path == "/sse":
            return await _sse(conn, head, params)
        if path == "/trailers":
            return await _trailers(conn, head, params)
        if path == "/large":
            return await _large(conn, head, params)
        if path == "/gzip":
            return await _gzip(conn, head, params)
        if path == "/slow":
            return await _slow(conn, head, params)
        if path == "/trickle":
            return await _trickle(conn, head, params)
        if path.startswith("/status/"):
            return await _status(conn, head, path)
        if path == "/upload":
            return await _upload(conn, head, body)
    except BadParameter as exc:
        return await conn.respond(head, 400, [("Content-Type", "text/plain")], f"{exc}\n".encode())
    return await _index(conn, head, path, STREAM_PATHS)


async def _index(conn: Conn, head: RequestHead, path: str, paths: tuple[str, ...]) -> bool:
    text = f"tunnel-lab {conn.kind} origin; paths: {' '.join(paths)}\n".encode()
    return await conn.respond(head, 200 if path == "/" else 404, [("Content-Type", "text/plain")], text)


# --- misbehave ----------------------------------------------------------------------------------

GARBAGE = b"\x00\x01\x02\x03 this is not HTTP \xff\xfe\xfd\r\n\r\n\x16\x03\x01garbage\n"
MALFORMED_STATUS = b"HTTP/1.1 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


def reset(conn: Conn) -> None:
    """Arrange for the close that follows to send a TCP RST (SO_LINGER on, timeout 0)."""
    conn.socket_stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _wait_for_client_close(conn: Conn) -> None:
    # Whatever the client sends now is ignored; a real server that hangs would not read it either.
    while await conn.stream.receive_some(65536):
        pass


MISBEHAVE_PATHS = ("/malformed-status", "/garbage", "/close-mid-body", "/reset", "/never", "/huge-headers")


async def handle_misbehave(conn: Conn, head: RequestHead, body: BodyInfo) -> bool:
    """`misbehave`: answers no client should accept (each closes the connection afterwards)."""
    path, params = _split(head)
    try:
        if path == "/malformed-status":
            conn.note("malformed status line")
            await conn.send(MALFORMED_STATUS)
            return False
        if path == "/garbage":
            conn.note("garbage bytes")
            await conn.send(GARBAGE)
            return False
        if path == "/close-mid-body":
            total = _int(params, "bytes", 1000, 1)
            sent = _int(params, "sent", min(100, total - 1), 0, total - 1)
            if _flag(params, "chunked"):
                await conn.send_head(head, 200, [("Content-Type", "text/plain"),
                                                 ("Transfer-Encoding", "chunked")], keep_alive=False)
                await conn.send_chunk(_pattern("partial.", total)[:sent])
            else:
                await conn.send_head(head, 200, [("Content-Type", "text/plain"), ("Content-Length", total)],
                                     keep_alive=False)
                await conn.send(_pattern("partial.", sent))
            conn.note(f"closed after {sent} of {total} body bytes")
            return False
        if path == "/reset":
            if params.get("after") == "headers":
                await conn.send_head(head, 200, [("Content-Type", "text/plain"), ("Content-Length", 1000)],
                                     keep_alive=False)
                await conn.send(_pattern("partial.", 10))
                conn.note("reset after the headers")
            else:
                conn.note("reset before any answer")
            reset(conn)
            return False
        if path == "/never":
            conn.note("never answered")
            await _wait_for_client_close(conn)
            return False
        if path == "/huge-headers":
            total = _int(params, "bytes", 256 << 10, 0, 64 << 20)
            line = _int(params, "line", 4096, 16, 1 << 20)
            headers: list[tuple[str | bytes, str | bytes | int]] = []
            left, i = total, 0
            while left > 0:
                value = _pattern("h", min(line, left))
                headers.append((f"X-Huge-{i}", value))
                left -= len(value)
                i += 1
            conn.note(f"{total} bytes of header values in {i} headers")
            return await conn.respond(head, 200, [*headers, ("Content-Type", "text/plain")], b"huge\n",
                                      keep_alive=False)
    except BadParameter as exc:
        return await conn.respond(head, 400, [("Content-Type", "text/plain")], f"{exc}\n".encode())
    return await _index(conn, head, path, MISBEHAVE_PATHS)

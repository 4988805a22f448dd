"""When response bytes leave the connector: cloudflared's flush rule and Go's 4 KiB response buffer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire.origin import HANDLER_BUFFER_SIZE, ResponseBuffer, streams_response


@pytest.mark.parametrize(
    ("headers", "streamed"),
    [
        ([(b"Content-Length", b"8"), (b"Content-Type", b"text/plain")], False),
        ([(b"content-length", b"0")], False),
        ([(b"Content-Type", b"text/plain")], True),  # no length: a stream
        ([(b"Content-Length", b"8"), (b"Transfer-Encoding", b"Chunked")], True),
        ([(b"Content-Length", b"8"), (b"Content-Type", b"text/event-stream; charset=utf-8")], True),
        ([(b"Content-Length", b"8"), (b"Content-Type", b"Application/GRPC+proto")], True),
        ([(b"Content-Length", b"8"), (b"Content-Type", b"application/x-ndjson")], True),
        ([(b"Content-Length", b"8"), (b"Content-Type", b"application/json")], False),
        ([(b"Content-Length", b"8"), (b"Content-Type", b"text/html; x=text/event-stream")], False),
    ],
)
def test_streams_response_is_cloudflareds_flush_rule(headers: list[tuple[bytes, bytes]],
                                                     streamed: bool) -> None:
    assert streams_response(headers) is streamed


def test_a_trickled_body_stays_until_the_end() -> None:
    buffer = ResponseBuffer(streamed=False)
    assert buffer.headers_held
    assert [buffer.write(b"x") for _ in range(8)] == [b""] * 8
    assert buffer.headers_held  # nothing left: the HEADERS wait too
    assert buffer.finish() == b"x" * 8


def test_a_full_buffer_leaves_and_takes_the_headers_with_it() -> None:
    buffer = ResponseBuffer(streamed=False)
    assert buffer.write(b"a" * 4000) == b""
    out = buffer.write(b"b" * 200)
    assert out == b"a" * 4000 + b"b" * 96
    assert not buffer.headers_held
    assert buffer.finish() == b"b" * 104


def test_a_big_write_into_an_empty_buffer_passes_straight_through() -> None:
    buffer = ResponseBuffer(streamed=False)
    big = bytes(range(256)) * 64  # 16 KiB
    assert buffer.write(big) == big
    assert buffer.finish() == b""


def test_origin_reads_are_written_16_kib_at_a_time_as_cfio_copy_does() -> None:
    buffer = ResponseBuffer(streamed=False)
    data = bytes(range(256)) * 80  # 20480 bytes in one origin read
    assert buffer.write(data) == data[:16384]  # the rest is a 4096-byte write: it fits the buffer
    assert buffer.finish() == data[16384:]


def test_exactly_one_buffer_stays_until_the_next_write() -> None:
    buffer = ResponseBuffer(streamed=False)
    assert buffer.write(b"a" * HANDLER_BUFFER_SIZE) == b""  # bufio: fits the buffer, so it is buffered
    assert buffer.write(b"b") == b"a" * HANDLER_BUFFER_SIZE
    assert buffer.finish() == b"b"


def test_streamed_responses_pass_every_write_at_once() -> None:
    buffer = ResponseBuffer(streamed=True)
    assert not buffer.headers_held
    assert buffer.write(b"x") == b"x"
    assert buffer.finish() == b""


def bufio_model(writes: list[bytes], size: int) -> list[bytes]:
    """Go's bufio.Writer.Write, transcribed loop for loop, returning what reaches the writer beneath."""
    buf = b""
    out: list[bytes] = []
    for p in writes:
        while len(p) > size - len(buf):
            if not buf:
                out.append(p)  # large write, empty buffer: write directly
                p = b""
            else:
                n = size - len(buf)
                buf += p[:n]
                p = p[n:]
                out.append(buf)
                buf = b""
        buf += p
        out.append(b"")  # marks the end of one Write call
    out.append(buf)
    return out


def slices(data: bytes, copy_size: int) -> list[bytes]:
    """cfio.Copy's writes for one origin read: at most copy_size bytes each (an empty read, one empty)."""
    return [data[i:i + copy_size] for i in range(0, len(data), copy_size)] or [b""]


def expected(writes: list[bytes], size: int, copy_size: int) -> list[bytes]:
    """What the model says leaves per origin read, then at the end."""
    calls = [piece for w in writes for piece in slices(w, copy_size)]
    flat = bufio_model(calls, size)
    per_call: list[bytes] = []
    current = b""
    for piece in flat[:-1]:
        if piece == b"":
            per_call.append(current)
            current = b""
        else:
            current += piece
    out, i = [], 0
    for w in writes:
        n = len(slices(w, copy_size))
        out.append(b"".join(per_call[i:i + n]))
        i += n
    return [*out, flat[-1]]


@given(writes=st.lists(st.binary(max_size=300), max_size=40), size=st.integers(1, 256),
       copy_size=st.integers(1, 400))
def test_the_buffer_behaves_as_bufio_and_loses_nothing(writes: list[bytes], size: int,
                                                       copy_size: int) -> None:
    buffer = ResponseBuffer(streamed=False, size=size, copy_size=copy_size)
    got = [buffer.write(w) for w in writes] + [buffer.finish()]
    assert got == expected(writes, size, copy_size)
    assert b"".join(got) == b"".join(writes)
    assert buffer.headers_held == (not any(got[:-1]))

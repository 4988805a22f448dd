"""transport.h11body writes h11's private Content-Length reader: pinned here.

If h11 renames `Connection._reader`, `ContentLengthReader` or its `_remaining`, the fast path silently
turns itself off (`body_bytes_left` is 0): the first test fails then. The others check that skipping
bytes keeps h11's count exact, so the message still ends where it should and what follows stays h11's.
"""

from __future__ import annotations

import h11
import pytest

from tunnel_lab.transport.h11body import body_bytes_left, skip_body_bytes

HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n"


def _server_after_head() -> h11.Connection:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(HEAD)
    assert isinstance(conn.next_event(), h11.Request)
    assert conn.next_event() is h11.NEED_DATA
    return conn


def test_h11_still_has_the_reader_we_count_in() -> None:
    from h11 import _readers

    conn = _server_after_head()
    reader = conn._reader  # type: ignore[attr-defined]
    assert type(reader) is _readers.ContentLengthReader
    assert reader._remaining == 10
    assert body_bytes_left(conn) == 10


def test_skipped_bytes_are_counted_and_h11_ends_the_message() -> None:
    conn = _server_after_head()
    assert skip_body_bytes(conn, b"0123", 10)
    assert body_bytes_left(conn) == 6
    assert not skip_body_bytes(conn, b"456789GET", 6)  # the end, with a pipelined request after it
    conn.receive_data(b"456789GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert conn.next_event() == h11.Data(data=b"456789")
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    assert conn.trailing_data[0].startswith(b"GET / HTTP/1.1")  # the pipelined bytes stayed h11's


@pytest.mark.parametrize("data", [b"", b"0123456789"])
def test_eof_and_the_last_bytes_go_through_h11(data: bytes) -> None:
    conn = _server_after_head()
    assert not skip_body_bytes(conn, data, 10)
    assert body_bytes_left(conn) == 10


def test_no_fast_path_while_h11_holds_bytes_or_outside_a_length_body() -> None:
    conn = _server_after_head()
    conn.receive_data(b"01")  # buffered in h11: those must come out of h11 first
    assert body_bytes_left(conn) == 0
    chunked = h11.Connection(h11.SERVER)
    chunked.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunked.next_event()
    assert body_bytes_left(chunked) == 0
    assert body_bytes_left(h11.Connection(h11.SERVER)) == 0  # no request yet

"""The Content-Length body fast path around h11's receive buffer.

h11 copies every received byte about four times on its way through `receive_data` / `next_event`. For a
Content-Length body whose bytes h11 does not hold yet, the reader may take body bytes past h11 and tell
it how many it took: `body_bytes_left` says how many may come that way, `skip_body_bytes` keeps h11's
count. The body's last bytes (and anything pipelined after them) still go through `receive_data`, so
h11 itself reports the end of the message and keeps the bytes that follow.

This writes h11's private `Connection._reader` (a `h11._readers.ContentLengthReader`) and its
`_remaining`; tests/unit/test_transport_h11body.py pins both, and pyproject bounds h11. With another h11
layout `body_bytes_left` is always 0: the plain path, slower but correct.
"""

from __future__ import annotations

from typing import Any

import h11

try:
    from h11 import _readers as _h11_readers

    _ContentLengthReader: Any = _h11_readers.ContentLengthReader
except (ImportError, AttributeError):  # pragma: no cover - another h11 layout: always the plain path
    _ContentLengthReader = None


def body_bytes_left(conn: h11.Connection) -> int:
    """Bytes of the peer's Content-Length body still to come when h11 holds none of them, else 0."""
    reader: Any = getattr(conn, "_reader", None)
    if (_ContentLengthReader is None or type(reader) is not _ContentLengthReader
            or conn.their_state is not h11.SEND_BODY or conn.trailing_data != (b"", False)):
        return 0
    return int(reader._remaining)


def skip_body_bytes(conn: h11.Connection, data: bytes, left: int) -> bool:
    """Count `data` (just read, `left` from `body_bytes_left`) as body bytes h11 did not see.

    True when it was counted: the caller hands `data` on as body. False when it holds the body's end
    (or is the EOF `b""`): the caller feeds it to `conn.receive_data` instead, as usual."""
    if not data or len(data) >= left:
        return False
    reader: Any = getattr(conn, "_reader")  # noqa: B009 - private: typed Any on purpose
    reader._remaining = left - len(data)
    return True

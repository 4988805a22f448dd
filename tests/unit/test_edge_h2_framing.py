"""The edge's own DATA framing (straight into h2's buffer) gives exactly the bytes h2 itself would."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from hypothesis import given
from hypothesis import strategies as st

from edge.h2conn import EdgeH2Connection

REQUEST = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a.test")]

sends = st.lists(st.tuples(st.binary(max_size=3000), st.booleans(), st.integers(0, 4), st.booleans()),
                 min_size=1, max_size=6)


def _wire(cls: type[H2Connection], plan: list[tuple[bytes, bool, int, bool]]) -> bytes:
    conn = cls(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    out = bytes(conn.data_to_send())
    for index, (data, as_view, pad, end) in enumerate(plan):
        stream_id = 1 + 2 * index
        conn.send_headers(stream_id, REQUEST)
        payload = memoryview(b"<" + data + b">")[1:-1] if as_view else data
        conn.send_data(stream_id, payload, end_stream=end, pad_length=pad or None)
        out += bytes(conn.data_to_send())
    return out


@given(sends)
def test_data_frames_are_byte_identical_to_h2s(plan):
    assert _wire(EdgeH2Connection, plan) == _wire(H2Connection, plan)


def test_data_to_send_hands_over_and_empties_the_buffer():
    conn = EdgeH2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    first = conn.data_to_send()
    assert first.startswith(b"PRI * HTTP/2.0")
    assert conn.data_to_send() == b""
    assert not conn.has_data_to_send()

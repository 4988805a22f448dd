"""qh3 behaviour edge/quic.py works around or relies on, pinned: a failure here means qh3 changed and the
workaround (named in each test) must be looked at again."""

from __future__ import annotations

from typing import Any

from qh3._hazmat import QuicStreamSender
from qh3.quic.stream import QuicStream

from tunnel_lab.transport.qh3 import hold_unsent


def test_a_reset_sender_still_offers_data_past_its_final_size() -> None:
    # transport.qh3.hold_unsent: qh3 1.9.4 announces the bytes sent so far as the final size and would
    # then send the rest of its buffer.
    sender = QuicStreamSender(stream_id=1, writable=True)
    sender.write(b"x" * 552)
    first = sender.get_frame(200)
    assert first is not None and len(first[0]) == 200
    sender.reset(8)
    assert sender.get_reset_frame() == (8, 200, 1)
    more = sender.get_frame(2000)
    assert more is not None and more[2] == 200  # data at offset 200, past the final size 200


def test_holding_marks_the_stream_blocked_which_the_packet_builder_skips() -> None:
    stream = QuicStream(stream_id=1, max_stream_data_local=1000, max_stream_data_remote=1000)
    assert stream.is_blocked is False
    hold_unsent(stream)
    assert stream.is_blocked is True


def test_a_sender_finished_with_fin_resets_with_the_full_size() -> None:
    # edge.quic._stop resets streams qh3 still holds; after a FIN the final size stays the FIN's.
    sender = QuicStreamSender(stream_id=1, writable=True)
    sender.write(b"x" * 552, end_stream=True)
    assert sender.get_frame(2000) is not None
    sender.reset(8)
    assert sender.get_reset_frame() == (8, 552, 1)


def test_a_connection_keeps_the_peer_certificate_on_its_tls_context() -> None:
    # transport.qh3.peer_certificate: connector/quic_conn.py words a failed verification from it.
    from qh3.quic.configuration import QuicConfiguration
    from qh3.quic.connection import QuicConnection

    from tunnel_lab.transport.qh3 import peer_certificate

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, server_name="quic.cftunnel.com"))
    quic.connect(("127.0.0.1", 7844), now=0.0)
    assert hasattr(quic.tls, "_peer_certificate")
    assert peer_certificate(quic) is None  # nothing received yet
    quic.tls._peer_certificate = marker = object()
    assert peer_certificate(quic) is marker


def test_a_connection_keeps_its_streams_by_id() -> None:
    # transport.qh3.stream_state: both QUIC shells read a stream's sender through it.
    from qh3.quic.configuration import QuicConfiguration
    from qh3.quic.connection import QuicConnection

    from tunnel_lab.transport.qh3 import stream_state

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, server_name="quic.cftunnel.com"))
    quic.connect(("127.0.0.1", 7844), now=0.0)
    stream_id = quic.get_next_available_stream_id()
    assert stream_state(quic, stream_id) is None
    quic.send_stream_data(stream_id, b"x")
    state = stream_state(quic, stream_id)
    assert state is not None and state.sender.next_offset == 0 and not state.sender.is_finished


def test_the_header_parser_reads_a_client_initial_as_the_edge_expects() -> None:
    # transport.qh3.pull_quic_header: edge/quic.py routes datagrams by what it returns.
    import pytest
    from qh3.quic.configuration import QuicConfiguration
    from qh3.quic.connection import QuicConnection
    from qh3.quic.packet import QuicPacketType

    from tunnel_lab.transport.qh3 import pull_quic_header

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, server_name="quic.cftunnel.com"))
    quic.connect(("127.0.0.1", 7844), now=0.0)
    (data, _), *_ = quic.datagrams_to_send(now=0.0)
    header = pull_quic_header(data, 0, 8)
    assert header[0] == quic._version  # the version it offers
    assert header[1] == QuicPacketType.INITIAL
    assert header[3] == quic._peer_cid.cid and header[4] == quic.host_cid
    with pytest.raises(ValueError):
        pull_quic_header(b"\x00", 0, 8)


def test_qh3_credits_a_stream_by_delivery_and_the_override_takes_over_its_records(tmp_path: Any) -> None:
    # transport.qh3.CreditConnection: a plain qh3 server that never reads still receives everything (its
    # windows double as data is delivered), through the two records the override replaces: the
    # connection's `_local_max_data` (a Limit whose `value` the packet writer doubles) and each stream's
    # `max_stream_data_local` slot; and it sees data and resets through the frame handlers it wraps.
    import os

    from qh3.quic.connection import Limit, QuicConnection
    from qh3.quic.stream import QuicStream

    from tests.unit.test_transport_qh3_credit import STREAM_WINDOW, Pair

    assert type(QuicStream.__dict__["max_stream_data_local"]).__name__ == "member_descriptor"
    for name in ("_get_or_create_stream", "_get_or_create_stream_for_send", "_handle_stream_frame",
                 "_handle_reset_stream_frame"):
        assert callable(getattr(QuicConnection, name))
    pair = Pair(tmp_path, QuicConnection)
    assert type(pair.server._local_max_data) is Limit
    assert isinstance(pair.server._streams_dirty_limits, set)
    pair.client.send_stream_data(0, os.urandom(8 * STREAM_WINDOW), end_stream=True)
    pair.pump()
    assert pair.ended and len(pair.received) == 8 * STREAM_WINDOW
    assert pair.server._streams[0].max_stream_data_local > STREAM_WINDOW  # grown by qh3 itself


def test_a_retransmitted_fin_is_delivered_again() -> None:
    # A frame that arrives again after the FIN (a retransmission under load) gives a second end_stream
    # event: a peer must act on a stream's end once (connector/quic_transport.py ignores data for
    # forgotten streams; the scripted connector of tests/component/test_edge_quic.py answers once).
    stream = QuicStream(stream_id=1, max_stream_data_local=1000, max_stream_data_remote=1000)
    first = stream.receiver.handle_frame(0, b"abc", True)
    again = stream.receiver.handle_frame(3, b"", True)
    assert first is not None and first.end_stream
    assert again is not None and again.end_stream and again.data == b""

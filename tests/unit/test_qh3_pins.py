"""qh3 behaviour edge/quic.py works around or relies on, pinned: a failure here means qh3 changed and the
workaround (named in each test) must be looked at again."""

from __future__ import annotations

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

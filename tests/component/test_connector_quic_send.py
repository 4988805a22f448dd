"""connector.quic_transport: a writer waits while qh3 holds more than SEND_HIGH_WATER unsent bytes."""

from __future__ import annotations

import trio
import trio.testing
from qh3._hazmat import QuicStreamSender
from qh3.quic.configuration import QuicConfiguration

from tunnel_lab.connector.quic_transport import SEND_HIGH_WATER, QuicTransport

CHUNK = 64 * 1024


def test_qh3_highest_offset_counts_only_what_was_sent() -> None:
    # pinned: why QuicStream counts `written` itself; with highest_offset the writer never waited and a
    # 256 MiB download grew our connector by 273 MB (issue 16 target 7)
    sender = QuicStreamSender(stream_id=1, writable=True)
    sender.write(b"x" * 100_000)
    assert sender.highest_offset == 0
    assert sender.get_frame(1200) is not None
    assert sender.highest_offset == sender.next_offset == 1200


async def test_a_writer_waits_while_nothing_can_be_sent() -> None:
    # Before the handshake qh3 sends no stream data: everything written stays unsent, as when the edge's
    # flow-control credit is used up. The writer must stop at the high-water mark, not buffer the body.
    transport = QuicTransport(QuicConfiguration(is_client=True, alpn_protocols=["argotunnel"]),
                              ("127.0.0.1", 9), keepalive=None)
    stream = transport.open_stream()
    accepted = 0

    async def writer() -> None:
        nonlocal accepted
        for _ in range(64):  # 4 MiB
            await stream.send_all(b"x" * CHUNK)
            accepted += CHUNK

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            # the call that crossed the mark queued its chunk and waits
            assert accepted == SEND_HIGH_WATER
            assert transport.unsent(stream) == accepted + CHUNK
            nursery.cancel_scope.cancel()

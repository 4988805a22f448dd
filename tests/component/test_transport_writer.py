"""transport.writer.H2Writer: one writer task, coalesced writes, backpressure, whole writes, write timeout."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from h2.config import H2Configuration

from tunnel_lab.transport.h2 import TunnelH2Connection
from tunnel_lab.transport.writer import H2Writer, WriteStalled


def _queued_conn() -> TunnelH2Connection:
    conn = TunnelH2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()  # the preface and SETTINGS: something queued
    return conn


class _CountingStream(trio.abc.SendStream):
    """A send stream that records each `send_all` (and can be held shut)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.open = trio.Event()
        self.open.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.open.wait()
        self.writes.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_peer_that_does_not_read_stalls_the_write(autojump_clock: trio.abc.Clock) -> None:
    ours, _theirs = trio.testing.lockstep_stream_pair()
    writer = H2Writer(_queued_conn(), ours, write_timeout=5)
    writer.wake()
    with pytest.raises(WriteStalled, match="did not read for 5s"):
        await writer.run()
    assert writer.closed and not writer.intact
    assert writer.take_remaining() == b""  # a write cut short: nothing more may follow it
    with pytest.raises(trio.BrokenResourceError):
        await writer.flush()


async def test_flush_returns_once_written_and_pushes_coalesce() -> None:
    conn = _queued_conn()
    out = _CountingStream()
    writer = H2Writer(conn, out)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await writer.flush()
            assert len(out.writes) == 1  # the preface, written before flush returned
            # Three streams' frames queued and pushed before the writer runs: one write.
            for stream_id in (1, 3, 5):
                conn.send_headers(stream_id, [(b":method", b"GET"), (b":path", b"/"),
                                              (b":scheme", b"https"), (b":authority", b"a")],
                                  end_stream=True)
                await writer.push()
            assert len(out.writes) == 1  # push does not wait
            await writer.flush()
            assert len(out.writes) == 2
            nursery.cancel_scope.cancel()


async def test_push_waits_for_the_socket_once_enough_is_queued() -> None:
    conn = _queued_conn()
    out = _CountingStream()
    out.open = trio.Event()  # the socket takes nothing yet
    writer = H2Writer(conn, out, push_wait=100)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await writer.push(50)  # below push_wait: returns at once
            done = trio.Event()

            async def big_push() -> None:
                await writer.push(60)  # 110 queued: waits until written
                done.set()

            nursery.start_soon(big_push)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            out.open.set()
            await done.wait()
            assert out.writes
            nursery.cancel_scope.cancel()


async def test_a_cancelled_caller_does_not_cut_the_write_short() -> None:
    ours, theirs = trio.testing.lockstep_stream_pair()
    conn = _queued_conn()
    writer = H2Writer(conn, ours, write_timeout=60)
    expected = bytes(conn.data_to_send())
    conn.initiate_connection()  # the same bytes queued again
    caller = trio.CancelScope()

    async def flush() -> None:
        with caller:
            await writer.flush()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            nursery.start_soon(flush)
            await trio.testing.wait_all_tasks_blocked()  # the writer is in send_all: nobody reads
            assert not writer.intact
            caller.cancel()
            await trio.testing.wait_all_tasks_blocked()
            got = b""
            while len(got) < len(expected):
                got += await theirs.receive_some()
            await trio.testing.wait_all_tasks_blocked()
            assert writer.intact  # the write went on without its caller
            nursery.cancel_scope.cancel()
    assert got == expected  # whole, nothing cut off


async def test_waiters_fail_when_the_writer_ends() -> None:
    out = _CountingStream()
    out.open = trio.Event()
    writer = H2Writer(_queued_conn(), out)
    failed = trio.Event()

    async def flush() -> None:
        with pytest.raises(trio.BrokenResourceError):
            await writer.flush()
        failed.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            runner = trio.CancelScope()

            async def run() -> None:
                with runner:
                    await writer.run()

            nursery.start_soon(run)
            nursery.start_soon(flush)
            await trio.testing.wait_all_tasks_blocked()
            runner.cancel()  # the connection closing: the write in progress is abandoned
            await failed.wait()
    assert writer.closed and writer.take_remaining() == b""


async def test_nothing_queued_writes_nothing() -> None:
    conn = _queued_conn()
    conn.data_to_send()
    ours, _theirs = trio.testing.lockstep_stream_pair()
    with trio.fail_after(5):
        await H2Writer(conn, ours, write_timeout=60).flush()  # no writer task: would block if it waited

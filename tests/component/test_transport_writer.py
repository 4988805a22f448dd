"""transport.writer.H2Writer: whole writes, shielded from the caller, bounded by the write timeout."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from h2.config import H2Configuration

from transport.h2 import TunnelH2Connection
from transport.writer import H2Writer, WriteStalled


def _queued_conn() -> TunnelH2Connection:
    conn = TunnelH2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()  # the preface and SETTINGS: something queued
    return conn


async def test_a_peer_that_does_not_read_stalls_the_write(autojump_clock: trio.abc.Clock) -> None:
    ours, _theirs = trio.testing.lockstep_stream_pair()
    writer = H2Writer(_queued_conn(), ours, write_timeout=5)
    with pytest.raises(WriteStalled, match="did not read for 5s"):
        await writer.flush()


async def test_a_cancelled_caller_does_not_cut_the_write_short() -> None:
    ours, theirs = trio.testing.lockstep_stream_pair()
    conn = _queued_conn()
    writer = H2Writer(conn, ours, write_timeout=60)
    expected = bytes(conn.data_to_send())
    conn.initiate_connection()  # the same bytes queued again
    finished = trio.Event()
    caller = trio.CancelScope()

    async def flush() -> None:
        with caller:
            await writer.flush()
        finished.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush)
            await trio.testing.wait_all_tasks_blocked()  # blocked in send_all: nobody reads
            caller.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert not finished.is_set()  # the write goes on, shielded
            got = b""
            while len(got) < len(expected):
                got += await theirs.receive_some()
            await finished.wait()
    assert got == expected  # whole, nothing cut off


async def test_nothing_queued_writes_nothing() -> None:
    conn = _queued_conn()
    conn.data_to_send()
    ours, _theirs = trio.testing.lockstep_stream_pair()
    with trio.fail_after(5):
        await H2Writer(conn, ours, write_timeout=60).flush()  # would block if it wrote

"""transport.pipe: the one byte pipe's rules (EOF, quiet errors, which end ends the pipe, linger)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tunnel_lab.transport.pipe import PipeDone, Way, pipe, prepend, receive_acked


def _source(*chunks: bytes) -> trio.MemoryReceiveChannel[bytes]:
    send, receive = trio.open_memory_channel[bytes](len(chunks) + 1)
    for chunk in chunks:
        send.send_nowait(chunk)
    return receive


async def test_each_eof_becomes_the_other_sides_end_and_both_finish() -> None:
    a = _source(b"a1", b"a2", b"")
    b = _source(b"b1", b"")
    got_a, got_b, events = [], [], []

    async def b_eof() -> None:
        events.append("b ended")

    with trio.fail_after(5):
        await pipe(Way(a.receive, _append(got_a), at_eof=lambda: _note(events, "a ended"), ends_pipe=False),
                   Way(b.receive, _append(got_b), at_eof=b_eof, ends_pipe=False))
    assert got_a == [b"a1", b"a2"] and got_b == [b"b1"]
    assert sorted(events) == ["a ended", "b ended"]


async def test_a_way_that_ends_the_pipe_cancels_the_other() -> None:
    never_send, never = trio.open_memory_channel[bytes](0)
    with trio.fail_after(5):
        await pipe(Way(never.receive, _append([])), Way(_source(b"").receive, _append([])))
    never_send.close()


async def test_linger_lets_the_other_way_finish_first(autojump_clock: trio.abc.Clock) -> None:
    late_send, late = trio.open_memory_channel[bytes](1)
    got: list[bytes] = []

    async def finish_later() -> None:
        await trio.sleep(3)
        late_send.send_nowait(b"last")
        await trio.sleep(1)
        late_send.send_nowait(b"")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_later)
        await pipe(Way(_source(b"").receive, _append([]), linger=10),
                   Way(late.receive, _append(got), ends_pipe=False))
    assert got == [b"last"]


async def test_a_quiet_error_ends_its_way_and_others_propagate() -> None:
    async def broken() -> bytes:
        raise ConnectionResetError("gone")

    got: list[bytes] = []
    with trio.fail_after(5):
        await pipe(Way(broken, _append([]), quiet=(ConnectionResetError,), error_ends_pipe=False),
                   Way(_source(b"x", b"").receive, _append(got)))
    assert got == [b"x"]

    async def done() -> bytes:
        raise PipeDone

    never_send, never = trio.open_memory_channel[bytes](0)
    with trio.fail_after(5):
        await pipe(Way(done, _append([])), Way(never.receive, _append([])))  # PipeDone is always quiet
    with pytest.RaisesGroup(ConnectionResetError), trio.fail_after(5):
        await pipe(Way(broken, _append([])), Way(never.receive, _append([])))
    never_send.close()


async def test_prepend_hands_out_the_leftover_first() -> None:
    receive = prepend(b"head", _source(b"rest").receive)
    assert [await receive(), await receive()] == [b"head", b"rest"]
    assert await prepend(b"", _source(b"only").receive)() == b"only"


class _Stream:
    def __init__(self, *items: tuple[bytes, int]) -> None:
        self.items = list(items)
        self.log: list[str] = []

    async def receive(self) -> tuple[bytes, int] | None:
        item = self.items.pop(0) if self.items else None
        self.log.append(f"receive {item[0]!r}" if item else "end")
        return item

    async def ack(self, length: int) -> None:
        self.log.append(f"ack {length}")


async def test_receive_acked_gives_the_window_back_once_handed_on() -> None:
    stream = _Stream((b"a", 10), (b"", 5), (b"b", 1))
    receive = receive_acked(stream)  # type: ignore[arg-type]
    assert await receive() == b"a"
    assert stream.log == ["receive b'a'"]  # not acknowledged yet: the caller still holds it
    assert await receive() == b"b"
    assert await receive() == b""
    assert stream.log == ["receive b'a'", "ack 10", "receive b''", "ack 5", "receive b'b'", "ack 1", "end"]


def _append(into: list[bytes]):  # type: ignore[no-untyped-def]
    async def send(data: bytes) -> None:
        into.append(data)

    return send


async def _note(events: list[str], what: str) -> None:
    events.append(what)

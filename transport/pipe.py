"""The one byte pipe: copy bytes both ways between two endpoints until the pipe is done.

Every relay of the project is two `Way`s run by `pipe`: the edge's WebSocket relay (eyeball <-> tunnel
stream, edge/proxy.py), the CONNECT proxy (client socket <-> tunnel stream, edge/warp.py), the
connector's stream pipes (tunnel stream <-> origin, connector/streams.py) and `access tcp` (local socket
<-> WebSocket to the edge, connector/access.py). What differs between them is data on the `Way`: what an
EOF becomes on the other side, which errors end a way quietly, whether the end of one way ends the
pipe, and how long the other way may still finish (a half-close).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from tunnel_lab.transport.tunnel import TunnelStream
from tunnel_lab.wire.errors import TunnelLabError

Receive = Callable[[], Awaitable[bytes]]


class PipeDone(TunnelLabError):
    """Raised by a way's `receive` or `send` when its side has finished (a WebSocket close, a reset)."""


@dataclass(frozen=True)
class Way:
    """One direction of a pipe: `receive` (b"" at EOF) -> `send`, until EOF or an error.

    `at_eof`: what the EOF becomes (an END_STREAM, a TCP half-close). `quiet`: errors that end this way
    without ending the pipe's caller (`PipeDone` always is). `ends_pipe`: a clean end cancels the other
    way, after letting it finish for up to `linger` seconds. `error_ends_pipe`: so does a quiet error.
    Errors not quiet propagate (and cancel the other way)."""

    receive: Receive
    send: Callable[[bytes], Awaitable[None]]
    at_eof: Callable[[], Awaitable[object]] | None = None
    quiet: tuple[type[BaseException], ...] = ()
    ends_pipe: bool = True
    error_ends_pipe: bool = True
    linger: float = 0.0


async def pipe(one: Way, other: Way) -> None:
    """Run both ways until each has ended, or one that ends the pipe has."""
    async with trio.open_nursery() as nursery:
        one_done, other_done = trio.Event(), trio.Event()
        nursery.start_soon(_run, one, one_done, other_done, nursery.cancel_scope)
        nursery.start_soon(_run, other, other_done, one_done, nursery.cancel_scope)


async def _run(way: Way, done: trio.Event, other_done: trio.Event, scope: trio.CancelScope) -> None:
    quiet: tuple[type[BaseException], ...] = (PipeDone, *way.quiet)
    try:
        try:
            while True:
                data = await way.receive()
                if not data:
                    break
                await way.send(data)
            if way.at_eof is not None:
                await way.at_eof()
        except quiet:
            ends = way.error_ends_pipe
        else:
            ends = way.ends_pipe
            if ends and way.linger:
                with trio.move_on_after(way.linger):
                    await other_done.wait()
    finally:
        done.set()
    if ends:
        scope.cancel()


def prepend(first: bytes, receive: Receive) -> Receive:
    """`receive` with `first` (bytes already read, e.g. after a request head) handed out before it."""
    pending = [first] if first else []

    async def receive_first() -> bytes:
        if pending:
            return pending.pop()
        return await receive()

    return receive_first


def receive_acked(stream: TunnelStream) -> Receive:
    """The response body of an edge tunnel stream as a `receive`, each chunk's flow-control window
    given back when the next one is asked for, i.e. once the chunk was handed on (backpressure)."""
    unacked = 0

    async def receive() -> bytes:
        nonlocal unacked
        while True:
            if unacked:
                length, unacked = unacked, 0
                await stream.ack(length)
            item = await stream.receive()
            if item is None:
                return b""
            data, unacked = item
            if data:
                return data

    return receive

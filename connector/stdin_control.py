"""`--stdin-control` (docs/protocol.md §9.7): commands read line by line from stdin.

`reconnect [DURATION]` drops one edge connection, which reconnects after DURATION (a Go duration, default 0)
without any backoff; an empty line is ignored; anything else is logged as a warning with the list of
supported commands. `parse_command` is the sans-I/O part; `stdin_control` the trio loop.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Protocol

import trio

from tunnel_lab.connector.config import parse_go_duration
from tunnel_lab.connector.logging_setup import format_value as q

log = logging.getLogger(__name__)

HELP = ("Supported command: reconnect [delay] - restarts one connection with an optional delay before "
        "reconnecting")
MAX_LINE = 4096
RETRY_INTERVAL = 0.05  # while no connection is serving, a reconnect waits for one


@dataclass(frozen=True)
class Reconnect:
    delay: float  # seconds


@dataclass(frozen=True)
class Unknown:
    command: str


@dataclass(frozen=True)
class BadArgument:
    command: str
    error: str


Command = Reconnect | Unknown | BadArgument | None


def parse_command(line: str) -> Command:
    """One stdin line -> a command (None for an empty line or `help`)."""
    text = line.rstrip("\r\n")
    name, _, arg = text.partition(" ")
    if name == "":
        return None
    if name == "reconnect":
        if not arg:
            return Reconnect(0.0)
        try:
            delay = parse_go_duration(arg)
        except ValueError as exc:
            return BadArgument(text, f"time: invalid duration {arg!r}: {exc}")
        return Reconnect(max(delay, 0.0))
    if name == "help":
        return None
    return Unknown(text)


class Reconnector(Protocol):
    shutdown: trio.Event

    def reconnect(self, delay: float) -> int | None: ...


async def stdin_control(supervisor: Reconnector, source: trio.abc.ReceiveStream | None = None) -> None:
    """Read commands from `source` (default: the process's stdin) until it ends or the tunnel shuts down."""
    if source is None:
        source = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with source:
        while not supervisor.shutdown.is_set():
            chunk = await source.receive_some(MAX_LINE)
            if not chunk:
                log.debug("stdin control: end of input")
                return
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                await _run(supervisor, parse_command(raw.decode("utf-8", "replace")))
            if len(buffer) > MAX_LINE:
                log.warning("stdin control: line longer than %d bytes ignored", MAX_LINE)
                buffer = b""


async def _run(supervisor: Reconnector, command: Command) -> None:
    if command is None:
        return
    if isinstance(command, Unknown):
        log.warning("Unknown command command=%s", q(command.command))
        log.info("%s", HELP)
    elif isinstance(command, BadArgument):
        log.error("Invalid stdin command command=%s error=%s", q(command.command), q(command.error))
    else:
        log.info("Sending reconnect signal delay=%gs", command.delay)
        while not supervisor.shutdown.is_set():  # like cloudflared's unbuffered channel: wait for a taker
            index = supervisor.reconnect(command.delay)
            if index is not None:
                log.info("Reconnect signal taken connIndex=%d", index)
                return
            await trio.sleep(RETRY_INTERVAL)

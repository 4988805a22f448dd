"""`--stdin-control` (docs/protocol.md §9.7): commands read line by line from stdin.

`reconnect [DURATION]` drops one edge connection, which reconnects after DURATION (a Go duration, default 0)
and the per-connIndex backoff; an empty line is ignored; `help` logs the supported commands, and so does
anything else after an `Unknown command` line; a bad duration is logged as Go's parse error. The levels and
words are cloudflared's. `parse_command` is the sans-I/O part; `stdin_control` the trio loop.
"""

from __future__ import annotations

import json
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
class Help:
    pass


@dataclass(frozen=True)
class Unknown:
    command: str


@dataclass(frozen=True)
class BadArgument:
    command: str
    error: str


Command = Reconnect | Help | Unknown | BadArgument | None


def parse_command(line: str) -> Command:
    """One stdin line -> a command (None for an empty line)."""
    text = line.rstrip("\r\n")
    name, _, arg = text.partition(" ")
    if name == "":
        return None
    if name == "reconnect":
        if not arg:
            return Reconnect(0.0)
        try:
            delay = parse_go_duration(arg)
        except ValueError:
            return BadArgument(text, f"time: invalid duration {json.dumps(arg)}")  # Go's words, Go's quotes
        return Reconnect(max(delay, 0.0))
    if name == "help":
        return Help()
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
    if isinstance(command, Help):
        log.info("%s", HELP)
    elif isinstance(command, Unknown):
        log.info("Unknown command command=%s", q(command.command))
        log.info("%s", HELP)
    elif isinstance(command, BadArgument):
        log.error("%s", command.error)
    else:
        log.info("Sending reconnect signal")
        while not supervisor.shutdown.is_set():  # like cloudflared's unbuffered channel: wait for a taker
            index = supervisor.reconnect(command.delay)
            if index is not None:
                log.debug("Reconnect signal taken connIndex=%d delay=%gs", index, command.delay)
                return
            await trio.sleep(RETRY_INTERVAL)

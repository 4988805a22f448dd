"""What an origin received: a TCP relay in front of any HTTP/1.1 server that records each request.

The connector dials the relay instead of the server; the relay passes every byte on unchanged, both ways,
and parses a copy of the connector's side with h11 (server role) to list the requests: method, target,
headers in wire order, body. It records; it never decides anything about the exchange. After a protocol
switch (WebSocket, CONNECT), or bytes h11 cannot parse, a connection is only relayed: the request that
switched is recorded, the rest is not HTTP/1.1. TLS origins (`https://`) cannot be read and are not
relayed. `lab.api.Lab.start_recorder` starts one; the pytest plugin puts one in front of each exposed server.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11
import trio

BODY_KEEP = 1 << 20  # bytes of each request body kept for assertions; the length counts them all
READ_SIZE = 65536


@dataclass(frozen=True, kw_only=True)
class Received:
    """One request as the origin received it (after the connector)."""

    seq: int
    time: float
    method: str
    target: str
    http_version: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    body_length: int = 0
    complete: bool = True  # False: the body did not end before the connection did

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        lname = name.lower()
        return next((v for n, v in self.headers if n.lower() == lname), None)


@dataclass
class _Parser:
    """h11 in the server role over a copy of the client's bytes; answers are faked only to move h11 on."""

    records: list[Received]
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.SERVER))
    current: dict[str, object] | None = None
    body: bytearray = field(default_factory=bytearray)
    length: int = 0
    stopped: bool = False
    heads: int = 0

    def feed(self, data: bytes) -> bool:
        """Parse a copy of `data`; True when a new request's head was in it."""
        if self.stopped:
            return False
        heads = self.heads
        self.conn.receive_data(data)
        try:
            self._events()
        except h11.ProtocolError:
            self.stopped = True  # not (or no longer) HTTP/1.1: relay only
        return self.heads > heads

    def _events(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                if self.conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    self.stopped = True  # an Upgrade or CONNECT: what follows is not HTTP/1.1
                    return
                self._next_cycle()
                continue
            if isinstance(event, h11.Request):
                self.heads += 1
                self.current = {
                    "method": event.method.decode("latin-1"),
                    "target": event.target.decode("latin-1"),
                    "http_version": event.http_version.decode("latin-1"),
                    "headers": tuple(
                        (n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()
                    ),
                }
                self.body = bytearray()
                self.length = 0
            elif isinstance(event, h11.Data):
                self.length += len(event.data)
                room = BODY_KEEP - len(self.body)
                if room > 0:
                    self.body += event.data[:room]
            elif isinstance(event, h11.EndOfMessage):
                self._record(complete=True)
            elif isinstance(event, h11.ConnectionClosed):
                self.stopped = True
                return

    def _record(self, *, complete: bool) -> None:
        if self.current is None:
            return
        self.records.append(
            Received(
                seq=len(self.records) + 1,
                time=time.time(),
                body=bytes(self.body),
                body_length=self.length,
                complete=complete,
                **self.current,  # type: ignore[arg-type]
            )
        )
        self.current = None

    def _next_cycle(self) -> None:
        # The origin's real answer goes straight through; h11 needs *an* answer to parse the next request.
        if self.conn.our_state is h11.SEND_RESPONSE:
            self.conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            self.conn.send(h11.EndOfMessage())
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        else:
            self.stopped = True

    def closed(self) -> None:
        if not self.stopped and self.current is not None:
            self._record(complete=False)


class Recorder:
    """A relay on `address` in front of `target` (`host:port`) and what went through it (`records`).

    `on_request`, when set, is awaited once (then cleared) when the next request's head reaches the relay,
    before its bytes go on to the server: the request is then in flight through the whole lab, which is
    the moment a fault "mid-request" is injected (`lab.pytest_plugin`, `Site.failover(mid_request=True)`)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.address = ""
        self.records: list[Received] = []
        self.on_request: Callable[[], Awaitable[None]] | None = None

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port, report `host:port`, relay until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = f"{host}:{port}"
        task_status.started(self.address)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        # A failed relay closes that connection only, as a dead origin would; it never stops the listener.
        parser = _Parser(self.records)
        host, _, port = self.target.rpartition(":")
        async with client:
            try:
                server = await trio.open_tcp_stream(host, int(port))
            except OSError:
                return  # the connector sees a refused origin, as without the relay
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, server, parser, nursery.cancel_scope)
                nursery.start_soon(self._pipe, server, client, None, nursery.cancel_scope)
        parser.closed()

    async def _pipe(
        self, src: trio.SocketStream, dst: trio.SocketStream, parser: _Parser | None, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await src.receive_some(READ_SIZE):
                if parser is not None and parser.feed(data) and self.on_request is not None:
                    hook, self.on_request = self.on_request, None
                    await hook()
                await dst.send_all(data)
            await dst.send_eof()  # a half-close travels on: the other direction may still flow
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()

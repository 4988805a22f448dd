"""Forwarding between the data centres of a multi-process edge (docs/architecture.md, "The edge in several
processes").

Each worker process serves the eyeballs the kernel hands it. When a request's tunnel has no routable
connection in this worker's data centres but another worker has one, the request goes to that worker over
a loopback link, as Cloudflare forwards between its data centres: `Peers.forward` (the sending side) writes a
preamble line naming the eyeball (`wire.edge_link`) and the request as HTTP/1.1, then relays the answer;
`serve_forward_listener` (the receiving side) reads the preamble and serves the rest as an ordinary HTTP/1.1
eyeball connection, except that a request that arrived forwarded is never forwarded again (one hop).

A `--warp-listen` connection is forwarded the same way, its bytes raw (`Peers.forward_raw`), and so is a
UDP flow of a `--udp-forward` port, its datagrams framed (edge.udp); the preamble says which.

The link ends as the eyeball's request did: closed in order (FIN) when the eyeball went away or the request
was done, aborted (RST) when the eyeball reset its HTTP/2 stream. The receiving worker tells the two apart
by the error its next read or write of the link gets (ECONNRESET only after an abort) and records the
request's outcome as `eyeball-reset` or `eyeball-closed`, as one process would. Until the request has
reached the receiving worker, the sending one records it.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import socket
import struct
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import h11
import trio

from tunnel_lab.edge import lb, pages, udp, warp
from tunnel_lab.edge.eyeball_h1 import handle_h1_connection
from tunnel_lab.edge.proxy import BadRequestBody, EyeballGone, send_page
from tunnel_lab.edge.state import EdgeState
from tunnel_lab.transport.pipe import Way, pipe
from tunnel_lab.transport.tunnel import TunnelConnection
from tunnel_lab.wire.edge_link import MAX_PREAMBLE, forward_preamble, parse_forward_preamble
from tunnel_lab.wire.errors import ProtocolError

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
READ_SIZE = 65536
CONNECT_TIMEOUT = 5.0  # a worker's forward listener is on loopback: longer means it is gone
PREAMBLE_TIMEOUT = 5.0
# Fields that belong to one hop of HTTP/1.1 (RFC 9110 §7.6.1), never copied onto the next one.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding",
                        b"upgrade"})

# Set in the task serving a forwarded connection: its requests are served here or refused, never sent on.
ARRIVED_FORWARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("arrived_forwarded", default=False)


class Peers:
    """The other workers' data centres and the tunnels they can serve (`EdgeState.peers` in a worker)."""

    def __init__(self, edge: EdgeState[TunnelConnection], *,
                 ask: Callable[[str], Awaitable[list[str]]] | None = None) -> None:
        self.edge = edge
        self.ask = ask  # asks the parent, live, when the map names no worker (a connection just registered)
        self.routes: dict[str, list[str]] = {}  # tunnel id -> forward listener addresses of other workers
        self._turn = 0
        self.forwarded = 0

    def update(self, routes: dict[str, list[str]]) -> None:
        """The parent's latest view of which other workers have a routable connection of which tunnel."""
        self.routes = routes

    async def forward(self, ex: Any, host: str, record: Any) -> bool:
        """Serve `ex` through a worker that has a connection of its tunnel, if this one has none
        (`record`: see `edge.state.Forwarder`)."""
        if not host:
            return False
        tunnel = self.edge.tunnels.resolve_hostname(host)
        if tunnel is None:
            # A load balancer's hostname: its tunnel is chosen over every worker's connections (one
            # round-robin turn per request, in this worker), then served here or forwarded.
            if ARRIVED_FORWARDED.get():
                return False
            tunnel = lb.choose(self.edge, host, elsewhere=lambda tid: bool(self.routes.get(str(tid))))
            if tunnel is None:
                return False
            record.lb_choice = tunnel
        link = await self.open_link(tunnel.id, f"host={host!r}")
        if link is None:
            return False
        record.tunnel = tunnel
        try:
            await _relay(ex, link, record)
        finally:
            with trio.CancelScope(shield=True):
                _end_link(link, aborted=getattr(ex, "reset", False))
                await link.aclose()
        return True

    async def open_link(self, tunnel_id: Any, what: str, *,
                        here: bool | None = None) -> trio.SocketStream | None:
        """A link to a worker with a routable connection of the tunnel, when this one cannot serve `what`
        (`here`; by default: it has no routable connection of the tunnel) and it did not arrive forwarded
        (one hop). None: serve it here."""
        if here is None:
            here = bool(self.edge.registry.routable(tunnel_id))
        if ARRIVED_FORWARDED.get() or here:
            return None
        targets = self.routes.get(str(tunnel_id))
        if not targets and self.ask is not None:
            targets = await self.ask(str(tunnel_id))
        if not targets:
            return None
        self._turn += 1
        address = targets[self._turn % len(targets)]
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                link = await trio.open_tcp_stream(*_split(address))
        except (OSError, trio.TooSlowError) as exc:
            log.warning("cannot reach the data centre at %s to forward %s: %s; answering here", address, what,
                        exc)
            return None
        self.forwarded += 1
        self.edge.metrics.forwarded.inc(to=address)
        log.debug("forwarding %s tunnel=%s to %s", what, tunnel_id, address)
        return link

    async def forward_raw(self, tunnel_id: Any, eyeball: trio.abc.Stream, first: bytes,
                          client: tuple[str, int], what: str, handed_over: Callable[[], None]) -> bool:
        """A `--warp-listen` connection whose tunnel has no connection here: its bytes so far (`first`) and
        the rest, raw both ways, through a worker that has one, which serves and records it (from
        `handed_over` on: its bytes are on the link)."""
        link = await self.open_link(tunnel_id, what)
        if link is None:
            return False
        quiet = (trio.BrokenResourceError, trio.ClosedResourceError)
        try:
            await link.send_all(forward_preamble(client[0], "warp", client_port=client[1]) + first)
            handed_over()
            send_eof = getattr(eyeball, "send_eof", None)

            async def from_eyeball() -> bytes:
                return bytes(await eyeball.receive_some(READ_SIZE))

            await pipe(Way(from_eyeball, link.send_all, at_eof=link.send_eof, quiet=quiet,
                           ends_pipe=False, error_ends_pipe=False),
                       Way(link.receive_some, eyeball.send_all, at_eof=send_eof, quiet=quiet))
        except quiet:
            pass  # the other side's end is the receiving worker's to record
        finally:
            with trio.CancelScope(shield=True):
                _end_link(link, aborted=False)
                await link.aclose()
        return True


def _end_link(link: trio.SocketStream, *, aborted: bool) -> None:
    """Before closing: an abort (RST) when the eyeball reset its stream, else FIN first, so that the close
    reads as orderly even when answer bytes are left unread (Linux would send RST for those)."""
    with contextlib.suppress(OSError):
        if aborted:
            link.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            link.socket.shutdown(socket.SHUT_WR)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _request_head(ex: Any) -> h11.Request:
    req = ex.request
    # Fields the Connection header names belong to this hop too (RFC 9110 §7.6.1).
    hop = HOP_BY_HOP | {name.strip().lower() for n, v in req.headers if n.lower() == b"connection"
                        for name in v.split(b",")}
    headers: Headers = [(n, v) for n, v in req.headers if n.lower() not in hop]
    names = {n.lower() for n, _ in headers}
    if b"host" not in names:
        headers.insert(0, (b"host", str(req.host).encode("latin-1")))
    if ex.websocket:
        headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    else:
        headers.append((b"connection", b"close"))
        if ex.has_body and b"content-length" not in names:
            headers.append((b"transfer-encoding", b"chunked"))
    return h11.Request(method=str(req.method), target=_origin_form(str(req.target)), headers=headers)


def _origin_form(target: str) -> str:
    """An absolute-form target (`GET http://host/x`) as the origin form the next hop expects."""
    if target.startswith("/") or target == "*":
        return target
    parts = urllib.parse.urlsplit(target)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


async def _relay(ex: Any, link: trio.SocketStream, record: Any) -> None:
    """Send `ex` to the receiving worker and its answer back to the eyeball."""
    client = h11.Connection(h11.CLIENT)
    req = ex.request
    head = client.send(_request_head(ex))
    await link.send_all(forward_preamble(str(req.client_ip), str(req.scheme)) + head)
    record.recorded = True  # the receiving worker has the request (bytes sent survive an abort): it records
    bad_body: list[BadRequestBody] = []
    gone: EyeballGone | None = None
    async with trio.open_nursery() as nursery:
        if ex.has_body and not ex.websocket:
            nursery.start_soon(_upload, ex, client, link, bad_body)  # never raises
        else:  # h11 switches protocols only after the request ended
            await link.send_all(client.send(h11.EndOfMessage()))
        try:
            await _respond(ex, client, link, bad_body)
        except EyeballGone as exc:
            gone = exc  # raised as itself below, not inside the nursery's exception group
        finally:
            nursery.cancel_scope.cancel()
    if gone is not None:
        raise gone


async def _upload(ex: Any, client: h11.Connection, link: trio.SocketStream,
                  bad_body: list[BadRequestBody]) -> None:
    try:
        while (chunk := await ex.read_body()) is not None:
            if chunk:
                await link.send_all(client.send(h11.Data(data=chunk)))
        await link.send_all(client.send(h11.EndOfMessage(headers=ex.request_trailers or [])))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        return  # the response side reports the failure
    except EyeballGone as exc:
        if isinstance(exc, BadRequestBody):
            bad_body.append(exc)
        with trio.CancelScope(shield=True):
            _end_link(link, aborted=getattr(ex, "reset", False))
            await link.aclose()  # the receiving worker sees the eyeball go away


async def _next_event(client: h11.Connection, link: trio.SocketStream,
                      before_wait: Callable[[], Awaitable[None]] | None = None) -> Any:
    while True:
        event = client.next_event()
        if event is not h11.NEED_DATA:
            return event
        if before_wait is not None:
            await before_wait()
        try:
            data = await link.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        client.receive_data(data)


def _response_headers(headers: Any) -> Headers:
    return [(bytes(n), bytes(v)) for n, v in headers if bytes(n).lower() not in HOP_BY_HOP]


async def _respond(ex: Any, client: h11.Connection, link: trio.SocketStream,
                   bad_body: list[BadRequestBody]) -> None:
    try:
        while True:
            event = await _next_event(client, link)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101 and ex.websocket:
                    # The switch's own Connection and Upgrade fields go on to the eyeball.
                    await _websocket(ex, client, link, [(bytes(n), bytes(v)) for n, v in event.headers])
                    return
                continue
            break
        if not isinstance(event, h11.Response):
            raise ProtocolError(f"the receiving data centre closed before answering ({type(event).__name__})")
    except (h11.RemoteProtocolError, ProtocolError) as exc:
        if bad_body:  # the eyeball's body broke the link, as it resets the stream in edge.proxy: 400
            log.info("malformed request body (%s); 400 before the forwarded answer", bad_body[0])
            headers, page = pages.error_page(400, f"The request body could not be read: {bad_body[0]}")
            await send_page(ex, 400, headers, page)
            return
        log.warning("forwarding failed before the response: %s", exc)
        await send_page(ex, 502, [(b"content-type", b"text/plain")],
                        b"The data centre this request was forwarded to did not answer.\n")
        return
    await ex.start_response(event.status_code, _response_headers(event.headers))
    try:
        while True:
            # as edge.proxy relays a body: flush only when about to wait for the link, so the eyeball
            # gets what arrived without one writer round trip per chunk
            event = await _next_event(client, link, ex.flush)
            if isinstance(event, h11.Data):
                await ex.send_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                await ex.finish(_response_headers(event.headers) or None)
                return
            else:
                raise ProtocolError("the forwarded response ended early")
    except (h11.RemoteProtocolError, ProtocolError) as exc:
        log.warning("forwarded response failed mid-way; aborting the eyeball response: %s", exc)
        await ex.abort()


async def _websocket(ex: Any, client: h11.Connection, link: trio.SocketStream, headers: Headers) -> None:
    raw = await ex.upgrade(101, headers)
    leftover, _ = client.trailing_data

    async def from_link() -> bytes:
        nonlocal leftover
        if leftover:
            data, leftover = bytes(leftover), b""
            return data
        return await link.receive_some(READ_SIZE)

    quiet = (trio.BrokenResourceError, trio.ClosedResourceError, EyeballGone)
    await pipe(Way(raw.receive_some, link.send_all, at_eof=link.send_eof, quiet=quiet, ends_pipe=False,
                   error_ends_pipe=False),
               Way(from_link, raw.send_all, quiet=quiet))


class _Link(trio.abc.Stream):
    """The receiving end of a forwarding link, as the eyeball's stream: its first bytes were already read
    (what followed the preamble), and `reset` says the sending worker aborted it (its eyeball reset)."""

    def __init__(self, stream: trio.SocketStream, first: bytes) -> None:
        self.stream = stream
        self.first = first
        self.reset = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.first:
            data, self.first = self.first, b""
            return data
        with self._noting_reset():
            return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._noting_reset():
            await self.stream.send_all(data)

    @contextlib.contextmanager
    def _noting_reset(self) -> Iterator[None]:
        # Linux reports an abort as ECONNRESET to the first read or write after it; a peer that closed in
        # order first (FIN) and then dropped what came after gets EPIPE (RST in CLOSE_WAIT)
        try:
            yield
        except trio.BrokenResourceError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ECONNRESET:
                self.reset = True
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """A forwarded warp connection's half-close (edge.warp.pipe_tcp)."""
        with self._noting_reset():
            await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def handle_forwarded(edge: EdgeState[TunnelConnection], stream: trio.SocketStream) -> None:
    """One connection from another worker: the preamble, then HTTP/1.1 as from the eyeball it names."""
    buffered = b""
    try:
        with trio.fail_after(PREAMBLE_TIMEOUT):
            while b"\r\n" not in buffered:
                data = await stream.receive_some(READ_SIZE)
                if not data or len(buffered) > MAX_PREAMBLE:
                    raise ProtocolError("no forwarding preamble")
                buffered += data
        line, _, rest = buffered.partition(b"\r\n")
        fwd = parse_forward_preamble(line)
    except (ProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        log.warning("forwarding link refused: %s", exc)
        return
    ARRIVED_FORWARDED.set(True)  # this task's context only: the connection's requests stop here
    link = _Link(stream, rest)
    if fwd.scheme == "warp":
        await warp.handle_warp_connection(edge, link, (fwd.client_ip, fwd.client_port))
    elif fwd.destination is not None:  # udp
        await udp.serve_forwarded_flow(edge, link, (fwd.client_ip, fwd.client_port), fwd.destination)
    else:
        await handle_h1_connection(edge, link, scheme=fwd.scheme, client=f"{fwd.client_ip} (forwarded)",
                                   client_ip=fwd.client_ip)

"""UDP through the tunnel, edge side: sessions over a QUIC tunnel connection, and the eyeball's UDP ports.

`UdpSessions` runs the UDP sessions of one QUIC connection (docs/protocol.md §13.6, §13.7). With datagrams
v2 (the default) a session is registered with the connector's `registerUdpSession` on an RPC stream the edge
opens, its payloads travel as `payload | session id | 0` datagrams, and it ends with `unregisterUdpSession`
(either side may call it; the connector calls ours on a stream it opens). With v3 (the connector announced
`support_datagram_v3_2`) the registration and its answer are datagrams too, and a flow ends by idling.

`serve_udp_forward` is the eyeball side (the WARP client's role for UDP): a local UDP port whose datagrams go,
one session per eyeball address, to a fixed private-network destination through the tunnel that
`tunnel route ip` gives that destination; answers come back to the eyeball from the same port. So
`dig @127.0.0.1 -p PORT` reaches a private DNS resolver behind the connector.

Bad input from the connector (garbage or oversize datagrams, unknown sessions, a malformed RPC stream) is
dropped with a WARNING naming it; every per-session queue, the number of sessions per connection and per
port are bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from tunnel_lab.wire import datagram as dg
from tunnel_lab.wire import session_rpc as srpc
from tunnel_lab.wire.edge_link import FrameDecoder, encode_frame, forward_preamble
from tunnel_lab.wire.errors import DatagramError, TunnelLabError

if TYPE_CHECKING:
    from tunnel_lab.edge.quic import QuicTunnelConnection, QuicTunnelStream
    from tunnel_lab.edge.state import EdgeState
    from tunnel_lab.transport.tunnel import TunnelConnection

log = logging.getLogger(__name__)

DATAGRAM_V3_FEATURE = "support_datagram_v3_2"
INBOX = 64  # datagrams from the connector waiting for the eyeball, per session (then dropped, as UDP does)
MAX_SESSIONS_PER_CONNECTION = 1024
MAX_FLOWS_PER_PORT = 256
DEFAULT_IDLE = 30.0  # seconds without traffic before a forwarded flow ends (and its session is unregistered)
REGISTER_TIMEOUT = 5.0
LINK_READ = 65536
MAX_RPC_BYTES = 1 << 16  # what one connector-opened RPC stream may send: an unregister is ~200 bytes


class UdpSessionError(TunnelLabError):
    """A session could not be registered: the connector's refusal or no answer in time."""


@dataclass(eq=False)
class UdpSession:
    """One session: `send` towards the destination, `receive` what it answered."""

    owner: UdpSessions
    key: uuid.UUID | int
    destination: str
    inbox_send: trio.MemorySendChannel[bytes]
    inbox: trio.MemoryReceiveChannel[bytes]
    closed: bool = False
    closed_by: str = ""
    ended: trio.Event = field(default_factory=trio.Event)

    @property
    def label(self) -> str:
        if isinstance(self.key, uuid.UUID):
            return f"session={dg.format_session_id(self.key)}"
        return f"flow={dg.format_request_id(self.key)}"

    def send(self, payload: bytes) -> None:
        """One payload to the destination (refused over the MTU, as cloudflared refuses it)."""
        if self.closed:
            return
        if isinstance(self.key, uuid.UUID):
            data = dg.encode_v2_session(self.key, payload)
        else:
            data = dg.encode_v3(dg.V3Payload(request_id=self.key, payload=payload))
        self.owner.conn.send_datagram(data)

    async def receive(self) -> bytes | None:
        """The next payload from the destination; None once the session ended."""
        try:
            return await self.inbox.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None

    async def put(self, payload: bytes) -> None:
        """`send`, as a forwarded flow's `LinkSession.put` is awaited."""
        self.send(payload)

    async def close(self, message: str) -> None:
        """End the session here and, with v2, tell the connector (`unregisterUdpSession`)."""
        if self.closed:
            return
        self.owner._forget(self, f"closed by the edge: {message}")
        if isinstance(self.key, uuid.UUID):
            await self.owner.unregister(self.key, message)


class UdpSessions:
    """The UDP sessions of one QUIC tunnel connection (attached on first use)."""

    def __init__(self, conn: QuicTunnelConnection) -> None:
        self.conn = conn
        features = conn.registration.features if conn.registration is not None else ()
        self.version = 3 if DATAGRAM_V3_FEATURE in features else 2
        self.sessions: dict[uuid.UUID | int, UdpSession] = {}
        self._v3_answers: dict[int, tuple[trio.Event, list[dg.V3RegistrationResponse]]] = {}
        self.dropped = 0
        conn.datagram_handler = self._datagram
        conn.rpc_stream_handler = self._connector_rpc_stream
        with contextlib.suppress(TunnelLabError):  # not running (yet): nothing to watch
            conn.start_soon(self._watch_connection)

    async def _watch_connection(self) -> None:
        """Lives as long as the connection: when it ends, so do its sessions (their flows start over on
        another connection with the eyeball's next datagram)."""
        try:
            await trio.sleep_forever()
        finally:
            self.close_all("the tunnel connection closed")

    @classmethod
    def of(cls, conn: QuicTunnelConnection) -> UdpSessions:
        existing = getattr(conn, "udp_sessions", None)
        if isinstance(existing, UdpSessions):
            return existing
        sessions = cls(conn)
        conn.udp_sessions = sessions  # type: ignore[attr-defined]
        return sessions

    def ident(self) -> str:
        return str(self.conn.ident())

    # -- opening and closing
    async def open(self, address: str, port: int, *, idle: float) -> UdpSession:
        """Register a session to `address:port` with the connector; raises UdpSessionError."""
        if len(self.sessions) >= MAX_SESSIONS_PER_CONNECTION:
            raise UdpSessionError(f"too many UDP sessions on this connection ({MAX_SESSIONS_PER_CONNECTION})")
        ip = ipaddress.ip_address(address)
        destination = f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"
        send, receive = trio.open_memory_channel[bytes](INBOX)
        new_id = uuid.uuid4()
        key: uuid.UUID | int = new_id if self.version == 2 else new_id.int
        session = UdpSession(self, key, destination, send, receive)
        self.sessions[key] = session
        try:
            with trio.fail_after(REGISTER_TIMEOUT):
                if isinstance(key, uuid.UUID):
                    await self._register_v2(key, ip, port, idle)
                else:
                    await self._register_v3(key, ip, port, idle)
        except trio.TooSlowError:
            self._forget(session, "registration timed out")
            raise UdpSessionError(f"the connector did not answer the UDP session registration to "
                                  f"{destination} within {REGISTER_TIMEOUT:g}s") from None
        except BaseException:
            self._forget(session, "registration failed")
            raise
        log.info("UDP session registered %s destination=%s datagrams=v%d %s", session.label, destination,
                 self.version, self.ident())
        return session

    async def _register_v2(self, key: uuid.UUID, ip: Any, port: int, idle: float) -> None:
        params = srpc.RegisterUdpSessionParams(session_id=key, dst_ip=ip, dst_port=port,
                                               close_after_idle_ns=int(idle * 1e9))
        client = srpc.SessionRpcClient()
        qid = client.register_udp_session(params)
        event = await self._call(client, qid)
        if isinstance(event, srpc.UdpSessionRegistered):
            if event.error:
                raise UdpSessionError(f"the connector refused the UDP session: {event.error}")
            return
        raise UdpSessionError(f"registerUdpSession failed: {getattr(event, 'reason', event)}")

    async def _register_v3(self, key: int, ip: Any, port: int, idle: float) -> None:
        done = trio.Event()
        answers: list[dg.V3RegistrationResponse] = []
        self._v3_answers[key] = (done, answers)
        try:
            self.conn.send_datagram(dg.encode_v3(dg.V3Registration(
                request_id=key, address=ip, port=port, idle_hint_seconds=round(idle))))
            await done.wait()
        finally:
            self._v3_answers.pop(key, None)
        response = answers[0].response
        if response != dg.V3Response.OK:
            name = response.name if isinstance(response, dg.V3Response) else str(response)
            raise UdpSessionError(f"the connector refused the UDP flow: {name} {answers[0].error_message}"
                                  .rstrip())

    async def unregister(self, key: uuid.UUID, message: str) -> None:
        """`unregisterUdpSession` to the connector (best effort: the session is gone here already)."""
        client = srpc.SessionRpcClient()
        qid = client.unregister_udp_session(key, message)
        try:
            with trio.move_on_after(REGISTER_TIMEOUT):
                await self._call(client, qid)
        except TunnelLabError as exc:
            log.info("unregisterUdpSession failed session=%s error=%s %s", dg.format_session_id(key), exc,
                     self.ident())

    async def _call(self, client: srpc.SessionRpcClient, qid: int) -> object:
        """One call on a fresh RPC stream; its answer event (a CallFailed for an exception)."""
        from tunnel_lab.edge.quic import RpcAnswerError

        try:
            return await self.conn.rpc_call(client, qid, max_bytes=MAX_RPC_BYTES)
        except RpcAnswerError as exc:  # the connector's fault: no other connection is tried
            raise UdpSessionError(str(exc)) from exc

    def _forget(self, session: UdpSession, why: str) -> None:
        if session.closed:
            return
        session.closed = True
        session.closed_by = why
        self.sessions.pop(session.key, None)
        session.inbox_send.close()
        session.ended.set()

    def close_all(self, why: str) -> None:
        for session in list(self.sessions.values()):
            self._forget(session, why)

    # -- from the connector
    def _datagram(self, data: bytes) -> None:
        try:
            if self.version == 2:
                decoded: Any = dg.decode_v2(data)
            else:
                decoded = dg.decode_v3(data)
        except DatagramError as exc:
            self._drop(f"bad datagram from the connector: {exc}")
            return
        if isinstance(decoded, dg.V3RegistrationResponse):
            waiting = self._v3_answers.get(decoded.request_id)
            if waiting is None:
                flow = dg.format_request_id(decoded.request_id)
                self._drop(f"registration response for unknown flow {flow}")
                return
            waiting[1].append(decoded)
            waiting[0].set()
            return
        if isinstance(decoded, dg.V2SessionDatagram):
            key: uuid.UUID | int = decoded.session_id
        elif isinstance(decoded, dg.V3Payload):
            key = decoded.request_id
        else:
            self._drop(f"unexpected {type(decoded).__name__} datagram from the connector")
            return
        if len(decoded.payload) > dg.MAX_PAYLOAD:
            self._drop(f"oversize datagram payload of {len(decoded.payload)} bytes (over {dg.MAX_PAYLOAD})")
            return
        session = self.sessions.get(key)
        if session is None:
            what = dg.format_session_id(key) if isinstance(key, uuid.UUID) else dg.format_request_id(key)
            self._drop(f"datagram for unknown UDP session {what}")
            return
        try:
            session.inbox_send.send_nowait(decoded.payload)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1  # the eyeball is slower than the destination: UDP drops

    def _drop(self, why: str) -> None:
        self.dropped += 1
        log.warning("%s; dropped %s", why, self.ident())

    def _connector_rpc_stream(self, stream: QuicTunnelStream) -> None:
        self.conn.start_soon(self._serve_connector_rpc, stream)

    async def _serve_connector_rpc(self, stream: QuicTunnelStream) -> None:
        """The connector's `unregisterUdpSession` (our SessionManager, on a stream it opened)."""
        server = srpc.SessionRpcServer(srpc.SESSION_MANAGER_METHODS)
        received = 0
        try:
            with trio.move_on_after(REGISTER_TIMEOUT):
                while not server.aborted:
                    item = await stream.receive()
                    if item is None:
                        break
                    received += len(item[0])
                    if received > MAX_RPC_BYTES:
                        raise UdpSessionError(f"more than {MAX_RPC_BYTES} bytes of RPC on one stream")
                    for event in server.receive_data(item[0]):
                        if isinstance(event, srpc.UnregisterUdpSessionCalled):
                            session = self.sessions.get(event.session_id)
                            if session is not None:
                                log.info("UDP session ended by the connector %s message=%r %s", session.label,
                                         event.message, self.ident())
                                self._forget(session, f"closed by the connector: {event.message}")
                            server.answer_empty(event.question_id)
                        elif isinstance(event, srpc.RegisterUdpSessionCalled):
                            server.answer_exception(event.question_id, "the edge registers no sessions")
                    out = server.data_to_send()
                    if out:
                        await stream.send(out)
            await stream.end()
        except TunnelLabError as exc:
            log.warning("malformed RPC stream from the connector: %s; resetting it %s", exc, self.ident())
        finally:
            await stream.release()


# --------------------------------------------------------------------------------------------------
# The eyeball side: a UDP port that forwards into sessions


@dataclass(eq=False)
class _Flow:
    peer: tuple[Any, ...]
    outbox_send: trio.MemorySendChannel[bytes]
    outbox: trio.MemoryReceiveChannel[bytes]
    last_active: float = 0.0


def parse_forward(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """`LISTEN=DEST`, each `IP:PORT` (`[v6]:PORT`): `127.0.0.1:5353=10.0.0.53:53`; ValueError otherwise."""
    listen, eq, dest = text.partition("=")
    if not eq:
        raise ValueError(f"{text!r} is not LISTEN=DEST (e.g. 127.0.0.1:0=10.0.0.53:53)")
    return _ip_port(listen), _ip_port(dest)


def _ip_port(text: str) -> tuple[str, int]:
    host, _, port = text[1:].partition("]:") if text.startswith("[") else text.rpartition(":")
    number = int(port)
    if not 0 <= number < 65536:
        raise ValueError(f"port {number} out of range")
    return str(ipaddress.ip_address(host)), number


async def serve_udp_forward(edge: EdgeState[TunnelConnection], listen: tuple[str, int],
                            destination: tuple[str, int], *,
                            idle: float = DEFAULT_IDLE, drop_every: int = 0,
                            task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Forward datagrams from `listen` to `destination` through the tunnel routed to it (never returns).

    `drop_every` N > 0 is a test knob (packet loss): every Nth eyeball datagram is dropped, and logged."""
    host, port = listen
    sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((host, port))
        bound = sock.getsockname()
        address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        dest = f"{destination[0]}:{destination[1]}"
        log.info("udp forward listening address=%s destination=%s%s", address, dest,
                 f" drop_every={drop_every}" if drop_every else "")
        flows: dict[tuple[Any, ...], _Flow] = {}
        received = 0
        async with trio.open_nursery() as nursery:
            task_status.started(address)
            while True:
                data, peer = await sock.recvfrom(65536)
                received += 1
                if drop_every and received % drop_every == 0:
                    log.info("udp forward %s drops datagram #%d (drop_every=%d)", address, received,
                             drop_every)
                    continue
                if len(data) > dg.MAX_PAYLOAD:
                    log.warning("oversize UDP datagram of %d bytes from %s (the tunnel carries at most %d); "
                                "dropped", len(data), peer, dg.MAX_PAYLOAD)
                    continue
                flow = flows.get(peer)
                if flow is None:
                    if len(flows) >= MAX_FLOWS_PER_PORT:
                        log.warning("too many UDP flows on %s (%d); datagram from %s dropped", address,
                                    MAX_FLOWS_PER_PORT, peer)
                        continue
                    send, receive = trio.open_memory_channel[bytes](INBOX)
                    flow = _Flow(peer, send, receive, trio.current_time())
                    flows[peer] = flow
                    nursery.start_soon(_serve_flow, edge, sock, flow, destination, idle, flows)
                flow.last_active = trio.current_time()
                # a session not keeping up (or ending) drops, as UDP does
                with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                    flow.outbox_send.send_nowait(data)


async def _serve_flow(edge: EdgeState[TunnelConnection], sock: Any, flow: _Flow,
                      destination: tuple[str, int], idle: float,
                      flows: dict[tuple[Any, ...], _Flow]) -> None:
    dest = f"{destination[0]}:{destination[1]}"
    try:
        session = await _open_session(edge, destination, idle, flow.peer)
        if session is None:
            return
        async with trio.open_nursery() as nursery:
            async def to_tunnel() -> None:
                async for data in flow.outbox:
                    await session.put(data)

            async def to_eyeball() -> None:
                while (data := await session.receive()) is not None:
                    flow.last_active = trio.current_time()
                    await sock.sendto(data, flow.peer)
                nursery.cancel_scope.cancel()  # the connector ended the session

            nursery.start_soon(to_tunnel)
            nursery.start_soon(to_eyeball)
            while True:
                deadline = flow.last_active + idle
                if trio.current_time() >= deadline:
                    break
                await trio.sleep_until(deadline)
            nursery.cancel_scope.cancel()
        with trio.move_on_after(REGISTER_TIMEOUT) as cleanup:
            cleanup.shield = True
            await session.close("idle")
        log.info("UDP flow ended peer=%s destination=%s %s (%s)", flow.peer, dest, session.label,
                 session.closed_by or "idle")
    finally:
        flows.pop(flow.peer, None)
        flow.outbox_send.close()


async def _open_session(edge: EdgeState[TunnelConnection], destination: tuple[str, int],
                        idle: float, peer: tuple[Any, ...]) -> UdpSession | LinkSession | None:
    from tunnel_lab.edge.quic import QuicTunnelConnection

    dest = f"{destination[0]}:{destination[1]}"
    tunnel = edge.tunnels.resolve_ip(destination[0])
    if tunnel is None:
        log.warning("UDP to %s: no tunnel has a route (tunnel route ip) for it; dropped", dest)
        return None
    if edge.peers is not None:  # a multi-process edge: a worker with a QUIC connection of the tunnel
        here = any(isinstance(c, QuicTunnelConnection) for c in edge.registry.routable(tunnel.id))
        link = await edge.peers.open_link(tunnel.id, f"udp flow peer={peer[0]}:{peer[1]} dest={dest}",
                                          here=here)
        if link is not None:
            try:
                await link.send_all(forward_preamble(str(peer[0]), "udp", client_port=int(peer[1]),
                                                     destination=destination))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.warning("UDP to %s: the forwarding link failed at once (%s); dropped", dest, exc)
                await link.aclose()
                return None
            return LinkSession(link, dest)
    tried: list[Any] = []
    while True:
        conn = edge.registry.pick(tunnel.id, exclude=tried)
        if conn is None:
            log.warning("UDP to %s: tunnel %s has no QUIC connection (UDP needs the quic transport); "
                        "dropped", dest, tunnel.id)
            return None
        tried.append(conn)
        if not isinstance(conn, QuicTunnelConnection):
            continue
        try:
            return await UdpSessions.of(conn).open(destination[0], destination[1], idle=idle)
        except UdpSessionError as exc:
            log.warning("UDP to %s: %s %s", dest, exc, conn.ident())
            return None
        except TunnelLabError as exc:  # the connection died under us: try another
            log.info("UDP to %s: connection failed (%s), trying another %s", dest, exc, conn.ident())


# --------------------------------------------------------------------------------------------------
# A multi-process edge: a flow served by another worker (docs/architecture.md, "The edge in several
# processes"). The worker that owns the port relays the flow's datagrams, framed (wire.edge_link), over a
# forwarding link (edge/forward.py) to a worker with a QUIC connection of the tunnel, which opens the session.


class LinkSession:
    """A flow's session in another worker, through a forwarding link: what `_serve_flow` uses of a
    `UdpSession`."""

    def __init__(self, link: trio.abc.Stream, destination: str) -> None:
        self.link = link
        self.label = f"forwarded dest={destination}"
        self.closed_by = ""
        self._decoder = FrameDecoder()
        self._ready: deque[bytes] = deque()

    async def put(self, payload: bytes) -> None:
        """One payload to the worker serving the flow (a broken link shows in `receive`)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.link.send_all(encode_frame(payload))

    async def receive(self) -> bytes | None:
        """The next payload from the destination; None once the serving worker ended the flow."""
        while not self._ready:
            try:
                data = await self.link.receive_some(LINK_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.closed_by = "ended by the worker serving it"
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    async def close(self, message: str) -> None:
        """End the flow: the serving worker sees the link close and ends its session."""
        self.closed_by = self.closed_by or message
        await self.link.aclose()


async def serve_forwarded_flow(edge: EdgeState[TunnelConnection], link: trio.abc.Stream,
                               client: tuple[str, int], destination: tuple[str, int]) -> None:
    """A UDP flow another worker forwarded: its datagrams into a session on a connection of this worker,
    the answers back, until the link or the session ends."""
    dest = f"{destination[0]}:{destination[1]}"
    session = await _open_session(edge, destination, DEFAULT_IDLE, client)
    if session is None:  # said why; the sending worker sees the link close
        await link.aclose()
        return
    quiet = (trio.BrokenResourceError, trio.ClosedResourceError)
    ended = "the forwarding worker's flow ended"
    try:
        async with trio.open_nursery() as nursery:
            async def to_tunnel() -> None:
                decoder = FrameDecoder()
                with contextlib.suppress(*quiet):
                    while data := await link.receive_some(LINK_READ):
                        for payload in decoder.feed(data):
                            await session.put(payload)
                nursery.cancel_scope.cancel()

            async def to_link() -> None:
                nonlocal ended
                with contextlib.suppress(*quiet):
                    while (data := await session.receive()) is not None:
                        await link.send_all(encode_frame(data))
                    ended = session.closed_by or "the connector ended it"
                nursery.cancel_scope.cancel()

            nursery.start_soon(to_tunnel)
            nursery.start_soon(to_link)
    finally:
        with trio.move_on_after(REGISTER_TIMEOUT) as cleanup:
            cleanup.shield = True
            await session.close("forwarded flow ended")
            await link.aclose()
    log.info("forwarded UDP flow ended peer=%s:%s destination=%s %s (%s)", client[0], client[1], dest,
             session.label, ended)

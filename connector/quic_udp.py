"""UDP sessions to origins over one QUIC edge connection: datagrams v2 and v3 (docs/protocol.md §13.6-§13.7).

v2 (the default): the edge registers a session with the `registerUdpSession` RPC (connector/quic_conn.py
calls `register_v2`), then datagrams carry `payload | session id | 0`. The session ends when the edge
unregisters it, when it has been idle for the edge's hint (210 s without one), or when the connection
closes; when it ends on our side we tell the edge with `unregisterUdpSession` on a stream of our own
(`unregister_at_edge`).
v3 (`--features support_datagram_v3_2`): registration, its answer and the payloads are all datagrams, keyed by
a 128-bit request id; a flow ends only by going idle (or with the connection).

Each session owns one connected UDP socket towards its destination; a datagram from the edge is written to it
at once (a full socket buffer drops it, as UDP does); what the origin answers goes back as a datagram. Log
lines are cloudflared's (datagramsession/, quic/v3/). Sessions per connection are capped (`max_sessions`,
and cloudflared's `warp-routing.max-active-flows` when set), so nothing grows without bound.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from tunnel_lab.connector.logging_setup import format_value as q
from tunnel_lab.wire import datagram as dg
from tunnel_lab.wire.errors import DatagramError
from tunnel_lab.wire.session_rpc import RegisterUdpSessionParams

log = logging.getLogger(__name__)

DEFAULT_IDLE = 210.0  # seconds (datagramsession/session.go defaultCloseIdleAfter)
MAX_ORIGIN_PACKET = 1500  # one read from the origin socket
MAX_SESSIONS = 1024  # per connection: the lab's own bound beside max-active-flows

SendDatagram = Callable[[bytes], None]
UnregisterAtEdge = Callable[[uuid.UUID, str], Awaitable[None]]


@dataclass(eq=False)
class _Session:
    key: uuid.UUID | int  # v2 session id or v3 request id
    sock: socket.socket
    idle: float
    label: str
    last_active: float = 0.0
    closed_by_remote: bool = False
    close_reason: str | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class UdpSessionManager:
    """The UDP sessions of one QUIC connection."""

    def __init__(self, *, conn_index: int, version: int, send_datagram: SendDatagram, nursery: trio.Nursery,
                 unregister_at_edge: UnregisterAtEdge | None = None, max_active_flows: int = 0,
                 max_sessions: int = MAX_SESSIONS) -> None:
        if version not in (2, 3):
            raise ValueError(f"datagram version {version} (2 or 3)")
        self.conn_index = conn_index
        self.version = version
        self._send = send_datagram
        self._nursery = nursery
        self._unregister_at_edge = unregister_at_edge
        self._limit = min(max_active_flows, max_sessions) if max_active_flows else max_sessions
        self.sessions: dict[uuid.UUID | int, _Session] = {}
        self.dropped = 0  # datagrams refused (garbage, unknown session, too large)

    @property
    def active(self) -> int:
        return len(self.sessions)

    # -- v2: registration over RPC
    async def register_v2(self, params: RegisterUdpSessionParams) -> str:
        """Open the session; returns "" or the error text the RPC answer carries."""
        dst = f"{params.dst_ip}:{params.dst_port}"
        if self.version != 2:
            return "datagram v3 does not support RegisterUdpSession RPC"
        if len(self.sessions) >= self._limit:
            log.warning("Too many concurrent sessions being handled, rejecting udp proxy to %s connIndex=%d "
                        "event=3", dst, self.conn_index)
            return "failed to start udp session due to rate limiting: too many active flows"
        if params.session_id in self.sessions:
            return f"session {dg.format_session_id(params.session_id)} is already registered"
        try:
            sock = _dial_udp(params.dst_ip, params.dst_port)
        except OSError as exc:
            log.error("Failed to create udp proxy to %s error=%s connIndex=%d event=3", dst, q(str(exc)),
                      self.conn_index)
            return f"dial udp {dst}: {exc.strerror or exc}"
        idle = params.close_after_idle_ns / 1e9 if params.close_after_idle_ns > 0 else DEFAULT_IDLE
        label = f"sessionID={dg.format_session_id(params.session_id)}"
        session = _Session(params.session_id, sock, idle, label)
        self._start(session)
        log.debug("Registered session connIndex=%d dst=%s event=3 %s src=%s", self.conn_index, dst,
                  session.label, "{}:{}".format(*sock.getsockname()[:2]))
        return ""

    def unregister_v2(self, session_id: uuid.UUID, message: str) -> None:
        """The edge ended the session (no answer goes back to it)."""
        session = self.sessions.get(session_id)
        if session is not None:
            session.closed_by_remote = True
            session.close_reason = f"session closed by remote due to {message}"
            session.scope.cancel()

    # -- datagrams from the edge
    def datagram_received(self, data: bytes) -> None:
        """One DATAGRAM frame from the edge: demultiplex it (bad ones are logged and dropped)."""
        try:
            if self.version == 2:
                self._v2_datagram(dg.decode_v2(data))
            else:
                self._v3_datagram(dg.decode_v3(data))
        except DatagramError as exc:
            self.dropped += 1
            what = "Failed to demux datagram" if self.version == 2 else "unable to unmarshal datagram"
            log.error("%s error=%s connIndex=%d datagramVersion=%d", what, q(str(exc)), self.conn_index,
                      self.version)

    def _v2_datagram(self, datagram: dg.V2Datagram) -> None:
        if not isinstance(datagram, dg.V2SessionDatagram):
            self.dropped += 1  # ICMP (IP packets) is not proxied by the lab
            log.debug("Dropping a %s datagram (ICMP is not proxied) connIndex=%d", datagram.type.name,
                      self.conn_index)
            return
        session = self.sessions.get(datagram.session_id)
        if session is None:
            self.dropped += 1
            log.error("session not found connIndex=%d datagramVersion=2 event=3 sessionID=%s",
                      self.conn_index, dg.format_session_id(datagram.session_id))
            return
        self._write(session, datagram.payload)

    def _v3_datagram(self, datagram: dg.V3Datagram) -> None:
        if isinstance(datagram, dg.V3Payload):
            session = self.sessions.get(datagram.request_id)
            if session is None:
                self.dropped += 1
                log.error("unable to find flow error=%s connIndex=%d datagramVersion=3 event=3 flowID=%s",
                          q("flow not found"), self.conn_index, dg.format_request_id(datagram.request_id))
                return
            self._write(session, datagram.payload)
        elif isinstance(datagram, dg.V3Registration):
            self._v3_register(datagram)
        elif isinstance(datagram, dg.V3RegistrationResponse):
            self.dropped += 1
            log.error("unexpected datagram type received: %d connIndex=%d datagramVersion=3 event=3",
                      dg.V3Type.REGISTRATION_RESPONSE, self.conn_index)
        else:
            self.dropped += 1  # ICMP is not proxied by the lab

    def _v3_register(self, reg: dg.V3Registration) -> None:
        flow = dg.format_request_id(reg.request_id)
        dst = f"{reg.address}:{reg.port}" if reg.address.version == 4 else f"[{reg.address}]:{reg.port}"
        existing = self.sessions.get(reg.request_id)
        if existing is not None:  # the answer got lost: answer again, the flow stays
            existing.last_active = trio.current_time()
            self._respond(reg.request_id, dg.V3Response.OK)
            log.debug("flow registration response retry connIndex=%d datagramVersion=3 event=3 flowID=%s",
                      self.conn_index, flow)
            return
        if len(self.sessions) >= self._limit:
            log.warning("Too many concurrent sessions being handled, rejecting udp proxy connIndex=%d "
                        "datagramVersion=3 event=3", self.conn_index)
            self._respond(reg.request_id, dg.V3Response.TOO_MANY_ACTIVE_FLOWS)
            return
        try:
            sock = _dial_udp(reg.address, reg.port)
        except OSError as exc:
            log.error("flow registration failure error=%s connIndex=%d datagramVersion=3 dst=%s event=3 "
                      "flowID=%s", q(str(exc)), self.conn_index, dst, flow)
            self._respond(reg.request_id, dg.V3Response.UNABLE_TO_BIND_SOCKET)
            return
        idle = float(reg.idle_hint_seconds) if reg.idle_hint_seconds else DEFAULT_IDLE
        session = _Session(reg.request_id, sock, idle, f"flowID={flow}")
        self._start(session)
        self._respond(reg.request_id, dg.V3Response.OK)

    def _respond(self, request_id: int, response: dg.V3Response) -> None:
        self._send(dg.encode_v3(dg.V3RegistrationResponse(request_id=request_id, response=response)))

    # -- one session
    def _start(self, session: _Session) -> None:
        session.last_active = trio.current_time()
        self.sessions[session.key] = session
        self._nursery.start_soon(self._serve, session)

    def _write(self, session: _Session, payload: bytes) -> None:
        session.last_active = trio.current_time()
        try:
            session.sock.send(payload)
        except BlockingIOError:
            self.dropped += 1  # the origin's socket buffer is full: UDP drops
        except OSError as exc:  # e.g. ECONNREFUSED from an earlier send: nobody listens there
            log.debug("Failed to write payload to session error=%s connIndex=%d %s", q(str(exc)),
                      self.conn_index, session.label)

    async def _serve(self, session: _Session) -> None:
        error: str | None = None
        try:
            with session.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._origin_to_edge, session)
                    while True:
                        deadline = session.last_active + session.idle
                        if trio.current_time() >= deadline:
                            error = (f"session idle for {_go_duration(session.idle)}" if self.version == 2
                                     else f"flow was idle for {_go_duration(session.idle)}")
                            nursery.cancel_scope.cancel()
                            break
                        await trio.sleep_until(deadline)
        finally:
            self.sessions.pop(session.key, None)
            session.sock.close()
        if session.closed_by_remote:
            error = session.close_reason
        if self.version == 3:
            log.debug("flow closed: %s connIndex=%d datagramVersion=3 event=3 %s", error, self.conn_index,
                      session.label)
            return
        log.debug("Session terminated error=%s connIndex=%d event=3 %s", q(str(error)), self.conn_index,
                  session.label)
        if not session.closed_by_remote and self._unregister_at_edge is not None:
            assert isinstance(session.key, uuid.UUID)
            with contextlib.suppress(Exception):
                await self._unregister_at_edge(session.key, str(error or "terminated without error"))

    async def _origin_to_edge(self, session: _Session) -> None:
        sock = session.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(MAX_ORIGIN_PACKET + 1)
            except BlockingIOError:
                continue
            except OSError as exc:  # ICMP unreachable from the destination: UDP carries on
                log.debug("Failed to read from session origin error=%s connIndex=%d %s", q(str(exc)),
                          self.conn_index, session.label)
                continue
            session.last_active = trio.current_time()
            if len(data) > dg.MAX_PAYLOAD:
                self.dropped += 1
                if self.version == 3:
                    log.error("flow (origin) packet read was too large and was dropped connIndex=%d "
                              "packetSize=%d %s", self.conn_index, len(data), session.label)
                else:
                    log.error("Failed to send session payload from destination to transport error=%s "
                              "connIndex=%d %s", q(f"origin UDP payload has {len(data)} bytes, which exceeds "
                                                   f"transport MTU {dg.MAX_PAYLOAD}"), self.conn_index,
                              session.label)
                continue
            if isinstance(session.key, uuid.UUID):
                self._send(dg.encode_v2_session(session.key, data))
            else:
                self._send(dg.encode_v3(dg.V3Payload(request_id=session.key, payload=data)))

    def close_all(self) -> None:
        for session in list(self.sessions.values()):
            session.closed_by_remote = True  # the connection is gone: nobody to tell
            session.close_reason = "session manager closed"
            session.scope.cancel()


def _dial_udp(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> socket.socket:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect((str(address), port))
    except OSError:
        sock.close()
        raise
    return sock


def _go_duration(seconds: float) -> str:
    """Go's time.Duration.String(): "300ms", "5s", "1.5s", "3m30s", "1h0m0s"."""
    if seconds < 1:
        return f"{round(seconds * 1000, 6):g}ms"
    whole_minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(whole_minutes), 60)
    text = f"{round(rest, 9):g}s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text

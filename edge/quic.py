"""The edge's QUIC transport: one UDP endpoint per data centre and a QUIC tunnel connection.

cloudflared's default transport. Roles: the connector dials (QUIC client, ALPN `argotunnel`, SNI
`quic.cftunnel.com`) and opens the first bidirectional stream, the control stream, where it calls
registerConnection at once (wire.rpc.RpcServer answers, exactly as over http2). For each eyeball request
the edge opens a bidirectional stream and writes a data-stream head (wire.quic_stream: signature, version,
ConnectRequest) then the body; the connector answers with its head (ConnectResponse) then the body.

The QUIC state machine is qh3's (sans-I/O, an aioquic fork that has the X25519MLKEM768 key exchange
cloudflared insists on; docs/edge.md says why). This module is its thin trio shell:

- `serve_quic_endpoint`: one UDP socket beside a data centre's TCP listener (same host and port). It
  reads datagrams in batches (one wake-up, up to `RECEIVE_BATCH` reads), routes them by destination
  connection id, starts a connection for a new Initial packet, and drops garbage with a WARNING.
- `QuicTunnelConnection`: the same interface as the http2 `TunnelConnection` (it is one: registration,
  faults, draining and the registry are shared code), with its streams behind the same `TunnelStream`
  interface, so edge/proxy.py and edge/warp.py do not know which transport carries a request.

Concurrency: datagrams are fed to qh3 synchronously by the endpoint task; each connection has one
task that runs qh3's timers and the connection's lifetime, and stream handlers write under no lock
(qh3 calls never await). Datagrams go out with non-blocking `sendto` (a full socket buffer drops them;
QUIC retransmits).
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio
from h2.errors import ErrorCodes
from qh3.quic import events as qevents
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection
from qh3.quic.packet import QuicPacketType, encode_quic_version_negotiation

from tunnel_lab.edge.tunnel import H2TunnelConnection, H2TunnelStream, header_list_size
from tunnel_lab.transport import udp
from tunnel_lab.transport.qh3 import (
    AlertUnrecognizedName,
    CreditConnection,
    KeyedResetConnection,
    TracedKeyedResetConnection,
    ack_now,
    hold_unsent,
    pull_quic_header,
    quic_keylog,
    stream_state,
    without_pacing,
)
from tunnel_lab.transport.tunnel import OversizedHeadersError, TunnelConnection, TunnelStreamError
from tunnel_lab.wire.errors import TunnelLabError
from tunnel_lab.wire.quic_stream import (
    ConnectionType,
    ConnectResponse,
    QuicStreamError,
    StreamHeadReader,
    connect_request_from_headers,
    encode_connect_request,
    headers_from_connect_response,
    rpc_stream_preamble,
)
from tunnel_lab.wire.stateless_reset import reset_for

if TYPE_CHECKING:
    from tunnel_lab.edge.state import EdgeState
    from tunnel_lab.lab.pki import LabPKI

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

ALPN = "argotunnel"
SNI = "quic.cftunnel.com"  # what cloudflared (quic-go) sends; anything else is refused
# but the connectivity pre-checks' handshake (connection.ProbeTLSSettings), closed as soon as it is done
PROBE_SNI = "probe.cftunnel.com"
CONTROL_STREAM_ID = 0  # the connector's first bidirectional stream
RECEIVE_BATCH = 64  # datagrams read per wake-up of the endpoint
SOCKET_BUFFER = 4 * 1024 * 1024  # SO_RCVBUF / SO_SNDBUF asked for (the kernel may cap it)
MAX_DATAGRAM = 65535
MIN_INITIAL_SIZE = 1200  # RFC 9000 §14.1: a client's Initial datagram is padded to at least this
SEND_BUFFER_LIMIT = 1024 * 1024  # a stream writer waits while more than this is queued and unsent
MAX_CONNECTIONS = 1024  # per endpoint; more Initial packets are dropped (a connection flood)
WARN_INTERVAL = 5.0  # at most one WARNING per kind of dropped datagram per endpoint per interval
IDLE_TIMEOUT = 30.0  # ours; cloudflared asks for 5 s and keeps the connection alive every second
MAX_RPC_ANSWER = 64 * 1024  # an RPC answer on an RPC stream is a few hundred bytes
MAX_REFUSED = 1024  # connection ids remembered whose packets are dropped unanswered (QuicEndpoint.refused)
RESETS_PER_SECOND = 100  # stateless resets an endpoint sends at most, a second
APPLICATION_ERROR = 0x100  # the error code of a connection the edge closes for a protocol violation


class RpcAnswerError(TunnelStreamError):
    """The connector answered a call on an RPC stream badly (no answer, too large, malformed)."""


@dataclass
class _ResetBudget:
    """At most RESETS_PER_SECOND stateless resets a second per endpoint (RFC 9000 §10.3 asks for a limit:
    a reset answers packets anyone can forge)."""

    window: float = -math.inf
    used: int = 0

    def take(self) -> bool:
        now = time.monotonic()
        if now - self.window >= 1.0:
            self.window, self.used = now, 0
        if self.used >= RESETS_PER_SECOND:
            return False
        self.used += 1
        return True


@dataclass
class _Drops:
    """Rate-limited WARNINGs for datagrams the endpoint drops (counted, logged now and then)."""

    where: str
    counts: dict[str, int] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)

    def drop(self, kind: str, detail: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = time.monotonic()
        if now - self.last.get(kind, -math.inf) >= WARN_INTERVAL:
            self.last[kind] = now
            log.warning("QUIC %s: dropped a datagram: %s (%d so far) %s", kind, detail, self.counts[kind],
                        self.where)


class DataCentre(Protocol):
    """What the endpoint reads of its data centre's tunnel listener (edge.server.TunnelListener)."""

    location: str
    host: str
    port: int
    cert_kind: str  # "valid" or a broken kind (the swap-cert fault)
    up: bool  # False while the data centre is down (dc-down)


class QuicTunnelStream(H2TunnelStream):
    """A stream on a QUIC connection. A request stream's response head is a ConnectResponse; a `raw`
    stream (an RPC stream, either side's) hands every byte after its signature to the reader."""

    def __init__(self, conn: QuicTunnelConnection, stream_id: int, kind: ConnectionType,
                 max_head_bytes: int, *, raw: bool = False) -> None:
        super().__init__(conn, stream_id)
        self.kind = kind
        self.raw = raw
        self.head = StreamHeadReader(expect="response", max_head_bytes=max_head_bytes)
        self.written = 0  # bytes given to qh3 for this stream (head included)
        self.send_stopped: int | None = None  # the connector's STOP_SENDING code, once it sent one
        if raw:
            self.response = []


class _QuicCloser:
    """What the shared connection code closes at the end: the QUIC connection."""

    def __init__(self, conn: QuicTunnelConnection) -> None:
        self._conn = conn

    async def aclose(self) -> None:
        self._conn.close_quic()


class QuicTunnelConnection(H2TunnelConnection):
    """The edge side of one QUIC tunnel connection, from the first Initial packet to close.

    Shares registration, draining, faults and identity with the http2 connection; the stream
    operations and the transport are QUIC's.
    """

    def __init__(self, edge: EdgeState[TunnelConnection], endpoint: QuicEndpoint, quic: CreditConnection, *,
                 location: str, remote: tuple[Any, ...]) -> None:
        super().__init__(edge, _QuicCloser(self), location=location, remote=_fmt(remote))  # type: ignore[arg-type]
        self.endpoint = endpoint
        self.quic = quic
        if self.trace is not None:  # made by the http2 base class: this one is QUIC
            self.trace.ids["transport"] = "quic"
            self.trace.request_direction = "out"
            quic.trace = self.trace  # type: ignore[attr-defined]  # a TracedQuicConnection
        self.handshake_done = False
        self._wake = trio.lowlevel.ParkingLot()  # the connection's task: timers, a fatal error, the end
        self._sent_lot = trio.lowlevel.ParkingLot()  # writers waiting for qh3 to send what they queued
        # Hooks for the UDP side (edge/udp*.py): datagrams in, RPC streams the connector opens.
        self.datagram_handler: Callable[[bytes], None] | None = None
        self.rpc_stream_handler: Callable[[QuicTunnelStream], None] | None = None
        self.raw_streams: dict[int, QuicTunnelStream] = {}  # RPC streams: not eyeball streams
        self._incoming: dict[int, StreamHeadReader] = {}  # connector-opened streams, head not yet read
        self._fatal: TunnelLabError | None = None
        self._terminated = False
        self._quic_closed = False
        self.silenced = False  # faults quic-idle / quic-blackhole: nothing in or out, out of routing
        # Datagrams are fed from the first Initial on, before `run` runs: the RPC server exists already.
        from tunnel_lab.wire.rpc import RpcServer

        self._rpc = RpcServer()

    # ---- lifetime ----------------------------------------------------------------------------
    async def _start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._handshake_deadline)
        await trio.lowlevel.checkpoint()

    async def _serve_transport(self) -> None:
        await self._drive()

    async def _handshake_deadline(self) -> None:
        await trio.sleep(self.edge.config.handshake_timeout)
        if not self.handshake_done:
            self._note_close("QUIC handshake did not complete in time")
            log.info("QUIC handshake with a connector did not complete within %gs %s",
                     self.edge.config.handshake_timeout, self.ident())
            self.abort("QUIC handshake timeout")

    async def _drive(self) -> None:
        """qh3's timers, and the end of the connection (closed by the peer, idle, or a fatal error)."""
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self._terminated:
                return
            timer = self.quic.get_timer()
            with trio.move_on_at(timer if timer is not None else math.inf):
                await self._wake.park()
            now = trio.current_time()
            if timer is not None and now >= timer:
                self.quic.handle_timer(now)
                self._after_input()

    @property
    def routable(self) -> bool:
        """May new eyeball streams go to this connection? Not once a fault silenced it."""
        return not self.silenced and super().routable

    def silence(self, why: str) -> None:
        """Go dark (faults quic-idle, quic-blackhole): drop what arrives, send nothing, take no new streams.

        The connector finds out only at its idle timeout (5 s for cloudflared), as on a path that went
        dark; qh3's idle timer ends this side the same way, without a CONNECTION_CLOSE.
        """
        if not self.silenced:
            self.silenced = True
            log.warning("QUIC connection silenced by a fault (%s): nothing in or out until its idle "
                        "timeout %s", why, self.ident())

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Feed one datagram (the endpoint calls `after_input` once per batch)."""
        if self.silenced:
            return
        self.quic.receive_datagram(data, addr, now=trio.current_time())

    def after_input(self, datagrams: int = 1) -> None:
        """Handle what a batch of datagrams produced: events, then one round of sending."""
        if datagrams > 1:
            # A run of packets (a transfer): acknowledge it in the round of sending below (after two, as
            # RFC 9000 §13.2.2 suggests), not at qh3's 1 ms ack timer, which a busy trio loop serves
            # late; the sender's congestion control is clocked by these ACKs.
            ack_now(self.quic)
        self._after_input()

    def _after_input(self) -> None:
        self._handle_events()
        self.transmit()
        self._sent_lot.unpark_all()

    def _handle_events(self) -> None:
        try:
            self._process_events()
        except TunnelLabError as exc:
            if self._fatal is None:
                self._fatal = exc
            self._wake.unpark_all()

    def transmit(self) -> None:
        """Send every datagram qh3 has ready; wake the timer task (the timer may have moved)."""
        datagrams = self.quic.datagrams_to_send(now=trio.current_time())
        if not self.silenced:
            self.endpoint.send_all(datagrams)
        # Building those datagrams may have issued connection ids (NEW_CONNECTION_ID): route them before
        # the peer can use one, or its next packets would find no connection.
        self._handle_events()
        self._wake.unpark_all()

    def close_quic(self) -> None:
        """CONNECTION_CLOSE (once) and forget the connection ids."""
        if not self._quic_closed:
            self._quic_closed = True  # (a silenced connection's CONNECTION_CLOSE is dropped by transmit)
            code = 0 if self.close_reason in ("", "drained") or self.state == "closed" else APPLICATION_ERROR
            self.quic.close(error_code=code, reason_phrase=self.close_reason[:100])
            self.transmit()
        self.endpoint.forget(self)

    # ---- qh3 events --------------------------------------------------------------------------
    def _process_events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if self.trace is not None:
                self.trace.quic_event(event)
            if isinstance(event, qevents.StreamDataReceived):
                self._on_stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, qevents.StreamReset):
                self._on_stream_reset(event.stream_id, event.error_code)
            elif isinstance(event, qevents.StopSendingReceived):
                # Only our sending side ends (qh3 resets it): the answer may still come, e.g. an
                # http_status rule answers without reading the request body.
                state = stream_state(self.quic, event.stream_id)
                if state is not None:
                    hold_unsent(state)  # qh3 reset our side on STOP_SENDING
                stream = self.streams.get(event.stream_id) or self.raw_streams.get(event.stream_id)
                if isinstance(stream, QuicTunnelStream):
                    stream.send_stopped = event.error_code
                    stream.local_closed = True
                    self._sent_lot.unpark_all()
            elif isinstance(event, qevents.HandshakeCompleted):
                self.handshake_done = True
                log.info("connector connected over QUIC location=%s remote=%s conn=#%d alpn=%s",
                         self.location, self.remote, self.serial, event.alpn_protocol)
                self.edge.registry.add(self)
            elif isinstance(event, qevents.ConnectionIdIssued):
                self.endpoint.route(event.connection_id, self)
            elif isinstance(event, qevents.ConnectionIdRetired):
                self.endpoint.unroute(event.connection_id)
            elif isinstance(event, qevents.ConnectionTerminated):
                self._on_terminated(event)
            elif isinstance(event, qevents.DatagramFrameReceived):
                if self.datagram_handler is not None:
                    self.datagram_handler(event.data)
                else:
                    log.debug("QUIC datagram of %d bytes ignored (no UDP sessions here) %s",
                              len(event.data), self.ident())

    def _on_terminated(self, event: qevents.ConnectionTerminated) -> None:
        self._terminated = True
        self._wake.unpark_all()
        reason = event.reason_phrase or ""
        if not self.handshake_done:
            # qh3 closes with a TLS alert (CRYPTO_ERROR 0x1xx) when, e.g., no ALPN or key share matches.
            self._note_close(f"QUIC handshake failed: error 0x{event.error_code:x} {reason}".rstrip())
            log.warning("QUIC handshake with a connector failed (error 0x%x%s) location=%s remote=%s",
                        event.error_code, f": {reason}" if reason else "", self.location, self.remote)
            return
        detail = f": {reason}" if reason else ""
        self._note_close(f"connection closed (QUIC error 0x{event.error_code:x}{detail})")
        log.info("QUIC connection closed by the connector or idle (error 0x%x %s) %s", event.error_code,
                 reason, self.ident())

    def _on_stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if stream_id == CONTROL_STREAM_ID:
            if data:
                self._feed_rpc(data)
            if end:
                self._control_ended("the connector ended the control stream")
            return
        stream = self.streams.get(stream_id) or self.raw_streams.get(stream_id)
        if stream is None:
            if stream_id % 2 == 0:  # client-initiated: an RPC stream, or a stream we do not serve
                self._on_incoming(stream_id, data, end)
            return
        assert isinstance(stream, QuicTunnelStream)
        kept = self._on_tunnel_data(stream, data, end)
        if kept < len(data):  # the ConnectResponse, or bytes dropped: consumed here, not by the eyeball
            self.quic.consumed(stream_id, len(data) - kept)

    def _on_tunnel_data(self, stream: QuicTunnelStream, data: bytes, end: bool) -> int:
        """Queue a data stream's bytes for the eyeball side; returns how many were queued."""
        if stream.released or stream.error is not None:
            return 0
        if stream.response is None:
            try:
                head = stream.head.feed(data)
            except QuicStreamError as exc:
                self._bad_head(stream, str(exc))
                return 0
            if head is None:
                if end:
                    self._bad_head(stream, "stream ended before its ConnectResponse was whole")
                return 0
            assert isinstance(head.message, ConnectResponse)
            if not self._on_response_head(stream, head.message):
                return 0
            data = head.rest
        if data:
            stream._chunks.append((data, len(data)))
        if end:
            stream.ended = True
        stream._wake()
        return len(data)

    def _on_incoming(self, stream_id: int, data: bytes, end: bool) -> None:
        """A stream the connector opened (not the control stream): only RPC streams are accepted."""
        reader = self._incoming.get(stream_id)
        if reader is None:
            if self.rpc_stream_handler is None:
                log.warning("connector opened QUIC stream=%d, which this edge does not serve; resetting it "
                            "%s", stream_id, self.ident())
                self._stop(stream_id, ErrorCodes.REFUSED_STREAM)
                return
            reader = self._incoming[stream_id] = StreamHeadReader(expect="request", allow_rpc=True)
        try:
            head = reader.feed(data)
            if head is not None and head.message is not None:
                raise QuicStreamError("a data stream opened by the connector (only the edge opens those)")
        except QuicStreamError as exc:
            del self._incoming[stream_id]
            log.warning("bad stream=%d opened by the connector: %s %s", stream_id, exc, self.ident())
            self._stop(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        if head is None:
            if end:
                del self._incoming[stream_id]
            return
        del self._incoming[stream_id]
        stream = QuicTunnelStream(self, stream_id, ConnectionType.TCP, 0, raw=True)
        self.raw_streams[stream_id] = stream
        if head.rest:
            stream._chunks.append((head.rest, len(head.rest)))
        stream.ended = end
        assert self.rpc_stream_handler is not None
        self.rpc_stream_handler(stream)

    def open_rpc_stream(self) -> QuicTunnelStream:
        """Open an RPC stream (the RPC signature is queued); read and write it like any stream, then
        `release` it. For the configuration push and UDP session calls."""
        stream_id = self.quic.get_next_available_stream_id()
        stream = QuicTunnelStream(self, stream_id, ConnectionType.TCP, 0, raw=True)
        self.raw_streams[stream_id] = stream
        self.quic.send_stream_data(stream_id, rpc_stream_preamble())
        stream.written = len(rpc_stream_preamble())
        self.transmit()
        return stream

    async def rpc_call(self, client: Any, question_id: int, *, max_bytes: int = MAX_RPC_ANSWER) -> Any:
        """One call on a fresh RPC stream: send what `client` (a wire.session_rpc.SessionRpcClient with
        the call queued) has, feed it the answer, return the event for `question_id` (CallFailed for an
        exception). Raises RpcAnswerError if the stream ends first or the answer is malformed or over
        `max_bytes`, TunnelStreamError if the connection fails."""
        stream = self.open_rpc_stream()
        try:
            await stream.send(client.data_to_send())
            received = 0
            while True:
                item = await stream.receive()
                if item is None:
                    raise RpcAnswerError("the connector ended the RPC stream without an answer")
                received += len(item[0])
                if received > max_bytes:
                    raise RpcAnswerError(f"the connector's RPC answer is over {max_bytes} bytes")
                try:
                    events = client.receive_data(item[0])
                except TunnelLabError as exc:
                    raise RpcAnswerError(f"bad Cap'n Proto on an RPC stream: {exc}") from exc
                for event in events:
                    if getattr(event, "question_id", None) == question_id:
                        client.abort()
                        await stream.send(client.data_to_send(), end=True)
                        return event
                out = client.data_to_send()
                if out:
                    await stream.send(out)
        finally:
            await stream.release()

    async def push_configuration(self, version: int, config: bytes) -> tuple[int, str]:
        """updateConfiguration on an RPC stream (docs/protocol.md §13.5): the version the connector now
        runs and its error text ("" when it applied or kept it). Raises TunnelStreamError."""
        from tunnel_lab.wire import session_rpc

        client = session_rpc.SessionRpcClient()
        question = client.update_configuration(version, config)
        with trio.fail_after(self.edge.config.origin_timeout):
            event = await self.rpc_call(client, question)
        if not isinstance(event, session_rpc.ConfigurationUpdated):
            raise TunnelStreamError(f"updateConfiguration failed: {getattr(event, 'reason', event)!r}")
        log.info("updateConfiguration version=%d: the connector runs version %d%s %s", version,
                 event.latest_version, f" (error: {event.error})" if event.error else "", self.ident())
        return event.latest_version, event.error

    def send_datagram(self, data: bytes) -> None:
        """Send one QUIC DATAGRAM frame now (unreliable; dropped if the connection is gone)."""
        if self.closed.is_set() or self._terminated:
            return
        self.quic.send_datagram_frame(data)
        self.transmit()

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a task that lives as long as this connection (cancelled when it closes)."""
        if self._nursery is None:
            raise TunnelStreamError("the connection is not running", retryable=True)
        self._nursery.start_soon(fn, *args)

    def _on_response_head(self, stream: QuicTunnelStream, response: ConnectResponse) -> bool:
        try:
            headers = headers_from_connect_response(response, request_type=stream.kind)
        except QuicStreamError as exc:
            self._bad_head(stream, str(exc))
            return False
        if response.error:
            log.info("connector answered stream=%d with an error: %s %s", stream.id, response.error[:200],
                     self.ident())
        limit = self.edge.config.max_response_headers
        size = header_list_size(headers)
        if size > limit:
            log.warning("response headers of %d bytes over the lab limit of %d; stream=%d %s",
                        size, limit, stream.id, self.ident())
            stream._fail(OversizedHeadersError(
                f"response headers of {size} bytes exceed the lab's limit of {limit} bytes"))
            self._stop(stream.id, ErrorCodes.CANCEL)
            return False
        stream.response = headers
        return True

    def _bad_head(self, stream: QuicTunnelStream, why: str) -> None:
        log.warning("bad ConnectResponse on stream=%d: %s %s", stream.id, why, self.ident())
        stream._fail(TunnelStreamError(f"the connector's answer is malformed: {why}"))
        self._stop(stream.id, ErrorCodes.PROTOCOL_ERROR)

    def _on_stream_reset(self, stream_id: int, code: int) -> None:
        if stream_id == CONTROL_STREAM_ID:
            self._control_ended(f"the connector reset the control stream ({code})")
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream._fail(TunnelStreamError(f"connector reset the stream (error {code})",
                                           retryable=False, reset_code=int(code)))

    def _stop(self, stream_id: int, code: int) -> None:
        """Abandon what is still open of a stream: RESET_STREAM our side, STOP_SENDING theirs.

        qh3 forgets a stream once both sides finished, and its reset_stream/stop_stream would then
        create a fresh one and announce a final size of 0, which the peer rightly treats as a
        connection error (FINAL_SIZE_ERROR): so only streams qh3 still holds are touched.
        """
        state = stream_state(self.quic, stream_id)
        if state is None:
            return
        if not state.sender.is_finished:
            with contextlib.suppress(ValueError, AssertionError):
                self.quic.reset_stream(stream_id, int(code))
            hold_unsent(state)
        if not state.receiver.is_finished:
            with contextlib.suppress(ValueError, AssertionError):
                self.quic.stop_stream(stream_id, int(code))

    def _reset_now(self, stream_id: int, code: int) -> None:
        # how the inherited reset_stream and reset_all_streams abandon a stream
        self._stop(stream_id, code)

    # ---- the control stream ------------------------------------------------------------------
    def _pump_control(self) -> None:
        backlog, self._control_backlog = self._control_backlog, b""
        if backlog:
            self.quic.send_stream_data(CONTROL_STREAM_ID, backlog)

    async def flush(self) -> None:
        """Send what qh3 has queued (writes never block: a full socket buffer drops datagrams)."""
        await trio.lowlevel.checkpoint()
        if self.closed.is_set():
            return
        self.transmit()

    # ---- stream API (used by the eyeball side) -----------------------------------------------
    async def open_stream(self, headers: Headers, *, end_stream: bool) -> QuicTunnelStream:
        """Open a request stream: the ConnectRequest for `headers`, FIN at once when `end_stream`."""
        if not self.routable:
            raise TunnelStreamError("connection is not accepting new streams", retryable=True)
        try:
            request = connect_request_from_headers(headers, has_body=not end_stream)
        except QuicStreamError as exc:
            raise TunnelStreamError(f"cannot express the request over QUIC: {exc}") from exc
        stream_id = self.quic.get_next_available_stream_id()
        stream = QuicTunnelStream(self, stream_id, request.type, self.edge.config.max_response_headers)
        self.streams[stream_id] = stream
        self.quic.hold(stream_id)  # its receive window follows what the eyeball side takes (acknowledge)
        head = encode_connect_request(request)
        self.quic.send_stream_data(stream_id, head, end_stream=end_stream)
        stream.written = len(head)
        stream.local_closed = end_stream
        log.debug("opened QUIC stream=%d type=%s %s", stream_id, request.type.name.lower(), self.ident())
        return await self._hand_over(stream)

    def _unsent(self, stream: QuicTunnelStream) -> int:
        state = stream_state(self.quic, stream.id)
        if state is None:
            return 0
        return max(0, stream.written - int(state.sender.next_offset))

    async def send_stream_data(self, stream: H2TunnelStream, data: bytes, *, end: bool) -> None:
        """Queue body bytes; waits while the stream has more than SEND_BUFFER_LIMIT unsent."""
        assert isinstance(stream, QuicTunnelStream)
        if stream.error is not None:
            raise stream.error
        if stream.send_stopped is not None:
            raise TunnelStreamError(f"the connector stopped reading the stream ({stream.send_stopped})")
        if stream.local_closed:
            raise TunnelStreamError("stream already ended by the edge")
        try:
            self.quic.send_stream_data(stream.id, bytes(data), end_stream=end)
        except (ValueError, AssertionError) as exc:
            raise TunnelStreamError(f"stream closed while sending: {exc}") from exc
        stream.written += len(data)
        if end:
            stream.local_closed = True
        await self._stream_flush()
        while self._unsent(stream) > SEND_BUFFER_LIMIT:
            if stream.error is not None:
                raise stream.error
            if stream.send_stopped is not None:
                raise TunnelStreamError(f"the connector stopped reading the stream ({stream.send_stopped})")
            if self.closed.is_set():
                raise TunnelStreamError("tunnel connection closed while sending", retryable=False)
            await self._sent_lot.park()

    async def end_stream(self, stream: H2TunnelStream, trailers: Headers | None) -> None:
        """FIN on our side. QUIC data streams carry no trailers: they are dropped (logged)."""
        if stream.local_closed:
            return
        if stream.error is not None:
            raise stream.error
        if trailers:
            log.debug("request trailers dropped on QUIC stream=%d (the protocol has none) %s", stream.id,
                      self.ident())
        await self.send_stream_data(stream, b"", end=True)

    async def acknowledge(self, stream_id: int, length: int) -> None:
        """The eyeball side took `length` bytes: the stream's window (and the connection's) slides."""
        if self.quic.consumed(stream_id, length) and not self.closed.is_set():
            self.transmit()
        await trio.lowlevel.checkpoint()

    async def release_stream(self, stream: H2TunnelStream) -> None:
        """Forget a stream: abandon it if still open, send that now."""
        self._forget(stream)
        if not self.closed.is_set():
            self.transmit()
        await trio.lowlevel.checkpoint()

    def _forget(self, stream: H2TunnelStream) -> None:
        self.streams.pop(stream.id, None)
        self.raw_streams.pop(stream.id, None)
        stream._chunks.clear()
        self.quic.release(stream.id)  # what it still held (and anything arriving later) is free
        if self.closed.is_set():
            return
        if not (stream.local_closed and stream.ended) or stream.error is not None:
            self._stop(stream.id, ErrorCodes.CANCEL)
        self._slot_lot.unpark_all()
        if not self.streams:
            self._idle_lot.unpark_all()

    async def _stream_flush(self) -> None:
        if self.closed.is_set() or self._terminated:
            raise TunnelStreamError("tunnel connection closed", retryable=True)
        await self.flush()

    # ---- faults and closing ------------------------------------------------------------------
    async def _cleanup(self) -> None:
        for stream in list(self.raw_streams.values()):
            stream._fail(TunnelStreamError(f"tunnel connection closed: {self.close_reason or 'closed'}"))
        await super()._cleanup()

    async def send_goaway(self, error_code: int = 0, debug: bytes = b"") -> None:
        """No new streams from the edge (cloudflared's QUIC protocol has no GOAWAY frame)."""
        ErrorCodes(error_code)  # a bad code raises before anything changed, as over http2
        self.goaway_sent = True
        await trio.lowlevel.checkpoint()


def _fmt(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class QuicEndpoint:
    """One UDP socket of a data centre: routes datagrams to connections, starts new ones."""

    def __init__(self, state: EdgeState[TunnelConnection], pki: LabPKI, lst: DataCentre, sock: socket.socket,
                 spawn: Callable[..., None], reset_key: bytes) -> None:
        self.state = state
        self.reset_key = reset_key  # stateless reset tokens derive from it (wire.stateless_reset)
        # Connection ids whose packets are dropped unanswered (bounded, oldest out): handshakes a
        # quic-refuse-handshake fault refused (the client's other Initial packets of that attempt are not
        # new connections), and those of connections a fault silenced, after they ended.
        self.refused: dict[bytes, None] = {}
        self.resets = _ResetBudget()
        self.pki = pki
        self.lst = lst
        self.sock = sock
        self.sender = udp.DatagramSender(sock)
        self.gro = udp.enable_gro(sock)
        self.spawn = spawn  # starts a task in the edge's handler nursery (outlives the listeners)
        self.connections: dict[bytes, QuicTunnelConnection] = {}
        self.live: set[QuicTunnelConnection] = set()
        self.drops = _Drops(f"location={lst.location} address={lst.host}:{lst.port}")
        self._configs: dict[str, QuicConfiguration] = {}
        self.accepting = True
        self._scope = trio.CancelScope()

    async def serve_datagrams(self) -> None:
        """Read datagrams in batches and dispatch them, until stopped and idle; then close the socket."""
        sock = self.sock
        try:
            with self._scope:
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    dark = self.blackholed()
                    fed: dict[QuicTunnelConnection, int] = {}  # in order, once each: datagrams fed
                    for _ in range(RECEIVE_BATCH):
                        try:
                            datagrams, addr = udp.receive(sock, self.gro)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:  # e.g. an ICMP error reported on the socket
                            log.debug("QUIC recvfrom: %s", exc)
                            continue
                        if dark:
                            continue  # fault quic-blackhole: read and dropped
                        for data in datagrams:
                            conn = self.handle(data, addr)
                            if conn is not None:
                                fed[conn] = fed.get(conn, 0) + 1
                    # One round of events and sending per connection and batch, not per datagram: a
                    # download's ACKs and an upload's packets go out together.
                    for conn, count in fed.items():
                        self._guarded(conn, conn.after_input, count)
        finally:
            for conn in list(self.live):
                conn.abort("the QUIC listener closed")
            sock.close()

    def stop_accepting(self) -> None:
        """No new connections; the socket stays open while connections drain (edge shutdown)."""
        self.accepting = False
        if not self.live:
            self._scope.cancel()

    def configuration(self) -> QuicConfiguration:
        """The server configuration for a new connection (the certificate follows swap-cert faults)."""
        kind = self.lst.cert_kind
        config = self._configs.get(kind)
        if config is None:
            pki = self.pki
            paths = pki.edge_cert_paths() if kind == "valid" else pki.broken_cert_paths(kind, "edge")
            # max_datagram_size: quic-go's packets grow to 1452 bytes; qh3's server stays at 1280 (only
            # its client probes), too small for a DATAGRAM with a full 1280-byte UDP payload (edge/udp.py)
            config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN], idle_timeout=IDLE_TIMEOUT,
                                       max_datagram_frame_size=65535, max_datagram_size=1452)
            config.load_cert_chain(str(paths.cert), str(paths.key))
            self._configs[kind] = quic_keylog(config)
        return config

    def send(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.send_all([(data, addr)])

    def blackholed(self) -> bool:
        """Is a quic-blackhole fault active for this data centre (every datagram in and out dropped)?"""
        return any(f.params.get("location") == self.lst.location
                   for f in self.state.faults.of_kind("quic-blackhole"))

    def send_all(self, datagrams: list[tuple[bytes, Any]]) -> None:
        """Send qh3's datagrams, runs to one address batched into one system call (transport.udp)."""
        if datagrams and self.blackholed():
            return
        i = 0
        while i < len(datagrams):
            addr = datagrams[i][1]
            j = i + 1
            while j < len(datagrams) and datagrams[j][1] == addr:
                j += 1
            try:
                self.sender.send([data for data, _ in datagrams[i:j]], addr)
            except OSError as exc:  # a full buffer or an unreachable peer is no error (QUIC recovers)
                log.debug("QUIC sendto %s failed: %s", addr, exc)
            i = j

    def route(self, cid: bytes, conn: QuicTunnelConnection) -> None:
        self.connections[cid] = conn

    def unroute(self, cid: bytes) -> None:
        self.connections.pop(cid, None)

    def forget(self, conn: QuicTunnelConnection) -> None:
        for cid in [c for c, v in self.connections.items() if v is conn]:
            del self.connections[cid]
            if conn.silenced:
                # Its path stays dark: the peer's last packets (it may time out after us) get no
                # Stateless Reset, which would tell it what a dark path cannot.
                self.refused[cid] = None
                if len(self.refused) > MAX_REFUSED:
                    del self.refused[next(iter(self.refused))]
        self.live.discard(conn)
        if not self.accepting and not self.live:
            self._scope.cancel()

    def handle(self, data: bytes, addr: tuple[Any, ...]) -> QuicTunnelConnection | None:
        """One datagram: to its connection (returned, to be told `after_input`), a new connection, a
        version negotiation, or dropped."""
        try:
            header = pull_quic_header(data, 0, 8)
        except ValueError as exc:
            self.drops.drop("garbage", f"not a QUIC packet from {_fmt(addr)} ({exc})")
            return None
        version, packet_type, _, dcid, scid = header[0], header[1], header[2], header[3], header[4]
        conn = self.connections.get(dcid)
        if conn is not None:
            return self._guarded(conn, conn.datagram_received, data, addr)
        if dcid in self.refused:
            return None  # the rest of a refused handshake, or a silenced connection's
        if version is None:
            self._stateless_reset(data, addr)
            return None
        if packet_type != QuicPacketType.INITIAL:
            self.drops.drop("unknown-connection", f"a packet for no known connection from {_fmt(addr)}")
            return None
        config = self.configuration()
        if version not in config.supported_versions:
            self.send(encode_quic_version_negotiation(source_cid=dcid, destination_cid=scid,
                                                      supported_versions=config.supported_versions), addr)
            return None
        if len(data) < MIN_INITIAL_SIZE:
            self.drops.drop("short-initial", f"an Initial of {len(data)} bytes from {_fmt(addr)}")
            return None
        if not self.lst.up or not self.accepting:
            return None  # the data centre is down (dc-down) or the edge shuts down: a black hole
        if len(self.live) >= MAX_CONNECTIONS:
            self.drops.drop("flood", f"{len(self.live)} connections on this endpoint already")
            return None
        quic_class = KeyedResetConnection if self.state.trace is None else TracedKeyedResetConnection
        quic = quic_class(configuration=config, original_destination_connection_id=dcid,
                          reset_key=self.reset_key, check_server_name=self._check_sni(addr))
        without_pacing(quic)
        refusal = self.state.faults.take_quic_handshake_refusal(self.lst.location)
        if refusal is not None:
            self.refused[dcid] = None
            if len(self.refused) > MAX_REFUSED:
                del self.refused[next(iter(self.refused))]
            self._refuse(quic, data, addr, *refusal)
            return None
        conn = QuicTunnelConnection(self.state, self, quic, location=self.lst.location, remote=addr)
        self.live.add(conn)
        self.route(dcid, conn)
        self.route(quic.host_cid, conn)
        self.spawn(conn.run)
        return self._guarded(conn, conn.datagram_received, data, addr)

    def _check_sni(self, addr: tuple[Any, ...]) -> Callable[[str | None], None]:
        def check(name: str | None) -> None:
            if name not in (SNI, PROBE_SNI):
                log.warning("QUIC handshake from %s with SNI %r, not %r: refused (unrecognized_name) "
                            "location=%s", _fmt(addr), name, SNI, self.lst.location)
                raise AlertUnrecognizedName(f"unknown server name {name!r}")
        return check

    def _refuse(self, quic: QuicConnection, data: bytes, addr: tuple[Any, ...], code: int,
                reason: str) -> None:
        """Fault quic-refuse-handshake: answer a new connection's Initial with CONNECTION_CLOSE at once."""
        now = trio.current_time()
        try:
            quic.receive_datagram(data, addr, now=now)
        except (ValueError, AssertionError, KeyError, IndexError) as exc:
            self.drops.drop("malformed", f"{exc!r} from {_fmt(addr)}")
            return
        # A transport-level close (a frame type given): an application close before the handshake is sent
        # as APPLICATION_ERROR without its reason (RFC 9000 section 10.2.3), hiding the code.
        quic.close(error_code=code, frame_type=0, reason_phrase=reason)
        self.send_all(quic.datagrams_to_send(now=now))
        log.warning("fault quic-refuse-handshake: closed a new QUIC connection from %s with error 0x%x (%s) "
                    "location=%s", _fmt(addr), code, reason, self.lst.location)

    def _stateless_reset(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Answer a short-header packet for no connection we know with a Stateless Reset (RFC 9000 §10.3).

        After an edge restart, a connector's packets carry connection ids the old edge issued; their tokens
        derive from the key in the state directory, so the connector learns at once that its connection is
        gone instead of at its idle timeout. Rate-limited, and never for a packet too short to answer
        with a smaller reset (wire.stateless_reset.reset_for).
        """
        reset = reset_for(self.reset_key, data, self.configuration().connection_id_length)
        if reset is None:
            self.drops.drop("unknown-connection", f"a short packet for no known connection from {_fmt(addr)}")
            return
        if not self.resets.take():
            self.drops.drop("reset-rate", f"over {RESETS_PER_SECOND} stateless resets a second")
            return
        self.drops.drop("unknown-connection", f"a packet for no known connection from {_fmt(addr)}; "
                                              "answered with a Stateless Reset")
        self.send(reset, addr)

    def _guarded(self, conn: QuicTunnelConnection, fn: Callable[..., None],
                 *args: Any) -> QuicTunnelConnection | None:
        """Run `fn(*args)` for `conn`; what it raises stays with that connection. Returns `conn`."""
        try:
            fn(*args)
        except (ValueError, AssertionError, KeyError, IndexError) as exc:
            # qh3 rejects some malformed packets by raising: the datagram goes, the connection stays.
            self.drops.drop("malformed", f"{exc!r} {conn.ident()}")
        except Exception as exc:
            # A bug of ours must not end the endpoint (and every other connection on it): only this one.
            log.error("QUIC connection failed on a datagram %s", conn.ident(), exc_info=exc)
            conn.abort(f"internal error: {exc!r}")
        return conn


async def serve_quic_endpoint(state: EdgeState[TunnelConnection], pki: LabPKI, lst: DataCentre,
                              spawn: Callable[..., None], reset_key: bytes,
                              task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen for QUIC on the data centre's TCP address (UDP, same host and port) until cancelled."""
    family = socket.AF_INET6 if ":" in lst.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        sock.setblocking(False)
        sock.bind((lst.host, lst.port))
    except OSError as exc:
        sock.close()
        log.warning("QUIC listener for location=%s cannot bind UDP %s:%d (%s); this data centre serves "
                    "http2 only", lst.location, lst.host, lst.port, exc)
        task_status.started("")
        return
    host, port = sock.getsockname()[:2]
    endpoint = QuicEndpoint(state, pki, lst, sock, spawn, reset_key)
    bound = _fmt((host, port))
    log.info("QUIC listener location=%s address=%s alpn=%s", lst.location, bound, ALPN)
    # The socket carries the connections too, so it must outlive this listener task (which the edge
    # cancels first on shutdown): the receive loop runs in the handler nursery and ends once the
    # listener stopped and the last connection is gone.
    spawn(endpoint.serve_datagrams)
    try:
        task_status.started(bound)
        await trio.sleep_forever()
    finally:
        endpoint.stop_accepting()

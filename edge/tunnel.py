"""One tunnel connection from a connector: the edge's HTTP/2 client side and the registration RPC.

Roles: the connector dialled us and is the TLS client, but on this connection it is the HTTP/2
*server*; the edge is the HTTP/2 *client* (it sends the preface and opens every stream, odd ids). On
the control stream (stream 1) the connector is the Cap'n Proto RPC client and the edge answers as
the `RegistrationServer` (wire.rpc.RpcServer does the bytes; this module does the I/O and the
decisions: credentials, EDUPCONN, faults).

Concurrency: one reader task feeds h2 and dispatches events synchronously; every task that changes
h2 state has the writer task (`transport.writer.H2Writer`) send it (`flush`). A stream id is allocated and
its HEADERS queued without an await in between, so ids go out strictly increasing.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any, TypeVar

import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes

from tunnel_lab.edge import remote_config
from tunnel_lab.edge.h2conn import new_tunnel_h2
from tunnel_lab.edge.state import EdgeState
from tunnel_lab.transport.h2 import TunnelH2Connection, send_within_window
from tunnel_lab.transport.tunnel import (
    NoCapacityError,
    OversizedHeadersError,
    Registration,
    TunnelConnection,
    TunnelStreamError,
)
from tunnel_lab.transport.writer import H2Writer, WriteStalled
from tunnel_lab.wire.errors import ProtocolError, TunnelLabError
from tunnel_lab.wire.guard import ControlFloodGuard, FrameGuard

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

CONTROL_STREAM_ID = 1
CONTROL_HEADERS: Headers = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"h2.cftunnel.com"),
    (b":path", b"/"),
    (b"cf-cloudflared-proxy-connection-upgrade", b"control-stream"),
]
UNAUTHORIZED = "Unauthorized: Invalid tunnel secret"
# cloudflared sends no PINGs and one SETTINGS; a peer sending thousands is hostile.
CONTROL_FLOOD_LIMIT = 1000
CONTROL_FLOOD_WINDOW = 10.0
DUPLICATE = "EDUPCONN"


def header_list_size(headers: Sequence[tuple[bytes, bytes]]) -> int:
    """RFC 9113 §6.5.2 size: name + value + 32 per field."""
    return sum(len(n) + len(v) + 32 for n, v in headers)


class H2TunnelStream:
    """A stream the edge opened on a tunnel connection (request out, response in)."""

    def __init__(self, conn: H2TunnelConnection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.response: Headers | None = None
        self.trailers: Headers | None = None
        self.ended = False  # END_STREAM received
        self.error: TunnelStreamError | None = None
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self.released = False
        self.local_closed = False

    @property
    def ready(self) -> bool:
        """Would `receive` return (or raise) without waiting?"""
        return bool(self._chunks) or self.ended or self.error is not None

    @property
    def fully_received(self) -> bool:
        """END_STREAM arrived and every buffered chunk was taken."""
        return self.ended and not self._chunks

    # called by the connection's reader (sync)
    def _wake(self) -> None:
        self._lot.unpark_all()

    def _fail(self, error: TunnelStreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    async def response_headers(self) -> Headers:
        """Wait for the response HEADERS (raises TunnelStreamError if the stream dies first)."""
        while self.response is None:
            if self.error is not None:
                raise self.error
            await self._lot.park()
        return self.response

    async def receive(self) -> tuple[bytes, int] | None:
        """Next body chunk and its flow-controlled length (ack it with `ack` once handed on).

        None at END_STREAM; raises TunnelStreamError on reset or connection loss.
        """
        while True:
            if self._chunks:
                return self._chunks.popleft()
            if self.ended:
                return None
            if self.error is not None:
                raise self.error
            await self._lot.park()

    async def receive_many(self, max_bytes: int) -> tuple[bytes, int] | None:
        """Like `receive`, but with every chunk already queued (up to about `max_bytes`) joined into
        one: a bulk response goes to the eyeball in fewer, larger writes and fewer acknowledgements."""
        item = await self.receive()
        if item is None or not self._chunks:
            return item
        data, length = item
        parts, size = [data], len(data)
        while self._chunks and size < max_bytes:
            more, more_length = self._chunks.popleft()
            parts.append(more)
            size += len(more)
            length += more_length
        return b"".join(parts), length

    async def ack(self, flow_controlled_length: int) -> None:
        """Give the window back for bytes that were handed on (backpressure point)."""
        if flow_controlled_length:
            await self.conn.acknowledge(self.id, flow_controlled_length)

    async def send(self, data: bytes, *, end: bool = False) -> None:
        """Send request-body bytes, honouring the connector's windows and frame size."""
        await self.conn.send_stream_data(self, data, end=end)

    async def end(self, trailers: Headers | None = None) -> None:
        """End the request body, with trailers when given."""
        await self.conn.end_stream(self, trailers)

    async def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        """Reset the stream (abandon it)."""
        await self.conn.reset_stream(self, code)

    async def release(self) -> None:
        """The handler is done with the stream: reset it if still open, return unread window."""
        if self.released:
            return
        self.released = True
        await self.conn.release_stream(self)


S = TypeVar("S", bound=H2TunnelStream)


class H2TunnelConnection:
    """The edge side of one tunnel connection, from TLS handshake to close."""

    _counter = 0

    def __init__(self, edge: EdgeState[TunnelConnection], transport: trio.abc.Stream, *, location: str,
                 remote: str) -> None:
        H2TunnelConnection._counter += 1
        self.serial = H2TunnelConnection._counter
        self.edge = edge
        self.transport = transport
        self.location = location
        self.remote = remote
        self.h2: TunnelH2Connection = new_tunnel_h2(initial_window=edge.config.stream_window)
        self._guard = FrameGuard(self.h2.max_inbound_frame_size)
        self.registration: Registration | None = None
        self.state = "connecting"  # connecting -> registered -> draining -> closed
        self.streams: dict[int, H2TunnelStream] = {}
        self._writer = H2Writer(self.h2, transport, write_timeout=edge.config.write_timeout)
        # The protocol trace of this connection (docs/trace.md); None when tracing is off.
        self.trace = None if edge.trace is None else edge.trace.connection(
            conn=f"edge#{self.serial}", dc=location, remote=remote, transport="http2", h2_client_out=True)
        if self.trace is not None:
            self._writer.on_send = self.trace.sent
        self._window_lot = trio.lowlevel.ParkingLot()
        self._slot_lot = trio.lowlevel.ParkingLot()
        self._idle_lot = trio.lowlevel.ParkingLot()
        self._waiting_for_slot = 0
        self._cancel_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._control_backlog = b""
        self._unregistered = False
        self._rpc_over = trio.Event()
        self._control_flood = ControlFloodGuard(CONTROL_FLOOD_LIMIT, CONTROL_FLOOD_WINDOW,
                                                trio.current_time())
        self._rpc: Any = None
        self._rpc_send, self._rpc_receive = trio.open_memory_channel[Any](32)
        self.goaway_sent = False
        self.goaway_received = False
        self.closed = trio.Event()
        self.close_reason = ""
        self._id_for: Registration | None = None
        self._id = ""
        self._ident_for: Registration | None = None
        self._ident = ""

    # ---- identity ----------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """The connection id the API shows: the connection uuid once registered."""
        reg = self.registration
        if reg is None:
            return f"pending-{self.serial}"
        if self._id_for is not reg:  # formatted once per registration, not per request
            self._id_for, self._id = reg, str(reg.conn_uuid)
        return self._id

    def ident(self) -> str:
        """Identity fields for log lines."""
        reg = self.registration
        if reg is None:
            return f"conn=#{self.serial} location={self.location} remote={self.remote}"
        if self._ident_for is not reg:
            self._ident_for = reg
            self._ident = (f"tunnel={reg.tunnel_id} conn={reg.conn_uuid} connIndex={reg.conn_index} "
                           f"location={self.location}")
        return self._ident

    @property
    def routable(self) -> bool:
        """May new eyeball streams go to this connection?"""
        return self.state == "registered" and not self.goaway_sent and not self.goaway_received

    @property
    def active_streams(self) -> int:
        """Eyeball streams in flight (the control stream not counted)."""
        return len(self.streams)

    # ---- main --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run the connection until it closes. Never raises except Cancelled."""
        try:
            with trio.CancelScope() as scope:
                self._cancel_scope = scope
                await self._run()
        # The connection's tasks run in a nursery, so errors arrive in exception groups;
        # trio.Cancelled is not matched here and propagates.
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            self._note_close(f"connection lost: {group.exceptions[0] or 'closed'}")
        except* TunnelLabError as group:
            exc = group.exceptions[0]
            self._note_close(str(exc))
            log.warning("closing tunnel connection: %s %s", exc, self.ident())
        except* Exception as group:
            self._note_close(f"internal error: {group.exceptions[0]!r}")
            log.error("tunnel connection failed %s", self.ident(), exc_info=group)
        finally:
            await self._cleanup()

    def _note_close(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._start(nursery)
            nursery.start_soon(self._control_loop)
            nursery.start_soon(self._registration_deadline)
            await self._serve_transport()
            nursery.cancel_scope.cancel()

    async def _start(self, nursery: trio.Nursery) -> None:
        """The transport's first steps, before the control loop starts (QUIC overrides them)."""
        from tunnel_lab.wire.rpc import RpcServer

        self._rpc = RpcServer()
        self.h2.initiate_connection()
        # Our connection window: large, so many streams can stream at once.
        extra = self.edge.config.connection_window - 65535
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        self.h2.send_headers(CONTROL_STREAM_ID, CONTROL_HEADERS, end_stream=False)
        nursery.start_soon(self._write)
        await self.flush()
        log.debug("HTTP/2 preface, SETTINGS and control stream sent %s", self.ident())

    async def _serve_transport(self) -> None:
        """Read until the connection ends (QUIC overrides it)."""
        await self._reader()

    async def _registration_deadline(self) -> None:
        # A connector that never registers must not hold a connection forever.
        await trio.sleep(self.edge.config.registration_timeout)
        if self.registration is None and self.state == "connecting":
            raise ProtocolError(
                f"no registration within {self.edge.config.registration_timeout:g}s")

    async def _reader(self) -> None:
        first = True
        while True:
            data = await self.transport.receive_some()  # TLS: every record already received
            if not data:
                if first:
                    self._note_close("closed right after the TLS handshake (a precheck probe?)")
                    log.debug("tunnel connection closed without HTTP/2 %s", self.ident())
                else:
                    self._note_close("connector closed the connection")
                    log.info("connector closed the tunnel connection %s", self.ident())
                return
            first = False
            if self.trace is not None:
                self.trace.received(data)
            self._guard.feed(bytes(data))
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                # h2 already queued a GOAWAY; try to send it, then drop the connection.
                self.goaway_sent = True
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.flush()
                raise ProtocolError(f"malformed HTTP/2 from the connector: {exc}") from exc
            for event in events:
                self._dispatch(event)
            await self.flush()

    # ---- h2 events ---------------------------------------------------------------------------
    def _dispatch(self, event: h2.events.Event) -> None:
        if log.isEnabledFor(logging.DEBUG):
            # Names, stream ids and sizes only: header values may carry eyeball cookies.
            detail = ""
            if isinstance(event, h2.events.DataReceived):
                detail = f" length={len(event.data or b'')}"
            elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                detail = f" fields={len(event.headers or [])}"
            elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                detail = f" error_code={_code_name(event.error_code)}"
            elif isinstance(event, h2.events.WindowUpdated):
                detail = f" delta={event.delta}"
            log.debug("h2 %s stream=%s%s %s", type(event).__name__, getattr(event, "stream_id", 0),
                      detail, self.ident())
        if isinstance(event, h2.events.SettingsAcknowledged):
            self.h2.lift_header_list_limit()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._count_control_frame()
            self._window_lot.unpark_all()
            self._slot_lot.unpark_all()
        elif isinstance(event, h2.events.PingReceived):
            self._count_control_frame()  # h2 answers it; we only watch for floods
        elif isinstance(event, h2.events.ResponseReceived):
            self._on_response(event.stream_id, list(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = list(event.headers)
                stream._wake()
        elif isinstance(event, h2.events.StreamEnded):
            if event.stream_id == CONTROL_STREAM_ID:
                self._control_ended("the connector ended the control stream")
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.ended = True
                stream._wake()
        elif isinstance(event, h2.events.StreamReset):
            if event.stream_id == CONTROL_STREAM_ID:
                self._control_ended(f"the connector reset the control stream ({event.error_code!r})")
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                refused = event.error_code == ErrorCodes.REFUSED_STREAM
                stream._fail(TunnelStreamError(
                    f"connector reset the stream ({_code_name(event.error_code)})",
                    retryable=refused and stream.response is None, reset_code=int(event.error_code)))
        elif isinstance(event, h2.events.WindowUpdated):
            self._window_lot.unpark_all()
            self._pump_control()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)
        elif isinstance(event, h2.events.InformationalResponseReceived):
            pass
        self._slot_lot.unpark_all()

    def _count_control_frame(self) -> None:
        self._control_flood.frame(trio.current_time())

    def _on_response(self, stream_id: int, headers: Headers) -> None:
        if stream_id == CONTROL_STREAM_ID:
            log.debug("control stream answered %r %s", headers[:1], self.ident())
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        limit = self.edge.config.max_response_headers
        size = header_list_size(headers)
        if size > limit:
            log.warning("response headers of %d bytes over the lab limit of %d; stream=%d %s",
                        size, limit, stream_id, self.ident())
            stream._fail(OversizedHeadersError(
                f"response headers of {size} bytes exceed the lab's limit of {limit} bytes"))
            self._reset_now(stream_id, ErrorCodes.CANCEL)
            return
        stream.response = headers
        stream._wake()

    def _on_data(self, event: h2.events.DataReceived) -> None:
        length = event.flow_controlled_length or 0
        if event.stream_id == CONTROL_STREAM_ID:
            if length:
                self.h2.acknowledge_received_data(length, CONTROL_STREAM_ID)
            if event.data:
                self._feed_rpc(event.data)
            return
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.released or stream.error is not None:
            if length:
                self.h2.acknowledge_received_data(length, event.stream_id)
            return
        stream._chunks.append((event.data or b"", length))
        stream._wake()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.goaway_received = True
        last = event.last_stream_id or 0
        log.info("connector sent GOAWAY (%s, last stream %d) %s", _code_name(event.error_code), last,
                 self.ident())
        for sid, stream in list(self.streams.items()):
            if sid > last and stream.response is None:
                stream._fail(TunnelStreamError("connector sent GOAWAY before processing the stream",
                                               retryable=True))

    def _control_ended(self, why: str) -> None:
        self._rpc_over.set()
        if self.state == "registered":
            log.info("%s; draining %s", why, self.ident())
            self._start_draining()
        elif self.state == "connecting":
            raise ProtocolError(why)

    # ---- the control stream -----------------------------------------------------------------
    def _feed_rpc(self, data: bytes) -> None:
        try:
            events = self._rpc.receive_data(data)
        except TunnelLabError as exc:
            raise ProtocolError(f"bad Cap'n Proto on the control stream: {exc}") from exc
        for ev in events:
            try:
                self._rpc_send.send_nowait(ev)
            except trio.WouldBlock:
                raise ProtocolError("too many RPC calls queued on the control stream") from None
        self._queue_rpc_output()

    def _queue_rpc_output(self) -> None:
        """Queue whatever the RPC server has to send on the control stream."""
        # Control messages are tiny; Go gives the stream a 1 MiB window, so this never blocks in
        # practice. If it ever did, the bytes wait in h2 state for the next flush after a window
        # update (see _pump_control).
        out = self._rpc.data_to_send()
        if out:
            self._control_backlog += out
            self._pump_control()

    def _pump_control(self) -> None:
        backlog = self._control_backlog
        while backlog:
            window = min(self.h2.local_flow_control_window(CONTROL_STREAM_ID),
                         self.h2.max_outbound_frame_size)
            if window <= 0:
                break
            chunk, backlog = backlog[:window], backlog[window:]
            self.h2.send_data(CONTROL_STREAM_ID, chunk)
        self._control_backlog = backlog

    async def _control_loop(self) -> None:
        from tunnel_lab.wire import rpc

        async for ev in self._rpc_receive:
            if isinstance(ev, rpc.RegisterConnectionCalled):
                await self._on_register(ev.question_id, ev.params)
            elif isinstance(ev, rpc.UpdateLocalConfigurationCalled):
                self._on_update_configuration(ev.question_id, ev.config)
            elif isinstance(ev, rpc.UnregisterConnectionCalled):
                self._on_unregister(ev.question_id)
            elif isinstance(ev, rpc.RpcAborted):
                self._rpc_over.set()
                log.info("connector ended the RPC session (%s) %s", ev.reason, self.ident())
                if self.state == "connecting":
                    raise ProtocolError(f"RPC aborted before registration: {ev.reason}")
                if self.state == "registered":
                    # Without unregistering first: cloudflared gave up on the RPC (e.g. its
                    # --rpc-timeout passed) and now waits for us to close (docs/protocol.md §3.7).
                    self._start_draining()
                continue
            else:  # pragma: no cover - future events
                log.debug("ignoring RPC event %r %s", ev, self.ident())
                continue
            self._pump_control()
            await self.flush()

    async def _on_register(self, question_id: int, params: Any) -> None:
        from tunnel_lab.wire.registration import ConnectionDetails, RegistrationError

        edge = self.edge
        tunnel_id: uuid.UUID = params.tunnel_id
        client = params.options.client
        connector_id = _as_uuid(client.client_id)
        who = (f"tunnel={tunnel_id} connIndex={params.conn_index} connector={connector_id} "
               f"location={self.location} remote={self.remote}")
        log.info("registerConnection %s version=%s", who, client.version)
        if self.registration is not None:
            self._rpc.answer_exception(question_id, "connection already registered")
            return
        delay = edge.faults.take_registration_delay()
        if delay:
            log.warning("fault delay-registrations: holding the answer %.2fs %s", delay, who)
            await trio.sleep(delay)
        refusal = edge.faults.take_registration_refusal()
        result: Any
        remote = None
        if refusal is not None:
            cause, should_retry = refusal
            log.warning("fault refuse-registrations: refusing with cause=%r %s", cause, who)
            result = RegistrationError(cause=cause, should_retry=should_retry)
        else:
            tunnel = edge.tunnels.by_id(tunnel_id)
            if not _credentials_match(tunnel, params.auth):
                log.warning("registration refused: unknown tunnel or wrong secret %s", who)
                result = RegistrationError(cause=UNAUTHORIZED, should_retry=False)
            elif edge.registry.find_duplicate(tunnel_id, connector_id, params.conn_index,
                                              self.location) is not None:
                log.warning("registration refused: EDUPCONN, this connIndex is already connected "
                            "here %s", who)
                result = RegistrationError(cause=DUPLICATE, should_retry=True)
            else:
                conn_uuid = uuid.uuid4()
                self.registration = Registration(
                    tunnel_id=tunnel_id, tunnel_name=getattr(tunnel, "name", ""),
                    conn_index=params.conn_index, connector_id=connector_id,
                    client_version=client.version, arch=client.arch,
                    features=tuple(client.features), conn_uuid=conn_uuid)
                self.state = "registered"
                edge.registry.changed()
                remote = remote_config.current(edge, str(tunnel_id))  # set through the API: pushed below
                if self.trace is not None:
                    self.trace.update(tunnel=str(tunnel_id), conn_uuid=str(conn_uuid),
                                      conn_index=params.conn_index)
                result = ConnectionDetails(uuid=conn_uuid, location_name=self.location,
                                           tunnel_is_remotely_managed=remote is not None)
        self._rpc.answer_registration(question_id, result)
        self._queue_rpc_output()
        await self.flush()
        if isinstance(result, ConnectionDetails):
            edge.metrics.registrations.inc(result="ok", location=self.location)
            log.info("Registered tunnel connection %s connector=%s version=%s", self.ident(),
                     connector_id, client.version)
            if remote is not None and self._nursery is not None:
                self._nursery.start_soon(remote_config.push_after_registration, edge, self, remote)
        else:
            edge.metrics.registrations.inc(result="refused", location=self.location)
            self.state = "refused"
            # cloudflared waits for the edge to close after a refusal (docs/protocol.md §3.7).
            await trio.sleep(self.edge.config.refusal_close_delay)
            await self.goaway_and_close(ErrorCodes.NO_ERROR, f"registration refused: {result.cause}")

    def _on_update_configuration(self, question_id: int, config: bytes) -> None:
        reg = self.registration
        if reg is None:
            self._rpc.answer_exception(question_id, "connection is not registered")
        else:
            self.edge.pushed_configs[str(reg.tunnel_id)] = config
            log.info("updateLocalConfiguration: %d bytes of configuration kept %s", len(config),
                     self.ident())
            self._rpc.answer_empty(question_id)
        self._queue_rpc_output()

    def _on_unregister(self, question_id: int) -> None:
        self._unregistered = True
        self._rpc.answer_empty(question_id)
        self._queue_rpc_output()
        if self.state == "registered":
            log.info("unregisterConnection: draining %d in-flight streams %s", self.active_streams,
                     self.ident())
            self._start_draining()

    def _start_draining(self) -> None:
        """registered -> draining (callers check the state): no new streams; in-flight ones finish,
        then GOAWAY and close."""
        self.state = "draining"
        self.edge.registry.changed()
        assert self._nursery is not None
        self._nursery.start_soon(self.drain_and_close, self.edge.config.drain_timeout, "drained")

    # ---- stream API (used by the eyeball side) ---------------------------------------------
    async def open_stream(self, headers: Headers, *, end_stream: bool) -> H2TunnelStream:
        """Open a request stream; waits (bounded) for a slot under the connector's stream limit."""
        cfg = self.edge.config
        if not self.routable:
            raise TunnelStreamError("connection is not accepting new streams", retryable=True)
        if self._slots_full():
            if self._waiting_for_slot >= cfg.stream_queue_limit:
                raise NoCapacityError("too many requests queued for this connection", retryable=True)
            self._waiting_for_slot += 1
            try:
                with trio.move_on_after(cfg.stream_queue_timeout):
                    while self._slots_full():
                        await self._slot_lot.park()
                if self._slots_full():
                    raise NoCapacityError("no free stream slot on the connection in time", retryable=True)
            finally:
                self._waiting_for_slot -= 1
            if not self.routable:
                raise TunnelStreamError("connection stopped accepting streams", retryable=True)
        stream_id = self.h2.get_next_available_stream_id()
        stream = H2TunnelStream(self, stream_id)
        self.streams[stream_id] = stream
        try:
            self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            del self.streams[stream_id]
            raise TunnelStreamError(f"cannot send request headers: {exc}") from exc
        stream.local_closed = end_stream
        log.debug("opened stream=%d %s", stream_id, self.ident())
        return await self._hand_over(stream)

    async def _hand_over(self, stream: S) -> S:
        """Send a new stream's head, then give the stream to the caller."""
        try:
            await self._stream_flush()
        except BaseException:
            # The caller never got the stream (cancelled by an eyeball reset that came in the same
            # read as the request, or the write failed): it is ours to free, or it leaks forever.
            stream.released = True
            self._forget(stream)
            raise
        return stream

    def _slots_full(self) -> bool:
        limit = self.h2.remote_settings.max_concurrent_streams
        return self.h2.open_outbound_streams >= limit

    async def send_stream_data(self, stream: H2TunnelStream, data: bytes, *, end: bool) -> None:
        """Send DATA on a stream within the peer's windows; waits for WINDOW_UPDATEs."""
        if data:
            def check() -> None:
                if stream.error is not None:
                    raise stream.error

            await send_within_window(
                self.h2, stream.id, data, end_stream=end, flush=self._stream_flush,
                wait_for_window=self._window_lot.park, check=check,
                closed=lambda exc: TunnelStreamError(f"stream closed while sending: {exc}"))
        # Every frame the windows allowed, in one write.
        await self._stream_flush()
        if end:
            if not data:
                await self.end_stream(stream, None)
            stream.local_closed = True

    async def end_stream(self, stream: H2TunnelStream, trailers: Headers | None) -> None:
        """END_STREAM on our side, with trailers when given."""
        if stream.local_closed:
            return
        if stream.error is not None:
            raise stream.error
        try:
            if trailers:
                self.h2.send_headers(stream.id, trailers, end_stream=True)
            else:
                self.h2.end_stream(stream.id)
        except h2.exceptions.ProtocolError as exc:
            raise TunnelStreamError(f"stream closed while ending: {exc}") from exc
        stream.local_closed = True
        await self._stream_flush()

    def _reset_now(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed
            self.h2.reset_stream(stream_id, code)

    async def reset_stream(self, stream: H2TunnelStream, code: int) -> None:
        """RST_STREAM from the edge."""
        self._reset_now(stream.id, code)
        stream._fail(TunnelStreamError("stream reset by the edge", reset_code=int(code)))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.flush()  # best effort: a reset on a dead connection is moot

    async def acknowledge(self, stream_id: int, length: int) -> None:
        """Return flow-control window for bytes the eyeball side consumed."""
        if self.closed.is_set():
            return
        self.h2.acknowledge_received_data(length, stream_id)
        await self._stream_flush()

    async def release_stream(self, stream: H2TunnelStream) -> None:
        """Forget a stream: reset it if still open, hand back window of unread data.

        Runs to the end even when the handler was cancelled (an eyeball reset): the RST_STREAM and the
        window must reach the connector now, not with some later stream's write."""
        self._forget(stream)
        if self.closed.is_set():
            return
        with (trio.CancelScope(shield=True),
              contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError)):
            await self.flush()  # bounded by write_timeout

    def _forget(self, stream: H2TunnelStream) -> None:
        """The synchronous part of releasing a stream (frames are queued, not sent)."""
        self.streams.pop(stream.id, None)
        if self.closed.is_set():
            return
        unread = sum(n for _, n in stream._chunks)
        stream._chunks.clear()
        h2_stream = self.h2.streams.get(stream.id)
        if h2_stream is not None and not h2_stream.closed:
            self._reset_now(stream.id, ErrorCodes.CANCEL)
        if unread:
            self.h2.acknowledge_received_data(unread, stream.id)
        self._slot_lot.unpark_all()
        if not self.streams:
            self._idle_lot.unpark_all()

    # ---- sending, closing --------------------------------------------------------------------
    async def _write(self) -> None:
        try:
            await self._writer.run()
        except WriteStalled:
            self.abort(f"the connector did not read for {self.edge.config.write_timeout:g}s")

    async def flush(self) -> None:
        """Send whatever h2 has queued (through the writer task, bounded by write_timeout).

        Raises `trio.BrokenResourceError` once the connection can write no more."""
        await self._writer.flush()

    async def _stream_flush(self) -> None:
        """`flush` for stream handlers: a dead transport becomes a TunnelStreamError and ends the
        connection, so the eyeball side fails cleanly (or retries) instead of crashing."""
        try:
            await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort(f"connection lost while sending: {exc or type(exc).__name__}")
            raise TunnelStreamError("tunnel connection lost while sending", retryable=True) from exc

    async def send_goaway(self, error_code: int = 0, debug: bytes = b"") -> None:
        """GOAWAY without closing: no new streams from us; in-flight ones go on."""
        self.h2.send_goaway(error_code, 0, debug)  # first: a bad code raises before anything changed
        self.goaway_sent = True
        await self.flush()

    async def reset_all_streams(self, code: int = ErrorCodes.INTERNAL_ERROR) -> int:
        """Reset every eyeball stream in flight (fault injection). Returns how many."""
        count = 0
        for stream in list(self.streams.values()):
            self._reset_now(stream.id, code)
            stream._fail(TunnelStreamError("stream reset by a fault", reset_code=int(code)))
            count += 1
        await self.flush()
        return count

    async def drain_and_close(self, deadline: float, why: str) -> None:
        """Let in-flight streams finish (up to `deadline` seconds), then GOAWAY and close."""
        with trio.move_on_after(deadline):
            while self.streams:
                await self._idle_lot.park()
        if self.streams:
            log.warning("drain deadline passed with %d streams in flight %s", len(self.streams),
                        self.ident())
        if self._unregistered:
            # Let the connector finish its side of the RPC (Finish, Abort, end of the control
            # stream) before the connection goes; cloudflared does that right after unregistering.
            with trio.move_on_after(self.edge.config.rpc_close_grace):
                await self._rpc_over.wait()
        await self.goaway_and_close(ErrorCodes.NO_ERROR, why)

    async def goaway_and_close(self, error_code: int, why: str) -> None:
        """Send GOAWAY, then close the TCP connection."""
        if self.closed.is_set():
            return
        self._note_close(why)
        with trio.move_on_after(2):
            try:
                if not self.goaway_sent:
                    await self.send_goaway(error_code)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self.abort(why)

    def abort(self, why: str) -> None:
        """Drop the connection now (TCP close, no GOAWAY)."""
        self._note_close(why)
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def _cleanup(self) -> None:
        self.state = "closed"
        self.closed.set()
        err = TunnelStreamError(f"tunnel connection closed: {self.close_reason or 'closed'}",
                                retryable=True)
        for stream in list(self.streams.values()):
            if stream.response is None:
                stream._fail(err)
            else:
                stream._fail(TunnelStreamError(err.args[0], retryable=False))
        self._idle_lot.unpark_all()
        self._slot_lot.unpark_all()
        self._window_lot.unpark_all()
        self.edge.registry.remove(self)
        with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(Exception):
            await self.transport.aclose()
        if self.registration is not None:
            log.info("Unregistered tunnel connection (%s) %s", self.close_reason, self.ident())
        else:
            log.debug("tunnel connection closed (%s) %s", self.close_reason, self.ident())


def _credentials_match(tunnel: Any, auth: Any) -> bool:
    """Constant-time check of account tag and secret (also when the tunnel is unknown)."""
    if tunnel is None:
        expected_tag, expected_secret, known = b"\0" * 32, b"\0" * 32, False
    else:
        expected_tag = str(tunnel.account_tag).encode()
        expected_secret = _secret_bytes(tunnel.secret)
        known = True
    tag_ok = hmac.compare_digest(str(auth.account_tag).encode(), expected_tag)
    secret_ok = hmac.compare_digest(bytes(auth.tunnel_secret), expected_secret)
    return known and tag_ok and secret_ok


def _secret_bytes(secret: Any) -> bytes:
    if isinstance(secret, bytes | bytearray | memoryview):
        return bytes(secret)
    import base64

    return base64.b64decode(str(secret))


def _as_uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    raw = bytes(value)
    if len(raw) == 16:
        return uuid.UUID(bytes=raw)
    return uuid.UUID(int=int.from_bytes(raw[:16].ljust(16, b"\0"), "big"))


def _code_name(code: Any) -> str:
    try:
        return ErrorCodes(int(code)).name
    except (ValueError, TypeError):
        return str(code)

"""One connection to the edge: HTTP/2 (we are the server), the control stream and its RPC.

Roles: the connector dials the edge and is the **TLS client**, but on that connection it is the **HTTP/2
server** (`client_side=False`); the edge sends the preface and opens every stream. On the control stream the
connector is the Cap'n Proto **RPC client** (`wire.rpc.RpcClient`).

Tasks per connection: a reader (socket -> h2 -> per-stream inboxes), a writer (`transport.writer.H2Writer`:
h2 -> socket, woken by `flush`/`push`), the control task (registration, local config, unregister) and one
task per eyeball stream. A stream's failure becomes a RST_STREAM; only socket errors and protocol
violations end the connection, and `run` then raises an `EdgeConnectionError` whose class tells the
supervisor how to retry.

Beside it: the errors (connector/edge_errors.py), TLS and dialling (connector/edge_dial.py), the stream the
handlers see (connector/tunnel_stream.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from tunnel_lab.connector.edge_dial import dial_edge
from tunnel_lab.connector.edge_errors import ConnectionLostError, EdgeConnectionError, StreamGone
from tunnel_lab.connector.ha_connection import HAConnection
from tunnel_lab.connector.logging_setup import format_value as q
from tunnel_lab.connector.registration import first_of
from tunnel_lab.connector.settings import TunnelSettings
from tunnel_lab.connector.state import ConnectorState
from tunnel_lab.connector.tunnel_stream import CREDIT_BATCH, WINDOW, IncomingStream
from tunnel_lab.transport.h2 import StreamProtocolError, TunnelH2Connection
from tunnel_lab.transport.tls import TLSStream
from tunnel_lab.transport.writer import H2Writer
from tunnel_lab.wire.errors import TunnelLabError
from tunnel_lab.wire.headers import StreamType, classify_stream, first_value

Dial = Callable[[], Awaitable[trio.abc.Stream]]
log = logging.getLogger(__name__)


class StreamHandler(Protocol):
    """What an edge connection hands its streams to (`connector.streams.Proxy`)."""

    @property
    def state(self) -> ConnectorState: ...
    async def handle_stream(self, ts: IncomingStream, kind: StreamType) -> None: ...

PREFACE_TIMEOUT = 10.0
RECEIVE_SIZE = 65536
MAX_FRAME = 1 << 20
MAX_HEADER_LIST = 1048896
NO_RFC7540_PRIORITIES = 0x9


def _server_settings() -> dict[h2.settings.SettingCodes | int, int]:
    codes = h2.settings.SettingCodes
    return {
        codes.MAX_FRAME_SIZE: MAX_FRAME,
        codes.MAX_CONCURRENT_STREAMS: 2**32 - 1,
        codes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        codes.HEADER_TABLE_SIZE: 4096,
        codes.INITIAL_WINDOW_SIZE: WINDOW,
        NO_RFC7540_PRIORITIES: 1,
    }


class EdgeConnection(HAConnection):
    """One HA connection (connIndex) over one dialled address, from dial to close."""

    protocol = "http2"

    def __init__(self, settings: TunnelSettings, proxy: StreamHandler, *, conn_index: int, address: str,
                 ssl_context: ssl.SSLContext | None = None, dial: Dial | None = None,
                 num_previous_attempts: int = 0,
                 on_registered: Callable[[EdgeConnection], None] | None = None,
                 on_unregistered: Callable[[EdgeConnection], None] | None = None) -> None:
        super().__init__(settings, conn_index=conn_index, address=address,
                         num_previous_attempts=num_previous_attempts, on_registered=on_registered,
                         on_unregistered=on_unregistered)
        self.proxy = proxy
        # The seam tests use to hand the connection a transport (tests/component/tunnel_pair.py).
        if dial is None:
            if ssl_context is None:
                raise TypeError("EdgeConnection needs an ssl_context or a dial")
            self._dial: Dial = functools.partial(dial_edge, address, ssl_context,
                                                 bind_address=settings.edge_bind_address)
        else:
            self._dial = dial
        # Header checks are ours (Go's rules, a 400 or a stream reset): h2's would kill the connection.
        # The response fields are built by wire.origin to RFC 9113's rules, so h2 does not re-check
        # them either (a few per cent of the CPU of a small request).
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=False, normalize_inbound_headers=False,
                                           validate_outbound_headers=False)
        # A malformed stream costs only that stream; a GOAWAY leaves the open streams (and the control
        # stream) running, as Go's server does.
        self.h2 = TunnelH2Connection(config, local_settings=_server_settings(),
                                     keep_streams_after_goaway=True, body_errors_reset_stream=True)
        self.stream: trio.abc.Stream | None = None
        self.writer: H2Writer | None = None
        self.streams: dict[int, IncomingStream] = {}
        self._conn_credit = 0
        self._window_event = trio.Event()
        self._settings_seen = trio.Event()
        self._control_arrived = trio.Event()
        self._closed_event = trio.Event()
        self._streams_idle = trio.Event()
        self._streams_idle.set()
        self._control: IncomingStream | None = None

    # -- plumbing used by streams
    def open_window(self, n: int, stream_id: int | None = None) -> None:
        """Return `n` bytes of flow-control credit (a WINDOW_UPDATE) for a stream or the connection."""
        if self.dead or n <= 0:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):  # a stream closed meanwhile
            self.h2.increment_flow_control_window(n, stream_id)

    def _connection_credit(self, n: int) -> None:
        self._conn_credit += n
        if self._conn_credit >= CREDIT_BATCH:
            credit, self._conn_credit = self._conn_credit, 0
            self.open_window(credit)

    async def flush(self) -> None:
        """Have the writer send everything h2 has queued; returns once it was written."""
        if self.dead or self.writer is None:
            raise StreamGone(f"{self.label}: connection with edge closed")
        try:
            await self.writer.flush()
        except trio.BrokenResourceError:
            raise StreamGone(f"{self.label}: connection with edge closed") from None

    async def push(self, queued: int = 0) -> None:
        """Have the writer send what h2 has queued (`queued` more DATA bytes) at its next pass, without
        waiting for it below `transport.writer.PUSH_WAIT` queued bytes."""
        if self.dead or self.writer is None:
            raise StreamGone(f"{self.label}: connection with edge closed")
        try:
            await self.writer.push(queued)
        except trio.BrokenResourceError:
            raise StreamGone(f"{self.label}: connection with edge closed") from None

    async def wait_for_window(self) -> None:
        await self._window_event.wait()

    def _wake_window(self) -> None:
        self._window_event.set()
        self._window_event = trio.Event()

    # -- lifecycle
    async def run(self, shutdown: trio.Event) -> None:
        """Dial, register, serve until `shutdown` is set (then unregister and drain) or the connection dies.

        Returns normally only after a graceful shutdown; raises an `EdgeConnectionError` otherwise."""
        async with trio.open_nursery() as dialling:  # a shutdown abandons a dial in progress
            async def abandon() -> None:
                await shutdown.wait()
                dialling.cancel_scope.cancel()

            dialling.start_soon(abandon)
            dial_error: TunnelLabError | None = None
            try:
                self.stream = await self._dial()
            except TunnelLabError as exc:  # raised out of here, not out of the nursery (no group)
                dial_error = exc
            dialling.cancel_scope.cancel()
        if dial_error is not None:
            raise dial_error
        if self.stream is None:
            return
        # No write timeout: cloudflared's HTTP/2 server sets none (http2.Server{} in connection/http2.go).
        writer = self.writer = H2Writer(self.h2, self.stream)
        if self.settings.trace is not None:
            self.trace = self.settings.trace.connection(
                conn=f"connector#{self.conn_index}.{self.num_previous_attempts}", conn_index=self.conn_index,
                edge=self.address, transport="http2", tunnel=str(self.settings.credentials.tunnel_id))
            if isinstance(self.stream, TLSStream):
                self.trace.tls(self.stream.ssl_object, side="client")
            writer.on_send = self.trace.sent
        sock = _socket_of(self.stream)
        if sock is not None:
            with contextlib.suppress(OSError):
                self.edge_ip = sock.getpeername()[0]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write)
                nursery.start_soon(self._reader)
                try:
                    await self._main(shutdown)
                except EdgeConnectionError as exc:
                    self._fail(exc)
                except TunnelLabError as exc:  # StreamGone, RpcError: the connection broke under us
                    self._fail(ConnectionLostError(f"connection with edge closed: {exc}"))
                nursery.cancel_scope.cancel()
        finally:
            self._gone()
            self._wake_window()
            with trio.CancelScope(shield=True):
                pending = writer.take_remaining()
                if pending:  # what streams queued last (their writes do not wait) still goes out
                    with (trio.move_on_after(1),
                          contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                        await self.stream.send_all(pending)
                with (trio.move_on_after(1),
                      contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                    await self.stream.aclose()
        if self._failure is not None:
            raise self._failure

    def _closing(self) -> None:
        self._closed_event.set()

    async def _write(self) -> None:
        assert self.writer is not None
        try:
            await self.writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("Writing to the edge failed connIndex=%d error=%s", self.conn_index,
                      q(str(exc.__cause__ or exc)))
            self._fail(self._lost())

    async def _reader(self) -> None:
        assert self.stream is not None and self.writer is not None
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.debug("Reading from the edge failed connIndex=%d error=%s", self.conn_index,
                          q(str(exc.__cause__ or exc)))
                self._fail(self._lost())
                return
            if not data:
                self._fail(self._lost())
                return
            if self.trace is not None:
                self.trace.received(data)
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                log.warning("Malformed HTTP/2 from the edge, dropping the connection error=%s connIndex=%d "
                            "event=0 ip=%s", q(str(exc)), self.conn_index, self.edge_ip)
                with trio.move_on_after(1):
                    await self.flush()  # the GOAWAY h2 queued
                self._fail(ConnectionLostError(f"HTTP/2 protocol error from the edge: {exc}"))
                return
            for event in events:
                self._dispatch(event)
            # never wait for the writer here: reading must go on while our writes are blocked
            self.writer.wake()  # ACKs, WINDOW_UPDATEs, RST_STREAMs h2 queued

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._new_stream(event)
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            ts = self.streams.get(event.stream_id)
            flow_len = event.flow_controlled_length or 0
            self._connection_credit(flow_len)
            if ts is not None and not ts.reset_received:
                ts._push(event.data or b"", flow_len)
        elif isinstance(event, h2.events.TrailersReceived):
            ts = self.streams.get(event.stream_id or 0)
            if ts is not None:
                ts.trailers = [(bytes(n), bytes(v)) for n, v in (event.headers or [])]
        elif isinstance(event, h2.events.StreamEnded):
            ts = self.streams.get(event.stream_id or 0)
            if ts is not None:
                ts._ended()
        elif isinstance(event, h2.events.StreamReset):
            ts = self.streams.get(event.stream_id or 0)
            if isinstance(event, StreamProtocolError):
                log.warning("Malformed request stream from the edge, resetting the stream error=%s %s",
                            q(event.reason), ts.label if ts is not None else self.label)
            elif ts is not None:
                log.debug("Incoming request ended abruptly error_code=%s %s", event.error_code, ts.label)
            if ts is not None:
                ts._reset()
                self._wake_window()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                self._settings_seen.set()
            self._wake_window()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # Go answers a GOAWAY with its own and keeps serving the open streams (the control stream
            # included).
            log.info("Received GOAWAY from the edge connIndex=%d error_code=%s event=0 ip=%s "
                     "last_stream_id=%s", self.conn_index, event.error_code, self.edge_ip,
                     event.last_stream_id)
            self.h2.send_goaway(0, last_stream_id=max(self.streams, default=0))

    def _new_stream(self, event: h2.events.RequestReceived) -> None:
        assert event.stream_id is not None
        headers = [(bytes(n), bytes(v)) for n, v in (event.headers or [])]
        ts = IncomingStream(self, event.stream_id, headers, end_stream=event.stream_ended is not None)
        kind = classify_stream(headers)
        if self.trace is not None:
            ray = first_value(headers, b"cf-ray")
            self.trace.event("stream.classified", stream=event.stream_id, stream_kind=kind.value,
                             ray=ray.decode("latin-1") if ray else None)
        if kind is StreamType.CONTROL and self._control is None:
            self._control = ts
            self.streams[ts.stream_id] = ts
            self._control_arrived.set()
            return
        self.streams[ts.stream_id] = ts
        if self._streams_idle.is_set():  # a waiter holds the unset one: never swap that
            self._streams_idle = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_stream, ts, kind)

    async def _serve_stream(self, ts: IncomingStream, kind: StreamType) -> None:
        try:
            with ts.cancel_scope:
                await self._call_handler(ts, kind)
            if not ts.reset_received and not self.dead:
                if not ts.local_ended:
                    await ts.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
                elif not ts.remote_ended:
                    # Go's server stops an unread request body this way once the handler returned
                    await ts.reset(h2.errors.ErrorCodes.NO_ERROR)
        except StreamGone:
            pass
        finally:
            ts._release_window()
            self.streams.pop(ts.stream_id, None)
            if not any(s is not self._control for s in self.streams.values()):
                self._streams_idle.set()
            if not self.dead and self.writer is not None:
                self.writer.wake()

    async def _call_handler(self, ts: IncomingStream, kind: StreamType) -> None:
        """Run the stream handler; its failures end the stream (RST_STREAM), never the connection."""
        try:
            await self.proxy.handle_stream(ts, kind)
        except StreamGone:
            pass
        except BaseExceptionGroup as group:
            _, rest = group.split(StreamGone)
            if rest is None:
                return
            if not isinstance(rest, ExceptionGroup):  # Cancelled or KeyboardInterrupt inside: not ours
                raise rest from None
            log.error("Stream handler failed %s", ts.label, exc_info=rest)
        except Exception:
            log.exception("Stream handler failed %s", ts.label)

    @property
    def active_streams(self) -> int:
        return sum(1 for s in self.streams.values() if s is not self._control)

    # -- control stream and registration (connector/registration.py)
    async def _main(self, shutdown: trio.Event) -> None:
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(WINDOW - 65535)
        await self.flush()
        with trio.move_on_after(PREFACE_TIMEOUT) as scope:
            await self._settings_seen.wait()
        if scope.cancelled_caught:
            raise ConnectionLostError("timeout waiting for the edge's HTTP/2 client preface")
        await first_of(self._control_arrived.wait, shutdown.wait)
        ctrl = self._control
        if ctrl is None:
            return  # shut down before the edge opened a control stream
        assert self.stream is not None
        await ctrl.send_headers([(b":status", b"200"), (b"content-type", b"application/octet-stream")])
        sock = _socket_of(self.stream)
        await self._serve_control(
            _H2Control(ctrl, self), shutdown,
            local_ip=sock.getsockname()[0] if sock is not None else "127.0.0.1",  # a test's memory stream
            state=self.proxy.state, active_streams=lambda: self.active_streams,
            wait_idle=lambda: first_of(self._streams_idle.wait, self._closed_event.wait))

    def _lost(self) -> EdgeConnectionError:
        """Why the connection ended when the edge closed it: a registration refusal still unread on the
        control stream decides how we retry."""
        ctrl = self._control
        if self.control is not None and ctrl is not None:
            refusal = self.control.refusal(ctrl.take_unread())
            if refusal is not None:
                return refusal
        return ConnectionLostError("connection with edge closed")


class _H2Control:
    """The control stream of an http2 connection as the registration client uses it."""

    def __init__(self, stream: IncomingStream, conn: EdgeConnection) -> None:
        self.stream = stream
        self.conn = conn

    @property
    def local_ended(self) -> bool:
        return self.stream.local_ended

    @property
    def reset_received(self) -> bool:
        return self.stream.reset_received

    async def receive_some(self) -> bytes:
        try:
            return await self.stream.receive_some()
        except StreamGone:
            return b""

    async def send(self, data: bytes) -> None:
        with contextlib.suppress(StreamGone):
            await self.stream.send_data(data)
            await self.conn.flush()  # RPC messages are on the wire before we wait for their answers

    async def close(self) -> None:
        """END_STREAM, then RST_STREAM NO_ERROR if the edge's side is still open, as Go does."""
        try:
            await self.stream.end()
            if not self.stream.remote_ended:
                await self.stream.reset(h2.errors.ErrorCodes.NO_ERROR)
            await self.conn.flush()
        except StreamGone:
            pass


def _socket_of(stream: object) -> Any:
    """The socket under a (TLS) stream, or None for one without (a test's memory stream)."""
    while stream is not None:
        sock = getattr(stream, "socket", None)
        if sock is not None:
            return sock
        stream = getattr(stream, "transport_stream", None)
    return None


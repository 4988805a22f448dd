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

from tunnel_lab.connector.edge_dial import dial_edge, split_host_port
from tunnel_lab.connector.edge_errors import (
    ConnectionLostError,
    ControlStreamError,
    DuplicateConnectionError,
    EdgeConnectionError,
    RegistrationRefusedError,
    ServerRefusedError,
    StreamGone,
    UnauthorizedError,
)
from tunnel_lab.connector.logging_setup import format_value as q
from tunnel_lab.connector.settings import TunnelSettings
from tunnel_lab.connector.state import ConnectorState
from tunnel_lab.connector.tunnel_stream import CREDIT_BATCH, WINDOW, IncomingStream
from tunnel_lab.transport.h2 import StreamProtocolError, TunnelH2Connection
from tunnel_lab.transport.tls import TLSStream
from tunnel_lab.transport.trace import ConnTrace
from tunnel_lab.transport.writer import H2Writer
from tunnel_lab.wire import registration as reg
from tunnel_lab.wire.errors import TunnelLabError
from tunnel_lab.wire.headers import StreamType, classify_stream, first_value
from tunnel_lab.wire.rpc import CallFailed, CallReturned, RegistrationAnswered, RpcAborted, RpcClient

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


class EdgeConnection:
    """One HA connection (connIndex) over one dialled address, from dial to close."""

    def __init__(self, settings: TunnelSettings, proxy: StreamHandler, *, conn_index: int, address: str,
                 ssl_context: ssl.SSLContext | None = None, dial: Dial | None = None,
                 num_previous_attempts: int = 0,
                 on_registered: Callable[[EdgeConnection], None] | None = None,
                 on_unregistered: Callable[[EdgeConnection], None] | None = None) -> None:
        self.settings = settings
        self.proxy = proxy
        self.conn_index = conn_index
        self.address = address
        # The seam tests use to hand the connection a transport (tests/component/tunnel_pair.py).
        if dial is None:
            if ssl_context is None:
                raise TypeError("EdgeConnection needs an ssl_context or a dial")
            self._dial: Dial = functools.partial(dial_edge, address, ssl_context,
                                                 bind_address=settings.edge_bind_address)
        else:
            self._dial = dial
        self.num_previous_attempts = num_previous_attempts
        self._on_registered = on_registered
        self._on_unregistered = on_unregistered
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
        self.details: reg.ConnectionDetails | None = None
        self.registered = False
        self.dead = False
        self.edge_ip = split_host_port(address)[0]
        self._failure: EdgeConnectionError | None = None
        self._nursery: trio.Nursery | None = None
        self._conn_credit = 0
        self._window_event = trio.Event()
        self._settings_seen = trio.Event()
        self._control_arrived = trio.Event()
        self._closed_event = trio.Event()
        self._streams_idle = trio.Event()
        self._streams_idle.set()
        self._control: IncomingStream | None = None
        self._rpc = RpcClient()
        self._rpc_results: dict[int, object] = {}
        self._rpc_event = trio.Event()
        self._rpc_closed: str | None = None
        self._register_qid: int | None = None
        self._registration_failure: EdgeConnectionError | None = None
        self.trace: ConnTrace | None = None  # the protocol trace of this connection (docs/trace.md)

    @property
    def label(self) -> str:
        return f"tunnel={self.settings.credentials.tunnel_id} connIndex={self.conn_index}"

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
            self.dead = True
            self._wake_window()
            if self.registered:
                self.registered = False
                if self._on_unregistered:
                    self._on_unregistered(self)
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

    def drop(self, exc: EdgeConnectionError) -> bool:
        """End this connection from outside (`run` raises `exc`); False if not serving yet or dead."""
        if self.dead or self._nursery is None:
            return False
        self._fail(exc)
        return True

    def _fail(self, exc: EdgeConnectionError) -> None:
        if self._failure is None:
            self._failure = exc
        self.dead = True
        self._closed_event.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

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

    # -- control stream and registration
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
        await ctrl.send_headers([(b":status", b"200"), (b"content-type", b"application/octet-stream")])
        self._nursery_start(self._rpc_reader, ctrl)
        await self._register()
        if not shutdown.is_set():
            await first_of(shutdown.wait, self._rpc_closed_wait)
            if not shutdown.is_set():
                raise ConnectionLostError(f"control stream ended: {self._rpc_closed}")
        await self._graceful_shutdown(ctrl)

    def _nursery_start(self, fn: Callable[[IncomingStream], Awaitable[None]], arg: IncomingStream) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, arg)

    async def _rpc_closed_wait(self) -> None:
        while self._rpc_closed is None:
            await self._rpc_event.wait()

    async def _rpc_reader(self, ctrl: IncomingStream) -> None:
        while True:
            try:
                data = await ctrl.receive_some()
            except StreamGone:
                data = b""
            if not data:
                self._rpc_closed = "reset by the edge" if ctrl.reset_received else "EOF"
                self._notify_rpc()
                return
            try:
                events = self._rpc.receive_data(data)
            except TunnelLabError as exc:
                log.warning("Malformed RPC message from the edge error=%s connIndex=%d event=0 ip=%s",
                            q(str(exc)), self.conn_index, self.edge_ip)
                self._rpc_closed = f"malformed RPC: {exc}"
                self._notify_rpc()
                return
            for ev in events:
                if isinstance(ev, RegistrationAnswered | CallReturned | CallFailed):
                    self._rpc_results[ev.question_id] = ev
                elif isinstance(ev, RpcAborted):
                    self._rpc_closed = f"rpc aborted by the edge: {ev.reason}"
            self._notify_rpc()
            await self._send_rpc(ctrl)

    def _notify_rpc(self) -> None:
        self._rpc_event.set()
        self._rpc_event = trio.Event()

    async def _send_rpc(self, ctrl: IncomingStream) -> None:
        data = self._rpc.data_to_send()
        if data and not ctrl.local_ended:
            with contextlib.suppress(StreamGone):
                await ctrl.send_data(data)
                await self.flush()  # RPC messages are on the wire before we wait for their answers

    async def _await_answer(self, question_id: int) -> object:
        while question_id not in self._rpc_results:
            if self._rpc_closed is not None:
                raise ControlStreamError(f"control stream ended before the answer: {self._rpc_closed}")
            await self._rpc_event.wait()
        return self._rpc_results.pop(question_id)

    async def _register(self) -> None:
        ctrl = self._control
        assert ctrl is not None and self.stream is not None
        sock = _socket_of(self.stream)
        local_ip = sock.getsockname()[0] if sock is not None else "127.0.0.1"  # a test's memory stream
        creds = self.settings.credentials
        params = reg.RegisterConnectionParams(
            auth=reg.TunnelAuth(creds.account_tag, creds.tunnel_secret),
            tunnel_id=creds.tunnel_id,
            conn_index=self.conn_index,
            options=reg.ConnectionOptions(
                client=reg.ClientInfo(self.settings.connector_id.bytes, tuple(self.settings.features),
                                      self.settings.version, self.settings.arch),
                origin_local_ip=reg.origin_local_ip_bytes(local_ip),
                num_previous_attempts=min(self.num_previous_attempts, 255),
            ),
        )
        log.debug("Registering tunnel connection connIndex=%d event=0 ip=%s", self.conn_index, self.edge_ip)
        qid = self._rpc.register_connection(params)
        self._register_qid = qid
        await self._send_rpc(ctrl)
        try:
            with trio.fail_after(self.settings.rpc_timeout):
                answer = await self._await_answer(qid)
        except trio.TooSlowError:
            self._rpc.cancel(qid)  # Finish(releaseResultCaps=true), as Go does for an abandoned call
            await self._abort_rpc(ctrl)
            raise RegistrationRefusedError("register tunnel connection: context deadline exceeded") from None
        error = self._registration_error(answer)
        if error is not None:
            self._registration_failure = error  # wins over the close the edge sends right behind it
            await self._abort_rpc(ctrl)
            raise error
        assert isinstance(answer, RegistrationAnswered)
        result = answer.result
        assert isinstance(result, reg.ConnectionDetails)
        self.details = result
        self.registered = True
        if self.trace is not None:
            self.trace.update(conn_uuid=str(result.uuid), dc=result.location_name)
        log.info("Registered tunnel connection connIndex=%d connection=%s event=0 ip=%s location=%s "
                 "protocol=http2", self.conn_index, result.uuid, self.edge_ip, result.location_name)
        if self._on_registered:
            self._on_registered(self)
        if self.conn_index == 0 and not result.tunnel_is_remotely_managed:
            self._nursery_start(self._push_local_config, ctrl)

    def _registration_error(self, answer: object) -> EdgeConnectionError | None:
        """The error a registration answer means (logged), or None when it registered."""
        if isinstance(answer, CallFailed):
            return RegistrationRefusedError(
                f"tunnelrpc/proto/tunnelrpc.capnp:RegistrationServer.registerConnection: rpc exception: "
                f"{answer.reason}")
        if not isinstance(answer, RegistrationAnswered):
            return RegistrationRefusedError(f"unexpected answer to registerConnection: {answer!r}")
        result = answer.result
        if not isinstance(result, reg.RegistrationError):
            return None
        error: EdgeConnectionError
        if "EDUPCONN" in result.cause:
            error = DuplicateConnectionError("already connected to this server, trying another address")
        elif "Unauthorized" in result.cause:
            error = UnauthorizedError(result.cause)
        else:
            error = ServerRefusedError(result.cause)
        # cloudflared's HTTP/2 handler logs the control stream's failure first, without connection fields
        log.error("failed to serve incoming request error=%s", q(str(error)))
        return error

    def _lost(self) -> EdgeConnectionError:
        """Why the connection ended when the edge closed it. An edge that refuses a registration closes the
        connection right after its answer: if that answer is still unread, it decides how we retry."""
        if self._registration_failure is not None:
            return self._registration_failure
        ctrl = self._control
        qid = self._register_qid
        if ctrl is not None and qid is not None and not self.registered and qid not in self._rpc_results:
            try:
                for data, _ in ctrl._chunks:
                    for ev in self._rpc.receive_data(data):
                        if isinstance(ev, RegistrationAnswered | CallReturned | CallFailed):
                            self._rpc_results[ev.question_id] = ev
            except TunnelLabError:
                pass
            ctrl._chunks.clear()
            if qid in self._rpc_results:
                error = self._registration_error(self._rpc_results[qid])
                if error is not None:
                    return error
        return ConnectionLostError("connection with edge closed")

    async def _push_local_config(self, ctrl: IncomingStream) -> None:
        state = self.proxy.state
        state.local_config_pushes += 1
        error: str | None = None
        try:
            qid = self._rpc.update_local_configuration(self.settings.local_config_json)
            await self._send_rpc(ctrl)
            with trio.fail_after(self.settings.rpc_timeout):
                answer = await self._await_answer(qid)
            if isinstance(answer, CallFailed):
                error = answer.reason
        except trio.TooSlowError:
            error = "context deadline exceeded"
        except TunnelLabError as exc:
            error = str(exc)
        if error is not None:
            state.local_config_push_errors += 1
            log.error("unable to send local configuration error=%s connIndex=%d", q(error), self.conn_index)
        else:
            log.debug("Sent local configuration to the edge connIndex=%d", self.conn_index)

    async def _abort_rpc(self, ctrl: IncomingStream) -> None:
        """Abort the RPC session and end the control stream the way Go does (END_STREAM, RST NO_ERROR)."""
        with contextlib.suppress(TunnelLabError):
            self._rpc.abort("rpc: shutdown")
        await self._send_rpc(ctrl)
        try:
            await ctrl.end()
            if not ctrl.remote_ended:
                await ctrl.reset(h2.errors.ErrorCodes.NO_ERROR)
            await self.flush()
        except StreamGone:
            pass

    async def _graceful_shutdown(self, ctrl: IncomingStream) -> None:
        """Unregister, then keep serving in-flight streams until they end, the edge closes, or the grace
        period expires."""
        deadline = trio.current_time() + self.settings.grace_period
        if self.registered and self._rpc_closed is None and not self._rpc.aborted:
            qid = self._rpc.unregister_connection()
            answer: object = None
            # Sending is bounded too: an edge that grants no flow-control window (a wedged tunnel)
            # must not hold the connector past its grace period.
            with trio.move_on_at(deadline):
                await self._send_rpc(ctrl)
                try:
                    answer = await self._await_answer(qid)
                except ControlStreamError as exc:
                    answer = exc
            if isinstance(answer, CallReturned):
                log.info("Unregistered tunnel connection connIndex=%d event=0 ip=%s", self.conn_index,
                         self.edge_ip)
            else:
                if answer is None and not self._rpc.aborted:
                    self._rpc.cancel(qid)  # gave up: Finish(releaseResultCaps=true), as Go does
                reason = ("context deadline exceeded" if answer is None
                          else getattr(answer, "reason", None) or str(answer))
                log.error("failed to serve incoming request error=%s connIndex=%d",
                          q(f"Error shutting down control stream: {reason}"), self.conn_index)
        if self.registered:
            self.registered = False
            if self._on_unregistered:
                self._on_unregistered(self)
        with trio.move_on_at(deadline):
            if self._rpc_closed is None and not ctrl.local_ended:
                await self._abort_rpc(ctrl)
            await first_of(self._streams_idle.wait, self._closed_event.wait)
        n = self.active_streams
        if n:
            log.info("Grace period over, closing the connection with %d streams in flight connIndex=%d", n,
                     self.conn_index)


def _socket_of(stream: object) -> Any:
    """The socket under a (TLS) stream, or None for one without (a test's memory stream)."""
    while stream is not None:
        sock = getattr(stream, "socket", None)
        if sock is not None:
            return sock
        stream = getattr(stream, "transport_stream", None)
    return None


async def first_of(*waits: Callable[[], Awaitable[object]]) -> bool:
    """Run the waits concurrently; return True once the first finishes (the others are cancelled)."""
    done = False
    async with trio.open_nursery() as nursery:
        async def one(fn: Callable[[], Awaitable[object]]) -> None:
            nonlocal done
            await fn()
            done = True
            nursery.cancel_scope.cancel()

        for fn in waits:
            nursery.start_soon(one, fn)
    return done

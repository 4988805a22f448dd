"""One connection to the edge: TLS dial, HTTP/2 (we are the server), the control stream and its RPC.

Roles: the connector dials the edge and is the **TLS client**, but on that connection it is the **HTTP/2
server** (`client_side=False`); the edge sends the preface and opens every stream. On the control stream the
connector is the Cap'n Proto **RPC client** (`wire.rpc.RpcClient`).

Tasks per connection: a reader (socket -> h2 -> per-stream inboxes), a writer (h2 -> socket, woken by
`flush`/`push`), the control task (registration, local config, unregister) and one task per eyeball stream. A
stream's failure becomes a RST_STREAM; only socket errors and protocol violations end the connection, and
`run` then raises an `EdgeConnectionError` whose class tells the supervisor how to retry.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from connector.logging_setup import format_value as q
from connector.origin_client import describe_certificate, dial_error_text, fetch_peer_certificate
from connector.settings import TunnelSettings
from connector.x509_text import go_tls_verify_error
from transport.h2 import StreamProtocolError, TunnelH2Connection
from wire import registration as reg
from wire.errors import TLSSetupError, TunnelLabError
from wire.headers import StreamType, classify_stream
from wire.rpc import CallFailed, CallReturned, RegistrationAnswered, RpcAborted, RpcClient

if TYPE_CHECKING:
    from connector.streams import Proxy

log = logging.getLogger(__name__)

EDGE_SNI = "h2.cftunnel.com"
DIAL_TIMEOUT = 15.0
PREFACE_TIMEOUT = 10.0
RECEIVE_SIZE = 65536
TLS_RECEIVE_SIZE = 256 * 1024  # most bytes one socket read of the edge connection takes
MAX_READ = 256 * 1024  # most request-body bytes one receive_some returns
WINDOW = 1 << 20  # INITIAL_WINDOW_SIZE and the connection window, as Go's server sets them
# WINDOW_UPDATEs go out once a quarter of the window was used (cloudflared: about every 32 KiB; 8x fewer
# frames to write here and to parse at the edge on an upload, and the window never runs dry).
CREDIT_BATCH = WINDOW // 4
MAX_FRAME = 1 << 20
# A stream's writes only wake the writer (HEADERS, DATA and END_STREAM written back to back leave in one TLS
# write); a stream waits for the socket only once this much is queued (backpressure on bulk bodies).
PUSH_WAIT = 64 * 1024
MAX_HEADER_LIST = 1048896
NO_RFC7540_PRIORITIES = 0x9
_EDGE_CERTS: dict[tuple[str, str], bytes | None] = {}  # (edge address, verify error) -> the leaf it presented


# --------------------------------------------------------------------------------------------------
# Errors: the class tells the supervisor what to do next


class EdgeConnectionError(TunnelLabError):
    """A connection to the edge ended badly. `rotate_address`: take another edge address;
    `retry_initial`: retried even before any connection ever registered (cloudflared's "network" errors)."""

    rotate_address = False
    retry_initial = False
    # the supervisor's log line for it, as cloudflared's supervisor/tunnel.go words it per error type
    log_message = "Serve tunnel error"


class EdgeDialError(EdgeConnectionError):
    """TCP connect or TLS handshake with the edge failed."""

    rotate_address = True
    retry_initial = True


class DuplicateConnectionError(EdgeConnectionError):
    """The edge said EDUPCONN: this connector already has a connection there."""

    rotate_address = True
    retry_initial = True
    log_message = "Unable to establish connection."


class UnauthorizedError(EdgeConnectionError):
    """The edge refused the registration with an `Unauthorized` cause (assumed propagation lag)."""

    retry_initial = True
    log_message = "Register tunnel error from server side"


class ControlStreamError(EdgeConnectionError):
    """The control stream broke before registration finished."""

    retry_initial = True


class RegistrationRefusedError(EdgeConnectionError):
    """A permanent registration error (any other cause, an RPC exception, a timeout)."""


class ServerRefusedError(RegistrationRefusedError):
    """The edge answered the registration with an error and any cause but EDUPCONN and Unauthorized."""

    log_message = "Register tunnel error from server side"


class ConnectionLostError(EdgeConnectionError):
    """The edge closed the connection, or broke the HTTP/2 protocol."""


class ReconnectSignal(EdgeConnectionError):
    """`--stdin-control`'s `reconnect [DURATION]` dropped this connection.

    The supervisor reconnects it after `delay`, without backoff."""

    retry_initial = True

    def __init__(self, delay: float) -> None:
        super().__init__(f"reconnect signal (delay {delay:g}s)")
        self.delay = delay


class StreamGone(TunnelLabError):
    """The stream was reset by the edge or its connection is gone; stop working on it."""


# --------------------------------------------------------------------------------------------------
# TLS


def edge_ssl_context(ca_cert: str | None) -> ssl.SSLContext:
    """The TLS client context for the edge: `ca_cert` as the only roots when given, else the system pool.

    Like cloudflared, a `--cacert` file without any certificate falls back to the system pool (which then
    fails verification against a lab edge with a clear message)."""
    if ca_cert is None:
        return ssl.create_default_context()
    try:
        with open(ca_cert, encoding="latin-1") as fh:
            text = fh.read()
    except OSError as exc:
        raise TLSSetupError(f"cannot read --cacert file {ca_cert}: {exc.strerror or exc}") from exc
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname checks and verification on
    if "-----BEGIN CERTIFICATE-----" not in text:
        log.warning("--cacert file %s holds no certificate; using the system certificate pool", ca_cert)
        return ssl.create_default_context()
    try:
        ctx.load_verify_locations(cadata=text)
    except ssl.SSLError as exc:
        raise TLSSetupError(f"--cacert file {ca_cert} is not a valid PEM certificate bundle: {exc}") from exc
    return ctx


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TLSSetupError(f"edge address {address!r} is not host:port")
    return host.strip("[]"), int(port)


class EdgeTLSStream:
    """TLS to the edge over a trio socket, with the ssl module's memory BIOs.

    trio's `SSLStream` returns one TLS record (at most 16 KiB) per `receive_some`, with a scheduler round
    trip each: here one receive decrypts every complete record the socket had, so h2 parses a whole batch
    of frames at once. Errors are trio's: `trio.BrokenResourceError` (the `ssl` or `OSError` as its cause),
    `trio.ClosedResourceError`. Reading and writing may run in different tasks (one of each)."""

    def __init__(self, transport_stream: trio.SocketStream, ctx: ssl.SSLContext,
                 server_hostname: str) -> None:
        self.transport_stream = transport_stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        self._eof = False

    async def _send_pending(self) -> None:
        data = self._outgoing.read()
        if data:
            await self.transport_stream.send_all(data)

    async def _refill(self) -> None:
        data = await self.transport_stream.receive_some(TLS_RECEIVE_SIZE)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def do_handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._send_pending()  # the alert, as trio's SSLStream sends it
                raise trio.BrokenResourceError(str(exc)) from exc
            await self._send_pending()
            if done:
                return
            await self._refill()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Everything decryptable so far (b"" once the edge closed the TLS session)."""
        while True:
            parts: list[bytes] = []
            try:
                while True:
                    chunk = self._ssl.read(TLS_RECEIVE_SIZE)
                    if not chunk:  # the edge's close_notify
                        self._eof = True
                        break
                    parts.append(chunk)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self._eof = True
            except ssl.SSLError as exc:
                if not parts:
                    raise trio.BrokenResourceError(str(exc)) from exc
            if parts:
                return b"".join(parts)
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b""
            await self._refill()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        await self._send_pending()

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl.getpeercert(binary_form)

    async def aclose(self) -> None:
        """Send close_notify (without waiting for the edge's), then close the socket."""
        try:
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._send_pending()
        finally:
            await self.transport_stream.aclose()


async def dial_edge(address: str, ctx: ssl.SSLContext, *, bind_address: str | None = None,
                    timeout: float = DIAL_TIMEOUT) -> EdgeTLSStream:
    """TCP + TLS to one edge address within `timeout` (raises `EdgeDialError`)."""
    host, port = split_host_port(address)
    tcp: trio.SocketStream | None = None
    done = False
    try:
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(host, port, local_address=bind_address)
            stream = EdgeTLSStream(tcp, ctx, server_hostname=EDGE_SNI)
            await stream.do_handshake()
            done = True
            return stream
    except trio.TooSlowError:
        raise EdgeDialError(f"DialContext error: dial tcp {address}: i/o timeout") from None
    except trio.BrokenResourceError as exc:
        inner = exc.__cause__
        if isinstance(inner, ssl.SSLCertVerificationError):
            key = (address, str(inner.verify_message or inner.reason))
            if key not in _EDGE_CERTS:  # one extra handshake per address and failure, not per retry
                _EDGE_CERTS[key] = await fetch_peer_certificate(host, port, EDGE_SNI)
                log.debug("edge %s presented %s: %s", address, describe_certificate(_EDGE_CERTS[key]), key[1])
            text = go_tls_verify_error(inner, der=_EDGE_CERTS[key], server_name=EDGE_SNI,
                                       now=datetime.datetime.now().astimezone())
            raise EdgeDialError(f"TLS handshake with edge error: {text}") from exc
        raise EdgeDialError(f"TLS handshake with edge error: {inner or exc}") from exc
    except OSError as exc:
        raise EdgeDialError(f"DialContext error: dial tcp {address}: {dial_error_text(exc)}") from exc
    finally:
        if tcp is not None and not done:  # also when cancelled mid-handshake
            tcp.socket.close()


_DATE: list[tuple[int, bytes]] = [(0, b"")]  # (second, Date header value) of the last response


def http_date() -> bytes:
    now = int(time.time())
    second, value = _DATE[0]
    if second != now:  # formatted once per second, not per response
        value = formatdate(now, usegmt=True).encode()
        _DATE[0] = (now, value)
    return value


# --------------------------------------------------------------------------------------------------
# Streams


class TunnelStream:
    """One edge-opened HTTP/2 stream as the stream handlers see it.

    Flow control as Go's server does it: connection-level credit goes back as DATA arrives (each stream's
    buffer is bounded by its own window, so one slow stream never starves the others); stream-level credit
    goes back only when the handler comes back for more, i.e. after it handed the previous chunk on:
    backpressure reaches the edge per stream."""

    def __init__(self, conn: EdgeConnection, stream_id: int, headers: list[tuple[bytes, bytes]],
                 end_stream: bool) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream_on_headers = end_stream
        self.remote_ended = end_stream
        self.reset_received = False
        self.local_ended = False
        self.headers_sent = False
        self.trailers: list[tuple[bytes, bytes]] = []  # request trailers the edge sent, if any
        self.status: int | None = None  # the :status we answered
        self.failed = False  # the connector could not serve it (502 of its own, or a reset)
        self.cancel_scope = trio.CancelScope()
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._to_ack = 0  # flow-controlled bytes handed out, not yet acknowledged
        self._credit = 0  # stream-level credit owed to the edge, sent in batches
        self._wakeup = trio.Event()

    @property
    def label(self) -> str:
        return f"{self.conn.label} stream={self.stream_id}"

    # -- fed by the connection's reader
    def _push(self, data: bytes, flow_len: int) -> None:
        self._chunks.append((data, flow_len))
        self._wakeup.set()

    def _ended(self) -> None:
        self.remote_ended = True
        self._wakeup.set()

    def _reset(self) -> None:
        self.reset_received = True
        self.remote_ended = True
        self._wakeup.set()
        self.cancel_scope.cancel()

    # -- request body
    async def receive_some(self) -> bytes:
        """The next chunk of the request body; b"" once the edge ended (or reset) its side."""
        await self._ack()
        while True:
            # Everything already buffered goes out as one piece, like Go's body reads (D07b).
            parts: list[bytes] = []
            size = 0
            while self._chunks and size < MAX_READ:
                data, flow_len = self._chunks.popleft()
                self._to_ack += flow_len
                parts.append(data)
                size += len(data)
            if size:
                return b"".join(parts)
            if self.remote_ended:
                await self._ack()
                return b""
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    def push_back(self, data: bytes) -> None:
        """Return unconsumed bytes to the front of the inbox (already counted for flow control)."""
        if data:
            self._chunks.appendleft((data, 0))

    async def _ack(self) -> None:
        if self._to_ack:
            self._credit += self._to_ack
            self._to_ack = 0
            if self._credit >= CREDIT_BATCH and not self.remote_ended:
                n, self._credit = self._credit, 0
                self.conn.open_window(n, self.stream_id)
                await self.conn.push()

    def _release_window(self) -> None:
        """Forget what this stream never consumed (its connection-level credit went back on arrival)."""
        self._to_ack = 0
        self._credit = 0
        self._chunks.clear()

    # -- response
    async def send_headers(self, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False) -> None:
        if not any(name == b"date" for name, _ in headers):
            headers = [*headers, (b"date", http_date())]
        self._check()
        try:
            self.conn.h2.send_headers(self.stream_id, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            raise StreamGone(f"{self.label}: cannot send headers: {exc}") from exc
        self.headers_sent = True
        for name, value in headers:
            if name == b":status" and value.isdigit():
                self.status = int(value)
        if end_stream:
            self.local_ended = True
        await self.conn.push()

    async def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._check()
        try:
            self.conn.h2.send_headers(self.stream_id, headers, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            raise StreamGone(f"{self.label}: cannot send trailers: {exc}") from exc
        self.local_ended = True
        await self.conn.push()

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        """Send body bytes within the edge's flow-control windows, flushed at once (SSE, chunked, pipes)."""
        view = memoryview(data)
        unflushed = False
        while True:
            self._check()
            h2c = self.conn.h2
            try:
                window = h2c.local_flow_control_window(self.stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
                raise StreamGone(f"{self.label}: stream closed: {exc}") from exc
            size = min(window, h2c.max_outbound_frame_size, len(view))
            if len(view) and size <= 0:
                if unflushed:  # what fitted goes out before we wait for credit; then look again
                    unflushed = False
                    await self.conn.flush()
                    continue
                await self.conn.wait_for_window()  # no checkpoint since the window was read
                continue
            chunk, view = view[:size], view[size:]
            last = end_stream and not len(view)
            try:
                h2c.send_data(self.stream_id, bytes(chunk), end_stream=last)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
                raise StreamGone(f"{self.label}: cannot send data: {exc}") from exc
            self.conn.queued += size
            unflushed = True
            if last:
                self.local_ended = True
            if not len(view):
                await self.conn.push()  # every write goes out at once: SSE and chunked responses stream
                return

    async def end(self) -> None:
        if not self.local_ended:
            await self.send_data(b"", end_stream=True)

    async def reset(self, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        if self.reset_received:
            return
        if code != h2.errors.ErrorCodes.NO_ERROR:
            self.failed = True
        self.reset_received = True
        self.local_ended = True
        try:
            self.conn.h2.reset_stream(self.stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        await self.conn.flush()

    def _check(self) -> None:
        if self.reset_received:
            raise StreamGone(f"{self.label}: reset by the edge")
        if self.conn.dead:
            raise StreamGone(f"{self.label}: connection with edge closed")


# --------------------------------------------------------------------------------------------------
# The connection


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

    def __init__(self, settings: TunnelSettings, proxy: Proxy, *, conn_index: int, address: str,
                 ssl_context: ssl.SSLContext, num_previous_attempts: int = 0,
                 on_registered: Callable[[EdgeConnection], None] | None = None,
                 on_unregistered: Callable[[EdgeConnection], None] | None = None) -> None:
        self.settings = settings
        self.proxy = proxy
        self.conn_index = conn_index
        self.address = address
        self.ssl_context = ssl_context
        self.num_previous_attempts = num_previous_attempts
        self._on_registered = on_registered
        self._on_unregistered = on_unregistered
        # Header checks are ours (Go's rules, a 400 or a stream reset): h2's would kill the connection.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=False, normalize_inbound_headers=False)
        # A malformed stream costs only that stream; a GOAWAY leaves the open streams (and the control
        # stream) running, as Go's server does.
        self.h2 = TunnelH2Connection(config, local_settings=_server_settings(),
                                     keep_streams_after_goaway=True, body_errors_reset_stream=True)
        self.stream: EdgeTLSStream | None = None
        self.streams: dict[int, TunnelStream] = {}
        self.details: reg.ConnectionDetails | None = None
        self.registered = False
        self.dead = False
        self.edge_ip = split_host_port(address)[0]
        self._failure: EdgeConnectionError | None = None
        self._nursery: trio.Nursery | None = None
        self._conn_credit = 0
        self._want = 0
        self._written = 0
        self._writer_ok = True  # False once a write to the edge failed or was cut short
        self._outbuf = bytearray()  # bytes taken from h2 for the writer (before anything h2 still holds)
        self.queued = 0  # DATA payload bytes h2 holds that the writer has not taken yet
        self._wake_writer = trio.Event()
        self._written_event = trio.Event()
        self._window_event = trio.Event()
        self._settings_seen = trio.Event()
        self._control_arrived = trio.Event()
        self._closed_event = trio.Event()
        self._streams_idle = trio.Event()
        self._streams_idle.set()
        self._control: TunnelStream | None = None
        self._rpc = RpcClient()
        self._rpc_results: dict[int, object] = {}
        self._rpc_event = trio.Event()
        self._rpc_closed: str | None = None
        self._register_qid: int | None = None
        self._registration_failure: EdgeConnectionError | None = None

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
        if self.dead:
            raise StreamGone(f"{self.label}: connection with edge closed")
        self._want += 1
        target = self._want
        self._wake_writer.set()
        while self._written < target:
            if self.dead:
                raise StreamGone(f"{self.label}: connection with edge closed")
            await self._written_event.wait()

    async def push(self) -> None:
        """Have the writer send everything h2 has queued at its next wakeup, without waiting for it unless
        `PUSH_WAIT` bytes are queued. Writes made before the writer runs leave in one TLS write."""
        if self.queued >= PUSH_WAIT:
            await self.flush()
            return
        if self.dead:
            raise StreamGone(f"{self.label}: connection with edge closed")
        self._wake_writer.set()
        await trio.lowlevel.checkpoint_if_cancelled()

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
                self.stream = await dial_edge(self.address, self.ssl_context,
                                              bind_address=self.settings.edge_bind_address)
            except TunnelLabError as exc:  # raised out of here, not out of the nursery (no group)
                dial_error = exc
            dialling.cancel_scope.cancel()
        if dial_error is not None:
            raise dial_error
        if self.stream is None:
            return
        with contextlib.suppress(OSError):
            self.edge_ip = self.stream.transport_stream.socket.getpeername()[0]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
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
            self._written_event.set()
            self._wake_window()
            if self.registered:
                self.registered = False
                if self._on_unregistered:
                    self._on_unregistered(self)
            with trio.CancelScope(shield=True):
                pending = self._take_output() if self._writer_ok else b""
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

    def _stash_output(self) -> bool:
        """Move what h2 queued to `_outbuf` (kept in order); True when the writer has something to send."""
        data = self.h2.data_to_send()
        if data:
            self._outbuf += data
        return bool(self._outbuf)

    def _take_output(self) -> bytes:
        data = self.h2.data_to_send()
        if self._outbuf:
            data = bytes(self._outbuf) + data
            self._outbuf.clear()
        return data

    async def _writer(self) -> None:
        assert self.stream is not None
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            target = self._want
            data = self._take_output()
            self.queued = 0
            if data:
                self._writer_ok = False  # until send_all returns (a cancelled send leaves a partial write)
                try:
                    await self.stream.send_all(data)
                    self._writer_ok = True
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.debug("Writing to the edge failed connIndex=%d error=%s", self.conn_index,
                              q(str(exc.__cause__ or exc)))
                    self._fail(self._lost())
                    return
            self._written = target
            self._written_event.set()
            self._written_event = trio.Event()

    async def _reader(self) -> None:
        assert self.stream is not None
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
            if self._stash_output():  # ACKs, WINDOW_UPDATEs, RST_STREAMs h2 queued
                self._wake_writer.set()

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
        ts = TunnelStream(self, event.stream_id, headers, end_stream=event.stream_ended is not None)
        kind = classify_stream(headers)
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

    async def _serve_stream(self, ts: TunnelStream, kind: StreamType) -> None:
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
            if not self.dead and self._stash_output():
                self._wake_writer.set()

    async def _call_handler(self, ts: TunnelStream, kind: StreamType) -> None:
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

    def _nursery_start(self, fn: Callable[[TunnelStream], Awaitable[None]], arg: TunnelStream) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, arg)

    async def _rpc_closed_wait(self) -> None:
        while self._rpc_closed is None:
            await self._rpc_event.wait()

    async def _rpc_reader(self, ctrl: TunnelStream) -> None:
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

    async def _send_rpc(self, ctrl: TunnelStream) -> None:
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
        local_ip = self.stream.transport_stream.socket.getsockname()[0]
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

    async def _push_local_config(self, ctrl: TunnelStream) -> None:
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

    async def _abort_rpc(self, ctrl: TunnelStream) -> None:
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

    async def _graceful_shutdown(self, ctrl: TunnelStream) -> None:
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


__all__ = [
    "ConnectionLostError",
    "ControlStreamError",
    "DuplicateConnectionError",
    "EdgeConnection",
    "EdgeConnectionError",
    "EdgeDialError",
    "RegistrationRefusedError",
    "StreamGone",
    "TunnelStream",
    "UnauthorizedError",
    "dial_edge",
    "edge_ssl_context",
    "first_of",
]

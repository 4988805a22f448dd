"""One QUIC connection to the edge (`--protocol quic`): dial, registration, request and RPC streams, UDP.

Roles: the connector dials UDP and is the QUIC and TLS **client** (SNI `quic.cftunnel.com`, ALPN
`argotunnel`); it opens the first bidirectional stream, the control stream, and is the **RPC client** of the
edge's RegistrationServer there, exactly as over http2 (wire.rpc.RpcClient). The edge opens every other
stream: a data stream (signature, version, ConnectRequest, body) is served by the same `Proxy` as an http2
stream through `QuicTunnelStream`, which presents a ConnectRequest as the http2 fields the Proxy reads and
turns its http2-style answer into a ConnectResponse; an RPC stream carries one call to our
CloudflaredServer (UDP sessions, configuration; wire.session_rpc). Datagrams carry UDP session payloads
(connector/quic_udp.py). docs/protocol.md §13.

`QuicEdgeConnection` has the interface the supervisor uses for `EdgeConnection` (run, drop, registered,
details, edge_ip, conn_index), and raises the same `EdgeConnectionError` families.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import ssl
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio
from qh3.quic.configuration import QuicConfiguration

from tunnel_lab.connector import ingress
from tunnel_lab.connector.edge_dial import split_host_port
from tunnel_lab.connector.edge_errors import (
    ConnectionLostError,
    EdgeConnectionError,
    StreamGone,
    StreamListenerError,
)
from tunnel_lab.connector.ha_connection import HAConnection
from tunnel_lab.connector.logging_setup import format_value as q
from tunnel_lab.connector.quic_transport import QuicClosedError, QuicStream, QuicTransport
from tunnel_lab.connector.quic_udp import UdpSessionManager
from tunnel_lab.connector.registration import first_of
from tunnel_lab.connector.settings import TunnelSettings
from tunnel_lab.connector.x509_text import TLS_PREFIX, go_verify_error
from tunnel_lab.transport.qh3 import peer_certificate, quic_keylog
from tunnel_lab.wire import quic_stream as qs
from tunnel_lab.wire import session_rpc as srpc
from tunnel_lab.wire.errors import ConfigError, StreamConversionError, TunnelLabError
from tunnel_lab.wire.headers import (
    META_FLOW_LIMITED,
    PROXY_UPGRADE,
    RESPONSE_HEADERS,
    RESPONSE_META,
    StreamType,
    deserialize_response_headers,
    first_value,
    parse_meta,
)

if TYPE_CHECKING:
    from tunnel_lab.connector.streams import Proxy

log = logging.getLogger(__name__)

EDGE_QUIC_SNI = "quic.cftunnel.com"
ALPN = "argotunnel"
HANDSHAKE_TIMEOUT = 5.0  # quic/constants.go HandshakeIdleTimeout
IDLE_TIMEOUT = 5.0  # MaxIdleTimeout; keep-alives every second (MaxIdlePingPeriod)
MAX_DATAGRAM_FRAME = 16383  # what cloudflared advertises (measured)
DRAIN_TIMEOUT = 2.0  # after a graceful shutdown: for the last stream bytes to be acknowledged
MAX_RPC_BYTES = 1 << 20  # one RPC stream's call: far more than any real one
RPC_STREAM_TIMEOUT = 5.0  # cloudflared's server-side timeout for a whole RPC stream
DATAGRAM_V3_FEATURE = "support_datagram_v3_2"
# RESET_STREAM / STOP_SENDING code for a stream we give up on (quic-go's application error 0 is "no error").
STREAM_ERROR = 0x2


class EdgeQuicDialError(EdgeConnectionError):
    """The QUIC handshake with the edge failed or timed out (cloudflared's EdgeQuicDialError: one log line,
    a new address, retried before the first registration like a TCP dial error)."""

    rotate_address = True
    retry_initial = True
    log_message = "Failed to dial a quic connection"

    def __init__(self, message: str, *, quic_broken: bool = False) -> None:
        super().__init__(message)
        # quic-go reports a silent handshake as an idle timeout: cloudflared's isQuicBroken
        self.quic_broken = quic_broken


class QuicIdleTimeoutError(ConnectionLostError):
    """The connection went silent past the idle timeout: the sign that UDP is blocked (`isQuicBroken`)."""


def quic_configuration(settings: TunnelSettings) -> QuicConfiguration:
    """The client configuration cloudflared uses (TLS 1.3, X25519MLKEM768 first, datagrams on)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=EDGE_QUIC_SNI,
                               idle_timeout=IDLE_TIMEOUT, max_datagram_frame_size=MAX_DATAGRAM_FRAME)
    # cloudflared's source connection id is empty; qh3's client cannot do that, and the edge must not care
    if settings.ca_cert:
        config.load_verify_locations(cafile=settings.ca_cert)
    return quic_keylog(config)


class QuicTunnelStream:
    """An edge-opened data stream, presented to `Proxy.handle_stream` like an http2 `TunnelStream`."""

    def __init__(self, conn: QuicEdgeConnection, stream: QuicStream, request: qs.ConnectRequest,
                 kind: StreamType, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self.conn = conn
        self.quic = stream
        self.stream_id = stream.stream_id
        self.request = request
        self.kind = kind
        self.headers = headers
        self.end_stream_on_headers = end_stream
        self.trailers: list[tuple[bytes, bytes]] = []
        self.status: int | None = None
        self.failed = False
        self.headers_sent = False
        self.cancel_scope = trio.CancelScope()
        stream.on_reset = self.cancel_scope.cancel  # as over http2: a reset stream's handler stops

    @property
    def label(self) -> str:
        return f"{self.conn.label} stream={self.stream_id}"

    @property
    def remote_ended(self) -> bool:
        return self.quic.remote_ended

    @property
    def reset_received(self) -> bool:
        return self.quic.reset_received is not None

    @property
    def local_ended(self) -> bool:
        return self.quic.local_ended

    async def receive_some(self) -> bytes:
        if self.end_stream_on_headers:  # cloudflared gives such a request no body (http.NoBody)
            await trio.lowlevel.checkpoint()
            return b""
        return await self.quic.receive_some()

    def push_back(self, data: bytes) -> None:
        self.quic.push_back(data)

    async def send_headers(self, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False,
                           upgraded: bool = False) -> None:
        response = self._connect_response(headers, upgraded)
        self.headers_sent = True
        await self._send(qs.encode_connect_response(response), end_stream)

    def _connect_response(self, headers: list[tuple[bytes, bytes]], upgraded: bool) -> qs.ConnectResponse:
        status_raw = first_value(headers, b":status") or b"502"
        status = int(status_raw) if status_raw.isdigit() else 502
        self.status = status
        meta = first_value(headers, RESPONSE_META)
        if meta is not None and parse_meta(meta).get("src") == "cloudflared":
            # an answer of the connector's own (502, flow limit): an error with the status, as
            # cloudflared's WriteErrorResponse sends it
            metadata: list[tuple[str, str]] = [(qs.HTTP_STATUS, str(status))]
            if meta == META_FLOW_LIMITED:
                metadata.append((qs.FLOW_RATE_LIMITED, "true"))
            return qs.ConnectResponse(error="failed to serve the request at the connector (see its log)",
                                      metadata=tuple(metadata))
        if self.kind is StreamType.TCP:
            return qs.ConnectResponse()
        serialized = first_value(headers, RESPONSE_HEADERS)
        origin = deserialize_response_headers(serialized) if serialized else []
        # An upgrade's 101 travels as 200 in the HTTP/2-style fields; a ConnectResponse carries the
        # origin's own 101, as cloudflared's response adapter writes it.
        return qs.connect_response_for_http(101 if upgraded else status, origin)

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        await self._send(data, end_stream)

    async def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        # A QUIC data stream has no trailers (cloudflared drops them too): end the body.
        await self._send(b"", True)

    async def end(self) -> None:
        if not self.quic.local_ended:
            await self._send(b"", True)

    async def reset(self, code: int = STREAM_ERROR) -> None:
        if int(code) != 0:
            self.failed = True
        self.quic.reset(STREAM_ERROR if int(code) else 0)
        await trio.lowlevel.checkpoint()

    async def _send(self, data: bytes, end_stream: bool) -> None:
        if self.quic.reset_received is not None:
            raise StreamGone(f"{self.label}: reset by the edge")
        try:
            await self.quic.send_all(data, end_stream=end_stream)
        except QuicClosedError as exc:
            raise StreamGone(f"{self.label}: {exc}") from exc


class _QuicControl:
    """The control stream of a QUIC connection as the registration client uses it."""

    def __init__(self, stream: QuicStream) -> None:
        self.stream = stream

    @property
    def local_ended(self) -> bool:
        return self.stream.local_ended

    @property
    def reset_received(self) -> bool:
        return self.stream.reset_received is not None

    async def receive_some(self) -> bytes:
        return await self.stream.receive_some()

    async def send(self, data: bytes) -> None:
        with contextlib.suppress(QuicClosedError):
            await self.stream.send_all(data)

    async def close(self) -> None:
        """FIN (a QUIC stream has no RST_STREAM NO_ERROR to add)."""
        with contextlib.suppress(QuicClosedError):
            await self.stream.send_eof()


def request_fields(request: qs.ConnectRequest) -> tuple[StreamType, list[tuple[bytes, bytes]], bool]:
    """The http2-style fields (and stream kind) for a ConnectRequest, as the edge would have sent them over
    http2, and whether the request has no body. Raises QuicStreamError for a malformed request."""
    if request.type is qs.ConnectionType.TCP:
        return StreamType.TCP, [(b":method", b"CONNECT"), (b":authority", request.dest.encode())], False
    fields = qs.http_fields_from_connect_request(request)
    url = urlsplit(fields.dest)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = [(b":method", fields.method.encode()), (b":scheme", (url.scheme or "http").encode()),
               (b":authority", (fields.host or url.netloc).encode()), (b":path", path.encode())]
    # Transfer-Encoding only says whether there is a body (cloudflared moves it to req.TransferEncoding);
    # as a field it is what an http2 request may not carry, and the origin request frames the body itself.
    chunked = any(name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
                  for name, value in fields.headers)
    headers += [(name.lower(), value) for name, value in fields.headers
                if name.lower() != b"transfer-encoding"]
    if fields.websocket:
        headers.append((PROXY_UPGRADE, b"websocket"))
        return StreamType.WEBSOCKET, headers, False
    # cloudflared's request has a body only with a Content-Length or a chunked Transfer-Encoding
    no_body = first_value(headers, b"content-length") in (None, b"0") and not chunked
    return StreamType.HTTP, headers, no_body


class QuicEdgeConnection(HAConnection):
    """One HA connection (connIndex) over QUIC, from dial to close."""

    protocol = "quic"

    def __init__(self, settings: TunnelSettings, proxy: Proxy, *, conn_index: int, address: str,
                 ssl_context: ssl.SSLContext | None = None, num_previous_attempts: int = 0,
                 on_registered: Callable[[QuicEdgeConnection], None] | None = None,
                 on_unregistered: Callable[[QuicEdgeConnection], None] | None = None) -> None:
        super().__init__(settings, conn_index=conn_index, address=address,
                         num_previous_attempts=num_previous_attempts, on_registered=on_registered,
                         on_unregistered=on_unregistered)
        self.proxy = proxy
        self.datagram_version = 3 if DATAGRAM_V3_FEATURE in settings.features else 2
        self.transport: QuicTransport | None = None
        self.udp: UdpSessionManager | None = None
        self._streams_idle = trio.Event()
        self._streams_idle.set()
        self._active = 0

    @property
    def active_streams(self) -> int:
        return self._active

    # -- lifecycle
    async def run(self, shutdown: trio.Event) -> None:
        """Dial, register, serve until `shutdown` (then unregister and drain) or the connection dies."""
        host, port = split_host_port(self.address)
        try:
            config = quic_configuration(self.settings)
        except (OSError, ValueError) as exc:
            raise EdgeQuicDialError(f"cannot load --cacert: {exc}") from exc
        if self.settings.trace is not None:
            self.trace = self.settings.trace.connection(
                conn=f"connector#{self.conn_index}.{self.num_previous_attempts}", conn_index=self.conn_index,
                edge=self.address, transport="quic", tunnel=str(self.settings.credentials.tunnel_id))
        transport = QuicTransport(config, (host, port), on_stream=self._on_stream,
                                  on_datagram=self._on_datagram, bind_address=self.settings.edge_bind_address,
                                  trace=self.trace)
        self.transport = transport
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await nursery.start(transport.serve)
                except OSError as exc:
                    raise EdgeQuicDialError(f"failed to dial to edge with quic: {exc}") from exc
                self.udp = UdpSessionManager(
                    conn_index=self.conn_index, version=self.datagram_version,
                    send_datagram=transport.send_datagram, nursery=nursery,
                    unregister_at_edge=self._unregister_at_edge,
                    max_active_flows=self.proxy.warp.max_active_flows or 0)
                try:
                    await self._main(shutdown)
                    # what the in-flight streams wrote must reach the edge before CONNECTION_CLOSE
                    with trio.move_on_after(DRAIN_TIMEOUT):
                        await transport.drain()
                except EdgeConnectionError as exc:
                    self._fail(exc)
                except TunnelLabError as exc:  # StreamGone, RpcError, QuicClosedError
                    self._fail(self._lost(str(exc)))
                transport.close(0, "")  # while the socket is still open
                nursery.cancel_scope.cancel()
        finally:
            self._gone()
            if self.udp is not None:
                self.udp.close_all()
            transport.close(0, "")
        if self._failure is not None:
            raise self._failure

    def _closing(self) -> None:
        if self.transport is not None:
            self.transport.close(0, "")  # CONNECTION_CLOSE while the socket is still open

    def _lost(self, reason: str) -> EdgeConnectionError:
        transport = self.transport
        if transport is not None and transport.closed and transport.handshake_done.is_set():
            return self._listener_failed(transport)
        if "idle" in reason.lower() or "timeout" in reason.lower():
            return QuicIdleTimeoutError("timeout: no recent network activity")
        return ConnectionLostError(f"connection with edge closed: {reason}")

    def _listener_failed(self, transport: QuicTransport) -> StreamListenerError:
        """The established connection ended: log it as cloudflared's serveQUIC does (its stream listener
        fails first, then the datagram handler is cancelled, then the connection's Serve returns)."""
        error = StreamListenerError(_accept_failure(transport))
        if self._failure is None and not self.dead:  # only the first end of this connection is logged
            for line, text in (("failed to accept incoming stream requests", f"failed to accept QUIC stream: "
                                                                             f"{error.cause}"),
                               ("failed to run the datagram handler", "context canceled"),
                               ("failed to serve tunnel connection", str(error))):
                log.error("%s error=%s connIndex=%d event=0 ip=%s", line, q(text), self.conn_index,
                          self.edge_ip)
        return error

    async def _main(self, shutdown: trio.Event) -> None:
        transport = self.transport
        assert transport is not None
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            await first_of(transport.handshake_done.wait, transport.terminated.wait, shutdown.wait)
        if shutdown.is_set() and not transport.handshake_done.is_set():
            return
        # qh3's own idle timer (the same 5 s) may fire first on a busy machine: a silent edge either way.
        if scope.cancelled_caught or (not transport.handshake_done.is_set()
                                      and transport.close_reason == "Idle timeout"):
            raise EdgeQuicDialError("failed to dial to edge with quic: timeout: no recent network activity",
                                    quic_broken=True)
        if not transport.handshake_done.is_set():
            raise EdgeQuicDialError(f"failed to dial to edge with quic: {_handshake_failure(transport)}")
        if self.settings.ca_cert is None:
            pass  # qh3 verified the edge against the system roots
        assert self._nursery is not None and transport.local_address is not None
        self._nursery.start_soon(self._watch_transport)
        await self._serve_control(_QuicControl(transport.open_stream()), shutdown,
                                  local_ip=transport.local_address[0], state=self.proxy.state,
                                  active_streams=lambda: self._active,
                                  wait_idle=lambda: self._streams_idle.wait())

    async def _watch_transport(self) -> None:
        assert self.transport is not None
        await self.transport.terminated.wait()
        reason = self.transport.close_reason
        log.debug("QUIC connection closed connIndex=%d reason=%s", self.conn_index, q(reason))
        self._fail(self._lost(reason))

    # -- edge-opened streams
    def _on_stream(self, stream: QuicStream) -> None:
        if self._nursery is None or self.dead:
            stream.reset(STREAM_ERROR)
            return
        self._active += 1
        if self._streams_idle.is_set():  # a waiter holds the unset one: never swap that
            self._streams_idle = trio.Event()
        self._nursery.start_soon(self._serve_stream, stream)

    async def _serve_stream(self, stream: QuicStream) -> None:
        try:
            await self._serve_stream_inner(stream)
        except (StreamGone, QuicClosedError):
            pass
        except Exception:
            log.exception("Stream handler failed %s stream=%d", self.label, stream.stream_id)
            stream.reset(STREAM_ERROR)
        finally:
            assert self.transport is not None
            self.transport.forget(stream)
            self._active -= 1
            if not self._active:
                self._streams_idle.set()

    async def _serve_stream_inner(self, stream: QuicStream) -> None:
        reader = qs.StreamHeadReader(expect="request", allow_rpc=True)
        head: qs.StreamHead | None = None
        try:
            with trio.fail_after(RPC_STREAM_TIMEOUT):
                while head is None:
                    data = await stream.receive_some()
                    if not data:
                        return  # ended (or reset) before its head: nothing to serve
                    head = reader.feed(data)
        except trio.TooSlowError:
            log.warning("Stream head not received in time, resetting it connIndex=%d stream=%d",
                        self.conn_index, stream.stream_id)
            stream.reset(STREAM_ERROR)
            return
        except qs.QuicStreamError as exc:
            log.warning("Malformed stream from the edge, resetting it error=%s connIndex=%d stream=%d",
                        q(str(exc)), self.conn_index, stream.stream_id)
            stream.reset(STREAM_ERROR)
            return
        stream.push_back(head.rest)
        if head.kind is qs.StreamKind.RPC:
            await self._serve_rpc_stream(stream)
            return
        assert isinstance(head.message, qs.ConnectRequest)
        await self._serve_data_stream(stream, head.message)

    async def _serve_data_stream(self, stream: QuicStream, request: qs.ConnectRequest) -> None:
        try:
            kind, headers, no_body = request_fields(request)
        except (qs.QuicStreamError, UnicodeError) as exc:
            log.warning("Malformed ConnectRequest from the edge error=%s connIndex=%d stream=%d",
                        q(str(exc)), self.conn_index, stream.stream_id)
            response = qs.ConnectResponse(error=f"malformed ConnectRequest: {exc}",
                                          metadata=((qs.HTTP_STATUS, "400"),))
            with contextlib.suppress(QuicClosedError):
                await stream.send_all(qs.encode_connect_response(response), end_stream=True)
            return
        ts = QuicTunnelStream(self, stream, request, kind, headers, no_body)
        if self.trace is not None:
            self.trace.event("stream.classified", stream=stream.stream_id, stream_kind=kind.value,
                             ray=request.get("HttpHeader:Cf-Ray"))
        with ts.cancel_scope, contextlib.suppress(StreamGone):
            await self.proxy.handle_stream(ts, kind)  # type: ignore[arg-type]
        if not stream.local_ended and stream.reset_received is None:
            stream.reset(STREAM_ERROR)

    # -- RPC streams: our CloudflaredServer
    async def _serve_rpc_stream(self, stream: QuicStream) -> None:
        server = srpc.SessionRpcServer()
        received = 0
        with trio.move_on_after(RPC_STREAM_TIMEOUT):
            while not server.aborted:
                data = await stream.receive_some()
                if not data:
                    break
                received += len(data)
                try:
                    if received > MAX_RPC_BYTES:
                        raise TunnelLabError(f"more than {MAX_RPC_BYTES} bytes of RPC on one stream")
                    events = server.receive_data(data)
                except TunnelLabError as exc:
                    log.warning("Malformed RPC stream from the edge, resetting it error=%s connIndex=%d "
                                "stream=%d", q(str(exc)), self.conn_index, stream.stream_id)
                    stream.reset(STREAM_ERROR)
                    return
                for event in events:
                    await self._rpc_call(server, event)
                out = server.data_to_send()
                if out:
                    await stream.send_all(out)
        with contextlib.suppress(QuicClosedError):
            await stream.send_eof()

    async def _rpc_call(self, server: srpc.SessionRpcServer, event: srpc.SessionServerEvent) -> None:
        udp = self.udp
        assert udp is not None
        if isinstance(event, srpc.RegisterUdpSessionCalled):
            error = await udp.register_v2(event.params)
            server.answer_register_udp_session(event.question_id, error)
        elif isinstance(event, srpc.UnregisterUdpSessionCalled):
            if udp.version == 3:
                server.answer_exception(event.question_id,
                                        "datagram v3 does not support UnregisterUdpSession RPC")
            else:
                udp.unregister_v2(event.session_id, event.message)
                server.answer_empty(event.question_id)
        elif isinstance(event, srpc.UpdateConfigurationCalled):
            latest, error = self._update_configuration(event.version, event.config)
            server.answer_update_configuration(event.question_id, latest, error)

    def _update_configuration(self, version: int, config: bytes) -> tuple[int, str]:
        """The remote configuration pushed over an RPC stream (the QUIC form of docs/protocol.md §8)."""
        proxy = self.proxy
        if version <= proxy.config_version:
            log.debug("Ignoring configuration version=%d, current version=%d %s", version,
                      proxy.config_version, self.label)
            return proxy.config_version, ""
        envelope = b'{"version":%d,"config":%s}' % (version, config or b"null")
        try:
            _, rules, warp = ingress.parse_remote_config(envelope)
            parsed = json.loads(config)
        except (ConfigError, StreamConversionError, ValueError) as exc:
            log.error("Failed to update configuration error=%s version=%d", q(str(exc)), version)
            return proxy.config_version, str(exc)
        proxy.rules = rules
        proxy.warp = warp
        proxy.config_version = version
        log.info("Updated to new configuration config=%s version=%d",
                 q(json.dumps(parsed, separators=(",", ":"))), version)
        proxy.state.set_config(version, parsed if isinstance(parsed, dict) else {})
        return version, ""

    async def _unregister_at_edge(self, session_id: uuid.UUID, message: str) -> None:
        """Tell the edge that a session ended on our side (SessionManager.unregisterUdpSession)."""
        transport = self.transport
        if transport is None or transport.closed:
            return
        stream = transport.open_stream()
        client = srpc.SessionRpcClient()
        try:
            with trio.move_on_after(self.settings.rpc_timeout):
                qid = client.unregister_udp_session(session_id, message)
                await stream.send_all(qs.rpc_stream_preamble() + client.data_to_send())
                while True:
                    data = await stream.receive_some()
                    if not data:
                        break
                    events = client.receive_data(data)
                    out = client.data_to_send()
                    if any(getattr(ev, "question_id", None) == qid for ev in events):
                        client.abort()
                        await stream.send_all(out + client.data_to_send(), end_stream=True)
                        return
                    if out:
                        await stream.send_all(out)
        except (QuicClosedError, TunnelLabError) as exc:
            log.error("Failed to unregister udp session with edge error=%s sessionID=%s", q(str(exc)),
                      session_id.hex)
        finally:
            transport.forget(stream)

    def _on_datagram(self, data: bytes) -> None:
        if self.udp is not None:
            self.udp.datagram_received(data)


BAD_CERTIFICATE = 0x100 + 42  # CRYPTO_ERROR carrying TLS alert bad_certificate
UNKNOWN_AUTHORITY = 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: left once validity and name are fine


def _handshake_failure(transport: QuicTransport) -> str:
    """quic-go's words for a failed handshake: `CRYPTO_ERROR 0x12a (local): tls: failed to verify
    certificate: x509: ...` when the edge's certificate did not verify (Go's x509 text, as over http2)."""
    code = transport.close_code
    peer = peer_certificate(transport.quic)
    if code == BAD_CERTIFICATE and peer is not None:
        text = go_verify_error(der=peer.public_bytes(), server_name=EDGE_QUIC_SNI,
                               now=datetime.datetime.now().astimezone(), verify_code=UNKNOWN_AUTHORITY,
                               verify_message=transport.close_reason)
        return f"CRYPTO_ERROR {code:#x} (local): {TLS_PREFIX}{text}"
    if code is not None and 0x100 <= code < 0x200:
        return f"CRYPTO_ERROR {code:#x} (remote): {transport.close_reason}"
    if code is not None and transport.close_is_transport and code < len(TRANSPORT_ERRORS):
        # quic-go's TransportError text, e.g. the edge refusing: `CONNECTION_REFUSED (remote): <reason>`
        name = f"{TRANSPORT_ERRORS[code]} (remote)"
        return f"{name}: {transport.close_reason}" if transport.quic_reason else name
    return transport.close_reason


def _accept_failure(transport: QuicTransport) -> str:
    """quic-go's words for the end of an established connection, as `AcceptStream` returns them."""
    code = transport.close_code
    if transport.close_reason == "Stateless reset" and code == 0 and not transport.close_is_transport:
        return "received a stateless reset"  # quic-go's StatelessResetError
    if transport.close_reason == "Idle timeout":
        return "timeout: no recent network activity"  # quic-go's IdleTimeoutError
    if code is not None and not transport.close_is_transport:
        text = f"Application error {code:#x} (remote)"  # quic-go's ApplicationError
        return f"{text}: {transport.quic_reason}" if transport.quic_reason else text
    return _handshake_failure(transport)


# RFC 9000 §20.1 transport error codes 0x0-0x10, named as quic-go's qerr.TransportErrorCode.String() does.
TRANSPORT_ERRORS = ("NO_ERROR", "INTERNAL_ERROR", "CONNECTION_REFUSED", "FLOW_CONTROL_ERROR",
                    "STREAM_LIMIT_ERROR", "STREAM_STATE_ERROR", "FINAL_SIZE_ERROR", "FRAME_ENCODING_ERROR",
                    "TRANSPORT_PARAMETER_ERROR", "CONNECTION_ID_LIMIT_ERROR", "PROTOCOL_VIOLATION",
                    "INVALID_TOKEN", "APPLICATION_ERROR", "CRYPTO_BUFFER_EXCEEDED", "KEY_UPDATE_ERROR",
                    "AEAD_LIMIT_REACHED", "NO_VIABLE_PATH")

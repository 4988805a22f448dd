"""The connector's HTTP/1.1 origin client: dialling, TLS, and a keep-alive pool per origin.

What goes on the wire (the request head, body framing) is decided by `wire.origin`; this module only moves
bytes. Responses are parsed by `wire.http1` (httptools). Every failure to reach an origin becomes an
`OriginError` whose text names the cause the way Go's transport does (`dial tcp 127.0.0.1:8089:
connect: connection refused`, `tls: failed to verify certificate: x509: ...`, see connector.x509_text),
so that the stream handler can log it and answer 502.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import select
import socket
import ssl
from collections import defaultdict, deque
from dataclasses import dataclass

import trio

from tunnel_lab.connector.settings import OriginRequestConfig
from tunnel_lab.connector.x509_text import go_tls_verify_error
from tunnel_lab.wire.errors import OriginError
from tunnel_lab.wire.http1 import Event, Http1Error, ResponseReader

log = logging.getLogger(__name__)

# Largest origin response head we accept: Go's transport default (MaxResponseHeaderBytes, which cloudflared
# leaves unset). A larger head is a 502 for that request only. A head the edge finds too big is the edge's
# to refuse, as it is with cloudflared (it ignores the edge's MAX_HEADER_LIST_SIZE: docs/protocol.md §12.3).
MAX_ORIGIN_HEAD = 10 * 1024 * 1024
RECEIVE_SIZE = 65536


@dataclass(frozen=True)
class OriginTarget:
    """Where to connect and how to check the origin's certificate (https only)."""

    scheme: str  # "http" or "https"
    host: str
    port: int
    server_name: str | None = None  # TLS server name (SNI and verification); None: `host`
    verify: bool = True
    ca_pool: str | None = None  # PEM file added to the system roots
    extra_ca_pem: str | None = None  # PEM text added to the roots (the hello-world origin's CA)
    unix_path: str | None = None  # dial this Unix socket instead of host:port

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def address(self) -> str:
        if self.unix_path is not None:
            return self.unix_path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class OriginConnection:
    """One HTTP/1.1 connection to an origin; `wire.http1.ResponseReader` parses what the origin answers.

    The request head and body are written raw (`send_all`) because `wire.origin` already produced Go's
    exact bytes; the reader is told the method only (a HEAD response has no body).
    """

    def __init__(self, stream: trio.abc.Stream, target: OriginTarget, sock_fd: int | None) -> None:
        self.stream = stream
        self.target = target
        self.reader = ResponseReader(MAX_ORIGIN_HEAD)
        self._events: deque[Event] = deque()
        self.idle_since = 0.0
        self.reused = False
        self._fd = sock_fd
        self.closed = False

    def start_request(self, method: str, *, websocket: bool) -> None:
        """A request is about to be written: parse its response next. (`websocket`: kept for callers;
        a 101 is taken as a switch whatever the request, the exchange judges it.)"""
        self.reader.expect(method)
        self._events.clear()

    async def send_all(self, data: bytes) -> None:
        if not data:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise OriginError(f"write to origin {self.target.address}: {_cause(exc)}") from exc

    async def next_event(self) -> Event:
        """The next event of the response (Informational, ResponseHead, Body, End, Closed)."""
        while not self._events:
            # a parse error deferred behind earlier events is raised at once, without a read
            data = await self._receive() if self.reader.error is None else b""
            try:
                self._events.extend(self.reader.feed(data) if data else self.reader.feed_eof())
            except Http1Error as exc:
                raise OriginError(f"malformed HTTP response from origin {self.target.address}: {exc}") \
                    from exc
        return self._events.popleft()

    async def _receive(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise OriginError(f"read from origin {self.target.address}: {_cause(exc)}") from exc

    def take_held(self) -> bytes:
        """After a 101 Switching Protocols: the bytes read beyond its head."""
        held, self.reader.held = self.reader.held or b"", None
        return held

    async def receive_raw(self) -> bytes:
        """Raw bytes after a protocol switch (101); b"" at EOF."""
        try:
            return bytes(await self.stream.receive_some(RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    @property
    def reusable(self) -> bool:
        return self.reader.reusable and not self._events

    def stale(self) -> bool:
        """True when an idle connection was closed by the origin (readable while idle means EOF or junk)."""
        if self._fd is None:
            return False
        try:
            readable, _, _ = select.select([self._fd], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        with trio.move_on_after(1) as scope:
            scope.shield = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self.stream.aclose()


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__
    if isinstance(inner, OSError) and inner.errno is not None:
        return _errno_text(inner)
    return str(exc) or type(exc).__name__


def set_keepalive(stream: trio.SocketStream, seconds: float) -> None:
    """TCP keepalive probes after `seconds` idle (cloudflared's `tcpKeepAlive`, Go's KeepAlive dialer)."""
    if seconds <= 0:
        return
    idle = max(1, int(seconds))
    with contextlib.suppress(OSError, AttributeError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)


def dial_error_text(exc: BaseException) -> str:
    """Go's wording for a failed dial: `connect: connection refused`, `i/o timeout`, `lookup x: ...`."""
    if isinstance(exc, trio.TooSlowError):
        return "i/o timeout"
    # trio summarises every address it tried; the causes are in an ExceptionGroup
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        last = cause.exceptions[-1]
        if isinstance(last, OSError):
            return f"connect: {_errno_text(last)}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"connect: {_errno_text(exc)}"
    if "resolve" in str(exc).lower() or "name" in str(exc).lower():
        return f"lookup: {exc}"
    return str(exc)


def _errno_text(exc: OSError) -> str:
    texts = {errno.ECONNREFUSED: "connection refused", errno.ECONNRESET: "connection reset by peer",
             errno.EHOSTUNREACH: "no route to host", errno.ENETUNREACH: "network is unreachable",
             errno.EPIPE: "broken pipe", errno.ETIMEDOUT: "i/o timeout"}
    if exc.errno in texts:
        return texts[exc.errno]
    return exc.strerror or str(exc)


class OriginPool:
    """Keep-alive pool: idle connections per origin target, up to `keep_alive_connections` each, dropped after
    `keep_alive_timeout` seconds idle."""

    def __init__(self) -> None:
        self._idle: dict[OriginTarget, deque[OriginConnection]] = defaultdict(deque)
        self._contexts: dict[tuple[str | None, bool, str | None], ssl.SSLContext] = {}

    def ssl_context(self, target: OriginTarget) -> ssl.SSLContext:
        key = (target.ca_pool, target.verify, target.extra_ca_pem)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context()
            if target.ca_pool:
                try:
                    ctx.load_verify_locations(cafile=target.ca_pool)
                except (OSError, ssl.SSLError) as exc:
                    raise OriginError(f"cannot load origin CA pool {target.ca_pool}: {exc}") from exc
            if target.extra_ca_pem:
                ctx.load_verify_locations(cadata=target.extra_ca_pem)
            if not target.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._contexts[key] = ctx
        return ctx

    async def acquire(self, target: OriginTarget, cfg: OriginRequestConfig) -> OriginConnection:
        """An idle connection to `target`, or a new one (raises `OriginError`)."""
        idle = self._idle.get(target)
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > cfg.keep_alive_timeout or conn.stale():
                await conn.aclose()
                continue
            conn.reused = True
            return conn
        return await self._dial(target, cfg)

    async def release(self, conn: OriginConnection, cfg: OriginRequestConfig, *, reusable: bool) -> None:
        """Give a connection back after a response; it is kept only if HTTP/1.1 allows reuse."""
        if not self.keep(conn, cfg, reusable=reusable):
            await conn.aclose()

    def keep(self, conn: OriginConnection, cfg: OriginRequestConfig, *, reusable: bool) -> bool:
        """`release` without the close: True when the connection went back to the idle list; otherwise the
        caller closes it."""
        if not reusable or conn.closed or not conn.reusable:
            return False
        idle = self._idle[conn.target]
        if len(idle) >= max(cfg.keep_alive_connections, 0):
            return False
        conn.idle_since = trio.current_time()
        idle.append(conn)
        return True

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                await idle.pop().aclose()

    async def _dial(self, target: OriginTarget, cfg: OriginRequestConfig) -> OriginConnection:
        net = "unix" if target.unix_path is not None else "tcp"
        try:
            with trio.fail_after(cfg.connect_timeout):
                if target.unix_path is not None:
                    tcp = await trio.open_unix_socket(target.unix_path)
                else:
                    tcp = await trio.open_tcp_stream(target.host, target.port)
        except trio.TooSlowError:
            raise OriginError(f"dial {net} {target.address}: i/o timeout") from None
        except OSError as exc:
            raise OriginError(f"dial {net} {target.address}: {dial_error_text(exc)}") from exc
        if target.unix_path is None:
            set_keepalive(tcp, cfg.tcp_keep_alive)
        fd = tcp.socket.fileno()
        if not target.tls:
            return OriginConnection(tcp, target, fd)
        ctx = self.ssl_context(target)
        server_name = target.server_name or target.host
        stream = trio.SSLStream(tcp, ctx, server_hostname=server_name)
        done = False
        try:
            with trio.fail_after(cfg.tls_timeout):
                await stream.do_handshake()
            done = True
        except trio.TooSlowError:
            raise OriginError(f"TLS handshake with origin {target.address}: "
                              "net/http: TLS handshake timeout") from None
        except trio.BrokenResourceError as exc:
            tcp.socket.close()
            inner = exc.__cause__
            if isinstance(inner, ssl.SSLCertVerificationError):
                der = None if target.unix_path is not None else await fetch_peer_certificate(
                    target.host, target.port, server_name, min(cfg.tls_timeout, 5))
                log.debug("origin %s (server name %r) presented %s: %s", target.address, server_name,
                          describe_certificate(der), inner.verify_message or inner.reason)
                text = go_tls_verify_error(inner, der=der, server_name=server_name,
                                           now=datetime.datetime.now().astimezone())
                raise OriginError(text) from exc
            raise OriginError(f"TLS handshake with origin {target.address} (server name {server_name!r}) "
                              f"failed: {inner or exc}") from exc
        finally:
            if not done:  # also when cancelled mid-handshake
                tcp.socket.close()
        return OriginConnection(stream, target, fd)


async def fetch_peer_certificate(host: str, port: int, server_name: str,
                                 timeout: float = 5.0) -> bytes | None:
    """The leaf certificate a TLS server presents (DER), fetched without verification, so that a failed
    verification can be worded as Go words it; None when it cannot be fetched."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(host, port)
            stream = trio.SSLStream(tcp, ctx, server_hostname=server_name)
            try:
                await stream.do_handshake()
                return stream.getpeercert(binary_form=True)
            finally:
                await tcp.aclose()
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return None


def describe_certificate(der: bytes | None) -> str:
    """Subject, issuer, SANs and validity of a certificate, for a DEBUG line beside Go's error text."""
    if not der:
        return "no certificate could be fetched"
    try:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string()
        issuer = cert.issuer.rfc4514_string()
        try:
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans = [str(v) for v in ext.get_values_for_type(x509.DNSName)]
            sans += [str(v) for v in ext.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            sans = []
        start = f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
        end = f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        return (f"certificate subject {subject!r} issued by {issuer!r}, SANs {sans}, "
                f"valid {start} to {end}")
    except ValueError:
        return "the certificate does not parse"

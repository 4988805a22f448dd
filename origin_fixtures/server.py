"""`serve_origin`: run one origin fixture on a loopback listener (plain TCP or TLS)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import ssl
from dataclasses import dataclass, field
from typing import NoReturn

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from tunnel_lab.origin_fixtures.conn import RECEIVE_SIZE, Conn
from tunnel_lab.origin_fixtures.history import History, RequestRecord
from tunnel_lab.origin_fixtures.http1 import MAX_HEAD_BYTES, ConnectionClosed, RequestHead, RequestParseError
from tunnel_lab.origin_fixtures.kinds import Handler, handle_echo, handle_misbehave, handle_stream
from tunnel_lab.transport.trio_ssl import ssl_object
from tunnel_lab.wire.errors import ConfigError

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("echo", "hello", "stream", "ws-echo", "tcp-echo", "misbehave", "udp-echo", "dns")


@dataclass(frozen=True, kw_only=True)
class OriginConfig:
    """How to run a fixture: TLS (a server context, or None for plain TCP) and where to record requests."""

    ssl_context: ssl.SSLContext | None = None
    history: History = field(default_factory=History)
    max_head_bytes: int = MAX_HEAD_BYTES


def format_address(host: str, port: int) -> str:
    """`127.0.0.1:80`, `[::1]:80`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_origin(kind: str, host: str, port: int, options: OriginConfig | None = None, *,
                       task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> NoReturn:
    """Serve origin `kind` on `host:port` (port 0: any) until cancelled.

    `task_status.started` gets the bound `(host, port)`. Each connection is handled in its own task;
    a failing connection is logged and closed, never taking the listener down.
    """
    options = options or OriginConfig()
    if kind not in KINDS:
        raise ConfigError(f"unknown origin kind {kind!r}", hint="one of " + ", ".join(KINDS))
    if kind == "hello":
        await _serve_hello(host, port, options, task_status=task_status)
        raise AssertionError("unreachable")  # pragma: no cover
    if kind in ("udp-echo", "dns"):  # UDP (origin_fixtures/udp.py)
        from tunnel_lab.origin_fixtures.udp import serve_udp_origin

        await serve_udp_origin(kind, host, port, options.history, task_status=task_status)
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and len(listeners) > 1:
        # A name like `localhost` gives one listener per address family, each on its own random port;
        # keep the first so that the one reported address is the whole truth.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    sockname = listeners[0].socket.getsockname()
    bound: tuple[str, int] = (sockname[0], sockname[1])
    wrapped: list[trio.abc.Listener[trio.abc.Stream]] = []
    for listener in listeners:
        if options.ssl_context is not None:
            _capture_sni(options.ssl_context)
            wrapped.append(trio.SSLListener(listener, options.ssl_context, https_compatible=True))
        else:
            wrapped.append(listener)
    log.info("origin kind=%s listening on %s tls=%s", kind, format_address(*bound),
             options.ssl_context is not None)

    async def handler(stream: trio.abc.Stream) -> None:
        await _handle_connection(stream, kind, options)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, wrapped)
        task_status.started(bound)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


async def _serve_hello(host: str, port: int, options: OriginConfig, *,
                       task_status: trio.TaskStatus[tuple[str, int]]) -> None:
    try:
        from tunnel_lab.connector.hello import serve_hello_world  # the connector's own hello world
    except ImportError as exc:
        raise ConfigError("origin kind 'hello' needs connector.hello, which is not available",
                          hint="use kind echo or stream") from exc
    # Plain HTTP unless the fixture was given TLS (cloudflared's own defaults to a self-made cert).
    await serve_hello_world(host, port, ssl_context=options.ssl_context,
                            tls=options.ssl_context is not None, task_status=task_status)


_SNI_ATTR = "tunnel_lab_sni"


def _capture_sni(ctx: ssl.SSLContext) -> None:
    # Keep the SNI a client asked for, so the history can show it (originServerName scenarios).
    # A context that already has a callback is left alone.
    if ctx.sni_callback is not None:
        return

    def remember(sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
        setattr(sslobj, _SNI_ATTR, name)

    ctx.sni_callback = remember


def _peer(stream: trio.abc.Stream) -> str:
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, trio.SocketStream):
        try:
            addr = inner.socket.getpeername()
            return format_address(addr[0], addr[1])
        except OSError:
            pass
    return "?"


async def _handle_connection(stream: trio.abc.Stream, kind: str, options: OriginConfig) -> None:
    peer = _peer(stream)
    tls = isinstance(stream, trio.SSLStream)
    try:
        sni = None
        if isinstance(stream, trio.SSLStream):
            await stream.do_handshake()
            # the SNI callback stored the name on the SSLObject
            sni = getattr(ssl_object(stream), _SNI_ATTR, None)
        conn = Conn(stream, kind=kind, history=options.history, peer=peer, tls=tls, sni=sni,
                    max_head_bytes=options.max_head_bytes)
        if kind == "tcp-echo":
            await _tcp_echo(conn)
            return
        handler: Handler = {"echo": handle_echo, "stream": handle_stream, "misbehave": handle_misbehave,
                            "ws-echo": _handle_not_websocket}[kind]
        await _handle_http(conn, handler, websocket=kind in ("echo", "ws-echo"))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        cause = exc.__cause__ or exc
        log.debug("origin kind=%s peer=%s connection lost: %s", kind, peer, cause)
    except Exception:
        log.exception("origin kind=%s peer=%s connection failed", kind, peer)


async def _handle_http(conn: Conn, handler: Handler, *, websocket: bool) -> None:
    while True:
        try:
            event = await conn.receive_event()
        except RequestParseError as exc:
            log.warning("origin kind=%s peer=%s bad request: %s", conn.kind, conn.peer, exc)
            await _bad_request(conn, exc)
            return
        if isinstance(event, ConnectionClosed):
            return
        assert isinstance(event, RequestHead)
        head = event
        record = conn.begin_record(head)
        try:
            if websocket and head.is_websocket_upgrade:
                await _websocket_echo(conn, head, record)
                return
            try:
                body = await conn.read_body(head)
            except RequestParseError as exc:
                log.warning("origin kind=%s peer=%s bad request body: %s", conn.kind, conn.peer, exc)
                conn.note(str(exc))
                await _bad_request(conn, exc)
                return
            log.debug("origin kind=%s peer=%s request %s %s body=%d", conn.kind, conn.peer,
                      head.method.decode("latin-1"), head.target.decode("latin-1"), body.length)
            keep = await handler(conn, head, body)
        finally:
            conn.history.finish(record)
        if not keep:
            return
        conn.end_exchange()


async def _bad_request(conn: Conn, exc: Exception) -> None:
    if conn.head_sent:
        return
    text = f"{exc}\n".encode("utf-8", "replace")
    if conn.record is not None:
        conn.record.status = 400
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await conn.send(b"HTTP/1.1 400 Bad Request\r\nX-Origin: %s\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                        % (conn.kind.encode(), len(text), text))


async def _handle_not_websocket(conn: Conn, head: RequestHead, body: object) -> bool:
    return await conn.respond(head, 426, [("Content-Type", "text/plain"), ("Upgrade", "websocket")],
                              b"ws-echo: this origin only speaks WebSocket\n")


async def _websocket_echo(conn: Conn, head: RequestHead, record: RequestRecord) -> None:
    """Complete the WebSocket handshake with wsproto and echo every message back."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(head.raw + conn.reader.take_buffered())
        request = next(iter(ws.events()), None)
    except RemoteProtocolError as exc:
        request = None
        conn.note(f"bad handshake: {exc}")
    if not isinstance(request, Request):
        record.status = 400
        conn.head_sent = True
        await conn.send(ws.send(RejectConnection(status_code=400, has_body=False))
                        if ws.state is ConnectionState.CONNECTING else
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return
    subprotocol = request.subprotocols[0] if request.subprotocols else None
    record.status = 101
    conn.head_sent = True
    await conn.send(ws.send(AcceptConnection(
        subprotocol=subprotocol, extra_headers=[(b"X-Origin", conn.kind.encode())])))
    log.debug("origin kind=%s peer=%s websocket open on %s", conn.kind, conn.peer, request.target)
    echoed = 0
    digest = hashlib.sha256()
    messages = 0
    try:
        while True:
            data = await conn.stream.receive_some(RECEIVE_SIZE)
            ws.receive_data(bytes(data) or None)
            out = bytearray()
            closed = False
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    payload = event.data.encode() if isinstance(event, TextMessage) else event.data
                    echoed += len(payload)
                    digest.update(payload)
                    messages += event.message_finished
                    out += ws.send(event)  # the same event type, data and fin flag: an echo
                elif isinstance(event, Ping):
                    out += ws.send(event.response())
                elif isinstance(event, CloseConnection):
                    closed = True
                    conn.note(f"closed by client: code {event.code}")
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        out += ws.send(event.response())
            if out:
                await conn.send(bytes(out))
            if closed or not data:
                return
    except RemoteProtocolError as exc:
        conn.note(f"websocket protocol error: {exc}")
        log.warning("origin kind=%s peer=%s websocket protocol error: %s", conn.kind, conn.peer, exc)
    finally:
        record.body_length = echoed
        record.body_sha256 = digest.hexdigest()
        conn.note(f"{messages} messages echoed")


async def _tcp_echo(conn: Conn) -> None:
    record = conn.history.begin(RequestRecord(
        seq=conn.history.next_seq(), time=History.now(), kind=conn.kind, peer=conn.peer, tls=conn.tls,
        sni=conn.sni, method="TCP", target="", http_version=""))
    digest = hashlib.sha256()
    try:
        while data := await conn.stream.receive_some(RECEIVE_SIZE):
            digest.update(data)
            record.body_length += len(data)
            await conn.send(bytes(data))
    finally:
        record.body_sha256 = digest.hexdigest()
        conn.history.finish(record)

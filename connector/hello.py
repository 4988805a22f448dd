"""The hello-world origin, like cloudflared's `hello_world` service (docs/protocol.md §4.3).

Routes: `/` (an HTML page describing the request), `/uptime` (JSON `startTime`, `uptime`), `/ws`
(WebSocket echo), `/sse?freq=1s` (a counter as server-sent events, default every 10 s), `/_health`
(`ok`). HTTPS with a self-made certificate unless an `ssl_context` is given (or `tls=False`).
"""

from __future__ import annotations

import contextlib
import datetime
import html
import json
import logging
import os
import socket
import ssl
import time
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from tunnel_lab.connector.config import format_go_duration, parse_go_duration
from tunnel_lab.connector.http1 import ClientGone, ServerConnection

log = logging.getLogger(__name__)

DEFAULT_SSE_FREQ = 10.0


def self_signed_context() -> tuple[ssl.SSLContext, str]:
    """A server context with a fresh certificate for localhost, 127.0.0.1, ::1; and its CA's PEM (trustme)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx, ca.cert_pem.bytes().decode()


def _go_time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).isoformat().replace("+00:00", "Z")


def _page(request: h11.Request, body: bytes, remote: str, server_name: str) -> bytes:
    rows = [f"Method: {request.method.decode('latin-1')}", "Protocol: HTTP/1.1",
            f"Request URL: {request.target.decode('latin-1')}"]
    headers: dict[str, list[str]] = {}
    host = ""
    for name, value in request.headers:
        if name == b"host":
            host = value.decode("latin-1")
            continue
        headers.setdefault(name.decode("latin-1").title(), []).append(value.decode("latin-1"))
    rows += [f"Host: {host}", f"Remote address: {remote}", f"Request URI: {request.target.decode('latin-1')}"]
    rows += [f"Header: {k}, Value: [{' '.join(v)}]" for k, v in sorted(headers.items())]
    rows.append(f"Body: {body.decode('utf-8', 'replace')}")
    items = "\n".join(f'        <dd>{html.escape(r)}</dd>' for r in rows)
    return f"""<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>Cloudflare Tunnel Connection</title>
    <style>body{{font-family:sans-serif;margin:2rem}} dl{{background:#f7f7f7;border-left:4px solid #f38020;
      padding:1rem;font-family:monospace}} dd{{margin:0 0 .5rem 0}}</style>
  </head>
  <body>
    <h1>Congrats! You created a tunnel!</h1>
    <p>This is the hello-world origin of tunnel-lab's connector ({html.escape(server_name)}). The request
      travelled from the edge through the tunnel to this page.</p>
    <section>
      <h4>Request</h4>
      <dl>
{items}
      </dl>
    </section>
  </body>
</html>
""".encode()


async def _websocket(conn: ServerConnection, request: h11.Request) -> None:
    key = dict(request.headers).get(b"sec-websocket-key")
    upgrade = dict(request.headers).get(b"upgrade", b"").lower()
    if key is None or upgrade != b"websocket":
        await conn.respond(400, [("Content-Type", "text/plain; charset=utf-8")],
                           b"Bad Request: expected a WebSocket upgrade\n")
        return
    ws = await conn.accept_websocket(key)
    stream = conn.stream
    text_parts: list[str] = []
    byte_parts: list[bytes] = []
    while True:
        for event in ws.events():
            if isinstance(event, TextMessage):
                text_parts.append(event.data)
                if event.message_finished:
                    await stream.send_all(ws.send(TextMessage(data="".join(text_parts))))
                    text_parts.clear()
            elif isinstance(event, BytesMessage):
                byte_parts.append(bytes(event.data))
                if event.message_finished:
                    await stream.send_all(ws.send(BytesMessage(data=b"".join(byte_parts))))
                    byte_parts.clear()
            elif isinstance(event, Ping):
                await stream.send_all(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if ws.state is not ConnectionState.CLOSED:
                    await stream.send_all(ws.send(event.response()))
                return
            elif isinstance(event, Message):  # pragma: no cover - covered by the two above
                continue
        data = await stream.receive_some(65536)
        if not data:
            return
        ws.receive_data(bytes(data))


async def _sse(conn: ServerConnection, query: dict[str, list[str]]) -> None:
    freq = DEFAULT_SSE_FREQ
    if query.get("freq"):
        with contextlib.suppress(ValueError):
            freq = max(parse_go_duration(query["freq"][0]), 0.001)
    log.info("Server Sent Events every %s", format_go_duration(freq))
    await conn.start(200, [("Content-Type", "text/event-stream; charset=utf-8"),
                           ("Transfer-Encoding", "chunked")])
    counter = 0
    while True:
        await trio.sleep(freq)
        await conn.send(f"{counter}\n\n".encode())
        counter += 1


async def _handle(stream: trio.abc.Stream, remote: str, started: float, server_name: str) -> None:
    conn = ServerConnection(stream)
    try:
        while True:
            got = await conn.next_request()
            if got is None:
                return
            request, body = got
            parts = urlsplit(request.target.decode("latin-1"))
            path = parts.path
            if path == "/uptime":
                doc = {"startTime": _go_time(started),
                       "uptime": format_go_duration(round(time.time() - started, 6))}
                await conn.respond(200, [("Content-Type", "application/json")],
                                   json.dumps(doc, separators=(",", ":")).encode())
            elif path == "/ws":
                await _websocket(conn, request)
                return
            elif path == "/sse":
                await _sse(conn, parse_qs(parts.query))
                return
            elif path == "/_health":
                await conn.respond(200, [("Content-Type", "text/plain; charset=utf-8")], b"ok")
            else:
                await conn.respond(200, [("Content-Type", "text/html; charset=utf-8")],
                                   _page(request, body, remote, server_name))
    except (ClientGone, h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await conn.aclose()


async def serve_hello_world(host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                            tls: bool = True,
                            task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the hello-world origin; reports the bound `(host, port)`; never returns.

    TLS with `ssl_context`, or with a self-made certificate when it is None and `tls` is true.
    """
    if ssl_context is None and tls:
        ssl_context, _ = self_signed_context()
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    bound = (sockname[0], sockname[1])
    started = time.time()
    try:
        server_name = socket.gethostname() or "the Cloudflare Tunnel test server"
    except OSError:
        server_name = "the Cloudflare Tunnel test server"
    scheme = "https" if ssl_context is not None else "http"
    log.info("Starting Hello World server at %s://%s:%d pid=%d", scheme, bound[0], bound[1], os.getpid())

    async def handler(tcp: trio.SocketStream) -> None:
        remote_addr = tcp.socket.getpeername()
        remote = f"{remote_addr[0]}:{remote_addr[1]}"
        stream: trio.abc.Stream = tcp
        try:
            if ssl_context is not None:
                tls_stream = trio.SSLStream(tcp, ssl_context, server_side=True)
                with trio.fail_after(10):
                    await tls_stream.do_handshake()
                stream = tls_stream
            await _handle(stream, remote, started, server_name)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass
        except Exception:  # one bad client never stops the server
            log.debug("hello-world client failed remote=%s", remote, exc_info=True)
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await tcp.aclose()

    task_status.started(bound)
    await trio.serve_listeners(handler, listeners)

"""`tunnel-lab access tcp`: cloudflared's `access tcp` (also `access ssh`) against the lab's edge.

Each TCP connection accepted on `--url LISTEN_ADDR` (or stdin/stdout when `--url` is omitted, for
`ssh -o ProxyCommand="tunnel-lab access tcp --hostname %h"`) opens a WebSocket to the edge's eyeball
listener with `Host: HOSTNAME`; binary WebSocket messages carry the raw bytes both ways. The edge routes
the hostname to a tunnel whose ingress rule is `tcp://`, `ssh://` or `rdp://`, and the connector pipes
the bytes to that service.

    tunnel-lab access tcp --hostname db.example.test --url 127.0.0.1:5432 --edge-eyeball 127.0.0.1:8080

`--edge-eyeball` (env `TUNNEL_LAB_EYEBALL`) names the edge's HTTP listener (`http://` implied; an
`https://HOST:PORT` value uses TLS verified against `--cacert`); without it the hostname itself is
dialled on port 80, as a real client would.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import ssl
import sys
from collections.abc import Sequence

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from tunnel_lab.connector.logging_setup import setup_logging
from tunnel_lab.connector.websocket import MESSAGE_SIZE
from tunnel_lab.transport.pipe import PipeDone, Way, pipe
from tunnel_lab.wire.errors import ConfigError, OriginError, TunnelLabError

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 15.0
LINGER = 1.0


class EdgeTarget:
    """Where and how to reach the edge's eyeball side for one hostname."""

    def __init__(self, hostname: str, eyeball: str | None, *, cacert: str | None = None,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        self.hostname = hostname
        self.headers = tuple(headers)
        self.tls = False
        text = eyeball or f"{hostname}:80"
        if text.startswith("https://"):
            self.tls = True
            text = text[len("https://"):]
        elif text.startswith("http://"):
            text = text[len("http://"):]
        text = text.rstrip("/")
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"edge eyeball address {eyeball!r} is not HOST:PORT", source="--edge-eyeball",
                              hint="e.g. --edge-eyeball 127.0.0.1:8080 (the edge's --http-listen address)")
        self.host = host.strip("[]")
        self.port = int(port)
        self.ssl_context: ssl.SSLContext | None = None
        if self.tls:
            try:
                self.ssl_context = ssl.create_default_context(cafile=cacert)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load CA file: {exc}", source=cacert or "--cacert") from None

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


async def connect_websocket(target: EdgeTarget) -> tuple[trio.abc.Stream, WSConnection]:
    """Dial the edge and complete the WebSocket handshake for `target.hostname`.

    Raises `OriginError` naming the edge and the reason (refused, rejected with a status, timeout).
    """
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            tcp = await trio.open_tcp_stream(target.host, target.port)
    except (OSError, trio.TooSlowError) as exc:
        raise OriginError(f"cannot connect to the edge at {target}: {exc or 'timeout'}") from None
    stream: trio.abc.Stream = tcp
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            if target.ssl_context is not None:
                tls = trio.SSLStream(tcp, target.ssl_context, server_hostname=target.hostname)
                await tls.do_handshake()
                stream = tls
            ws = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(ws.send(Request(host=target.hostname, target="/",
                                                  extra_headers=[(k.encode(), v.encode())
                                                                 for k, v in target.headers])))
            status: int | None = None
            body = b""
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    raise OriginError(f"the edge at {target} closed the connection during the WebSocket "
                                      f"handshake for {target.hostname}")
                ws.receive_data(bytes(data))
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        return stream, ws
                    if isinstance(event, RejectConnection):
                        status = event.status_code
                        if not event.has_body:
                            raise _rejected(target, status, body)
                    elif isinstance(event, RejectData):
                        body += event.data
                        if event.body_finished:
                            raise _rejected(target, status, body)
    except trio.TooSlowError:
        await stream.aclose()
        raise OriginError(f"WebSocket handshake with the edge at {target} timed out") from None
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        await stream.aclose()
        raise OriginError(f"WebSocket handshake with the edge at {target} failed: {exc}") from None
    except BaseException:
        await stream.aclose()
        raise


def _rejected(target: EdgeTarget, status: int | None, body: bytes) -> OriginError:
    text = body[:200].decode("utf-8", "replace").strip()
    return OriginError(f"the edge at {target} refused the WebSocket for {target.hostname}: HTTP {status}"
                       + (f" ({text})" if text else ""))


async def pipe_websocket(stream: trio.abc.Stream, ws: WSConnection, local_receive: trio.abc.ReceiveStream,
                         local_send: trio.abc.SendStream) -> None:
    """Copy raw bytes local -> binary messages and messages -> raw bytes, until either side ends."""
    send_lock = trio.Lock()
    # WebSocket has no half-close: after local EOF, keep relaying the edge's bytes until it has been
    # quiet for LINGER seconds, then close (so `printf x | access tcp` still prints the answer).
    activity = [trio.Event()]

    async def ws_send(data: bytes) -> None:
        async with send_lock:
            await stream.send_all(data)

    async def read_local() -> bytes:
        return bytes(await local_receive.receive_some(MESSAGE_SIZE))  # as the real client sends

    async def linger_then_close() -> None:
        while True:
            with trio.move_on_after(LINGER) as quiet:
                await activity[0].wait()
            if quiet.cancelled_caught:
                break
            activity[0] = trio.Event()
        await ws_send(ws.send(CloseConnection(code=1000)))

    async def read_edge() -> bytes:
        """The payload of the next messages from the edge (pings answered; a close ends the pipe)."""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return b""
            ws.receive_data(bytes(data))
            activity[0].set()
            payload = bytearray()
            for event in ws.events():
                if isinstance(event, BytesMessage | TextMessage):
                    raw = event.data
                    payload += raw.encode() if isinstance(raw, str) else raw
                elif isinstance(event, Ping):
                    await ws_send(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if payload:
                        await local_send.send_all(bytes(payload))
                    with contextlib.suppress(Exception):  # the peer may already be gone
                        await ws_send(ws.send(event.response()))
                    raise PipeDone
            if payload:
                return bytes(payload)

    broken = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
    await pipe(Way(read_local, lambda data: ws_send(ws.send(BytesMessage(data=data))),
                   at_eof=linger_then_close, quiet=broken, ends_pipe=False),
               Way(read_edge, local_send.send_all, quiet=broken))


async def _handle_local(local: trio.SocketStream, target: EdgeTarget) -> None:
    peer = local.socket.getpeername()
    who = f"{peer[0]}:{peer[1]}"
    try:
        stream, ws = await connect_websocket(target)
    except OriginError as exc:
        log.error("failed to connect to origin error=%r hostname=%s client=%s", str(exc), target.hostname,
                  who)
        await local.aclose()
        return
    log.debug("connected to edge hostname=%s client=%s edge=%s", target.hostname, who, target)
    try:
        await pipe_websocket(stream, ws, local, local)
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await stream.aclose()
            await local.aclose()
    log.debug("connection closed hostname=%s client=%s", target.hostname, who)


async def serve_access_tcp(listen: str, target: EdgeTarget, *,
                           task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `listen` (HOST:PORT) and carry each connection over a WebSocket to the edge."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"listen address {listen!r} is not HOST:PORT", source="--url",
                          hint="e.g. --url 127.0.0.1:2222 (or localhost:2222)")
    host = host.strip("[]") or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    try:
        listeners = await trio.open_tcp_listeners(int(port), host=host)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}", source="--url") from None
    sockname = listeners[0].socket.getsockname()
    log.info("Start Websocket listener host=%s:%d hostname=%s edge=%s", sockname[0], sockname[1],
             target.hostname, target)

    async def handler(local: trio.SocketStream) -> None:
        try:
            await _handle_local(local, target)
        except Exception:  # one connection's failure never stops the listener
            log.exception("access connection failed hostname=%s", target.hostname)

    task_status.started((sockname[0], sockname[1]))
    await trio.serve_listeners(handler, listeners)


async def run_stdio(target: EdgeTarget) -> int:
    """ProxyCommand mode: stdin/stdout <-> one WebSocket."""
    stream, ws = await connect_websocket(target)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    async with stdin, stdout:
        try:
            await pipe_websocket(stream, ws, stdin, stdout)
        finally:
            await stream.aclose()
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunnel-lab access tcp",
        description="cloudflared's `access tcp`: a local listener (or stdin/stdout) whose connections travel "
                    "as WebSockets through the edge to a tcp:// / ssh:// ingress rule.")
    p.add_argument("--hostname", "--tunnel-host", "-T", dest="hostname",
                   default=os.environ.get("TUNNEL_SERVICE_HOSTNAME"),
                   help="the routed hostname of the tcp:// service [$TUNNEL_SERVICE_HOSTNAME]")
    p.add_argument("--url", "--listener", "-L", dest="url", default=os.environ.get("TUNNEL_SERVICE_URL"),
                   help="local HOST:PORT to listen on; omit to use stdin/stdout [$TUNNEL_SERVICE_URL]")
    p.add_argument("--edge-eyeball", default=os.environ.get("TUNNEL_LAB_EYEBALL"),
                   help="the lab edge's eyeball listener HOST:PORT (https://HOST:PORT for TLS) "
                        "[$TUNNEL_LAB_EYEBALL]; default: HOSTNAME:80")
    p.add_argument("--cacert", default=os.environ.get("TUNNEL_CACERT"),
                   help="CA file to verify an https:// edge eyeball listener [$TUNNEL_CACERT]")
    p.add_argument("--header", "-H", action="append", default=[], metavar="NAME:VALUE",
                   help="extra request header for the WebSocket handshake (repeatable)")
    # cloudflared's Access options: accepted, with a warning (the lab edge has no Cloudflare Access).
    p.add_argument("--service-token-id", "--id", default=os.environ.get("TUNNEL_SERVICE_TOKEN_ID"),
                   help=argparse.SUPPRESS)
    p.add_argument("--service-token-secret", "--secret",
                   default=os.environ.get("TUNNEL_SERVICE_TOKEN_SECRET"), help=argparse.SUPPRESS)
    p.add_argument("--destination", default=os.environ.get("TUNNEL_SERVICE_DESTINATION"),
                   help=argparse.SUPPRESS)
    p.add_argument("--loglevel", "--log-level", default=os.environ.get("TUNNEL_LOGLEVEL", "info"))
    p.add_argument("--logfile", default=os.environ.get("TUNNEL_LOGFILE"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`tunnel-lab access tcp|ssh ...`; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print("usage: tunnel-lab access tcp --hostname HOST [--url LISTEN_ADDR] [--edge-eyeball ADDR]\n\n"
              "Subcommands: tcp (alias: ssh, rdp, smb). Run `tunnel-lab access tcp --help` for options.")
        return 0 if args else 2
    if args[0] not in ("tcp", "ssh", "rdp", "smb"):
        print(f"tunnel-lab: access: unknown subcommand {args[0]!r} (use `access tcp`)", file=sys.stderr)
        return 2
    ns = _parser().parse_args(args[1:])
    for note in setup_logging(ns.loglevel, logfile=ns.logfile):
        log.error("%s", note)
    for option in ("service_token_id", "service_token_secret", "destination"):
        if getattr(ns, option):
            log.warning("--%s is accepted for compatibility with cloudflared but has no effect: the lab edge "
                        "has no Cloudflare Access", option.replace("_", "-"))
    try:
        if not ns.hostname:
            raise ConfigError("--hostname is required", source="--hostname",
                              hint="the hostname routed to the tunnel's tcp:// rule")
        headers = []
        for item in ns.header:
            name, sep, value = item.partition(":")
            if not sep:
                raise ConfigError(f"header {item!r} is not NAME:VALUE", source="--header")
            headers.append((name.strip(), value.strip()))
        target = EdgeTarget(ns.hostname, ns.edge_eyeball, cacert=ns.cacert, headers=headers)
        if ns.url:
            url = ns.url
            for prefix in ("tcp://", "http://"):
                if url.startswith(prefix):
                    url = url[len(prefix):]
            trio.run(serve_access_tcp, url, target)
            return 0
        return trio.run(run_stdio, target)
    except TunnelLabError as exc:
        print(f"tunnel-lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

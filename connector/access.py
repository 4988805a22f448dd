"""`tunnel-lab access`: cloudflared's `access` commands against the lab's edge (docs/access.md).

`tcp` (also `ssh`, `rdp`, `smb`): each TCP connection accepted on `--url LISTEN_ADDR` (or stdin/stdout
when `--url` is omitted, for `ssh -o ProxyCommand="tunnel-lab access ssh --hostname %h"`) opens a
WebSocket to `wss://HOSTNAME/` (or to `--edge-eyeball`); binary WebSocket messages carry the raw bytes
both ways. The edge routes the hostname to a tunnel whose ingress rule is `tcp://`, `ssh://` or `rdp://`,
and the connector pipes the bytes to that service. On a hostname protected by Access, service tokens go
in `Cf-Access-Client-Id/Secret`; a login redirect is answered as cloudflared does (app discovery, a token
from `~/.cloudflared` or the browser flow: `connector/access_client.py`) and the dial repeated with
`Cf-Access-Token`.

`login`, `token`, `curl`: the token commands (`_token_command`, `connector/access_client.py`).

    tunnel-lab access tcp --hostname db.example.test --url 127.0.0.1:5432 --edge-eyeball 127.0.0.1:8080

`--edge-eyeball` (env `TUNNEL_LAB_EYEBALL`) names the edge's eyeball listener (`http://` implied; an
`https://HOST:PORT` value uses TLS verified against `--cacert`); without it the hostname itself is
dialled over TLS on port 443, as cloudflared does.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import ssl
import sys
import urllib.parse
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
        text = eyeball or f"https://{hostname}:443"  # as cloudflared: wss://HOSTNAME/
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

        self.eyeball = eyeball
        self.cacert = cacert

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def with_header(self, name: str, value: str) -> EdgeTarget:
        """The same target with one more (or a replaced) handshake header."""
        headers = [(k, v) for k, v in self.headers if k.lower() != name.lower()] + [(name, value)]
        return EdgeTarget(self.hostname, self.eyeball, cacert=self.cacert, headers=headers)


class Rejected(OriginError):
    """The edge answered the WebSocket handshake with a status (`login`: a 302 to Access's login page)."""

    def __init__(self, message: str, status: int | None, location: str) -> None:
        super().__init__(message)
        self.status = status
        self.location = location

    @property
    def login(self) -> bool:
        return self.status == 302 and urllib.parse.urlsplit(self.location).path.startswith(
            "/cdn-cgi/access/login")


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
            location = ""
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
                        location = next((bytes(v).decode("latin-1") for k, v in event.headers
                                         if bytes(k).lower() == b"location"), "")
                        if not event.has_body:
                            raise _rejected(target, status, body, location)
                    elif isinstance(event, RejectData):
                        body += event.data
                        if event.body_finished:
                            raise _rejected(target, status, body, location)
    except trio.TooSlowError:
        await stream.aclose()
        raise OriginError(f"WebSocket handshake with the edge at {target} timed out") from None
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        await stream.aclose()
        raise OriginError(f"WebSocket handshake with the edge at {target} failed: {exc}") from None
    except BaseException:
        await stream.aclose()
        raise


def _rejected(target: EdgeTarget, status: int | None, body: bytes, location: str) -> Rejected:
    text = body[:200].decode("utf-8", "replace").strip()
    return Rejected(f"the edge at {target} refused the WebSocket for {target.hostname}: HTTP {status}"
                    + (f" ({text})" if text else ""), status, location)


async def connect_with_access(target: EdgeTarget) -> tuple[trio.abc.Stream, WSConnection]:
    """`connect_websocket`, and on Access's login redirect what cloudflared does: find the application,
    get a token (cached, exchanged from the org token, or by the browser flow; `access_client`), and
    dial again with `Cf-Access-Token`; a token the edge still refuses is dropped and fetched once more."""
    try:
        return await connect_websocket(target)
    except Rejected as exc:
        if not exc.login:
            raise
    from tunnel_lab.connector import access_client

    url = f"https://{target.hostname}"
    client = access_client.Http(eyeball=target.eyeball, cacert=target.cacert)
    info = await trio.to_thread.run_sync(access_client.get_app_info, client, url)
    for attempt in range(2):
        token = await trio.to_thread.run_sync(access_client.fetch_token, client, url, info)
        try:
            return await connect_websocket(target.with_header("Cf-Access-Token", token))
        except Rejected as exc:
            if not exc.login or attempt:
                raise
            access_client.remove_app_token(info)
    raise AssertionError("unreachable")


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
        stream, ws = await connect_with_access(target)
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
    stream, ws = await connect_with_access(target)
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
    _edge_options(p)
    p.add_argument("--header", "-H", action="append", default=[], metavar="NAME:VALUE",
                   help="extra request header for the WebSocket handshake (repeatable)")
    p.add_argument("--service-token-id", "--id", default=os.environ.get("TUNNEL_SERVICE_TOKEN_ID"),
                   help="an Access service token's client id [$TUNNEL_SERVICE_TOKEN_ID]")
    p.add_argument("--service-token-secret", "--secret",
                   default=os.environ.get("TUNNEL_SERVICE_TOKEN_SECRET"),
                   help="its client secret [$TUNNEL_SERVICE_TOKEN_SECRET]")
    p.add_argument("--destination", default=os.environ.get("TUNNEL_SERVICE_DESTINATION"),
                   help="the final destination for a bastion rule (sent as Cf-Access-Jump-Destination) "
                        "[$TUNNEL_SERVICE_DESTINATION]")
    p.add_argument("--loglevel", "--log-level", default=os.environ.get("TUNNEL_LOGLEVEL", "info"))
    p.add_argument("--logfile", default=os.environ.get("TUNNEL_LOGFILE"))
    return p


def _edge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edge-eyeball", default=os.environ.get("TUNNEL_LAB_EYEBALL"),
                   help="dial the lab edge's eyeball listener HOST:PORT (https://HOST:PORT for TLS) for "
                        "every name [$TUNNEL_LAB_EYEBALL]; default: the names themselves, over TLS on port "
                        "443 (inside `tunnel-lab sandbox`)")
    p.add_argument("--cacert", default=os.environ.get("TUNNEL_CACERT"),
                   help="CA file to verify the edge with [$TUNNEL_CACERT]")


USAGE = """usage: tunnel-lab connector access SUBCOMMAND ...

Subcommands (as cloudflared's `access`):
  login URL        sign in to the Access application at URL (prints a link to open); prints the token
  token URL        print the stored token for URL (run login first)
  curl URL ARGS    run curl with the stored (or a new) token in Cf-Access-Token
  tcp|ssh|rdp|smb  a local listener (--url) or stdin/stdout whose bytes travel as WebSocket messages

Run `tunnel-lab connector access SUBCOMMAND --help` for options. docs/access.md."""


def _single_dash_long(args: list[str], names: Sequence[str]) -> list[str]:
    """cloudflared's flag parser takes `-app=URL` as well as `--app=URL`."""
    out = []
    for arg in args:
        flag = arg.split("=", 1)[0]
        out.append("-" + arg if flag.startswith("-") and not flag.startswith("--") and flag[1:] in names
                   else arg)
    return out


def _token_command(cmd: str, args: list[str]) -> int:
    """`access login|token|curl`."""
    from tunnel_lab.connector import access_client

    if cmd == "curl":
        return _curl(args)
    p = argparse.ArgumentParser(prog=f"tunnel-lab connector access {cmd}")
    p.add_argument("url", nargs="?", help="the URL of the Access application")
    p.add_argument("--app", help="the URL of the Access application (instead of the argument)")
    if cmd == "login":
        p.add_argument("--quiet", "-q", action="store_true", help="do not print the token")
        p.add_argument("--no-verbose", action="store_true", help="print only the token to stdout")
        p.add_argument("--auto-close", action="store_true", help=argparse.SUPPRESS)
    _edge_options(p)
    ns = p.parse_args(_single_dash_long(args, ("app", "quiet", "no-verbose", "auto-close", "cacert",
                                               "edge-eyeball")))
    try:
        url = access_client.app_url(ns.url or ns.app or "")
    except access_client.AccessClientError:
        why = ("Please provide the url of the Access application" if cmd == "login"
               else "Please provide a url")
        why += "."
        print(why, file=sys.stderr)
        return 1
    client = access_client.Http(eyeball=ns.edge_eyeball, cacert=ns.cacert)
    info = access_client.get_app_info(client, url)
    if cmd == "token":
        token = access_client.cached_app_token(info)
        if not token:
            print("Unable to find token for provided application. Please run login command to generate "
                  "token.", file=sys.stderr)
            return 1
        sys.stdout.write(token)
        return 0
    access_client.verify_token_at_edge(client, url, info, [])
    token = access_client.cached_app_token(info)
    if not token:
        print("Unable to find token for provided application.", file=sys.stderr)
        return 1
    if not ns.quiet:
        if ns.no_verbose or ns.app:
            sys.stdout.write(token)
        else:
            sys.stdout.write(f"Successfully fetched your token:\n\n{token}\n\n")
    return 0


def _curl(args: list[str]) -> int:
    """`access curl [--allow-request|-ar] URL [curl args...]` (no flag parsing, as cloudflared)."""
    import subprocess

    from tunnel_lab.connector import access_client

    allow = len(args) > 1 and args[0] in ("--allow-request", "-ar")
    if allow:
        args = args[1:]
    if not args:
        print("Please provide the access app and command you wish to run.", file=sys.stderr)
        return 1
    parts = urllib.parse.urlsplit(args[0])
    if not parts.scheme or not parts.hostname:
        print("Please provide a valid URL as the first argument to curl.", file=sys.stderr)
        return 1
    client = access_client.Http(eyeball=os.environ.get("TUNNEL_LAB_EYEBALL"),
                                cacert=os.environ.get("TUNNEL_CACERT"))
    info = access_client.get_app_info(client, args[0])
    access_client.verify_token_at_edge(client, args[0], info, [])
    token = access_client.cached_app_token(info)
    if not token:
        if allow:
            log.info("You don't have an Access token set. Please run access token <access application> to "
                     "fetch one.")
            return subprocess.run(["curl", *args], check=False).returncode
        token = access_client.fetch_token(client, args[0], info, host_only=True)
    return subprocess.run(["curl", *args, "-H", f"Cf-Access-Token: {token}"], check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    """`tunnel-lab connector access SUBCOMMAND ...`; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    while args[:1] == ["--fedramp"]:  # FedRAMP accounts: the lab has one kind of account
        args = args[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] not in ("tcp", "ssh", "rdp", "smb", "login", "token", "curl"):
        print(f"tunnel-lab: access: unknown subcommand {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if args[0] in ("login", "token", "curl"):
        from tunnel_lab.connector.access_client import AccessClientError

        for note in setup_logging(os.environ.get("TUNNEL_LOGLEVEL", "info")):
            log.error("%s", note)
        try:
            return _token_command(args[0], args[1:])
        except AccessClientError as exc:
            print(f"tunnel-lab: access {args[0]}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    ns = _parser().parse_args(args[1:])
    # In ProxyCommand mode stdout is ssh's: logs go to stderr or the log file only.
    for note in setup_logging(ns.loglevel, logfile=ns.logfile):
        log.error("%s", note)
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
        if ns.service_token_id:
            headers.append(("Cf-Access-Client-Id", ns.service_token_id))
        if ns.service_token_secret:
            headers.append(("Cf-Access-Client-Secret", ns.service_token_secret))
        if ns.destination:
            headers.append(("Cf-Access-Jump-Destination", ns.destination))
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

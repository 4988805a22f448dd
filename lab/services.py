"""The HTTPS shell for the Cloudflare services the sandbox answers: the v4 API (`api.cloudflare.com`),
quick tunnels (`api.trycloudflare.com`), the login approve page (`dash.cloudflare.com`) and the login
transfer (`login.cloudflareaccess.org`).

One TLS listener under the lab CA; the certificate is chosen by SNI among `SERVICE_NAMES` (one lab
leaf per name), HTTP/1.1 by h11 (cloudflared's Go client offers h2 and http/1.1 and takes what the
server picks). Each connection is handled in its own task, which contains its own errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import h11
import trio

from tunnel_lab.lab.dns import SERVICE_NAMES
from tunnel_lab.lab.loginflow import APPROVE_PATH, LOGIN_PATH, LoginTransfers, Page
from tunnel_lab.lab.pki import LabPKI
from tunnel_lab.lab.quicktunnel import create_quick_tunnel
from tunnel_lab.lab.v4api import LiveConnection, V4Api, parse_live
from tunnel_lab.lab.v4base import PREFIX, ApiRequest, ApiResponse, V4ApiError
from tunnel_lab.wire.errors import TunnelLabError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
IDLE_TIMEOUT = 60.0
HANDSHAKE_TIMEOUT = 10.0

LiveSource = Callable[[], Awaitable[Sequence[LiveConnection]]]
Disconnect = Callable[[str], Awaitable[None]]  # drop one edge connection by its edge id
AccessTransfer = Callable[[str], Awaitable[Page]]  # `cloudflared access login`'s poll, answered by the edge
# Have the edge push a remote configuration (`{"tunnel_id", "version", "config"}`) to the running connectors.
PushConfig = Callable[[dict[str, Any]], Awaitable[None]]
# One call to the edge's management API: (method, path, JSON body or None) -> the parsed answer; raises a
# TunnelLabError on a transport failure or an error status (`lab.api.management_call` with its address
# and token bound; the runner's `Lab.api`).
EdgeCall = Callable[[str, str, Any], Awaitable[Any]]


def services_ssl_context(pki: LabPKI) -> ssl.SSLContext:
    """A server context whose certificate follows the SNI name (any service name; API by default)."""
    contexts = {name: pki.server_ssl_context(name) for name in SERVICE_NAMES}
    for ctx in contexts.values():
        ctx.set_alpn_protocols(["http/1.1"])
    base = contexts["api.cloudflare.com"]

    def choose(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        chosen = contexts.get((server_name or "").lower())
        if chosen is not None:
            sslobj.context = chosen

    base.sni_callback = choose
    return base


@dataclass(frozen=True)
class Services:
    """What the listener serves: the API (with the edge's live connections) and the login flow."""

    api: V4Api
    live: LiveSource
    logins: LoginTransfers
    disconnect: Disconnect
    access_transfer: AccessTransfer | None = None
    push: PushConfig | None = None

    @classmethod
    def on_edge(cls, api: V4Api, logins: LoginTransfers, edge: EdgeCall, *,
                access_transfer: AccessTransfer | None = None) -> Services:
        """Services whose live connections, dropped connections and configuration pushes are the edge's,
        through its management API (`edge`): what the sandbox and a scenario's public side both serve."""

        async def live() -> list[LiveConnection]:
            return parse_live(json.dumps(await edge("GET", "/connections", None)).encode())

        async def disconnect(edge_id: str) -> None:
            await edge("POST", "/faults", {"kind": "drop-connection", "connection": edge_id})

        async def push(update: dict[str, Any]) -> None:
            await edge("POST", f"/tunnels/{update['tunnel_id']}/configuration",
                       {"version": update["version"], "config": update["config"]})

        return cls(api, live, logins, disconnect, access_transfer=access_transfer, push=push)

    async def respond(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Page:
        """Route one request by Host (as the real names are separate sites) and path."""
        host = headers.get("host", "").rsplit(":", 1)[0].lower()
        path, _, query = target.partition("?")
        if host == "login.cloudflareaccess.org" and method == "GET":
            if path.startswith("/transfer/") and self.access_transfer is not None:
                return await self.access_transfer(path)
            return await self.logins.poll(path)
        if host == "api.trycloudflare.com":
            if method == "POST" and path == "/tunnel":
                try:
                    return _json(create_quick_tunnel(self.api.store))
                except V4ApiError as exc:
                    return _json(ApiResponse(status=exc.status, body=exc.envelope()))
            return _json(ApiResponse(status=404, body=V4ApiError(
                404, 7003, f"no route {method} {path} on api.trycloudflare.com").envelope()))  # lab
        if host == "dash.cloudflare.com":
            if method == "GET" and path == LOGIN_PATH:
                return self.logins.login_page(query)
            if method == "POST" and path == APPROVE_PATH:
                return self.logins.approve(body)
            return Page(status=404, content_type="text/plain", body=b"the lab dashboard has no such page\n")
        connections: Sequence[LiveConnection] = ()
        if "/cfd_tunnel" in path and path.startswith(PREFIX + "/"):
            try:
                connections = await self.live()
            except TunnelLabError as exc:  # without the edge's answer, a listing would lie
                return _json(ApiResponse(status=503, body=V4ApiError(
                    503, 1000, f"the lab edge did not list its connections: {exc}").envelope()))  # lab
        response = self.api.handle(ApiRequest(method=method, target=target, headers=headers, body=body),
                                   connections)
        for edge_id in response.disconnect:
            try:
                await self.disconnect(edge_id)
            except TunnelLabError as exc:
                return _json(ApiResponse(status=503, body=V4ApiError(
                    503, 1000, f"the lab edge did not drop connection {edge_id}: {exc}").envelope()))  # lab
        if response.push is not None and self.push is not None:
            try:
                await self.push(response.push)
            except TunnelLabError as exc:
                # The version is stored: connectors that register later get it from the edge at once.
                log.warning("services: the edge did not push configuration version %s of tunnel %s: %s",
                            response.push.get("version"), response.push.get("tunnel_id"), exc)
        return _json(response)


def _json(response: ApiResponse) -> Page:
    return Page(status=response.status, content_type="application/json", body=response.encode())


async def _answer(stream: trio.abc.Stream, conn: h11.Connection, page: Page) -> None:
    headers = [("Content-Type", page.content_type), ("Content-Length", str(len(page.body))), *page.headers]
    if conn.our_state in (h11.SEND_RESPONSE, h11.IDLE):  # IDLE: a 400 for an unreadable request
        await stream.send_all(conn.send(h11.Response(status_code=page.status, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.Data(data=page.body)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def handle_services_connection(stream: trio.abc.Stream, services: Services) -> None:
    """Serve HTTP/1.1 requests on one (TLS) connection until the client closes or idles out; a request
    that is not HTTP/1.1 gets a 400 and the connection closes."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    try:
        await _serve_requests(stream, conn, services)
    except h11.RemoteProtocolError as exc:
        log.info("services: bad request: %s", exc)
        text = f"bad request: {exc}\n".encode()
        with contextlib.suppress(h11.LocalProtocolError):
            await _answer(stream, conn,
                          Page(status=exc.error_status_hint, content_type="text/plain", body=text))


async def _serve_requests(stream: trio.abc.Stream, conn: h11.Connection, services: Services) -> None:
    while True:
        request: h11.Request | None = None
        body = bytearray()
        too_big = False
        with trio.move_on_after(IDLE_TIMEOUT) as idle:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(bytes(data))
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    if len(body) + len(event.data) > MAX_BODY:
                        too_big = True
                    else:
                        body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        if idle.cancelled_caught or request is None:
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers}
        target = request.target.decode("latin-1")
        method = request.method.decode("ascii", "replace")
        if too_big:
            page = _json(ApiResponse(status=413, body=V4ApiError(
                413, 1004, f"request body over {MAX_BODY} bytes").envelope()))
        else:
            page = await services.respond(method, target, headers, bytes(body))
        log.info("services: %s %s host=%s -> %d", method, target.split("?")[0], headers.get("host"),
                 page.status)
        await _answer(stream, conn, page)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def serve_services(services: Services, address: tuple[str, int], ctx: ssl.SSLContext, *,
                         task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept TLS connections on `address` until cancelled; reports the bound address."""
    listeners = await trio.open_tcp_listeners(address[1], host=address[0])

    async def handle(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, ctx, server_side=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
            await handle_services_connection(stream, services)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.ProtocolError,
                ssl.SSLError, OSError) as exc:
            log.debug("services: connection ended: %r", exc)
        finally:
            with trio.move_on_after(1):
                await trio.aclose_forcefully(stream)

    sockname = listeners[0].socket.getsockname()
    task_status.started((sockname[0], sockname[1]))
    await trio.serve_listeners(handle, listeners)

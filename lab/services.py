"""The HTTPS shell for the Cloudflare services the sandbox answers: the v4 API (`api.cloudflare.com`).

One TLS listener under the lab CA; the certificate is chosen by SNI among `SERVICE_NAMES` (one lab
leaf per name), HTTP/1.1 by h11 (cloudflared's Go client offers h2 and http/1.1 and takes what the
server picks). Each connection is handled in its own task, which contains its own errors.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence

import h11
import trio

from lab.dns import SERVICE_NAMES
from lab.pki import LabPKI
from lab.v4api import PREFIX, ApiRequest, ApiResponse, LiveConnection, V4Api, V4ApiError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
IDLE_TIMEOUT = 60.0
HANDSHAKE_TIMEOUT = 10.0

LiveSource = Callable[[], Awaitable[Sequence[LiveConnection]]]


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


async def _answer(stream: trio.abc.Stream, conn: h11.Connection, response: ApiResponse) -> None:
    payload = response.encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    if conn.our_state is h11.SEND_RESPONSE:
        await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def handle_services_connection(stream: trio.abc.Stream, api: V4Api, live: LiveSource) -> None:
    """Serve HTTP/1.1 requests on one (TLS) connection until the client closes or idles out."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
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
            response = ApiResponse(status=413, body=V4ApiError(413, 1004, f"request body over {MAX_BODY} "
                                                                          "bytes").envelope())
        elif target.startswith(PREFIX + "/") or target == PREFIX:
            connections = await live() if "/cfd_tunnel" in target else ()
            response = api.handle(ApiRequest(method=method, target=target, headers=headers, body=bytes(body)),
                                  connections)
        else:
            response = api.handle(ApiRequest(method=method, target=target, headers=headers))
        log.info("services: %s %s host=%s -> %d", method, target.split("?")[0], headers.get("host"),
                 response.status)
        await _answer(stream, conn, response)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def serve_services(api: V4Api, live: LiveSource, address: tuple[str, int], ctx: ssl.SSLContext, *,
                         task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept TLS connections on `address` until cancelled; reports the bound address."""
    listeners = await trio.open_tcp_listeners(address[1], host=address[0])

    async def handle(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, ctx, server_side=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
            await handle_services_connection(stream, api, live)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.ProtocolError,
                ssl.SSLError, OSError) as exc:
            log.debug("services: connection ended: %r", exc)
        finally:
            with trio.move_on_after(1):
                await trio.aclose_forcefully(stream)

    sockname = listeners[0].socket.getsockname()
    task_status.started((sockname[0], sockname[1]))
    await trio.serve_listeners(handle, listeners)

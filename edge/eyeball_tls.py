"""The HTTPS eyeball listener: a lab-CA certificate per SNI hostname (issued on demand for any valid
name, routed or not; no SNI gets the `localhost` certificate, an invalid name is refused); h2 or
HTTP/1.1 by ALPN."""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Any

import trio

from lab.store import normalize_hostname
from wire.errors import ConfigError

if TYPE_CHECKING:
    from edge.server import Edge

log = logging.getLogger(__name__)

ALPN = ["h2", "http/1.1"]


def _context(edge: Edge, name: str) -> ssl.SSLContext:
    ctx = edge.host_contexts.get(name)
    if ctx is None:
        ctx = edge.pki.server_ssl_context(name)
        ctx.set_alpn_protocols(ALPN)
        if len(edge.host_contexts) >= 4096:  # many names: contexts are rebuilt from the leaf files
            edge.host_contexts.clear()
        edge.host_contexts[name] = ctx
    return ctx


def eyeball_ssl_context(edge: Edge) -> ssl.SSLContext:
    """The listener's context: `localhost` by default, switched by SNI to the requested host's leaf."""
    base = _context(edge, "localhost")

    def choose(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if not server_name:
            return None
        try:
            name = normalize_hostname(server_name)
        except ConfigError as exc:
            log.info("TLS refused for an invalid SNI name: %s", exc)
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        try:
            # Any valid name gets a lab-CA leaf (issued once, then cached), so an unrouted host
            # reaches the edge's 404 page over verified TLS instead of failing the handshake.
            sslobj.context = _context(edge, name)
        except Exception as exc:
            log.info("no certificate for SNI %r: %s", server_name, exc)
        return None

    base.sni_callback = choose
    return base


async def serve_tls_connection(edge: Edge, tcp: trio.SocketStream, peer: tuple[str, int]) -> None:
    """TLS handshake, then HTTP/2 or HTTP/1.1 by ALPN."""
    from edge.eyeball_h1 import serve_h1_connection
    from edge.eyeball_h2 import serve_h2_connection

    ctx = edge.eyeball_ctx
    if ctx is None:
        ctx = edge.eyeball_ctx = eyeball_ssl_context(edge)
    tls = trio.SSLStream(tcp, ctx, server_side=True)
    client = f"{peer[0]}:{peer[1]}"
    try:
        with trio.fail_after(edge.config.handshake_timeout):
            await tls.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError, trio.ClosedResourceError) as exc:
        log.info("eyeball TLS handshake failed: %s client=%s", exc.__cause__ or exc, client)
        with trio.CancelScope(shield=True):
            await tcp.aclose()
        return
    proto: Any = tls.selected_alpn_protocol()
    if proto == "h2":
        await serve_h2_connection(edge, tls, client=client, client_ip=peer[0])
    else:
        await serve_h1_connection(edge, tls, scheme="https", client=client, client_ip=peer[0])

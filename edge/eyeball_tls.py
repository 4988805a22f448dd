"""The HTTPS eyeball listener: a lab-CA certificate per SNI hostname (issued on demand for any valid
name, routed or not, up to `max_on_demand_certs` unrouted names; no SNI gets the `localhost` certificate,
an invalid name is refused with `unrecognized_name`); h2 or HTTP/1.1 by ALPN."""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Any

import trio

from tunnel_lab.edge.eyeball_h1 import handle_h1_connection
from tunnel_lab.edge.eyeball_h2 import handle_h2_connection
from tunnel_lab.edge.state import EdgeState, TunnelsView
from tunnel_lab.edge.tunnel import TunnelConnection
from tunnel_lab.lab.store import normalize_hostname
from tunnel_lab.transport.tls import TLSStream
from tunnel_lab.wire.errors import ConfigError

if TYPE_CHECKING:
    from tunnel_lab.lab.pki import LabPKI

log = logging.getLogger(__name__)

ALPN = ["h2", "http/1.1"]


class EyeballCertificates:
    """The listener's certificates: a lab-CA leaf per SNI name, issued on demand and cached."""

    def __init__(self, pki: LabPKI, tunnels: TunnelsView, *, max_on_demand: int) -> None:
        self._pki = pki
        self._tunnels = tunnels
        self._limit = max_on_demand
        self.host_contexts: dict[str, ssl.SSLContext] = {}
        self._listener_context: ssl.SSLContext | None = None

    def _context(self, name: str) -> ssl.SSLContext:
        ctx = self.host_contexts.get(name)
        if ctx is None:
            ctx = self._pki.server_ssl_context(name)
            ctx.set_alpn_protocols(ALPN)
            if len(self.host_contexts) >= 4096:  # many names: contexts are rebuilt from the leaf files
                self.host_contexts.clear()
            self.host_contexts[name] = ctx
        return ctx

    def listener_context(self) -> ssl.SSLContext:
        """The listener's context (built on first use): `localhost` by default, switched by SNI to the
        requested host's leaf."""
        if self._listener_context is None:
            self._listener_context = self._build_listener_context()
        return self._listener_context

    def _build_listener_context(self) -> ssl.SSLContext:
        base = self._context("localhost")
        limit = self._limit
        on_demand: set[str] = set()  # unrouted names this edge issued a certificate for

        def choose(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
            if not server_name:
                return None
            try:
                name = normalize_hostname(server_name)
            except ConfigError as exc:
                log.info("TLS refused for an invalid SNI name: %s", exc)
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            if (name not in on_demand and self._tunnels.resolve_hostname(name) is None
                    and self._tunnels.load_balancer(name) is None):
                # Every unrouted name costs a key pair and two files: a client inventing names must not
                # fill the disk. Past the limit, unrouted names get the default (localhost) certificate.
                if len(on_demand) >= limit:
                    if len(on_demand) == limit:
                        on_demand.add("")  # logged once
                        log.warning("issued %d on-demand certificates for unrouted names; further unrouted "
                                    "names get the default certificate (limit max_on_demand_certs)", limit)
                    return None
                on_demand.add(name)
            try:
                # Any valid name gets a lab-CA leaf (issued once, then cached), so an unrouted host
                # reaches the edge's 404 page over verified TLS instead of failing the handshake.
                sslobj.context = self._context(name)
            except Exception as exc:
                log.info("no certificate for SNI %r: %s", server_name, exc)
            return None

        base.sni_callback = choose
        return base


async def handle_tls_connection(edge: EdgeState[TunnelConnection], certs: EyeballCertificates,
                                tcp: trio.SocketStream, peer: tuple[str, int]) -> None:
    """TLS handshake, then HTTP/2 or HTTP/1.1 by ALPN."""
    # transport's TLS stream sends the alert a refused handshake leaves (`unrecognized_name` from the
    # SNI callback above), where trio's SSLStream would drop it.
    tls = TLSStream(tcp, certs.listener_context(), server_side=True)
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
        await handle_h2_connection(edge, tls, client=client, client_ip=peer[0])
    else:
        await handle_h1_connection(edge, tls, scheme="https", client=client, client_ip=peer[0])

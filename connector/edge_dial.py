"""Dialling the edge: the TLS client context, TCP + TLS within a deadline, Go's error texts."""

from __future__ import annotations

import datetime
import logging
import ssl

import trio

from tunnel_lab.connector.edge_errors import EdgeDialError
from tunnel_lab.connector.origin_client import describe_certificate, dial_error_text, fetch_peer_certificate
from tunnel_lab.connector.x509_text import go_tls_verify_error
from tunnel_lab.transport.tls import TLSStream, honour_keylog
from tunnel_lab.wire.errors import TLSSetupError

log = logging.getLogger(__name__)

EDGE_SNI = "h2.cftunnel.com"
DIAL_TIMEOUT = 15.0
_EDGE_CERTS: dict[tuple[str, str], bytes | None] = {}  # (edge address, verify error) -> the leaf it presented


def edge_ssl_context(ca_cert: str | None) -> ssl.SSLContext:
    """The TLS client context for the edge: `ca_cert` as the only roots when given, else the system pool.

    Like cloudflared, a `--cacert` file without any certificate falls back to the system pool (which then
    fails verification against a lab edge with a clear message)."""
    if ca_cert is None:
        return ssl.create_default_context()
    try:
        with open(ca_cert, encoding="latin-1") as fh:
            text = fh.read()
    except OSError as exc:
        raise TLSSetupError(f"cannot read --cacert file {ca_cert}: {exc.strerror or exc}") from exc
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname checks and verification on
    if "-----BEGIN CERTIFICATE-----" not in text:
        log.warning("--cacert file %s holds no certificate; using the system certificate pool", ca_cert)
        return ssl.create_default_context()
    try:
        ctx.load_verify_locations(cadata=text)
    except ssl.SSLError as exc:
        raise TLSSetupError(f"--cacert file {ca_cert} is not a valid PEM certificate bundle: {exc}") from exc
    return honour_keylog(ctx)


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TLSSetupError(f"edge address {address!r} is not host:port")
    return host.strip("[]"), int(port)


async def dial_edge(address: str, ctx: ssl.SSLContext, *, bind_address: str | None = None,
                    timeout: float = DIAL_TIMEOUT) -> TLSStream:
    """TCP + TLS to one edge address within `timeout` (raises `EdgeDialError`)."""
    host, port = split_host_port(address)
    tcp: trio.SocketStream | None = None
    done = False
    try:
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(host, port, local_address=bind_address)
            stream = TLSStream(tcp, ctx, server_hostname=EDGE_SNI)
            await stream.do_handshake()
            done = True
            return stream
    except trio.TooSlowError:
        raise EdgeDialError(f"DialContext error: dial tcp {address}: i/o timeout") from None
    except trio.BrokenResourceError as exc:
        inner = exc.__cause__
        if isinstance(inner, ssl.SSLCertVerificationError):
            key = (address, str(inner.verify_message or inner.reason))
            if key not in _EDGE_CERTS:  # one extra handshake per address and failure, not per retry
                _EDGE_CERTS[key] = await fetch_peer_certificate(host, port, EDGE_SNI)
                log.debug("edge %s presented %s: %s", address, describe_certificate(_EDGE_CERTS[key]), key[1])
            text = go_tls_verify_error(inner, der=_EDGE_CERTS[key], server_name=EDGE_SNI,
                                       now=datetime.datetime.now().astimezone())
            raise EdgeDialError(f"TLS handshake with edge error: {text}") from exc
        raise EdgeDialError(f"TLS handshake with edge error: {inner or exc}") from exc
    except OSError as exc:
        raise EdgeDialError(f"DialContext error: dial tcp {address}: {dial_error_text(exc)}") from exc
    finally:
        if tcp is not None and not done:  # also when cancelled mid-handshake
            tcp.socket.close()

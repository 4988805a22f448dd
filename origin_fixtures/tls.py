"""TLS server contexts for origin fixtures, from the lab PKI (valid or deliberately broken certificates)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from tunnel_lab.wire.errors import TLSSetupError

CERT_KINDS: tuple[str, ...] = ("valid", "expired", "not-yet-valid", "wrong-san", "unknown-ca", "self-signed")


def context_from_files(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS 1.2+ server context serving `cert` (PEM, leaf first) with `key`; ALPN `http/1.1`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"{cert}: cannot load certificate and key: {exc}") from exc
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def origin_ssl_context(state_dir: Path, cert: str, hostname: str | None = None) -> ssl.SSLContext:
    """The server context for `--tls CERT`: `valid` (a lab-CA leaf for `hostname`, default `localhost`,
    which also names 127.0.0.1 and ::1) or a broken kind (`lab.pki` broken certificates)."""
    from tunnel_lab.lab.pki import LabPKI  # imported here: plain-TCP fixtures need no PKI

    pki = LabPKI(state_dir)
    paths = pki.host_cert_paths(hostname) if cert == "valid" else pki.broken_cert_paths(cert, hostname)
    return context_from_files(paths[0], paths[1])

"""The lab PKI: one persistent root CA per state directory, and the certificates issued from it.

Files live under `STATE/pki/` (docs/architecture.md, "State directory"):

- `ca.pem`, `ca.key`: the lab root CA (created on first use, reloaded afterwards; key 0600);
- `edge.pem`, `edge.key`: the edge certificate, SANs `h2.cftunnel.com`, `quic.cftunnel.com`,
  `probe.cftunnel.com`, `cftunnel.com`, `*.cftunnel.com` (cloudflared checks the SNI name,
  docs/protocol.md §2.3);
- `hosts/<name>.pem|.key`: leaf certificates for routed hostnames and origins, made on demand;
- `broken/<kind>.pem|.key` (origin default names) and `broken/<kind>/<name>.pem|.key`: deliberately
  broken certificates for failure scenarios (`BROKEN_KINDS`).

trustme issues everything signed by the lab CA (it can reload a persisted CA with `CA.from_pem` and
takes `not_before`/`not_after`); `cryptography` is used directly only for the self-signed leaf,
which trustme cannot make (its self-signed certificates are all CAs).

Several processes may use one state directory at once (the edge, admin commands, origins started
by the runner): every file is written to a temporary name and renamed into place, and creation
happens under an exclusive `flock` on `pki/.lock`, so a racing process waits and then reuses what
the winner wrote instead of minting a second CA.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import trustme
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel_lab.lab.paths import ensure_private_dir, pki_dir
from tunnel_lab.lab.store import normalize_hostname
from tunnel_lab.wire.errors import ConfigError, TLSSetupError

EDGE = "edge"
EDGE_NAMES: tuple[str, ...] = (
    "h2.cftunnel.com", "quic.cftunnel.com", "probe.cftunnel.com", "cftunnel.com", "*.cftunnel.com",
)
# `localhost` always means loopback: its certificate also names the loopback addresses, so an
# origin on 127.0.0.1 or ::1 can be reached by either name with one certificate.
LOCALHOST_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
DEFAULT_ORIGIN_HOST = "localhost"
BROKEN_KINDS: tuple[str, ...] = ("expired", "not-yet-valid", "wrong-san", "unknown-ca", "self-signed")
CERT_KINDS: tuple[str, ...] = ("valid", *BROKEN_KINDS)
WRONG_SAN = "wrong-san.invalid"
ORGANIZATION = "tunnel-lab"


class CertPaths(NamedTuple):
    """A certificate file and its private key file."""

    cert: Path
    key: Path


def _now() -> datetime.datetime:
    # trustme and cryptography want naive UTC datetimes for not_before/not_after.
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0)


def cert_identities(hostname: str) -> tuple[str, ...]:
    """The SAN identities a certificate for `hostname` carries (normalised; IPs stay IPs)."""
    if hostname == EDGE:
        return EDGE_NAMES
    host = hostname.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    name = normalize_hostname(host, allow_wildcard=True)
    if name == "localhost":
        return LOCALHOST_NAMES
    return (name,)


def _file_stem(hostname: str) -> str:
    ident = cert_identities(hostname)[0] if hostname != EDGE else EDGE
    # `*` is legal in a file name but hostile to shells; `_` is not a valid DNS label on its own.
    return ident.replace("*", "_wildcard_").replace(":", "_")


def _san(identity: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(identity))
    except ValueError:
        return x509.DNSName(identity)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` via a temporary file in the same directory and an atomic rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_pair(paths: CertPaths, cert_pem: bytes, key_pem: bytes) -> None:
    ensure_private_dir(paths.cert.parent)
    # Key first: a reader that finds the certificate always finds its key.
    _write_atomic(paths.key, key_pem, 0o600)
    _write_atomic(paths.cert, cert_pem, 0o644)


def load_cert(path: Path) -> x509.Certificate:
    """Parse the first certificate of a PEM file (TLSSetupError naming the file if unusable)."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TLSSetupError(f"{path}: cannot read certificate: {exc}") from exc


def cert_sans(cert: x509.Certificate) -> list[str]:
    """The DNS and IP subject alternative names of `cert`, in order."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in ext.value if isinstance(name, x509.DNSName | x509.IPAddress)]


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate as colon-separated upper-case hex (like `openssl x509 -fingerprint`)."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def describe_cert(path: Path) -> dict[str, object]:
    """A short JSON-able description of the certificate in `path`."""
    cert = load_cert(path)
    return {
        "path": str(path),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": cert_sans(cert),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": fingerprint(cert),
    }


class LabPKI:
    """The lab's certificates in `STATE/pki`, created lazily and shared by every process."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.dir = pki_dir(self.state_dir)
        self._ca: trustme.CA | None = None
        self._ca_cert: x509.Certificate | None = None
        self._thread_lock = threading.RLock()
        self._lock_depth = 0

    # -- locking and the CA ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock excludes other processes (and other open() calls of this one); the RLock and the
        # depth count make nesting within this object safe instead of a self-deadlock.
        with self._thread_lock:
            if self._lock_depth:
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            ensure_private_dir(self.dir)
            with open(self.dir / ".lock", "a+b") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                self._lock_depth = 1
                try:
                    yield
                finally:
                    self._lock_depth = 0
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @property
    def ca_pem_path(self) -> Path:
        """The lab CA certificate (PEM); created on first use. Give it to cloudflared's `--cacert`."""
        self._load_ca()
        return self.dir / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        """The lab CA private key (mode 0600)."""
        self._load_ca()
        return self.dir / "ca.key"

    def _load_or_create_ca(self, cert_name: str, key_name: str, label: str) -> trustme.CA:
        paths = CertPaths(self.dir / cert_name, self.dir / key_name)
        if not paths.cert.exists():
            with self._locked():
                if not paths.cert.exists():
                    ca = trustme.CA(organization_name=ORGANIZATION, organization_unit_name=label)
                    _write_pair(paths, ca.cert_pem.bytes(), ca.private_key_pem.bytes())
        try:
            return trustme.CA.from_pem(paths.cert.read_bytes(), paths.key.read_bytes())
        except (OSError, ValueError) as exc:
            raise TLSSetupError(f"{paths.cert}: cannot load CA certificate and key: {exc}") from exc

    def _load_ca(self) -> trustme.CA:
        if self._ca is None:
            self._ca = self._load_or_create_ca("ca.pem", "ca.key", "tunnel-lab root CA")
            self._ca_cert = x509.load_pem_x509_certificate(self._ca.cert_pem.bytes())
        return self._ca

    def _untrusted_ca(self) -> trustme.CA:
        # A second CA that nobody is told to trust: the issuer of `unknown-ca` certificates.
        return self._load_or_create_ca("broken/untrusted-ca.pem", "broken/untrusted-ca.key",
                                       "tunnel-lab UNTRUSTED CA")

    def ca_certificate(self) -> x509.Certificate:
        """The lab CA certificate object."""
        self._load_ca()
        assert self._ca_cert is not None
        return self._ca_cert

    def ca_fingerprint(self) -> str:
        """SHA-256 fingerprint of the lab CA certificate, colon-separated hex."""
        return fingerprint(self.ca_certificate())

    # -- leaves ---------------------------------------------------------------------------------

    def _issued_by_lab_ca(self, path: Path) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            return False
        try:
            cert.verify_directly_issued_by(self.ca_certificate())
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def _ensure(self, paths: CertPaths, make: Callable[[], tuple[bytes, bytes]], *,
                check_issuer: bool) -> CertPaths:
        """Return `paths`, issuing the pair with `make()` first if it is missing (or stale)."""
        def usable() -> bool:
            if not (paths.cert.exists() and paths.key.exists()):
                return False
            # A certificate left over from a CA that was deleted and recreated is reissued.
            return not check_issuer or self._issued_by_lab_ca(paths.cert)

        if not usable():
            with self._locked():
                if not usable():
                    cert_pem, key_pem = make()
                    _write_pair(paths, cert_pem, key_pem)
        return paths

    def _issue(self, ca: trustme.CA, identities: Sequence[str], *,
               not_before: datetime.datetime | None = None,
               not_after: datetime.datetime | None = None) -> tuple[bytes, bytes]:
        leaf = ca.issue_cert(*identities, common_name=identities[0], organization_name=ORGANIZATION,
                             not_before=not_before, not_after=not_after)
        return leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes()

    def edge_cert_paths(self) -> CertPaths:
        """The edge certificate (SANs `EDGE_NAMES`), issued by the lab CA on first use."""
        ca = self._load_ca()
        return self._ensure(CertPaths(self.dir / "edge.pem", self.dir / "edge.key"),
                            lambda: self._issue(ca, EDGE_NAMES), check_issuer=True)

    def host_cert_paths(self, hostname: str | None = None) -> CertPaths:
        """A lab-CA leaf for `hostname` (DNS name, `*.suffix`, or IP; default `localhost`, which also
        names 127.0.0.1 and ::1). `edge` gives the edge certificate."""
        hostname = hostname or DEFAULT_ORIGIN_HOST
        if hostname == EDGE:
            return self.edge_cert_paths()
        identities = cert_identities(hostname)
        ca = self._load_ca()
        stem = _file_stem(hostname)
        hosts = self.dir / "hosts"
        return self._ensure(CertPaths(hosts / f"{stem}.pem", hosts / f"{stem}.key"),
                            lambda: self._issue(ca, identities), check_issuer=True)

    def broken_cert_paths(self, kind: str, hostname: str | None = None) -> CertPaths:
        """A deliberately broken certificate of `kind` (one of `BROKEN_KINDS`) for `hostname`
        (default: the origin default `localhost`; `edge`: the edge names).

        expired / not-yet-valid: lab CA, right names, outside its validity period;
        wrong-san: lab CA, valid, but only for `wrong-san.invalid`;
        unknown-ca: right names, signed by a CA that is not the lab CA;
        self-signed: right names, its own issuer.
        """
        if kind not in BROKEN_KINDS:
            raise ConfigError(f"unknown broken certificate kind {kind!r}",
                              hint="one of " + ", ".join(BROKEN_KINDS))
        identities = cert_identities(hostname or DEFAULT_ORIGIN_HOST)
        broken = self.dir / "broken"
        if hostname is None:
            paths = CertPaths(broken / f"{kind}.pem", broken / f"{kind}.key")
        else:
            stem = _file_stem(hostname)
            paths = CertPaths(broken / kind / f"{stem}.pem", broken / kind / f"{stem}.key")
        now = _now()
        day = datetime.timedelta(days=1)
        if kind == "expired":
            ca = self._load_ca()
            return self._ensure(paths, lambda: self._issue(
                ca, identities, not_before=now - 90 * day, not_after=now - day), check_issuer=True)
        if kind == "not-yet-valid":
            # Ten years ahead, so a kept state directory does not quietly turn it valid.
            ca = self._load_ca()
            return self._ensure(paths, lambda: self._issue(
                ca, identities, not_before=now + 3650 * day, not_after=now + 4000 * day),
                check_issuer=True)
        if kind == "wrong-san":
            ca = self._load_ca()
            return self._ensure(paths, lambda: self._issue(ca, (WRONG_SAN,)), check_issuer=True)
        if kind == "unknown-ca":
            other = self._untrusted_ca()
            return self._ensure(paths, lambda: self._issue(other, identities), check_issuer=False)
        return self._ensure(paths, lambda: _self_signed(identities), check_issuer=False)

    def cert_paths(self, hostname: str | None = None, kind: str = "valid") -> CertPaths:
        """`host_cert_paths` for kind `valid`, else `broken_cert_paths(kind, hostname)`."""
        if kind == "valid":
            return self.host_cert_paths(hostname)
        return self.broken_cert_paths(kind, hostname)

    # -- SSL contexts ---------------------------------------------------------------------------

    def server_ssl_context(self, kind: str = EDGE, *, broken: str | None = None) -> ssl.SSLContext:
        """A TLS server context: `kind` is `edge` (the edge certificate) or a hostname (its leaf).

        `broken=KIND` serves that broken certificate instead (for `edge`: with the edge names).
        Only the leaf is sent (the lab CA is the client's trust anchor, not part of the chain).
        """
        if broken is not None and broken != "valid":
            paths = self.broken_cert_paths(broken, kind)
        elif kind == EDGE:
            paths = self.edge_cert_paths()
        else:
            paths = self.host_cert_paths(kind)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(paths.cert), str(paths.key))
        except (OSError, ssl.SSLError) as exc:
            raise TLSSetupError(f"{paths.cert}: cannot load certificate and key: {exc}") from exc
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """A TLS client context that trusts only the lab CA (full verification)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_pem_path))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def _self_signed(identities: Sequence[str]) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, identities[0]),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(i) for i in identities]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem

"""lab.pki: the persistent lab CA and its certificates, checked with real (in-memory) TLS handshakes."""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509

from tunnel_lab.lab.pki import BROKEN_KINDS, EDGE_NAMES, LabPKI, cert_sans, describe_cert
from tunnel_lab.wire.errors import ConfigError, TLSSetupError


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> None:
    """Run a TLS handshake entirely in memory; raises the client's error if verification fails."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, obj in (("client", client), ("server", server)):
            if done[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                if name == "client":
                    raise
                return  # the server only fails because the client rejected it; the client raised already
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def client_ctx(pki: LabPKI) -> ssl.SSLContext:
    return pki.client_ssl_context()


@pytest.mark.parametrize("name", [*EDGE_NAMES[:4], "anything.cftunnel.com"])
def test_edge_cert_verifies_for_its_names(pki: LabPKI, client_ctx: ssl.SSLContext, name: str) -> None:
    handshake(pki.server_ssl_context(), client_ctx, name)


def test_edge_cert_rejects_other_names(pki: LabPKI, client_ctx: ssl.SSLContext) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(pki.server_ssl_context("edge"), client_ctx, "a.b.cftunnel.com")  # wildcard: one label
    assert info.value.verify_code == 62  # X509_V_ERR_HOSTNAME_MISMATCH
    assert cert_sans(x509.load_pem_x509_certificate(pki.edge_cert_paths().cert.read_bytes())) == \
        list(EDGE_NAMES)


@pytest.mark.parametrize(("hostname", "server_name"), [
    ("app.example.com", "app.example.com"),
    ("*.example.com", "x.example.com"),
    ("127.0.0.1", "127.0.0.1"),
    ("::1", "::1"),
    ("Bücher.example", "xn--bcher-kva.example"),
    (None, "localhost"),
    (None, "127.0.0.1"),
    ("localhost", "::1"),
])
def test_host_cert_verifies(pki: LabPKI, client_ctx: ssl.SSLContext, hostname: str | None,
                            server_name: str) -> None:
    ctx = pki.server_ssl_context(hostname) if hostname else pki.server_ssl_context("localhost")
    handshake(ctx, client_ctx, server_name)
    pki.host_cert_paths(hostname)  # also reachable without a context


def test_host_cert_is_only_for_its_name(pki: LabPKI, client_ctx: ssl.SSLContext) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(pki.server_ssl_context("app.example.com"), client_ctx, "other.example.com")
    assert info.value.verify_code == 62
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(pki.server_ssl_context("127.0.0.1"), client_ctx, "127.0.0.2")


# verify codes from OpenSSL's x509_vfy.h
EXPECTED = {
    "expired": (10, "certificate has expired"),
    "not-yet-valid": (9, "certificate is not yet valid"),
    "wrong-san": (62, "Hostname mismatch"),
    "unknown-ca": (20, "unable to get local issuer certificate"),
    "self-signed": (18, "self-signed certificate"),
}


@pytest.mark.parametrize("kind", BROKEN_KINDS)
@pytest.mark.parametrize(("hostname", "server_name"), [(None, "localhost"), (None, "127.0.0.1"),
                                                       ("edge", "h2.cftunnel.com"),
                                                       ("api.example.com", "api.example.com")])
def test_broken_certs_fail_for_the_right_reason(pki: LabPKI, client_ctx: ssl.SSLContext, kind: str,
                                                hostname: str | None, server_name: str) -> None:
    code, message = EXPECTED[kind]
    if kind == "wrong-san" and server_name[0].isdigit():
        code, message = 64, "IP address mismatch"  # X509_V_ERR_IP_ADDRESS_MISMATCH
    ctx = pki.server_ssl_context(hostname or "localhost", broken=kind)
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(ctx, client_ctx, server_name)
    assert info.value.verify_code == code
    assert message in info.value.verify_message
    # A client that does not check names or the chain still connects: the certificate is well-formed.
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    handshake(ctx, lax, server_name)


def test_broken_paths_layout(pki: LabPKI) -> None:
    default = pki.broken_cert_paths("expired")
    assert default.cert == pki.dir / "broken" / "expired.pem"
    assert default.key == pki.dir / "broken" / "expired.key"
    named = pki.broken_cert_paths("self-signed", "api.example.com")
    assert named.cert == pki.dir / "broken" / "self-signed" / "api.example.com.pem"
    sans = describe_cert(pki.broken_cert_paths("wrong-san", "api.example.com").cert)["sans"]
    assert sans == ["wrong-san.invalid"]
    with pytest.raises(ConfigError, match="unknown broken certificate kind"):
        pki.broken_cert_paths("rotten")
    with pytest.raises(ConfigError, match="invalid hostname"):
        pki.host_cert_paths("bad host")


def test_cert_paths_dispatch(pki: LabPKI) -> None:
    assert pki.cert_paths("a.example.com") == pki.host_cert_paths("a.example.com")
    assert pki.cert_paths("a.example.com", "expired") == pki.broken_cert_paths("expired", "a.example.com")
    assert pki.host_cert_paths("edge") == pki.edge_cert_paths()


def test_fingerprint_is_sha256_of_the_ca_der(pki: LabPKI) -> None:
    fp = pki.ca_fingerprint()
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fp)
    der = ssl.PEM_cert_to_DER_cert(pki.ca_pem_path.read_text())
    assert fp.replace(":", "").lower() == hashlib.sha256(der).hexdigest()


def test_file_modes(pki: LabPKI) -> None:
    pki.edge_cert_paths()
    pki.host_cert_paths("mode.example.com")
    pki.broken_cert_paths("unknown-ca")

    def mode(path: Path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(pki.ca_key_path) == 0o600
    assert mode(pki.ca_pem_path) == 0o644
    assert mode(pki.dir) == 0o700
    keys = list(pki.dir.rglob("*.key"))
    assert len(keys) >= 4
    assert {mode(k) for k in keys} == {0o600}
    assert not list(pki.dir.rglob("*.tmp"))


def test_reload_keeps_the_same_ca_and_leaves(tmp_path: Path) -> None:
    first = LabPKI(tmp_path)
    edge = first.edge_cert_paths()
    edge_bytes = edge.cert.read_bytes()
    second = LabPKI(tmp_path)
    assert second.ca_fingerprint() == first.ca_fingerprint()
    assert second.edge_cert_paths().cert.read_bytes() == edge_bytes
    # A leaf the second process issues chains to the CA the first one wrote.
    handshake(second.server_ssl_context("new.example.com"), first.client_ssl_context(), "new.example.com")


def test_deleted_ca_is_recreated_and_leaves_reissued(tmp_path: Path) -> None:
    first = LabPKI(tmp_path)
    first.edge_cert_paths()
    old_fp = first.ca_fingerprint()
    first.ca_pem_path.unlink()
    first.ca_key_path.unlink()
    fresh = LabPKI(tmp_path)
    assert fresh.ca_fingerprint() != old_fp
    handshake(fresh.server_ssl_context(), fresh.client_ssl_context(), "h2.cftunnel.com")


def test_unreadable_ca_is_a_tls_setup_error(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    (pki_dir / "ca.pem").write_text("not a certificate")
    (pki_dir / "ca.key").write_text("not a key")
    with pytest.raises(TLSSetupError, match=r"ca\.pem"):
        LabPKI(tmp_path).ca_fingerprint()


def test_threads_racing_make_one_ca(tmp_path: Path) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        pki = LabPKI(tmp_path)
        pki.edge_cert_paths()
        results.append(pki.ca_fingerprint())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 8
    assert len(set(results)) == 1
    handshake(LabPKI(tmp_path).server_ssl_context(), LabPKI(tmp_path).client_ssl_context(), "h2.cftunnel.com")


_RACER = ("import sys; from lab.pki import LabPKI; p = LabPKI(sys.argv[1]); "
          "p.edge_cert_paths(); p.broken_cert_paths('unknown-ca'); print(p.ca_fingerprint())")


def test_processes_racing_make_one_ca(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert len({out.strip() for out, _ in outs}) == 1
    assert LabPKI(tmp_path).ca_fingerprint() == outs[0][0].strip()

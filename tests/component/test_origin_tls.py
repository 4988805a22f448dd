"""Origin fixtures over TLS with lab certificates: the valid one verifies, each broken one fails."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio

import tunnel_lab.lab.pki as pki_module
from tests.component.test_origin_fixtures import TIMEOUT, Client
from tunnel_lab.origin_fixtures import OriginConfig, serve_origin
from tunnel_lab.origin_fixtures.tls import CERT_KINDS, origin_ssl_context


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("origin-tls-state")


@pytest.fixture(scope="module")
def client_context(state: Path) -> ssl.SSLContext:
    return pki_module.LabPKI(state).client_ssl_context()


async def tls_fetch(addr: tuple[str, int], ctx: ssl.SSLContext, server_hostname: str | None,
                    target: str = "/") -> dict:
    tcp = await trio.open_tcp_stream(*addr)
    stream = trio.SSLStream(tcp, ctx, server_hostname=server_hostname, https_compatible=True)
    async with stream:
        resp = await Client(stream).request("GET", target)
    assert resp.status == 200
    return resp.json()


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
async def test_valid_certificate_verifies_and_sni_is_recorded(
        nursery: trio.Nursery, state: Path, client_context: ssl.SSLContext, server_hostname: str) -> None:
    config = OriginConfig(ssl_context=origin_ssl_context(state, "valid"))
    with trio.fail_after(TIMEOUT):
        addr = await nursery.start(serve_origin, "echo", "127.0.0.1", 0, config)
        doc = await tls_fetch(addr, client_context, server_hostname, "/secure")
    assert doc["target"] == "/secure"
    [record] = config.history.records
    assert record.tls
    # Clients send no SNI for an IP address.
    assert record.sni == (None if server_hostname == "127.0.0.1" else "localhost")


async def test_valid_certificate_for_a_named_host(nursery: trio.Nursery, state: Path,
                                                  client_context: ssl.SSLContext) -> None:
    config = OriginConfig(ssl_context=origin_ssl_context(state, "valid", "app.example.test"))
    with trio.fail_after(TIMEOUT):
        addr = await nursery.start(serve_origin, "stream", "127.0.0.1", 0, config)
        tcp = await trio.open_tcp_stream(*addr)
        stream = trio.SSLStream(tcp, client_context, server_hostname="app.example.test")
        async with stream:
            resp = await Client(stream).request("GET", "/status/201")
        assert resp.status == 201
        assert config.history.records[0].sni == "app.example.test"
        with pytest.raises(trio.BrokenResourceError) as info:
            await tls_fetch(addr, client_context, "localhost")
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in info.value.__cause__.verify_message


# (verify_code, verify_message) as OpenSSL reports them to a verifying client.
EXPECTED_FAILURES = {
    "expired": (10, "certificate has expired"),
    "not-yet-valid": (9, "certificate is not yet valid"),
    "wrong-san": (62, "Hostname mismatch, certificate is not valid for 'localhost'."),
    "unknown-ca": (20, "unable to get local issuer certificate"),
    "self-signed": (18, "self-signed certificate"),
}


@pytest.mark.parametrize("kind", [k for k in CERT_KINDS if k != "valid"])
async def test_broken_certificate_fails_verification_with_its_reason(
        nursery: trio.Nursery, state: Path, client_context: ssl.SSLContext, kind: str) -> None:
    config = OriginConfig(ssl_context=origin_ssl_context(state, kind))
    with trio.fail_after(TIMEOUT):
        addr = await nursery.start(serve_origin, "echo", "127.0.0.1", 0, config)
        with pytest.raises(trio.BrokenResourceError) as info:
            await tls_fetch(addr, client_context, "localhost")
        cause = info.value.__cause__
        assert isinstance(cause, ssl.SSLCertVerificationError)
        code, message = EXPECTED_FAILURES[kind]
        reason = cause.verify_message.replace("self signed", "self-signed")  # OpenSSL < 3 spelling
        assert (cause.verify_code, reason) == (code, message)
        # Without verification the same origin answers: only the certificate is broken.
        lax = ssl.create_default_context()
        lax.check_hostname = False
        lax.verify_mode = ssl.CERT_NONE
        doc = await tls_fetch(addr, lax, "localhost", "/lax")
    assert doc["target"] == "/lax"
    assert [r.target for r in config.history.records] == ["/lax"]

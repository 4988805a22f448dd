"""Go's x509 error texts, rebuilt from the presented certificate (connector.x509_text).

The expected strings are what the real cloudflared 2026.8.2 logged against the lab's broken origin and edge
certificates (origin-cert-* and edge-cert-* scenarios), plus Go's other HostnameError wordings.
"""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tunnel_lab.connector.x509_text import go_time, go_verify_error

NOW = dt.datetime(2026, 12, 4, 14, 56, 55, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def make_cert(*, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), cn: str = "leaf",
              not_before: dt.datetime = NOW - DAY, not_after: dt.datetime = NOW + DAY,
              san_extension: bool = True) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(not_before).not_valid_after(not_after))
    if san_extension:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def text(der: bytes | None, host: str, code: int | None = 20, message: str = "unable to get local issuer "
         "certificate") -> str:
    return go_verify_error(der=der, server_name=host, now=NOW, verify_code=code, verify_message=message)


def test_ip_host_without_ip_sans_as_cloudflared_logs_it() -> None:
    der = make_cert(dns=("wrong-san.invalid",))
    assert text(der, "127.0.0.1", 64) == (
        "x509: cannot validate certificate for 127.0.0.1 because it doesn't contain any IP SANs")


def test_dns_name_mismatch_lists_the_valid_names() -> None:
    der = make_cert(dns=("wrong-san.invalid",))
    assert text(der, "h2.cftunnel.com", 62) == (
        "x509: certificate is valid for wrong-san.invalid, not h2.cftunnel.com")
    two = make_cert(dns=("a.test", "b.test"))
    assert text(two, "c.test", 62) == "x509: certificate is valid for a.test, b.test, not c.test"


def test_ip_mismatch_lists_the_ip_sans() -> None:
    der = make_cert(ips=("127.0.0.2", "::1"))
    assert text(der, "127.0.0.1", 64) == "x509: certificate is valid for 127.0.0.2, ::1, not 127.0.0.1"


def test_no_names_at_all_and_legacy_common_name() -> None:
    assert text(make_cert(), "a.test", 62) == (
        "x509: certificate is not valid for any names, but wanted to match a.test")
    legacy = make_cert(cn="a.test", san_extension=False)
    assert text(legacy, "a.test", 62) == (
        "x509: certificate relies on legacy Common Name field, use SANs instead")


def test_expired_and_not_yet_valid_name_both_times() -> None:
    expired = make_cert(dns=("localhost",), ips=("127.0.0.1",), not_before=NOW - 90 * DAY,
                        not_after=dt.datetime(2026, 12, 3, 14, 56, 55, tzinfo=dt.UTC))
    assert text(expired, "127.0.0.1", 10) == (
        "x509: certificate has expired or is not yet valid: current time 2026-12-04T14:56:55Z is after "
        "2026-12-03T14:56:55Z")
    future = make_cert(dns=("localhost",), not_before=dt.datetime(2036, 12, 1, 14, 56, 18, tzinfo=dt.UTC),
                       not_after=dt.datetime(2037, 12, 1, tzinfo=dt.UTC))
    assert text(future, "localhost", 9) == (
        "x509: certificate has expired or is not yet valid: current time 2026-12-04T14:56:55Z is before "
        "2036-12-01T14:56:18Z")


def test_go_checks_validity_before_the_name_and_the_name_before_the_issuer() -> None:
    # OpenSSL reports the unknown issuer first (code 20); Go reports what its order finds first.
    both = make_cert(dns=("other.test",), not_after=NOW - DAY, not_before=NOW - 2 * DAY)
    assert text(both, "a.test", 20).startswith("x509: certificate has expired or is not yet valid:")
    wrong_name = make_cert(dns=("other.test",))
    assert text(wrong_name, "a.test", 20) == "x509: certificate is valid for other.test, not a.test"


@pytest.mark.parametrize("code", [2, 18, 19, 20, 21])
def test_every_missing_issuer_code_is_an_unknown_authority(code: int) -> None:
    der = make_cert(dns=("a.test",))
    assert text(der, "a.test", code) == "x509: certificate signed by unknown authority"


def test_wildcards_match_one_leftmost_label_only() -> None:
    der = make_cert(dns=("*.example.test",))
    assert text(der, "A.Example.Test.", 20) == "x509: certificate signed by unknown authority"
    assert text(der, "a.b.example.test", 62) == (
        "x509: certificate is valid for *.example.test, not a.b.example.test")


def test_without_the_certificate_the_code_decides() -> None:
    assert text(None, "a.test", 10, "certificate has expired") == (
        "x509: certificate has expired or is not yet valid")
    assert text(None, "a.test", 20) == "x509: certificate signed by unknown authority"
    assert text(None, "a.test", 62, "Hostname mismatch") == "x509: certificate is not valid for a.test"
    assert text(b"not a certificate", "a.test", 99, "odd failure") == "x509: odd failure"


def test_go_time_formats_utc_with_z_and_other_zones_with_offsets() -> None:
    assert go_time(NOW) == "2026-12-04T14:56:55Z"
    east = dt.timezone(dt.timedelta(hours=2))
    assert go_time(NOW.astimezone(east)) == "2026-12-04T16:56:55+02:00"

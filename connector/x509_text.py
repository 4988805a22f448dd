"""Go's words for a certificate that failed verification, as cloudflared logs them.

cloudflared is a Go program: when it refuses an origin's or the edge's certificate its log carries the text of
Go's `crypto/x509` errors (`x509: certificate is valid for a.example, not b.example`), wrapped by `crypto/tls`
as `tls: failed to verify certificate: ...`. Python's ssl module (OpenSSL) detects the same failures but
words them differently and checks them in another order, so this module rebuilds Go's text from the
certificate the peer presented. Pure: no I/O, no logging.

Go's `Certificate.Verify` checks, in this order, the leaf's validity period, then the host name, then the
chain to a trusted root; the first failure is the one reported. OpenSSL usually reports the chain first, so
the order is recomputed here from the certificate itself.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl

from cryptography import x509
from cryptography.x509.oid import NameOID

TLS_PREFIX = "tls: failed to verify certificate: "

# OpenSSL verify codes that mean "no trusted issuer"; Go says "signed by unknown authority" for all of them.
_UNKNOWN_AUTHORITY_CODES = frozenset({
    2,   # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
    18,  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19,  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    20,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21,  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
    7,   # X509_V_ERR_CERT_SIGNATURE_FAILURE
})
_EXPIRED_CODES = frozenset({9, 10})  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
_NAME_CODES = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_USAGE_CODES = frozenset({26, 28})  # X509_V_ERR_INVALID_PURPOSE, X509_V_ERR_CERT_REJECTED


def go_time(moment: dt.datetime) -> str:
    """`time.Format(time.RFC3339)`: seconds, `Z` for UTC, else the offset."""
    text = moment.isoformat(timespec="seconds")
    return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text


def _validity_error(cert: x509.Certificate, now: dt.datetime) -> str | None:
    # Go compares against the local clock and prints it in the local zone; the certificate's times are UTC.
    if now < cert.not_valid_before_utc:
        detail = f"current time {go_time(now)} is before {go_time(cert.not_valid_before_utc)}"
    elif now > cert.not_valid_after_utc:
        detail = f"current time {go_time(now)} is after {go_time(cert.not_valid_after_utc)}"
    else:
        return None
    return f"x509: certificate has expired or is not yet valid: {detail}"


def _sans(cert: x509.Certificate) -> tuple[bool, list[str], list[str]]:
    """(has a SAN extension, DNS names, IP addresses as text)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False, [], []
    ips = [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
    return True, list(ext.get_values_for_type(x509.DNSName)), ips


def _to_ascii_lower(name: str) -> str:
    return name.lower().rstrip(".")


def _match_hostname(pattern: str, host: str) -> bool:
    """Go's matchHostnames: case-insensitive, a wildcard only as the whole leftmost label."""
    pattern, host = _to_ascii_lower(pattern), _to_ascii_lower(host)
    if not pattern or not host:
        return False
    p_labels, h_labels = pattern.split("."), host.split(".")
    if len(p_labels) != len(h_labels):
        return False
    for i, (p, h) in enumerate(zip(p_labels, h_labels, strict=True)):
        if i == 0 and p == "*":
            continue
        if p != h:
            return False
    return True


def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _hostname_error(cert: x509.Certificate, host: str) -> str | None:
    """Go's `VerifyHostname` then `HostnameError.Error()`; None when the name matches."""
    has_san, dns_names, ips = _sans(cert)
    ip = _parse_ip(host)
    if ip is not None:
        if any(_parse_ip(candidate) == ip for candidate in ips):
            return None
    elif any(_match_hostname(name, host) for name in dns_names):
        return None
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(common_names[0].value) if common_names else ""
    if not has_san and cn and _match_hostname(cn, host):
        return "x509: certificate relies on legacy Common Name field, use SANs instead"
    if ip is not None:
        if not ips:
            return f"x509: cannot validate certificate for {host} because it doesn't contain any IP SANs"
        valid = ", ".join(ips)
    else:
        valid = ", ".join(dns_names)
    if not valid:
        return f"x509: certificate is not valid for any names, but wanted to match {host}"
    return f"x509: certificate is valid for {valid}, not {host}"


def go_verify_error(*, der: bytes | None, server_name: str, now: dt.datetime,
                    verify_code: int | None, verify_message: str) -> str:
    """The `x509: ...` text Go gives for this failure (without the `tls:` prefix).

    `der` is the leaf the peer presented (None when it could not be fetched: the text then follows
    OpenSSL's verify code alone); `now` must be timezone-aware.
    """
    cert = None
    if der:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            cert = None
    if cert is not None:
        for found in (_validity_error(cert, now), _hostname_error(cert, server_name)):
            if found is not None:
                return found
    if verify_code in _UNKNOWN_AUTHORITY_CODES:
        return "x509: certificate signed by unknown authority"
    if verify_code in _USAGE_CODES:
        return "x509: certificate specifies an incompatible key usage"
    if cert is None and verify_code in _EXPIRED_CODES:
        return "x509: certificate has expired or is not yet valid"
    if cert is None and verify_code in _NAME_CODES:
        return f"x509: certificate is not valid for {server_name}"
    return f"x509: {verify_message}"


def go_tls_verify_error(exc: ssl.SSLCertVerificationError, *, der: bytes | None, server_name: str,
                        now: dt.datetime) -> str:
    """`tls: failed to verify certificate: x509: ...` for a failed Python handshake."""
    message = str(exc.verify_message or exc.reason or exc)
    code = exc.verify_code if isinstance(exc.verify_code, int) else None
    return TLS_PREFIX + go_verify_error(der=der, server_name=server_name, now=now, verify_code=code,
                                        verify_message=message)

"""wire.origin_cert: cert.pem as cloudflared reads and writes it."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.lab.login import origin_cert_pem
from tunnel_lab.wire.errors import ConfigError
from tunnel_lab.wire.origin_cert import OriginCert, decode_origin_cert, encode_origin_cert


def block(kind: str, payload: bytes) -> bytes:
    return (
        f"-----BEGIN {kind}-----\n".encode()
        + base64.b64encode(payload)
        + f"\n-----END {kind}-----\n".encode()
    )


def token(**fields: str) -> bytes:
    return block("ARGO TUNNEL TOKEN", json.dumps(fields).encode())


def test_the_labs_cert_pem_decodes_and_encodes_to_the_same_bytes() -> None:
    pem = origin_cert_pem(zone_id="z" * 32, account_id="a" * 32, api_token="t" * 40)
    cert = decode_origin_cert(pem)
    assert cert == OriginCert(zone_id="z" * 32, account_id="a" * 32, api_token="t" * 40)
    assert encode_origin_cert(cert) == pem


def test_old_style_blocks_are_skipped_and_the_endpoint_lowercased() -> None:
    pem = (
        block("PRIVATE KEY", b"k")
        + block("CERTIFICATE", b"c")
        + token(zoneID="z", accountID="a", apiToken="t", endpoint="FED")
    )
    assert decode_origin_cert(pem).endpoint == "fed"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "cannot decode empty certificate"),
        (block("RSA KEY", b"x"), "unknown block RSA KEY in the certificate"),
        (token(zoneID="z", apiToken="t") + token(zoneID="y", apiToken="u"), "found multiple tokens"),
        (token(accountID="a", apiToken="t"), "missing token in the certificate"),
        (block("ARGO TUNNEL TOKEN", b"not json"), "missing token in the certificate"),
        (b"garbage\n", "missing token in the certificate"),
    ],
)
def test_bad_certificates_get_cloudflareds_words(data: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        decode_origin_cert(data, source="cert.pem")
    assert info.value.source == "cert.pem"


def test_the_api_token_stays_out_of_repr() -> None:
    cert = OriginCert(zone_id="z", account_id="a", api_token="secret-token")
    assert "secret-token" not in repr(cert)


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)


@given(zone=text, account=text, api_token=text)
def test_encode_then_decode_is_identity(zone: str, account: str, api_token: str) -> None:
    cert = OriginCert(zone_id=zone, account_id=account, api_token=api_token)
    assert decode_origin_cert(encode_origin_cert(cert)) == cert

"""wire/mgmt_token.py: ES256 management tokens, minted and checked (no sockets)."""

from __future__ import annotations

import base64
import json

import pytest

from tunnel_lab.wire import mgmt_token
from tunnel_lab.wire.jwt import JwtError

KEY = mgmt_token.new_key()
NOW = 1_800_000_000.0


def mint(**overrides: str) -> str:
    fields = {"tunnel_id": "7b0f4b54-4c3a-4a52-9d65-5bd06c3a2c5e", "account_tag": "acct", "actor": "me",
              "resource": "logs", **overrides}
    return mgmt_token.mint(KEY, now=NOW, **fields)


def reencode(token: str, part: int, value: dict[str, object]) -> str:
    parts = token.split(".")
    parts[part] = base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return ".".join(parts)


def test_round_trip() -> None:
    claims = mgmt_token.verify(mint(), KEY.public_key(), now=NOW + 1)
    assert claims == mgmt_token.ManagementClaims(tunnel_id="7b0f4b54-4c3a-4a52-9d65-5bd06c3a2c5e",
                                                 account_tag="acct", actor="me", resource="logs")


def test_key_pem_round_trip_and_bad_keys() -> None:
    key = mgmt_token.load_key(mgmt_token.key_pem(KEY))
    assert mgmt_token.verify(mint(), key.public_key(), now=NOW).actor == "me"
    with pytest.raises(JwtError, match="not a readable PEM key"):
        mgmt_token.load_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


@pytest.mark.parametrize(("token", "now", "match"), [
    (mint(), NOW + mgmt_token.LIFETIME, "expired"),
    (mint(), NOW - 10, "not valid yet"),
    (mint()[:-4] + "AAAA", NOW, "signature"),
    (reencode(mint(), 0, {"alg": "none"}), NOW, "algorithm 'none'"),
    (reencode(mint(), 0, {"alg": "HS256"}), NOW, "algorithm 'HS256'"),
    (reencode(mint(), 1, {"tun": {"id": "x"}, "exp": NOW + 60}), NOW, "signature"),
    ("a.b", NOW, "three"),
    ("x" * 9000, NOW, "longer"),
    ("!!.e30.e30", NOW, "base64url"),
])
def test_refusals(token: str, now: float, match: str) -> None:
    with pytest.raises(JwtError, match=match):
        mgmt_token.verify(token, KEY.public_key(), now=now)


def test_another_key_is_refused() -> None:
    with pytest.raises(JwtError, match="signature"):
        mgmt_token.verify(mint(), mgmt_token.new_key().public_key(), now=NOW)


def test_claims_cloudflared_needs_must_be_present() -> None:
    with pytest.raises(JwtError, match=r"actor\.id"):
        mgmt_token.verify(mint(actor=""), KEY.public_key(), now=NOW)
    with pytest.raises(ValueError, match="unknown management resource"):
        mint(resource="shell")

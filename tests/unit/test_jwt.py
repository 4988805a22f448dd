"""wire.jwt: RS256 sign/verify, JWKS round trips, claim checks and the bad-token list of issue 13."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire import jwt
from tunnel_lab.wire.jwt import ClaimError, JwtError, SigningKey, UnknownKeyError

KEY = SigningKey.generate("k1")
OTHER = SigningKey.generate("k2")
ISS = "https://team.cloudflareaccess.com"
NOW = 1_800_000_000.0


def keys(*signing: SigningKey) -> dict:
    return jwt.parse_jwks(json.dumps(jwt.jwks_document(signing)))


def claims(**over: object) -> dict:
    base = {"iss": ISS, "aud": ["tag1"], "exp": NOW + 60, "iat": NOW, "email": "a@b.test", "sub": "s"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_round_trip_and_checks_pass() -> None:
    token = jwt.sign(claims(), KEY)
    got = jwt.verify(token, keys(KEY, OTHER))
    assert got["email"] == "a@b.test"
    jwt.check_claims(got, issuer=ISS, now=NOW, audience=["tag1"])


def test_jwks_has_only_public_parts() -> None:
    doc = jwt.jwks_document([KEY])
    (jwk,) = doc["keys"]
    assert set(jwk) == {"kid", "kty", "alg", "use", "e", "n"}
    assert jwk["alg"] == "RS256" and jwk["kid"] == "k1"
    assert b"PRIVATE" not in json.dumps(doc).encode()


def test_pem_round_trip() -> None:
    again = SigningKey.from_pem("k1", KEY.to_pem())
    assert jwt.verify(jwt.sign(claims(), again), keys(KEY))["sub"] == "s"


def test_forged_signature_refused() -> None:
    token = jwt.sign(claims(), OTHER, header={"kid": "k1"})  # OTHER's signature under KEY's kid
    with pytest.raises(JwtError, match="signature does not verify"):
        jwt.verify(token, keys(KEY))


def test_tampered_payload_refused() -> None:
    head, _, sig = jwt.sign(claims(), KEY).split(".")
    forged = _b64(json.dumps(claims(email="admin@b.test")).encode())
    with pytest.raises(JwtError, match="signature"):
        jwt.verify(f"{head}.{forged}.{sig}", keys(KEY))


@pytest.mark.parametrize("cut", [1, 10, 100])
def test_truncated_refused(cut: int) -> None:
    token = jwt.sign(claims(), KEY)
    with pytest.raises(JwtError):
        jwt.verify(token[:-cut], keys(KEY))


def test_alg_none_refused() -> None:
    head = _b64(json.dumps({"alg": "none", "kid": "k1"}).encode())
    body = _b64(json.dumps(claims()).encode())
    for token in (f"{head}.{body}.", f"{head}.{body}.AAAA"):
        with pytest.raises(JwtError, match=r"no signature|algorithm 'none'"):
            jwt.verify(token, keys(KEY))


def test_hs256_confusion_refused() -> None:
    """An HMAC keyed with the public JWK (the classic confusion attack) is refused by algorithm."""
    head = _b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    body = _b64(json.dumps(claims()).encode())
    secret = json.dumps(jwt.jwks_document([KEY])["keys"][0]).encode()
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(JwtError, match="algorithm 'HS256' is not accepted"):
        jwt.verify(f"{head}.{body}.{_b64(mac)}", keys(KEY))


def test_unknown_kid_is_its_own_error() -> None:
    with pytest.raises(UnknownKeyError) as info:
        jwt.verify(jwt.sign(claims(), OTHER), keys(KEY))
    assert info.value.kid == "k2"


def test_no_kid_tries_every_key() -> None:
    token = jwt.sign(claims(), OTHER, header={"kid": None})  # a null kid counts as none
    assert jwt.verify(token, keys(KEY, OTHER))["sub"] == "s"
    with pytest.raises(JwtError, match="signature does not verify"):
        jwt.verify(token, keys(KEY))
    with pytest.raises(UnknownKeyError):
        jwt.verify(token, {})


@pytest.mark.parametrize(("over", "reason"), [
    ({"iss": "https://evil.cloudflareaccess.com"}, "issuer"),
    ({"exp": NOW - 1}, "expired"),
    ({"exp": NOW}, "expired"),
    ({"exp": None}, "no-exp"),
    ({"exp": "soon"}, "exp"),
    ({"nbf": NOW + 3600}, "nbf"),
    ({"aud": ["other"]}, "audience"),
    ({"aud": "other"}, "audience"),
    ({"aud": None}, "audience"),
])
def test_claim_failures(over: dict, reason: str) -> None:
    with pytest.raises(ClaimError) as info:
        jwt.check_claims(claims(**over), issuer=ISS, now=NOW, audience=["tag1"])
    assert info.value.reason == reason


def test_audience_string_and_empty_list() -> None:
    jwt.check_claims(claims(aud="tag1"), issuer=ISS, now=NOW, audience=["x", "tag1"])
    with pytest.raises(ClaimError):  # an empty accepted list refuses everything
        jwt.check_claims(claims(), issuer=ISS, now=NOW, audience=[])


def test_oversize_token_refused_unparsed() -> None:
    with pytest.raises(JwtError, match="at most"):
        jwt.decode("a" * (jwt.MAX_TOKEN + 1))


@pytest.mark.parametrize("doc", [b"not json", b"[]", b'{"keys": 1}', b'{"keys": [1]}',
                                 b'{"keys": [{"kty": "RSA", "kid": "x", "n": "!!", "e": "AQAB"}]}',
                                 b'{"keys": [{"kty": "RSA", "kid": "x"}]}'])
def test_bad_jwks(doc: bytes) -> None:
    with pytest.raises(JwtError):
        jwt.parse_jwks(doc)


def test_jwks_skips_foreign_keys() -> None:
    doc = {"keys": [{"kty": "EC", "kid": "e"}, {"kty": "RSA", "use": "enc", "kid": "x"}]}
    assert jwt.parse_jwks(json.dumps(doc)) == {}


@given(st.text(max_size=300))
def test_any_text_is_a_clear_error_or_claims(text: str) -> None:
    """Never a traceback: a JwtError or (for a real token) claims."""
    with contextlib.suppress(JwtError):
        jwt.verify(text, keys(KEY))


@given(st.binary(min_size=1, max_size=40), st.integers(min_value=0, max_value=2))
def test_any_part_replaced_is_refused(junk: bytes, which: int) -> None:
    parts = jwt.sign(claims(), KEY).split(".")
    replacement = _b64(junk)
    if replacement == parts[which]:
        return
    parts[which] = replacement
    with pytest.raises(JwtError):
        jwt.verify(".".join(parts), keys(KEY))


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.integers() | st.text(max_size=8), max_size=5))
def test_sign_verify_round_trip_any_claims(extra: dict) -> None:
    token = jwt.sign(extra, KEY)
    assert jwt.verify(token, keys(KEY)) == extra

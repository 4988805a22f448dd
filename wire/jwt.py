"""JSON Web Tokens as Cloudflare Access uses them: RS256 signatures, JWKS documents, claim checks.

The lab edge signs `Cf-Access-Jwt-Assertion` values and serves its public keys as a JWKS on the team
domain (`https://<team>.cloudflareaccess.com/cdn-cgi/access/certs`); the connector verifies assertions
against that JWKS (`originRequest.access`). Only RS256 is accepted: a token announcing `none`, `HS256`
or anything else is refused before any key is looked at (so a public key can never serve as an HMAC
secret). Errors say what is wrong; they never quote a signature or a key.

Pure: no I/O, no clock (callers pass `now`), no logging.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tunnel_lab.wire.errors import TunnelLabError

__all__ = [
    "ALGORITHM",
    "ClaimError",
    "JwtError",
    "SigningKey",
    "UnknownKeyError",
    "check_claims",
    "decode",
    "jwks_document",
    "parse_jwks",
    "sign",
    "verify",
]

ALGORITHM = "RS256"
MAX_TOKEN = 16 * 1024  # a real Access token is about 1 KiB; anything far larger is refused unparsed
RSA_BITS = 2048


class JwtError(TunnelLabError):
    """A token (or a JWKS) is malformed, unsigned, signed with another algorithm or badly signed."""


class UnknownKeyError(JwtError):
    """The token names a key id the JWKS does not hold (the caller may refresh the JWKS and retry)."""

    def __init__(self, kid: str | None) -> None:
        super().__init__(f"no signing key with kid {kid!r} in the key set")
        self.kid = kid


class ClaimError(JwtError):
    """The signature is good but a claim is not: `reason` is issuer, audience, expired, no-exp or nbf."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str) -> bytes:
    """Strict unpadded base64url; `what` names the part in the error."""
    if not text or any(c not in _B64URL for c in text) or len(text) % 4 == 1:
        raise JwtError(f"{what} is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JwtError(f"{what} is not unpadded base64url") from None


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _int_b64(value: int) -> str:
    return b64url_encode(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


@dataclass(frozen=True)
class SigningKey:
    """An RSA private key with its key id (`kid`)."""

    kid: str
    private_key: rsa.RSAPrivateKey

    @classmethod
    def generate(cls, kid: str) -> SigningKey:
        """A fresh 2048-bit key."""
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS))

    @classmethod
    def from_pem(cls, kid: str, pem: bytes) -> SigningKey:
        """A key stored with `to_pem`."""
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise JwtError(f"signing key {kid!r} is not an RSA key")
        return cls(kid, key)

    def to_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted (the lab's state directory is private)."""
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    def public_jwk(self) -> dict[str, str]:
        """The public half as a JWK (RFC 7517)."""
        numbers = self.private_key.public_key().public_numbers()
        return {"kid": self.kid, "kty": "RSA", "alg": ALGORITHM, "use": "sig",
                "e": _int_b64(numbers.e), "n": _int_b64(numbers.n)}


def jwks_document(keys: Iterable[SigningKey]) -> dict[str, Any]:
    """The JWKS a team domain serves at `/cdn-cgi/access/certs` (public keys only)."""
    return {"keys": [k.public_jwk() for k in keys]}


def parse_jwks(body: bytes | str) -> dict[str, rsa.RSAPublicKey]:
    """kid -> public key from a JWKS document; RSA keys for signatures only, others are skipped."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwtError(f"key set is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwtError("key set has no 'keys' list")
    keys: dict[str, rsa.RSAPublicKey] = {}
    for i, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            raise JwtError(f"key set entry {i} is not an object")
        usable = jwk.get("kty") == "RSA" and jwk.get("use", "sig") == "sig"
        if not usable or jwk.get("alg", ALGORITHM) != ALGORITHM:
            continue
        kid, n, e = jwk.get("kid"), jwk.get("n"), jwk.get("e")
        if not isinstance(kid, str) or not isinstance(n, str) or not isinstance(e, str):
            raise JwtError(f"key set entry {i} lacks a string kid, n or e")
        modulus = int.from_bytes(b64url_decode(n, f"key {kid!r} n"), "big")
        exponent = int.from_bytes(b64url_decode(e, f"key {kid!r} e"), "big")
        try:
            keys[kid] = rsa.RSAPublicNumbers(exponent, modulus).public_key()
        except ValueError as exc:
            raise JwtError(f"key {kid!r} is not a usable RSA key: {exc}") from None
    return keys


def sign(claims: Mapping[str, Any], key: SigningKey, *, header: Mapping[str, Any] | None = None) -> str:
    """A compact RS256 JWS of `claims` with `kid` in its header."""
    head = {"alg": ALGORITHM, "kid": key.kid, "typ": "JWT", **(header or {})}
    signing_input = (b64url_encode(json.dumps(head, separators=(",", ":")).encode()) + "."
                     + b64url_encode(json.dumps(dict(claims), separators=(",", ":")).encode()))
    signature = key.private_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url_encode(signature)


@dataclass(frozen=True)
class Decoded:
    """A token split and parsed, not yet verified."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def decode(token: str) -> Decoded:
    """Split and parse a compact JWS; nothing is verified (see `verify`)."""
    if len(token) > MAX_TOKEN:
        raise JwtError(f"token is {len(token)} characters; at most {MAX_TOKEN}")
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtError(f"token has {len(parts)} dot-separated parts; a signed JWT has 3")
    objects = []
    for part, what in zip(parts[:2], ("header", "payload"), strict=True):
        raw = b64url_decode(part, f"token {what}")
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise JwtError(f"token {what} is not JSON") from None
        if not isinstance(value, dict):
            raise JwtError(f"token {what} is not a JSON object")
        objects.append(value)
    if not parts[2]:
        raise JwtError("token has no signature")
    signature = b64url_decode(parts[2], "token signature")
    return Decoded(objects[0], objects[1], (parts[0] + "." + parts[1]).encode("ascii"), signature)


def verify(token: str, keys: Mapping[str, rsa.RSAPublicKey]) -> dict[str, Any]:
    """The claims of an RS256 token signed by one of `keys` (kid -> key); claims are not checked.

    A token without a `kid` is tried against every key. `UnknownKeyError` when its kid is not in `keys`.
    """
    decoded = decode(token)
    alg = decoded.header.get("alg")
    if alg != ALGORITHM:
        raise JwtError(f"token algorithm {alg!r} is not accepted; only {ALGORITHM}")
    kid = decoded.header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwtError("token kid is not a string")
    if kid is not None:
        if kid not in keys:
            raise UnknownKeyError(kid)
        candidates: Sequence[rsa.RSAPublicKey] = [keys[kid]]
    else:
        candidates = list(keys.values())
        if not candidates:
            raise UnknownKeyError(None)
    for public in candidates:
        try:
            public.verify(decoded.signature, decoded.signing_input, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        return decoded.claims
    raise JwtError("token signature does not verify")


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClaimError(name, f"claim {name!r} is not a number")
    return float(value)


def audiences(claims: Mapping[str, Any]) -> list[str]:
    """`aud` as a list (a JWT may carry one string or a list)."""
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return list(aud)
    return []


def check_claims(claims: Mapping[str, Any], *, issuer: str, now: float, audience: Iterable[str] | None = None,
                 nbf_leeway: float = 300.0) -> None:
    """Issuer equal to `issuer`, `exp` present and in the future, `nbf` (with leeway) in the past, and,
    when `audience` is given, one of the token's audiences in it. Raises `ClaimError`."""
    iss = claims.get("iss")
    if iss != issuer:
        raise ClaimError("issuer", f"token issuer {str(iss)[:200]!r} is not {issuer!r}")
    exp = _numeric(claims, "exp")
    if exp is None:
        raise ClaimError("no-exp", "token has no exp claim")
    if exp <= now:
        raise ClaimError("expired", f"token expired {now - exp:.0f}s ago")
    nbf = _numeric(claims, "nbf")
    if nbf is not None and nbf > now + nbf_leeway:
        raise ClaimError("nbf", "token is not valid yet (nbf)")
    if audience is not None:
        wanted = set(audience)
        if not wanted.intersection(audiences(claims)):
            raise ClaimError("audience", "token audience is not one of the accepted tags")

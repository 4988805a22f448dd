"""Management tokens: the ES256 JWT that `cloudflared tail` gets from the API and the edge checks.

cloudflared (`management/token.go`) accepts only ES256 and only *parses* the token: it needs non-empty
`tun.id`, `tun.account_tag` and `actor.id`, and trusts the edge to have checked the signature. The lab's
edge does check it: signature with the lab's P-256 key, `exp` and `nbf`. The other claims the lab writes
(`iss`, `iat`, `res`) are its own choice; the real token's full claim set is not public.

Pure: no I/O, no clock (callers pass `now`), no logging.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from tunnel_lab.wire.jwt import JwtError, b64url_decode, b64url_encode

ALGORITHM = "ES256"
ISSUER = "tunnel-lab"  # lab
LIFETIME = 300.0  # lab: seconds a token is valid; tail uses it at once
MAX_TOKEN = 8 * 1024
RESOURCES = ("logs", "admin", "host_details")  # cfapi's ManagementResource names
_COORD = 32  # bytes per P-256 coordinate in a JWS signature (r || s)


@dataclass(frozen=True, kw_only=True)
class ManagementClaims:
    """What a verified token grants: one tunnel of one account, to one actor."""

    tunnel_id: str
    account_tag: str
    actor: str
    resource: str


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 signing key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (kept in the lab's state directory, mode 0600)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse a key written by `key_pem`; JwtError if it is not a P-256 private key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise JwtError(f"the management signing key is not a readable PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise JwtError("the management signing key is not a P-256 key")
    return key


def mint(key: ec.EllipticCurvePrivateKey, *, tunnel_id: str, account_tag: str, actor: str, resource: str,
         now: float) -> str:
    """A signed token for `resource` on one tunnel, valid from `now` for LIFETIME seconds."""
    if resource not in RESOURCES:
        raise ValueError(f"unknown management resource {resource!r}")
    header = {"alg": ALGORITHM, "typ": "JWT"}
    claims = {"tun": {"id": tunnel_id, "account_tag": account_tag}, "actor": {"id": actor, "support": False},
              "res": [resource], "iss": ISSUER, "iat": int(now), "nbf": int(now), "exp": int(now + LIFETIME)}
    signing_input = ".".join(b64url_encode(json.dumps(part, separators=(",", ":")).encode())
                             for part in (header, claims))
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(_COORD, "big") + s.to_bytes(_COORD, "big")
    return f"{signing_input}.{b64url_encode(signature)}"


def verify(token: str, public: ec.EllipticCurvePublicKey, *, now: float) -> ManagementClaims:
    """Check the signature, `alg`, `exp`/`nbf` and the claims cloudflared needs; JwtError says what failed."""
    if len(token) > MAX_TOKEN:
        raise JwtError(f"token longer than {MAX_TOKEN} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("not a JWT: expected three dot-separated parts")
    header = _json_part(parts[0], "header")
    if header.get("alg") != ALGORITHM:
        raise JwtError(f"token algorithm {header.get('alg')!r} is not {ALGORITHM}")
    signature = b64url_decode(parts[2], "signature")
    if len(signature) != 2 * _COORD:
        raise JwtError("bad ES256 signature length")
    der = encode_dss_signature(int.from_bytes(signature[:_COORD], "big"),
                               int.from_bytes(signature[_COORD:], "big"))
    try:
        public.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise JwtError("bad token signature") from None
    claims = _json_part(parts[1], "claims")
    exp, nbf = claims.get("exp"), claims.get("nbf", 0)
    if not isinstance(exp, int | float) or isinstance(exp, bool) or now >= exp:
        raise JwtError("token expired")
    if not isinstance(nbf, int | float) or isinstance(nbf, bool) or now < nbf:
        raise JwtError("token not valid yet")
    tun, actor = claims.get("tun"), claims.get("actor")
    tunnel_id = tun.get("id") if isinstance(tun, dict) else None
    account = tun.get("account_tag") if isinstance(tun, dict) else None
    actor_id = actor.get("id") if isinstance(actor, dict) else None
    if not (isinstance(tunnel_id, str) and tunnel_id and isinstance(account, str) and account
            and isinstance(actor_id, str) and actor_id):
        raise JwtError("token lacks tun.id, tun.account_tag or actor.id")
    res = claims.get("res")
    resource = res[0] if isinstance(res, list) and res and isinstance(res[0], str) else ""
    return ManagementClaims(tunnel_id=tunnel_id, account_tag=account, actor=actor_id, resource=resource)


def _json_part(text: str, what: str) -> Mapping[str, Any]:
    try:
        value = json.loads(b64url_decode(text, what))
    except (ValueError, UnicodeDecodeError):
        raise JwtError(f"token {what} is not JSON") from None
    if not isinstance(value, dict):
        raise JwtError(f"token {what} is not a JSON object")
    return value

"""The token transfer of `cloudflared access login`: a NaCl box from the Access edge to the CLI.

The CLI makes a fresh Curve25519 key pair and puts its public key (URL-safe base64, padded) in the
`token` parameter of `https://<app>/cdn-cgi/access/cli?...`. Once the user has signed in, the edge seals
`{"app_token", "org_token"}` to that key with a key pair of its own and hands it to the transfer service,
where the CLI long-polls `https://login.cloudflareaccess.org/transfer/<its public key>`: the answer's body
is standard base64 of the 24-byte nonce followed by the box, and the edge's public key is in the
`service-public-key` header (URL-safe base64). Facts from cloudflared's `token/` package (issue 13).

Pure: no I/O, no logging.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from tunnel_lab.wire.errors import TunnelLabError

KEY_SIZE = 32
NONCE_SIZE = 24


class TransferError(TunnelLabError):
    """A transfer key or a sealed answer is malformed, or the box does not open."""


def parse_public_key(text: str) -> bytes:
    """The 32 bytes of a URL-safe base64 public key (as the CLI sends it), else `TransferError`."""
    body = text.rstrip("=")
    if not body or len(text) > 64 or not all(c.isascii() and (c.isalnum() or c in "-_") for c in body):
        raise TransferError("the transfer key is not URL-safe base64")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise TransferError("the transfer key is not URL-safe base64") from None
    if len(raw) != KEY_SIZE:
        raise TransferError(f"the transfer key is {len(raw)} bytes, not {KEY_SIZE}")
    return raw


def key_text(raw: bytes) -> str:
    """A public key as the CLI and the `service-public-key` header spell it."""
    return base64.urlsafe_b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Sealed:
    """What the transfer service answers: the body and the `service-public-key` header."""

    body: bytes
    sender_key: str


def seal(app_token: str, org_token: str, recipient: bytes) -> Sealed:
    """Seal the two tokens to the CLI's public key with a fresh sender key pair."""
    sender = PrivateKey.generate()
    message = json.dumps({"app_token": app_token, "org_token": org_token}).encode()
    boxed = Box(sender, PublicKey(recipient)).encrypt(message)  # the nonce, then the box
    return Sealed(base64.b64encode(bytes(boxed)), key_text(bytes(sender.public_key)))


class Recipient:
    """The CLI's side: a fresh key pair (`public` goes into the cli URL) and the opening of the answer."""

    def __init__(self) -> None:
        self._private = PrivateKey.generate()
        self.public = key_text(bytes(self._private.public_key))

    def open(self, body: bytes, sender_key: str) -> dict[str, str]:
        """`{"app_token", "org_token"}` from the transfer service's answer, else `TransferError`."""
        try:
            data = base64.b64decode(body.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise TransferError("the transfer answer is not base64") from None
        if len(data) < NONCE_SIZE:
            raise TransferError("the transfer answer is too short to hold a nonce")
        try:
            opened = Box(self._private, PublicKey(parse_public_key(sender_key))).decrypt(
                data[NONCE_SIZE:], data[:NONCE_SIZE])
        except CryptoError:
            raise TransferError("the transfer answer does not open with this key") from None
        try:
            doc = json.loads(opened)
        except ValueError:
            raise TransferError("the opened transfer answer is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("app_token"), str):
            raise TransferError("the opened transfer answer has no app_token")
        return {k: v for k, v in doc.items() if isinstance(v, str)}

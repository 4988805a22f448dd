"""The sealed token transfer of `cloudflared access login` (wire/access_transfer.py)."""

from __future__ import annotations

import base64

import pytest

from tunnel_lab.wire.access_transfer import Recipient, TransferError, parse_public_key, seal


def test_sealed_tokens_open_with_the_recipients_key_only() -> None:
    cli = Recipient()
    sealed = seal("APP", "ORG", parse_public_key(cli.public))
    assert b"APP" not in base64.b64decode(sealed.body)
    assert cli.open(sealed.body, sealed.sender_key) == {"app_token": "APP", "org_token": "ORG"}
    with pytest.raises(TransferError, match="does not open"):
        Recipient().open(sealed.body, sealed.sender_key)
    with pytest.raises(TransferError, match="does not open"):
        cli.open(sealed.body, Recipient().public)  # another sender key


@pytest.mark.parametrize(("body", "why"), [
    (b"not base64!", "not base64"),
    (base64.b64encode(b"short"), "too short"),
    (base64.b64encode(bytes(24) + b"x" * 40), "does not open"),
])
def test_bad_answers_are_named(body: bytes, why: str) -> None:
    cli = Recipient()
    with pytest.raises(TransferError, match=why):
        cli.open(body, Recipient().public)


@pytest.mark.parametrize(("key", "why"), [("***", "not URL-safe base64"),
                                          (base64.urlsafe_b64encode(b"x" * 31).decode(), "31 bytes")])
def test_bad_keys_are_named(key: str, why: str) -> None:
    with pytest.raises(TransferError, match=why):
        parse_public_key(key)

"""wire.credentials: credentials files and tunnel tokens as cloudflared reads them
(docs/protocol.md §10.1)."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.golden import VECTORS, VECTORS_GO126
from tunnel_lab.wire.credentials import (
    NIL_UUID,
    Credentials,
    credentials_json,
    make_token,
    parse_credentials_file,
    parse_token,
)
from tunnel_lab.wire.errors import ConfigError

SECRET_B64 = "WSQ+2zDXQRqrBJbySwGBr3k2pMDsoESAn0NG82nH9dA="
TUNNEL = uuid.UUID("6ff42ae2-765d-4adf-8112-31c55c1551ef")


@pytest.mark.parametrize("path", [VECTORS / "creds.json", VECTORS_GO126 / "creds.json"], ids=str)
def test_vector_credentials_files(path: Path) -> None:
    creds = parse_credentials_file(path.read_text(), str(path))
    assert creds == Credentials("0123456789abcdef0123456789abcdef", base64.b64decode(SECRET_B64), TUNNEL, "")
    assert len(creds.tunnel_secret) == 32
    # It matches the secret cloudflared sent in registerConnection (A01's capture).
    a01 = json.loads((VECTORS / "A01-control-stream-register.json").read_text())
    params = a01["capnp"][2]["decoded"]["call"]["params"]
    assert creds.tunnel_secret.hex() == params["auth"]["tunnelSecret"]["bytes_hex"]
    assert creds.tunnel_id.bytes.hex() == params["tunnelId"]["bytes_hex"]


def test_credentials_json_is_what_tunnel_create_writes() -> None:
    creds = Credentials("acct", bytes(range(32)), TUNNEL)
    text = credentials_json(creds)
    assert list(json.loads(text)) == ["AccountTag", "TunnelSecret", "TunnelID", "Endpoint"]
    assert json.loads(text)["TunnelSecret"] == base64.b64encode(bytes(range(32))).decode()
    assert parse_credentials_file(text, "x.json") == creds


def test_keys_are_case_insensitive_and_last_one_wins() -> None:
    text = (
        f'{{"accounttag": "first", "TUNNELSECRET": "AAEC", "tunnelId": "{TUNNEL}", "endpoint": "fed",'
        ' "AccountTag": "second", "Unknown": [1, 2], "Other": {"a": null}}'
    )
    creds = parse_credentials_file(text, "c.json")
    assert creds == Credentials("second", b"\x00\x01\x02", TUNNEL, "fed")
    swapped = '{"AccountTag": "exact", "ACCOUNTTAG": "folded", "TunnelSecret": ""}'
    assert parse_credentials_file(swapped, "c.json").account_tag == "folded"


def test_null_keeps_zero_values_and_missing_tunnel_id_is_nil() -> None:
    text = '{"AccountTag": "a", "TunnelSecret": "", "TunnelID": null, "Endpoint": null}'
    creds = parse_credentials_file(text, "c.json")
    assert creds == Credentials("a", b"", NIL_UUID, "")
    assert parse_credentials_file(text.encode(), "c.json") == creds  # bytes accepted too


def test_secret_with_line_breaks_is_accepted_like_go() -> None:
    text = json.dumps({"AccountTag": "a", "TunnelSecret": SECRET_B64[:20] + "\r\n" + SECRET_B64[20:]})
    assert parse_credentials_file(text, "c.json").tunnel_secret == base64.b64decode(SECRET_B64)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "not valid JSON.*line 1 column 2"),
        ("[]", "must be a JSON object, got an array"),
        ('"x"', "must be a JSON object, got a string"),
        ('{"AccountTag": 5, "TunnelSecret": ""}', "'AccountTag' must be a string, got a number"),
        ('{"AccountTag": "a", "TunnelSecret": true}', "'TunnelSecret' must be a string, got a boolean"),
        ('{"AccountTag": "a", "TunnelSecret": "AAE"}', "'TunnelSecret' is not standard base64"),
        ('{"AccountTag": "a", "TunnelSecret": "AA_-"}', "'TunnelSecret' is not standard base64"),
        ('{"AccountTag": "a", "TunnelSecret": "", "TunnelID": "nope"}', "'TunnelID' is not a UUID"),
        ('{"AccountTag": "a", "TunnelSecret": "", "TunnelID": 7}', "'TunnelID' must be a string"),
        (
            '{"AccountTag": "a", "TunnelSecret": "", "Endpoint": {}}',
            "'Endpoint' must be a string, got an object",
        ),
        ('{"TunnelSecret": ""}', "'AccountTag' is missing"),
        ('{"AccountTag": "a"}', "'TunnelSecret' is missing"),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_malformed_files_name_the_key_and_the_source(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_credentials_file(text, "/etc/tunnel/creds.json")
    assert info.value.source == "/etc/tunnel/creds.json"
    assert str(info.value).startswith("/etc/tunnel/creds.json: ")


def test_errors_never_show_the_secret() -> None:
    bad = "c2VjcmV0LXNlY3JldC1zZWNyZXQ"  # no padding
    with pytest.raises(ConfigError) as info:
        parse_credentials_file(json.dumps({"AccountTag": "a", "TunnelSecret": bad}), "c.json")
    assert bad not in str(info.value)
    creds = Credentials("a", b"topsecret", TUNNEL)
    assert "topsecret" not in repr(creds) and "9 bytes" in repr(creds)


# ------------------------------------------------------------------------------------------------
# Tokens


def test_protocol_example_token() -> None:
    text = (
        '{"a": "0123456789abcdef0123456789abcdef", "t": "11111111-2222-4333-8444-555555555555", '
        '"s": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}'
    )
    token = base64.b64encode(text.encode()).decode()
    creds = parse_token(token)
    assert creds == Credentials(
        "0123456789abcdef0123456789abcdef",
        bytes(range(32)),
        uuid.UUID("11111111-2222-4333-8444-555555555555"),
    )
    assert parse_token(token + "\n") == creds  # a token file's trailing newline


def test_make_token_is_gos_encoding() -> None:
    creds = Credentials("acct", bytes(range(4)), TUNNEL)
    decoded = base64.b64decode(make_token(creds), validate=True)
    assert decoded == b'{"a":"acct","s":"AAECAw==","t":"6ff42ae2-765d-4adf-8112-31c55c1551ef"}'
    fed = base64.b64decode(make_token(Credentials("acct", b"", TUNNEL, "fed")))
    assert json.loads(fed)["e"] == "fed"


TEXT = st.text(max_size=40)


@given(st.builds(Credentials, TEXT, st.binary(max_size=64), st.uuids(), TEXT))
def test_token_and_file_round_trip(creds: Credentials) -> None:
    assert parse_token(make_token(creds)) == creds
    assert parse_credentials_file(credentials_json(creds), "c.json") == creds


def test_token_keys_are_case_insensitive() -> None:
    token = base64.b64encode(json.dumps({"A": "x", "S": "AA==", "T": str(TUNNEL), "E": ""}).encode()).decode()
    assert parse_token(token) == Credentials("x", b"\x00", TUNNEL)


def _b64(value: object) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


@pytest.mark.parametrize(
    ("token", "match"),
    [
        ("not base64!", "not standard base64"),
        ("YWJj", "not valid JSON"),
        (base64.b64encode(b"\xff\xfe").decode(), "does not decode to JSON text"),
        (_b64([1]), "must be a JSON object"),
        (_b64({"a": "x", "s": "AA=="}), "'t' is missing"),
        (_b64({"a": "x", "t": str(TUNNEL)}), "'s' is missing"),
        (_b64({"s": "AA==", "t": str(TUNNEL)}), "'a' is missing"),
        (_b64({"a": "x", "s": "A", "t": str(TUNNEL)}), "'s' is not standard base64"),
        (_b64({"a": "x", "s": "AA==", "t": "11111111"}), "'t' is not a UUID"),
    ],
)
def test_malformed_tokens(token: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_token(token, source="--token")
    assert info.value.source == "--token"
    assert token not in str(info.value) or len(token) < 8

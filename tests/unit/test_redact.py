"""wire.redact: the lab's one redaction rule."""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from wire.redact import REDACTED, Redactor, redact_argv, redact_text

SECRET = base64.b64encode(bytes(range(32))).decode()
TOKEN = base64.b64encode(json.dumps({"a": "0123abcd", "t": "6ff42ae2-765d-4adf-8112-31c55c1551ef",
                                     "s": SECRET}).encode()).decode()


def test_secret_flags_in_a_command_line() -> None:
    argv = ["cloudflared", "tunnel", "run", "--token", TOKEN, '--credentials-contents={"x":1}', "--url", "u"]
    assert redact_argv(argv) == ["cloudflared", "tunnel", "run", "--token", REDACTED,
                                 f"--credentials-contents={REDACTED}", "--url", "u"]


def test_tokens_keys_and_bearer_credentials_anywhere_in_text() -> None:
    key = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\nabc\n-----END EC PRIVATE KEY-----"
    text = (f"start: run --token={TOKEN}\nkey:\n{key}\nAuthorization: Bearer abc.def-123\n"
            f'{{"TunnelSecret": "{SECRET}", "api_token": "zzzzzzzzzz"}}\n')
    out = redact_text(text)
    for leaked in (TOKEN, "MHcCAQEEIB", "abc.def-123", SECRET, "zzzzzzzzzz"):
        assert leaked not in out
    assert out.count(REDACTED) == 5
    assert "BEGIN CERTIFICATE" in redact_text("-----BEGIN CERTIFICATE-----\nMIIB\n")  # certificates stay


def test_registered_secrets_and_their_base64_forms() -> None:
    redactor = Redactor(["s3cr3t-api-token-value", "short"])
    wrapped = base64.b64encode(b"s3cr3t-api-token-value").decode()
    out = redactor.text(f"token s3cr3t-api-token-value, again {wrapped}, short stays")
    assert out == f"token {REDACTED}, again {REDACTED}, short stays"


def test_ordinary_text_is_left_alone() -> None:
    text = "GET /eyJhbGciOi HTTP/1.1 tunnel=6ff42ae2 connIndex=0 secret-handshake ok"
    assert redact_text(text) == text


def test_json_like_values() -> None:
    value = {"argv": ["--token", TOKEN], "secret": "abcdefgh", "nested": [{"msg": f"x {SECRET}"}], "n": 3}
    out = Redactor([SECRET]).value(value)
    assert out == {"argv": ["--token", REDACTED], "secret": REDACTED, "nested": [{"msg": f"x {REDACTED}"}],
                   "n": 3}


@given(st.text(min_size=8, max_size=40).filter(lambda s: s.strip() == s), st.text(max_size=40),
       st.text(max_size=40))
def test_a_registered_secret_never_survives(secret: str, before: str, after: str) -> None:
    assert secret not in Redactor([secret]).text(before + secret + after).replace(REDACTED, "\0")


def test_secret_like_words_inside_other_names_are_not_fields() -> None:
    text = "mytoken=abc tokens: 5 nosecret: x"
    assert redact_text(text) == text

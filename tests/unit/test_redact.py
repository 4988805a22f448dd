"""wire.redact: the lab's one redaction rule."""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire.redact import REDACTED, Redactor, redact_argv, redact_text

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


# A cloudflared token in URL-safe base64 (with "-" and "_"), whose unpadded form needs one "=".
URL_TOKEN = base64.urlsafe_b64encode(json.dumps({"a": "??cc>e", "s": "c2VjcmV0"}).encode()).decode()


def test_tokens_in_every_base64_spelling_are_redacted() -> None:
    assert "-" in URL_TOKEN and "_" in URL_TOKEN and URL_TOKEN.endswith("=") and not URL_TOKEN.endswith("==")
    for spelling in (URL_TOKEN, URL_TOKEN.rstrip("="), URL_TOKEN + "=", TOKEN.rstrip("=")):
        assert redact_text(f"token {spelling} end") == f"token {REDACTED} end", spelling


def test_base64_json_without_a_secret_or_not_base64_stays() -> None:
    plain = base64.b64encode(json.dumps({"a": "0123abcd", "t": "tunnel-id"}).encode()).decode()
    listed = base64.b64encode(json.dumps(["s", "TunnelSecret", "secret"]).encode()).decode()
    broken = "eyJ" + "A" * 18  # 21 characters: not base64 of anything
    not_json = base64.b64encode(b'{"s": unquoted}').decode()
    for text in (plain, listed, broken, not_json):
        assert redact_text(f"x {text} y") == f"x {text} y"


def test_a_secret_that_is_not_valid_text_is_redacted_in_its_base64_form() -> None:
    secret = b"\xff\xfe-not-utf8-secret".decode("utf-8", "surrogateescape")  # as os.fsdecode gives it
    encoded = base64.b64encode(b"\xff\xfe-not-utf8-secret").decode()
    assert Redactor([secret]).text(f"v={encoded}.") == f"v={REDACTED}."


def test_base64_forms_are_exactly_the_secrets() -> None:
    # "secretkeW" encodes to "c2VjcmV0a2VX" (no padding): the form is all of it, not a prefix
    redactor = Redactor(["secretkeW"])
    assert redactor.text("c2VjcmV0a2VX") == REDACTED
    assert redactor.text("c2VjcmV0a2VY") == "c2VjcmV0a2VY"
    # unpadded base64 of a secret whose padded form ends in "="
    bare = base64.b64encode(b"secret-8").decode().rstrip("=")
    assert Redactor(["secret-8"]).text(bare + "!") == f"{REDACTED}!"


def test_the_longest_secret_goes_first() -> None:
    # the shorter secret sorts after the longer one by text, and is inside it
    assert redact_text("key aazzzzzzzz.", ["zzzzzzzz", "aazzzzzzzz"]) == f"key {REDACTED}."


def test_a_secret_flag_value_may_hold_equals_signs() -> None:
    assert redact_argv([f"--token={TOKEN}"]) == [f"--token={REDACTED}"]
    assert redact_argv(["--token=abc=def"]) == [f"--token={REDACTED}"]

"""The lab's one redaction rule, for everything it writes: component logs, the runner's logs, operation
histories, reports and traces.

What counts as a secret: the value of a secret flag (`--token`, `--credentials-contents`), a PEM private
key block, a bearer credential (`Authorization: Bearer ...`), a JSON field named like a secret
(`TunnelSecret`, `api_token`, ...), a cloudflared tunnel token (base64 of a JSON object carrying a secret:
`{"a": ..., "t": ..., "s": SECRET}`), and every value registered with `Redactor.add` (the tunnel secrets
and the API token a run created), also in its base64 forms. Each becomes `<redacted>`.

Pure: no I/O (a shell reads and writes the files), no logging.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["REDACTED", "SECRET_FLAGS", "Redactor", "redact_argv", "redact_text"]

REDACTED = "<redacted>"
# cloudflared's flags whose value is a secret (a path to a secret, e.g. --credentials-file, is not).
SECRET_FLAGS = frozenset({"--token", "--credentials-contents"})
MIN_SECRET = 8  # shorter registered values would redact ordinary words

_PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)",
                          re.S)
_BEARER = re.compile(r"(?i)\b(bearer[ \t]+)[^\s\"',;]+")
_SECRET_FIELD = re.compile(
    r"""(?ix)(?<![a-z0-9_-])(["']?(?:tunnel_?secret|secret|api_?token|token|private_?key|password)["']?"""
    r"""\s*[:=]\s*["']?)"""
    r"""([^\s"',}]+)""")
_SECRET_KEY = re.compile(r"(?i)tunnel_?secret|secret|api_?token|token|private_?key|password")
# base64 (standard or URL-safe) of a JSON object: starts with `{"` = "eyJ"
_B64_JSON = re.compile(r"eyJ[A-Za-z0-9+/_-]{16,}={0,2}")
_TOKEN_SECRET_KEYS = ("s", "TunnelSecret", "secret")


def _is_token(candidate: str) -> bool:
    """A base64 JSON object with a secret field (a cloudflared tunnel token)."""
    padded = candidate + "=" * (-len(candidate) % 4)
    try:
        # not validating: a token with one "=" too many still carries its secret
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=False)
        doc = json.loads(raw)
    except (binascii.Error, ValueError):
        return False
    return isinstance(doc, dict) and any(k in doc for k in _TOKEN_SECRET_KEYS)


def _b64_forms(secret: str) -> set[str]:
    """The secret as it may appear encoded once more (base64 of its text, standard and URL-safe)."""
    raw = secret.encode("utf-8", "surrogateescape")
    forms = {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
    forms |= {f.rstrip("=") for f in forms}  # padded first (longest first), else the bare form
    return forms  # a secret has at least MIN_SECRET characters, so each form has at least 11


class Redactor:
    """The rule plus the secrets one run created; `text`, `argv` and `value` apply it."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        """Redact this value (and its base64 forms) from now on; values under MIN_SECRET are ignored."""
        secret = secret.strip()
        if len(secret) < MIN_SECRET:
            return
        self._secrets.add(secret)
        self._secrets |= _b64_forms(secret)

    def text(self, text: str) -> str:
        """`text` with every secret replaced by `<redacted>`."""
        text = _PRIVATE_KEY.sub(REDACTED, text)
        text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
        text = _SECRET_FIELD.sub(lambda m: m.group(1) + REDACTED, text)
        text = _B64_JSON.sub(lambda m: REDACTED if _is_token(m.group(0)) else m.group(0), text)
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def argv(self, argv: Sequence[str]) -> list[str]:
        """A command line as it may be shown: secret flags' values (`--token X`, `--token=X`) redacted."""
        out: list[str] = []
        for i, arg in enumerate(argv):
            name, eq, _ = arg.partition("=")
            if i and argv[i - 1] in SECRET_FLAGS:
                out.append(REDACTED)
            elif eq and name in SECRET_FLAGS:
                out.append(f"{name}={REDACTED}")
            else:
                out.append(self.text(arg))
        return out

    def value(self, value: Any) -> Any:
        """Every string in a JSON-like value (dicts, lists, tuples) redacted; keys named like secrets too."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: (REDACTED if isinstance(v, str) and _SECRET_KEY.fullmatch(str(k)) else self.value(v))
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`Redactor(secrets).text(text)`."""
    return Redactor(secrets).text(text)


def redact_argv(argv: Sequence[str], secrets: Iterable[str] = ()) -> list[str]:
    """`Redactor(secrets).argv(argv)`."""
    return Redactor(secrets).argv(argv)

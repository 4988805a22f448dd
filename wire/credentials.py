"""Tunnel credentials: the credentials file and the tunnel token (docs/protocol.md §10.1).

Decoding follows Go's `encoding/json` as cloudflared uses it: keys match case-insensitively (an exact
match wins), unknown keys are ignored, `null` leaves a field at its zero value, a repeated key's last
value wins, and a `[]byte` field is standard base64 with padding (line breaks ignored). Errors are
`ConfigError`s that name the key and the source, never the secret itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from typing import Any

from tunnel_lab.wire.errors import ConfigError

#: The nil UUID: what Go leaves in TunnelID when a credentials file has none (the command line's
#: tunnel UUID then takes its place).
NIL_UUID = uuid.UUID(int=0)

_FILE_KEYS = ("AccountTag", "TunnelSecret", "TunnelID", "Endpoint")
_TOKEN_KEYS = ("a", "s", "t", "e")


@dataclass(frozen=True)
class Credentials:
    """What a connector needs to authenticate a tunnel."""

    account_tag: str
    tunnel_secret: bytes
    tunnel_id: uuid.UUID
    endpoint: str = ""

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return (f"Credentials(account_tag={self.account_tag!r}, "
                f"tunnel_secret=<{len(self.tunnel_secret)} bytes>, "
                f"tunnel_id={self.tunnel_id}, endpoint={self.endpoint!r})")


class _Pairs(list[tuple[str, Any]]):
    """A JSON object's members in document order (so repeated keys behave as in Go)."""


def _go_fields(text: str | bytes, keys: tuple[str, ...], source: str, what: str) -> dict[str, Any]:
    """Parse a JSON object and map its members onto `keys` the way Go's decoder does."""
    try:
        pairs = json.loads(text, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError) as exc:
        detail = (f"line {exc.lineno} column {exc.colno}: {exc.msg}"
                  if isinstance(exc, json.JSONDecodeError) else "nested too deeply")
        raise ConfigError(f"{what} is not valid JSON ({detail})", source=source) from None
    if not isinstance(pairs, _Pairs):
        raise ConfigError(f"{what} must be a JSON object, got {_json_type(pairs)}", source=source)
    found: dict[str, Any] = {}
    for name, value in pairs:
        key = next((k for k in keys if k == name), None) or \
            next((k for k in keys if k.casefold() == name.casefold()), None)
        if key is None:
            continue  # Go ignores unknown keys
        if value is None:
            continue  # null leaves the zero value (or what an earlier key set)
        found[key] = value
    return found


def _string(found: dict[str, Any], key: str, source: str) -> str | None:
    value = found.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"key {key!r} must be a string, got {_json_type(value)}", source=source)
    return value


def _json_type(value: object) -> str:
    if isinstance(value, _Pairs):
        return "an object"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    return "null"


def _secret(found: dict[str, Any], key: str, source: str) -> bytes | None:
    value = _string(found, key, source)
    if value is None:
        return None
    try:
        return base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"key {key!r} is not standard base64 with padding", source=source,
                          hint="the secret is the base64 of its bytes: 44 characters for 32 bytes") from None


def _uuid(found: dict[str, Any], key: str, source: str) -> uuid.UUID | None:
    value = _string(found, key, source)
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ConfigError(f"key {key!r} is not a UUID: {value!r}", source=source) from None


def _required(value: Any, key: str, source: str) -> Any:
    if value is None:
        raise ConfigError(f"key {key!r} is missing", source=source)
    return value


def parse_credentials_file(text: str | bytes, source: str) -> Credentials:
    """Parse a credentials file (`AccountTag`, `TunnelSecret`, `TunnelID`, `Endpoint`).

    `AccountTag` and `TunnelSecret` are required; a missing `TunnelID` gives `NIL_UUID`, which the
    tunnel UUID on the command line replaces (as in cloudflared).
    """
    found = _go_fields(text, _FILE_KEYS, source, "credentials file")
    account_tag = _required(_string(found, "AccountTag", source), "AccountTag", source)
    secret = _required(_secret(found, "TunnelSecret", source), "TunnelSecret", source)
    tunnel_id = _uuid(found, "TunnelID", source)
    endpoint = _string(found, "Endpoint", source) or ""
    return Credentials(account_tag=account_tag, tunnel_secret=secret,
                       tunnel_id=tunnel_id if tunnel_id is not None else NIL_UUID, endpoint=endpoint)


def credentials_json(creds: Credentials) -> str:
    """The credentials file `tunnel create` writes: the four keys in Go's order, compact."""
    return json.dumps({"AccountTag": creds.account_tag,
                       "TunnelSecret": base64.b64encode(creds.tunnel_secret).decode("ascii"),
                       "TunnelID": str(creds.tunnel_id),
                       "Endpoint": creds.endpoint}, separators=(",", ":"), ensure_ascii=False)


def parse_token(token: str, *, source: str = "token") -> Credentials:
    """Parse a tunnel token: standard base64 of JSON {"a": tag, "s": base64 secret, "t": uuid, "e"?}.

    Surrounding whitespace (a token file's newline) is ignored; all of `a`, `s` and `t` are required.
    """
    compact = token.strip()
    try:
        raw = base64.b64decode(compact.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("the tunnel token is not standard base64", source=source,
                          hint="pass the token exactly as `tunnel token` printed it") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("the tunnel token does not decode to JSON text", source=source) from None
    found = _go_fields(text, _TOKEN_KEYS, source, "the tunnel token")
    return Credentials(account_tag=_required(_string(found, "a", source), "a", source),
                       tunnel_secret=_required(_secret(found, "s", source), "s", source),
                       tunnel_id=_required(_uuid(found, "t", source), "t", source),
                       endpoint=_string(found, "e", source) or "")


def make_token(creds: Credentials) -> str:
    """The token for `creds`, as Go marshals it (keys a, s, t, then e only when set)."""
    fields: dict[str, str] = {"a": creds.account_tag,
                              "s": base64.b64encode(creds.tunnel_secret).decode("ascii"),
                              "t": str(creds.tunnel_id)}
    if creds.endpoint:
        fields["e"] = creds.endpoint
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
    return base64.b64encode(text.encode("utf-8")).decode("ascii")

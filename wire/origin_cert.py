"""The origin certificate (`cert.pem`) that `tunnel login` saves: decoding and encoding, no I/O.

The file holds PEM blocks; the one of type `ARGO TUNNEL TOKEN` carries JSON
`{"zoneID", "accountID", "apiToken"[, "endpoint"]}` (cloudflared's credentials.OriginCert). Blocks of
type `PRIVATE KEY` and `CERTIFICATE` (old-style certificates) are skipped; any other type, a second
token, or a token without `zoneID` or `apiToken` is refused with cloudflared's words.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from tunnel_lab.wire.errors import ConfigError

PEM_TYPE = "ARGO TUNNEL TOKEN"
_BLOCK = re.compile(rb"-----BEGIN ([^-\r\n]*)-----\r?\n(.*?)-----END \1-----", re.S)


@dataclass(frozen=True)
class OriginCert:
    """What the admin commands need to call the API: the zone, the account and the API token."""

    zone_id: str
    account_id: str
    api_token: str
    endpoint: str = ""

    def __repr__(self) -> str:  # the API token never reaches a log or a traceback
        return f"OriginCert(zone_id={self.zone_id!r}, account_id={self.account_id!r}, api_token=<hidden>)"


def decode_origin_cert(data: bytes, *, source: str = "cert.pem") -> OriginCert:
    """Parse cert.pem bytes as cloudflared's decodeOriginCert does; errors are ConfigErrors."""
    if not data:
        raise ConfigError("cannot decode empty certificate", source=source)
    found: OriginCert | None = None
    for match in _BLOCK.finditer(data):
        kind = match.group(1).decode("latin-1")
        if kind in ("PRIVATE KEY", "CERTIFICATE"):
            continue
        if kind != PEM_TYPE:
            raise ConfigError(f"unknown block {kind} in the certificate", source=source)
        if found is not None and (found.zone_id or found.api_token):
            raise ConfigError("found multiple tokens in the certificate", source=source)
        found = _token(match.group(2))
    if found is None or not found.zone_id or not found.api_token:
        raise ConfigError("missing token in the certificate", source=source,
                          hint="run `tunnel login` again to get a new cert.pem")
    return found


def _token(body: bytes) -> OriginCert:
    # Go ignores a token whose JSON does not parse (the zone and token then stay empty).
    try:
        raw = base64.b64decode(b"".join(body.split()), validate=True)
        doc = json.loads(raw)
    except (binascii.Error, ValueError):
        return OriginCert("", "", "")
    if not isinstance(doc, dict):
        return OriginCert("", "", "")

    def text(key: str) -> str:
        value = doc.get(key)
        return value if isinstance(value, str) else ""

    return OriginCert(zone_id=text("zoneID"), account_id=text("accountID"), api_token=text("apiToken"),
                      endpoint=text("endpoint").lower())


def encode_origin_cert(cert: OriginCert) -> bytes:
    """The PEM bytes as Go's `pem.Encode` writes them (64-character lines; `endpoint` only when set)."""
    fields = {"zoneID": cert.zone_id, "accountID": cert.account_id, "apiToken": cert.api_token}
    if cert.endpoint:
        fields["endpoint"] = cert.endpoint
    b64 = base64.b64encode(json.dumps(fields, separators=(",", ":")).encode()).decode("ascii")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return (f"-----BEGIN {PEM_TYPE}-----\n" + "\n".join(lines) + f"\n-----END {PEM_TYPE}-----\n").encode()

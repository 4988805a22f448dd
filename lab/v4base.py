"""The v4 API's common parts: the envelope and its errors, requests and answers, paging, and the lab
account's API tokens and zone (`STATE/v4api.json`). `lab.v4api` (tunnels and DNS routes),
`lab.v4teamnet` (private-network routes) and `lab.quicktunnel` build on it. No I/O beyond that file.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnel_lab.lab.store import format_time
from tunnel_lab.wire.errors import ConfigError, TunnelLabError

PREFIX = "/client/v4"
ACCOUNTS_FILE = "v4api.json"
DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 1000
MIN_SECRET_BYTES = 32
MAX_BODY = 64 * 1024
_TOKEN_PREFIX = "lab-"


class V4ApiError(TunnelLabError):
    """An answer other than success: HTTP status and the envelope's errors."""

    def __init__(self, status: int, code: int, message: str,
                 chain: Sequence[tuple[int, str]] = ()) -> None:
        super().__init__(f"{status} code {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.chain = tuple(chain)

    def envelope(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.chain:
            error["error_chain"] = [{"code": c, "message": m} for c, m in self.chain]
        return {"success": False, "errors": [error], "messages": [], "result": None}


def not_authenticated() -> V4ApiError:
    """The real API's answer to a token it does not know or that has no access."""
    return V4ApiError(403, 10000, "Authentication error")


def no_route(path: str) -> V4ApiError:
    """The real API's answer to a path it has no endpoint for (or a malformed identifier in it)."""
    return V4ApiError(400, 7003, f"Could not route to {path}, perhaps your object identifier is invalid?",
                      [(7000, "No route for that URI")])


# --- accounts and tokens: STATE/v4api.json ------------------------------------------------------------------

@dataclass(frozen=True)
class Accounts:
    """The lab zone's tag and the SHA-256 of every API token issued (tokens themselves are not kept)."""

    zone_tag: str
    token_hashes: frozenset[str]

    def knows(self, token: str) -> bool:
        digest = _token_hash(token)
        # compare_digest for every entry: the answer time says nothing about which hash matched.
        return any([hmac.compare_digest(digest, known) for known in self.token_hashes])


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@contextmanager
def locked_accounts(state: Path) -> Iterator[Path]:
    path = state / ACCOUNTS_FILE
    with open(state / (ACCOUNTS_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield path


def read_accounts(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the lab's API accounts: {exc}", source=str(path),
                          hint="delete it to start over (every cert.pem made so far stops working)") from exc
    if not isinstance(data, dict):
        raise ConfigError("the lab's API accounts file is not a JSON object", source=str(path))
    return data


def write_accounts(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def load_accounts(state: Path) -> Accounts:
    """The zone tag (created on first use) and the known token hashes of the state directory."""
    with locked_accounts(state) as path:
        data = read_accounts(path)
        if not isinstance(data.get("zone_tag"), str):
            data["zone_tag"] = secrets.token_hex(16)
            data.setdefault("tokens", {})
            write_accounts(path, data)
    tokens = data.get("tokens")
    return Accounts(zone_tag=data["zone_tag"],
                    token_hashes=frozenset(tokens) if isinstance(tokens, dict) else frozenset())


def mint_token(state: Path) -> str:
    """A new API token for the lab account (what `tunnel login` puts in cert.pem)."""
    load_accounts(state)
    token = _TOKEN_PREFIX + secrets.token_urlsafe(30)
    with locked_accounts(state) as path:
        data = read_accounts(path)
        tokens = data.setdefault("tokens", {})
        tokens[_token_hash(token)] = format_time(datetime.datetime.now(datetime.UTC))
        write_accounts(path, data)
    return token


# --- requests and the live connections ---------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ApiRequest:
    method: str
    target: str  # path and query, as on the request line
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""


@dataclass(frozen=True, kw_only=True)
class ApiResponse:
    """An answer; `disconnect` names edge connections the shell must drop before sending it (cleanup);
    `push` is a remote configuration the shell has the edge push to the tunnel's connectors
    (`{"tunnel_id", "version", "config"}`)."""

    status: int
    body: dict[str, Any]
    disconnect: tuple[str, ...] = ()
    push: dict[str, Any] | None = None

    def encode(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode() + b"\n"



def success(result: Any, info: dict[str, int] | None = None) -> ApiResponse:
    """A success envelope around `result` (`info`: the list's result_info)."""
    body: dict[str, Any] = {"success": True, "errors": [], "messages": [], "result": result}
    if info is not None:
        body["result_info"] = info
    return ApiResponse(status=200, body=body)


def query_value(query: Mapping[str, list[str]], key: str) -> str | None:
    """The last value of a query parameter (cloudflared sends each once)."""
    values = query.get(key)
    return values[-1] if values else None


def existed_at(query: Mapping[str, list[str]]) -> datetime.datetime | None:
    """The `existed_at` filter as an aware time, or None."""
    text = query_value(query, "existed_at")
    if text is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise V4ApiError(400, 1001, "existed_at must be an RFC 3339 time") from None  # lab
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def paged(query: Mapping[str, list[str]], items: Sequence[Any]) -> ApiResponse:
    """One page of `items` by `page` and `per_page`, with `result_info`; past the end: an empty page,
    as the real API answers."""

    def integer(key: str, default: int, high: int) -> int:
        text = query_value(query, key)
        if text is None:
            return default
        if not text.isdigit() or not 1 <= int(text) <= high:
            raise V4ApiError(400, 1001, f"{key} must be an integer from 1 to {high}")  # lab
        return int(text)

    page = integer("page", 1, 1 << 30)
    per_page = integer("per_page", DEFAULT_PER_PAGE, MAX_PER_PAGE)
    start = (page - 1) * per_page
    shown = list(items[start:start + per_page])
    info = {"page": page, "per_page": per_page, "count": len(shown), "total_count": len(items)}
    return success(shown, info)

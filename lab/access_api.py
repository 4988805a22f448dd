"""The Access part of the v4-shaped API: `/accounts/{account}/access/...`, answered in the v4 envelope
(`{"success", "errors", "messages", "result"}`).

| Method and path (under `/accounts/{account}/access`) | What |
|---|---|
| `GET/POST apps`, `GET/PUT/DELETE apps/{id}` | applications (`id` or `aud` names one) |
| `GET/POST apps/{id}/policies`, `GET/PUT/DELETE apps/{id}/policies/{pid}` | an application's policies |
| `GET/POST service_tokens`, `DELETE service_tokens/{id}` | service tokens (secret only in the POST answer) |
| `GET/PUT organizations` | the team's `auth_domain` (`<team>.cloudflareaccess.com`) |
| `GET keys`, `POST keys/rotate` | the signing keys' ids / a new signing key |
| `GET login_codes` | lab only: the one-time login codes waiting to be typed (see `edge.access`) |

No I/O beyond the store; the management API (and a v4 server) mount `handle`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tunnel_lab.lab.access_store import AccessStore, NotFound
from tunnel_lab.wire.errors import ConfigError

ERROR_CODE = 12130  # the real API's generic "access.api.error.invalid_request"
NOT_FOUND_CODE = 12132


def envelope(result: Any) -> dict[str, Any]:
    return {"success": True, "errors": [], "messages": [], "result": result}


def failure(code: int, message: str) -> dict[str, Any]:
    return {"success": False, "errors": [{"code": code, "message": message}], "messages": [], "result": None}


def _body(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"body is not JSON: {exc}", source="access") from None


def handle(access: AccessStore, account: str, method: str, parts: list[str], raw: bytes,
           login_codes: Callable[[], list[dict[str, Any]]] | None = None) -> tuple[int, dict[str, Any]]:
    """One request; `parts` are the path segments after `/accounts/{account}/access/`."""
    if account != access.store.account_tag:
        return 404, failure(NOT_FOUND_CODE,
                            f"no account {account!r} (the lab's is {access.store.account_tag})")
    try:
        return 200, envelope(_dispatch(access, method, parts, raw, login_codes))
    except NotFound as exc:
        return 404, failure(NOT_FOUND_CODE, exc.message)
    except ConfigError as exc:
        return 400, failure(ERROR_CODE, exc.message)


def _dispatch(access: AccessStore, method: str, parts: list[str], raw: bytes,
              login_codes: Callable[[], list[dict[str, Any]]] | None) -> Any:
    n = len(parts)
    head = parts[0] if parts else ""
    if head == "apps":
        if n == 1 and method == "GET":
            return [a.body for a in access.apps()]
        if n == 1 and method == "POST":
            return access.create_app(_body(raw))
        if n == 2 and method == "GET":
            return access.get_app(parts[1]).body
        if n == 2 and method == "PUT":
            return access.update_app(parts[1], _body(raw))
        if n == 2 and method == "DELETE":
            return access.delete_app(parts[1])
        if n >= 3 and parts[2] == "policies":
            if n == 3 and method == "GET":
                return access.get_app(parts[1]).body.get("policies", [])
            if n == 3 and method == "POST":
                return access.add_policy(parts[1], _body(raw))
            if n == 4 and method == "GET":
                for policy in access.get_app(parts[1]).body.get("policies", []):
                    if policy.get("id") == parts[3]:
                        return policy
                raise NotFound(f"no policy {parts[3]!r}", source="access")
            if n == 4 and method == "PUT":
                return access.replace_policy(parts[1], parts[3], _body(raw))
            if n == 4 and method == "DELETE":
                return access.delete_policy(parts[1], parts[3])
    elif head == "service_tokens":
        if n == 1 and method == "GET":
            return access.service_tokens()
        if n == 1 and method == "POST":
            return access.create_service_token(_body(raw))
        if n == 2 and method == "DELETE":
            return access.delete_service_token(parts[1])
    elif head == "organizations" and n == 1:
        if method == "PUT":
            body = _body(raw)
            access.set_auth_domain(body.get("auth_domain") if isinstance(body, dict) else None)
        if method in ("GET", "PUT"):
            return {"auth_domain": access.auth_domain, "name": access.auth_domain.split(".")[0]}
    elif head == "keys":
        if n == 1 and method == "GET":
            return {"keys": [k.kid for k in access.signing_keys()]}
        if n == 2 and parts[1] == "rotate" and method == "POST":
            return {"kid": access.rotate_keys()}
    elif head == "login_codes" and n == 1 and method == "GET":
        return login_codes() if login_codes is not None else []
    raise NotFound(f"no route {method} /access/{'/'.join(parts)}", source="access")

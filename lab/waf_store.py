"""WAF rulesets in the lab's store (`STATE/state.db`), and their v4-shaped API.

Two phases, as Cloudflare's Rulesets API names them, each one ruleset (the zone's entry point):
`http_request_firewall_custom` (custom rules: `wire.waf.parse_rules`) and `http_ratelimit`
(rate-limiting rules: `wire.waf.parse_rate_rules`). Kept as JSON in the store's `meta` table; a PUT is
validated whole and replaces the phase's rules in one transaction (a malformed ruleset changes nothing).

| Method and path | What |
|---|---|
| `GET/PUT /zones/{zone}/rulesets/phases/{phase}/entrypoint` | the phase's rules (`{"rules": [...]}`) |

Errors use the v4 envelope with code 20021 (lab) and status 400; an unknown phase is 404.
"""

from __future__ import annotations

import json
from typing import Any

from tunnel_lab.lab.store import Store
from tunnel_lab.wire import waf

PHASES = {"http_request_firewall_custom": waf.parse_rules, "http_ratelimit": waf.parse_rate_rules}
ERROR_CODE = 20021  # lab


class WafStore:
    """The two phases' rules in one `Store`, parsed once per store version."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: tuple[int, list[waf.Rule], list[waf.RateRule]] = (-1, [], [])

    def raw(self, phase: str) -> list[dict[str, Any]]:
        rows = self.store._query("SELECT value FROM meta WHERE key = ?", (f"waf:{phase}",))
        rules: list[dict[str, Any]] = json.loads(rows[0][0]) if rows else []
        return rules

    def put(self, phase: str, body: Any) -> list[dict[str, Any]]:
        """Replace a phase's rules (validated whole first); returns them with their ids."""
        items = body.get("rules") if isinstance(body, dict) else body
        PHASES[phase](items)  # raises WafError naming the rule
        assert isinstance(items, list)  # what the parser accepted
        rules = [{**r, "id": str(r.get("id") or f"rule{i + 1}")} for i, r in enumerate(items)]
        with self.store._write() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                       (f"waf:{phase}", json.dumps(rules)))
        return rules

    def rules(self) -> tuple[list[waf.Rule], list[waf.RateRule]]:
        """The parsed custom and rate-limiting rules (re-read when the store changed)."""
        version = self.store.version()
        if self._cache[0] != version:
            self._cache = (version, waf.parse_rules(self.raw("http_request_firewall_custom")),
                           waf.parse_rate_rules(self.raw("http_ratelimit")))
        return self._cache[1], self._cache[2]


def handle(waf_store: WafStore, method: str, parts: list[str], body: bytes) -> tuple[int, dict[str, Any]]:
    """`parts`: the path after `/zones/{zone}/`; (status, v4 envelope)."""
    if len(parts) != 4 or parts[0] != "rulesets" or parts[1] != "phases" or parts[3] != "entrypoint":
        return 404, _failure(404, "no such route: /zones/{zone}/rulesets/phases/{phase}/entrypoint")
    phase = parts[2]
    if phase not in PHASES:
        return 404, _failure(404, f"unknown phase {phase!r} (the lab has {', '.join(PHASES)})")
    if method == "GET":
        return 200, _envelope(phase, waf_store.raw(phase))
    if method != "PUT":
        return 405, _failure(405, f"{method} is not allowed here (GET, PUT)")
    try:
        parsed = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        return 400, _failure(400, f"the body is not JSON: {exc}")
    try:
        rules = waf_store.put(phase, parsed)
    except waf.WafError as exc:
        return 400, _failure(400, f"{phase}: {exc}")
    return 200, _envelope(phase, rules)


def _envelope(phase: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"success": True, "errors": [], "messages": [],
            "result": {"id": phase, "kind": "zone", "phase": phase, "rules": rules}}


def _failure(status: int, message: str) -> dict[str, Any]:
    return {"success": False, "errors": [{"code": ERROR_CODE, "message": message}], "messages": [],
            "result": None}

"""Access applications, policies and rules: validation of the v4 API's JSON shapes and the decision.

Shapes (as Cloudflare's v4 API names them, reduced to what the lab honours):

- application: `{"name", "domain": "host" or "host/path-prefix", "type": "self_hosted", "policies": [...]}`;
  the lab assigns `id` and `aud` (a 64-hex-digit tag);
- policy: `{"name", "decision": "allow"|"deny"|"bypass"|"non_identity", "include": [rule...],
  "exclude": [rule...], "require": [rule...], "precedence": int}` (`non_identity` is "service auth");
- rule: one of `{"email": {"email": E}}`, `{"email_domain": {"domain": D}}`, `{"ip": {"ip": CIDR}}`,
  `{"service_token": {"token_id": ID}}`, `{"any_valid_service_token": {}}`, `{"everyone": {}}`.

A policy matches when any `include` rule, every `require` rule and no `exclude` rule matches. The
decision follows Cloudflare's order: bypass first, then service auth, then deny, then allow (each by
precedence); nothing matching means deny.

Pure: no I/O, no logging.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunnel_lab.wire.errors import ConfigError

__all__ = ["DECISIONS", "Identity", "Policy", "decide", "parse_app", "parse_policy"]

DECISIONS = ("bypass", "non_identity", "deny", "allow")  # evaluation order
RULE_KINDS = ("email", "email_domain", "ip", "service_token", "any_valid_service_token", "everyone")
MAX_RULES = 100


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Who is asking: the client's address, and what its credentials proved (if anything)."""

    ip: str
    email: str | None = None
    service_token_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class Policy:
    """A validated policy (the JSON kept beside it is what the API returns)."""

    name: str
    decision: str
    include: tuple[Mapping[str, Any], ...]
    exclude: tuple[Mapping[str, Any], ...]
    require: tuple[Mapping[str, Any], ...]
    precedence: int

    def matches(self, who: Identity) -> bool:
        """include any, require all, exclude none."""
        return (any(rule_matches(r, who) for r in self.include)
                and all(rule_matches(r, who) for r in self.require)
                and not any(rule_matches(r, who) for r in self.exclude))


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}", source="access")


def _check_rule(rule: Any, where: str) -> dict[str, Any]:
    if not isinstance(rule, dict) or len(rule) != 1:
        raise _fail(where, f"a rule is an object with exactly one of {', '.join(RULE_KINDS)}")
    ((kind, body),) = rule.items()
    if kind not in RULE_KINDS:
        raise _fail(where, f"unknown rule {kind!r}; known: {', '.join(RULE_KINDS)}")
    if not isinstance(body, dict):
        raise _fail(f"{where}.{kind}", "must be an object")

    def text(field: str) -> str:
        value = body.get(field)
        if not isinstance(value, str) or not value.strip():
            raise _fail(f"{where}.{kind}.{field}", "must be a non-empty string")
        return value.strip()

    if kind == "email":
        email = text("email")
        if email.count("@") != 1 or not all(email.split("@")):
            raise _fail(f"{where}.email.email", f"{email!r} is not an email address")
        return {kind: {"email": email.lower()}}
    if kind == "email_domain":
        domain = text("domain").lstrip("@").lower()
        if "@" in domain or "." not in domain:
            raise _fail(f"{where}.email_domain.domain", f"{domain!r} is not a domain")
        return {kind: {"domain": domain}}
    if kind == "ip":
        cidr = text("ip")
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise _fail(f"{where}.ip.ip", f"{cidr!r} is not an IP address or CIDR range") from None
        return {kind: {"ip": cidr}}
    if kind == "service_token":
        return {kind: {"token_id": text("token_id")}}
    if body:
        raise _fail(f"{where}.{kind}", "takes no fields ({})")
    return {kind: {}}


def parse_policy(body: Any, where: str = "policy") -> tuple[Policy, dict[str, Any]]:
    """Validate a policy; returns it and its normalised JSON. `ConfigError` names the rule at fault."""
    if not isinstance(body, dict):
        raise _fail(where, "must be an object")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(f"{where}.name", "must be a non-empty string")
    where = f"{where} {name!r}"
    decision = body.get("decision")
    if decision not in DECISIONS:
        raise _fail(f"{where}.decision", f"{decision!r} is not one of {', '.join(DECISIONS)}")
    precedence = body.get("precedence", 1)
    if isinstance(precedence, bool) or not isinstance(precedence, int):
        raise _fail(f"{where}.precedence", "must be an integer")
    lists: dict[str, list[dict[str, Any]]] = {}
    for part in ("include", "exclude", "require"):
        rules = body.get(part, [])
        if not isinstance(rules, list) or len(rules) > MAX_RULES:
            raise _fail(f"{where}.{part}", f"must be a list of at most {MAX_RULES} rules")
        lists[part] = [_check_rule(r, f"{where}.{part}[{i}]") for i, r in enumerate(rules)]
    if not lists["include"]:
        raise _fail(f"{where}.include", "needs at least one rule (use {\"everyone\": {}} for everyone)")
    unknown = set(body) - {"id", "name", "decision", "precedence", "include", "exclude", "require",
                           "created_at", "updated_at"}
    if unknown:
        raise _fail(where, f"unknown field(s) {', '.join(sorted(unknown))}")
    normalised = {"name": name.strip(), "decision": decision, "precedence": precedence, **lists}
    policy = Policy(name=name.strip(), decision=decision, precedence=precedence,
                    include=tuple(lists["include"]), exclude=tuple(lists["exclude"]),
                    require=tuple(lists["require"]))
    return policy, normalised


def split_domain(domain: str) -> tuple[str, str]:
    """`host/path` -> (host, "/path"); a bare host protects every path ("/")."""
    host, slash, path = domain.strip().partition("/")
    return host.lower().rstrip("."), "/" + path.strip("/") if slash and path.strip("/") else "/"


def parse_app(body: Any) -> tuple[str, str, list[Policy], dict[str, Any]]:
    """Validate an application: (host, path prefix, policies, normalised JSON without id/aud)."""
    if not isinstance(body, dict):
        raise _fail("application", "must be an object")
    name = body.get("name")
    domain = body.get("domain")
    if not isinstance(name, str) or not name.strip():
        raise _fail("application.name", "must be a non-empty string")
    if not isinstance(domain, str) or not domain.strip():
        raise _fail(f"application {name!r}.domain", "must be a hostname, optionally with a /path")
    kind = body.get("type", "self_hosted")
    if kind != "self_hosted":
        raise _fail(f"application {name!r}.type", f"{kind!r}: the lab has self_hosted applications only")
    host, path = split_domain(domain)
    raw_policies = body.get("policies", [])
    if not isinstance(raw_policies, list):
        raise _fail(f"application {name!r}.policies", "must be a list")
    parsed = [parse_policy(p, f"application {name!r} policies[{i}]") for i, p in enumerate(raw_policies)]
    session = body.get("session_duration", "24h")
    if not isinstance(session, str) or parse_duration(session) is None:
        raise _fail(f"application {name!r}.session_duration",
                    f"{session!r} is not a duration like 30m or 24h")
    normalised = {"name": name.strip(), "domain": host + (path if path != "/" else ""), "type": kind,
                  "session_duration": session, "policies": [j for _, j in parsed]}
    return host, path, [p for p, _ in parsed], normalised


def parse_duration(text: str) -> float | None:
    """`30s`, `15m`, `24h` -> seconds; None when not such a value."""
    units = {"s": 1, "m": 60, "h": 3600}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        return None
    seconds = int(text[:-1]) * units[text[-1]]
    return float(seconds) if 0 < seconds <= 30 * 24 * 3600 else None


def rule_matches(rule: Mapping[str, Any], who: Identity) -> bool:
    """One validated rule against an identity."""
    ((kind, body),) = rule.items()
    if kind == "everyone":
        return True
    if kind == "email":
        return who.email is not None and who.email.lower() == body["email"]
    if kind == "email_domain":
        return who.email is not None and who.email.lower().rpartition("@")[2] == body["domain"]
    if kind == "ip":
        try:
            return ipaddress.ip_address(who.ip) in ipaddress.ip_network(body["ip"], strict=False)
        except ValueError:
            return False
    if kind == "service_token":
        return who.service_token_id == body["token_id"]
    return kind == "any_valid_service_token" and who.service_token_id is not None


def decide(policies: Sequence[Policy], who: Identity) -> tuple[str, Policy | None]:
    """The first matching policy in Cloudflare's order; ("deny", None) when none matches.

    Which decisions apply depends on what the credentials proved: an anonymous client meets only bypass
    policies (anything else needs a login), a service token bypass and service auth, a user (email)
    bypass, deny and allow.
    """
    if who.service_token_id is not None:
        order: tuple[str, ...] = ("bypass", "non_identity")
    elif who.email is not None:
        order = ("bypass", "deny", "allow")
    else:
        order = ("bypass",)
    for decision in order:
        for policy in sorted((p for p in policies if p.decision == decision), key=lambda p: p.precedence):
            if policy.matches(who):
                return decision, policy
    return "deny", None

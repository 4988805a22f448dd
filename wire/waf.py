"""WAF custom rules and rate limiting, lab-sized (issue 13 item 4): a subset of Cloudflare's rules language.

An expression is a comparison of a **field** with a value, combined with `and`/`&&`, `or`/`||`,
`not`/`!` and parentheses:

| field | the request's |
|---|---|
| `http.host` | host (without port, lower case) |
| `http.request.method` | method |
| `http.request.uri` | path and query |
| `http.request.uri.path` | path |
| `http.request.uri.query` | query (without `?`) |
| `http.user_agent` | `User-Agent` |
| `http.request.headers["name"]` | the named header (name case-insensitive; first value) |
| `ip.src` | client address |

Operators: `eq`/`==`, `ne`/`!=`, `contains`, `matches`/`~` (a regular expression, Python syntax), `in
{"a" "b"}` (for `ip.src`: addresses and CIDR ranges), and a bare field (true when not empty). Strings are
double-quoted with `\\"` and `\\\\` escapes.

Rules are `{id, description, expression, action: block|log|skip, enabled}`: the first enabled rule that
matches decides (`skip` lets the request past the remaining custom rules; `log` only records the hit and
goes on). Rate-limiting rules are `{id, description, expression, characteristics: ["ip.src"] or a header
field, period, requests_per_period, mitigation_timeout}`: a fixed window of `period` seconds per value of
the characteristics; past `requests_per_period` the key is blocked for `mitigation_timeout` seconds
(default: the period), after which the client starts a fresh window. Errors name the rule and what is
wrong; a ruleset is checked whole.

Pure: no I/O, no clock (callers pass `now`), no logging.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunnel_lab.wire.errors import ConfigError

FIELDS = ("http.host", "http.request.method", "http.request.uri", "http.request.uri.path",
          "http.request.uri.query", "http.user_agent", "ip.src")
ACTIONS = ("block", "log", "skip")
MAX_EXPRESSION = 4096
MAX_RULES = 100
MAX_KEYS = 10000


class WafError(ConfigError):
    """A malformed expression, rule or ruleset (the message names the rule and what is wrong)."""


@dataclass(frozen=True)
class Request:
    """What the rules look at."""

    host: str
    method: str
    path: str
    query: str
    headers: Mapping[str, str]  # lower-case names
    ip: str

    def value(self, name: str) -> str:
        if name.startswith("header:"):
            return self.headers.get(name[len("header:"):], "")
        return {"http.host": self.host, "http.request.method": self.method,
                "http.request.uri": self.path + (f"?{self.query}" if self.query else ""),
                "http.request.uri.path": self.path, "http.request.uri.query": self.query,
                "http.user_agent": self.headers.get("user-agent", ""), "ip.src": self.ip}[name]


# --- expressions ----------------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>==|!=|&&|\|\||[!~(){}])'
                    r'|(?P<word>[A-Za-z_][A-Za-z0-9_.]*(?:\["(?:[^"\\]|\\.)*"\])?)|(?P<addr>[0-9a-fA-F:./]+))')


@dataclass(frozen=True)
class Cmp:
    field: str
    op: str  # eq ne contains matches in present
    value: Any = None


@dataclass(frozen=True)
class Not:
    inner: Node


@dataclass(frozen=True)
class Bool:
    op: str  # and / or
    parts: tuple[Node, ...]


Node = Cmp | Not | Bool


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def _tokens(expression: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(expression):
        if expression[pos:].strip() == "":
            break
        m = _TOKEN.match(expression, pos)
        if m is None or m.end() == pos:
            at = len(expression) - len(expression[pos:].lstrip())
            raise WafError(f"unexpected {expression[at:at + 20]!r} at character {at}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, expression: str) -> None:
        if len(expression) > MAX_EXPRESSION:
            raise WafError(f"the expression is {len(expression)} characters; at most {MAX_EXPRESSION}")
        self.tokens = _tokens(expression)
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise WafError("the expression ends too early")
        self.i += 1
        return token

    def parse(self) -> Node:
        node = self.disjunction()
        if self.peek() is not None:
            _, text, pos = self.peek()  # type: ignore[misc]
            raise WafError(f"unexpected {text!r} at character {pos}")
        return node

    def disjunction(self) -> Node:
        return self._chain("or", ("or", "||"), self.conjunction)

    def conjunction(self) -> Node:
        return self._chain("and", ("and", "&&"), self.negation)

    def _chain(self, op: str, words: tuple[str, ...], operand: Callable[[], Node]) -> Node:
        """Operands joined by one of `words`: a single operand stands alone, more make one `Bool(op)`."""
        parts = [operand()]
        while (t := self.peek()) is not None and t[1] in words:
            self.take()
            parts.append(operand())
        return parts[0] if len(parts) == 1 else Bool(op, tuple(parts))

    def negation(self) -> Node:
        t = self.peek()
        if t is not None and t[1] in ("not", "!"):
            self.take()
            return Not(self.negation())
        if t is not None and t[1] == "(":
            self.take()
            node = self.disjunction()
            if self.take()[1] != ")":
                raise WafError(f"a '(' at character {t[2]} is not closed")
            return node
        return self.comparison()

    def comparison(self) -> Node:
        kind, text, pos = self.take()
        name = _field(kind, text, pos)
        t = self.peek()
        if t is None or t[1] in ("and", "&&", "or", "||", ")"):
            return Cmp(name, "present")
        op = {"eq": "eq", "==": "eq", "ne": "ne", "!=": "ne", "contains": "contains", "matches": "matches",
              "~": "matches", "in": "in"}.get(self.take()[1])
        if op is None:
            raise WafError(f"{t[1]!r} at character {t[2]} is not an operator (eq, ne, contains, matches, in)")
        if op == "in":
            return Cmp(name, "in", self.value_set(name))
        kind, text, pos = self.take()
        if kind != "str":
            raise WafError(f"{name} {op} needs a quoted string, not {text!r} (character {pos})")
        value = _unquote(text)
        if op == "matches":
            try:
                return Cmp(name, op, re.compile(value))
            except re.error as exc:
                raise WafError(f"{value!r} (character {pos}) is not a regular expression: {exc}") from None
        return Cmp(name, op, value)

    def value_set(self, name: str) -> tuple[Any, ...]:
        kind, text, pos = self.take()
        if text != "{":
            raise WafError(f"'in' needs a set {{...}} at character {pos}")
        values: list[Any] = []
        while (t := self.take())[1] != "}":
            kind, text, pos = t
            if name == "ip.src":
                raw = _unquote(text) if kind == "str" else text
                try:
                    values.append(ipaddress.ip_network(raw, strict=False))
                except ValueError:
                    raise WafError(f"{raw!r} (character {pos}) is not an IP address or CIDR range") from None
            elif kind == "str":
                values.append(_unquote(text))
            else:
                raise WafError(f"set members are quoted strings: {text!r} at character {pos}")
        return tuple(values)


def _field(kind: str, text: str, pos: int) -> str:
    if kind == "word" and text.startswith('http.request.headers["') and text.endswith('"]'):
        return "header:" + _unquote(text[len("http.request.headers["):-1]).lower()
    if kind == "word" and text in FIELDS:
        return text
    raise WafError(f"{text!r} at character {pos} is not a field (one of {', '.join(FIELDS)}, "
                   'http.request.headers["NAME"])')


def parse_expression(expression: str) -> Node:
    """The expression's tree, or `WafError` saying what and where."""
    return _Parser(expression).parse()


def evaluate(node: Node, req: Request) -> bool:
    if isinstance(node, Bool):
        results = (evaluate(p, req) for p in node.parts)
        return all(results) if node.op == "and" else any(results)
    if isinstance(node, Not):
        return not evaluate(node.inner, req)
    value = req.value(node.field)
    if node.op == "present":
        return bool(value)
    if node.op == "eq":
        return value == node.value
    if node.op == "ne":
        return value != node.value
    if node.op == "contains":
        return str(node.value) in value
    if node.op == "matches":
        return node.value.search(value) is not None
    if node.field == "ip.src":
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            return False
        return any(address in net for net in node.value)
    return value in node.value


# --- rules ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    id: str
    description: str
    action: str
    node: Node
    enabled: bool


@dataclass(frozen=True)
class RateRule:
    id: str
    description: str
    node: Node
    characteristics: tuple[str, ...]
    period: float
    limit: int
    timeout: float


def _where(i: int, raw: Any) -> str:
    rid = raw.get("id") if isinstance(raw, dict) else None
    return f"rules[{i}]" + (f" {rid!r}" if rid else "")


def _common(i: int, raw: Any) -> tuple[str, str, Node]:
    where = _where(i, raw)
    if not isinstance(raw, dict):
        raise WafError(f"{where}: a rule is an object")
    expression = raw.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise WafError(f"{where}: expression is required (a string)")
    try:
        node = parse_expression(expression)
    except WafError as exc:
        raise WafError(f"{where}.expression: {exc}") from None
    return str(raw.get("id") or f"rule{i + 1}"), str(raw.get("description", "")), node


def _rule_list(raw: Any) -> list[Any]:
    items = raw.get("rules") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or len(items) > MAX_RULES:
        raise WafError(f"rules must be a list of at most {MAX_RULES} rules")
    return items


def parse_rules(raw: Any) -> list[Rule]:
    """Custom rules (`{"rules": [...]}` or the list), checked whole."""
    items = _rule_list(raw)
    out = []
    for i, item in enumerate(items):
        rid, description, node = _common(i, item)
        action = item.get("action")
        if action not in ACTIONS:
            raise WafError(f"{_where(i, item)}.action: {action!r} is not one of {', '.join(ACTIONS)}")
        out.append(Rule(rid, description, str(action), node, bool(item.get("enabled", True))))
    return out


def _number(where: str, raw: Mapping[str, Any], name: str, default: float | None = None) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise WafError(f"{where}.{name}: a positive number is required, not {value!r}")
    return float(value)


def parse_rate_rules(raw: Any) -> list[RateRule]:
    """Rate-limiting rules (`{"rules": [...]}` or the list), checked whole."""
    items = _rule_list(raw)
    out = []
    for i, item in enumerate(items):
        rid, description, node = _common(i, item)
        where = _where(i, item)
        limits = item.get("ratelimit", item)
        chars = limits.get("characteristics", ["ip.src"])
        if not isinstance(chars, list) or not chars:
            raise WafError(f"{where}.characteristics: a list of fields is required")
        names = []
        for c in chars:
            if c == "cf.colo.id":  # the real API requires it; the lab has one location per request
                continue
            try:
                names.append(_field("word", str(c), 0))
            except WafError:
                raise WafError(f"{where}.characteristics: {c!r} is not a field") from None
        period = _number(where, limits, "period")
        limit = _number(where, limits, "requests_per_period")
        timeout = _number(where, limits, "mitigation_timeout", period)
        out.append(RateRule(rid, description, node, tuple(names), period, int(limit), timeout))
    return out


@dataclass(frozen=True)
class Verdict:
    action: str  # "" (go on), "block", "rate-limit"
    rule: str = ""
    logged: tuple[str, ...] = ()  # `log` rules that matched


@dataclass
class RateLimiter:
    """Fixed windows per (rule, key): counts, and keys blocked until a time."""

    windows: dict[tuple[str, tuple[str, ...]], tuple[float, int]] = field(default_factory=dict)
    blocked: dict[tuple[str, tuple[str, ...]], float] = field(default_factory=dict)

    def hit(self, rule: RateRule, req: Request, now: float) -> bool:
        """Count this request; True if it is over the limit (or its key is still blocked)."""
        key = (rule.id, tuple(req.value(c) for c in rule.characteristics))
        until = self.blocked.get(key)
        if until is not None:
            if now < until:
                return True
            # The mitigation is over: the client starts a fresh window.
            del self.blocked[key]
            self.windows.pop(key, None)
        start, count = self.windows.get(key, (now, 0))
        if now - start >= rule.period:
            start, count = now, 0
        count += 1
        if len(self.windows) >= MAX_KEYS and key not in self.windows:
            self.windows.clear()  # a flood of distinct keys: forget, rather than grow without end
        self.windows[key] = (start, count)
        if count > rule.limit:
            self.blocked[key] = now + rule.timeout
            return True
        return False


def decide(rules: Sequence[Rule], rate_rules: Sequence[RateRule], limiter: RateLimiter, req: Request,
           now: float) -> Verdict:
    """Custom rules first (first match decides; `skip` passes them; `log` records and goes on), then rate
    limits."""
    logged: list[str] = []
    for rule in rules:
        if not rule.enabled or not evaluate(rule.node, req):
            continue
        if rule.action == "log":
            logged.append(rule.id)
            continue
        if rule.action == "block":
            return Verdict("block", rule.id, tuple(logged))
        break  # skip
    for rate in rate_rules:
        if evaluate(rate.node, req) and limiter.hit(rate, req, now):
            return Verdict("rate-limit", rate.id, tuple(logged))
    return Verdict("", "", tuple(logged))

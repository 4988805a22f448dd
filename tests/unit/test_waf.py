"""WAF custom rules and rate limiting (wire/waf.py): the expression subset, rules, bad input."""

from __future__ import annotations

import pytest

from tunnel_lab.wire.waf import (
    RateLimiter,
    Request,
    WafError,
    decide,
    evaluate,
    parse_expression,
    parse_rate_rules,
    parse_rules,
)


def req(path: str = "/", *, host: str = "app.test", method: str = "GET", query: str = "",
        headers: dict[str, str] | None = None, ip: str = "127.0.0.1") -> Request:
    return Request(host=host, method=method, path=path, query=query, headers=headers or {}, ip=ip)


@pytest.mark.parametrize(("expression", "request_", "matches"), [
    ('http.request.uri.path eq "/admin"', req("/admin"), True),
    ('http.request.uri.path == "/admin"', req("/other"), False),
    ('http.request.uri.path contains "adm" and http.request.method eq "POST"', req("/admin"), False),
    ('http.request.uri.path contains "adm" && http.request.method == "POST"', req("/admin", method="POST"),
     True),
    ('not http.host eq "app.test"', req(), False),
    ('!(http.host eq "x.test") or http.request.uri.query contains "a"', req(), True),
    ('http.request.uri.query matches "^id=[0-9]+$"', req(query="id=42"), True),
    ('http.request.uri ~ "\\\\?debug"', req("/x", query="debug=1"), True),
    ('http.request.headers["X-Api-Key"] eq "k"', req(headers={"x-api-key": "k"}), True),
    ('http.request.headers["x-api-key"]', req(), False),
    ('http.user_agent contains "curl"', req(headers={"user-agent": "curl/8"}), True),
    ('ip.src in {10.0.0.0/8 127.0.0.1}', req(ip="127.0.0.1"), True),
    ('ip.src in {"10.0.0.0/8"}', req(ip="127.0.0.1"), False),
    ('http.request.method in {"PUT" "DELETE"}', req(method="DELETE"), True),
])
def test_expressions(expression: str, request_: Request, matches: bool) -> None:
    assert evaluate(parse_expression(expression), request_) is matches


@pytest.mark.parametrize(("expression", "why"), [
    ('http.path eq "/"', "is not a field"),
    ('http.request.uri.path is "/"', "is not an operator"),
    ('http.request.uri.path eq /admin', "needs a quoted string"),
    ('(http.host eq "a"', "ends too early"),
    ('http.host eq "a")', r"unexpected '\)' at character 16"),
    ('http.host matches "("', "not a regular expression"),
    ('ip.src in {300.1.1.1}', "not an IP address"),
    ('http.host eq "a" $', r"unexpected '\$' at character 17"),
])
def test_bad_expressions_say_what_and_where(expression: str, why: str) -> None:
    with pytest.raises(WafError, match=why):
        parse_expression(expression)


def test_rules_first_match_skip_and_log() -> None:
    rules = parse_rules({"rules": [
        {"id": "log-all", "expression": 'http.host eq "app.test"', "action": "log"},
        {"id": "ok-health", "expression": 'http.request.uri.path eq "/health"', "action": "skip"},
        {"id": "no-admin", "expression": 'http.request.uri.path contains "/admin"', "action": "block"},
        {"id": "off", "expression": 'http.host eq "app.test"', "action": "block", "enabled": False},
    ]})
    limiter = RateLimiter()
    assert decide(rules, [], limiter, req("/admin/x"), 0).action == "block"
    verdict = decide(rules, [], limiter, req("/health"), 0)
    assert (verdict.action, verdict.logged) == ("", ("log-all",))
    assert decide(rules, [], limiter, req("/page"), 0).action == ""


def test_bad_rules_name_the_rule() -> None:
    with pytest.raises(WafError, match=r"rules\[1\] 'b'\.action: 'drop'"):
        parse_rules([{"id": "a", "expression": "http.host", "action": "log"},
                     {"id": "b", "expression": "http.host", "action": "drop"}])
    with pytest.raises(WafError, match=r"rules\[0\]\.expression: 'http.nope'"):
        parse_rules([{"expression": "http.nope", "action": "block"}])
    with pytest.raises(WafError, match=r"requests_per_period: a positive number"):
        parse_rate_rules([{"expression": "http.host", "period": 10, "requests_per_period": 0}])


def test_rate_limit_trips_per_key_and_recovers() -> None:
    rules = parse_rate_rules([{"id": "api", "expression": 'http.request.uri.path contains "/api"',
                               "characteristics": ["cf.colo.id", "ip.src"], "period": 10,
                               "requests_per_period": 3, "mitigation_timeout": 5}])
    limiter = RateLimiter()
    a, b = req("/api", ip="127.0.0.2"), req("/api", ip="127.0.0.3")
    assert [decide([], rules, limiter, a, t).action for t in (0, 1, 2)] == ["", "", ""]
    assert decide([], rules, limiter, a, 3).action == "rate-limit"
    assert decide([], rules, limiter, b, 3).action == ""  # another client
    assert decide([], rules, limiter, req("/web", ip="127.0.0.2"), 3).action == ""  # not matched
    assert decide([], rules, limiter, a, 7.9).action == "rate-limit"  # still blocked
    assert decide([], rules, limiter, a, 10.5).action == ""  # a new window after the timeout

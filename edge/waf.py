"""WAF custom rules and rate limiting at the lab edge (docs/waf.md; the rules: `wire.waf`).

`check` runs for every eyeball request before Access (as in Cloudflare's traffic sequence, where the WAF
phases come before Access): the zone's custom rules (`block`, `log`, `skip`), then its rate-limiting
rules. A blocked request gets 403 and the block page ("Sorry, you have been blocked", with the ray id); a
rate-limited one 429 and error 1015. Hits are in the request history (`waf: {rule, action, logged}`),
the edge log (the rule id, never a header value) and the metric `tunnel_lab_edge_waf_hits_total`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tunnel_lab.edge import pages
from tunnel_lab.lab.waf_store import WafStore
from tunnel_lab.wire import waf

log = logging.getLogger(__name__)

RECHECK = 0.2  # how often the store's version is asked on the request path (seconds)


class WafGate:
    """One edge's rules (from the store, re-read when it changes) and rate-limit counters."""

    def __init__(self, store: Any) -> None:
        self.store = WafStore(store)
        self.limiter = waf.RateLimiter()
        self._rules: tuple[float, list[waf.Rule], list[waf.RateRule]] = (-1.0, [], [])

    def rules(self) -> tuple[list[waf.Rule], list[waf.RateRule]]:
        now = time.monotonic()
        if now - self._rules[0] > RECHECK:
            try:
                custom, rate = self.store.rules()
            except waf.WafError as exc:  # written past the API's checks: keep the last good rules
                log.error("waf: the stored rules are not valid, keeping the previous ones: %s", exc)
                custom, rate = self._rules[1], self._rules[2]
            self._rules = (now, custom, rate)
        return self._rules[1], self._rules[2]


def gate_of(edge: Any) -> WafGate:
    if edge.waf is None:
        edge.waf = WafGate(edge.tunnels.store)
    gate: WafGate = edge.waf
    return gate


def _request(req: Any, host: str) -> waf.Request:
    target = str(req.target)
    if "://" in target:
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for name, value in req.headers:
        headers.setdefault(bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1"))
    return waf.Request(host=host, method=str(req.method).upper(), path=path, query=query, headers=headers,
                       ip=str(req.client_ip))


async def check(edge: Any, ex: Any, host: str, result: Any) -> bool:
    """Apply the rules to one request; True when the edge answered it (blocked or rate-limited)."""
    custom, rate = gate_of(edge).rules()
    if not custom and not rate:
        return False
    the_gate = gate_of(edge)
    verdict = waf.decide(custom, rate, the_gate.limiter, _request(ex.request, host), time.monotonic())
    for rule in verdict.logged:
        edge.metrics.waf_hits.inc(rule=rule, action="log")
        log.info("waf: log rule=%s host=%r ray=%s", rule, host, result.ray)
    if verdict.logged or verdict.action:
        result.waf = {"logged": list(verdict.logged)}
    if not verdict.action:
        return False
    result.waf.update({"rule": verdict.rule, "action": verdict.action})
    edge.metrics.waf_hits.inc(rule=verdict.rule, action=verdict.action)
    if verdict.action == "block":
        status, outcome = 403, "waf-block"
        headers, body = pages.error_page(403, "Sorry, you have been blocked. This website uses a security "
                                              f"service (WAF rule {verdict.rule}) to protect itself.",
                                         ray=result.ray)
    else:
        status, outcome = 429, "rate-limited"
        headers, body = pages.error_page(429, "Error 1015: you are being rate limited (rule "
                                              f"{verdict.rule}).", ray=result.ray)
    log.info("waf: %s rule=%s host=%r ray=%s", verdict.action, verdict.rule, host, result.ray)
    result.status, result.outcome = status, outcome
    await ex.start_response(status, headers)
    if body and str(ex.request.method).upper() != "HEAD":
        await ex.send_body(body)
    await ex.finish()
    return True

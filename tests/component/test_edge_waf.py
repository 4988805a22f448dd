"""WAF rules at the edge (edge/waf.py, lab/waf_store.py): the rulesets API, a block, a rate limit, the
history and metrics, and a malformed ruleset refused whole."""

from __future__ import annotations

import trio

from tests.component.test_edge_api import api
from tests.component.test_edge_support import (
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
)

HOST = "shop.test"
CUSTOM = "/client/v4/zones/lab/rulesets/phases/http_request_firewall_custom/entrypoint"
RATE = "/zones/lab/rulesets/phases/http_ratelimit/entrypoint"


async def test_rules_block_limit_and_are_recorded(tmp_path):
    with trio.fail_after(30):
        async with running_edge(tmp_path) as (edge, nursery):
            await registered(nursery, edge, make_tunnel(edge, "t1", HOST), echo_handler)
            eyeball = edge.bound["http"]
            status, answer = await api(edge, "PUT", CUSTOM, {"rules": [
                {"id": "secret", "expression": 'http.request.headers["x-api-key"] eq "s3cret-value"',
                 "action": "log"},
                {"expression": 'http.request.uri.path contains "/admin"', "action": "block"}]})
            assert status == 200 and answer["success"], answer
            assert [r["id"] for r in answer["result"]["rules"]] == ["secret", "rule2"]
            status, _ = await api(edge, "PUT", RATE, {"rules": [
                {"id": "rl", "expression": 'http.request.uri.path eq "/api"', "period": 60,
                 "requests_per_period": 1}]})
            assert status == 200

            r = await http_request(eyeball, "GET", "/admin", host=HOST)
            assert r.status == 403 and b"Sorry, you have been blocked" in r.body and b"Ray ID" in r.body
            r = await http_request(eyeball, "GET", "/page", host=HOST,
                                   headers=[(b"x-api-key", b"s3cret-value")])
            assert r.status == 200
            assert (await http_request(eyeball, "GET", "/api", host=HOST)).status == 200
            r = await http_request(eyeball, "GET", "/api", host=HOST)
            assert r.status == 429 and b"1015" in r.body

            history = (await api(edge, "GET", "/history"))[1]
            by_path = {e["path"]: e for e in history}
            assert by_path["/admin"]["outcome"] == "waf-block"
            assert by_path["/admin"]["waf"] == {"logged": [], "rule": "rule2", "action": "block"}
            assert by_path["/page"]["waf"] == {"logged": ["secret"]}
            assert [e["outcome"] for e in history if e["path"] == "/api"] == ["ok", "rate-limited"]
            metrics = (await http_request(edge.bound["api"], "GET", "/metrics", host="api",
                                          headers=[(b"authorization",
                                                    f"Bearer {edge.api_token}".encode())])).body
            assert b'tunnel_lab_edge_waf_hits_total{action="block",rule="rule2"} 1' in metrics

            # a malformed ruleset is refused whole, naming the rule; the old rules stay
            status, answer = await api(edge, "PUT", CUSTOM, {"rules": [
                {"id": "ok", "expression": "http.host", "action": "log"},
                {"id": "bad", "expression": 'http.request.uri.path eq "/x" and', "action": "block"}]})
            assert status == 400
            message = answer["errors"][0]["message"]
            assert "rules[1] 'bad'.expression: the expression ends too early" in message
            status, answer = await api(edge, "GET", CUSTOM)
            assert [r["id"] for r in answer["result"]["rules"]] == ["secret", "rule2"]
            assert (await api(edge, "GET", "/zones/lab/rulesets/phases/nope/entrypoint"))[0] == 404

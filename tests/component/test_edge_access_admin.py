"""What `tunnel-lab access ...` and `tunnel-lab waf rules ...` write is what a running edge enforces: an
application made by the CLI protects its hostname, a CLI service token passes it, the API lists both, and
CLI WAF rules block."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from tests.component.test_edge_api import api
from tests.component.test_edge_support import (
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
)
from tunnel_lab.lab.access_admin import access_main, waf_main

HOST = "app.test"


async def until_status(eyeball, path: str, status: int, **kw):
    """The edge re-reads the store at most every 0.2 s (edge.access, edge.waf): ask until it has."""
    while True:
        r = await http_request(eyeball, "GET", path, host=HOST, **kw)
        if r.status == status:
            return r
        await trio.sleep(0.05)


def cli(main, state: Path, *argv: str) -> dict:
    """Run an admin command with `--output json` (its output captured from a file)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--state", str(state), *argv, "--output", "json"])
    assert code == 0
    return json.loads(out.getvalue())


async def test_cli_app_and_service_token_on_a_running_edge(tmp_path):
    state = tmp_path / "state"
    with trio.fail_after(30):
        async with running_edge(tmp_path) as (edge, nursery):
            await registered(nursery, edge, make_tunnel(edge, "t1", HOST), echo_handler)
            eyeball = edge.bound["http"]
            r = await http_request(eyeball, "GET", "/page", host=HOST)
            assert r.status == 200  # not protected yet

            token = cli(access_main, state, "service-token", "create", "ci")
            policies = tmp_path / "policies.yaml"
            policies.write_text("- name: ci\n  decision: non_identity\n"
                                f"  include: [{{service_token: {{token_id: {token['id']}}}}}]\n")
            app = cli(access_main, state, "app", "add", "web", HOST, "--policies", str(policies))

            # anonymous: the login redirect; with the CLI's service token: through, with an assertion
            r = await until_status(eyeball, "/page", 302)
            assert b"/cdn-cgi/access/login/" in r.header(b"location")
            creds = [(b"cf-access-client-id", token["client_id"].encode()),
                     (b"cf-access-client-secret", token["client_secret"].encode())]
            r = await http_request(eyeball, "GET", "/page", host=HOST, headers=creds)
            assert r.status == 200 and "cf-access-jwt-assertion" in dict(json.loads(r.body)["headers"])

            # the API sees what the CLI wrote (and never the secret)
            acct = edge.state.tunnels.store.account_tag
            _, apps = await api(edge, "GET", f"/client/v4/accounts/{acct}/access/apps")
            assert [(a["id"], a["aud"]) for a in apps["result"]] == [(app["id"], app["aud"])]
            _, tokens = await api(edge, "GET", f"/client/v4/accounts/{acct}/access/service_tokens")
            assert [t["id"] for t in tokens["result"]] == [token["id"]]
            assert token["client_secret"] not in json.dumps(tokens)

            # deleted by the CLI: no longer protected
            assert access_main(["--state", str(state), "app", "delete", "web"]) == 0
            r = await until_status(eyeball, "/page", 200)
            assert "cf-access-jwt-assertion" not in dict(json.loads(r.body)["headers"])


async def test_cli_waf_rules_on_a_running_edge(tmp_path):
    state = tmp_path / "state"
    rules = tmp_path / "rules.yaml"
    rules.write_text("- {id: no-admin, action: block,\n"
                     "   expression: 'http.request.uri.path contains \"/admin\"'}\n")
    with trio.fail_after(30):
        async with running_edge(tmp_path) as (edge, nursery):
            await registered(nursery, edge, make_tunnel(edge, "t1", HOST), echo_handler)
            eyeball = edge.bound["http"]
            await until_status(eyeball, "/admin", 200)
            cli(waf_main, state, "rules", "set", str(rules))
            r = await until_status(eyeball, "/admin", 403)
            assert b"Sorry, you have been blocked" in r.body
            custom = "/zones/lab/rulesets/phases/http_request_firewall_custom/entrypoint"
            _, answer = await api(edge, "GET", custom)
            assert [r["id"] for r in answer["result"]["rules"]] == ["no-admin"]
            assert waf_main(["--state", str(state), "rules", "clear"]) == 0
            await until_status(eyeball, "/admin", 200)

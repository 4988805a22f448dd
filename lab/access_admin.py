"""`tunnel-lab access app|policy|service-token ...` and `tunnel-lab waf rules ...`: Access and WAF admin
commands on the lab's store (`STATE/state.db`), the same store and validation as the v4-shaped API
(`lab.access_store`, `lab.waf_store`). See docs/admin.md.

`tunnel-lab access` is shared with the access client (`login|token|curl|tcp|ssh|rdp|smb`,
`connector.access`): the dispatcher (`lab.cli.SHARED`) sends `app`, `policy` and `service-token` here
and everything else there. Conventions as `lab.admin`: `--state DIR`, `--output json`, one-line errors,
exit 1 (2 for usage). A service token's secret is printed once, by `service-token create`, and never again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunnel_lab.lab.access_store import AccessStore, NotFound
from tunnel_lab.lab.admin import (
    PROG,
    _add_output,
    _add_state,
    _Parser,
    _print_json,
    _run,
    _subparsers,
    _table,
)
from tunnel_lab.lab.paths import db_path
from tunnel_lab.lab.store import Store
from tunnel_lab.lab.waf_store import PHASES, WafStore
from tunnel_lab.wire import waf
from tunnel_lab.wire.errors import ConfigError

# --phase short names -> the Rulesets API's phase names
WAF_PHASES = {"custom": "http_request_firewall_custom", "ratelimit": "http_ratelimit"}
assert set(WAF_PHASES.values()) == set(PHASES)


def _load(path: str) -> Any:
    """A JSON or YAML document from a file (`-`: stdin); YAML is a superset of JSON."""
    import yaml

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason}", source=path) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid"
        raise ConfigError(f"not JSON or YAML{where}: {problem}", source=path) from None


def _policy_summary(policy: dict[str, Any]) -> str:
    def rules(items: list[dict[str, Any]]) -> str:
        out = []
        for rule in items:
            for kind, value in rule.items():
                shown = next(iter(value.values()), "") if isinstance(value, dict) and value else ""
                out.append(f"{kind}={shown}" if shown else kind)
        return ",".join(out)

    parts = [f"include {rules(policy.get('include', []))}"]
    for part in ("require", "exclude"):
        if policy.get(part):
            parts.append(f"{part} {rules(policy[part])}")
    return "; ".join(parts)


# -- access app ----------------------------------------------------------------------------------

def _cmd_app_add(args: argparse.Namespace, access: AccessStore) -> int:
    body: dict[str, Any] = {"name": args.name, "domain": args.domain}
    if args.session_duration is not None:
        body["session_duration"] = args.session_duration
    if args.policies:
        loaded = _load(args.policies)
        if isinstance(loaded, dict):  # {policies: [...]}, or one policy as `policy add` takes it
            loaded = loaded.get("policies", [loaded])
        body["policies"] = loaded
    app = access.create_app(body)
    if args.output == "json":
        _print_json(app)
        return 0
    print(f"Created Access application {app['name']} for {app['domain']} with id {app['id']}")
    print(f"AUD tag: {app['aud']}")
    if not app["policies"]:
        print(f"It has no policy yet, so it refuses everyone: add one with `{PROG} access policy add "
              f"{app['name']} FILE`")
    return 0


def _cmd_app_list(args: argparse.Namespace, access: AccessStore) -> int:
    apps = sorted((a.body for a in access.apps()), key=lambda b: (b["domain"], b["name"]))
    if args.output == "json":
        _print_json(apps)
        return 0
    if not apps:
        print(f"No Access applications. You can use `{PROG} access app add NAME DOMAIN` to add one.")
        return 0
    rows = [[b["id"], b["name"], b["domain"], str(len(b.get("policies", []))), b["aud"][:16] + "..."]
            for b in apps]
    print(_table(["ID", "NAME", "DOMAIN", "POLICIES", "AUD"], rows))
    return 0


def _find_app(access: AccessStore, ref: str) -> Any:
    """An application by id, aud or (unique) name."""
    try:
        return access.get_app(ref)
    except NotFound:
        named = [a for a in access.apps() if a.body.get("name") == ref]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise ConfigError(f"{len(named)} Access applications are named {ref!r}: give the id",
                              source="access") from None
        raise


def _cmd_app_show(args: argparse.Namespace, access: AccessStore) -> int:
    body = _find_app(access, args.app).body
    if args.output == "json":
        _print_json(body)
        return 0
    print(f"NAME:     {body['name']}")
    print(f"ID:       {body['id']}")
    print(f"DOMAIN:   {body['domain']}")
    print(f"AUD:      {body['aud']}")
    print(f"SESSION:  {body.get('session_duration', '24h')}")
    print(f"CREATED:  {body.get('created_at', '-')}")
    _print_policies(body)
    return 0


def _print_policies(body: dict[str, Any]) -> None:
    policies = body.get("policies", [])
    if not policies:
        print(f"POLICIES: none (everyone is refused; add one with `{PROG} access policy add "
              f"{body['name']} FILE`)")
        return
    print("POLICIES:")
    rows = [["  " + p["id"], p["name"], p["decision"], str(p.get("precedence", 1)), _policy_summary(p)]
            for p in policies]
    print(_table(["  ID", "NAME", "DECISION", "PRECEDENCE", "RULES"], rows))


def _cmd_app_delete(args: argparse.Namespace, access: AccessStore) -> int:
    apps = [_find_app(access, ref) for ref in args.apps]  # all or nothing: resolve every one first
    for app in apps:
        access.delete_app(app.id)
        print(f"Deleted Access application {app.body['name']} with id {app.id}")
    return 0


# -- access policy -------------------------------------------------------------------------------

def _cmd_policy_add(args: argparse.Namespace, access: AccessStore) -> int:
    app = _find_app(access, args.app)
    loaded = _load(args.file)
    items = loaded if isinstance(loaded, list) else [loaded]
    # Several policies go in as one update of the application: all of them or none.
    new = access._app_input(app)
    if not items:
        raise ConfigError("no policy in the file", source=args.file)
    new["policies"].extend({k: v for k, v in p.items() if k != "id"} if isinstance(p, dict) else p
                           for p in items)
    result = access.update_app(app.id, new)
    added = result["policies"][len(result["policies"]) - len(items):]
    if args.output == "json":
        _print_json(added)
        return 0
    for policy in added:
        print(f"Added policy {policy['name']} ({policy['decision']}) to {app.body['name']} "
              f"with id {policy['id']}")
    return 0


def _cmd_policy_list(args: argparse.Namespace, access: AccessStore) -> int:
    body = _find_app(access, args.app).body
    if args.output == "json":
        _print_json(body.get("policies", []))
        return 0
    _print_policies(body)
    return 0


def _cmd_policy_delete(args: argparse.Namespace, access: AccessStore) -> int:
    app = _find_app(access, args.app)
    policies = app.body.get("policies", [])
    match = [p for p in policies if args.policy in (p.get("id"), p.get("name"))]
    if not match:
        raise NotFound(f"application {app.body['name']!r} has no policy {args.policy!r}", source="access")
    if len(match) > 1:
        raise ConfigError(f"{len(match)} policies of {app.body['name']!r} are named {args.policy!r}: "
                          "give the id", source="access")
    access.delete_policy(app.id, match[0]["id"])
    print(f"Deleted policy {match[0]['name']} with id {match[0]['id']} from {app.body['name']}")
    return 0


# -- access service-token ------------------------------------------------------------------------

def _cmd_token_create(args: argparse.Namespace, access: AccessStore) -> int:
    token = access.create_service_token({"name": args.name, "duration": args.duration})
    if args.output == "json":
        _print_json(token)
        return 0
    print(f"Created service token {token['name']} with id {token['id']}")
    print(f"Client ID:     {token['client_id']}")
    print(f"Client Secret: {token['client_secret']}")
    print("This is the only time the secret is shown: keep it now (the lab stores only its hash).")
    return 0


def _cmd_token_list(args: argparse.Namespace, access: AccessStore) -> int:
    tokens = access.service_tokens()  # the store never had the secrets: only their hashes
    if args.output == "json":
        _print_json(tokens)
        return 0
    if not tokens:
        print(f"No service tokens. You can use `{PROG} access service-token create NAME` to create one.")
        return 0
    rows = [[t["id"], t["name"], t["client_id"], t.get("expires_at", "never")] for t in tokens]
    print(_table(["ID", "NAME", "CLIENT ID", "EXPIRES"], rows))
    return 0


def _cmd_token_delete(args: argparse.Namespace, access: AccessStore) -> int:
    tokens = access.service_tokens()
    found = []
    for ref in args.tokens:  # all or nothing: resolve every one first
        match = [t for t in tokens if ref in (t["id"], t["client_id"], t["name"])]
        if not match:
            raise NotFound(f"no service token {ref!r}", source="access")
        if len(match) > 1:
            raise ConfigError(f"{len(match)} service tokens are named {ref!r}: give the id", source="access")
        found.append(match[0])
    for token in found:
        access.delete_service_token(token["id"])
        print(f"Deleted service token {token['name']} with id {token['id']}")
    return 0


def _access_parser() -> _Parser:
    parser = _Parser(prog=f"{PROG} access",
                     description="Access applications, policies and service tokens in the lab's store "
                                 "(the client commands login|token|curl|tcp|ssh are `tunnel-lab access "
                                 "--help`).")
    _add_state(parser, top=True)
    subs = _subparsers(parser, "group")

    app = subs.add_parser("app", help="Access applications (a hostname, or hostname/path, to protect)")
    _add_state(app)
    app_subs = _subparsers(app, "command")
    p = app_subs.add_parser("add", help="protect a hostname (or hostname/path) with an application")
    _add_state(p)
    p.add_argument("name", metavar="NAME")
    p.add_argument("domain", metavar="DOMAIN", help="host or host/path-prefix, e.g. app.example.test")
    p.add_argument("--policies", metavar="FILE",
                   help="JSON or YAML file (- for stdin): a policy, a list of them, or {policies: [...]}")
    p.add_argument("--session-duration", metavar="DURATION", help="e.g. 30m, 24h (default 24h)")
    _add_output(p)
    p.set_defaults(func=_cmd_app_add)
    p = app_subs.add_parser("list", help="list applications")
    _add_state(p)
    _add_output(p)
    p.set_defaults(func=_cmd_app_list)
    p = app_subs.add_parser("show", help="an application and its policies")
    _add_state(p)
    p.add_argument("app", metavar="APP", help="id, aud or name")
    _add_output(p)
    p.set_defaults(func=_cmd_app_show)
    p = app_subs.add_parser("delete", help="delete applications (the hostnames are no longer protected)")
    _add_state(p)
    p.add_argument("apps", metavar="APP", nargs="+", help="id, aud or name")
    p.set_defaults(func=_cmd_app_delete)

    pol = subs.add_parser("policy", help="an application's policies")
    _add_state(pol)
    pol_subs = _subparsers(pol, "command")
    p = pol_subs.add_parser("add", help="add policies from a JSON or YAML file (one policy or a list)")
    _add_state(p)
    p.add_argument("app", metavar="APP", help="id, aud or name")
    p.add_argument("file", metavar="FILE", help="JSON or YAML file, - for stdin")
    _add_output(p)
    p.set_defaults(func=_cmd_policy_add)
    p = pol_subs.add_parser("list", help="an application's policies")
    _add_state(p)
    p.add_argument("app", metavar="APP", help="id, aud or name")
    _add_output(p)
    p.set_defaults(func=_cmd_policy_list)
    p = pol_subs.add_parser("delete", help="delete a policy")
    _add_state(p)
    p.add_argument("app", metavar="APP", help="id, aud or name")
    p.add_argument("policy", metavar="POLICY", help="id or name")
    p.set_defaults(func=_cmd_policy_delete)

    tok = subs.add_parser("service-token", help="service tokens (Cf-Access-Client-Id/Secret)")
    _add_state(tok)
    tok_subs = _subparsers(tok, "command")
    p = tok_subs.add_parser("create", help="create a token; its secret is shown this once")
    _add_state(p)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--duration", default="8760h", help="e.g. 8760h (default) or forever")
    _add_output(p)
    p.set_defaults(func=_cmd_token_create)
    p = tok_subs.add_parser("list", help="list tokens (never their secrets)")
    _add_state(p)
    _add_output(p)
    p.set_defaults(func=_cmd_token_list)
    p = tok_subs.add_parser("delete", help="delete tokens")
    _add_state(p)
    p.add_argument("tokens", metavar="TOKEN", nargs="+", help="id, client id or name")
    p.set_defaults(func=_cmd_token_delete)
    return parser


# -- waf rules -----------------------------------------------------------------------------------

def _phases(args: argparse.Namespace) -> list[str]:
    return [WAF_PHASES[args.phase]] if args.phase else list(WAF_PHASES.values())


def _cmd_waf_set(args: argparse.Namespace, wafs: WafStore) -> int:
    loaded = _load(args.file)
    phase = WAF_PHASES[args.phase or "custom"]
    try:
        rules = wafs.put(phase, loaded)
    except waf.WafError as exc:
        raise ConfigError(f"{phase}: {exc.message}", source=args.file) from None
    if args.output == "json":
        _print_json({"phase": phase, "rules": rules})
        return 0
    print(f"Set {len(rules)} rule(s) in {phase}: {', '.join(r['id'] for r in rules) or 'none'}")
    return 0


def _cmd_waf_show(args: argparse.Namespace, wafs: WafStore) -> int:
    phases = {phase: wafs.raw(phase) for phase in _phases(args)}
    if args.output == "json":
        _print_json(phases)
        return 0
    for phase, rules in phases.items():
        if not rules:
            print(f"{phase}: no rules")
            continue
        print(f"{phase}:")
        if phase == WAF_PHASES["custom"]:
            rows = [["  " + r["id"], str(r.get("action", "")), "yes" if r.get("enabled", True) else "no",
                     str(r.get("expression", ""))] for r in rules]
            print(_table(["  ID", "ACTION", "ENABLED", "EXPRESSION"], rows))
        else:
            rows = []
            for r in rules:
                limit = {**r.get("ratelimit", {}), **{k: v for k, v in r.items() if k != "ratelimit"}}
                rows.append(["  " + r["id"], f"{limit.get('requests_per_period')}/{limit.get('period')}s",
                             ",".join(limit.get("characteristics", [])), str(r.get("expression", ""))])
            print(_table(["  ID", "LIMIT", "PER", "EXPRESSION"], rows))
    return 0


def _cmd_waf_clear(args: argparse.Namespace, wafs: WafStore) -> int:
    for phase in _phases(args):
        wafs.put(phase, [])
        print(f"Cleared the rules of {phase}")
    return 0


def _waf_parser() -> _Parser:
    parser = _Parser(prog=f"{PROG} waf", description="WAF custom and rate-limiting rules in the lab's store.")
    _add_state(parser, top=True)
    subs = _subparsers(parser, "group")
    rules = subs.add_parser("rules", help="set, show and clear a phase's rules")
    _add_state(rules)
    rule_subs = _subparsers(rules, "command")
    phase_help = "custom (http_request_firewall_custom) or ratelimit (http_ratelimit)"
    p = rule_subs.add_parser("set", help="replace a phase's rules from a JSON or YAML file (checked whole)")
    _add_state(p)
    p.add_argument("file", metavar="FILE", help="a list of rules or {rules: [...]}; - for stdin")
    p.add_argument("--phase", choices=tuple(WAF_PHASES), default=None, help=phase_help + "; default custom")
    _add_output(p)
    p.set_defaults(func=_cmd_waf_set)
    p = rule_subs.add_parser("show", help="the rules (both phases unless --phase)")
    _add_state(p)
    p.add_argument("--phase", choices=tuple(WAF_PHASES), default=None, help=phase_help)
    _add_output(p)
    p.set_defaults(func=_cmd_waf_show)
    p = rule_subs.add_parser("clear", help="remove the rules (both phases unless --phase)")
    _add_state(p)
    p.add_argument("--phase", choices=tuple(WAF_PHASES), default=None, help=phase_help)
    p.set_defaults(func=_cmd_waf_clear)
    return parser


# -- entry points --------------------------------------------------------------------------------

def access_main(argv: Sequence[str]) -> int:
    """`tunnel-lab access app|policy|service-token ...` (`lab.cli` sends the other words to the client)."""
    def call(args: argparse.Namespace, state: Path) -> int:
        with Store(db_path(state)) as store:
            return int(args.func(args, AccessStore(store)))

    return _run(_access_parser, argv, call)


def waf_main(argv: Sequence[str]) -> int:
    """`tunnel-lab waf rules ...`: returns the exit code."""
    def call(args: argparse.Namespace, state: Path) -> int:
        with Store(db_path(state)) as store:
            return int(args.func(args, WafStore(store)))

    return _run(_waf_parser, argv, call)

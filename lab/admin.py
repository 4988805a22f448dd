"""`tunnel-lab tunnel ...` and `tunnel-lab pki ...`: the admin commands of the lab account.

They play the part of `cloudflared tunnel create/route/list/info/token/delete` against the
Cloudflare API, but write to the lab's state directory (`lab.store`, `lab.pki`) instead. Messages
follow cloudflared's wording where there is one. Every user error is one line on stderr,
`tunnel-lab: ...`, with exit status 1 (2 for a command-line usage error); never a traceback.
See docs/admin.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from tunnel_lab.lab.paths import (
    credentials_dir,
    credentials_path,
    db_path,
    ensure_private_dir,
    state_dir,
    without_state,
)
from tunnel_lab.lab.store import Store, Tunnel, format_time
from tunnel_lab.wire.credentials import credentials_json, make_token
from tunnel_lab.wire.errors import ConfigError, TunnelLabError

PROG = "tunnel-lab"
_ROUTE_IP_COMMANDS = ("add", "show", "list", "delete", "-h", "--help")


class _UsageError(TunnelLabError):
    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (the caller prints it) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message, self.prog)


def _add_state(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    # Accepted at every level; a deeper level's value wins. SUPPRESS keeps a subparser from
    # overwriting the value an outer level already parsed.
    parser.add_argument("--state", metavar="DIR", default=None if top else argparse.SUPPRESS,
                        help="state directory (default: $TUNNEL_LAB_STATE, else "
                             "${XDG_STATE_HOME:-~/.local/state}/tunnel-lab)")


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text",
                        help="output format (default: text)")


def _subparsers(parser: argparse.ArgumentParser, title: str) -> argparse._SubParsersAction[Any]:
    subs = parser.add_subparsers(dest=title, metavar="COMMAND", parser_class=_Parser)
    subs.required = True
    return subs


# -- output helpers -------------------------------------------------------------------------------

def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def _when(tunnel_or_route: Any) -> str:
    return format_time(tunnel_or_route.created_at)


# -- credentials files ----------------------------------------------------------------------------

def _check_writable_target(path: Path) -> Path:
    """Refuse paths that would clobber a real cloudflared setup or an existing file."""
    path = path.expanduser().absolute()
    real = Path.home().joinpath(".cloudflared").resolve()
    if path.resolve() == real or real in path.resolve().parents:
        raise ConfigError(f"refusing to write under {real}: that directory belongs to a real cloudflared",
                          source=str(path), hint="choose a path outside ~/.cloudflared")
    if path.is_dir():
        raise ConfigError("is a directory", source=str(path), hint="give a file path")
    if path.exists():
        raise ConfigError("file already exists", source=str(path),
                          hint="remove it or choose another path")
    if not path.parent.is_dir():
        raise ConfigError("directory does not exist", source=str(path.parent))
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError("directory is not writable", source=str(path.parent))
    return path


def _write_credentials(path: Path, tunnel: Tunnel) -> None:
    """Write the tunnel's credentials JSON to `path` with mode 0400 (never overwriting)."""
    data = (credentials_json(tunnel.credentials()) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    except OSError as exc:
        raise ConfigError(f"cannot write credentials file: {exc.strerror or exc}", source=str(path)) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise ConfigError(f"cannot write credentials file: {exc.strerror or exc}", source=str(path)) from exc


# -- tunnel subcommands ---------------------------------------------------------------------------

def _cmd_create(args: argparse.Namespace, state: Path, store: Store) -> int:
    if args.credentials_file:
        target = _check_writable_target(Path(args.credentials_file))
    else:
        ensure_private_dir(credentials_dir(state))
        target = None
    tunnel = store.create_tunnel(args.name)
    path = target or credentials_path(state, tunnel.id)
    try:
        if target is None:
            path = _check_writable_target(path)
        _write_credentials(path, tunnel)
    except TunnelLabError as exc:
        # Like cloudflared: a tunnel without its credentials file cannot run, so take it back.
        store.delete_tunnel(tunnel.id)
        raise ConfigError(f"tunnel {tunnel.name!r} was not created: {exc}") from exc
    store.set_credentials_file(tunnel.id, path)
    if args.output == "json":
        _print_json({**tunnel.as_dict(), "credentials_file": str(path)})
        return 0
    print(f"Tunnel credentials written to {path}. Keep this file secret. "
          "To revoke these credentials, delete the tunnel.")
    print()
    print(f"Created tunnel {tunnel.name} with id {tunnel.id}")
    return 0


def _cmd_list(args: argparse.Namespace, state: Path, store: Store) -> int:
    tunnels = store.list_tunnels()
    routes = store.list_routes()
    by_tunnel: dict[str, list[str]] = {}
    for route in routes:
        by_tunnel.setdefault(str(route.tunnel_id), []).append(route.target)
    if args.output == "json":
        _print_json([{**t.as_dict(), "routes": by_tunnel.get(str(t.id), [])} for t in tunnels])
        return 0
    if not tunnels:
        print(f"No tunnels were found. You can use `{PROG} tunnel create` to create a tunnel.")
        return 0
    print(f"You can obtain more detailed information for each tunnel with `{PROG} tunnel info <name/uuid>`")
    rows = [[str(t.id), t.name, _when(t), ", ".join(by_tunnel.get(str(t.id), []))] for t in tunnels]
    print(_table(["ID", "NAME", "CREATED", "ROUTES"], rows))
    return 0


def _cmd_info(args: argparse.Namespace, state: Path, store: Store) -> int:
    tunnel = store.require_tunnel(args.tunnel)
    routes = [r for r in store.list_routes() if r.tunnel_id == tunnel.id]
    if args.output == "json":
        _print_json({**tunnel.as_dict(), "credentials_file": tunnel.credentials_file,
                     "routes": [r.as_dict() for r in routes]})
        return 0
    print(f"NAME:        {tunnel.name}")
    print(f"ID:          {tunnel.id}")
    print(f"CREATED:     {_when(tunnel)}")
    print(f"ACCOUNT:     {tunnel.account_tag}")
    print(f"CREDENTIALS: {tunnel.credentials_file or '-'}")
    if not routes:
        print(f"ROUTES:      none (add one with `{PROG} tunnel route dns {tunnel.name} HOSTNAME`)")
    else:
        print("ROUTES:")
        print(_table(["  KIND", "TARGET", "CREATED"], [["  " + r.kind, r.target, _when(r)] for r in routes]))
    return 0


def _cmd_token(args: argparse.Namespace, state: Path, store: Store) -> int:
    tunnel = store.require_tunnel(args.tunnel)
    if args.cred_file:
        path = _check_writable_target(Path(args.cred_file))
        _write_credentials(path, tunnel)
        print(f"Tunnel credentials written to {path}")
        return 0
    print(make_token(tunnel.credentials()))
    return 0


def _cmd_delete(args: argparse.Namespace, state: Path, store: Store) -> int:
    for ref in args.tunnels:
        store.require_tunnel(ref)  # all or nothing: check every name before deleting any
    for ref in args.tunnels:
        tunnel = store.delete_tunnel(ref)
        candidates = {credentials_path(state, tunnel.id)}
        if tunnel.credentials_file:
            candidates.add(Path(tunnel.credentials_file))
        for path in sorted(candidates):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                print(f"{PROG}: warning: cannot delete credentials file {path}: {exc.strerror or exc}; "
                      "please delete it manually", file=sys.stderr)
        print(f"Deleted tunnel {tunnel.name} with id {tunnel.id}")
    return 0


def _cmd_route_dns(args: argparse.Namespace, state: Path, store: Store) -> int:
    tunnel = store.require_tunnel(args.tunnel)
    before = store.find_route(args.hostname)
    route = store.route_dns(tunnel, args.hostname, overwrite=args.overwrite_dns)
    if before is not None and before.tunnel_id == tunnel.id:
        print(f"{route.target} is already configured to route to your tunnel tunnelID={tunnel.id}")
    else:
        print(f"Added CNAME {route.target} which will route to this tunnel tunnelID={tunnel.id}")
    return 0


def _cmd_route_lb(args: argparse.Namespace, state: Path, store: Store) -> int:
    tunnel = store.require_tunnel(args.tunnel)
    lb_change, pool_change = store.route_lb(tunnel, args.hostname, args.pool)
    print(f"Load balancer {args.hostname} ({lb_change}) uses pool {args.pool} ({pool_change}), which has "
          f"this tunnel as an origin tunnelID={tunnel.id}")
    return 0


def _cmd_route_ip_add(args: argparse.Namespace, state: Path, store: Store) -> int:
    route = store.route_ip(args.cidr, args.tunnel)
    print(f"Successfully added route for {route.target} over tunnel {route.tunnel_id}")
    return 0


def _cmd_route_ip_show(args: argparse.Namespace, state: Path, store: Store) -> int:
    routes = store.list_routes("ip")
    if args.output == "json":
        _print_json([r.as_dict() for r in routes])
        return 0
    if not routes:
        print(f"No routes were found. You can use `{PROG} tunnel route ip add` to add a route.")
        return 0
    rows = [[r.target, str(r.tunnel_id), r.tunnel_name, _when(r)] for r in routes]
    print(_table(["NETWORK", "TUNNEL ID", "TUNNEL NAME", "CREATED"], rows))
    return 0


def _cmd_route_ip_delete(args: argparse.Namespace, state: Path, store: Store) -> int:
    route = store.delete_route(args.cidr, kind="ip")
    print(f"Successfully deleted route for {route.target}")
    return 0


def _tunnel_parser() -> _Parser:
    parser = _Parser(prog=f"{PROG} tunnel",
                     description="Create, route, list, token and delete the lab's tunnels.")
    _add_state(parser, top=True)
    subs = _subparsers(parser, "command")

    p = subs.add_parser("create", help="create a tunnel and write its credentials file")
    _add_state(p)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--credentials-file", "--cred-file", metavar="PATH",
                   help="where to write the credentials JSON (default: STATE/credentials/<uuid>.json)")
    _add_output(p)
    p.set_defaults(func=_cmd_create)

    p = subs.add_parser("list", help="list tunnels")
    _add_state(p)
    _add_output(p)
    p.set_defaults(func=_cmd_list)

    p = subs.add_parser("info", help="show a tunnel and its routes")
    _add_state(p)
    p.add_argument("tunnel", metavar="NAME_OR_UUID")
    _add_output(p)
    p.set_defaults(func=_cmd_info)

    p = subs.add_parser("token", help="print the tunnel's token (cloudflared `--token` format)")
    _add_state(p)
    p.add_argument("tunnel", metavar="NAME_OR_UUID")
    p.add_argument("--cred-file", "--credentials-file", metavar="PATH",
                   help="write the credentials JSON to PATH instead of printing the token")
    p.set_defaults(func=_cmd_token)

    p = subs.add_parser("delete", help="delete tunnels, their routes and credentials files")
    _add_state(p)
    p.add_argument("tunnels", metavar="NAME_OR_UUID", nargs="+")
    p.add_argument("--force", "-f", action="store_true",
                   help="accepted for cloudflared compatibility (the lab never refuses)")
    p.set_defaults(func=_cmd_delete)

    route = subs.add_parser("route", help="route hostnames (dns) or networks (ip) to a tunnel")
    _add_state(route)
    route_subs = _subparsers(route, "route_kind")

    p = route_subs.add_parser("dns", help="route a hostname or *.suffix to a tunnel")
    _add_state(p)
    p.add_argument("tunnel", metavar="NAME_OR_UUID")
    p.add_argument("hostname", metavar="HOSTNAME")
    p.add_argument("--overwrite-dns", "-f", action="store_true",
                   help="take the hostname over if it routes to another tunnel")
    p.set_defaults(func=_cmd_route_dns)

    p = route_subs.add_parser("lb", help="make a tunnel an origin of a load balancer's pool",
                              description="The tunnel joins POOL and POOL joins the load balancer HOSTNAME, "
                              "each created if needed (cloudflared `tunnel route lb`).")
    _add_state(p)
    p.add_argument("tunnel", metavar="NAME_OR_UUID")
    p.add_argument("hostname", metavar="HOSTNAME")
    p.add_argument("pool", metavar="POOL")
    p.set_defaults(func=_cmd_route_lb)

    ip = route_subs.add_parser("ip", help="route private networks (CIDR) to a tunnel",
                               description=f"`{PROG} tunnel route ip CIDR NAME` is short for `... ip add`.")
    _add_state(ip)
    ip_subs = _subparsers(ip, "ip_command")
    p = ip_subs.add_parser("add", help="route a CIDR to a tunnel")
    _add_state(p)
    p.add_argument("cidr", metavar="CIDR")
    p.add_argument("tunnel", metavar="NAME_OR_UUID")
    p.set_defaults(func=_cmd_route_ip_add)
    for name in ("show", "list"):
        p = ip_subs.add_parser(name, help="list IP routes")
        _add_state(p)
        _add_output(p)
        p.set_defaults(func=_cmd_route_ip_show)
    p = ip_subs.add_parser("delete", help="delete the route for a CIDR")
    _add_state(p)
    p.add_argument("cidr", metavar="CIDR")
    p.set_defaults(func=_cmd_route_ip_delete)
    return parser


def _expand_route_ip_shorthand(argv: list[str]) -> list[str]:
    """`route ip CIDR NAME` -> `route ip add CIDR NAME` (cloudflared accepts both)."""
    positional: list[str] = []
    for i, arg in without_state(argv):
        if arg.startswith("-"):
            continue
        if positional == ["route", "ip"]:
            if arg not in _ROUTE_IP_COMMANDS:
                return [*argv[:i], "add", *argv[i:]]
            return argv
        positional.append(arg)
        if len(positional) > 2:
            return argv
    return argv


# -- pki subcommands ------------------------------------------------------------------------------

def _cmd_pki_show(args: argparse.Namespace, state: Path) -> int:
    from tunnel_lab.lab.pki import LabPKI, describe_cert

    pki = LabPKI(state)
    ca = describe_cert(pki.ca_pem_path)
    edge = describe_cert(pki.edge_cert_paths().cert)
    if args.output == "json":
        _print_json({"ca": {**ca, "key": str(pki.ca_key_path)},
                     "edge": {**edge, "key": str(pki.edge_cert_paths().key)}})
        return 0
    print(f"CA certificate:      {ca['path']}")
    print(f"CA key:              {pki.ca_key_path}")
    print(f"CA subject:          {ca['subject']}")
    print(f"SHA-256 fingerprint: {ca['sha256']}")
    print(f"CA valid until:      {ca['not_after']}")
    print(f"Edge certificate:    {edge['path']}")
    print(f"Edge key:            {pki.edge_cert_paths().key}")
    print(f"Edge SANs:           {', '.join(edge['sans'])}")  # type: ignore[arg-type]
    print(f"Edge valid until:    {edge['not_after']}")
    return 0


def _cmd_pki_issue(args: argparse.Namespace, state: Path) -> int:
    from tunnel_lab.lab.pki import LabPKI, describe_cert

    paths = LabPKI(state).cert_paths(args.hostname, args.kind)
    if args.output == "json":
        _print_json({**describe_cert(paths.cert), "key": str(paths.key), "kind": args.kind})
        return 0
    print(f"Certificate: {paths.cert}")
    print(f"Key:         {paths.key}")
    return 0


def _pki_parser() -> _Parser:
    from tunnel_lab.lab.pki import CERT_KINDS

    parser = _Parser(prog=f"{PROG} pki", description="Show the lab CA and issue certificates.")
    _add_state(parser, top=True)
    subs = _subparsers(parser, "command")
    p = subs.add_parser("show", help="the CA path and fingerprint, the edge certificate's names and expiry")
    _add_state(p)
    _add_output(p)
    p.set_defaults(func=_cmd_pki_show)
    p = subs.add_parser("issue", help="issue (or reuse) a certificate for a hostname or IP")
    _add_state(p)
    p.add_argument("hostname", metavar="HOSTNAME",
                   help="DNS name, *.suffix, IP address, or `edge` for the edge names")
    p.add_argument("--kind", choices=CERT_KINDS, default="valid",
                   help="valid (default) or a deliberately broken certificate")
    _add_output(p)
    p.set_defaults(func=_cmd_pki_issue)
    return parser


# -- entry points ---------------------------------------------------------------------------------

def _run(build: Callable[[], _Parser], argv: Sequence[str],
         call: Callable[[argparse.Namespace, Path], int]) -> int:
    parser: _Parser | None = None
    try:
        parser = build()
        args = parser.parse_args(list(argv))
        state = state_dir(args.state)
        return call(args, state)
    except _UsageError as exc:
        print(f"{PROG}: {exc} (see `{exc.prog} --help`)", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except TunnelLabError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{PROG}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def tunnel_main(argv: Sequence[str]) -> int:
    """`tunnel-lab tunnel ...`: returns the exit code."""
    def call(args: argparse.Namespace, state: Path) -> int:
        with Store(db_path(state)) as store:
            return int(args.func(args, state, store))

    return _run(_tunnel_parser, _expand_route_ip_shorthand(list(argv)), call)


def pki_main(argv: Sequence[str]) -> int:
    """`tunnel-lab pki ...`: returns the exit code."""
    return _run(_pki_parser, argv, lambda args, state: int(args.func(args, state)))

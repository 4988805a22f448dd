"""The `tunnel-lab` command: a thin dispatcher to each part's own command line.

Each subcommand lives with the package that owns it and is imported only when used, so that
`tunnel-lab tunnel list` does not pay for importing the edge or the scenario runner.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, function, one-line help). Each function takes argv (without the
# subcommand) and returns the process exit code.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("tunnel_lab.lab.runner.cli", "main", "run scenarios end to end (default: the bundled library)"),
    "edge": ("tunnel_lab.edge.cli", "main", "run the fake Cloudflare edge in the foreground"),
    "connector": ("tunnel_lab.connector.cli", "main", "run our connector (cloudflared's command line)"),
    "access": ("tunnel_lab.connector.access", "main",
               "Access clients (login|token|curl|tcp|ssh) and admin (app|policy|service-token)"),
    "waf": ("tunnel_lab.lab.access_admin", "waf_main", "set, show and clear the WAF rules (`waf rules ...`)"),
    "tunnel": ("tunnel_lab.lab.admin", "tunnel_main", "create, route, list, token and delete tunnels"),
    "pki": ("tunnel_lab.lab.admin", "pki_main", "show the lab CA and issue certificates"),
    "origin": ("tunnel_lab.origin_fixtures.cli", "main", "run an origin fixture (echo, hello, stream, ...)"),
    "bench": ("tunnel_lab.bench.cli", "main", "benchmark the tunnel against direct-to-origin"),
    "up": ("tunnel_lab.lab.up", "main",
           "bring up a lab to play with (edge, tunnel, connector, origin) until Ctrl-C"),
    "netns": ("tunnel_lab.lab.runner.netns", "main", "run a command in the lab's private network namespace"),
    "sandbox": ("tunnel_lab.lab.sandbox", "main",
                "a shell (or COMMAND) where the lab plays Cloudflare for cloudflared"),
    "trace": ("tunnel_lab.lab.trace_cli", "main",
              "read protocol traces: `trace show FILE`, `trace diagram FILE --ray ID`"),
    "explain": ("tunnel_lab.lab.explain", "main",
                "a protocol walkthrough from a run recorded now: `explain request`, `explain registration`"),
    "login": ("tunnel_lab.lab.login", "main",
              "write a cert.pem for the lab's API (`cloudflared tunnel login`)"),
}

# subcommand -> (its words owned by another module, that module, its function): `tunnel-lab access app ...`
# is the lab's admin command, `tunnel-lab access login ...` the access client.
SHARED: dict[str, tuple[tuple[str, ...], str, str]] = {
    "access": (("app", "policy", "service-token"), "tunnel_lab.lab.access_admin", "access_main"),
}


def _first_word(args: Sequence[str]) -> str | None:
    """The first argument that is neither an option nor the value of `--state`."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--state":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def _usage() -> str:
    lines = ["usage: tunnel-lab COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, _, text) in SUBCOMMANDS.items()]
    lines += ["", "Run `tunnel-lab COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tunnel-lab` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"tunnel-lab: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    if name in SHARED:
        words, other_module, other_func = SHARED[name]
        if _first_word(rest) in words:
            module_name, func_name = other_module, other_func
        elif rest[:1] in (["-h"], ["--help"], ["help"]):
            print(f"Admin commands: `tunnel-lab {name} {'|'.join(words)} ...` "
                  f"(`tunnel-lab {name} {words[0]} --help`).\n")
    func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
    try:
        return func(rest)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

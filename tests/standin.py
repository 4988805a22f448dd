"""Stand-in cloudflared executables for tests: a small script per release that answers `--version` and
`tunnel [run] --help` as cloudflared does, refuses flags its release lacks with `Incorrect Usage`, and
otherwise logs its command line and (optionally) runs our connector with it.

The flag lists are written out here independently of lab/runner/cloudflared.py (the code under test); the
names and the releases they arrived in are facts of cloudflared's public source.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Flags every release from 2024.1 has; hidden ones are accepted but not shown by `--help`.
TUNNEL_SHOWN = [
    "--config", "--no-autoupdate", "--metrics", "--loglevel", "--grace-period", "--retries", "--label",
    "--edge-ip-version", "--management-diagnostics", "--post-quantum", "--url", "--http-host-header",
    "--origin-ca-pool",
]
TUNNEL_HIDDEN = ["--edge", "--cacert", "--ha-connections"]
RUN_SHOWN = [
    "--credentials-file", "--token", "--protocol", "--post-quantum", "--url", "--http-host-header",
    "--origin-ca-pool", "--hello-world",
]
# (release, level, flag): arrivals after 2024.1.
ARRIVALS = [
    ((2025, 2, 0), "run", "--max-active-flows"),
    ((2025, 4, 0), "run", "--token-file"),
    ((2025, 7, 0), "run", "--dns-resolver-addrs"),
    ((2026, 5, 0), "tunnel", "--no-prechecks"),
]
BOOLEANS = [
    "--no-autoupdate", "--no-prechecks", "--post-quantum", "--management-diagnostics", "--hello-world",
]

_SCRIPT = r'''
import json, os, sys

SPEC = json.loads(%(spec)r)


def help_lines(flags):
    return ["   %%-40s %%s" %% (f if f in SPEC["booleans"] else f + " value", "what it does") for f in flags]


args = sys.argv[1:]
if args == ["--version"]:
    print(SPEC["version_line"])
    sys.exit(0)
if args == ["tunnel", "--help"]:
    print("NAME:\n   cloudflared tunnel - Use Cloudflare Tunnel\n\nOPTIONS:")
    print("\n".join(help_lines(SPEC["tunnel_shown"] + ["--help"])))
    sys.exit(0)
level, known = "tunnel", SPEC["tunnel_shown"] + SPEC["tunnel_hidden"]
i = 1 if args[:1] == ["tunnel"] else 0
while i < len(args):
    arg = args[i]
    name = arg.split("=", 1)[0]
    if arg == "run" and level == "tunnel":
        level, known = "run", SPEC["run_shown"]
    elif name == "--help":
        print("NAME:\n  cloudflared tunnel run - Proxy a local web server\n\nTUNNEL COMMAND OPTIONS:")
        print("\n".join(help_lines(SPEC["tunnel_shown"])))
        print("\nSUBCOMMAND OPTIONS:")
        print("\n".join(help_lines(SPEC["run_shown"] + ["--help"])))
        sys.exit(0)
    elif arg.startswith("-"):
        if name not in known:
            print("Incorrect Usage. flag provided but not defined: -" + name.lstrip("-") + "\n\nNAME:")
            sys.exit(0)  # as cloudflared: the usage error exits 0
        if "=" not in arg and name not in SPEC["booleans"]:
            i += 1
    else:
        break
    i += 1
if SPEC["argv_log"]:
    with open(SPEC["argv_log"], "a") as f:
        f.write(json.dumps(args) + "\n")
if SPEC["connector"]:
    os.execv(sys.executable, [sys.executable, "-m", "tunnel_lab", "connector", *args])
print("stand-in cloudflared: not running a tunnel", file=sys.stderr)
sys.exit(3)
'''


def write_standin(
    path: Path,
    release: str,
    *,
    argv_log: Path | None = None,
    run_connector: bool = False,
    version_line: str | None = None,
) -> Path:
    """Write an executable stand-in for cloudflared `release` (e.g. "2025.1.0") at `path`."""
    number = tuple(int(p) for p in release.split("."))
    tunnel_shown, run_shown = list(TUNNEL_SHOWN), list(RUN_SHOWN)
    for since, level, flag in ARRIVALS:
        if number >= since:
            (tunnel_shown if level == "tunnel" else run_shown).append(flag)
    spec = {
        "version_line": version_line or f"cloudflared version {release} (built 2025-01-01-0000 UTC)",
        "tunnel_shown": tunnel_shown,
        "tunnel_hidden": TUNNEL_HIDDEN,
        "run_shown": run_shown,
        "booleans": BOOLEANS,
        "argv_log": str(argv_log) if argv_log else "",
        "connector": run_connector,
    }
    path.write_text(f"#!{sys.executable}\n" + _SCRIPT % {"spec": json.dumps(spec)})
    path.chmod(0o755)
    return path


def logged_argvs(argv_log: Path) -> list[list[str]]:
    """The command lines a stand-in ran with (one per start), oldest first."""
    if not argv_log.exists():
        return []
    return [json.loads(line) for line in argv_log.read_text().splitlines() if line.strip()]

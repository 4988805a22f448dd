"""`tunnel-lab run`: run scenario files end to end (default: the bundled library).

    tunnel-lab run [PATH...] [-k PATTERN] [--jobs N] [--shard I/N] [--list]
                   [--connector builtin|cloudflared] [--cloudflared PATH] [--isolate]
                   [--protocol http2|quic]
                   [--compare A,B] [--junit FILE] [--json FILE] [--results DIR]

Every scenario file is validated before anything starts; a malformed one is reported with file:line and
the run does not begin (exit 2). Exit 0 only when every selected scenario passed (skips are fine).
With `--compare A,B` each scenario runs with both connectors and the exit code says whether any
difference was found (lab/runner/comparerun.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tunnel_lab.lab.runner import cloudflared, netns
from tunnel_lab.lab.runner.loader import Scenario, load_scenario, matches, parse_shard, shard
from tunnel_lab.wire.errors import ConfigError

if TYPE_CHECKING:
    from tunnel_lab.lab.runner.forkserver import ForkServer

REPO_LIBRARY = Path(__file__).resolve().parent.parent.parent / "scenarios"
PACKAGED_LIBRARY = Path(__file__).resolve().parent.parent / "scenarios"


def library_dir() -> Path:
    """The bundled scenario library: the checkout's scenarios/ if there is one, else the packaged copy
    (`lab/scenarios/`, which in a checkout is a symlink to ../scenarios)."""
    if REPO_LIBRARY.is_dir() and any(REPO_LIBRARY.glob("*.yaml")):
        return REPO_LIBRARY
    return PACKAGED_LIBRARY


def default_jobs() -> int:
    """Scenarios at once when `--jobs` is not given: six per core. A scenario keeps a core busy for a small
    part of its wall time (its processes are forked ready-imported; the rest is waiting: for timeouts, for
    reconnects), and the eight that wait out a reconnect backoff or QUIC timeouts hold their place for
    10-25 s each; docs/scenarios.md ("Speed") gives the figures."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 6 * max(cores, 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunnel-lab run", description="Run tunnel-lab scenarios end to end.")
    p.add_argument("paths", nargs="*", help="scenario files or directories (default: the bundled library)")
    p.add_argument(
        "-k",
        dest="pattern",
        metavar="PATTERN",
        help="select scenarios whose name or tags match (words with and/or/not, like pytest)",
    )
    p.add_argument(
        "--jobs", "-j", type=int, default=default_jobs(), metavar="N",
        help=f"scenarios to run at once (default {default_jobs()}: six per core)",
    )
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (scenarios sorted by name)")
    p.add_argument("--list", action="store_true", help="list the selected scenarios and exit")
    p.add_argument("--check", action="store_true", help="validate the scenario files and exit")
    p.add_argument(
        "--connector",
        choices=["builtin", "cloudflared"],
        default="builtin",
        help="builtin: `tunnel-lab connector`; cloudflared: a real binary (runs in a private netns)",
    )
    p.add_argument(
        "--cloudflared",
        metavar="PATH",
        default=os.environ.get("TUNNEL_LAB_CLOUDFLARED"),
        help="the cloudflared binary for --connector cloudflared (env TUNNEL_LAB_CLOUDFLARED)",
    )
    p.add_argument(
        "--compare",
        action="append",
        metavar="A,B",
        help="differential conformance: run each scenario with connectors A and B (each `builtin` or a "
        "cloudflared binary; `--compare A --compare B` also works) and report every difference in what "
        "the eyeball and the origin received; exit 1 if any (known deviations excepted)",
    )
    p.add_argument(
        "--isolate",
        action="store_true",
        help="run the whole lab in a private network namespace (always on with cloudflared)",
    )
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report")
    p.add_argument("--json", metavar="FILE", help="write a JSON report")
    p.add_argument(
        "--results",
        metavar="DIR",
        default="tunnel-lab-results",
        help="logs and operation histories go here (default ./tunnel-lab-results)",
    )
    p.add_argument("--keep-state", action="store_true", help="keep each scenario's state directory")
    p.add_argument("--trace", action="store_true",
                   help="write a protocol trace of the edge and of our connector into each scenario's "
                        "results (EDGE/CONNECTOR.trace.jsonl; docs/trace.md)")
    p.add_argument(
        "--protocol",
        choices=["http2", "quic"],
        default="http2",
        help="the tunnel transport every scenario's connector uses (`run --protocol`; default http2)",
    )
    p.add_argument(
        "--edge-processes",
        metavar="N",
        type=int,
        default=1,
        help="run each scenario's edge in up to N processes (`tunnel-lab edge --processes`; one per data "
        "centre at most; scenarios with Access or WAF keep one process)",
    )
    p.add_argument(
        "--loglevel",
        default="info",
        choices=["debug", "info", "warn", "error"],
        help="log level passed to the components",
    )
    p.add_argument("-x", "--exitfirst", action="store_true", help="stop after the first failure")
    p.add_argument("--no-fork-server", dest="fork_server", action="store_false",
                   help="start every lab process with exec instead of forking it from a process that has "
                        "imported the lab already (slower start-up; docs/scenarios.md, \"Speed\")")
    return p


def collect(paths: Sequence[str]) -> tuple[list[Scenario], list[ConfigError]]:
    """Load every scenario file under `paths`; return the scenarios and every validation error."""
    files: list[Path] = []
    for raw in paths or [str(library_dir())]:
        path = Path(raw)
        if path.is_dir():
            files += sorted(list(path.glob("*.yaml")) + list(path.glob("*.yml")))
        elif path.exists():
            files.append(path)
        else:
            return [], [ConfigError("no such file or directory", source=raw)]
    scenarios: list[Scenario] = []
    errors: list[ConfigError] = []
    for f in files:
        try:
            scenarios.append(load_scenario(f))
        except ConfigError as exc:
            errors.append(exc)
    seen: dict[str, str] = {}
    for sc in scenarios:
        if sc.name in seen:
            errors.append(
                ConfigError(
                    f"scenario name {sc.name!r} is also used by {seen[sc.name]}",
                    source=sc.source,
                    hint="names must be unique",
                )
            )
        seen[sc.name] = sc.source
    if not files:
        errors.append(ConfigError("no scenario files found", source=", ".join(paths) or str(library_dir())))
    return scenarios, errors


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        return _main(args, list(argv))
    except ConfigError as exc:
        print(f"tunnel-lab: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunnel-lab: interrupted; every component was stopped", file=sys.stderr)
        return 130
    except BaseExceptionGroup as group:  # trio delivers Ctrl-C inside nurseries as a group
        interrupted, rest = group.split(KeyboardInterrupt)
        if interrupted is None or rest is not None:
            raise
        print("tunnel-lab: interrupted; every component was stopped", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    server = _early_fork_server(args)
    try:
        return _load_and_run(args, argv, server)
    finally:
        if server is not None:
            server.close()  # run_all has closed it already, unless the run did not get that far


def _early_fork_server(args: argparse.Namespace) -> ForkServer | None:
    """The run's fork server (lab/runner/forkserver.py), started before the scenario files are loaded so
    that its imports (0.2 CPU-s) overlap with that; not for what starts no lab process here (`--list`,
    `--check`, `--compare`, a run that moves into a network namespace first)."""
    moves = (args.connector == "cloudflared" or args.isolate) and not netns.inside()
    if not args.fork_server or args.list or args.check or args.compare or moves:
        return None
    from tunnel_lab.lab.runner import bytecode, forkserver
    from tunnel_lab.lab.runner.procs import child_env

    bytecode.warm()  # before the server imports the lab: it writes no bytecode itself
    return forkserver.start_server(child_env())


def _load_and_run(args: argparse.Namespace, argv: list[str], server: ForkServer | None) -> int:
    scenarios, errors = collect(args.paths)
    if errors:
        for err in errors:
            print(f"tunnel-lab: {err}", file=sys.stderr)
        print(f"tunnel-lab: {len(errors)} invalid scenario file(s); nothing was started", file=sys.stderr)
        return 2
    selected = [s for s in scenarios if matches(s, args.pattern)]
    if args.shard:
        selected = shard(selected, *parse_shard(args.shard))
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1", source="--jobs")
    if args.list or args.check:
        for sc in selected:
            tags = f" [{', '.join(sc.tags)}]" if sc.tags else ""
            print(
                f"{sc.name}{tags}: {sc.description.strip().splitlines()[0] if sc.description.strip() else ''}"
            )
        if args.check:
            print(f"{len(scenarios)} scenario file(s) valid; {len(selected)} selected")
        return 0
    if not selected:
        print("tunnel-lab: no scenario matches the selection", file=sys.stderr)
        return 2 if args.pattern else 0
    if args.compare:
        return _compare(selected, args, argv)
    if args.connector == "cloudflared":
        if not args.cloudflared:
            raise ConfigError(
                "--connector cloudflared needs --cloudflared PATH",
                source="--cloudflared",
                hint="or set TUNNEL_LAB_CLOUDFLARED",
            )
        args.cloudflared = cloudflared.check_path(args.cloudflared)
    needs_netns = args.connector == "cloudflared" or args.isolate
    if needs_netns and not netns.inside():
        ok, why = netns.available()
        if not ok:
            if args.connector == "cloudflared":
                raise ConfigError(
                    f"cannot isolate cloudflared: {why}",
                    source="--connector",
                    hint="a real cloudflared must run in a private network namespace",
                )
            raise ConfigError(f"--isolate: {why}", source="--isolate")
        # Paths must survive the re-exec: make them absolute first.
        fixed = _absolute_args(argv, args)
        return netns.reexec(fixed)
    if netns.inside():
        netns.enter_inside()
    capabilities = cloudflared.BUILTIN
    if args.connector == "cloudflared":
        # Inside the namespace now: the binary may run. What it lacks is left out or skipped per scenario.
        capabilities = cloudflared.probe(args.cloudflared)
        print(f"tunnel-lab: {capabilities.summary()}", file=sys.stderr)
    from tunnel_lab.lab.runner.runall import run_all

    return run_all(selected, args, capabilities, server)


def _compare(selected: list[Scenario], args: argparse.Namespace, argv: list[str]) -> int:
    from tunnel_lab.lab.runner import comparerun

    if args.connector != "builtin" or "--cloudflared" in argv:
        raise ConfigError(
            "--compare names both connectors; --connector and --cloudflared do not apply",
            source="--compare",
            hint="e.g. --compare builtin,/path/to/cloudflared",
        )
    sides = comparerun.parse_sides(args.compare)
    binary = any(s.binary for s in sides)
    if (binary or args.isolate) and not netns.inside():
        ok, why = netns.available()
        if not ok:
            raise ConfigError(
                f"cannot isolate the run: {why}",
                source="--compare",
                hint="a cloudflared binary must run in a private network namespace",
            )
        return netns.reexec(comparerun.compare_argv(_absolute_args(argv, args), sides))
    if netns.inside():
        netns.enter_inside()
    return comparerun.compare_all(selected, args, sides)


def _absolute_args(argv: list[str], args: argparse.Namespace) -> list[str]:
    out = [a for a in argv]
    for opt in ("--junit", "--json", "--results", "--cloudflared"):
        value = getattr(args, opt.lstrip("-"))
        if value and opt in out:
            i = out.index(opt)
            out[i + 1] = os.path.abspath(value)
    if "--results" not in out:
        out += ["--results", os.path.abspath(args.results)]
    if args.paths:
        out = [os.path.abspath(a) if a in args.paths else a for a in out]
    else:
        out.append(str(library_dir()))
    return out


if __name__ == "__main__":
    start = time.monotonic()
    sys.exit(main(sys.argv[1:]))

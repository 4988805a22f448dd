"""`tunnel-lab bench library`: the wall time of the bundled scenario library against issue 16's targets.

Each configuration (our connector over http2 and over QUIC; with `--cloudflared PATH` the real cloudflared
over both as well) is one `tunnel-lab run` with default settings, as a user types it, in a fresh process;
the figure is the wall time of that command, what a CI job waits for. Beside it: the CPU seconds the run
and everything it started used (its rusage), the scenarios' outcome, and the slowest scenarios. The
targets are 40 s with our connector and 90 s with cloudflared on two cores; the machine's core count and
load average are printed with the figures, since a shared machine stretches every one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnel_lab.lab.runner.procs import TUNNEL_LAB

TARGETS = {"builtin": 40.0, "cloudflared": 90.0}  # seconds on two cores (issue 16, target 6)


@dataclass
class LibraryRun:
    """One `tunnel-lab run` of the library and what it cost."""

    connector: str
    protocol: str
    wall: float = 0.0
    cpu: float = 0.0
    exit_code: int = 0
    summary: dict[str, int] = field(default_factory=dict)
    slowest: list[tuple[str, float]] = field(default_factory=list)
    load_before: float = 0.0
    load_after: float = 0.0

    @property
    def target(self) -> float:
        return TARGETS[self.connector]

    def as_json(self) -> dict[str, Any]:
        return {"connector": self.connector, "protocol": self.protocol, "wall_s": round(self.wall, 1),
                "target_s": self.target, "ratio_to_target": round(self.wall / self.target, 2),
                "cpu_s": round(self.cpu, 1), "exit_code": self.exit_code, "summary": self.summary,
                "slowest": [{"name": n, "seconds": round(s, 1)} for n, s in self.slowest],
                "load_average_before": round(self.load_before, 2),
                "load_average_after": round(self.load_after, 2)}


def run_library(connector: str, protocol: str, workdir: Path, *, cloudflared: str | None,
                extra: list[str]) -> LibraryRun:
    """Run the library once with `connector` over `protocol`; time it and read its report."""
    name = f"{connector}-{protocol}"
    report = workdir / f"{name}.json"
    argv = [*TUNNEL_LAB, "run", "--protocol", protocol, "--json", str(report),
            "--results", str(workdir / name), *extra]
    if connector == "cloudflared":
        argv += ["--connector", "cloudflared", "--cloudflared", str(cloudflared)]
    run = LibraryRun(connector, protocol, load_before=os.getloadavg()[0])
    started = time.perf_counter()
    with open(workdir / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # wait4 gives the CPU of the run and of every process it started and reaped
        _pid, status, usage = os.wait4(proc.pid, 0)
    run.wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    run.exit_code = proc.returncode
    run.cpu = usage.ru_utime + usage.ru_stime
    run.load_after = os.getloadavg()[0]
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return run  # the run did not get as far as its report: the exit code and the log say why
    run.summary = dict(data.get("summary", {}))
    durations = [(s["name"], float(s.get("duration", 0))) for s in data.get("scenarios", [])]
    run.slowest = sorted(durations, key=lambda d: -d[1])[:3]
    return run


def render(runs: list[LibraryRun], cores: int, *, whole: bool) -> str:
    """The table of figures, one configuration a line. The targets apply to the whole library only."""
    lines = [f"{'connector':<12} {'protocol':<8} {'wall s':>7} {'target':>7} {'ratio':>6}  {'CPU s':>6}  "
             f"{'load':>11}  verdict; outcome; slowest"]
    for r in runs:
        outcome = ", ".join(f"{v} {k}" for k, v in r.summary.items() if v)
        verdict = ("met" if r.wall <= r.target else "missed") if whole else "selection (no verdict)"
        slow = ", ".join(f"{n} {s:.0f}s" for n, s in r.slowest)
        lines.append(f"{r.connector:<12} {r.protocol:<8} {r.wall:>7.1f} {r.target:>6.0f}s "
                     f"{r.wall / r.target:>6.2f}  {r.cpu:>6.1f}  {r.load_before:>5.2f}/{r.load_after:<5.2f}  "
                     f"{verdict}; {outcome or f'no report (exit {r.exit_code})'}; {slow}")
    lines.append(f"targets on two cores: under 40 s with our connector, under 90 s with cloudflared; "
                 f"this machine has {cores} core(s); load average before/after each run shown")
    return "\n".join(lines)


def is_selection(run_args: list[str]) -> bool:
    """Whether `tunnel-lab run` options pick part of the library (`-k`, `--shard`, files or folders)."""
    if "-k" in run_args or "--shard" in run_args or any(a.startswith(("-k", "--shard=")) for a in run_args):
        return True
    return any(a.endswith((".yaml", ".yml")) or (not a.startswith("-") and Path(a).is_dir())
               for a in run_args)


def main(argv: list[str]) -> int:
    """Entry point of `tunnel-lab bench library`."""
    parser = argparse.ArgumentParser(prog="tunnel-lab bench library",
                                     description="Time the bundled scenario library against its targets.")
    parser.add_argument("--cloudflared", metavar="PATH",
                        help="also run the library with this cloudflared (in a private network namespace)")
    parser.add_argument("--protocol", choices=["http2", "quic", "both"], default="both",
                        help="the tunnel transport(s) to run the library over (default both)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--workdir", metavar="DIR", help="reports and logs go here (default: a new temp dir)")
    parser.add_argument("run_args", nargs=argparse.REMAINDER,
                        help="after `--`: more `tunnel-lab run` options (e.g. -- --jobs 2 -k http)")
    args = parser.parse_args(argv)
    extra = [a for a in args.run_args if a != "--"] if args.run_args else []
    protocols = ["http2", "quic"] if args.protocol == "both" else [args.protocol]
    connectors = ["builtin"] + (["cloudflared"] if args.cloudflared else [])
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunnel-lab-bench-library-")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    runs: list[LibraryRun] = []
    try:
        for connector in connectors:
            for protocol in protocols:
                print(f"  library, {connector} connector over {protocol} ...", file=sys.stderr, flush=True)
                runs.append(run_library(connector, protocol, workdir, cloudflared=args.cloudflared,
                                        extra=extra))
    except KeyboardInterrupt:
        return 130
    print(render(runs, cores, whole=not is_selection(extra)))
    print(f"reports and logs: {workdir}")
    if args.json:
        document = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cores": cores,
                    "run_args": extra, "runs": [r.as_json() for r in runs]}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    # Missing a target is a figure, not a failure; a scenario that failed is.
    return 1 if any(r.exit_code != 0 for r in runs) else 0

"""`tunnel-lab run --compare A,B`: run each scenario with two connectors and report every difference.

Each selected scenario runs with side A, then with side B (the same `Scenario`, one after the other so
the two runs see the same machine), each into its own results folder (`RESULTS/A-<name>/<scenario>`,
`RESULTS/B-<name>/<scenario>`). The differences come from lab.runner.compare; this module runs, prints and
writes the JSON and JUnit reports.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunnel_lab.lab.runner import cloudflared, compare, netns
from tunnel_lab.lab.runner.engine import ScenarioResult, run_scenario, skip_reason
from tunnel_lab.lab.runner.lab import RunOptions
from tunnel_lab.lab.runner.loader import Scenario
from tunnel_lab.lab.runner.report import merge_histories
from tunnel_lab.lab.runner.runall import run_with_progress
from tunnel_lab.wire.errors import ConfigError

VALUE_WIDTH = 300  # terminal only; the JSON report has every value whole


@dataclass(frozen=True)
class Side:
    """One of the two connectors compared: `builtin`, or a cloudflared(-compatible) binary."""

    letter: str  # "A" or "B"
    kind: str  # "builtin" or "cloudflared" (the key of `known_deviations`)
    binary: str | None = None  # absolute path of the binary

    @property
    def name(self) -> str:
        return "builtin" if self.binary is None else self.binary

    @property
    def folder(self) -> str:
        return f"{self.letter}-{'builtin' if self.binary is None else os.path.basename(self.binary)}"

    def to_json(self) -> dict[str, Any]:
        return {"connector": self.kind, "binary": self.binary, "folder": self.folder}


def parse_sides(values: Sequence[str]) -> tuple[Side, Side]:
    """`--compare A,B` or `--compare A --compare B` -> the two sides; a bad value is a `ConfigError`."""
    specs = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if len(specs) != 2:
        raise ConfigError(
            f"--compare needs exactly two connectors, got {len(specs)}: {', '.join(specs) or 'none'}",
            source="--compare",
            hint="e.g. --compare builtin,/path/to/cloudflared",
        )
    sides: list[Side] = []
    for letter, spec in zip("AB", specs, strict=True):
        if spec == "builtin":
            sides.append(Side(letter, "builtin"))
            continue
        sides.append(Side(letter, "cloudflared", cloudflared.check_path(spec)))
    return sides[0], sides[1]


def compare_argv(argv: Sequence[str], sides: tuple[Side, Side]) -> list[str]:
    """`argv` with every --compare replaced by one naming absolute binary paths (for the netns re-exec)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--compare":
            skip = True
        elif not arg.startswith("--compare="):
            out.append(arg)
    return [*out, "--compare", ",".join(s.name for s in sides)]


@dataclass
class Compared:
    """One scenario's comparison: both runs, the differences and the verdict."""

    scenario: Scenario
    runs: dict[str, ScenarioResult]  # by side letter; empty when skipped up front
    differences: list[compare.Difference]
    verdict: compare.Verdict

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.scenario.name,
            "source": self.scenario.source,
            "status": self.verdict.status,
            "reason": self.verdict.reason,
            "differences": [d.to_json() for d in self.differences],
            "runs": {
                letter: {
                    "status": r.status,
                    "step": r.step,
                    "message": r.message,
                    "duration": round(r.duration, 3),
                    "results_dir": r.results_dir,
                }
                for letter, r in self.runs.items()
            },
        }


def read_origin_history(results_dir: str) -> list[dict[str, Any]]:
    """Every origin history record of one scenario run (the `--history` files the lab gives origins)."""
    records: list[dict[str, Any]] = []
    if not results_dir:
        return records
    for path in sorted(Path(results_dir).glob("origin-*.history.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by an origin killed mid-write
            if isinstance(record, dict):
                records.append({**record, "origin": path.name.removeprefix("origin-").split(".")[0]})
    return records


def observation(result: ScenarioResult) -> compare.RunObservation:
    return compare.RunObservation(
        status=result.status,
        step=result.step,
        message=result.message,
        exchanges=result.exchanges,
        origin=read_origin_history(result.results_dir),
    )


def known_deviations(sc: Scenario) -> Mapping[str, str]:
    # The field arrives with the scenario loader's `known_deviations` (another branch); absent, none.
    known = getattr(sc, "known_deviations", None)
    return known if isinstance(known, Mapping) else {}


def judge(sc: Scenario, sides: tuple[Side, Side], runs: dict[str, ScenarioResult]) -> Compared:
    """Compare the two runs of `sc` (or report the skip)."""
    skipped = [f"{letter}: {r.message}" for letter, r in runs.items() if r.status == "skipped"]
    if skipped:
        return Compared(sc, runs, [], compare.verdict([], {}, [], skipped="; ".join(skipped)))
    diffs = compare.compare_runs(observation(runs["A"]), observation(runs["B"]))
    kinds = [s.kind for s in sides]
    return Compared(sc, runs, diffs, compare.verdict(diffs, known_deviations(sc), kinds))


def compare_all(selected: list[Scenario], args: argparse.Namespace, sides: tuple[Side, Side]) -> int:
    """Run `selected` with both sides; print, write the reports, return the exit code."""
    results_dir = Path(args.results).resolve()
    # each binary is asked what it supports, inside the namespace (a real cloudflared runs nowhere else)
    capabilities = {s.letter: cloudflared.probe(s.binary) if s.binary else cloudflared.BUILTIN for s in sides}
    options = {
        s.letter: RunOptions(
            connector=s.kind,
            cloudflared=s.binary,
            results=results_dir / s.folder,
            keep_state=args.keep_state,
            loglevel=args.loglevel,
            capabilities=capabilities[s.letter],
        )
        for s in sides
    }
    for opt in options.values():
        opt.results.mkdir(parents=True, exist_ok=True)
    console = Console(highlight=False, emoji=False, soft_wrap=True)
    if netns.inside():
        console.print("[dim]running inside a private network namespace: only lo, DNS answers NXDOMAIN[/dim]")
    for s in sides:
        where = escape(str(results_dir / s.folder))
        console.print(f"[bold]{s.letter}[/bold] = {escape(s.name)} [dim](results in {where})[/dim]")
    started = time.monotonic()
    done: list[Compared] = []
    try:
        trio.run(_run, selected, sides, options, args.jobs, args.exitfirst, console, done)
    finally:
        duration = time.monotonic() - started
        order = {s.name: i for i, s in enumerate(selected)}
        done.sort(key=lambda c: order.get(c.scenario.name, 0))
        for s in sides:
            folder = results_dir / s.folder
            merge_histories(folder, [c.scenario.name for c in done], folder / "operations.jsonl")
        if args.json:
            write_json(Path(args.json), done, sides, duration)
        if args.junit:
            write_junit(Path(args.junit), done, sides, duration)
    counts = verdict_counts(done)
    not_run = len(selected) - len(done)
    summary = (
        f"{counts['same']} same, {counts['different']} different, "
        f"{counts['known-deviation']} known deviations, {counts['skipped']} skipped"
        + (f", {not_run} not run" if not_run else "")
        + f" in {duration:.1f}s (A = {sides[0].name}, B = {sides[1].name})"
    )
    bad = counts["different"] or not_run
    # A closing recap, so a long run's verdicts need no scrolling back.
    for status, label in (("different", "different"), ("known-deviation", "known deviation")):
        for c in done:
            if c.verdict.status == status:
                extra = f" ({c.verdict.reason})" if c.verdict.reason else ""
                console.print(
                    escape(f"{label}: {c.scenario.name}, {len(c.differences)} difference(s){extra}")
                )
    console.print(("[red]" if bad else "[green]") + escape(summary))
    return 1 if bad else 0


async def _run(
    selected: list[Scenario],
    sides: tuple[Side, Side],
    options: dict[str, RunOptions],
    jobs: int,
    exitfirst: bool,
    console: Console,
    done: list[Compared],
) -> None:
    limiter = trio.CapacityLimiter(jobs)
    stop = trio.Event()
    running: dict[str, str] = {}

    def render() -> Table:
        table = Table.grid(padding=(0, 1))
        table.add_row(f"[bold]{len(done)}/{len(selected)}[/bold] done", "")
        for name, step in list(running.items()):
            table.add_row(f"[cyan]▶ {escape(name)}[/cyan]", f"[dim]{escape(step)}[/dim]")
        return table

    async def one(sc: Scenario, out: Console) -> None:
        async with limiter:
            if stop.is_set():
                return
            try:
                result = await compare_one(sc)
            finally:
                running.pop(sc.name, None)
            done.append(result)
            print_compared(out, result)
            if exitfirst and result.verdict.status == "different":
                stop.set()

    async def compare_one(sc: Scenario) -> Compared:
        runs: dict[str, ScenarioResult] = {}
        for s in sides:
            reason = skip_reason(sc, options[s.letter])
            if reason:
                runs[s.letter] = ScenarioResult(sc.name, sc.source, "skipped", message=reason)
                return judge(sc, sides, runs)
        for s in sides:

            def on_step(name: str, step: str, letter: str = s.letter) -> None:
                running[name] = f"{letter}: {step}"

            runs[s.letter] = await run_scenario(sc, options[s.letter], on_step=on_step)
            if runs[s.letter].status == "skipped":
                break
        return judge(sc, sides, runs)

    await run_with_progress(console, render, selected, one)


_MARK = {
    "same": "[green]= SAME[/green]",
    "different": "[red]≠ DIFF[/red]",
    "known-deviation": "[yellow]~ KNOWN[/yellow]",
    "skipped": "[yellow]- SKIP[/yellow]",
}


def compared_lines(c: Compared) -> list[str]:
    """The plain-text lines for one scenario: its verdict line, then each difference (step, field, A, B)."""
    n = len(c.differences)
    counted = f"{n} difference{'s' if n != 1 else ''}"
    what = {
        "same": "same",
        "different": counted,
        "known-deviation": f"{counted}, known deviation ({c.verdict.reason})",
        "skipped": f"skipped ({c.verdict.reason})",
    }[c.verdict.status]
    lines = [f"{c.scenario.name}: {what}"]
    for d in c.differences:
        where = d.title + (f" #{d.n}" if d.n is not None else "")
        lines += [f"    {where}: {d.field}", f"        A: {_cut(d.a)}", f"        B: {_cut(d.b)}"]
    return lines


def print_compared(console: Console, c: Compared) -> None:
    first, *rest = compared_lines(c)
    console.print(f"{_MARK[c.verdict.status]} {escape(first)}")
    for line in rest:
        console.print(f"[dim]{escape(line)}[/dim]" if line.startswith("        ") else escape(line))


def verdict_counts(done: Sequence[Compared]) -> dict[str, int]:
    return {
        s: sum(c.verdict.status == s for c in done)
        for s in ("same", "different", "known-deviation", "skipped")
    }


def _cut(text: str) -> str:
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 3] + "..."


def write_json(path: Path, done: Sequence[Compared], sides: tuple[Side, Side], duration: float) -> None:
    summary = verdict_counts(done)
    data = {
        "mode": "compare",
        "a": sides[0].to_json(),
        "b": sides[1].to_json(),
        "duration": round(duration, 3),
        "summary": summary,
        "normalised": [{"name": r.name, "placeholder": r.placeholder, "why": r.why} for r in compare.RULES],
        "scenarios": [c.to_json() for c in done],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_junit(path: Path, done: Sequence[Compared], sides: tuple[Side, Side], duration: float) -> None:
    """One testcase per scenario; a difference is a failure, a known deviation passes (listed in
    system-out), a skip is skipped."""
    suite = ET.Element(
        "testsuite",
        name=f"tunnel-lab compare (A = {sides[0].name}, B = {sides[1].name})",
        tests=str(len(done)),
        failures=str(sum(c.verdict.status == "different" for c in done)),
        errors="0",
        skipped=str(sum(c.verdict.status == "skipped" for c in done)),
        time=f"{duration:.3f}",
    )
    for c in done:
        case = ET.SubElement(
            suite,
            "testcase",
            classname="compare",
            name=c.scenario.name,
            file=c.scenario.source,
            time=f"{sum(r.duration for r in c.runs.values()):.3f}",
        )
        text = "\n".join(compared_lines(c))
        if c.verdict.status == "skipped":
            ET.SubElement(case, "skipped", message=c.verdict.reason)
        elif c.verdict.status == "different":
            el = ET.SubElement(case, "failure", message=f"{len(c.differences)} difference(s) between A and B")
            el.text = text
        elif c.verdict.status == "known-deviation":
            ET.SubElement(case, "system-out").text = text
    path.parent.mkdir(parents=True, exist_ok=True)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)

"""Update docs/mutation-report.md from mutmut's results (run from the repository root after mutmut).

Only the modules the last run covered are rewritten: their table row (counts, and when and at which
commit they were measured) and their section (every surviving mutant with the line it changes, and the
note from docs/mutation-equivalent.txt, `NAME: why it is equivalent`, beside the ones that have one).
Every other module keeps the row and section it already has in the report, so runs of different
modules (in different worktrees, merged later) add up to one report.

A module counts as covered when `scripts/mutation.sh` left `mutants/run-MODULE.txt` (its start and end
time and the commit it ran at), or, failing that, when mutmut has checked any of its mutants;
`--modules` names them instead.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "docs" / "mutation-equivalent.txt"
OUT = ROOT / "docs" / "mutation-report.md"
RUNS = ROOT / "mutants"

COLUMNS = ("mutants", "killed", "survived", "equivalent", "to kill", "no tests", "timeout", "not checked")
INTRO = [
    "# Mutation report: wire/", "",
    "Written by `scripts/mutation_report.py` after `bash scripts/mutation.sh` runs (mutmut; see",
    "docs/testing.md). Each module's row and section come from the last run that covered that module,",
    "measured at the time and commit its row gives (`+uncommitted`: the worktree had changes in",
    "`wire/`, `tests/` or pyproject.toml then). `equivalent`: survivors with a reason in",
    "docs/mutation-equivalent.txt; `to kill`: survivors without one. `not checked`: the run did not",
    "reach those mutants.",
]


@dataclass
class ModuleReport:
    counts: dict[str, int]
    measured: str
    section: list[str] = field(default_factory=list)  # the lines under the module's heading


def mutmut(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def changed_lines(name: str) -> tuple[str, str]:
    diff = mutmut("show", "tunnel_lab." + name).splitlines()  # mutmut knows the import name
    minus = [line[1:].strip() for line in diff if line.startswith("-") and not line.startswith("---")]
    plus = [line[1:].strip() for line in diff if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(minus), " / ".join(plus)


def read_notes() -> dict[str, str]:
    notes = {}
    if NOTES.exists():
        for line in NOTES.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, why = line.partition(":")
                notes[key.strip()] = why.strip()
    return notes


def read_report(path: Path, old_measured: str) -> dict[str, ModuleReport]:
    """The modules of an existing report (rows of modules it never measured are left out).

    A report from before modules were measured separately had one run note above its table and no
    `measured`, `equivalent` or `to kill` columns: each module gets `old_measured` and that note, and
    its equivalent survivors are counted from its section."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    header: list[str] = []
    above_table: list[str] = []
    modules: dict[str, ModuleReport] = {}
    sections: dict[str, list[str]] = defaultdict(list)
    current: str | None = None
    for line in lines:
        if line.startswith("## "):
            current = line.removeprefix("## ").removeprefix("Survivors in ").strip()
            continue
        if current is not None:
            sections[current].append(line)
        elif line.startswith("| module |"):
            header = [cell.strip() for cell in line.strip("|").split("|")]
        elif line.startswith("| wire."):
            cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=False))
            counts = {col: int(cells[col]) for col in COLUMNS if cells.get(col, "").isdigit()}
            if counts.get("not checked") == counts.get("mutants"):
                continue  # never measured
            modules[cells["module"]] = ModuleReport(counts, cells.get("measured", old_measured))
        elif not header:
            above_table.append(line)
    old_format = "measured" not in header
    # the old format's run note: the paragraphs after the title and the intro
    paragraphs = "\n".join(above_table).strip().split("\n\n")[2:] if old_format else []
    for module, report in modules.items():
        body = sections.get(module, [])
        while body and not body[-1].strip():
            body.pop()
        if paragraphs:
            body = ["", *("The note of the run these figures come from: " * (i == 0) + p.replace("\n", " ")
                          for i, p in enumerate(paragraphs)), *body]
        report.section = body
        if old_format:
            equivalent = sum(1 for line in body if line.strip().startswith("equivalent:"))
            report.counts.setdefault("equivalent", equivalent)
            report.counts.setdefault("to kill", report.counts.get("survived", 0) - equivalent)
    return modules


def run_info(module: str) -> list[dict[str, str]]:
    """One entry per `scripts/mutation.sh` run of the module or of some of its mutants, oldest first."""
    path = RUNS / f"run-{module}.txt"
    if not path.exists():
        return []
    return [dict(part.split("=", 1) for part in line.split() if "=" in part)
            for line in path.read_text().splitlines() if line.strip()]


def measured(module: str) -> str:
    runs = run_info(module)
    # the figures come from the last run of all the module's mutants and the partial runs after it
    full = [i for i, r in enumerate(runs)
            if r.get("mutants", "").removeprefix("tunnel_lab.") == f"{module}.*"]
    runs = runs[full[-1]:] if full else runs
    if runs:
        start = datetime.fromisoformat(runs[0]["start"])
        end = datetime.fromisoformat(runs[-1]["end"])
        minutes = sum((datetime.fromisoformat(r["end"]) - datetime.fromisoformat(r["start"])).total_seconds()
                      for r in runs) / 60
        commits = ", ".join(dict.fromkeys(r["commit"] for r in runs))
        again = f", {len(runs)} runs" if len(runs) > 1 else ""
        return (f"{start:%Y-%m-%d %H:%M}-{end:%H:%M} UTC ({minutes:.0f} min of runs{again}, "
                f"{runs[0].get('jobs', '?')} jobs), {commits}")
    meta = ROOT / "mutants" / "tunnel_lab" / (module.replace(".", "/") + ".py.meta")
    when = datetime.fromtimestamp(meta.stat().st_mtime, UTC) if meta.exists() else datetime.now(UTC)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    return f"{when:%Y-%m-%d %H:%M} UTC, {head} (at report time)"


def sort_key(name: str) -> tuple[str, int]:
    function, _, number = name.rpartition("_")
    return function, int(number)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--statuses", help="read `NAME: status` lines from this file instead of "
                        "asking mutmut (for a run assembled from partial runs)")
    parser.add_argument("--modules", nargs="+",
                        help="the modules to rewrite (default: those the run covered)")
    parser.add_argument("--old-measured", default="see the note below",
                        help="when and at which commit the modules of a report without a measured column "
                        "were measured")
    parser.add_argument("--note", default="", help="a paragraph about this run, put in each covered "
                        "module's section")
    args = parser.parse_args()
    text = Path(args.statuses).read_text() if args.statuses else mutmut("results", "--all", "true")
    notes = read_notes()
    statuses: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for name, status in re.findall(r"^\s*(?:tunnel_lab\.)?(wire\.\S+): (.+)$", text, re.M):
        module = name.split(".x")[0]
        statuses[module][status.strip()] += 1
        if status.strip() == "survived":
            survivors[module].append(name)
    if args.modules:
        covered = args.modules
    else:
        covered = sorted(m for m, c in statuses.items()
                         if run_info(m) or sum(c.values()) != c["not checked"])
    modules = read_report(OUT, args.old_measured)
    for module in covered:
        c = statuses[module]
        equivalent = [n for n in survivors[module] if n in notes]
        counts = {"mutants": sum(c.values()), "killed": c["killed"], "survived": c["survived"],
                  "equivalent": len(equivalent), "to kill": c["survived"] - len(equivalent),
                  "no tests": c["no tests"], "timeout": c["timeout"], "not checked": c["not checked"]}
        section = [""]
        if args.note:
            section += [args.note, ""]
        for name in sorted(survivors[module], key=sort_key):
            before, after = changed_lines(name)
            line = f"- `{name.removeprefix(module + '.')}`: `{before}` -> `{after}`"
            if name in notes:
                line += f"  \n  equivalent: {notes[name]}"
            else:
                line += "  \n  not marked equivalent: needs a test (unless one added after this run kills it)"
            section.append(line)
        if not survivors[module]:
            section.append("No surviving mutant.")
        modules[module] = ModuleReport(counts, measured(module), section)
    out = [*INTRO, "",
           "| module | " + " | ".join(COLUMNS) + " | measured |",
           "|---" * (len(COLUMNS) + 2) + "|"]
    for module in sorted(modules):
        report = modules[module]
        cells = [str(report.counts.get(col, "")) for col in COLUMNS]
        out.append(f"| {module} | " + " | ".join(cells) + f" | {report.measured} |")
    for module in sorted(modules):
        out += ["", f"## {module}", *modules[module].section]
    OUT.write_text("\n".join(out) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} (rewrote {', '.join(covered) or 'nothing'})")


if __name__ == "__main__":
    main()

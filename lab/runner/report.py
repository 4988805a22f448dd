"""Outputs of a run: the JSONL operation history, JUnit XML, JSON, and the readable failure report."""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tunnel_lab.wire.redact import Redactor

if TYPE_CHECKING:
    from rich.console import Console

    from tunnel_lab.lab.runner.engine import ScenarioResult


class Recorder:
    """Appends one JSON object per operation (start, request, fault, ...) to a JSONL file."""

    def __init__(self, path: Path, scenario: str, redactor: Redactor | None = None) -> None:
        self.path = path
        self.scenario = scenario
        self.redactor = redactor or Redactor()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file: IO[str] | None = os.fdopen(fd, "a", encoding="utf-8")

    def op(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"time": round(time.time(), 3), "scenario": self.scenario, "op": kind,
                  **self.redactor.value(fields)}
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def merge_histories(results: Path, names: Sequence[str], out: Path) -> None:
    """Concatenate the per-scenario operation logs into one JSONL file, in run order."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as dst:
        for name in names:
            src = results / name / "operations.jsonl"
            if src.exists():
                dst.write(src.read_text(encoding="utf-8"))


# Every status a scenario result can have, in the order summaries list them.
STATUSES = ("passed", "failed", "error", "skipped", "deviation")


def write_junit(path: Path, results: Sequence[ScenarioResult], *, connector: str, duration: float) -> None:
    suite = ET.Element(
        "testsuite",
        name=f"tunnel-lab scenarios ({connector})",
        tests=str(len(results)),
        failures=str(sum(r.status == "failed" for r in results)),
        errors=str(sum(r.status == "error" for r in results)),
        skipped=str(sum(r.status in ("skipped", "deviation") for r in results)),
        time=f"{duration:.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"scenarios.{connector}",
            name=r.name,
            file=r.source,
            time=f"{r.duration:.3f}",
        )
        if r.status == "skipped":
            ET.SubElement(case, "skipped", message=r.message)
        elif r.status == "deviation":
            # JUnit has no such outcome; a skip with the reason keeps CI green and the reason visible.
            el = ET.SubElement(case, "skipped", message=f"known deviation: {r.deviation}")
            el.text = failure_text(r)
        elif r.note:
            ET.SubElement(case, "system-out").text = r.note
        elif r.status in ("failed", "error"):
            el = ET.SubElement(
                case, "failure" if r.status == "failed" else "error", message=f"{r.step}: {r.message}"
            )
            el.text = failure_text(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def write_json(path: Path, results: Sequence[ScenarioResult], *, connector: str, duration: float) -> None:
    summary = {s: sum(r.status == s for r in results) for s in STATUSES}
    data = {
        "connector": connector,
        "duration": round(duration, 3),
        "summary": summary,
        "scenarios": [r.to_json() for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def failure_text(r: ScenarioResult) -> str:
    lines = [f"{r.name} ({r.source}): {r.status.upper()}", f"  at {r.step}", f"  {r.message}"]
    if r.deviation:
        lines.insert(1, f"  known deviation: {r.deviation}")
    for m in r.mismatches:
        lines.append(f"    - {m}")
    for comp, tail in r.logs.items():
        lines.append(f"  last lines of {comp}:")
        lines += [f"    | {line}" for line in tail] or ["    | (empty)"]
    if r.results_dir:
        lines.append(f"  logs and operations: {r.results_dir}")
    return "\n".join(lines)


def print_failure(console: Console, r: ScenarioResult) -> None:
    from rich.markup import escape
    from rich.panel import Panel

    body = [f"[bold]{escape(r.step)}[/bold]", escape(r.message)]
    for m in r.mismatches:
        body.append(f"  [red]✗[/red] {escape(m)}")
    for comp, tail in r.logs.items():
        body.append(f"[dim]── last lines of {escape(comp)} ──[/dim]")
        body += [f"[dim]{escape(line)}[/dim]" for line in tail] or ["[dim](empty)[/dim]"]
    if r.results_dir:
        body.append(f"logs: {escape(r.results_dir)}")
    console.print(
        Panel(
            "\n".join(body),
            title=f"{r.status.upper()}: {escape(r.name)}",
            subtitle=escape(r.source),
            border_style="red",
        )
    )

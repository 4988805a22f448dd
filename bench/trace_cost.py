"""What the protocol trace costs (issue 14): the `lab` path again with tracing on, as same-run ratios.

`lab-traced` runs the request workloads of `lab` through a second edge started with `--trace` and our
connector started with `--trace` (docs/trace.md), on the same machine in the same run, so machine load
mostly cancels out of the traced/untraced ratios. The cost of tracing *off* (one attribute check per
hook) cannot be seen in one run, since the code without the hooks is not there to compare: it was
measured A/B when the hooks went in (docs/trace.md, "Cost") and is within noise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tunnel_lab.bench.quic import BenchRun, cpu_per_request_ms

PATH = "lab-traced"
TWIN = "lab"


def trace_figures(component: str, path: Path) -> dict[str, float]:
    """Size, records and drops of one trace file (from its `trace.end` record), as bench figures."""
    records = 0
    end: dict[str, Any] = {}
    try:
        with path.open("rb") as lines:
            for line in lines:
                records += 1
                if b'"trace.end"' in line:
                    end = json.loads(line)
        size = path.stat().st_size
    except (OSError, ValueError):
        return {f"{component}_trace_missing": 1}
    return {f"{component}_trace_mb": round(size / 1e6, 2), f"{component}_trace_records": records,
            f"{component}_trace_complete": int(bool(end)),
            f"{component}_trace_dropped": float(end.get("dropped") or 0)}


def trace_ratios(runs: Iterable[BenchRun]) -> list[dict[str, Any]]:
    """One row per figure: untraced, traced, traced/untraced (the `trace-files` run is not a figure)."""
    by_key = {(r.workload, r.path): r for r in runs}
    if not any(path == PATH for _, path in by_key):
        return []
    out: list[dict[str, Any]] = []

    def add(figure: str, unit: str, workload: str, read: Callable[[BenchRun | None], float | None]) -> None:
        traced, plain = read(by_key.get((workload, PATH))), read(by_key.get((workload, TWIN)))
        ratio = traced / plain if traced is not None and plain else None
        out.append({"figure": figure, "unit": unit, "traced": _round(traced), "untraced": _round(plain),
                    "ratio": _round(ratio)})

    def figure_of(name: str) -> Callable[[BenchRun | None], float | None]:
        return lambda run: None if run is None or run.failure else run.figures.get(name)

    add("get-c32 requests/s", "req/s", "get-c32", figure_of("requests_per_s"))
    for component in ("edge", "connector"):
        def cpu(run: BenchRun | None, component: str = component) -> float | None:
            return cpu_per_request_ms(run, component)

        add(f"get-c32 {component} CPU per request", "ms", "get-c32", cpu)
    add("get-c1 p50 latency", "ms", "get-c1", figure_of("p50_ms"))
    for workload in ("download", "upload"):
        add(f"bulk {workload}", "MB/s", workload, figure_of("mb_per_s"))
    add("websocket-echo messages/s", "msg/s", "websocket-echo", figure_of("messages_per_s"))
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def render_trace_table(rows: list[dict[str, Any]], files: dict[str, float]) -> str:
    """The traced/untraced rows and what the trace files hold, as plain text."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="The protocol trace's cost: --trace on edge and connector against the lab path, "
                        "same run")
    for column in ("figure", "traced", "untraced", "traced/untraced"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in rows:
        def cell(value: float | None, unit: str = row["unit"]) -> str:
            return "-" if value is None else f"{value:.3g} {unit}"

        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        table.add_row(row["figure"], cell(row["traced"]), cell(row["untraced"]), ratio)
    console = Console(width=170, color_system=None, emoji=False)
    with console.capture() as capture:
        console.print(table)
        for component in ("edge", "connector"):
            if f"{component}_trace_missing" in files:
                console.print(f"{component} trace: missing or unreadable")
            elif f"{component}_trace_records" in files:
                complete = "complete" if files[f"{component}_trace_complete"] else "cut short (no trace.end)"
                console.print(f"{component} trace: {files[f'{component}_trace_mb']:.1f} MB, "
                              f"{files[f'{component}_trace_records']:.0f} records, {complete}, "
                              f"{files[f'{component}_trace_dropped']:.0f} dropped")
    return capture.get()

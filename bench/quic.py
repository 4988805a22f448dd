"""The QUIC paths of `tunnel-lab bench`, as same-run ratios against their http2 twins.

`lab-quic` and `cloudflared-quic` run the very workloads of `lab` and `cloudflared` against the same edge and
origins, with the connector's `--protocol quic`. Each QUIC figure is divided by the http2 figure of the same
run, so machine load mostly cancels out. Issue 16 target 5 asks for QUIC bulk transfers of at least half
of http2's MB/s and small requests within 1.5x of http2's CPU per request (edge and connector each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

QUIC_PATHS = ("lab-quic", "cloudflared-quic")
TWINS = {"lab-quic": "lab", "cloudflared-quic": "cloudflared"}
BULK_MIN_RATIO = 0.5  # QUIC MB/s >= 50 % of http2's
CPU_MAX_RATIO = 1.5  # QUIC CPU per small request <= 1.5x http2's
SMALL = "get-c32"  # the small-request workload the CPU figures come from


class BenchRun(Protocol):
    """What this module reads of a bench run (bench.cli.Run)."""

    workload: str
    path: str
    figures: dict[str, float]
    components: dict[str, dict[str, float]]
    failure: str | None


def cpu_per_request_ms(run: BenchRun | None, component: str) -> float | None:
    """CPU milliseconds `component` spent per request of `run` (None without requests or a reading)."""
    if run is None or run.failure:
        return None
    requests = run.figures.get("requests")
    cpu = run.components.get(component, {}).get("cpu_s")
    if not requests or cpu is None:
        return None
    return 1000.0 * cpu / requests


def quic_ratios(runs: Iterable[BenchRun]) -> list[dict[str, Any]]:
    """One row per (QUIC path, figure): both values, QUIC/http2, and the target when there is one."""
    by_key = {(r.workload, r.path): r for r in runs}
    out: list[dict[str, Any]] = []
    for quic_path, h2_path in TWINS.items():
        if not any(path == quic_path for _, path in by_key):
            continue

        def add(figure: str, unit: str, read: Callable[[BenchRun | None], float | None], workload: str,
                target: str | None = None, ok: Callable[[float], bool] | None = None,
                quic_path: str = quic_path, h2_path: str = h2_path) -> None:
            quic_value = read(by_key.get((workload, quic_path)))
            h2_value = read(by_key.get((workload, h2_path)))
            ratio = quic_value / h2_value if quic_value is not None and h2_value else None
            out.append({"path": quic_path, "versus": h2_path, "figure": figure, "unit": unit,
                        "quic": _round(quic_value), "http2": _round(h2_value), "ratio": _round(ratio),
                        "target": target, "met": None if ratio is None or ok is None else ok(ratio)})

        def figure_of(name: str) -> Callable[[BenchRun | None], float | None]:
            return lambda run: None if run is None or run.failure else run.figures.get(name)

        add(f"{SMALL} requests/s", "req/s", figure_of("requests_per_s"), SMALL)
        for component in ("edge", "connector"):
            def cpu(run: BenchRun | None, component: str = component) -> float | None:
                return cpu_per_request_ms(run, component)

            add(f"{SMALL} {component} CPU per request", "ms", cpu, SMALL, f"<= {CPU_MAX_RATIO}x http2",
                lambda r: r <= CPU_MAX_RATIO)
        add("get-c1 p50 latency", "ms", figure_of("p50_ms"), "get-c1")
        for workload in ("download", "upload"):
            add(f"bulk {workload}", "MB/s", figure_of("mb_per_s"), workload,
                f">= {BULK_MIN_RATIO:.0%} of http2", lambda r: r >= BULK_MIN_RATIO)
        add("post-1mib-c8 requests/s", "req/s", figure_of("requests_per_s"), "post-1mib-c8")
        add("websocket-echo messages/s", "msg/s", figure_of("messages_per_s"), "websocket-echo")
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def render_quic_table(rows: list[dict[str, Any]]) -> str:
    """The QUIC/http2 rows as a plain-text table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="QUIC against http2, same run (issue 16 target 5; reported, not enforced)")
    for column in ("path", "figure", "QUIC", "http2", "QUIC/http2", "target", "met"):
        table.add_column(column, justify="right" if column in ("QUIC", "http2", "QUIC/http2") else "left")
    for row in rows:
        def cell(value: float | None, unit: str = row["unit"]) -> str:
            return "-" if value is None else f"{value:.3g} {unit}"

        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        table.add_row(f"{row['path']} / {row['versus']}", row["figure"], cell(row["quic"]),
                      cell(row["http2"]), ratio, row["target"] or "", met)
    console = Console(width=170, color_system=None, emoji=False)
    with console.capture() as capture:
        console.print(table)
    return capture.get()

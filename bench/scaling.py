"""`tunnel-lab bench --processes N`: does the edge scale with cores? (issue 16 target 4; docs/bench.md)

The same load (GET /status/200, closed loop, 32 keep-alive connections) through the same connector and
origin, against an edge in one process and an edge in N processes (`tunnel-lab edge --processes N`),
alternating for several rounds in one invocation, so machine noise hits both alike. The goal: requests/s
with N processes >= 0.7 x N times one process's (the median ratio of the rounds).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunnel_lab.bench import load
from tunnel_lab.bench.procs import BenchSetupError, Component, lab_command, parse_address, usage_of
from tunnel_lab.lab.runner.procs import free_port

CONCURRENCY = 32
WORKLOAD = f"scaling-get-c{CONCURRENCY}"
TARGET_FACTOR = 0.7


def edge_cpu_s(edge: dict[str, Any], comp: Component) -> float:
    """CPU seconds of the edge's processes: the parent and its workers."""
    pids = [comp.pid, *(p["pid"] for p in edge.get("processes", []) if p["alive"])]
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # a worker that exited mid-run is reported by the edge itself
            total += usage_of(pid).cpu_s
    return total


def one_run(lab: Any, processes: int, round_no: int, connector_binary: list[str], caps: Any,
            urls: dict[str, str], tunnel: tuple[str, Path], seconds: float, host: str, ha: int,
            wait_ready: Callable[..., Any]) -> Any:
    """One edge (N processes), one connector, warm-up, then the timed GETs: a bench Run."""
    from tunnel_lab.bench.cli import Run

    name = f"edge-p{processes}-r{round_no}"
    flags = ["--processes", str(processes)] if processes > 1 else []
    edge_comp, edge = lab.start_edge(name, flags)
    try:
        metrics = f"127.0.0.1:{free_port()}"
        argv = lab.connector_argv(connector_binary, edge, tunnel[0], tunnel[1], metrics, urls, caps)
        connector = lab.start(f"connector-{name}", argv)
        try:
            wait_ready(connector, metrics, ha, timeout=60)
            address = parse_address(edge["http"])
            request = load.get_request(host, "/status/200")
            load.run_requests(address, request, concurrency=4, seconds=0.3)  # warm-up
            cpu_before = edge_cpu_s(edge, edge_comp)
            conn_before = connector.usage().cpu_s
            result = load.run_requests(address, request, concurrency=CONCURRENCY, seconds=seconds)
            run = Run(WORKLOAD, f"edge-p{processes}", client=result.client, errors=result.errors)
            run.figures = {"processes": processes, "round": round_no,
                           "requests_per_s": round(result.requests / result.seconds, 1)
                           if result.seconds else 0.0}
            run.components = {"edge": {"cpu_s": round(edge_cpu_s(edge, edge_comp) - cpu_before, 3)},
                              "connector": {"cpu_s": round(connector.usage().cpu_s - conn_before, 3)},
                              "client": {"cpu_s": round(result.client_cpu_s, 3)}}
            connector.check_alive()
            edge_comp.check_alive()
            return run
        finally:
            connector.stop()
    finally:
        edge_comp.stop()


def bench_scaling(lab: Any, processes: int, rounds: int, connector_binary: list[str], caps: Any,
                  urls: dict[str, str], tunnel: tuple[str, Path], seconds: float, host: str, ha: int,
                  wait_ready: Callable[..., Any],
                  progress: Callable[[str], None] = lambda _: None) -> list[Any]:
    """`rounds` x (1 process, N processes), alternating."""
    if processes < 2:
        raise BenchSetupError("--processes needs N >= 2 (it compares N processes with one)")
    runs = []
    for round_no in range(1, rounds + 1):
        for n in (1, processes):
            progress(f"scaling round {round_no}/{rounds}: edge in {n} process{'es' if n > 1 else ''}")
            runs.append(one_run(lab, n, round_no, connector_binary, caps, urls, tunnel, seconds, host, ha,
                                wait_ready))
    return runs


def scaling_ratios(runs: list[Any], processes: int) -> dict[str, Any]:
    """Per-round ratios (N processes / 1) and their median against the 0.7 x N goal."""
    by_round: dict[int, dict[int, float]] = {}
    for run in runs:
        if run.workload == WORKLOAD:
            by_round.setdefault(int(run.figures["round"]), {})[int(run.figures["processes"])] = \
                run.figures["requests_per_s"]
    ratios = [r[processes] / r[1] for r in by_round.values() if r.get(1) and processes in r]
    median = statistics.median(ratios) if ratios else None
    goal = TARGET_FACTOR * processes
    return {"target": 4, "processes": processes, "rounds": len(ratios),
            "ratios": [round(r, 3) for r in ratios], "median_ratio": round(median, 3) if median else None,
            "goal": f"req/s with {processes} processes >= {goal:g} x one process", "goal_ratio": goal,
            "met": median is not None and median >= goal}


def render_scaling(runs: list[Any], summary: dict[str, Any]) -> str:
    """The terminal table."""
    lines = [f"edge scaling (issue 16 target 4): GET /status/200, c={CONCURRENCY}",
             f"{'round':>5} {'processes':>9} {'req/s':>9} {'edge cpu s':>10} {'connector cpu s':>15} "
             f"{'errors':>6}"]
    for run in runs:
        if run.workload != WORKLOAD:
            continue
        lines.append(f"{run.figures['round']:>5} {run.figures['processes']:>9} "
                     f"{run.figures['requests_per_s']:>9.1f} {run.components['edge']['cpu_s']:>10.2f} "
                     f"{run.components['connector']['cpu_s']:>15.2f} {run.errors:>6}")
    ratios = ", ".join(f"{r:.2f}" for r in summary["ratios"])
    verdict = "met" if summary["met"] else "not met"
    lines.append(f"ratio N/1 per round: {ratios}; median {summary['median_ratio']}; goal >= "
                 f"{summary['goal_ratio']:g}: {verdict}")
    return "\n".join(lines)


def connector_command(cloudflared: Any) -> list[str]:
    """Our connector, or the real cloudflared (cheaper per request: the edge is then more of the cost)."""
    return [cloudflared.binary] if cloudflared is not None else lab_command("connector")

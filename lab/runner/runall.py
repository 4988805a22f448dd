"""Run a list of scenarios with live progress (rich), `--jobs` at a time, and write the reports."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from tunnel_lab.lab.runner import bytecode, netns
from tunnel_lab.lab.runner.cloudflared import BUILTIN, Capabilities
from tunnel_lab.lab.runner.engine import ScenarioResult, run_scenario
from tunnel_lab.lab.runner.forkserver import ForkServer, open_launcher, start_server
from tunnel_lab.lab.runner.lab import RunOptions
from tunnel_lab.lab.runner.loader import Scenario
from tunnel_lab.lab.runner.procs import child_env
from tunnel_lab.lab.runner.report import (
    STATUSES,
    failure_text,
    merge_histories,
    print_failure,
    write_json,
    write_junit,
)

_MARK = {
    "passed": "[green]✓ PASS[/green]",
    "failed": "[red]✗ FAIL[/red]",
    "error": "[red]! ERROR[/red]",
    "skipped": "[yellow]- SKIP[/yellow]",
    "deviation": "[magenta]≈ KNOWN DEVIATION[/magenta]",
}


def run_all(
    selected: list[Scenario], args: argparse.Namespace, capabilities: Capabilities = BUILTIN,
    server: ForkServer | None = None,
) -> int:
    """Run `selected`; print progress, failures and a summary; write reports; return the exit code.
    Processes are forked from `server`, or from one started here (not with `--no-fork-server`)."""
    results_dir = Path(args.results).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    options = RunOptions(
        connector=args.connector,
        cloudflared=args.cloudflared,
        results=results_dir,
        keep_state=args.keep_state,
        loglevel=args.loglevel,
        capabilities=capabilities,
        protocol=getattr(args, "protocol", "http2"),
        trace=bool(getattr(args, "trace", False)),
        edge_processes=int(getattr(args, "edge_processes", 1)),
    )
    console = Console(highlight=False, emoji=False, soft_wrap=True)
    bytecode.warm()  # once here rather than in each of the hundreds of processes the run starts
    if server is None and getattr(args, "fork_server", True):
        server = start_server(child_env())
    if netns.inside():
        console.print("[dim]running inside a private network namespace: only lo, DNS answers NXDOMAIN[/dim]")
    started = time.monotonic()
    results: list[ScenarioResult] = []
    from tunnel_lab.lab.runner.reaper import EXIT_SIGTERM, REAPER, Terminated, until_sigterm

    terminated = False
    REAPER.start()  # cleans up should this process be killed hard
    try:
        trio.run(until_sigterm, _run, selected, options, args.jobs, args.exitfirst, console, results, server)
    except Terminated:
        terminated = True
    finally:
        if server is not None:
            server.close()
        REAPER.stop()
        duration = time.monotonic() - started
        order = {s.name: i for i, s in enumerate(selected)}
        results.sort(key=lambda r: order.get(r.name, 0))
        merge_histories(results_dir, [r.name for r in results], results_dir / "operations.jsonl")
        if args.junit:
            write_junit(Path(args.junit), results, connector=args.connector, duration=duration)
        if args.json:
            write_json(Path(args.json), results, connector=args.connector, duration=duration)
    bad = [r for r in results if r.status in ("failed", "error")]
    for r in bad:
        if console.is_terminal:
            print_failure(console, r)
        else:  # CI logs: plain text, no box wrapped at 80 columns
            print(failure_text(r), flush=True)
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    not_run = len(selected) - len(results)
    summary = (
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['skipped']} skipped"
        + (f", {counts['deviation']} known deviation(s)" if counts["deviation"] else "")
        + (f", {not_run} not run" if not_run else "")
        + f" in {duration:.1f}s ({args.connector} connector); results in {results_dir}"
    )
    console.print(("[red]" if bad or not_run else "[green]") + summary)
    if terminated:
        print("tunnel-lab: terminated (SIGTERM); every component was stopped", file=sys.stderr)
        return EXIT_SIGTERM
    return 1 if bad or not_run else 0


async def _run(
    selected: list[Scenario],
    options: RunOptions,
    jobs: int,
    exitfirst: bool,
    console: Console,
    results: list[ScenarioResult],
    server: ForkServer | None,
) -> None:
    async with open_launcher(server):
        await _run_scenarios(selected, options, jobs, exitfirst, console, results)


async def _run_scenarios(
    selected: list[Scenario],
    options: RunOptions,
    jobs: int,
    exitfirst: bool,
    console: Console,
    results: list[ScenarioResult],
) -> None:
    running: dict[str, str] = {}
    limiter = trio.CapacityLimiter(jobs)
    stop = trio.Event()

    def on_step(name: str, step: str) -> None:
        running[name] = step

    def render() -> Table:
        table = Table.grid(padding=(0, 1))
        done = len(results)
        table.add_row(f"[bold]{done}/{len(selected)}[/bold] done", "")
        for name, step in list(running.items()):
            table.add_row(f"[cyan]▶ {name}[/cyan]", f"[dim]{step}[/dim]")
        return table

    async def one(sc: Scenario, out: Console) -> None:
        async with limiter:
            if stop.is_set():
                return
            running[sc.name] = "starting"
            try:
                result = await run_scenario(sc, options, on_step=on_step)
            finally:
                running.pop(sc.name, None)
            results.append(result)
            extra = f" [dim]{escape(result.message)}[/dim]" if result.status == "skipped" else ""
            if result.status == "deviation":
                extra = (
                    f" [dim]{escape(result.deviation)} (failed at {escape(result.step)}: "
                    f"{escape(result.message[:150])})[/dim]"
                )
            elif result.note:
                extra = f" [magenta]{escape(result.note)}[/magenta]"
            if result.status in ("failed", "error"):
                extra = f" [dim]{result.step}: {result.message[:150]}[/dim]"
                if exitfirst:
                    stop.set()
            out.print(f"{_MARK[result.status]} {sc.name} [dim]({result.duration:.1f}s)[/dim]{extra}")

    await run_with_progress(console, render, selected, one)


def longest_first(selected: list[Scenario]) -> list[Scenario]:
    """The run order: scenarios with a longer `timeout` first (their authors expect them to take long:
    reconnects after a backoff), so that the long ones overlap instead of finishing the run alone."""
    return sorted(selected, key=lambda sc: -sc.timeout)


async def run_with_progress(console: Console, render: Callable[[], Table], selected: list[Scenario],
                            one: Callable[[Scenario, Console], Awaitable[None]]) -> None:
    """`one(scenario, out)` for every scenario at once (each limits itself) under a live progress view
    refreshed from `render()`; `out` is the console to print a finished scenario on."""
    with Live(render(), console=console, refresh_per_second=8, transient=True) as live:
        async with trio.open_nursery() as nursery:

            async def refresher() -> None:
                while True:
                    live.update(render())
                    await trio.sleep(0.125)

            nursery.start_soon(refresher)
            async with trio.open_nursery() as workers:
                for sc in longest_first(selected):
                    workers.start_soon(one, sc, live.console)
                    await trio.sleep(0)  # let it queue on the limiter: start order is queue order
            nursery.cancel_scope.cancel()

"""`tunnel-lab bench`: what the tunnel costs, as ratios against direct-to-origin measured in the same run.

Each workload runs on every path in one invocation: `direct` (the origin itself), `lab` (our edge and our
connector) and, with `--cloudflared PATH`, `cloudflared` (our edge and a real cloudflared, inside a private
network namespace). For every run the CPU seconds and peak RSS of each process are read from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load
from bench.procs import (
    BenchSetupError,
    Component,
    free_port,
    lab_command,
    parse_address,
    ready_connections,
    reset_peak_rss,
    wait_ready_file,
)

HOST = "bench.lab.test"
WS_HOST = "ws.bench.lab.test"
LOCATIONS = ("LAB1", "LAB2", "LAB3", "LAB4", "LAB5")
HA_CONNECTIONS = 4
MIB = 1 << 20


@dataclass(frozen=True)
class Profile:
    """How long and how big each workload is."""

    seconds: float
    bulk_bytes: int
    post_bytes: int
    ws_messages: int

    @classmethod
    def named(cls, quick: bool, tiny: bool = False) -> Profile:
        if tiny:
            return cls(seconds=0.5, bulk_bytes=2 * MIB, post_bytes=64 * 1024, ws_messages=20)
        if quick:
            return cls(seconds=2.0, bulk_bytes=64 * MIB, post_bytes=MIB, ws_messages=200)
        return cls(seconds=8.0, bulk_bytes=1024 * MIB, post_bytes=MIB, ws_messages=2000)


@dataclass
class Run:
    """One workload on one path."""

    workload: str
    path: str
    figures: dict[str, float] = field(default_factory=dict)
    components: dict[str, dict[str, float]] = field(default_factory=dict)
    client: str = "tunnel-lab"
    errors: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "path": self.path, **self.figures, "errors": self.errors,
                "client": self.client, "components": self.components}


class Target:
    """Where a path's requests go, and the processes whose cost is counted for it."""

    def __init__(self, path: str, address: tuple[str, int], counted: dict[str, Component]) -> None:
        self.path = path
        self.address = address
        self.counted = counted

    def measure(self, workload: str, body: Callable[[], load.LoadResult],
                figures: Callable[[load.LoadResult], dict[str, float]]) -> Run:
        before = {name: comp.usage() for name, comp in self.counted.items()}
        for comp in self.counted.values():
            reset_peak_rss(comp.pid)
        result = body()
        run = Run(workload, self.path, figures(result), client=result.client, errors=result.errors)
        for name, comp in self.counted.items():
            after = comp.usage()
            run.components[name] = {"cpu_s": round(after.cpu_s - before[name].cpu_s, 3),
                                    "peak_rss_mb": round(after.peak_rss_mb, 1),
                                    "rss_growth_mb": round(after.peak_rss_mb - before[name].rss_mb, 1)}
        run.components["client"] = {"cpu_s": round(result.client_cpu_s, 3),
                                    "peak_rss_mb": round(result.client_peak_rss_mb, 1)}
        return run


def _rate_figures(result: load.LoadResult) -> dict[str, float]:
    return {"requests_per_s": round(result.requests_per_s, 1), "p50_ms": round(result.percentile_ms(50), 3),
            "p90_ms": round(result.percentile_ms(90), 3), "p99_ms": round(result.percentile_ms(99), 3)}


def _bulk_figures(result: load.LoadResult) -> dict[str, float]:
    return {"mb_per_s": round(result.mb_per_s, 1), "seconds": round(result.seconds, 3)}


def _ws_figures(result: load.LoadResult) -> dict[str, float]:
    return {"messages_per_s": round(result.requests_per_s, 1), "p50_ms": round(result.percentile_ms(50), 3)}


def traffic_workloads(target: Target, profile: Profile, host: str, ws_host: str) -> list[Run]:
    """The request workloads, identical on every path."""
    addr = target.address
    runs: list[Run] = []
    for concurrency in (1, 32, 128):
        def small_get(c: int = concurrency) -> load.LoadResult:
            if load.pick_client() == "wrk":
                return load.run_wrk(f"http://{addr[0]}:{addr[1]}/status/200", host=host, concurrency=c,
                                    seconds=profile.seconds)
            return load.run_requests(addr, load.get_request(host, "/status/200"), concurrency=c,
                                     seconds=profile.seconds)
        runs.append(target.measure(f"get-c{concurrency}", small_get, _rate_figures))
    body = os.urandom(profile.post_bytes)
    runs.append(target.measure(
        "post-1mib-c8",
        lambda: load.run_requests(addr, load.post_request(host, "/upload", body), concurrency=8,
                                  seconds=profile.seconds),
        _rate_figures))
    size = profile.bulk_bytes
    download = f"/large?bytes={size}&seed=1"
    runs.append(target.measure("download", lambda: load.bulk_download(addr, host, download, size),
                               _bulk_figures))
    runs.append(target.measure("upload", lambda: load.bulk_upload(addr, host, "/upload", size),
                               _bulk_figures))
    runs.append(target.measure(
        "websocket-echo", lambda: load.websocket_echo(addr, ws_host, "/", messages=profile.ws_messages),
        _ws_figures))
    return runs


class Lab:
    """The lab for one bench invocation: a state dir, origins, the edge; connectors come and go."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.state = workdir / "state"
        self.components: list[Component] = []

    def start(self, name: str, argv: list[str]) -> Component:
        component = Component(name, argv, self.workdir)
        self.components.append(component)
        return component

    def stop_all(self) -> None:
        for component in reversed(self.components):
            component.stop()

    def admin(self, *args: str) -> str:
        import subprocess

        proc = subprocess.run(lab_command(*args), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BenchSetupError(f"`tunnel-lab {' '.join(args)}` failed: {proc.stderr.strip()}")
        return proc.stdout

    def start_origin(self, kind: str) -> tuple[Component, str]:
        ready = self.workdir / f"origin-{kind}.json"
        argv = lab_command("origin", kind, "--listen", "127.0.0.1:0", "--state", str(self.state),
                           "--ready-file", str(ready))
        comp = self.start(f"origin-{kind}", argv)
        return comp, str(wait_ready_file(comp, ready)["url"])

    def start_edge(self) -> tuple[Component, dict[str, Any]]:
        ready = self.workdir / "edge.json"
        argv = lab_command("edge", "--state", str(self.state), "--http-listen", "127.0.0.1:0",
                           "--api-listen", "127.0.0.1:0", "--ready-file", str(ready))
        for index, location in enumerate(LOCATIONS, start=1):
            argv += ["--tunnel-listen", f"{location}=127.0.0.{index}:0"]
        comp = self.start("edge", argv)
        return comp, wait_ready_file(comp, ready)

    def create_tunnel(self) -> tuple[str, Path]:
        self.admin("tunnel", "--state", str(self.state), "create", "bench")
        self.admin("tunnel", "--state", str(self.state), "route", "dns", "bench", HOST)
        self.admin("tunnel", "--state", str(self.state), "route", "dns", "bench", WS_HOST)
        info = json.loads(self.admin("tunnel", "--state", str(self.state), "list", "--output", "json"))
        tunnel = next(t for t in info if t["name"] == "bench")
        creds = self.state / "credentials" / f"{tunnel['id']}.json"
        return str(tunnel["id"]), creds

    def connector_argv(self, binary: list[str], edge: dict[str, Any], tunnel_id: str, creds: Path,
                       metrics: str, http_url: str, ws_url: str) -> list[str]:
        config = self.workdir / "connector.yml"
        config.write_text(json.dumps({"ingress": [{"hostname": WS_HOST, "service": ws_url},
                                                  {"service": http_url}]}))
        edges: list[str] = []
        for listener in edge["tunnel_listeners"]:
            edges += ["--edge", listener["address"]]
        return [*binary, "tunnel", "--config", str(config), "--no-autoupdate", "--no-prechecks", *edges,
                "--ha-connections", str(HA_CONNECTIONS), "--cacert", edge["ca"], "--metrics", metrics,
                "--grace-period", "2s", "--loglevel", "info", "run", "--protocol", "http2",
                "--credentials-file", str(creds), "--dns-resolver-addrs", "127.0.0.1:53", tunnel_id]


def api(edge: dict[str, Any], method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{edge['api']}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {edge['api_token']}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


def wait_ready(connector: Component, metrics: str, count: int, timeout: float) -> float:
    started = time.perf_counter()
    while ready_connections(metrics) < count:
        connector.check_alive()
        if time.perf_counter() - started > timeout:
            raise BenchSetupError(f"{connector.name}: fewer than {count} connections ready after "
                                  f"{timeout:.0f}s; last log lines:\n{connector.log_tail()}")
        time.sleep(0.005)
    return time.perf_counter() - started


def measure_failover(edge: dict[str, Any], address: tuple[str, int], streak: int = 20,
                     timeout: float = 60.0) -> float:
    """Seconds from taking LAB1 down until `streak` requests in a row succeed again."""
    import socket

    api(edge, "POST", "/faults", {"kind": "dc-down", "location": "LAB1"})
    started = time.perf_counter()
    ok_since: float | None = None
    ok = 0
    while ok < streak:
        if time.perf_counter() - started > timeout:
            raise BenchSetupError("requests did not recover after the data centre went down")
        try:
            with socket.create_connection(address, timeout=5) as sock:
                sock.sendall(load.get_request(HOST, "/status/200"))
                status, _ = load._read_response(sock, bytearray())
            success = status == 200
        except (OSError, load.HTTPClientError):
            success = False
        if success:
            ok_since = ok_since or time.perf_counter()
            ok += 1
        else:
            ok, ok_since = 0, None
            time.sleep(0.01)
    api(edge, "POST", "/faults", {"kind": "dc-up", "location": "LAB1"})
    return (ok_since or time.perf_counter()) - started


def bench_connector_path(lab: Lab, path: str, binary: list[str], edge_comp: Component,
                         edge: dict[str, Any], origins: dict[str, Component], urls: dict[str, str],
                         tunnel: tuple[str, Path], profile: Profile) -> list[Run]:
    metrics = f"127.0.0.1:{free_port()}"
    argv = lab.connector_argv(binary, edge, tunnel[0], tunnel[1], metrics, urls["http"], urls["ws"])
    connector = lab.start(f"connector-{path}", argv)
    ready_s = wait_ready(connector, metrics, HA_CONNECTIONS, timeout=60)
    runs = [Run("ready", path, {"seconds": round(ready_s, 3)})]
    target = Target(path, parse_address(edge["http"]),
                    {"edge": edge_comp, "connector": connector, **origins})
    runs += traffic_workloads(target, profile, HOST, WS_HOST)
    runs.append(Run("failover", path, {"seconds": round(measure_failover(edge, target.address), 3)}))
    connector.stop()
    return runs


def run_bench(profile: Profile, workdir: Path, cloudflared: str | None) -> list[Run]:
    lab = Lab(workdir)
    try:
        http_origin, http_url = lab.start_origin("stream")
        ws_origin, ws_url = lab.start_origin("ws-echo")
        origins = {"origin": http_origin, "ws-origin": ws_origin}
        urls = {"http": http_url, "ws": ws_url}
        runs: list[Run] = []
        direct = Target("direct", parse_address(http_url.split("//", 1)[1]), origins)
        ws_direct = parse_address(ws_url.split("//", 1)[1])
        direct_runs = traffic_workloads(direct, profile, HOST, WS_HOST)
        # The direct WebSocket run must go to the WebSocket origin, not the HTTP one.
        direct_runs[-1] = Target("direct", ws_direct, origins).measure(
            "websocket-echo", lambda: load.websocket_echo(ws_direct, WS_HOST, "/",
                                                          messages=profile.ws_messages), _ws_figures)
        runs += direct_runs
        tunnel = lab.create_tunnel()
        edge_comp, edge = lab.start_edge()
        runs += bench_connector_path(lab, "lab", lab_command("connector"), edge_comp, edge, origins, urls,
                                     tunnel, profile)
        if cloudflared:
            runs += bench_connector_path(lab, "cloudflared", [cloudflared], edge_comp, edge, origins, urls,
                                         tunnel, profile)
        return runs
    finally:
        lab.stop_all()


RATIO_FIGURES = ("requests_per_s", "mb_per_s", "messages_per_s")


def render_table(runs: list[Run]) -> str:
    """A plain-text table: one row per workload, one column group per path, ratios against direct."""
    from rich.console import Console
    from rich.table import Table

    paths = [p for p in ("direct", "lab", "cloudflared") if any(r.path == p for r in runs)]
    table = Table(title="tunnel-lab bench (ratios against direct, same run)")
    table.add_column("workload")
    for path in paths:
        table.add_column(path, justify="right")
    for path in paths[1:]:
        table.add_column(f"{path}/direct", justify="right")
    table.add_column("cpu s (edge / connector / client)", justify="right")
    by_key = {(r.workload, r.path): r for r in runs}
    workloads = list(dict.fromkeys(r.workload for r in runs))
    for workload in workloads:
        cells = [workload]
        for path in paths:
            run = by_key.get((workload, path))
            cells.append(_describe(run) if run else "-")
        for path in paths[1:]:
            cells.append(_ratio(by_key.get((workload, "direct")), by_key.get((workload, path))))
        lab_run = by_key.get((workload, "lab"))
        cells.append(" / ".join(f"{lab_run.components.get(c, {}).get('cpu_s', 0):.2f}"
                                for c in ("edge", "connector", "client")) if lab_run else "-")
        table.add_row(*cells)
    console = Console(record=True, width=160)
    with console.capture():
        console.print(table)
    return console.export_text()


def _describe(run: Run) -> str:
    f = run.figures
    if "requests_per_s" in f:
        return f"{f['requests_per_s']:.0f} req/s p50 {f['p50_ms']:.2f} ms p99 {f['p99_ms']:.2f} ms"
    if "mb_per_s" in f:
        return f"{f['mb_per_s']:.1f} MB/s"
    if "messages_per_s" in f:
        return f"{f['messages_per_s']:.0f} msg/s p50 {f['p50_ms']:.2f} ms"
    return f"{f.get('seconds', 0):.3f} s"


def _ratio(base: Run | None, other: Run | None) -> str:
    if not base or not other:
        return "-"
    for name in RATIO_FIGURES:
        if base.figures.get(name):
            return f"{other.figures.get(name, 0) / base.figures[name]:.0%}"
    return "-"


def main(argv: list[str]) -> int:
    """Entry point of `tunnel-lab bench`."""
    parser = argparse.ArgumentParser(prog="tunnel-lab bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs and 64 MiB bulk transfers")
    parser.add_argument("--tiny", action="store_true", help="smoke run: every figure, almost no load")
    parser.add_argument("--json", metavar="FILE", help="also write the runs as JSON")
    parser.add_argument("--cloudflared", metavar="PATH", help="also bench a real cloudflared (netns)")
    parser.add_argument("--workdir", metavar="DIR", help="keep logs and state here")
    args = parser.parse_args(argv)
    if args.cloudflared and not Path(args.cloudflared).exists() and not shutil.which(args.cloudflared):
        print(f"tunnel-lab bench: no cloudflared at {args.cloudflared}", file=sys.stderr)
        return 2
    profile = Profile.named(args.quick, args.tiny)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunnel-lab-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        runs = run_bench(profile, workdir, args.cloudflared)
    except BenchSetupError as exc:
        print(f"tunnel-lab bench: {exc}\n(logs in {workdir})", file=sys.stderr)
        return 1
    print(render_table(runs))
    print(f"load client: {load.pick_client()}; cores: {os.cpu_count()}; logs: {workdir}")
    if args.json:
        document = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                    "client": load.pick_client(), "runs": [r.as_json() for r in runs]}
        Path(args.json).write_text(json.dumps(document, indent=2))
    return 0

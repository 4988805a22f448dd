"""`tunnel-lab bench`: what the tunnel costs, as ratios against direct-to-origin measured in the same run.

Each workload runs on every path in one invocation: `direct` (the origin itself), `lab` (our edge and our
connector) and, with `--cloudflared PATH`, `cloudflared` (our edge and a real cloudflared; the whole bench
then runs inside a private network namespace). For every run the CPU seconds and peak RSS of each process
are read from /proc. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnel_lab.bench import load, quic, trace_cost
from tunnel_lab.bench import profile as profiling
from tunnel_lab.bench.procs import (
    BenchSetupError,
    Component,
    lab_command,
    parse_address,
    ready_connections,
    reset_peak_rss,
    usage_of,
    wait_ready_file,
)
from tunnel_lab.lab.runner.cloudflared import BUILTIN, BinaryError, Capabilities, check_path, probe
from tunnel_lab.lab.runner.procs import child_env, free_port

HOST = "bench.lab.test"
WS_HOST = "ws.bench.lab.test"
LOCATIONS = ("LAB1", "LAB2", "LAB3", "LAB4", "LAB5")
HA_CONNECTIONS = 4
MIB = 1 << 20
PATHS = ("direct", "lab", trace_cost.PATH, "cloudflared", *quic.QUIC_PATHS)
GET_CONCURRENCY = (1, 32, 128)


@dataclass(frozen=True)
class Profile:
    """How long and how big each workload is."""

    name: str
    seconds: float
    bulk_bytes: int
    post_bytes: int
    ws_messages: int
    many_requests: int  # the `many-requests` workload: RSS growth over this many GETs
    idle_eyeballs: int  # the `idle-eyeballs` workload: edge RSS for this many idle connections

    @classmethod
    def named(cls, quick: bool, tiny: bool = False) -> Profile:
        if tiny:
            return cls("tiny", seconds=0.5, bulk_bytes=4 * MIB, post_bytes=MIB, ws_messages=50,
                       many_requests=200, idle_eyeballs=50)
        if quick:
            return cls("quick", seconds=2.0, bulk_bytes=64 * MIB, post_bytes=MIB, ws_messages=300,
                       many_requests=2000, idle_eyeballs=1000)
        return cls("default", seconds=8.0, bulk_bytes=1024 * MIB, post_bytes=MIB, ws_messages=2000,
                   many_requests=10_000, idle_eyeballs=1000)


@dataclass
class Run:
    """One workload on one path: its figures and what each process cost during it."""

    workload: str
    path: str
    figures: dict[str, float] = field(default_factory=dict)
    components: dict[str, dict[str, float]] = field(default_factory=dict)
    client: str | None = None
    errors: int = 0
    failure: str | None = None

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"workload": self.workload, "path": self.path, **self.figures,
                               "errors": self.errors}
        if self.client:
            doc["client"] = self.client
        if self.components:
            doc["components"] = self.components
        if self.failure:
            doc["failure"] = self.failure
        return doc


class Target:
    """Where a path's requests go (HTTP and WebSocket), and the processes whose cost is counted for it."""

    def __init__(self, path: str, http: tuple[str, int], ws: tuple[str, int],
                 counted: dict[str, Component], profile_dir: Path | None = None) -> None:
        self.path = path
        self.http = http
        self.ws = ws
        self.counted = counted
        self.profile_dir = profile_dir

    def _recording(self, workload: str) -> contextlib.AbstractContextManager[None]:
        if self.profile_dir is None or workload not in profiling.PROFILED_WORKLOADS:
            return contextlib.nullcontext()
        pids = {name: comp.pid for name, comp in self.counted.items() if name in profiling.PROFILED_PROCESSES}
        if not pids:
            return contextlib.nullcontext()
        return profiling.recording(self.profile_dir, f"{workload}-{self.path}", pids)

    def measure(self, workload: str, body: Callable[[], load.LoadResult],
                figures: Callable[[load.LoadResult], dict[str, float]]) -> Run:
        """Run `body` once, with every counted process's CPU and peak RSS read around it."""
        before = {name: comp.usage() for name, comp in self.counted.items()}
        for comp in self.counted.values():
            reset_peak_rss(comp.pid)
        reset_peak_rss(os.getpid())  # bulk and WebSocket clients run in this process
        own_cpu = time.process_time()
        run = Run(workload, self.path)
        try:
            with self._recording(workload):
                result = body()
        except (OSError, load.HTTPClientError, BenchSetupError) as exc:
            run.failure = f"{type(exc).__name__}: {exc}"
            run.errors = 1
            return run
        run.figures = figures(result)
        run.client, run.errors = result.client, result.errors
        for name, comp in self.counted.items():
            after = comp.usage()
            run.components[name] = {"cpu_s": round(after.cpu_s - before[name].cpu_s, 3),
                                    "peak_rss_mb": round(after.peak_rss_mb, 1),
                                    "rss_growth_mb": round(after.peak_rss_mb - before[name].rss_mb, 1)}
        own_peak = usage_of(os.getpid()).peak_rss_mb
        run.components["client"] = {"cpu_s": round(result.client_cpu_s + time.process_time() - own_cpu, 3),
                                    "peak_rss_mb": round(max(result.client_peak_rss_mb, own_peak), 1)}
        return run


def _rate_figures(result: load.LoadResult) -> dict[str, float]:
    return {"requests": result.requests, "requests_per_s": round(result.requests_per_s, 1),
            "p50_ms": round(result.percentile_ms(50), 3),
            "p90_ms": round(result.percentile_ms(90), 3), "p99_ms": round(result.percentile_ms(99), 3)}


def _bulk_figures(result: load.LoadResult) -> dict[str, float]:
    return {"bytes": result.bytes, "mb_per_s": round(result.mb_per_s, 1), "seconds": round(result.seconds, 3)}


def _ws_figures(result: load.LoadResult) -> dict[str, float]:
    return {"messages": result.requests, "messages_per_s": round(result.requests_per_s, 1),
            "p50_ms": round(result.percentile_ms(50), 3),
            "p99_ms": round(result.percentile_ms(99), 3)}


def warm_up(target: Target, profile: Profile) -> None:
    """Open the paths once (and let the origin compute the bulk body's digest) before anything is timed."""
    load.run_requests(target.http, load.get_request(HOST, "/status/200"), concurrency=4, seconds=0.2)
    with socket.create_connection(target.http, timeout=120) as sock:
        sock.settimeout(120)
        sock.sendall(f"HEAD /large?bytes={profile.bulk_bytes}&seed=1 HTTP/1.1\r\nHost: {HOST}\r\n"
                     "Connection: close\r\n\r\n".encode())
        while sock.recv(65536):
            pass


def traffic_workloads(target: Target, profile: Profile) -> list[Run]:
    """The request workloads, identical on every path."""
    warm_up(target, profile)
    runs: list[Run] = []
    for concurrency in GET_CONCURRENCY:
        def small_get(c: int = concurrency) -> load.LoadResult:
            if load.pick_client() == "wrk":
                host, port = target.http
                return load.run_wrk(f"http://{host}:{port}/status/200", host=HOST, concurrency=c,
                                    seconds=profile.seconds)
            return load.run_requests(target.http, load.get_request(HOST, "/status/200"), concurrency=c,
                                     seconds=profile.seconds)
        runs.append(target.measure(f"get-c{concurrency}", small_get, _rate_figures))
    body = os.urandom(profile.post_bytes)
    runs.append(target.measure(
        "post-1mib-c8",
        lambda: load.run_requests(target.http, load.post_request(HOST, "/upload", body), concurrency=8,
                                  seconds=profile.seconds),
        _rate_figures))
    size = profile.bulk_bytes
    runs.append(target.measure(
        "download", lambda: load.bulk_download(target.http, HOST, f"/large?bytes={size}&seed=1", size),
        _bulk_figures))
    runs.append(target.measure("upload", lambda: load.bulk_upload(target.http, HOST, "/upload", size),
                               _bulk_figures))
    runs.append(target.measure(
        "websocket-echo", lambda: load.websocket_echo(target.ws, WS_HOST, "/", messages=profile.ws_messages),
        _ws_figures))
    return runs


def memory_workloads(target: Target, edge_comp: Component, profile: Profile, *, idle: bool) -> list[Run]:
    """`many-requests` (RSS growth of every process over that many GETs) and, when `idle`,
    `idle-eyeballs` (what that many open, idle eyeball connections cost the edge in RSS)."""
    runs = [target.measure(
        "many-requests",
        lambda: load.run_requests(target.http, load.get_request(HOST, "/status/200"), concurrency=32,
                                  seconds=600, total=profile.many_requests),
        _rate_figures)]
    if idle:
        runs.append(measure_idle_eyeballs(target.path, edge_comp, target.http, profile.idle_eyeballs))
    return runs


def measure_idle_eyeballs(path: str, edge_comp: Component, address: tuple[str, int], count: int) -> Run:
    """Edge RSS before opening `count` eyeball connections (one GET each, then idle) and with them open."""
    run = Run("idle-eyeballs", path)
    before = edge_comp.usage()
    try:
        socks = load.idle_connections(address, HOST, "/status/200", count)
    except (OSError, load.HTTPClientError) as exc:
        run.failure, run.errors = f"{type(exc).__name__}: {exc}", 1
        return run
    try:
        after = edge_comp.usage()
    finally:
        for sock in socks:
            sock.close()
    growth = round(after.rss_mb - before.rss_mb, 1)
    run.figures = {"connections": count, "edge_rss_growth_mb": growth}
    run.components = {"edge": {"cpu_s": round(after.cpu_s - before.cpu_s, 3),
                               "peak_rss_mb": round(after.peak_rss_mb, 1), "rss_growth_mb": growth}}
    return run


class Lab:
    """The lab for one bench invocation: a state dir, origins, the edge; connectors come and go."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.state = workdir / "state"
        (self.state / "home").mkdir(parents=True, exist_ok=True)
        self.env = child_env({"TUNNEL_LAB_STATE": str(self.state)}, home=str(self.state / "home"))
        self.components: list[Component] = []

    def start(self, name: str, argv: list[str]) -> Component:
        component = Component(name, argv, self.workdir, self.env)
        self.components.append(component)
        return component

    def stop_all(self) -> None:
        for component in reversed(self.components):
            component.stop()

    def admin(self, *args: str) -> str:
        argv = lab_command("tunnel", "--state", str(self.state), *args)
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=self.env,
                              stdin=subprocess.DEVNULL, timeout=60)
        if proc.returncode != 0:
            raise BenchSetupError(f"`tunnel-lab tunnel {' '.join(args)}` failed: "
                                  f"{(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def start_origin(self, kind: str) -> tuple[Component, tuple[str, int]]:
        ready = self.workdir / f"origin-{kind}.json"
        argv = lab_command("origin", kind, "--listen", "127.0.0.1:0", "--state", str(self.state),
                           "--ready-file", str(ready), "--loglevel", "warning")
        comp = self.start(f"origin-{kind}", argv)
        return comp, parse_address(str(wait_ready_file(comp, ready)["address"]))

    def start_edge(self, name: str = "edge", flags: Sequence[str] = ()) -> tuple[Component, dict[str, Any]]:
        ready = self.workdir / f"{name}.json"
        argv = lab_command("edge", "--state", str(self.state), "--http-listen", "127.0.0.1:0",
                           "--api-listen", "127.0.0.1:0", "--ready-file", str(ready), "--loglevel", "warning",
                           *flags)
        for index, location in enumerate(LOCATIONS, start=1):
            argv += ["--tunnel-listen", f"{location}=127.0.0.{index}:0"]
        comp = self.start(name, argv)
        return comp, wait_ready_file(comp, ready)

    def create_tunnel(self) -> tuple[str, Path]:
        created = json.loads(self.admin("create", "--output", "json", "bench"))
        self.admin("route", "dns", "bench", HOST)
        self.admin("route", "dns", "bench", WS_HOST)
        creds = Path(created.get("credentials_file") or self.state / "credentials" / f"{created['id']}.json")
        return str(created["id"]), creds

    def connector_argv(self, binary: list[str], edge: dict[str, Any], tunnel_id: str, creds: Path,
                       metrics: str, urls: dict[str, str], caps: Capabilities = BUILTIN,
                       protocol: str = "http2") -> list[str]:
        config = self.workdir / "connector.yml"
        config.write_text(json.dumps({"ingress": [{"hostname": WS_HOST, "service": urls["ws"]},
                                                  {"hostname": HOST, "service": urls["http"]},
                                                  {"service": "http_status:404"}]}))
        edges: list[str] = []
        for listener in edge["tunnel_listeners"]:
            edges += ["--edge", listener["address"]]
        # Flags older cloudflared releases lack are left out (lab/runner/cloudflared.py).
        return [*binary, "tunnel", "--config", str(config), "--no-autoupdate",
                *caps.optional("--no-prechecks"), *edges, "--ha-connections", str(HA_CONNECTIONS),
                "--cacert", edge["ca"], "--metrics", metrics,
                "--grace-period", "1s", "--loglevel", "info", "run", "--protocol", protocol,
                "--credentials-file", str(creds), *caps.optional("--dns-resolver-addrs", "127.0.0.1:53"),
                tunnel_id]


def api(edge: dict[str, Any], method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{edge['api']}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {edge['api_token']}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp)
    except (OSError, ValueError) as exc:
        detail = exc.read().decode(errors="replace")[:200] if isinstance(exc, urllib.error.HTTPError) else ""
        raise BenchSetupError(f"edge API {method} {path} failed: {exc} {detail}".rstrip()) from exc


def wait_ready(connector: Component, metrics: str, count: int, timeout: float) -> tuple[float, float]:
    """Seconds from the connector's start until its /ready reports 1, and then `count`, connections."""
    first: float | None = None
    while (ready := ready_connections(metrics)) < count:
        if ready and first is None:
            first = time.perf_counter() - connector.started_at
        connector.check_alive()
        if time.perf_counter() - connector.started_at > timeout:
            raise BenchSetupError(f"{connector.name}: fewer than {count} connections ready after "
                                  f"{timeout:.0f}s; last lines of {connector.log_path}:\n"
                                  f"{connector.log_tail()}")
        time.sleep(0.002)
    total = time.perf_counter() - connector.started_at
    return (total if first is None else first), total


def _one_get(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.settimeout(5)
            sock.sendall(load.get_request(HOST, "/status/200"))
            status, _, _ = load._read_response(sock, bytearray())
    except (OSError, load.HTTPClientError):
        return False
    return status == 200


def measure_failover(edge: dict[str, Any], address: tuple[str, int], *, streak: int = 50,
                     timeout: float = 60.0) -> tuple[str, float]:
    """Take down the data centre of connection 0; seconds until `streak` requests in a row succeed again.

    The figure is the time of the first success of that unbroken streak (new TCP connection per request,
    so the edge picks a tunnel connection for each one).
    """
    connections = api(edge, "GET", "/connections")
    live = [c for c in connections if c.get("state", "registered") == "registered"]
    location = min(live, key=lambda c: c.get("conn_index", 0))["location"] if live else LOCATIONS[0]
    api(edge, "POST", "/faults", {"kind": "dc-down", "location": location})
    started = time.perf_counter()
    ok_since: float | None = None
    ok = 0
    try:
        while ok < streak:
            if time.perf_counter() - started > timeout:
                raise BenchSetupError(f"requests did not recover within {timeout:.0f}s after {location} "
                                      "went down")
            if _one_get(address):
                ok_since = ok_since or time.perf_counter()
                ok += 1
            else:
                ok, ok_since = 0, None
                time.sleep(0.005)
    finally:
        api(edge, "POST", "/faults", {"kind": "dc-up", "location": location})  # also clears the dc-down
    return location, (ok_since or time.perf_counter()) - started


def bench_connector_path(lab: Lab, path: str, binary: list[str], edge_comp: Component,
                         edge: dict[str, Any], origins: dict[str, Component], urls: dict[str, str],
                         tunnel: tuple[str, Path], profile: Profile,
                         profile_dir: Path | None = None, caps: Capabilities = BUILTIN,
                         protocol: str = "http2") -> list[Run]:
    metrics = f"127.0.0.1:{free_port()}"
    argv = lab.connector_argv(binary, edge, tunnel[0], tunnel[1], metrics, urls, caps, protocol)
    connector = lab.start(f"connector-{path}", argv)
    try:
        first_s, ready_s = wait_ready(connector, metrics, HA_CONNECTIONS, timeout=60)
        runs = [Run("ready", path, {"seconds": round(ready_s, 3), "first_connection_s": round(first_s, 3)},
                    components={"connector": {"cpu_s": round(connector.usage().cpu_s, 3),
                                              "peak_rss_mb": round(connector.usage().peak_rss_mb, 1)}})]
        edge_http = parse_address(edge["http"])
        target = Target(path, edge_http, edge_http, {"edge": edge_comp, "connector": connector, **origins},
                        profile_dir)
        runs += traffic_workloads(target, profile)
        runs += memory_workloads(target, edge_comp, profile, idle=path == "lab")
        failover = Run("failover", path)
        try:
            location, seconds = measure_failover(edge, edge_http)
            failover.figures = {"seconds": round(seconds, 3)}
            failover.client = f"dc-down {location}"
        except BenchSetupError as exc:
            failover.failure, failover.errors = str(exc), 1
        runs.append(failover)
        connector.check_alive()
        return runs
    finally:
        connector.stop()


def bench_traced_path(lab: Lab, origins: dict[str, Component], urls: dict[str, str],
                      tunnel: tuple[str, Path], profile: Profile) -> list[Run]:
    """The request workloads of `lab` again through an edge and our connector both run with `--trace`."""
    traces = {"edge": lab.workdir / "edge.trace.jsonl", "connector": lab.workdir / "connector.trace.jsonl"}
    edge_comp, edge = lab.start_edge("edge-traced", ["--trace", str(traces["edge"])])
    try:
        metrics = f"127.0.0.1:{free_port()}"
        argv = lab.connector_argv(lab_command("connector"), edge, tunnel[0], tunnel[1], metrics, urls)
        at = argv.index("tunnel") + 1
        argv[at:at] = ["--trace", str(traces["connector"])]
        connector = lab.start(f"connector-{trace_cost.PATH}", argv)
        try:
            wait_ready(connector, metrics, HA_CONNECTIONS, timeout=60)
            edge_http = parse_address(edge["http"])
            target = Target(trace_cost.PATH, edge_http, edge_http,
                            {"edge": edge_comp, "connector": connector, **origins})
            runs = traffic_workloads(target, profile)
            connector.check_alive()
        finally:
            connector.stop()  # gracefully: the trace ends with its trace.end record
    finally:
        edge_comp.stop()
    files: dict[str, float] = {}
    for component, path in traces.items():
        files.update(trace_cost.trace_figures(component, path))
    return [*runs, Run("trace-files", trace_cost.PATH, files)]


def run_bench(profile: Profile, workdir: Path, cloudflared: Capabilities | None,
              progress: Callable[[str], None] = lambda _: None, profile_dir: Path | None = None,
              with_quic: bool = True, with_trace: bool = True) -> list[Run]:
    lab = Lab(workdir)
    try:
        http_origin, http_addr = lab.start_origin("stream")
        ws_origin, ws_addr = lab.start_origin("ws-echo")
        origins = {"origin": http_origin, "ws-origin": ws_origin}
        urls = {"http": f"http://{http_addr[0]}:{http_addr[1]}", "ws": f"http://{ws_addr[0]}:{ws_addr[1]}"}
        progress("direct")
        runs = traffic_workloads(Target("direct", http_addr, ws_addr, origins), profile)
        tunnel = lab.create_tunnel()
        edge_comp, edge = lab.start_edge()
        progress("lab")
        runs += bench_connector_path(lab, "lab", lab_command("connector"), edge_comp, edge, origins, urls,
                                     tunnel, profile, profile_dir)
        if with_trace:
            progress(trace_cost.PATH)
            runs += bench_traced_path(lab, origins, urls, tunnel, profile)
        if with_quic:
            # Right after its http2 twin, against the same edge and origins: quic.quic_ratios compares them.
            progress("lab-quic")
            runs += bench_connector_path(lab, "lab-quic", lab_command("connector"), edge_comp, edge, origins,
                                         urls, tunnel, profile, profile_dir, protocol="quic")
        if cloudflared:
            progress("cloudflared")
            runs += bench_connector_path(lab, "cloudflared", [cloudflared.binary], edge_comp, edge, origins,
                                         urls, tunnel, profile, profile_dir, cloudflared)
            if with_quic:
                progress("cloudflared-quic")
                runs += bench_connector_path(lab, "cloudflared-quic", [cloudflared.binary], edge_comp, edge,
                                             origins, urls, tunnel, profile, profile_dir, cloudflared,
                                             protocol="quic")
        for comp in (http_origin, ws_origin, edge_comp):
            comp.check_alive()
        return runs
    finally:
        lab.stop_all()


# --- report -------------------------------------------------------------------------------------------


def _fig(runs: list[Run], workload: str, path: str, name: str) -> float | None:
    for run in runs:
        if run.workload == workload and run.path == path and name in run.figures:
            return run.figures[name]
    return None


def _run(runs: list[Run], workload: str, path: str) -> Run | None:
    return next((r for r in runs if r.workload == workload and r.path == path and not r.failure), None)


def cpu_per_unit_ms(run: Run | None, component: str) -> float | None:
    """CPU milliseconds `component` spent per request (or WebSocket message) of `run`."""
    if run is None:
        return None
    count = run.figures.get("requests") or run.figures.get("messages")
    cpu = run.components.get(component, {}).get("cpu_s")
    if not count or cpu is None:
        return None
    return cpu * 1000 / count


CPU_WORKLOADS = ("get-c32", "post-1mib-c8", "websocket-echo")
TUNNEL_PATHS = ("lab", "cloudflared", *quic.QUIC_PATHS)  # targets 3 and 7 for each


def targets(runs: list[Run]) -> list[dict[str, Any]]:
    """Issue 16's targets 1, 2, 3 and 7, each a figure of this run (ratios between runs of the same
    invocation). Reported, never enforced."""
    out: list[dict[str, Any]] = []

    def add(target: int, path: str, goal: str, value: float | None, ok: Callable[[float], bool],
            unit: str) -> None:
        out.append({"target": target, "path": path, "goal": goal,
                    "value": None if value is None else round(value, 3), "unit": unit,
                    "met": None if value is None else ok(value)})

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    cloudflared = any(r.path == "cloudflared" for r in runs)
    if cloudflared:
        # 1: the edge's CPU against the real connector's, for the same requests (the same run).
        for workload in CPU_WORKLOADS:
            run = _run(runs, workload, "cloudflared")
            add(1, "cloudflared", f"{workload}: edge CPU per request <= cloudflared's",
                ratio(cpu_per_unit_ms(run, "edge"), cpu_per_unit_ms(run, "connector")), lambda v: v <= 1.0,
                "x")
        # 2: our connector against cloudflared, per request (two runs of the same invocation).
        for workload in CPU_WORKLOADS:
            add(2, "lab", f"{workload}: our connector CPU per request <= 1.5x cloudflared's",
                ratio(cpu_per_unit_ms(_run(runs, workload, "lab"), "connector"),
                      cpu_per_unit_ms(_run(runs, workload, "cloudflared"), "connector")),
                lambda v: v <= 1.5, "x")
    for path in TUNNEL_PATHS:
        if not any(r.path == path for r in runs):
            continue
        add(3, path, "GET c=32 req/s >= 40% of direct",
            ratio(_fig(runs, "get-c32", path, "requests_per_s"),
                  _fig(runs, "get-c32", "direct", "requests_per_s")),
            lambda v: v >= 0.40, "ratio")
        direct, tunnel = _fig(runs, "get-c1", "direct", "p50_ms"), _fig(runs, "get-c1", path, "p50_ms")
        add(3, path, "added p50 at c=1 < 1 ms",
            tunnel - direct if direct is not None and tunnel is not None else None, lambda v: v < 1.0, "ms")
        for workload in ("download", "upload"):
            add(3, path, f"bulk {workload} MB/s >= 60% of direct",
                ratio(_fig(runs, workload, path, "mb_per_s"), _fig(runs, workload, "direct", "mb_per_s")),
                lambda v: v >= 0.60, "ratio")
    for path in TUNNEL_PATHS:
        for workload, what in (("download", "a {mib} MiB download"), ("upload", "a {mib} MiB upload"),
                               ("many-requests", "{n} requests")):
            run = _run(runs, workload, path)
            if run is None:
                continue
            what = what.format(n=int(run.figures.get("requests", 0)),
                               mib=int(run.figures.get("bytes", 0)) // MIB)
            for comp in ("edge", "connector"):
                add(7, path, f"{comp} peak RSS growth over {what} < 20 MB",
                    run.components.get(comp, {}).get("rss_growth_mb"), lambda v: v < 20, "MB")
        idle = _run(runs, "idle-eyeballs", path)
        if idle is not None:
            add(7, path, f"edge RSS for {int(idle.figures['connections'])} idle eyeball connections < 50 MB",
                idle.figures["edge_rss_growth_mb"], lambda v: v < 50, "MB")
    for path in TUNNEL_PATHS:  # issue 6's start-up goal (target 0 here), still worth seeing
        if any(r.path == path for r in runs):
            add(0, path, "ready with 4 HA connections < 1 s", _fig(runs, "ready", path, "seconds"),
                lambda v: v < 1.0, "s")
            add(0, path, "first connection ready < 1 s", _fig(runs, "ready", path, "first_connection_s"),
                lambda v: v < 1.0, "s")
    return out


def render_table(runs: list[Run], goals: list[dict[str, Any]]) -> str:
    """Plain-text tables: figures per workload and path, ratios against direct, CPU, and the goals."""
    from rich.console import Console
    from rich.table import Table

    paths = [p for p in PATHS if any(r.path == p for r in runs)]
    by_key = {(r.workload, r.path): r for r in runs}
    workloads = list(dict.fromkeys(r.workload for r in runs))
    figures = Table(title="tunnel-lab bench: figures (ratio = tunnel / direct, same run)")
    figures.add_column("workload")
    for path in paths:
        figures.add_column(path, justify="right")
    for path in paths[1:]:
        figures.add_column(f"{path}/direct", justify="right")
    for workload in workloads:
        cells = [workload]
        cells += [_describe(by_key.get((workload, path))) for path in paths]
        base = by_key.get((workload, "direct"))
        cells += [_ratio(base, by_key.get((workload, path))) for path in paths[1:]]
        figures.add_row(*cells)

    cost = Table(title="cost per run: CPU s / peak RSS MB")
    cost.add_column("workload")
    cost.add_column("path")
    names = ["edge", "connector", "origin", "ws-origin", "client"]
    for name in names:
        cost.add_column(name, justify="right")
    for run in runs:
        if run.components:
            cost.add_row(run.workload, run.path, *[_cost(run.components.get(n)) for n in names])

    per_request = Table(title="CPU ms per request (WebSocket: per message), same runs as above")
    per_request.add_column("workload")
    for path in paths[1:]:
        per_request.add_column(f"edge ({path})", justify="right")
        per_request.add_column(f"connector ({path})", justify="right")
    for workload in (*CPU_WORKLOADS, "get-c1", "get-c128"):
        cells = [workload]
        for path in paths[1:]:
            for comp in ("edge", "connector"):
                value = cpu_per_unit_ms(by_key.get((workload, path)), comp)
                cells.append("-" if value is None else f"{value:.3f}")
        per_request.add_row(*cells)

    goal_table = Table(title="issue 16 targets, each from this run's figures (reported, not enforced)")
    for column in ("target", "path", "goal", "value", "met"):
        goal_table.add_column(column)
    for goal in goals:
        value = goal["value"]
        text = ("-" if value is None else f"{value:.0%}" if goal["unit"] == "ratio"
                else f"{value:.2f}x" if goal["unit"] == "x" else f"{value:.3f} {goal['unit']}")
        met = {True: "yes", False: "NO", None: "-"}[goal["met"]]
        goal_table.add_row(str(goal["target"] or "-"), goal["path"], goal["goal"], text, met)

    console = Console(width=170, color_system=None, emoji=False)
    with console.capture() as capture:
        for table in (figures, cost, per_request, goal_table):
            console.print(table)
    failures = [f"{r.workload} on {r.path}: {r.failure}" for r in runs if r.failure]
    text = capture.get()
    if failures:
        text += "failures:\n" + "\n".join(f"  {line}" for line in failures) + "\n"
    return text


def _cost(usage: dict[str, float] | None) -> str:
    if not usage:
        return "-"
    return f"{usage.get('cpu_s', 0):.2f} / {usage.get('peak_rss_mb', 0):.0f}"


def _describe(run: Run | None) -> str:
    if run is None:
        return "-"
    if run.failure:
        return "FAILED"
    f = run.figures
    errors = f" ({run.errors} err)" if run.errors else ""
    if "requests_per_s" in f:
        return f"{f['requests_per_s']:.0f} req/s p50 {f['p50_ms']:.2f} p99 {f['p99_ms']:.2f} ms{errors}"
    if "mb_per_s" in f:
        return f"{f['mb_per_s']:.1f} MB/s in {f['seconds']:.2f} s{errors}"
    if "messages_per_s" in f:
        return f"{f['messages_per_s']:.0f} msg/s p50 {f['p50_ms']:.2f} ms{errors}"
    if "first_connection_s" in f:
        return f"{f['seconds']:.3f} s (first connection {f['first_connection_s']:.3f} s)"
    if "edge_rss_growth_mb" in f:
        return f"{f['connections']:.0f} open: edge RSS +{f['edge_rss_growth_mb']:.1f} MB"
    return f"{f.get('seconds', 0):.3f} s"


RATIO_FIGURES = ("requests_per_s", "mb_per_s", "messages_per_s")


def _ratio(base: Run | None, other: Run | None) -> str:
    if not base or not other:
        return "-"
    for name in RATIO_FIGURES:
        if base.figures.get(name) and name in other.figures:
            return f"{other.figures[name] / base.figures[name]:.0%}"
    return "-"


# --- command line -------------------------------------------------------------------------------------


def _reexec_in_netns(argv: list[str]) -> int:
    """Run `tunnel-lab bench ARGV` again inside a private network namespace (the runner's set-up)."""
    from tunnel_lab.lab.runner import netns

    ok, why = netns.available()
    if not ok:
        print(f"tunnel-lab: --cloudflared needs a private network namespace: {why}", file=sys.stderr)
        return 1
    env = {**os.environ, netns.MARKER: "1"}
    cmd = ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child",
           *lab_command("bench", *argv)]
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str]) -> int:
    """Entry point of `tunnel-lab bench`."""
    if argv[:1] == ["library"]:  # the scenario library's wall time (bench/library.py)
        from tunnel_lab.bench.library import main as library_main

        return library_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tunnel-lab bench", description=(__doc__ or "").splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 s runs and 64 MiB bulk transfers")
    size.add_argument("--tiny", action="store_true", help="smoke run: every figure, almost no load")
    parser.add_argument("--json", metavar="FILE", help="also write the runs as JSON")
    parser.add_argument("--client", choices=load.CLIENTS, default="auto",
                        help="load client for the small GETs (auto: wrk when installed, else our own)")
    parser.add_argument("--cloudflared", metavar="PATH",
                        help="also bench a real cloudflared (the bench then runs in a private netns)")
    parser.add_argument("--no-quic", action="store_true", dest="no_quic",
                        help="leave out the QUIC paths (lab-quic, cloudflared-quic) and their ratios")
    parser.add_argument("--no-trace", action="store_true", dest="no_trace",
                        help="leave out the lab-traced path (the protocol trace's cost; docs/trace.md)")
    parser.add_argument("--workdir", metavar="DIR", help="keep logs and state here (default: a new temp dir)")
    parser.add_argument("--processes", metavar="N", type=int,
                        help="instead of the paths above: the edge-scaling comparison (issue 16 target 4), "
                             "GET c=32 through an edge in 1 and in N processes, alternating "
                             "(bench/scaling.py)")
    parser.add_argument("--rounds", metavar="R", type=int, default=3,
                        help="with --processes: how many times to run the 1 and N pair (default 3)")
    parser.add_argument("--py-spy", metavar="DIR", dest="py_spy",
                        help="sample edge and connector with py-spy during get-c32, download and upload; "
                             "stacks and summaries go to DIR (figures of such a run are not comparable)")
    args = parser.parse_args(argv)
    if args.py_spy and profiling.available() is None:
        print("tunnel-lab: --py-spy: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    if args.client == "wrk" and not shutil.which("wrk"):
        print("tunnel-lab: --client wrk: wrk is not installed", file=sys.stderr)
        return 2
    load.choose_client(args.client)
    caps: Capabilities | None = None
    if args.cloudflared:
        from tunnel_lab.lab.runner import netns

        try:
            args.cloudflared = check_path(args.cloudflared)
            if not netns.inside():
                fixed = [*_without_option(argv, "--cloudflared"), "--cloudflared", args.cloudflared]
                for option in ("--json", "--py-spy", "--workdir"):
                    value = getattr(args, option[2:].replace("-", "_"))
                    if value:
                        fixed = [*_without_option(fixed, option), option, os.path.abspath(value)]
                return _reexec_in_netns(fixed)
            netns.enter_inside()
            caps = probe(args.cloudflared)  # inside the namespace now: the binary may run
        except BinaryError as exc:
            print(f"tunnel-lab: {exc}", file=sys.stderr)
            return 2
        print(f"tunnel-lab bench: {caps.summary()}", file=sys.stderr)
    profile = Profile.named(args.quick, args.tiny)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunnel-lab-bench-")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    client = load.pick_client()
    load_before = os.getloadavg()[0]
    print(f"tunnel-lab bench: profile {profile.name}, load client {client}, {os.cpu_count()} cores, "
          f"load average {load_before:.2f}, logs in {workdir}", file=sys.stderr)
    if load_before > 0.5 * (os.cpu_count() or 1):
        print("tunnel-lab bench: warning: the machine is busy; figures will be noisy", file=sys.stderr)
    started = time.perf_counter()
    if args.processes is not None:
        return _scaling_main(args, profile, workdir, caps, started)
    try:
        runs = run_bench(profile, workdir, caps,
                         progress=lambda p: print(f"  path {p} ...", file=sys.stderr, flush=True),
                         profile_dir=Path(args.py_spy).absolute() if args.py_spy else None,
                         with_quic=not args.no_quic, with_trace=not args.no_trace)
    except BenchSetupError as exc:
        print(f"tunnel-lab: bench: {exc}\n(logs in {workdir})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    goals = targets(runs)
    quic_goals = quic.quic_ratios(runs)
    print(render_table(runs, goals))
    if quic_goals:
        print(quic.render_quic_table(quic_goals))
    trace_goals = trace_cost.trace_ratios(runs)
    if trace_goals:
        files = next((r.figures for r in runs if r.workload == "trace-files"), {})
        print(trace_cost.render_trace_table(trace_goals, files))
    load_after = os.getloadavg()[0]
    print(f"load client: {client} for GET c=1/32/128, tunnel-lab for the rest; cores: {os.cpu_count()}; "
          f"load average before/after: {load_before:.2f}/{load_after:.2f}; profile: {profile.name}; "
          f"{time.perf_counter() - started:.0f} s; logs: {workdir}")
    if args.json:
        document = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cores": os.cpu_count(),
                    "load_average_before": round(load_before, 2), "load_average_after": round(load_after, 2),
                    "profile": profile.name, "bulk_bytes": profile.bulk_bytes, "client": client,
                    "runs": [r.as_json() for r in runs], "goals": goals, "quic": quic_goals,
                    "trace": trace_goals}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 1 if any(r.failure for r in runs) else 0


def _scaling_main(args: argparse.Namespace, profile: Profile, workdir: Path, caps: Capabilities | None,
                  started: float) -> int:
    """`--processes N`: the edge in 1 and N processes, same load, several rounds (bench/scaling.py)."""
    from tunnel_lab.bench import scaling

    lab = Lab(workdir)
    try:
        _http_origin, http_addr = lab.start_origin("stream")
        _ws_origin, ws_addr = lab.start_origin("ws-echo")
        urls = {"http": f"http://{http_addr[0]}:{http_addr[1]}", "ws": f"http://{ws_addr[0]}:{ws_addr[1]}"}
        runs = scaling.bench_scaling(lab, args.processes, args.rounds, scaling.connector_command(caps),
                                     caps or BUILTIN, urls, lab.create_tunnel(), profile.seconds, HOST,
                                     HA_CONNECTIONS, wait_ready,
                                     progress=lambda p: print(f"  {p} ...", file=sys.stderr, flush=True))
    except BenchSetupError as exc:
        print(f"tunnel-lab: bench: {exc}\n(logs in {workdir})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        lab.stop_all()
    summary = scaling.scaling_ratios(runs, args.processes)
    print(scaling.render_scaling(runs, summary))
    print(f"connector: {'cloudflared' if caps else 'ours'}; cores: {os.cpu_count()}; load average after: "
          f"{os.getloadavg()[0]:.2f}; profile: {profile.name}; {time.perf_counter() - started:.0f} s; "
          f"logs: {workdir}")
    if args.json:
        document = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cores": os.cpu_count(),
                    "profile": profile.name, "runs": [r.as_json() for r in runs], "scaling": summary}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


def _without_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `NAME VALUE` or `NAME=VALUE`."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out

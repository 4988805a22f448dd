"""`tunnel-lab up`: one command brings up a lab to play with, prints what to try, tears down on Ctrl-C.

    tunnel-lab up [--hostname NAME] [--url URL] [--cloudflared PATH] [--datacentres N]
                  [--ha-connections N] [--state DIR] [--topology FILE] [--ready-file PATH]

Built on `lab.api`: an edge (HTTP, HTTPS, management API), a tunnel routed from `--hostname`, a connector
(ours, or a real cloudflared) pointing at `--url` or at a bundled echo origin. With `--cloudflared` the whole
lab re-executes itself inside a private network namespace (`lab.runner.netns`), as `tunnel-lab run` does,
and the printed commands start with `nsenter --target PID --net` to reach it. docs/up.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from tunnel_lab.lab.api import Lab, LabError, cloudflared_path, open_lab
from tunnel_lab.lab.runner import cloudflared, netns
from tunnel_lab.lab.runner.loader import Scenario, parse_yaml, validate
from tunnel_lab.wire.errors import ConfigError, TunnelLabError

PROG = "tunnel-lab up"
DEFAULT_HOSTNAME = "app.lab.test"
_INSIDE_FLAG = "--inside-netns"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Bring up a lab (edge, tunnel, route, connector, origin), print how to use it, and keep "
        "it running until Ctrl-C or SIGTERM; then stop everything.",
    )
    p.add_argument("--hostname", help=f"the hostname routed to the tunnel (default {DEFAULT_HOSTNAME})")
    p.add_argument(
        "--url", help="your own origin server, e.g. http://127.0.0.1:8000 (default: a bundled echo)"
    )
    p.add_argument(
        "--cloudflared",
        metavar="PATH",
        help="run this cloudflared binary as the connector (the lab then runs in a private namespace)",
    )
    p.add_argument("--datacentres", type=int, metavar="N", help="data centres (default 2)")
    p.add_argument(
        "--ha-connections", type=int, metavar="N", help="HA connections (default 1; < data centres)"
    )
    p.add_argument(
        "--state", metavar="DIR", help="state directory, kept afterwards (default: a temporary one, removed)"
    )
    p.add_argument(
        "--topology",
        metavar="FILE",
        help="a scenario file's topology section (or a scenario file) for bigger set-ups (docs/scenarios.md)",
    )
    p.add_argument("--ready-file", metavar="PATH", help="write what is running as JSON here once it is up")
    p.add_argument(
        "--trace",
        metavar="FILE",
        help="the edge writes a protocol trace to FILE (docs/trace.md); the live view draws requests from it",
    )
    p.add_argument("--loglevel", default="info", choices=["debug", "info", "warn", "error"])
    p.add_argument(_INSIDE_FLAG, action="store_true", help=argparse.SUPPRESS)
    return p


# --- the topology file -------------------------------------------------------------------------------------


def load_topology(path: str) -> Scenario:
    """A topology file (the `topology:` mapping of docs/scenarios.md, or a whole scenario file, whose
    topology is taken) as a `Scenario` without steps, checked by the scenario loader (file:line errors)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the topology: {exc}", source=path) from exc
    doc = parse_yaml(text, path)
    if not isinstance(doc.data, dict):
        raise ConfigError("a topology file holds a mapping", source=path, line=1)
    if "topology" in doc.data:
        topology = doc.data["topology"]
    else:
        # The file is the topology itself: its lines move under the `topology` key the schema expects.
        topology = doc.data
        doc.lines = {("topology", *key): line for key, line in doc.lines.items()}
    # The scenario loader checks the topology; the rest of a scenario is not needed here.
    doc.data = {"name": "up", "description": "tunnel-lab up", "topology": topology, "steps": [{"sleep": 0}]}
    validate(doc)
    from tunnel_lab.lab.runner.loader import _build

    scenario = _build(doc)
    if scenario.internet:
        raise ConfigError("topology.internet is for scenarios (`cli` steps)", source=path,
                          hint="to run the connector's own commands by hand, use `tunnel-lab sandbox`")
    if scenario.connector is None:
        raise ConfigError(
            "the topology has no connector",
            source=path,
            hint="add topology.connector (tunnel, url or ingress)",
        )
    return scenario


# --- bringing it up ----------------------------------------------------------------------------------------


async def _setup_simple(lab: Lab, args: argparse.Namespace) -> dict[str, Any]:
    hostname = args.hostname or DEFAULT_HOSTNAME
    tunnel = await lab.create_tunnel("app", hostnames=[hostname])
    url = args.url
    origin_note = "your server"
    if url is None:
        url = (await lab.start_origin("echo")).url
        origin_note = "the bundled echo origin (answers with what it received, as JSON)"
    await lab.start_connector(
        tunnel,
        url=url,
        ha_connections=args.ha_connections or 1,
        cloudflared=args.cloudflared,
    )
    return {"hostnames": [hostname], "url": url, "origin_note": origin_note}


async def _setup_topology(lab: Lab, sc: Scenario, cloudflared_bin: str | None) -> dict[str, Any]:
    for origin in sc.origins:
        if origin.start:
            await lab.start_origin(origin.kind, name=origin.name, tls=origin.tls, hostname=origin.hostname)
    for t in sc.tunnels:
        await lab.create_tunnel(t.name, hostnames=t.dns, networks=t.ip)
    spec = sc.connector
    assert spec is not None
    if spec.credentials != "valid" or spec.token:
        raise ConfigError("tunnel-lab up runs connectors with valid credentials files only", source=sc.source)
    await lab.start_connector(
        lab.tunnels[spec.tunnel],
        url=lab.subst(spec.url) if spec.url else None,
        ingress=lab.subst(list(spec.ingress)) if spec.ingress is not None else None,
        origin_request=lab.subst(spec.origin_request) if spec.origin_request else None,
        warp_routing=spec.warp_routing,
        ha_connections=spec.ha_connections,
        cloudflared=cloudflared_bin,
        flags=lab.subst(list(spec.flags)),
        run_flags=lab.subst(list(spec.run_flags)),
        grace_period=spec.grace_period,
    )
    hostnames = [h for h in lab.tunnels[spec.tunnel].hostnames if not h.startswith("*")]
    origins = ", ".join(f"{o.name} ({o.kind}) {o.url}" for o in lab.origins.values()) or "none"
    return {
        "hostnames": hostnames,
        "url": spec.url or "(ingress rules)",
        "origin_note": f"origins: {origins}",
    }


def _edge_options(sc: Scenario | None, datacentres: int) -> dict[str, Any]:
    if sc is None:
        return {"datacentres": datacentres}
    flags = list(sc.edge.get("flags", []))
    if "origin_timeout" in sc.edge:
        from tunnel_lab.lab.runner.loader import parse_duration

        flags += ["--origin-timeout", f"{parse_duration(sc.edge['origin_timeout']):g}"]
    return {
        "datacentres": sc.datacentres,
        "https": sc.edge.get("https", True),
        "warp": sc.edge.get("warp", False),
        "edge_flags": flags,
    }


def describe(lab: Lab, extra: dict[str, Any], kept: bool) -> dict[str, Any]:
    """What `up` brought up, as the ready file's JSON."""
    edge = lab.edge
    connector = next(iter(lab.connectors.values()))
    return {
        "state": str(lab.state),
        "state_kept": kept,
        "logs": str(lab.logs),
        "hostnames": extra["hostnames"],
        "url": extra["url"],
        "origin_note": extra["origin_note"],
        "tunnel": {"name": connector.tunnel.name, "id": connector.tunnel.id},
        "connector": (connector.component.argv[0] if "tunnel_lab" not in connector.component.argv
                      else "builtin"),
        "datacentres": edge.datacentres,
        "http": edge.http,
        "https": edge.https,
        "warp": edge.warp,
        "api": edge.api,
        "api_token_file": str(lab.state / "api-token"),
        "ca": str(edge.ca),
        "pids": {name: c.pid for name, c in lab.components.items() if c.running},
    }


def banner(info: dict[str, Any], enter: str = "") -> str:
    """What to do next: the hostname, ready curl lines (HTTP and HTTPS with the lab CA), the API."""
    q = shlex.quote
    hosts = info["hostnames"] or ["HOSTNAME"]
    kept = "kept afterwards" if info["state_kept"] else "removed when the lab stops"
    lines = [
        f"tunnel-lab up: the lab is running (state {info['state']}, {kept})",
        f"  tunnel     {info['tunnel']['name']} {info['tunnel']['id']}, routed from {', '.join(hosts)}",
        f"  connector  {info['connector']}, data centres "
        + ", ".join(f"{loc} {addr}" for loc, addr in info["datacentres"].items()),
        f"  origin     {info['url']}: {info['origin_note']}",
    ]
    if enter:
        lines += [
            "",
            "The lab runs in a private network namespace (a real cloudflared must not reach the internet):",
            f"run clients, and your own server, with `{enter.strip()}` in front.",
        ]
    lines += ["", "Try it:"]
    for host in hosts[:3]:
        lines.append(f"  {enter}curl -H {q('Host: ' + host)} http://{info['http']}/")
        if info["https"]:
            port = info["https"].rpartition(":")[2]
            lines.append(
                f"  {enter}curl --cacert {q(info['ca'])} --resolve {q(f'{host}:{port}:127.0.0.1')} "
                f"https://{host}:{port}/"
            )
    lines += [
        "",
        f"Management API: http://{info['api']}/ (bearer token in {info['api_token_file']}), for example",
        f'  {enter}curl -H "Authorization: Bearer $(cat {q(info["api_token_file"])})" http://{info["api"]}/history',
        f"Live view: http://{info['api']}/live (paste the same token; docs/live.md)"
        + (f"; protocol trace: {info['trace']}" if info.get("trace") else ""),
        f"Cloudflare v4 API: https://{info['api']}/client/v4 (lab CA {info['ca']}; docs/sandbox.md), "
        f"a cert.pem for it: `tunnel-lab login --state {q(str(info['state']))} --path cert.pem`",
        f"Logs: {info['logs']}/",
        "Press Ctrl-C (or send SIGTERM) to stop the lab.",
    ]
    return "\n".join(lines)


def _write_json(path: str, data: dict[str, Any]) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(target)


async def _up(args: argparse.Namespace, sc: Scenario | None, announce: bool) -> int:
    code = 0
    stopped_by = ""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                nonlocal stopped_by
                async for sig in signals:
                    stopped_by = signal.Signals(sig).name
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_signal)
            options = _edge_options(sc, args.datacentres or 2)
            if args.trace:
                trace = ["--trace", os.path.abspath(args.trace)]
                options["edge_flags"] = [*options.get("edge_flags", []), *trace]
            async with open_lab(state=args.state, loglevel=args.loglevel, **options) as lab:
                if sc is None:
                    extra = await _setup_simple(lab, args)
                else:
                    extra = await _setup_topology(lab, sc, args.cloudflared)
                info = describe(lab, extra, kept=args.state is not None)
                if args.trace:
                    info["trace"] = os.path.abspath(args.trace)
                if args.ready_file:
                    _write_json(args.ready_file, info)
                if announce:
                    print(banner(info), flush=True)
                # A component that dies ends the lab: a half lab would only confuse.
                async with trio.open_nursery() as watchers:
                    for comp in list(lab.components.values()):
                        watchers.start_soon(_watch, comp, watchers.cancel_scope)
                name, status = next(
                    (
                        (c.name, c.process.returncode)
                        for c in lab.components.values()
                        if c.process is not None and c.process.returncode is not None
                    ),
                    ("?", None),
                )
                print(f"{PROG}: {name} exited with code {status}; stopping the lab", file=sys.stderr)
                for line in lab.log_tails(10).get(name, []):
                    print(f"  | {line}", file=sys.stderr)
                code = 1
            nursery.cancel_scope.cancel()
    if stopped_by:
        print(f"{PROG}: {stopped_by}: every component stopped", file=sys.stderr, flush=True)
    return code


async def _watch(comp: Any, scope: trio.CancelScope) -> None:
    await comp.process.wait()
    scope.cancel()


def _run_in_namespace(argv: list[str], args: argparse.Namespace) -> int:
    """Re-execute `up` inside a private namespace; print its banner with the `nsenter` prefix from here."""
    scratch = Path(tempfile.mkdtemp(prefix="tunnel-lab-up-"))
    ready = Path(args.ready_file).absolute() if args.ready_file else scratch / "ready.json"
    inner = [sys.executable, "-m", "tunnel_lab", "up", *_absolute(argv, args), _INSIDE_FLAG]
    if not args.ready_file:
        inner += ["--ready-file", str(ready)]
    # Ctrl-C reaches the lab inside too (same terminal group); a SIGINT sent to this process alone becomes
    # a SIGTERM for it. Doubles do no harm: `up` stops on the first signal.
    forward: dict[int, int] = {
        signal.SIGTERM: signal.SIGTERM,
        signal.SIGHUP: signal.SIGHUP,
        signal.SIGINT: signal.SIGTERM,
    }
    child = netns.start_isolated(inner)

    def handler(sig: int, _frame: object) -> None:
        pid = netns.namespace_pid(child.pid)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, forward[sig])

    previous = {sig: signal.signal(sig, handler) for sig in forward}
    try:
        deadline = time.monotonic() + 120
        while child.poll() is None and not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # a plain process waiting for another: no event loop to wait on here
        pid = netns.namespace_pid(child.pid)
        if ready.exists() and pid is not None:
            info = json.loads(ready.read_text())
            print(banner(info, enter=f"nsenter --target {pid} --net "), flush=True)
        code = child.wait()
        return 128 - code if code < 0 else code
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        with contextlib.suppress(OSError):
            for f in scratch.iterdir():
                f.unlink()
            scratch.rmdir()


def _absolute(argv: list[str], args: argparse.Namespace) -> list[str]:
    out = list(argv)
    for opt in ("--state", "--topology", "--ready-file", "--cloudflared", "--trace"):
        value = getattr(args, opt.lstrip("-").replace("-", "_"))
        if value and opt in out:
            out[out.index(opt) + 1] = os.path.abspath(value)
        for i, a in enumerate(out):
            if a.startswith(opt + "="):
                out[i] = f"{opt}={os.path.abspath(value)}"
    return out


def main(argv: Sequence[str]) -> int:
    """Entry point of `tunnel-lab up`."""
    argv = list(argv)
    args = build_parser().parse_args(argv)
    try:
        sc = _check(args)
        if args.cloudflared and not args.inside_netns:
            ok, why = netns.available()
            if not ok:
                raise ConfigError(
                    f"cannot isolate cloudflared: {why}",
                    source="--cloudflared",
                    hint="a real cloudflared must run in a private network namespace",
                )
            return _run_in_namespace(argv, args)
        if args.cloudflared:
            cloudflared_path(args.cloudflared)
        return trio.run(_up, args, sc, not args.inside_netns)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except (LabError, TunnelLabError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace) -> Scenario | None:
    """Refuse bad combinations before anything starts."""
    if args.cloudflared:
        args.cloudflared = cloudflared.check_path(args.cloudflared)
    if args.topology:
        given = [
            f
            for f, v in (
                ("--hostname", args.hostname),
                ("--url", args.url),
                ("--datacentres", args.datacentres),
                ("--ha-connections", args.ha_connections),
            )
            if v is not None
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)} and --topology exclude each other",
                source="--topology",
                hint="say it in the topology file",
            )
        return load_topology(args.topology)
    dcs, ha = args.datacentres or 2, args.ha_connections or 1
    if dcs < 1:
        raise ConfigError("needs at least 1 data centre", source="--datacentres")
    if ha < 1 or ha >= dcs:
        raise ConfigError(
            f"--ha-connections {ha} needs at least {ha + 1} data centres, there are {dcs}",
            source="--ha-connections",
            hint="a connector needs more edge addresses than HA connections (docs/protocol.md §9.4)",
        )
    if args.url is not None and not args.url.startswith(("http://", "https://", "tcp://", "unix:")):
        raise ConfigError(
            f"{args.url!r} is not an origin URL", source="--url", hint="e.g. http://127.0.0.1:8000"
        )
    return None

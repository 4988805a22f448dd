"""Run a lab from Python: an edge with data centres, tunnels and routes, connectors, origins, faults.

    from tunnel_lab.lab.api import open_lab                     # trio
    async with open_lab(datacentres=2) as lab:
        tunnel = await lab.create_tunnel("app", hostnames=["app.lab.test"])
        origin = await lab.start_origin("echo")
        await lab.start_connector(tunnel, url=origin.url)
        response = await lab.request("app.lab.test", "/hello")
        await lab.fault("dc-down", location="LAB1")
        print(await lab.history())

    from tunnel_lab.lab.api import start_lab           # plain Python: the same methods, without await
    with start_lab() as lab:
        ...

Every component is a real process started the way the scenario runner starts it (`lab.runner.procs`, the
command lines of docs/architecture.md "Processes"), with its log in `lab.logs`; leaving the context stops
them all (also on errors and Ctrl-C) and removes the state directory unless the caller named it. A real
cloudflared runs only when this process is already in a private network namespace (`tunnel-lab netns --
python my_tests.py`, or `tunnel-lab up --cloudflared`, which re-executes itself there). docs/api.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import trio
import yaml

from tunnel_lab.lab.recorder import Recorder
from tunnel_lab.lab.runner import client, cloudflared, netns
from tunnel_lab.lab.runner.loader import DataCentre
from tunnel_lab.lab.runner.procs import (
    TUNNEL_LAB,
    Component,
    ComponentError,
    child_env,
    free_port,
    run_command,
    tail,
)
from tunnel_lab.lab.runner.reaper import REAPER
from tunnel_lab.wire.errors import TunnelLabError

START_TIMEOUT = 20.0


class LabError(TunnelLabError):
    """A component did not start or stopped, or the lab refused a request. `logs`: each log's last lines."""

    def __init__(self, message: str, logs: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.logs = logs or {}

    def __str__(self) -> str:
        text = super().__str__()
        for name, lines in self.logs.items():
            if lines:
                text += f"\n--- {name} (last lines)\n" + "\n".join(lines)
        return text


@dataclass(frozen=True)
class Edge:
    """Where the running edge listens (`host:port` strings), its CA and its management API token."""

    datacentres: dict[str, str]  # location -> tunnel listener address
    http: str
    https: str | None
    warp: str | None
    api: str
    ca: Path
    api_token: str


@dataclass(frozen=True)
class Tunnel:
    name: str
    id: str
    credentials: Path
    hostnames: tuple[str, ...] = ()


@dataclass(frozen=True)
class Origin:
    name: str
    kind: str
    url: str  # http://127.0.0.1:PORT (https:// with tls, tcp:// for tcp-echo)
    address: str


@dataclass
class Connector:
    """One running connector (ours or a cloudflared binary): its process, metrics address and tunnel."""

    name: str
    tunnel: Tunnel
    metrics: str
    component: Component = field(repr=False)

    @property
    def running(self) -> bool:
        return self.component.running

    async def wait_ready(self, connections: int = 1, timeout: float = START_TIMEOUT) -> int:
        """Wait until `/ready` reports at least `connections` registered connections; returns the count."""
        last: Any = None
        with trio.move_on_after(timeout):
            while True:
                code = self.component.process.returncode if self.component.process else None
                if code is not None:
                    raise LabError(
                        f"connector {self.name} exited with code {code} before {connections} connection(s) "
                        "were ready",
                        {self.name: tail(self.component.log_path)},
                    )
                resp = await client.http_request(self.metrics, host=self.metrics, path="/ready")
                if resp.error is None:
                    try:
                        last = json.loads(bytes(resp.body_prefix)).get("readyConnections")
                    except (ValueError, AttributeError):
                        last = None
                    if isinstance(last, int) and last >= connections:
                        return last
                await trio.sleep(0.05)
        raise LabError(
            f"connector {self.name} did not report {connections} ready connection(s) within {timeout:g}s "
            f"(last readyConnections: {last})",
            {self.name: tail(self.component.log_path)},
        )

    async def stop(self) -> int | None:
        """SIGTERM (a graceful shutdown within its grace period), then SIGKILL; returns the exit code."""
        return await self.component.stop(grace=5.0)


class Lab:
    """A running lab: the edge, the tunnels, origins and connectors started through it. Use `open_lab`."""

    def __init__(self, state: Path, logs: Path, datacentres: Sequence[DataCentre], loglevel: str) -> None:
        self.state = state
        self.logs = logs
        self.datacentres = tuple(datacentres)
        self.loglevel = loglevel
        self.components: dict[str, Component] = {}
        self.tunnels: dict[str, Tunnel] = {}
        self.origins: dict[str, Origin] = {}
        self.connectors: dict[str, Connector] = {}
        self.recorders: list[tuple[Recorder, trio.CancelScope]] = []
        self._edge: Edge | None = None

    @property
    def edge(self) -> Edge:
        if self._edge is None:
            raise LabError("the edge is not running")
        return self._edge

    @property
    def ca(self) -> Path:
        """The lab CA certificate (PEM): give it to clients of the HTTPS eyeball listener."""
        return self.edge.ca

    def _env(self) -> dict[str, str]:
        return child_env({"TUNNEL_LAB_STATE": str(self.state)}, home=str(self.state / "home"))

    def log_tails(self, lines: int = 15) -> dict[str, list[str]]:
        """The last lines of every component's log."""
        return {name: tail(c.log_path, lines) for name, c in self.components.items()}

    async def _start(self, comp: Component, timeout: float) -> dict[str, Any]:
        self.components[comp.name] = comp
        try:
            await comp.start()
            return await comp.wait_ready_file(timeout)
        except (ComponentError, OSError) as exc:
            raise LabError(f"{comp.name} did not start: {exc}", {comp.name: tail(comp.log_path)}) from exc

    # --- the edge -----------------------------------------------------------------------------------------
    async def start_edge(
        self,
        *,
        https: bool = True,
        warp: bool = False,
        flags: Sequence[str] = (),
        timeout: float = START_TIMEOUT,
    ) -> Edge:
        ready = self.state / "edge.ready.json"
        argv = edge_argv(
            self.state,
            [(dc.name, dc.listen()) for dc in self.datacentres],
            ready=ready,
            https="127.0.0.1:0" if https else None,
            warp="127.0.0.1:0" if warp else None,
            flags=flags,
            loglevel=self.loglevel,
        )
        info = await self._start(
            Component("edge", argv, self.logs / "edge.log", env=self._env(), ready_file=ready), timeout
        )
        token = str(info.get("api_token") or "") or (self.state / "api-token").read_text().strip()
        self._edge = Edge(
            datacentres={str(x["location"]): str(x["address"]) for x in info.get("tunnel_listeners", [])},
            http=str(info["http"]),
            https=str(info["https"]) if info.get("https") else None,
            warp=str(info["warp"]) if info.get("warp") else None,
            api=str(info["api"]),
            ca=Path(str(info["ca"])),
            api_token=token,
        )
        return self._edge

    # --- tunnels and routes (the admin commands, as a user runs them) ---------------------------------------
    async def _admin(self, *args: str) -> str:
        argv = [*TUNNEL_LAB, "tunnel", "--state", str(self.state), *args]
        try:
            return await run_command(argv, env=self._env(), log_path=self.logs / "admin.log")
        except ComponentError as exc:
            raise LabError(str(exc)) from exc

    async def create_tunnel(
        self, name: str, *, hostnames: Sequence[str] = (), networks: Sequence[str] = ()
    ) -> Tunnel:
        """`tunnel create NAME`, then `tunnel route dns` for each hostname and `route ip` for each CIDR."""
        created = json.loads(await self._admin("create", name, "--output", "json"))
        tunnel = Tunnel(name, str(created["id"]), Path(created["credentials_file"]))
        self.tunnels[name] = tunnel
        for hostname in hostnames:
            await self.route_dns(tunnel, hostname)
        for cidr in networks:
            await self._admin("route", "ip", "add", cidr, tunnel.id)
        return self.tunnels[name]

    async def delete_tunnel(self, tunnel: Tunnel) -> None:
        """`tunnel delete`: the tunnel, its routes and its credentials file (stop its connector first)."""
        await self._admin("delete", tunnel.id)
        self.tunnels.pop(tunnel.name, None)

    async def route_dns(self, tunnel: Tunnel, hostname: str) -> Tunnel:
        """Route `hostname` (or `*.suffix`) to `tunnel`; returns the tunnel with the hostname added."""
        await self._admin("route", "dns", tunnel.id, hostname)
        known = self.tunnels.get(tunnel.name, tunnel)
        self.tunnels[tunnel.name] = Tunnel(
            known.name, known.id, known.credentials, (*known.hostnames, hostname)
        )
        return self.tunnels[tunnel.name]

    # --- origins ------------------------------------------------------------------------------------------
    async def start_origin(
        self,
        kind: str = "echo",
        *,
        name: str | None = None,
        tls: str | None = None,
        hostname: str | None = None,
        timeout: float = START_TIMEOUT,
    ) -> Origin:
        """Start a bundled origin (`echo`, `hello`, `stream`, `ws-echo`, `tcp-echo`, `misbehave`;
        docs/origins.md) on a free loopback port; `tls` is `valid` (lab CA) or a broken certificate kind."""
        name = name or kind
        if f"origin:{name}" in self.components:
            raise LabError(f"an origin named {name!r} already runs; pass another name=")
        ready = self.state / f"origin-{name}.ready.json"
        argv = origin_argv(
            self.state,
            kind,
            ready=ready,
            history=self.logs / f"origin-{name}.history.jsonl",
            tls=tls,
            hostname=hostname,
        )
        comp = Component(
            f"origin:{name}", argv, self.logs / f"origin-{name}.log", env=self._env(), ready_file=ready
        )
        info = await self._start(comp, timeout)
        origin = Origin(name, kind, str(info["url"]), str(info["address"]))
        self.origins[name] = origin
        return origin

    def origin_history(self, name: str) -> list[dict[str, Any]]:
        """What origin `name` received, one record per request (docs/origins.md, `--history`)."""
        path = self.logs / f"origin-{name}.history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    async def start_recorder(self, url: str) -> tuple[str, Recorder]:
        """A relay in front of the HTTP server at `url` (`http://host:port`) recording what it receives
        (`lab.recorder`); returns the URL to give the connector instead, and the recorder (`records`)."""
        m = re.fullmatch(r"http://(\[[^\]]+\]|[^/:]+):(\d+)(/.*)?", url)
        if m is None:
            raise LabError(f"cannot record what {url} receives: only http://HOST:PORT servers can be read")
        recorder = Recorder(f"{m.group(1).strip('[]')}:{m.group(2)}")
        scope = trio.CancelScope()
        started = trio.Event()

        async def run() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(recorder.serve)
                    started.set()

        # A system task: it must outlive this call (the relay runs until `aclose`), and a nursery held open
        # across `open_lab`'s yield would wrap the caller's own exceptions in an ExceptionGroup.
        trio.lowlevel.spawn_system_task(run)
        await started.wait()
        self.recorders.append((recorder, scope))
        return f"http://{recorder.address}{m.group(3) or ''}", recorder

    def stop_recorder(self, recorder: Recorder) -> None:
        """Stop the relay (its records stay readable)."""
        for rec, scope in self.recorders:
            if rec is recorder:
                scope.cancel()

    # --- connectors ---------------------------------------------------------------------------------------
    async def start_connector(
        self,
        tunnel: Tunnel,
        *,
        url: str | None = None,
        ingress: Sequence[dict[str, Any]] | None = None,
        origin_request: dict[str, Any] | None = None,
        warp_routing: bool = False,
        ha_connections: int = 1,
        cloudflared: str | None = None,
        name: str = "connector",
        flags: Sequence[str] = (),
        run_flags: Sequence[str] = (),
        grace_period: float = 2.0,
        wait_ready: bool = True,
        timeout: float = START_TIMEOUT,
        protocol: str = "http2",
    ) -> Connector:
        """Run a connector for `tunnel` against every data centre: ours, or the cloudflared binary at
        `cloudflared` (only inside a private network namespace). `url` or `ingress` say where requests go;
        `protocol` is the transport (http2 or quic).
        Waits for `ha_connections` registered connections unless `wait_ready=False`."""
        if name in self.connectors and self.connectors[name].running:
            raise LabError(f"a connector named {name!r} already runs; pass another name=")
        if ha_connections >= len(self.datacentres):
            raise LabError(
                f"ha_connections={ha_connections} needs at least {ha_connections + 1} data centres, the lab "
                f"has {len(self.datacentres)} (a connector needs more edge addresses than HA connections, "
                "docs/protocol.md §9.4)"
            )
        if url is not None and ingress is not None:
            raise LabError("url and ingress exclude each other")
        # `cloudflared` (the parameter) hides the module here: _probe and _builtin reach it.
        if cloudflared is not None:
            exe = [cloudflared_path(cloudflared)]
            caps = await trio.to_thread.run_sync(_probe, exe[0])
        else:
            exe = [*TUNNEL_LAB, "connector"]
            caps = _builtin()
        config: dict[str, Any] = {"ingress": list(ingress)} if ingress is not None else {}
        if origin_request:
            config["originRequest"] = dict(origin_request)
        if warp_routing:
            config["warp-routing"] = {"enabled": True}
        cfg_path = self.state / f"{name}.yml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        metrics = f"127.0.0.1:{free_port()}"
        argv = connector_argv(
            exe,
            caps,
            config=cfg_path,
            edges=list(self.edge.datacentres.values()),
            ha_connections=ha_connections,
            ca=self.edge.ca,
            metrics=metrics,
            grace_period=grace_period,
            loglevel=self.loglevel,
            flags=flags,
            credentials=tunnel.credentials,
            # ours has no use for it (docs/connector.md); cloudflared logs one more error without it
            dns_resolver=cloudflared is not None,
            url=url,
            run_flags=run_flags,
            tunnel_id=tunnel.id,
            protocol=protocol,
        )
        comp = Component(name, argv, self.logs / f"{name}.log", env=self._env())
        self.components[name] = comp
        connector = Connector(name, tunnel, metrics, comp)
        self.connectors[name] = connector
        try:
            await comp.start()
        except OSError as exc:
            raise LabError(f"cannot start connector {name}: {exc.strerror or exc}") from exc
        if wait_ready:
            await connector.wait_ready(ha_connections, timeout)
        return connector

    def variables(self) -> dict[str, str]:
        """The values a scenario's `${...}` names (docs/scenarios.md), for what runs in this lab."""
        out = {"state": str(self.state)}
        for origin in self.origins.values():
            host, _, port = origin.address.rpartition(":")
            prefix = f"origins.{origin.name}"
            out |= {f"{prefix}.url": origin.url, f"{prefix}.address": origin.address}
            out |= {f"{prefix}.host": host, f"{prefix}.port": port}
        if self._edge is not None:
            edge = self._edge
            for key, value in (
                ("http", edge.http),
                ("https", edge.https),
                ("warp", edge.warp),
                ("api", edge.api),
            ):
                if value:
                    out[f"edge.{key}"] = value
            out["edge.ca"] = str(edge.ca)
            out |= {f"datacenters.{loc}.address": address for loc, address in edge.datacentres.items()}
        for t in self.tunnels.values():
            out |= {f"tunnels.{t.name}.id": t.id, f"tunnels.{t.name}.name": t.name}
        return out

    def subst(self, value: Any) -> Any:
        """`value` with every `${...}` in its strings replaced (recursively); unknown names: `LabError`."""
        if isinstance(value, str):
            known = self.variables()

            def repl(m: re.Match[str]) -> str:
                if m.group(1) not in known:
                    raise LabError(f"${{{m.group(1)}}} has no value (is that component running?)")
                return known[m.group(1)]

            return re.sub(r"\$\{([^}]*)\}", repl, value)
        if isinstance(value, dict):
            return {k: self.subst(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.subst(v) for v in value]
        return value

    # --- eyeballs and the management API ------------------------------------------------------------------
    async def request(
        self,
        hostname: str,
        path: str = "/",
        *,
        method: str = "GET",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        https: bool = False,
        http2: bool = False,
    ) -> client.Response:
        """One eyeball request to the edge for `hostname` (HTTP/1.1, or HTTPS with h2 when `http2`).
        Transport failures are in `Response.error`; statuses never raise."""
        tls = https or http2
        address, ca_path = self._eyeball_address(tls)
        return await client.http_request(address, method=method, host=hostname, path=path, headers=headers,
                                         body=body, body_length=len(body) if body is not None else None,
                                         tls=tls, ca_path=ca_path, http2=http2)

    async def websocket(
        self,
        hostname: str,
        path: str = "/",
        messages: Sequence[str | bytes] = (),
        *,
        headers: Sequence[tuple[str, str]] = (),
        https: bool = False,
    ) -> client.WebSocketResult:
        """Open a WebSocket to `hostname` through the edge, send each message and read one back after each
        (`status` 101 when accepted; transport failures in `error`)."""
        address, ca_path = self._eyeball_address(https)
        return await client.websocket_exchange(address, host=hostname, path=path, messages=messages,
                                               headers=headers, tls=https, ca_path=ca_path)

    def _eyeball_address(self, tls: bool) -> tuple[str, str | None]:
        """The edge's eyeball listener for plain HTTP or TLS, and the CA file to trust for TLS."""
        address = self.edge.https if tls else self.edge.http
        if address is None:
            raise LabError("the edge has no HTTPS listener (open_lab(https=True))")
        return address, str(self.edge.ca) if tls else None

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the edge's management API (docs/edge.md); returns the parsed JSON answer."""
        try:
            return await management_call(self.edge.api, self.edge.api_token, method, path, body)
        except LabError as exc:
            raise LabError(str(exc), {"edge": tail(self.logs / "edge.log")}) from exc

    async def fault(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Inject a fault: `drop-connection`, `goaway`, `dc-down`, `dc-up`, ... (docs/edge.md)."""
        answer: dict[str, Any] = await self.api("POST", "/faults", {"kind": kind, **fields})
        return answer

    async def clear_faults(self) -> None:
        """Clear every active fault (data centres up again, valid certificates back)."""
        await self.api("DELETE", "/faults")

    async def history(self, since: int = 0) -> list[dict[str, Any]]:
        """The edge's request history from sequence number `since` on."""
        records: list[dict[str, Any]] = await self.api("GET", f"/history?since={since}")
        return records

    async def connections(self) -> list[dict[str, Any]]:
        """The live tunnel connections the edge holds."""
        conns: list[dict[str, Any]] = await self.api("GET", "/connections")
        return conns

    # --- teardown -----------------------------------------------------------------------------------------
    async def stop(self, name: str) -> int | None:
        """Stop one component (`connector`, `origin:echo`, ...): SIGTERM, then SIGKILL; its exit code."""
        comp = self.components.get(name)
        if comp is None:
            raise LabError(f"no component {name!r} (have: {', '.join(self.components) or 'none'})")
        with trio.CancelScope(shield=True):
            code = await comp.stop(grace=2.0)
        return code

    async def aclose(self) -> None:
        """Stop every component: connectors first (no reconnect storm), the edge last."""
        order = sorted(
            self.components.values(),
            key=lambda c: (c.name not in self.connectors, c.name == "edge"),
        )
        for _, scope in self.recorders:
            scope.cancel()
        with trio.CancelScope(shield=True):
            for comp in order:
                try:
                    await comp.stop(grace=2.0)
                except OSError:
                    comp.kill_group()


# --- the command lines of docs/architecture.md "Processes" (the scenario runner builds its own with them)


def edge_argv(
    state: Path,
    datacentres: Sequence[tuple[str, str]],
    *,
    ready: Path,
    http: str = "127.0.0.1:0",
    https: str | None = "127.0.0.1:0",
    warp: str | None = None,
    api: str = "127.0.0.1:0",
    flags: Sequence[str] = (),
    loglevel: str = "info",
) -> list[str]:
    """`tunnel-lab edge` with a tunnel listener per `(location, host:port)` and the eyeball listeners."""
    argv = [*TUNNEL_LAB, "edge", "--state", str(state)]
    for location, address in datacentres:
        argv += ["--tunnel-listen", f"{location}={address}"]
    argv += ["--http-listen", http]
    if https:
        argv += ["--https-listen", https]
    if warp:
        argv += ["--warp-listen", warp]
    argv += ["--api-listen", api, "--ready-file", str(ready), *flags]
    if loglevel != "info":
        argv += ["--loglevel", loglevel]
    return argv


def origin_argv(
    state: Path,
    kind: str,
    *,
    ready: Path,
    history: Path,
    listen: str = "127.0.0.1:0",
    tls: str | None = None,
    hostname: str | None = None,
) -> list[str]:
    """`tunnel-lab origin KIND`, recording what it receives in `history` (one JSON line per request)."""
    argv = [*TUNNEL_LAB, "origin", kind, "--listen", listen, "--state", str(state)]
    argv += ["--ready-file", str(ready), "--history", str(history)]
    if tls:
        argv += ["--tls", tls]
    if hostname:
        argv += ["--hostname", hostname]
    return argv


def connector_argv(
    exe: Sequence[str],
    caps: cloudflared.Capabilities,
    *,
    config: Path,
    edges: Sequence[str],
    ha_connections: int,
    ca: Path | str,
    metrics: str,
    grace_period: float,
    loglevel: str,
    flags: Sequence[str] = (),
    retries: int | None = None,
    credentials: Path | None = None,
    token: str | None = None,
    dns_resolver: bool = False,
    url: str | None = None,
    run_flags: Sequence[str] = (),
    tunnel_id: str | None = None,
    protocol: str = "http2",
) -> list[str]:
    """cloudflared's offline command line (`exe`: ours or a binary; `caps`: the flags it has, the ones
    the lab can do without are left out when it lacks them), with credentials or a token, over
    `protocol` (http2 or quic)."""
    argv = [*exe, "tunnel", "--config", str(config), "--no-autoupdate", *caps.optional("--no-prechecks")]
    for address in edges:
        argv += ["--edge", address]
    argv += ["--ha-connections", str(ha_connections), "--cacert", str(ca), "--metrics", metrics]
    argv += ["--grace-period", f"{grace_period:g}s"]
    if retries is not None:
        argv += ["--retries", str(retries)]
    argv += ["--loglevel", loglevel, *flags, "run", "--protocol", protocol]
    if token is not None:
        argv += ["--token", token]
    elif credentials is not None:
        argv += ["--credentials-file", str(credentials)]
    if dns_resolver:
        argv += caps.optional("--dns-resolver-addrs", "127.0.0.1:53")
    if url is not None:
        argv += ["--url", url]
    argv += run_flags
    if tunnel_id is not None and token is None:
        argv.append(tunnel_id)
    return argv


async def management_call(address: str, token: str, method: str, path: str, body: Any = None) -> Any:
    """One call to the management API at `address` with the bearer `token`: parsed JSON (or the text of a
    non-JSON answer). Transport failures and statuses >= 400 raise `LabError`. The runner uses it too."""
    data = json.dumps(body).encode() if body is not None else None
    headers = [("Authorization", f"Bearer {token}")]
    if data is not None:
        headers.append(("Content-Type", "application/json"))
    resp = await client.http_request(
        address,
        method=method,
        host=address,
        path=path,
        headers=headers,
        body=data,
        body_length=len(data) if data is not None else None,
    )
    if resp.error is not None:
        raise LabError(f"management API {method} {path}: {resp.error}")
    text = bytes(resp.body_prefix).decode("utf-8", "replace")
    if resp.status >= 400:
        raise LabError(f"management API {method} {path} answered {resp.status}: {text[:300]}")
    try:
        return json.loads(text)
    except ValueError:
        return text


def cloudflared_path(path: str) -> str:
    """The absolute path of a usable cloudflared binary, checked before anything starts; `LabError` when
    the file is unusable or this process is not in a private network namespace."""
    try:
        found = cloudflared.check_path(path)
    except TunnelLabError as exc:
        raise LabError(str(exc)) from exc
    if not netns.isolated():
        raise LabError(
            f"{path}: a real cloudflared runs only inside a private network namespace (it contacts public "
            "DNS and 1.1.1.1 at start-up whatever its flags); run this program under `tunnel-lab netns --`"
        )
    return found


def _probe(path: str) -> cloudflared.Capabilities:
    return cloudflared.probe(path)


def _builtin() -> cloudflared.Capabilities:
    return cloudflared.BUILTIN


def datacentres_of(spec: int | Sequence[str | DataCentre]) -> tuple[DataCentre, ...]:
    """`2` -> LAB1 on 127.0.0.1 and LAB2 on 127.0.0.2; names get 127.0.0.N in order."""
    if isinstance(spec, int):
        if spec < 1:
            raise LabError("a lab needs at least one data centre")
        return tuple(DataCentre(f"LAB{i + 1}", f"127.0.0.{i + 1}") for i in range(spec))
    return tuple(
        item if isinstance(item, DataCentre) else DataCentre(item, f"127.0.0.{i + 1}")
        for i, item in enumerate(spec)
    )


@asynccontextmanager
async def open_lab(
    *,
    state: str | Path | None = None,
    datacentres: int | Sequence[str | DataCentre] = 2,
    https: bool = True,
    warp: bool = False,
    edge_flags: Sequence[str] = (),
    logs: str | Path | None = None,
    loglevel: str = "info",
) -> AsyncIterator[Lab]:
    """Start an edge with `datacentres` tunnel listeners in a state directory (a fresh temporary one,
    removed afterwards, unless `state` names one) and yield the `Lab`; every component it started is
    stopped on the way out. Logs go to `logs` (default STATE/logs)."""
    owned = state is None
    root = Path(tempfile.mkdtemp(prefix="tunnel-lab-")) if state is None else Path(state).absolute()
    if owned:  # removed by the reaper if this process is killed hard (when its owner started one)
        REAPER.watch_path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        (root / "home").mkdir(exist_ok=True)
        log_dir = Path(logs).absolute() if logs is not None else root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        lab = Lab(root, log_dir, datacentres_of(datacentres), loglevel)
        try:
            await lab.start_edge(https=https, warp=warp, flags=edge_flags)
            yield lab
        finally:
            await lab.aclose()
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
            REAPER.forget_path(root)


# --- the same from plain Python: a trio loop in a thread ------------------------------------------------

P = ParamSpec("P")
T = TypeVar("T")


class SyncLab:
    """`Lab` for code without an event loop: the same methods, blocking. Use `start_lab`.

    The calls block the calling thread even when it runs an event loop of its own (a trio or asyncio test):
    the lab runs on its own loop in a helper thread. A server on the caller's loop cannot answer while it
    blocks, so async code calls these methods from a worker thread (`trio.to_thread.run_sync`,
    `asyncio.to_thread`)."""

    def __init__(self, lab: Lab, token: trio.lowlevel.TrioToken, jobs: trio.Nursery) -> None:
        self.lab = lab
        self._token = token
        self._jobs = jobs

    def _call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        # Not trio.from_thread.run: it refuses a thread that runs a trio loop, and tests do.
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        async def call() -> None:
            try:
                done.set_result(await fn(*args, **kwargs))
            except trio.Cancelled:
                done.set_exception(LabError("the lab stopped during the call"))
                raise
            except BaseException as exc:  # handed to the caller, whatever it is
                done.set_exception(exc)

        try:
            self._token.run_sync_soon(self._jobs.start_soon, call)
        except trio.RunFinishedError:
            raise LabError("the lab is not running any more") from None
        return done.result()

    @property
    def state(self) -> Path:
        return self.lab.state

    @property
    def logs(self) -> Path:
        return self.lab.logs

    @property
    def edge(self) -> Edge:
        return self.lab.edge

    @property
    def ca(self) -> Path:
        return self.lab.ca

    def create_tunnel(
        self, name: str, *, hostnames: Sequence[str] = (), networks: Sequence[str] = ()
    ) -> Tunnel:
        return self._call(self.lab.create_tunnel, name, hostnames=hostnames, networks=networks)

    def route_dns(self, tunnel: Tunnel, hostname: str) -> Tunnel:
        return self._call(self.lab.route_dns, tunnel, hostname)

    def delete_tunnel(self, tunnel: Tunnel) -> None:
        self._call(self.lab.delete_tunnel, tunnel)

    def start_recorder(self, url: str) -> tuple[str, Recorder]:
        return self._call(self.lab.start_recorder, url)

    def stop_recorder(self, recorder: Recorder) -> None:
        async def stop() -> None:
            self.lab.stop_recorder(recorder)

        self._call(stop)

    def stop(self, name: str) -> int | None:
        return self._call(self.lab.stop, name)

    def run(self, fn: Callable[[Lab], Awaitable[T]]) -> T:
        """Run `await fn(lab)` on the lab's loop (for what the blocking methods do not offer)."""
        return self._call(fn, self.lab)

    def start_origin(self, kind: str = "echo", **kwargs: Any) -> Origin:
        return self._call(self.lab.start_origin, kind, **kwargs)

    def origin_history(self, name: str) -> list[dict[str, Any]]:
        return self.lab.origin_history(name)

    def start_connector(self, tunnel: Tunnel, **kwargs: Any) -> Connector:
        return self._call(self.lab.start_connector, tunnel, **kwargs)

    def wait_ready(self, connector: Connector, connections: int = 1, timeout: float = START_TIMEOUT) -> int:
        return self._call(connector.wait_ready, connections, timeout)

    def stop_connector(self, connector: Connector) -> int | None:
        return self._call(connector.stop)

    def request(self, hostname: str, path: str = "/", **kwargs: Any) -> client.Response:
        return self._call(self.lab.request, hostname, path, **kwargs)

    def websocket(self, hostname: str, path: str = "/", messages: Sequence[str | bytes] = (), **kwargs: Any
                  ) -> client.WebSocketResult:
        return self._call(self.lab.websocket, hostname, path, messages, **kwargs)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(self.lab.api, method, path, body)

    def fault(self, kind: str, **fields: Any) -> dict[str, Any]:
        return self._call(self.lab.fault, kind, **fields)

    def clear_faults(self) -> None:
        self._call(self.lab.clear_faults)

    def history(self, since: int = 0) -> list[dict[str, Any]]:
        return self._call(self.lab.history, since)

    def connections(self) -> list[dict[str, Any]]:
        return self._call(self.lab.connections)

    def log_tails(self, lines: int = 15) -> dict[str, list[str]]:
        return self.lab.log_tails(lines)


@contextmanager
def start_lab(**options: Any) -> Iterator[SyncLab]:
    """`open_lab(**options)` for plain Python: runs the lab on a trio loop in a helper thread."""
    handed: queue.Queue[SyncLab | BaseException] = queue.Queue(maxsize=1)
    stop: list[trio.Event] = []

    async def host() -> None:
        stop.append(trio.Event())
        try:
            async with open_lab(**options) as lab, trio.open_nursery() as jobs:
                handed.put(SyncLab(lab, trio.lowlevel.current_trio_token(), jobs))
                await stop[0].wait()
                jobs.cancel_scope.cancel()
        except BaseException as exc:
            if handed.empty():
                handed.put(exc)
            raise

    failure: list[BaseException] = []

    def thread_main() -> None:
        try:
            trio.run(host)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=thread_main, name="tunnel-lab", daemon=True)
    thread.start()
    try:
        got = handed.get()
    except BaseException:
        # Interrupted (Ctrl-C) while the lab starts: let the start end, stop what it started, then go on.
        late = handed.get()
        if not isinstance(late, BaseException):
            late._token.run_sync_soon(stop[0].set)
        thread.join()
        raise
    if isinstance(got, BaseException):
        thread.join()
        raise got
    try:
        yield got
    finally:
        with contextlib.suppress(trio.RunFinishedError):  # the loop already ended (its error is below)
            got._token.run_sync_soon(stop[0].set)
        thread.join()
        if failure and not isinstance(failure[0], KeyboardInterrupt):
            raise LabError(f"the lab did not stop cleanly: {failure[0]!r}")

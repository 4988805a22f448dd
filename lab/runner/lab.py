"""One scenario's lab: a fresh state directory, the admin steps, and every component as a real process.

The `Lab` knows the command lines of docs/architecture.md ("Processes"), the variables scenarios may use
(`${origins.app.url}`, `${edge.http}`, ...), how to talk to the management API and the connector's metrics
server, and how to tear everything down (always, also on failure and Ctrl-C).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import yaml

from tunnel_lab.lab.api import connector_argv, edge_argv, origin_argv
from tunnel_lab.lab.runner import client
from tunnel_lab.lab.runner.cloudflared import BUILTIN, Capabilities
from tunnel_lab.lab.runner.loader import Scenario
from tunnel_lab.lab.runner.procs import (
    TUNNEL_LAB,
    Component,
    ComponentError,
    child_env,
    free_port,
    run_command,
    tail,
)
from tunnel_lab.wire.redact import Redactor

START_TIMEOUT = 20.0
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class RunOptions:
    """How the scenarios run: which connector, where results go."""

    connector: str = "builtin"  # or "cloudflared"
    cloudflared: str | None = None
    results: Path = Path("tunnel-lab-results")
    keep_state: bool = False
    loglevel: str = "info"
    capabilities: Capabilities = BUILTIN  # what the connector binary supports (lab/runner/cloudflared.py)
    protocol: str = "http2"  # the tunnel transport (`run --protocol`): http2 or quic
    trace: bool = False  # `run --trace`: each component that can writes a protocol trace (docs/trace.md)


@dataclass
class TunnelInfo:
    name: str
    id: str
    credentials: Path


@dataclass
class Lab:
    scenario: Scenario
    options: RunOptions
    state: Path
    logs: Path
    recorder: Any  # lab.runner.report.Recorder (duck-typed to keep this module light)
    components: dict[str, Component] = field(default_factory=dict)
    tunnels: dict[str, TunnelInfo] = field(default_factory=dict)
    edge_ready: dict[str, Any] = field(default_factory=dict)
    metrics_addr: str = ""
    api_token: str = ""
    # Every secret this run creates is registered here; whatever the lab writes goes through it.
    redactor: Redactor = field(default_factory=Redactor)
    access_vars: dict[str, str] = field(default_factory=dict)  # ${access...} (lab/runner/access.py)

    # --- variables ------------------------------------------------------------------------------------------
    def variables(self) -> dict[str, str]:
        out: dict[str, str] = {"state": str(self.state)}
        for name, comp in self.components.items():
            if name.startswith("origin:") and comp.ready:
                oname = name.split(":", 1)[1]
                addr = str(comp.ready.get("address", ""))
                host, _, port = addr.rpartition(":")
                out[f"origins.{oname}.address"] = addr
                out[f"origins.{oname}.host"] = host
                out[f"origins.{oname}.port"] = port
                out[f"origins.{oname}.url"] = str(comp.ready.get("url", f"http://{addr}"))
        for key in ("http", "https", "warp", "api", "ca"):
            if self.edge_ready.get(key):
                out[f"edge.{key}"] = str(self.edge_ready[key])
        for t in self.tunnels.values():
            out[f"tunnels.{t.name}.id"] = t.id
            out[f"tunnels.{t.name}.name"] = t.name
        out.update(self.access_vars)
        for dc in self.scenario.datacentres:
            for lst in self.edge_ready.get("tunnel_listeners", []):
                if lst.get("location") == dc.name:
                    out[f"datacenters.{dc.name}.address"] = str(lst.get("address"))
        return out

    def subst(self, value: Any) -> Any:
        """Replace `${...}` in every string of `value` (recursively)."""
        if isinstance(value, str):
            variables = self.variables()

            def repl(m: re.Match[str]) -> str:
                key = m.group(1)
                if key not in variables:
                    raise ComponentError(f"${{{key}}} has no value yet (is that component running?)")
                return variables[key]

            return re.sub(r"\$\{([^}]*)\}", repl, value)
        if isinstance(value, dict):
            return {k: self.subst(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.subst(v) for v in value]
        return value

    # --- set-up ---------------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return child_env({"TUNNEL_LAB_STATE": str(self.state)}, home=str(self.state / "home"))

    async def admin(self, *args: str) -> str:
        argv = [*TUNNEL_LAB, "tunnel", "--state", str(self.state), *args]
        self.recorder.op("admin", argv=["tunnel-lab", *argv[3:]])
        return await run_command(argv, env=self.env(), log_path=self.logs / "admin.log",
                                 redact=self.redactor.text)

    async def setup(self) -> None:
        (self.state / "home").mkdir(parents=True, exist_ok=True)
        sc = self.scenario
        for t in sc.tunnels:
            out = await self.admin("create", t.name)
            m = _UUID.search(out)
            if not m:
                raise ComponentError(f"`tunnel create {t.name}` printed no tunnel id: {out.strip()[:200]}")
            creds = self.state / "credentials" / f"{m.group(0)}.json"
            path_m = re.search(r"(/\S+\.json)", out)
            if path_m and Path(path_m.group(1)).exists():
                creds = Path(path_m.group(1))
            self.tunnels[t.name] = TunnelInfo(t.name, m.group(0), creds)
            self._register_secret(creds)
            for host in t.dns:
                await self.admin("route", "dns", t.name, host)
            for cidr in t.ip:
                await self.admin("route", "ip", cidr, t.name)
        for o in sc.origins:
            self._origin_component(o.name)
            if o.start:
                await self.start_origin(o.name)
        self._edge_component(fixed_ports=False)
        await self.start_edge()
        if sc.access is not None:
            from tunnel_lab.lab.runner.access import setup_access

            await setup_access(self)
        if sc.connector is not None:
            self.metrics_addr = f"127.0.0.1:{free_port()}"
            self._connector_component()
            if sc.connector.start:
                await self.start_connector(wait_ready=sc.connector.wait_ready)

    def _origin_component(self, name: str, port: int = 0) -> Component:
        spec = self.scenario.origin(name)
        ready = self.state / f"origin-{name}.ready.json"
        # What the origin received goes to the history, one JSON line per request (`run --compare`).
        argv = origin_argv(
            self.state,
            spec.kind,
            ready=ready,
            history=self.logs / f"origin-{name}.history.jsonl",
            listen=f"127.0.0.1:{port}",
            tls=spec.tls,
            hostname=spec.hostname,
        )
        comp = Component(
            f"origin:{name}", argv, self.logs / f"origin-{name}.log", env=self.env(), ready_file=ready
        )
        old = self.components.get(comp.name)
        if old is not None:
            comp.starts = old.starts
        self.components[comp.name] = comp
        return comp

    async def start_origin(self, name: str) -> None:
        comp = self.components[f"origin:{name}"]
        await comp.start()
        self.recorder.op("start", component=comp.name, argv=comp.argv, pid=comp.pid)
        ready = await comp.wait_ready_file(START_TIMEOUT)
        # Restarts reuse the port, so ingress rules and ${...} values stay valid.
        port = str(ready.get("address", "")).rpartition(":")[2]
        if port.isdigit() and "127.0.0.1:0" in comp.argv:
            comp.argv[comp.argv.index("127.0.0.1:0")] = f"127.0.0.1:{port}"

    def _edge_component(self, *, fixed_ports: bool) -> Component:
        sc = self.scenario
        ready = self.state / "edge.ready.json"
        listeners = {lst["location"]: lst["address"] for lst in self.edge_ready.get("tunnel_listeners", [])}
        datacentres = [
            (dc.name, listeners.get(dc.name, f"{dc.address}:0") if fixed_ports else f"{dc.address}:0")
            for dc in sc.datacentres
        ]

        def addr_of(key: str) -> str:
            return str(self.edge_ready[key]) if fixed_ports and self.edge_ready.get(key) else "127.0.0.1:0"

        flags: list[str] = []
        if "origin_timeout" in sc.edge:
            from tunnel_lab.lab.runner.loader import parse_duration

            flags += ["--origin-timeout", f"{parse_duration(sc.edge['origin_timeout']):g}"]
        old = self.components.get("edge")
        if self.options.trace:
            flags += ["--trace", str(self._trace_path("edge", old))]
        argv = edge_argv(
            self.state,
            datacentres,
            ready=ready,
            http=addr_of("http"),
            https=addr_of("https") if sc.edge.get("https", True) else None,
            warp=addr_of("warp") if sc.edge.get("warp", False) else None,
            api=addr_of("api"),
            flags=[*flags, *sc.edge.get("flags", [])],
            loglevel=self.options.loglevel,
        )
        comp = Component("edge", argv, self.logs / "edge.log", env=self.env(), ready_file=ready)
        if old is not None:
            comp.starts = old.starts
        self.components["edge"] = comp
        return comp

    async def start_edge(self) -> None:
        comp = self.components["edge"]
        await comp.start()
        self.recorder.op("start", component="edge", argv=comp.argv, pid=comp.pid)
        self.edge_ready = await comp.wait_ready_file(START_TIMEOUT)
        self.api_token = str(self.edge_ready.get("api_token") or "")
        if not self.api_token:
            token_file = self.state / "api-token"
            if token_file.exists():
                self.api_token = token_file.read_text().strip()
        self.redactor.add(self.api_token)

    async def restart_edge(self, *, crash: bool = False) -> None:
        """Stop the edge (SIGTERM, or SIGKILL when `crash`: nothing is closed cleanly) and start it again on
        the same ports with the same state directory."""
        comp = self.components["edge"]
        if crash:
            comp.kill_group()
        await comp.stop()
        self._edge_component(fixed_ports=True)
        await self.start_edge()

    def _credentials_for(self, tinfo: TunnelInfo) -> tuple[Path, str]:
        """The credentials file the connector gets, and the tunnel id it names (maybe deliberately wrong)."""
        assert self.scenario.connector is not None
        kind = self.scenario.connector.credentials
        if kind == "valid":
            return tinfo.credentials, tinfo.id
        data = json.loads(tinfo.credentials.read_text())
        if kind == "wrong-secret":
            data = {**data, "TunnelSecret": base64.b64encode(secrets.token_bytes(32)).decode()}
        else:
            data = {**data, "TunnelID": str(uuid.uuid4())}
        path = self.state / f"credentials-{kind}.json"
        path.write_text(json.dumps(data))
        path.chmod(0o400)
        self._register_secret(path)
        return path, str(data["TunnelID"])

    def _connector_component(self) -> Component:
        spec = self.scenario.connector
        assert spec is not None
        tinfo = self.tunnels[spec.tunnel]
        creds, tunnel_id = self._credentials_for(tinfo)
        config: dict[str, Any] = {}
        if spec.ingress is not None:
            config["ingress"] = self.subst([dict(r) for r in spec.ingress])
        if spec.origin_request:
            config["originRequest"] = self.subst(dict(spec.origin_request))
        if spec.warp_routing:
            config["warp-routing"] = {"enabled": True}
        cfg_path = self.state / "connector.yml"
        cfg_path.write_text(yaml.safe_dump(config or {}, sort_keys=False))
        exe = (
            [self.options.cloudflared or "cloudflared"]
            if self.options.connector == "cloudflared"
            else [*TUNNEL_LAB, "connector"]
        )
        token = None
        if spec.token:
            data = json.loads(creds.read_text())
            lower = {k.lower(): v for k, v in data.items()}
            fields = {"a": lower["accounttag"], "t": lower["tunnelid"], "s": lower["tunnelsecret"]}
            token = base64.b64encode(json.dumps(fields).encode()).decode()
            self.redactor.add(token)
        argv = connector_argv(
            exe,
            self.options.capabilities,
            config=cfg_path,
            edges=[str(lst["address"]) for lst in self.edge_ready.get("tunnel_listeners", [])],
            ha_connections=spec.ha_connections,
            ca=str(self.edge_ready.get("ca")),
            metrics=self.metrics_addr,
            grace_period=spec.grace_period,
            retries=spec.retries,
            loglevel=self.options.loglevel,
            flags=[*self.subst(list(spec.flags)), *self._connector_trace_flags()],
            token=token,
            credentials=creds,
            dns_resolver=True,
            url=self.subst(spec.url) if spec.url else None,
            run_flags=self.subst(list(spec.run_flags)),
            tunnel_id=tunnel_id,
            protocol=spec.protocol or self.options.protocol,
        )
        env = self.env()
        if self.scenario.access is not None and self.edge_ready.get("https"):
            # originRequest.access: the team domain's keys come from the edge's HTTPS listener
            env["TUNNEL_LAB_ACCESS_ADDR"] = str(self.edge_ready["https"])
        comp = Component("connector", argv, self.logs / "connector.log", env=env)
        old = self.components.get("connector")
        if old is not None:
            comp.starts = old.starts
        self.components["connector"] = comp
        return comp

    def _trace_path(self, name: str, old: Component | None) -> Path:
        """`NAME.trace.jsonl` in the scenario's results; a restarted component gets `NAME-N.trace.jsonl`."""
        starts = old.starts if old is not None else 0
        return self.logs / (f"{name}.trace.jsonl" if not starts else f"{name}-{starts + 1}.trace.jsonl")

    def _connector_trace_flags(self) -> list[str]:
        # Only our connector writes a trace; the real cloudflared's session is in the edge's trace.
        if not self.options.trace or self.options.connector == "cloudflared":
            return []
        return ["--trace", str(self._trace_path("connector", self.components.get("connector")))]

    async def start_connector(self, *, wait_ready: int) -> None:
        comp = self.components["connector"]
        if comp.starts:  # rebuild: the edge may have moved (it never does with a same-port restart)
            comp = self._connector_component()
        shown = self.redactor.argv(comp.argv)
        await comp.start()
        self.recorder.op("start", component="connector", argv=shown, pid=comp.pid)
        if wait_ready:
            await self.wait_ready(wait_ready, START_TIMEOUT)

    async def wait_ready(self, n: int | dict[str, int], timeout: float) -> int:
        """Wait until the connector's /ready reports `n` connections (an int, or {min, max})."""
        from tunnel_lab.lab.runner.checks import count_ok, describe_count

        comp = self.components["connector"]
        last: Any = None
        with trio.move_on_after(timeout):
            while True:
                if comp.process is not None and comp.process.returncode is not None:
                    raise ComponentError(
                        f"the connector exited with code {comp.process.returncode} while waiting "
                        f"for {describe_count(n)} ready connection(s)"
                    )
                resp = await client.http_request(self.metrics_addr, host=self.metrics_addr, path="/ready")
                if resp.error is None:
                    try:
                        last = json.loads(bytes(resp.body_prefix)).get("readyConnections")
                    except (ValueError, AttributeError):
                        last = f"unparseable /ready answer {bytes(resp.body_prefix)[:100]!r}"
                    if isinstance(last, int) and count_ok(n, last):
                        return last
                await trio.sleep(0.05)
        raise ComponentError(
            f"the connector did not report {describe_count(n)} ready connection(s) within "
            f"{timeout:g}s (last readyConnections: {last})"
        )

    # --- talking to the edge -------------------------------------------------------------------------------
    async def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the management API; returns parsed JSON (or text for non-JSON answers)."""
        from tunnel_lab.lab.api import LabError, management_call

        try:
            return await management_call(str(self.edge_ready.get("api")), self.api_token, method, path, body)
        except LabError as exc:
            raise ComponentError(str(exc)) from exc

    async def connector_metrics(self) -> str:
        resp = await client.http_request(self.metrics_addr, host=self.metrics_addr, path="/metrics")
        if resp.error is not None:
            raise ComponentError(f"connector /metrics: {resp.error}")
        return bytes(resp.body_prefix).decode("utf-8", "replace")

    # --- teardown and logs ---------------------------------------------------------------------------------
    async def teardown(self) -> None:
        """Stop everything: the connector first (so it does not log a storm of reconnects), then the rest."""
        order = sorted(self.components.values(), key=lambda c: (c.name != "connector", c.name == "edge"))
        with trio.CancelScope(shield=True):
            for comp in order:
                if comp.name.startswith("access"):
                    comp.kill_group()
            for comp in order:
                try:
                    await comp.stop(grace=1.0)
                except OSError:
                    comp.kill_group()

    def _register_secret(self, creds: Path) -> None:
        # not a credentials file we can read: nothing to register
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.redactor.add(str(json.loads(creds.read_text()).get("TunnelSecret") or ""))

    def scrub_logs(self) -> None:
        """Rewrite every file the components wrote into the scenario's results (their logs, and whatever
        else they record there) through the redaction rule, owner-only; call once they stopped. The
        runner's own operations.jsonl is redacted as it is written."""
        for path in sorted(self.logs.iterdir()):
            if not path.is_file() or path.name == "operations.jsonl":
                continue
            with contextlib.suppress(OSError):
                path.chmod(0o600)
                text = path.read_text(encoding="utf-8", errors="surrogateescape")
                clean = self.redactor.text(text)
                if clean != text:
                    path.write_text(clean, encoding="utf-8", errors="surrogateescape")

    def log_tails(self, lines: int = 15) -> dict[str, list[str]]:
        return {c.name: tail(c.log_path, lines) for c in self.components.values()}

    def log_text(self, component: str) -> str:
        comp = self.components.get(component)
        if comp is None:
            raise ComponentError(f"no component {component!r} (have: {', '.join(self.components)})")
        try:
            text = comp.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        # The runner's own "--- start #N: argv" lines are not the component's output.
        return "\n".join(line for line in text.splitlines() if not line.startswith("--- start #"))


def scenario_dirs(results: Path, name: str) -> tuple[Path, Path]:
    """(state dir, logs dir) for one scenario run: logs under the results, state in a fresh tempdir."""
    logs = results / name
    shutil.rmtree(logs, ignore_errors=True)  # a re-run replaces the previous run's logs
    logs.mkdir(parents=True, exist_ok=True)
    os.chmod(logs, 0o700)  # logs can hold what components printed: the owner's only
    # A fresh state directory in /tmp (short paths, private keys never land in a results artefact).
    # The name stays out of the path: log waits must never match a scenario's own name in a logged path.
    state = Path(tempfile.mkdtemp(prefix="tunnel-lab-"))
    os.chmod(state, 0o700)
    return state, logs

"""One scenario's lab: a fresh state directory, the admin steps, and every component as a real process.

The `Lab` knows the command lines of docs/architecture.md ("Processes"), the variables scenarios may use
(`${origins.app.url}`, `${edge.http}`, ...), how to talk to the management API and the connector's metrics
server, and how to tear everything down (always, also on failure and Ctrl-C).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import yaml

from tunnel_lab.lab.api import START_TIMEOUT, connector_argv, edge_argv, origin_argv
from tunnel_lab.lab.runner import client, netns
from tunnel_lab.lab.runner.cloudflared import BUILTIN, Capabilities
from tunnel_lab.lab.runner.loader import Scenario
from tunnel_lab.lab.runner.procs import (
    TUNNEL_LAB,
    Component,
    ComponentError,
    child_env,
    concurrently,
    free_port,
    run_command,
    tail,
)
from tunnel_lab.wire.redact import Redactor

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _multiprocess_edge_serves(sc: Scenario) -> bool:
    """Does the scenario need nothing a multi-process edge lacks (docs/architecture.md, "The edge in
    several processes"): Access, WAF and load balancers, whose per-request state (one-time codes, rate-limit
    counts, the round-robin turn) lives in each process?"""
    return not (sc.access or sc.waf or _routes_load_balancer(sc.steps))


def _routes_load_balancer(steps: Any) -> bool:
    """A `cli` step running `tunnel route lb`, or a `v4_api` step adding an `lb` route, inside parallel
    blocks too: each edge process takes its own round-robin turn over a pool's tunnels (docs/edge.md), so
    the exact spread a scenario checks holds in one process only."""
    for step in steps:
        spec = step.spec
        if step.action == "cli":
            words = (spec["args"] if isinstance(spec, dict) else spec).split()
            if any(words[i:i + 2] == ["route", "lb"] for i in range(len(words))):
                return True
        body = spec.get("body") if step.action == "v4_api" else None
        if isinstance(body, dict) and body.get("type") == "lb":
            return True
        if _routes_load_balancer(step.children):
            return True
    return False


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
    edge_processes: int = 1  # `run --edge-processes N`: the edge in N processes where the scenario allows


@dataclass
class TunnelInfo:
    name: str
    id: str
    credentials: Path


log = logging.getLogger(__name__)

_TEAM_ADDRESSES = itertools.count()


def _next_team_address() -> str:
    """A loopback address no other lab of this process listens on (127.77.0.1, 127.77.0.2, ...)."""
    n = next(_TEAM_ADDRESSES)
    return f"127.77.{n // 250 % 250}.{n % 250 + 1}"


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
    team_domain: tuple[str, str] | None = None  # (name, address) the namespace's DNS stub answers for us
    stub_names: list[str] = field(default_factory=list)  # every name registered with that address
    # topology.internet (lab/runner/internet.py): where its DNS, API and edge live, and once served, it
    internet_addresses: Any = None  # internet.Addresses
    internet: Any = None  # internet.Internet, while the steps run
    saved: dict[str, str] = field(default_factory=dict)  # ${vars.NAME}: what `save` took from output

    @property
    def cert_path(self) -> Path:
        """The cert.pem that `CONNECTOR tunnel login` writes (HOME is the state's `home`)."""
        return self.state / "home" / ".cloudflared" / "cert.pem"

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
        out["protocol"] = self.options.protocol
        out.update({f"vars.{k}": v for k, v in self.saved.items()})
        if self.internet is not None and self.cert_path.exists():
            from tunnel_lab.lab.runner.internet import InternetError, read_cert

            with contextlib.suppress(InternetError):
                cert = read_cert(self.cert_path)
                self.redactor.add(cert["apiToken"])
                out.update({"cert.account": cert["accountID"], "cert.zone": cert.get("zoneID", "")})
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
        """Origins at once with the admin steps and the edge; then access, then the connector, which needs
        the origins' addresses and the edge's listeners. The edge starts once the first `tunnel create`
        has made the tunnel store: two processes creating the same SQLite file at once can meet a lock
        SQLite does not wait for (seen: `database is locked`); after that the store and the PKI are safe to
        share, and the edge reads the tunnels only when a connector registers."""
        (self.state / "home").mkdir(parents=True, exist_ok=True)
        sc = self.scenario
        if sc.internet:
            from tunnel_lab.lab.runner.internet import allocate

            self.internet_addresses = allocate()
        jobs: list[Callable[[], Awaitable[None]]] = [self._tunnels_and_edge]
        for o in sc.origins:
            self._origin_component(o.name)
            if o.start:
                jobs.append(functools.partial(self.start_origin, o.name))
        self._edge_component(fixed_ports=False)
        await concurrently(jobs)
        if sc.access is not None:
            from tunnel_lab.lab.runner.access import setup_access

            await setup_access(self)
        if sc.waf is not None:
            for key, phase in (("custom", "http_request_firewall_custom"), ("ratelimit", "http_ratelimit")):
                if key in sc.waf:
                    answer = await self.api("PUT", f"/zones/lab/rulesets/phases/{phase}/entrypoint",
                                            {"rules": self.subst(sc.waf[key])})
                    if not isinstance(answer, dict) or not answer.get("success"):
                        raise ComponentError(f"topology.waf.{key}: the edge refused the rules: {answer}")
        if sc.connector is not None:
            self.metrics_addr = f"127.0.0.1:{free_port()}"
            self._connector_component()
            if sc.connector.start:
                await self.start_connector(wait_ready=sc.connector.wait_ready)

    async def _tunnels_and_edge(self) -> None:
        routes: list[tuple[str, ...]] = []
        for t in self.scenario.tunnels:
            await self._create_tunnel(t.name)
            routes += [("route", "dns", t.name, host) for host in t.dns]
            routes += [("route", "ip", cidr, t.name) for cidr in t.ip]
        # Routes are independent rows of the store (BEGIN IMMEDIATE, a busy timeout): all at once.
        await concurrently([self.start_edge, *(functools.partial(self.admin, *args) for args in routes)])

    async def _create_tunnel(self, name: str) -> None:
        out = await self.admin("create", name)
        m = _UUID.search(out)
        if not m:
            raise ComponentError(f"`tunnel create {name}` printed no tunnel id: {out.strip()[:200]}")
        creds = self.state / "credentials" / f"{m.group(0)}.json"
        path_m = re.search(r"(/\S+\.json)", out)
        if path_m and Path(path_m.group(1)).exists():
            creds = Path(path_m.group(1))
        self.tunnels[name] = TunnelInfo(name, m.group(0), creds)
        self._register_secret(creds)

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
        self.recorder.op("ready", component=comp.name)
        # Restarts reuse the port, so ingress rules and ${...} values stay valid.
        port = str(ready.get("address", "")).rpartition(":")[2]
        if port.isdigit() and "127.0.0.1:0" in comp.argv:
            comp.argv[comp.argv.index("127.0.0.1:0")] = f"127.0.0.1:{port}"

    def _edge_component(self, *, fixed_ports: bool) -> Component:
        sc = self.scenario
        ready = self.state / "edge.ready.json"
        listeners = {lst["location"]: lst["address"] for lst in self.edge_ready.get("tunnel_listeners", [])}
        datacentres = [
            (dc.name, listeners.get(dc.name, dc.listen()) if fixed_ports else dc.listen())
            for dc in sc.datacentres
        ]
        if self.internet_addresses is not None:  # where edge discovery's SRV and A records point
            datacentres = [(dc.name, f"{address}:7844")
                           for dc, address in zip(sc.datacentres, self.internet_addresses.edges, strict=True)]

        def addr_of(key: str) -> str:
            return str(self.edge_ready[key]) if fixed_ports and self.edge_ready.get(key) else "127.0.0.1:0"

        https = addr_of("https") if sc.edge.get("https", True) else None
        if https is not None and not fixed_ports and self._claim_team_domain():
            assert self.team_domain is not None
            https = f"{self.team_domain[1]}:443"
        flags: list[str] = []
        if "origin_timeout" in sc.edge:
            from tunnel_lab.lab.runner.loader import parse_duration

            flags += ["--origin-timeout", f"{parse_duration(sc.edge['origin_timeout']):g}"]
        old = self.components.get("edge")
        if self.options.trace:
            flags += ["--trace", str(self._trace_path("edge", old))]
        if min(self.options.edge_processes, len(datacentres)) > 1 and _multiprocess_edge_serves(sc):
            flags += ["--processes", str(min(self.options.edge_processes, len(datacentres)))]
        argv = edge_argv(
            self.state,
            datacentres,
            ready=ready,
            http=addr_of("http"),
            https=https,
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

    def _claim_team_domain(self) -> bool:
        """For the real cloudflared with `topology.access`: the edge's HTTPS eyeball listener on port 443
        of an address of its own, which the namespace's DNS stub gives as the team domain, so that
        `originRequest.access` can fetch https://TEAM.cloudflareaccess.com/cdn-cgi/access/certs (the lab
        CA is trusted through SSL_CERT_FILE). Only for scenarios that need it (`access-jwks`, or steps that
        run `cloudflared access`, which also get their hostnames and login.cloudflareaccess.org); another
        lab running with the same name keeps it."""
        if self.team_domain is not None:
            return True
        clients = any(step.action in ("ssh", "access_login") for step in self.scenario.steps)
        if (self.scenario.access is None or self.options.connector != "cloudflared" or not netns.isolated()
                or not (clients or "access-jwks" in self.scenario.requires)):
            return False
        team = self.scenario.access.get("team") or "lab"
        name = f"{team}.cloudflareaccess.com"
        address = _next_team_address()
        if not netns.register_name(name, address):
            log.info("%s is served by another lab running now; this one's cloudflared cannot fetch its keys",
                     name)
            return False
        self.team_domain = (name, address)
        self.stub_names.append(name)
        # `cloudflared access` dials the application and the token transfer service by name too.
        others = [h for t in self.scenario.tunnels for h in t.dns if "*" not in h] if clients else []
        for other in [*others, "login.cloudflareaccess.org"] if clients else []:
            if netns.register_name(other, address):
                self.stub_names.append(other)
        return True

    async def start_edge(self) -> None:
        comp = self.components["edge"]
        await comp.start()
        self.recorder.op("start", component="edge", argv=comp.argv, pid=comp.pid)
        self.edge_ready = await comp.wait_ready_file(START_TIMEOUT)
        self.recorder.op("ready", component="edge")
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
            # originRequest.access: the team domain's keys come from the edge's HTTPS listener (our
            # connector is told where; cloudflared resolves the name, see _claim_team_domain)
            env["TUNNEL_LAB_ACCESS_ADDR"] = str(self.edge_ready["https"])
            if self.team_domain is not None and self.edge_ready.get("ca"):
                env["SSL_CERT_FILE"] = str(self.edge_ready["ca"])
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
            self.recorder.op("ready", component="connector")

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
        """Stop everything: the connector first and gracefully (so it does not log a storm of reconnects,
        and its shutdown is what a user sees), then the rest at once with SIGKILL: nothing is checked after
        the last step, and their graceful shutdown cost about 0.1 CPU-second each (`edge` and `origin`
        steps still stop them gracefully; with `--trace` the edge too, so that its trace is whole)."""
        if self.team_domain is not None:
            for name in self.stub_names:
                netns.unregister_name(name, self.team_domain[1])
        with trio.CancelScope(shield=True):
            connectors = [c for c in self.components.values() if is_connector(c)]
            rest = [c for c in self.components.values() if not is_connector(c)]
            async with trio.open_nursery() as nursery:
                for comp in rest:
                    if comp.name.startswith("access"):
                        nursery.start_soon(comp.kill)
            async with trio.open_nursery() as nursery:
                for connector in connectors:
                    nursery.start_soon(_stop_connector, connector)
            async with trio.open_nursery() as nursery:
                for comp in rest:
                    if self.options.trace and comp.name == "edge":
                        nursery.start_soon(comp.stop, 3.0)  # its trace ends with `trace.end`, flushed
                    else:
                        nursery.start_soon(comp.kill)
            for comp in self.components.values():
                if comp.starts:
                    self.recorder.op("cpu", component=comp.name, seconds=round(comp.cpu, 3))

    def register_home_secrets(self) -> None:
        """Redact what the connector's own commands wrote to ~/.cloudflared: tunnel secrets, the API token."""
        for creds in (self.state / "home" / ".cloudflared").glob("*.json"):
            self._register_secret(creds)
        if self.cert_path.exists():
            from tunnel_lab.lab.runner.internet import InternetError, read_cert

            with contextlib.suppress(InternetError):
                self.redactor.add(read_cert(self.cert_path)["apiToken"])

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


async def _stop_connector(connector: Component) -> None:
    try:
        await connector.stop(grace=1.0)
    except OSError:
        connector.kill_group()


def connector_key(name: str | None) -> str:
    """The component name of a connector: `connector`, or `connector:NAME` for one a background cli step
    named (several connectors at once, e.g. one per tunnel of a load balancer's pool)."""
    return f"connector:{name}" if name else "connector"


def is_connector(comp: Component) -> bool:
    """The scenario's connector or a named one (`connector_key`)."""
    return comp.name == "connector" or comp.name.startswith("connector:")


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

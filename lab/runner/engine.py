"""Running one scenario: set up its lab, drive the steps in order, check expectations, tear down always."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from tunnel_lab.lab.runner import client, compare, internet, netns
from tunnel_lab.lab.runner.checks import (
    Mismatch,
    check_history,
    check_response,
    count_ok,
    describe_count,
    json_path,
    metric_value,
    value_matches,
)
from tunnel_lab.lab.runner.cloudflared import RELEASE_TABLE
from tunnel_lab.lab.runner.lab import Lab, RunOptions, connector_key, scenario_dirs
from tunnel_lab.lab.runner.loader import Scenario, Step, parse_duration
from tunnel_lab.lab.runner.procs import TUNNEL_LAB, Component, ComponentError, free_port
from tunnel_lab.lab.runner.reaper import REAPER
from tunnel_lab.lab.runner.report import Recorder
from tunnel_lab.wire.errors import TunnelLabError
from tunnel_lab.wire.redact import Redactor

DEFAULT_STEP_TIMEOUT = 10.0

# What each connector can do; a scenario whose `requires` is not covered is skipped with the reason.
CONNECTOR_FEATURES: dict[str, set[str]] = {
    "builtin": {"lab-connector", "access-tcp", "warp-routing", "hello-world", "remote-config", "access-jwks",
                "openssh"},
    # access-jwks: the runner's DNS stub names the lab edge as the team domain (lab.runner.lab).
    "cloudflared": {"access-tcp", "warp-routing", "hello-world", "remote-config", "access-jwks", "openssh"},
}


# Why a feature is missing, where that is not obvious.
FEATURE_NOTES: dict[str, str] = {}


class StepFailure(TunnelLabError):
    """A step did not do what the scenario expected."""

    def __init__(self, step: Step, message: str, mismatches: list[Mismatch] | None = None) -> None:
        super().__init__(f"{step.title}: {message}")
        self.step = step
        self.message = message
        self.mismatches = mismatches or []


@dataclass
class ScenarioResult:
    name: str
    source: str
    status: str  # passed, failed, skipped, error, deviation (a failure the scenario marks as known)
    duration: float = 0.0
    message: str = ""
    step: str = ""
    mismatches: list[str] = field(default_factory=list)
    logs: dict[str, list[str]] = field(default_factory=dict)
    results_dir: str = ""
    deviation: str = ""  # the scenario's known_deviations reason for this connector, when it applies
    note: str = ""  # e.g. a known deviation that did not show (the marker may be stale)
    exchanges: list[compare.Exchange] = field(default_factory=list)  # for `run --compare`

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "status": self.status,
            "duration": round(self.duration, 3),
            "message": self.message,
            "step": self.step,
            "mismatches": self.mismatches,
            "logs": self.logs,
            "results_dir": self.results_dir,
            "deviation": self.deviation,
            "note": self.note,
        }


def ipv6_loopback_missing() -> str | None:
    """Why this machine cannot listen on ::1 (None: it can)."""
    if not socket.has_ipv6:
        return "this Python was built without IPv6 (socket.has_ipv6 is False)"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind [::1]:0: {exc.strerror or exc}"
    return None


def skip_reason(sc: Scenario, options: RunOptions) -> str | None:
    if options.protocol != "http2" and sc.http2_only:
        return f"http2 only: {sc.http2_only}"
    if sc.internet:
        ok, lacking = internet.available()
        if not ok:
            return f"the connector's own commands need a mount namespace of their own: {lacking}"
    have = CONNECTOR_FEATURES.get(options.connector, set())
    # Features gated by cloudflared's release are judged by the probed binary (lab/runner/cloudflared.py).
    by_release = options.connector == "cloudflared"
    missing = [f for f in sc.requires if f not in have and not (by_release and f in RELEASE_TABLE)]
    if missing:
        notes = "".join(f" ({FEATURE_NOTES[f]})" for f in missing if f in FEATURE_NOTES)
        return f"the {options.connector} connector does not support: {', '.join(missing)}{notes}"
    if "openssh" in sc.requires:
        from tunnel_lab.origin_fixtures.sshd import find_sshd

        if find_sshd() is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
            return "needs OpenSSH (sshd, ssh, ssh-keygen): not installed here (Debian: apt-get install " \
                   "openssh-server openssh-client)"
    if any(dc.ipv6 for dc in sc.datacentres) and (why := ipv6_loopback_missing()):
        return f"needs IPv6 on loopback: {why}"
    spec = sc.connector
    gaps = options.capabilities.gaps(sc.requires, [*spec.flags, *spec.run_flags] if spec else [])
    return f"needs {'; '.join(gaps)}" if gaps else None


async def run_scenario(
    sc: Scenario, options: RunOptions, *, on_step: Callable[[str, str], None] | None = None
) -> ScenarioResult:
    """Run one scenario end to end; never raises for scenario failures (they are in the result)."""
    started = time.monotonic()
    reason = skip_reason(sc, options)
    if reason:
        return ScenarioResult(sc.name, sc.source, "skipped", message=reason)
    state, logs = scenario_dirs(options.results, sc.name)
    if not options.keep_state:
        REAPER.watch_path(state)  # removed even if the runner is killed hard
    redactor = Redactor()  # one rule for the logs, the history and the result of this run
    recorder = Recorder(logs / "operations.jsonl", sc.name, redactor)
    lab = Lab(sc, options, state, logs, recorder, redactor=redactor)
    runner = _Runner(lab, on_step or (lambda _n, _s: None))
    result = ScenarioResult(sc.name, sc.source, "passed", results_dir=str(logs))
    recorder.op("scenario-start", source=sc.source, connector=options.connector, isolated=netns.inside())
    try:
        with trio.move_on_after(sc.timeout) as scope:
            runner.note("set-up")
            try:
                await lab.setup()
            except (ComponentError, client.ClientError, OSError) as exc:
                result.status, result.step, result.message = "error", "set-up", str(exc)
            else:
                await internet.around_steps(lab, functools.partial(runner.run_steps, sc.steps))
        if scope.cancelled_caught:
            result.status = "failed"
            result.step = runner.current
            result.message = f"the scenario did not finish within its timeout of {sc.timeout:g}s"
    except StepFailure as exc:
        result.status, result.step, result.message = "failed", exc.step.title, exc.message
        result.mismatches = [str(m) for m in exc.mismatches]
    except (ComponentError, client.ClientError) as exc:
        result.status, result.step, result.message = "failed", runner.current, str(exc)
    except (Exception, BaseExceptionGroup) as exc:
        if not isinstance(exc, Exception):
            raise  # a group holding Cancelled or KeyboardInterrupt: not ours to swallow
        peer = client.as_client_error(exc)
        if peer is not None:
            result.status, result.step, result.message = "failed", runner.current, str(peer)
        else:
            result.status, result.step = "error", runner.current
            where = logs / "runner-error.txt"
            result.message = f"internal error in the runner: {exc!r} (traceback in {where})"
            (logs / "runner-error.txt").write_text(redactor.text("".join(traceback.format_exception(exc))))
    finally:
        await lab.teardown()
        lab.scrub_logs()
        result.message = redactor.text(result.message)
        result.mismatches = [redactor.text(m) for m in result.mismatches]
        result.duration = time.monotonic() - started
        apply_known_deviation(sc, options.connector, result, protocol=options.protocol)
        result.exchanges = runner.exchanges
        if result.status != "passed":
            result.logs = lab.log_tails()
        recorder.op(
            "scenario-end",
            status=result.status,
            message=result.message,
            step=result.step,
            duration=round(result.duration, 3),
        )
        recorder.close()
        if not options.keep_state:
            shutil.rmtree(state, ignore_errors=True)
            REAPER.forget_path(state)
    return result


def apply_known_deviation(sc: Scenario, connector: str, result: ScenarioResult, *,
                          protocol: str = "http2") -> None:
    """A failure the scenario marks as a known deviation of this connector is reported as such (it does
    not fail the run); a pass despite the marker gets a note, so stale markers are noticed. Over QUIC a
    `CONNECTOR-quic` entry, when there is one, replaces the connector's own."""
    reason = sc.known_deviations.get(connector)
    if protocol != "http2":
        reason = sc.known_deviations.get(f"{connector}-{protocol}", reason)
    if not reason:
        return
    # A failed step, or a set-up that failed on the components (not an internal error of the runner).
    failed = result.status == "failed" or (result.status == "error" and result.step == "set-up")
    if failed:
        result.status, result.deviation = "deviation", reason
    elif result.status == "passed":
        result.note = f"known deviation of the {connector} connector not seen (stale marker?): {reason}"


class _Runner:
    def __init__(self, lab: Lab, on_step: Callable[[str, str], None]) -> None:
        self.lab = lab
        self.on_step = on_step
        self.current = "set-up"
        self.fault_ids: dict[str, str] = {}
        self.access_ports: dict[str, int] = {}
        self.exchanges: list[compare.Exchange] = []  # what the eyeball got, for `run --compare`

    def note(self, what: str) -> None:
        self.current = what
        self.on_step(self.lab.scenario.name, what)

    async def run_steps(self, steps: tuple[Step, ...]) -> None:
        for step in steps:
            await self.run_step(step)

    async def run_step(self, step: Step) -> None:
        if step.http2_only and self.lab.options.protocol != "http2":
            self.note(f"{step.title}: not run over {self.lab.options.protocol}")
            self.lab.recorder.op("step-skipped", step=step.index, line=step.line,
                                 reason=f"http2 only: {step.http2_only}")
            return
        if step.after:
            await trio.sleep(step.after)
        self.note(step.title)
        handler = getattr(self, f"do_{step.action}")
        spec = self.lab.subst(step.spec) if step.action != "parallel" else step.spec
        self.lab.recorder.op("step", step=step.index, action=step.action, line=step.line, spec=spec)
        try:
            await handler(step, spec)
        except (ComponentError, client.ClientError) as exc:
            raise StepFailure(step, str(exc)) from exc

    # --- traffic ------------------------------------------------------------------------------------------
    def _default_host(self) -> str:
        for t in self.lab.scenario.tunnels:
            if t.dns:
                return t.dns[0].replace("*.", "any.")
        return "localhost"

    async def do_request(self, step: Step, spec: dict[str, Any]) -> None:
        await self._repeat(step, spec, self._one_request)

    async def _repeat(
        self, step: Step, spec: dict[str, Any], one: Callable[[Step, dict[str, Any], int], Any]
    ) -> None:
        if step.repeat == 1:
            await one(step, spec, 0)
            return
        failures: list[StepFailure] = []
        limiter = trio.CapacityLimiter(step.concurrency)

        async def worker(i: int) -> None:
            async with limiter:
                try:
                    await one(step, spec, i)
                except StepFailure as exc:
                    failures.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(step.repeat):
                nursery.start_soon(worker, i)
        if failures:
            first = failures[0]
            raise StepFailure(
                step, f"{len(failures)} of {step.repeat} failed; first: {first.message}", first.mismatches
            )

    async def _one_request(self, step: Step, spec: dict[str, Any], i: int) -> None:
        lab = self.lab
        http2 = str(spec.get("http", "1.1")) == "2"
        scheme = spec.get("scheme", "https" if http2 else "http")
        address = lab.edge_ready.get("https" if scheme == "https" else "http")
        if not address:
            raise StepFailure(step, f"the edge has no {scheme} eyeball listener (topology.edge.https?)")
        host = spec.get("host") or self._default_host()
        headers = _header_pairs(spec.get("headers", []))
        body: Any = None
        length: int | None = None
        if "body" in spec:
            body = spec["body"].encode("utf-8")
            length = len(body)
        elif "body_generated" in spec:
            gen = spec["body_generated"]
            body = client.generated_body(gen["bytes"], gen.get("seed", 0))
            length = gen["bytes"]
        method = spec.get("method", "POST" if body is not None else "GET")
        timeout = parse_duration(spec.get("timeout", DEFAULT_STEP_TIMEOUT))
        expect = spec.get("expect", {"status": 200})
        wall = time.time()
        with trio.move_on_after(timeout) as scope:
            resp = await client.http_request(
                str(address),
                method=method,
                host=host,
                path=spec.get("path", "/"),
                headers=headers,
                body=body,
                body_length=None if spec.get("chunked") else length,
                chunked=bool(spec.get("chunked")),
                tls=scheme == "https",
                ca_path=str(lab.edge_ready.get("ca")),
                http2=http2,
            )
        if scope.cancelled_caught:
            resp = client.Response(error=f"timed out after {timeout:g}s")
            resp.elapsed = timeout
        path = spec.get("path", "/")
        self.exchanges.append(
            compare.observe_http(step.index, step.title, i, method, path, resp, wall, time.time(),
                                 ignore=tuple(spec.get("compare_ignore", ())))
        )
        lab.recorder.op(
            "request",
            step=step.index,
            n=i,
            method=method,
            host=host,
            path=spec.get("path", "/"),
            http=("2" if http2 else "1.1"),
            scheme=scheme,
            status=resp.status,
            error=resp.error,
            body_length=resp.body_length,
            ms=round(resp.elapsed * 1000, 1),
            cf_ray=resp.header("cf-ray"),
        )
        problems = check_response(expect, resp, sent_sha256=resp.sent_sha256)
        if problems:
            raise StepFailure(
                step, f"{method} {scheme}://{host}{spec.get('path', '/')} did not meet expectations", problems
            )

    async def do_raw(self, step: Step, spec: dict[str, Any]) -> None:
        """Bytes no well-behaved client sends (lab/runner/raw.py), to the plain or TLS eyeball listener."""
        from tunnel_lab.lab.runner.raw import run_raw

        lab = self.lab
        listener = spec.get("listener", "https" if "h2_rapid_reset" in spec else "http")
        address = lab.edge_ready.get(listener)
        if not address:
            raise StepFailure(step, f"the edge has no {listener} eyeball listener (topology.edge.https?)")
        host = spec.get("host") or self._default_host()
        timeout = parse_duration(spec.get("timeout", DEFAULT_STEP_TIMEOUT))
        wall = time.time()
        result = await run_raw(str(address), tls=listener == "https", host=host,
                               ca_path=str(lab.edge_ready["ca"]),
                               send=spec["send"].encode("latin-1") if "send" in spec else None,
                               rapid=spec.get("h2_rapid_reset"), timeout=timeout)
        self.exchanges.append(compare.observe_raw(step.index, step.title, wall, time.time()))
        lab.recorder.op("raw", step=step.index, listener=listener, host=host, status=result.status,
                        response=result.response[:200].decode("latin-1"), closed=result.closed,
                        error=result.error)
        expect = spec.get("expect", {})
        problems: list[Mismatch] = []
        if "response" in expect and not result.response.startswith(expect["response"].encode("latin-1")):
            problems.append(Mismatch("answer starts with", expect["response"],
                                     result.response[:80].decode("latin-1") or result.error or "nothing"))
        if "status" in expect and result.status != expect["status"]:
            problems.append(Mismatch("status of the request after the attack", expect["status"],
                                     result.status if result.status is not None else result.error))
        if "closed" in expect and result.closed != expect["closed"]:
            problems.append(Mismatch("the edge closed the connection", expect["closed"], result.closed))
        if problems:
            raise StepFailure(step, f"raw exchange with the {listener} listener", problems)

    async def do_websocket(self, step: Step, spec: dict[str, Any]) -> None:
        await self._repeat(step, spec, self._one_websocket)

    async def _one_websocket(self, step: Step, spec: dict[str, Any], i: int) -> None:
        lab = self.lab
        host = spec.get("host") or self._default_host()
        messages: list[str | bytes] = list(spec.get("messages", ["hello"]))
        if spec.get("binary_bytes"):
            messages.append(
                bytes(range(256)) * (spec["binary_bytes"] // 256) + bytes(spec["binary_bytes"] % 256)
            )
        for size in spec.get("binary_sizes", []):
            messages.append((bytes(range(256)) * (size // 256 + 1))[:size])
        expect = spec.get("expect", {})
        timeout = parse_duration(spec.get("timeout", DEFAULT_STEP_TIMEOUT))
        wall = time.time()
        with trio.move_on_after(timeout) as scope:
            result = await client.websocket_exchange(
                str(lab.edge_ready.get("http")),
                host=host,
                path=spec.get("path", "/"),
                messages=messages,
                headers=_header_pairs(spec.get("headers", [])),
                byte_stream=bool(expect.get("echo_bytes")),
            )
        if scope.cancelled_caught:
            result = client.WebSocketResult(error=f"timed out after {timeout:g}s")
        path = spec.get("path", "/")
        self.exchanges.append(
            compare.observe_websocket(step.index, step.title, i, path, result, wall, time.time())
        )
        lab.recorder.op(
            "websocket",
            step=step.index,
            n=i,
            host=host,
            status=result.status,
            error=result.error,
            messages=len(result.received),
        )
        problems: list[Mismatch] = []
        if expect.get("error"):
            if result.error is None and result.status == 101:
                problems.append(Mismatch("websocket", "a failure", "an open WebSocket"))
        else:
            want_status = expect.get("status", 101)
            if result.status != want_status:
                problems.append(Mismatch("websocket handshake status", want_status, result.status))
            elif result.error is not None:
                problems.append(Mismatch("websocket", "an echo of every message", result.error))
            elif expect.get("echo_bytes"):  # a byte stream (tcp:// services): message boundaries may move
                sent = b"".join(m.encode() if isinstance(m, str) else m for m in messages)
                got = b"".join(m.encode() if isinstance(m, str) else m for m in result.received)
                if got != sent:
                    how = "a prefix" if sent.startswith(got) else "different bytes"
                    problems.append(Mismatch("websocket byte stream echo", f"{len(sent)} bytes echoed",
                                             f"{len(got)} bytes, {how}"))
            elif expect.get("echo", True) and result.received != messages:
                problems.append(
                    Mismatch(
                        "websocket echo", [_short(m) for m in messages], [_short(m) for m in result.received]
                    )
                )
        if problems:
            raise StepFailure(step, f"WebSocket to {host}{spec.get('path', '/')}", problems)

    async def do_tcp(self, step: Step, spec: dict[str, Any]) -> None:
        await self._repeat(step, spec, self._one_tcp)

    async def _one_tcp(self, step: Step, spec: dict[str, Any], i: int) -> None:
        payload = spec.get("send", "hello over tcp\n").encode()
        if spec.get("send_bytes"):
            payload = bytes(i % 251 for i in range(spec["send_bytes"]))
        expect = spec.get("expect", {})
        timeout = parse_duration(spec.get("timeout", DEFAULT_STEP_TIMEOUT))
        problems: list[Mismatch] = []
        error: str | None = None
        got = b""
        status = 0
        wall = time.time()
        with trio.move_on_after(timeout) as scope:
            try:
                stream: trio.abc.Stream | None
                if spec["via"] == "access":
                    port = await self._access_listener(spec["host"])
                    stream = await client.connect(f"127.0.0.1:{port}")
                    status = 200
                else:
                    status, maybe, _line = await client.connect_via_proxy(
                        str(self.lab.edge_ready.get("warp")), spec["target"]
                    )
                    stream = None if maybe is None else maybe
                if stream is not None:
                    async with stream:
                        got = await client.tcp_echo_roundtrip(stream, payload)
            except client.ClientError as exc:
                error = str(exc)
        if scope.cancelled_caught:
            error = f"timed out after {timeout:g}s ({len(got)} bytes back)"
        self.exchanges.append(
            compare.observe_tcp(step.index, step.title, i, status, error, payload, got, wall, time.time())
        )
        self.lab.recorder.op(
            "tcp",
            step=step.index,
            n=i,
            via=spec["via"],
            status=status,
            error=error,
            sent=len(payload),
            received=len(got),
        )
        if expect.get("error"):
            if error is None and got == payload:
                problems.append(Mismatch("tcp", "a failure", "a working echo"))
        else:
            want_status = expect.get("status", 200)
            if spec["via"] == "warp" and status != want_status:
                problems.append(Mismatch("CONNECT status", want_status, status))
            elif error is not None:
                problems.append(Mismatch("tcp", "an echo", error))
            elif expect.get("echo", True) and got != payload:
                problems.append(
                    Mismatch(
                        "tcp echo",
                        f"{len(payload)} bytes back unchanged",
                        f"{len(got)} bytes, {'equal' if got == payload else 'different'}",
                    )
                )
        if problems:
            raise StepFailure(step, f"TCP via {spec['via']}", problems)

    # --- the connector's own commands (topology.internet, lab/runner/internet.py) -------------------------
    async def do_cli(self, step: Step, spec: Any) -> None:
        """CONNECTOR with the step's arguments, as a user types it: no lab flag, the lab's DNS and API."""
        lab = self.lab
        net = lab.internet
        assert net is not None  # the loader allows cli only with topology.internet
        spec = spec if isinstance(spec, dict) else {"args": spec}
        words = shlex.split(spec["args"])
        argv = [*internet.connector_command(lab), *words]
        shown = " ".join(["cloudflared" if lab.options.connector == "cloudflared" else "tunnel-lab connector",
                          *words])
        env = net.env(lab.state / "home")
        if spec.get("background"):
            name = spec.get("connector")
            key = connector_key(name)
            old = lab.components.get(key)
            if old is not None and old.running:
                raise StepFailure(step, f"{'connector ' + repr(name) if name else 'a connector'} is already "
                                  "running")
            log = lab.logs / (f"connector-{name}.log" if name else "connector.log")
            comp = Component(key, net.wrap(argv), log, env=env)
            comp.starts = old.starts if old is not None else 0
            lab.components[key] = comp
            await comp.start()
            lab.recorder.op("start", component=key, argv=shown, pid=comp.pid)
            return
        timeout = parse_duration(spec.get("timeout", 30))
        output = lab.logs / f"cli-{step.index}.log"
        with output.open("wb") as sink:
            process = await trio.lowlevel.open_process(
                net.wrap(argv), stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        REAPER.watch_group(process.pid)
        code: int | None = None
        try:
            with trio.move_on_after(timeout):
                if spec.get("approve_login"):
                    url = await internet.approve_login(lab, output, process, timeout)
                    lab.recorder.op("login-approved", step=step.index, url=url)
                code = await process.wait()
        except internet.InternetError as exc:
            raise StepFailure(step, f"`{shown}`: {exc}") from None
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await process.wait()
            REAPER.forget_group(process.pid)
        lab.register_home_secrets()  # before anything it printed is recorded
        text = output.read_text(errors="replace")
        last = " / ".join(line for line in text.strip().splitlines()[-3:])
        lab.recorder.op("cli", step=step.index, command=shown, exit=code, output=text[-2000:])
        if code is None:
            raise StepFailure(step, f"`{shown}` did not exit within {timeout:g}s (last output: {last})")
        expect = spec.get("expect", {})
        problems: list[Mismatch] = []
        if code != expect.get("exit", 0):
            problems.append(Mismatch("exit status", expect.get("exit", 0), code))
        if "output" in expect and not re.search(expect["output"], text, re.MULTILINE):
            problems.append(Mismatch("output", f"re:{expect['output']}", last))
        for name, regex in spec.get("save", {}).items():
            found = re.search(regex, text, re.MULTILINE)
            if found is None:
                problems.append(Mismatch(f"save {name}", f"re:{regex}", last))
                continue
            value = (found.group(1) if found.re.groups else found.group(0)) or ""
            if spec.get("secret"):
                lab.redactor.add(value)
            lab.saved[name] = value
        if problems:
            raise StepFailure(step, f"`{shown}` (output in {output.name})", problems)

    async def do_v4_api(self, step: Step, spec: dict[str, Any]) -> None:
        """One call to the lab's v4 API with the cert.pem's token, as the dashboard or a script makes it."""
        timeout = parse_duration(spec.get("timeout", DEFAULT_STEP_TIMEOUT))
        status: int | None = None
        answer: Any = None
        error = f"no answer within {timeout:g}s"
        with trio.move_on_after(timeout):
            try:
                status, answer, error = await internet.v4_call(self.lab, spec["method"], spec["path"],
                                                               spec.get("body"))
            except internet.InternetError as exc:
                raise StepFailure(step, str(exc)) from None
        self.lab.recorder.op("v4-api", step=step.index, method=spec["method"], path=spec["path"],
                             status=status, answer=answer, error=error)
        expect = spec.get("expect", {})
        problems: list[Mismatch] = []
        if status != expect.get("status", 200):
            problems.append(Mismatch("status", expect.get("status", 200), status or error))
        for path, want in expect.get("json", {}).items():
            found, got = json_path(answer, path)
            if not found or not value_matches(want, got):
                problems.append(Mismatch(f"json {path}", want, got if found else "<missing>"))
        if problems:
            raise StepFailure(step, f"{spec['method']} {spec['path']}: {json.dumps(answer)[:300]}", problems)

    async def do_access_login(self, step: Step, spec: dict[str, Any]) -> None:
        from tunnel_lab.lab.runner.access_steps import AccessStepError, access_login

        timeout = parse_duration(spec.get("timeout", 60))
        try:
            note = await access_login(self.lab, self.lab.subst(spec), timeout)
        except AccessStepError as exc:
            raise StepFailure(step, str(exc)) from None
        self.lab.recorder.op("access-login", step=step.index, url=spec["url"], result=note)

    async def do_ssh(self, step: Step, spec: dict[str, Any]) -> None:
        from tunnel_lab.lab.runner.access_steps import AccessStepError, ssh

        timeout = parse_duration(spec.get("timeout", 60))
        try:
            out = await ssh(self.lab, self.lab.subst(spec), timeout)
        except AccessStepError as exc:
            raise StepFailure(step, str(exc)) from None
        self.lab.recorder.op("ssh", step=step.index, host=spec["host"], stdout=out[:200])

    async def do_udp(self, step: Step, spec: dict[str, Any]) -> None:
        """Datagrams through an edge UDP forward port to `target` (edge/udp.py), one at a time."""
        from tunnel_lab.origin_fixtures import dns

        forward = await self.lab.api("POST", "/udp-forwards", {"destination": spec["target"],
                                                              "drop_every": int(spec.get("drop_every", 0))})
        host, _, port = str(forward["listen"]).rpartition(":")
        query = spec.get("dns")
        if query is not None:
            payload = dns.build_query(query["name"], query.get("type", "A"))
        elif spec.get("send_bytes") is not None:
            payload = bytes(i % 251 for i in range(spec["send_bytes"]))
        else:
            payload = spec.get("send", "hello over udp").encode()
        expect = spec.get("expect", {})
        count = int(spec.get("count", 1))
        timeout = parse_duration(spec.get("timeout", "3s"))
        answered, problems = 0, []
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            for i in range(count):
                await sock.sendto(payload, (host.strip("[]"), int(port)))
                reply: bytes | None = None
                with trio.move_on_after(timeout):
                    reply, _ = await sock.recvfrom(65536)
                self.lab.recorder.op("udp", step=step.index, n=i, target=spec["target"], sent=len(payload),
                                     received=None if reply is None else len(reply))
                if reply is None:
                    continue
                answered += 1
                if query is not None:
                    try:
                        _id, rcode, records = dns.parse_answer(reply)
                    except ValueError as exc:
                        problems.append(Mismatch("dns answer", "a DNS response", f"undecodable: {exc}"))
                        continue
                    want = expect.get("answers")
                    if rcode != 0 or (want is not None and records != want):
                        problems.append(Mismatch("dns answer", {"rcode": 0, "answers": want},
                                                 {"rcode": rcode, "answers": records}))
                elif expect.get("echo", True) and reply != payload:
                    problems.append(Mismatch("udp echo", _short(payload), _short(reply)))
        if "answered" in expect and answered != expect["answered"]:
            problems.append(Mismatch("udp answers", f"exactly {expect['answered']} of {count}", answered))
        if expect.get("no_answer"):
            if answered:
                problems.append(Mismatch("udp", "no answer", f"{answered} answers"))
        elif "answered" not in expect and answered < int(expect.get("min_answered", count)):
            problems.append(Mismatch("udp answers", f"{expect.get('min_answered', count)} of {count}",
                                     f"{answered} (no answer within {timeout:g}s)"))
        if problems:
            raise StepFailure(step, f"UDP to {spec['target']} via {forward['listen']}", problems[:5])

    async def _access_listener(self, hostname: str) -> int:
        """Start `tunnel-lab access tcp` for `hostname` once; return its local port."""
        if hostname in self.access_ports:
            return self.access_ports[hostname]
        port = free_port()
        lab = self.lab
        argv = [
            *TUNNEL_LAB,
            "access",
            "tcp",
            "--hostname",
            hostname,
            "--url",
            f"127.0.0.1:{port}",
            "--edge-eyeball",
            str(lab.edge_ready.get("http")),
        ]
        comp = Component(f"access:{hostname}", argv, lab.logs / f"access-{hostname}.log", env=lab.env())
        lab.components[comp.name] = comp
        await comp.start()
        lab.recorder.op("start", component=comp.name, argv=argv, pid=comp.pid)
        with trio.move_on_after(10):
            while True:
                if comp.process is not None and comp.process.returncode is not None:
                    raise ComponentError(
                        f"`tunnel-lab access tcp` exited with code {comp.process.returncode}"
                    )
                try:
                    probe = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await probe.aclose()
                self.access_ports[hostname] = port
                return port
        raise ComponentError(f"`tunnel-lab access tcp` did not listen on 127.0.0.1:{port} within 10s")

    # --- concurrency ---------------------------------------------------------------------------------------
    async def do_parallel(self, step: Step, spec: Any) -> None:
        failures: list[StepFailure] = []

        async def branch(child: Step) -> None:
            try:
                await self.run_step(child)
            except StepFailure as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for child in step.children:
                nursery.start_soon(branch, child)
        self.note(step.title)
        if failures:
            first = failures[0]
            extra = f" (and {len(failures) - 1} more branch(es) failed)" if len(failures) > 1 else ""
            raise StepFailure(first.step, first.message + extra, first.mismatches)

    async def do_sleep(self, step: Step, spec: Any) -> None:
        await trio.sleep(parse_duration(spec))

    # --- waits -------------------------------------------------------------------------------------------
    async def do_wait(self, step: Step, spec: dict[str, Any]) -> None:
        timeout = parse_duration(spec.get("timeout", DEFAULT_STEP_TIMEOUT))
        lab = self.lab
        if "ready" in spec:
            await lab.wait_ready(spec["ready"], timeout)
            return
        if "exit" in spec:
            comp = lab.components[connector_key(spec["exit"].get("connector"))]
            code = await comp.wait_exit(timeout)
            if code is None:
                raise StepFailure(step, f"the connector was still running after {timeout:g}s")
            want = spec["exit"].get("code")
            if want is not None and code != want:
                raise StepFailure(step, "the connector's exit code", [Mismatch("exit code", want, code)])
            return
        last: Any = None
        with trio.move_on_after(timeout):
            while True:
                try:
                    ok, last = await self._probe(spec)
                except ComponentError as exc:  # e.g. the API of an edge that is restarting
                    ok, last = False, str(exc)
                if ok:
                    return
                await trio.sleep(0.05)
        what = next(k for k in ("connections", "log", "metric") if k in spec)
        raise StepFailure(
            step,
            f"wait for {what} timed out after {timeout:g}s",
            [Mismatch(what, _wait_expected(spec), last)],
        )

    async def _probe(self, spec: dict[str, Any]) -> tuple[bool, Any]:
        lab = self.lab
        if "connections" in spec:
            sel = spec["connections"]
            conns = await lab.api("GET", "/connections")
            if isinstance(conns, dict):
                conns = conns.get("connections", [])
            chosen = [c for c in conns if all(c.get(k) == sel[k] for k in ("location", "state") if k in sel)]
            return count_ok(sel["count"], len(chosen)), len(chosen)
        if "log" in spec:
            sel = spec["log"]
            text = lab.log_text(sel.get("component", "connector"))
            found = list(re.finditer(sel["regex"], text, re.MULTILINE))
            want = sel.get("count", {"min": 1})
            ok = count_ok(want, len(found))
            if ok and found and "save" in sel:
                first = found[0]
                lab.saved[sel["save"]] = (first.group(1) if first.re.groups else first.group(0)) or ""
            return ok, f"{len(found)} matching line(s)"
        sel = spec["metric"]
        if sel.get("component", "edge") == "edge":
            text = await lab.api("GET", "/metrics")
        else:
            text = await lab.connector_metrics()
        value = metric_value(str(text), sel["name"], sel.get("labels"))
        if value is None:
            return False, "no such sample"
        return sel.get("min", float("-inf")) <= value <= sel.get("max", float("inf")), value

    # --- faults and components ------------------------------------------------------------------------------
    async def do_fault(self, step: Step, spec: dict[str, Any]) -> None:
        answer = await self.lab.api("POST", "/faults", spec)
        fid = answer.get("id") if isinstance(answer, dict) else None
        self.lab.recorder.op("fault", step=step.index, body=spec, answer=answer)
        if step.name and fid:
            self.fault_ids[step.name] = str(fid)

    async def do_clear_faults(self, step: Step, spec: Any) -> None:
        if spec is True:
            await self.lab.api("DELETE", "/faults")
        elif isinstance(spec, str):
            await self.lab.api("DELETE", f"/faults/{self.fault_ids.get(spec, spec)}")

    async def do_origin(self, step: Step, spec: dict[str, Any]) -> None:
        name, action = spec["name"], spec["action"]
        comp = self.lab.components[f"origin:{name}"]
        self.lab.recorder.op("origin", name=name, action=action)
        if action in ("stop", "restart"):
            await comp.stop(grace=1.0)
        if action in ("start", "restart"):
            await self.lab.start_origin(name)

    async def do_connector(self, step: Step, spec: dict[str, Any]) -> None:
        lab = self.lab
        key = connector_key(spec.get("name"))
        comp = lab.components.get(key)
        action = spec["action"]
        if comp is None:
            what = f"connector {spec['name']!r}" if "name" in spec else "connector"
            raise StepFailure(step, f"no {what} was started (a cli step with background: true starts one)")
        lab.recorder.op("connector", action=action, **({"name": spec["name"]} if "name" in spec else {}))
        if action in ("sigstop", "sigcont"):  # a connector that stops answering: its connections go stale
            comp.send_signal(signal.SIGSTOP if action == "sigstop" else signal.SIGCONT)
            return
        if action == "sigterm":
            comp.send_signal(signal.SIGTERM)
        elif action == "sigint":
            comp.send_signal(signal.SIGINT)
        elif action == "sigkill":
            comp.kill_group()
            await comp.wait_exit(5)
        else:  # start and restart: of topology.connector (the loader checks)
            spec_c = lab.scenario.connector
            assert spec_c is not None
            ready = spec.get("wait_ready", spec_c.wait_ready)
            if action == "restart":
                await comp.stop(grace=spec_c.grace_period + 2)
            elif comp.running:
                raise StepFailure(step, "the connector is already running")
            await lab.start_connector(wait_ready=ready)

    async def do_edge(self, step: Step, spec: dict[str, Any]) -> None:
        lab = self.lab
        action = spec["action"]
        lab.recorder.op("edge", action=action)
        if action in ("restart", "crash"):
            await lab.restart_edge(crash=action == "crash")
        elif action == "stop":
            await lab.components["edge"].stop()
        else:
            lab._edge_component(fixed_ports=True)
            await lab.start_edge()

    async def do_history(self, step: Step, spec: dict[str, Any]) -> None:
        # The edge writes a record when an exchange ends, which can be a moment after the eyeball saw
        # the response: poll until the assertion holds or `timeout` passes, then report what was there.
        timeout = parse_duration(spec.get("timeout", 3))
        problems: list[Mismatch] = []
        records: list[Any] = []
        with trio.move_on_after(timeout):
            while True:
                answer = await self.lab.api("GET", "/history")
                if isinstance(answer, dict):
                    answer = answer.get("history", answer.get("records", []))
                if not isinstance(answer, list):
                    raise StepFailure(step, f"/history did not answer a list: {str(answer)[:200]}")
                records = answer
                problems = check_history(spec, records)
                if not problems:
                    return
                await trio.sleep(0.1)
        raise StepFailure(step, f"history assertion ({len(records)} records in all)", problems)


def _header_pairs(raw: Any) -> list[tuple[str, str]]:
    if isinstance(raw, dict):
        out: list[tuple[str, str]] = []
        for name, value in raw.items():
            for v in value if isinstance(value, list) else [value]:
                out.append((str(name), str(v)))
        return out
    return [(str(n), str(v)) for n, v in raw]


def _short(value: str | bytes) -> str:
    text = value if isinstance(value, str) else f"<{len(value)} bytes>"
    return text if len(text) < 80 else text[:77] + "..."


def _wait_expected(spec: dict[str, Any]) -> str:
    if "connections" in spec:
        sel = spec["connections"]
        return f"{describe_count(sel['count'])} connection(s) " + json.dumps(
            {k: v for k, v in sel.items() if k != "count"}
        )
    if "log" in spec:
        want = describe_count(spec["log"].get("count", {"min": 1}))
        return f"{want} line(s) matching {spec['log']['regex']!r}"
    sel = spec["metric"]
    return f"{sel['name']} in [{sel.get('min', '-inf')}, {sel.get('max', 'inf')}]"

"""The parent of a multi-process edge (`tunnel-lab edge --processes N`; docs/architecture.md, "The edge in
several processes").

The parent keeps what must be whole: the management API (one port, one token), the faults (applied here,
mirrored to every worker before the API answers), the merged history and metrics and the connection list
(pulled from the workers before each API answer), the ready file. The workers (edge/worker.py) own the data
centres, split between them in turn (LAB1, LAB3, ... to worker 0; LAB2, LAB4, ... to worker 1), and accept
eyeballs (HTTP, HTTPS, `--warp-listen`) on listening sockets the parent bound and handed down; worker 0 holds
the UDP forwards' ports. A worker that dies is logged and shown in
`GET /processes` and the metrics; the others go on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from tunnel_lab.edge import api
from tunnel_lab.edge.config import Address, EdgeConfig
from tunnel_lab.edge.server import PatientListener, _guard, _peer, _write_atomic
from tunnel_lab.edge.state import Counter, EdgeState, MergedHistory, Metrics, Registry, TunnelsView
from tunnel_lab.edge.worker import config_to_json, fault_to_json, listener_key
from tunnel_lab.lab import paths
from tunnel_lab.lab.pki import LabPKI
from tunnel_lab.transport.trace import Tracer, part_path
from tunnel_lab.transport.tunnel import TunnelStreamError
from tunnel_lab.wire.edge_link import WORKER_OPS, LineDecoder, encode_message
from tunnel_lab.wire.errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)

READ_SIZE = 65536
START_TIMEOUT = 60.0  # a worker imports the edge and binds its listeners (slow on a loaded machine)
CALL_TIMEOUT = 15.0  # a dc-down waits up to 2 s for the listener; a configuration push up to its own timeout
KILL_GRACE = 5.0  # after the shutdown deadline, then SIGKILL
UDP_OWNER = 0  # the worker that holds every UDP forward's socket (docs/architecture.md)


class WorkerError(ProtocolError):
    """A worker did not answer a call, answered it with an error, or is gone."""


def split_locations(config: EdgeConfig, processes: int) -> list[list[str]]:
    """The data centres of each worker: dealt out in turn (ConfigError when there are fewer than workers)."""
    locations = [t.location for t in config.tunnel_listens]
    if processes < 1:
        raise ConfigError("--processes must be at least 1", source="--processes")
    if len(locations) < processes:
        raise ConfigError(f"{processes} processes need at least {processes} data centres "
                          f"(--tunnel-listen); there are {len(locations)}", source="--processes",
                          hint="each worker process owns one or more data centres")
    return [locations[i::processes] for i in range(processes)]


def check_supported(config: EdgeConfig) -> None:
    """What a multi-process edge cannot do (ConfigError naming it)."""
    # The workers find each inherited eyeball socket by its kind and configured address (edge/worker.py
    # `listener_key`): one address given twice would be one socket for two listeners.
    for flag, addresses in (("--http-listen", config.http_listens), ("--https-listen", config.https_listens)):
        seen: set[tuple[str, int]] = set()
        for address in addresses:
            if (address.host, address.port) in seen:
                raise ConfigError(f"{address} is given twice", source=flag,
                                  hint="give each address once (port 0 twice: give two different hosts)")
            seen.add((address.host, address.port))


@dataclass(frozen=True)
class RemoteRegistration:
    """A worker's connection's registration, as `connection_json` showed it."""

    tunnel_id: uuid.UUID
    tunnel_name: str
    conn_index: int
    connector_id: uuid.UUID
    client_version: str
    arch: str
    features: tuple[str, ...]
    registered_at: float


class RemoteConnection:
    """A worker's tunnel connection as the parent's API sees it: read from the last snapshot; what the
    faults do to it is a call to its worker."""

    def __init__(self, worker: WorkerProc, data: dict[str, Any]) -> None:
        self.worker = worker
        self.serial = worker.index * 10**9 + int(data["serial"])
        self.id = str(data["id"])
        self.location = str(data["location"])
        self.remote = str(data["remote"])
        self.state = str(data["state"])
        self.routable = bool(data["routable"])
        self.active_streams = int(data["streams"])
        self.registration = None if data["tunnel_id"] is None else RemoteRegistration(
            tunnel_id=uuid.UUID(data["tunnel_id"]), tunnel_name=data["tunnel_name"] or "",
            conn_index=int(data["conn_index"]), connector_id=uuid.UUID(data["connector_id"]),
            client_version=data["client_version"] or "", arch=data["arch"] or "",
            features=tuple(data["features"]), registered_at=float(data["registered_at"] or 0))
        self.closed = trio.Event()
        # what edge.api's quic faults look for: only QUIC connections can be silenced
        self.silence = self._silence if data.get("quic") else None

    def ident(self) -> str:
        """Identity fields for log lines."""
        return f"conn={self.id} location={self.location} worker={self.worker.index}"

    def abort(self, why: str) -> None:
        self.worker.cluster.pending.append((self.worker, "abort", {"connection": self.id, "why": why}))

    def _silence(self, why: str) -> None:
        self.worker.cluster.pending.append((self.worker, "silence", {"connection": self.id, "why": why}))

    async def send_goaway(self, error_code: int = 0, debug: bytes = b"") -> None:
        await self.worker.call("goaway", connection=self.id, error_code=error_code)

    async def reset_all_streams(self, code: int = 0) -> int:
        n: int = await self.worker.call("reset_streams", connection=self.id)
        return n

    async def push_configuration(self, version: int, config: bytes) -> tuple[int, str]:
        """edge.remote_config's push, done by the worker that holds the connection."""
        try:
            answer = await self.worker.call("push_config", connection=self.id, version=version,
                                            config=json.loads(config))
        except WorkerError as exc:
            raise TunnelStreamError(str(exc)) from None
        if "push_error" in answer:
            raise TunnelStreamError(answer["push_error"])
        return int(answer["latest"]), answer["error"] or ""


async def call_each(workers: list[WorkerProc], method: str, failed: str,
                    args: Callable[[WorkerProc], dict[str, Any]] = lambda w: {}) -> dict[int, Any]:
    """`method` on each of `workers` at once: the answers by worker index. A worker that fails is logged
    ("`failed` worker N: why") and left out: one worker's trouble never stops the parent's answer."""
    answers: dict[int, Any] = {}

    async def one(w: WorkerProc) -> None:
        try:
            answers[w.index] = await w.call(method, **args(w))
        except WorkerError as exc:
            log.warning("%s worker %d: %s", failed, w.index, exc)

    async with trio.open_nursery() as nursery:
        for w in workers:
            nursery.start_soon(one, w)
    return answers


class RemoteTrace:
    """The parent's `EdgeState.trace` with `--trace`: the workers write the trace and keep the rings of the
    requests they served; the live view's `GET /live/trace?ray=` asks them (`answer`)."""

    def __init__(self, workers: list[WorkerProc]) -> None:
        self.workers = workers

    async def answer(self, ray: str) -> dict[str, Any]:
        """The answer of the worker that holds `ray`'s records (`ok`), else one that evicted them, else
        `unknown`. Every live worker is asked: the ray names the data centre, but a request answered before
        reaching a tunnel has the ray of whichever worker's first data centre took it."""
        answers = await call_each([w for w in self.workers if w.alive], "trace", "no trace answer from",
                                  lambda w: {"ray": ray})
        for status in ("ok", "evicted", "unknown"):
            for answer in answers.values():
                if answer.get("status") == status:
                    return answer
        return {"ray": ray, "status": "unknown", "message": f"no worker process of the edge answered for "
                f"{ray} (the edge's log says why); the trace files have every record"}


@dataclass(eq=False)
class WorkerProc:
    """One worker process and the parent's end of its control channel."""

    cluster: Cluster
    index: int
    locations: list[str]
    process: trio.Process | None = None
    stream: trio.SocketStream | None = None
    alive: bool = False
    exit_code: int | None = None
    pid: int = 0
    forward: str = ""
    tunnel_listeners: list[dict[str, Any]] = field(default_factory=list)
    routes: set[str] = field(default_factory=set)
    ready: trio.Event = field(default_factory=trio.Event)
    calls: dict[int, trio.MemorySendChannel[dict[str, Any]]] = field(default_factory=dict)
    next_id: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)

    def info(self) -> dict[str, Any]:
        """`GET /processes`: one entry."""
        return {"worker": self.index, "pid": self.pid, "alive": self.alive, "exit_code": self.exit_code,
                "locations": self.locations, "forward": self.forward}

    async def send(self, op: str, **fields: Any) -> None:
        """One message to the worker (WorkerError when it is gone)."""
        if self.stream is None or self.exit_code is not None:
            raise WorkerError(f"worker {self.index} is not running")
        try:
            async with self.lock:
                await self.stream.send_all(encode_message(op, **fields))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise WorkerError(f"worker {self.index} is gone: {exc}") from None

    async def call(self, method: str, **args: Any) -> Any:
        """A request and its reply, within CALL_TIMEOUT (WorkerError otherwise)."""
        self.next_id += 1
        call_id = self.next_id
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self.calls[call_id] = send
        try:
            await self.send("call", id=call_id, method=method, args=args)
            with trio.move_on_after(CALL_TIMEOUT):
                reply = await receive.receive()
                if "error" in reply:
                    raise WorkerError(f"worker {self.index}: {method} failed: {reply['error']}")
                return reply.get("result")
            raise WorkerError(f"worker {self.index} did not answer {method} within {CALL_TIMEOUT:g}s")
        except trio.EndOfChannel:
            raise WorkerError(f"worker {self.index} went away during {method}") from None
        finally:
            self.calls.pop(call_id, None)

    def fail_calls(self) -> None:
        """The worker is gone: every waiting call ends."""
        for send in self.calls.values():
            send.close()
        self.calls.clear()


class Cluster:
    """The parent process: implements `edge.api.EdgeControl` for the whole edge."""

    def __init__(self, config: EdgeConfig, processes: int) -> None:
        check_supported(config)
        self.config = config
        self.state_dir = paths.state_dir(config.state_dir)
        self.pki = LabPKI(self.state_dir)
        self.state: EdgeState[Any] = EdgeState(
            config=config, tunnels=TunnelsView(self.state_dir), history=MergedHistory(),
            default_location=config.tunnel_listens[0].location if config.tunnel_listens else "LAB")
        self.own_metrics = Metrics()  # what the parent itself counts (faults); the workers' are added to it
        self.workers = [WorkerProc(self, i, locs)
                        for i, locs in enumerate(split_locations(config, processes))]
        self.owner = {loc: w for w in self.workers for loc in w.locations}
        self._api_token = paths.api_token(self.state_dir)
        self.pending: list[tuple[WorkerProc, str, dict[str, Any]]] = []  # sync fault actions, sent by publish
        self.sent_faults: list[dict[str, Any]] | None = None
        self.faults_dirty = trio.Event()
        self.bound: dict[str, str | None] = {"http": None, "https": None, "warp": None, "api": None}
        self.listening: dict[str, list[str]] = {"http": [], "https": []}  # every eyeball address, bound
        self.udp_forwards: list[dict[str, str]] = []
        if config.trace is not None:
            self.state.trace = RemoteTrace(self.workers)
        self.shutting_down = False
        self._shutdown = trio.Event()
        self.stopped = trio.Event()

    # ---- EdgeControl ---------------------------------------------------------------------------
    @property
    def api_token(self) -> str:
        return self._api_token

    @property
    def ca_pem_path(self) -> Path:
        return self.pki.ca_pem_path

    def locations(self) -> Collection[str]:
        """Every data centre of every worker."""
        return [t.location for t in self.config.tunnel_listens]

    async def dc_down(self, location: str) -> int:
        closed: int = await self.owner[location].call("dc_down", location=location)
        return closed

    async def dc_up(self, location: str) -> None:
        await self.owner[location].call("dc_up", location=location)

    def swap_cert(self, location: str, kind: str) -> None:
        self.pending.append((self.owner[location], "swap_cert", {"location": location, "kind": kind}))

    async def start_udp_forward(self, listen: tuple[str, int], dest: tuple[str, int], *,
                                drop_every: int = 0) -> dict[str, str]:
        """A new UDP port, in the worker that holds them all (OSError when it cannot bind)."""
        owner = self.workers[UDP_OWNER]
        try:
            answer = await owner.call("udp_forward", listen=list(listen), destination=list(dest),
                                      drop_every=drop_every)
        except WorkerError as exc:
            raise api.ApiError(503, f"worker {owner.index} holds the UDP ports and cannot open one: {exc}"
                               ) from None
        if "bind_error" in answer:
            raise OSError(int(answer["errno"]), str(answer["bind_error"]))
        forward = {"listen": str(answer["listen"]), "destination": str(answer["destination"])}
        self.udp_forwards.append(forward)
        return forward

    def processes(self) -> list[dict[str, Any]]:
        """The worker processes (crashed ones included)."""
        return [w.info() for w in self.workers]

    async def refresh(self) -> None:
        """Before an API answer: the workers' connections, history, metrics and pushed configurations."""
        cursors = self.state.history.cursors if isinstance(self.state.history, MergedHistory) else {}
        snapshots = await call_each([w for w in self.workers if w.alive], "snapshot", "no snapshot from",
                                    lambda w: {"since": cursors.get(w.index, 0)})
        registry: Registry[Any] = Registry()
        for w in self.workers:
            snap = snapshots.get(w.index)
            if snap is None:
                continue
            for data in snap["connections"]:
                registry.add(RemoteConnection(w, data))
            assert isinstance(self.state.history, MergedHistory)
            self.state.history.absorb(w.index, snap["history"])
            w.routes = set(snap["routes"])
            for tunnel_id, text in snap["pushed_configs"].items():
                self.state.pushed_configs[tunnel_id] = text.encode("latin-1")
        self.state.registry = registry
        merged = self.own_metrics.merged(s["metrics"] for s in snapshots.values())
        up = Counter("tunnel_lab_edge_worker_up", "Worker processes of the edge (1 running, 0 gone).")
        for w in self.workers:
            up.inc(1 if w.alive else 0, worker=w.index, locations=",".join(w.locations))
        merged.extra = [up]
        self.state.metrics = merged
        await self._send_peers()

    async def publish(self) -> None:
        """After a changing API call: fault actions to their workers, the active faults to every worker."""
        # Only the parent counts faults: keep its counts for the next merge.
        self.own_metrics.faults.values = dict(self.state.metrics.faults.values)
        pending, self.pending = self.pending, []
        for w, method, args in pending:
            try:
                await w.call(method, **args)
            except WorkerError as exc:
                log.warning("fault action %s not done: %s", method, exc)
        await self._send_faults()

    async def _send_faults(self) -> None:
        faults = [fault_to_json(f) for f in self.state.faults.active.values()]
        if faults == self.sent_faults:
            return
        self.sent_faults = faults

        await call_each([w for w in self.workers if w.alive], "set_faults", "faults not sent to",
                        lambda w: {"faults": faults})

    def _peers_of(self, me: WorkerProc) -> dict[str, list[str]]:
        routes: dict[str, list[str]] = {}
        for w in self.workers:
            if w is me or not w.alive:
                continue
            for tunnel_id in w.routes:
                routes.setdefault(tunnel_id, []).append(w.forward)
        return routes

    async def _send_peers(self, only: WorkerProc | None = None, **extra: Any) -> None:
        for w in self.workers:
            if w.alive and (only is None or w is only):
                try:
                    await w.send("peers", routes=self._peers_of(w), **extra)
                except WorkerError as exc:
                    log.warning("routes not sent to worker %d: %s", w.index, exc)

    # ---- the workers' messages ------------------------------------------------------------------
    async def _read_worker(self, w: WorkerProc) -> None:
        assert w.stream is not None
        decoder = LineDecoder(WORKER_OPS)
        try:
            while True:
                data = await w.stream.receive_some(READ_SIZE)
                if not data:
                    break
                for msg in decoder.feed(data):
                    await self._on_message(w, msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError) as exc:
            log.error("worker %d: control channel failed: %s", w.index, exc)
        finally:
            w.fail_calls()
            w.ready.set()  # a worker that failed to start ends the wait for it at once (alive is False)

    async def _on_message(self, w: WorkerProc, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "reply":
            send = w.calls.get(msg.get("id", -1))
            if send is not None:
                send.send_nowait(msg)
        elif op == "ready":
            w.pid, w.forward = int(msg["pid"]), str(msg["forward"])
            w.tunnel_listeners = list(msg["tunnel_listeners"])
            self.udp_forwards += [{"listen": str(f["listen"]), "destination": str(f["destination"])}
                                  for f in msg.get("udp_forwards", [])]
            w.alive = True
            w.ready.set()
        elif op == "routes":
            w.routes = set(msg["tunnels"])
            if "ask" in msg:  # a worker with a request and no map entry: ask the others live
                await self._answer_ask(w, msg)
            await self._send_peers()
        elif op == "took":
            fault = self.state.faults.active.get(str(msg["fault"]))
            if fault is not None and fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.state.faults.active.pop(fault.id, None)
                    log.warning("fault used up: id=%s kind=%s", fault.id, fault.kind)
                self.faults_dirty.set()

    async def _answer_ask(self, asker: WorkerProc, msg: dict[str, Any]) -> None:
        others = [w for w in self.workers if w.alive and w is not asker]
        answers = await call_each(others, "routable", "no routes from")
        for w in others:
            if w.index in answers:
                w.routes = set(answers[w.index])
        await self._send_peers(only=asker, ask=msg["ask"], tunnel=msg.get("tunnel", ""))

    async def _fault_sender(self) -> None:
        while True:
            await self.faults_dirty.wait()
            self.faults_dirty = trio.Event()
            await self._send_faults()

    # ---- processes ------------------------------------------------------------------------------
    def _bind(self, address: Address) -> socket.socket:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.create_server((address.host, address.port), family=family, backlog=1024)
        sock.set_inheritable(True)
        return sock

    async def _run_worker(self, w: WorkerProc, inherited: dict[str, socket.socket],
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        parent_end, child_end = socket.socketpair()
        child_end.set_inheritable(True)
        level = logging.getLevelName(logging.getLogger("tunnel_lab").getEffectiveLevel()).lower()
        argv = [sys.executable, "-m", "tunnel_lab", "edge", "--worker-control", str(child_end.fileno()),
                "--loglevel", level]
        fds = [child_end.fileno(), *(s.fileno() for s in inherited.values())]
        try:
            w.process = await trio.lowlevel.open_process(argv, pass_fds=fds)
        finally:
            child_end.close()
        w.stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent_end))
        listens = tuple(t for t in self.config.tunnel_listens if t.location in w.locations)
        config = replace(self.config, tunnel_listens=listens, api_listen=None, ready_file=None,
                         udp_forwards=self.config.udp_forwards if w.index == UDP_OWNER else ())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_worker, w)
            await w.send("start", worker=w.index, config=config_to_json(config),
                         inherited={k: s.fileno() for k, s in inherited.items()})
            with trio.move_on_after(START_TIMEOUT):
                await w.ready.wait()
            if not w.alive:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(KILL_GRACE):
                        await w.process.wait()
                    w.process.kill()
                    code = await w.process.wait()
                raise WorkerError(f"worker {w.index} (data centres {', '.join(w.locations)}) did not start "
                                  f"(exit code {code}; its error is above)")
            log.info("worker %d pid=%d data centres %s forward=%s", w.index, w.pid, ",".join(w.locations),
                     w.forward)
            task_status.started()
            w.exit_code = await w.process.wait()
            w.alive = False
            w.fail_calls()
            if not self.shutting_down:
                log.error("worker %d (pid %d, data centres %s) exited with code %s: its data centres are "
                          "down; the other workers go on", w.index, w.pid, ",".join(w.locations), w.exit_code)
                await self._send_peers()
            nursery.cancel_scope.cancel()

    # ---- main -----------------------------------------------------------------------------------
    def request_shutdown(self) -> None:
        """Begin a graceful shutdown of every process."""
        self._shutdown.set()

    async def serve(self, *, task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the workers and the API; run until `request_shutdown`; then stop everything."""
        try:
            await self._serve(task_status)
        finally:
            self.stopped.set()

    async def _serve(self, task_status: trio.TaskStatus[Cluster]) -> None:
        cfg = self.config
        # Made once here, before the workers start, so they never race to create them.
        self.pki.server_ssl_context("edge")
        paths.quic_reset_key(self.state_dir)
        inherited: dict[str, socket.socket] = {}
        # `--trace FILE`: each worker writes its own file beside FILE; FILE names them (docs/trace.md)
        tracer = None if cfg.trace is None else Tracer(
            cfg.trace, component="edge", parts=[part_path(cfg.trace, w.index).name for w in self.workers])
        try:
            warp = (cfg.warp_listen,) if cfg.warp_listen is not None else ()
            for what, addresses in (("http", cfg.http_listens), ("https", cfg.https_listens), ("warp", warp)):
                for address in addresses:
                    sock = inherited[listener_key(what, address.host, address.port)] = self._bind(address)
                    bound = str(Address(*sock.getsockname()[:2]))
                    self.bound[what] = self.bound[what] or bound  # the first, as in one process
                    self.listening.setdefault(what, []).append(bound)
            async with trio.open_nursery() as nursery:
                for w in self.workers:
                    await nursery.start(self._run_worker, w, inherited)
                for sock in inherited.values():
                    sock.close()  # the workers hold them now
                inherited.clear()
                nursery.start_soon(self._fault_sender)
                await self._send_peers()
                async with trio.open_nursery() as api_nursery:
                    if cfg.api_listen is not None:
                        self.bound["api"] = await api_nursery.start(self._serve_api, cfg.api_listen)
                    self._write_ready()
                    log.info("edge in %d processes: api=%s http=%s https=%s warp=%s udp=%s",
                             len(self.workers), self.bound["api"], self.bound["http"], self.bound["https"],
                             self.bound["warp"],
                             ",".join(f["listen"] for f in self.udp_forwards) or None)
                    task_status.started(self)
                    await self._shutdown.wait()
                    api_nursery.cancel_scope.cancel()
                await self._stop_workers()
                nursery.cancel_scope.cancel()
        finally:
            for sock in inherited.values():
                sock.close()
            if tracer is not None:
                tracer.close()
        log.info("edge stopped (all processes)")

    async def _stop_workers(self) -> None:
        """Shutdown to every worker; each drains within the shutdown timeout; stragglers are killed."""
        self.shutting_down = True
        for w in self.workers:
            if w.alive:
                with contextlib.suppress(WorkerError):
                    await w.send("shutdown")
        with trio.move_on_after(self.config.shutdown_timeout + KILL_GRACE):
            for w in self.workers:
                if w.process is not None:
                    await w.process.wait()
        for w in self.workers:
            if w.process is not None and w.process.returncode is None:
                log.warning("worker %d did not stop in time: killing it", w.index)
                w.process.kill()
                with trio.CancelScope(shield=True):
                    await w.process.wait()

    async def _serve_api(self, address: Address, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        listeners = [PatientListener(s, "api", self.config.accept_retry_delay)
                     for s in await trio.open_tcp_listeners(address.port, host=address.host)]
        host, port = listeners[0].listener.socket.getsockname()[:2]

        async def handle(stream: trio.SocketStream) -> None:
            await _guard(lambda s, peer: api.handle_api_connection(self.state, self, s, peer), stream,
                         _peer(stream), "api")

        task_status.started(str(Address(host, port)))
        accepting: list[trio.abc.Listener[trio.SocketStream]] = list(listeners)
        await trio.serve_listeners(handle, accepting)

    def ready_info(self) -> dict[str, Any]:
        """The ready file: the single-process edge's shape, plus the processes."""
        by_location = {lst["location"]: lst for w in self.workers for lst in w.tunnel_listeners}
        return {
            "pid": os.getpid(),
            "tunnel_listeners": [by_location[t.location] for t in self.config.tunnel_listens
                                 if t.location in by_location],
            "http": self.bound["http"], "https": self.bound["https"], "warp": self.bound["warp"],
            "udp_forwards": self.udp_forwards,
            "http_listeners": self.listening["http"],
            "https_listeners": self.listening["https"],
            "api": self.bound["api"], "api_token": self.api_token, "ca": str(self.pki.ca_pem_path),
            "processes": self.processes(),
        }

    def _write_ready(self) -> None:
        info = json.dumps(self.ready_info(), indent=2) + "\n"
        targets = [paths.edge_json_path(self.state_dir)]
        if self.config.ready_file is not None:
            targets.append(Path(self.config.ready_file))
        for target in targets:
            _write_atomic(target, info)


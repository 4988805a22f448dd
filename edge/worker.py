"""One worker process of a multi-process edge: some data centres (tunnel listeners, TCP and QUIC), its share
of the eyeball connections, a forward listener, and the control channel to the parent (edge/cluster.py).

The worker is an ordinary `Edge` with three differences: its eyeball listeners are sockets the parent bound
and handed down (every worker accepts on them, so the kernel spreads the eyeballs), it has no management API
(the parent's answers for the whole edge), and its faults are the parent's, mirrored (`MirroredFaults`).
docs/architecture.md, "The edge in several processes".
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tunnel_lab.edge import forward, live
from tunnel_lab.edge.config import Address, EdgeConfig, TunnelListen
from tunnel_lab.edge.server import Edge, PatientListener
from tunnel_lab.edge.state import Fault, Faults, connection_json
from tunnel_lab.transport.trace import Tracer, open_tracer
from tunnel_lab.wire.edge_link import PARENT_OPS, LineDecoder, encode_message, fit_trace_answer
from tunnel_lab.wire.errors import ProtocolError, TunnelLabError

log = logging.getLogger(__name__)

READ_SIZE = 65536
ASK_TIMEOUT = 2.0  # the parent answers "who has this tunnel?" from memory and one call per worker


# ---- the configuration across the process boundary -------------------------------------------------
def config_to_json(config: EdgeConfig) -> dict[str, Any]:
    """An EdgeConfig as JSON (every field; `config_from_json` reverses it)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, Address):
            value = [value.host, value.port]
        elif f.name == "tunnel_listens":
            value = [[t.location, t.address.host, t.address.port] for t in value]
        elif f.name in ("http_listens", "https_listens"):
            value = [[a.host, a.port] for a in value]
        out[f.name] = value
    return out


def config_from_json(data: dict[str, Any]) -> EdgeConfig:
    """The EdgeConfig `config_to_json` wrote (ProtocolError on a field it does not know)."""
    known = {f.name for f in dataclasses.fields(EdgeConfig)}
    unknown = set(data) - known
    if unknown:
        raise ProtocolError(f"worker configuration has unknown fields {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name in ("state_dir", "ready_file", "trace"):
            value = Path(value) if value is not None else None
        elif name in ("warp_listen", "api_listen"):
            value = Address(value[0], int(value[1])) if value is not None else None
        elif name in ("http_listens", "https_listens"):
            value = tuple(Address(host, int(port)) for host, port in value)
        elif name == "tunnel_listens":
            value = tuple(TunnelListen(loc, Address(host, int(port))) for loc, host, port in value)
        elif name == "udp_forwards":
            value = tuple((tuple(a), tuple(b)) for a, b in value)
        values[name] = value
    return EdgeConfig(**values)


def fault_to_json(fault: Fault) -> dict[str, Any]:
    """A fault as the parent sends it to the workers."""
    return {"id": fault.id, "kind": fault.kind, "params": fault.params, "created": fault.created,
            "remaining": fault.remaining}


class MirroredFaults(Faults):
    """A worker's copy of the parent's active faults. Taking from a counted fault here is reported (`took`),
    so the parent's count and every other worker's copy go down too."""

    def __init__(self, report: Callable[[str], None]) -> None:
        super().__init__()
        self.report = report

    def replace(self, faults: list[dict[str, Any]]) -> None:
        """The parent's active faults (after every change)."""
        self.active = {f["id"]: Fault(id=f["id"], kind=f["kind"], params=dict(f["params"]),
                                      created=float(f["created"]), remaining=f["remaining"]) for f in faults}

    def _counted(self) -> dict[str, int]:
        return {f.id: f.remaining for f in self.active.values() if f.remaining is not None}

    def _report_taken(self, before: dict[str, int]) -> None:
        for fault_id, remaining in before.items():
            now = self.active.get(fault_id)
            if now is None or now.remaining != remaining:
                self.report(fault_id)

    def _take(self, kind: str) -> Fault | None:
        before = self._counted()
        fault = super()._take(kind)
        self._report_taken(before)
        return fault

    def take_quic_handshake_refusal(self, location: str) -> tuple[int, str] | None:
        before = self._counted()
        refusal = super().take_quic_handshake_refusal(location)
        self._report_taken(before)
        return refusal


def listener_key(what: str, host: str, port: int) -> str:
    """How the parent names an eyeball socket it hands the workers: its kind and configured address (the
    worker sees the same configuration; a port 0 is still 0 there)."""
    return f"{what} {host} {port}"


# ---- the worker's edge -------------------------------------------------------------------------------
class WorkerEdge(Edge):
    """An Edge whose eyeball listeners are the parent's sockets and which writes no ready file."""

    def __init__(self, config: EdgeConfig, *, worker: int, inherited: dict[str, int]) -> None:
        self.worker = worker  # before Edge.__init__, which opens the tracer
        super().__init__(config)
        self.inherited = inherited  # `listener_key` -> the listening socket's descriptor

    async def _open(self, host: str, port: int, what: str) -> list[PatientListener]:
        fd = self.inherited.get(listener_key(what, host, port))
        if fd is None:
            return await super()._open(host, port, what)
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        return [PatientListener(trio.SocketListener(sock), what, self.config.accept_retry_delay)]

    def _open_tracer(self) -> Tracer | None:
        # this worker's own file beside the parent's (docs/trace.md, "A multi-process edge")
        return open_tracer(self.config.trace, component="edge", ring=True, worker=self.worker)

    def _write_ready(self) -> None:
        pass  # the parent writes the ready file for the whole edge

    def _log_startup(self) -> None:
        for lst in self.listeners.values():
            log.info("worker %d: tunnel listener location=%s address=%s", self.worker, lst.location,
                     lst.address)


class ControlLink:
    """The worker's end of the control channel: JSON lines, one writer at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = LineDecoder(PARENT_OPS)
        self.pending: list[dict[str, Any]] = []
        self.lock = trio.Lock()
        self.broken = False

    async def send(self, op: str, **fields: Any) -> None:
        """Send one message. When the channel broke, the parent is gone and `Worker.serve` is about to
        shut the worker down: the message is dropped with a warning, not raised into the sender's task."""
        async with self.lock:
            if self.broken:
                return
            try:
                await self.stream.send_all(encode_message(op, **fields))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.broken = True
                log.warning("control channel to the parent broke (%s): %r and later messages not sent; "
                            "the worker shuts down", exc, op)

    async def receive(self) -> dict[str, Any] | None:
        """The next message; None when the parent closed the channel."""
        while not self.pending:
            data = await self.stream.receive_some(READ_SIZE)
            if not data:
                return None
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)


class Worker:
    """The control side of one worker: answers the parent's calls, reports routes and counted faults."""

    def __init__(self, edge: WorkerEdge, link: ControlLink) -> None:
        self.edge = edge
        self.link = link
        self.faults = MirroredFaults(self._took)
        edge.state.faults = self.faults
        self.peers = forward.Peers(edge.state, ask=self.ask_parent)
        edge.state.peers = self.peers
        self.routes_changed = trio.Event()
        edge.state.registry.on_change = self.routes_changed.set
        self.reported: set[str] | None = None
        self.taken: list[str] = []
        self.taken_event = trio.Event()
        self.asks: dict[int, trio.MemorySendChannel[list[str]]] = {}
        self.ask_ids = iter(range(1, 2**62))
        self.history_sent = 0

    def _took(self, fault_id: str) -> None:
        self.taken.append(fault_id)
        self.taken_event.set()

    async def report_routes(self) -> None:
        """Tell the parent the tunnels this worker can serve whenever the set changes."""
        while True:
            await self.routes_changed.wait()
            self.routes_changed = trio.Event()
            self.edge.state.registry.on_change = self.routes_changed.set
            tunnels = self.edge.state.registry.routable_tunnels()
            if tunnels != self.reported:
                self.reported = tunnels
                await self.link.send("routes", tunnels=sorted(tunnels))

    async def report_taken(self) -> None:
        """Tell the parent which counted faults were used here."""
        while True:
            await self.taken_event.wait()
            self.taken_event = trio.Event()
            taken, self.taken = self.taken, []
            for fault_id in taken:
                await self.link.send("took", fault=fault_id)

    async def ask_parent(self, tunnel_id: str) -> list[str]:
        """Forward addresses of workers with a routable connection of the tunnel, asked live (a connection
        that registered a moment ago may not have reached this worker's map yet)."""
        ask_id = next(self.ask_ids)
        send, receive = trio.open_memory_channel[list[str]](1)
        self.asks[ask_id] = send
        try:
            await self.link.send("routes", tunnels=sorted(self.reported or ()), ask=ask_id, tunnel=tunnel_id)
            with trio.move_on_after(ASK_TIMEOUT):
                return await receive.receive()
            return []
        finally:
            del self.asks[ask_id]

    async def serve(self, nursery: trio.Nursery) -> None:
        """Answer the parent until it says shutdown or goes away."""
        while True:
            try:
                msg = await self.link.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError) as exc:
                log.warning("worker %d: control channel failed: %s", self.edge.worker, exc)
                return
            if msg is None:
                log.warning("worker %d: the parent closed the control channel; shutting down",
                            self.edge.worker)
                return
            op = msg["op"]
            if op == "shutdown":
                return
            if op == "peers":
                self.peers.update({k: list(v) for k, v in msg.get("routes", {}).items()})
                ask = msg.get("ask")
                if ask in self.asks:
                    self.asks[ask].send_nowait(list(msg.get("routes", {}).get(msg.get("tunnel", ""), [])))
            elif op == "call":
                nursery.start_soon(self._call, msg)

    async def _call(self, msg: dict[str, Any]) -> None:
        call_id = msg.get("id")
        try:
            result = await self._dispatch(str(msg.get("method")), msg.get("args") or {})
        except (TunnelLabError, KeyError, ValueError, TypeError) as exc:
            await self.link.send("reply", id=call_id, error=f"{type(exc).__name__}: {exc}")
            return
        await self.link.send("reply", id=call_id, result=result)

    def _conn(self, conn_id: str) -> Any:
        for conn in self.edge.state.registry.all():
            if conn.id == conn_id:
                return conn
        raise KeyError(f"no connection {conn_id} in worker {self.edge.worker}")

    async def _dispatch(self, method: str, args: dict[str, Any]) -> Any:
        state = self.edge.state
        if method == "snapshot":
            since = int(args.get("since", 0))
            conns = []
            for conn in state.registry.all():
                entry = connection_json(conn)
                entry.update(serial=conn.serial, listed=conn in state.registry.listed(),
                             routable=conn.routable, quic=hasattr(conn, "silence"))
                conns.append(entry)
            return {"history": state.history.since(since), "metrics": state.metrics.snapshot(),
                    "connections": conns, "routes": sorted(state.registry.routable_tunnels()),
                    "pushed_configs": {k: v.decode("latin-1") for k, v in state.pushed_configs.items()}}
        if method == "routable":
            return sorted(state.registry.routable_tunnels())
        if method == "udp_forward":  # this worker holds the UDP ports (edge.cluster.UDP_OWNER)
            listen, dest = args["listen"], args["destination"]
            try:
                return await self.edge.start_udp_forward((str(listen[0]), int(listen[1])),
                                                         (str(dest[0]), int(dest[1])),
                                                         drop_every=int(args.get("drop_every", 0)))
            except OSError as exc:
                return {"bind_error": exc.strerror or str(exc), "errno": exc.errno or 0}
        if method == "trace":  # the live view's /live/trace?ray= on the parent: this worker's ring
            return fit_trace_answer(live.trace_answer(state.trace, str(args["ray"])))
        if method == "set_faults":
            self.faults.replace(args["faults"])
            return None
        if method == "dc_down":
            return await self.edge.dc_down(args["location"])
        if method == "dc_up":
            await self.edge.dc_up(args["location"])
            return None
        if method == "swap_cert":
            self.edge.swap_cert(args["location"], args["kind"])
            return None
        if method == "abort":
            self._conn(args["connection"]).abort(args["why"])
            return None
        if method == "goaway":
            await self._conn(args["connection"]).send_goaway(int(args["error_code"]))
            return None
        if method == "reset_streams":
            n: int = await self._conn(args["connection"]).reset_all_streams()
            return n
        if method == "silence":
            self._conn(args["connection"]).silence(args["why"])
            return None
        if method == "push_config":
            from tunnel_lab.edge.remote_config import PushError, push

            try:
                conn = self._conn(args["connection"])
                latest, error = await push(conn, int(args["version"]), args["config"])
            except PushError as exc:
                return {"push_error": str(exc)}
            return {"latest": latest, "error": error}
        raise ValueError(f"unknown call {method!r}")


async def run_worker(control_fd: int) -> None:
    """The worker process's main: wait for `start`, serve until `shutdown` (or the parent goes away)."""
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=control_fd))
    link = ControlLink(trio.SocketStream(sock))
    start = await link.receive()
    if start is None or start["op"] != "start":
        raise ProtocolError(f"worker: expected a start message, got {start!r}")
    config = config_from_json(start["config"])
    index = int(start["worker"])
    edge = WorkerEdge(config, worker=index, inherited={k: int(v) for k, v in start["inherited"].items()})
    worker = Worker(edge, link)
    edge.state.default_location = config.tunnel_listens[0].location if config.tunnel_listens else "LAB"
    forward_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    forward_address = f"127.0.0.1:{forward_listeners[0].socket.getsockname()[1]}"

    async def on_forwarded(stream: trio.SocketStream) -> None:
        try:
            await forward.handle_forwarded(edge.state, stream)
        except Exception:
            log.exception("worker %d: forwarded connection failed", index)

    async with trio.open_nursery() as nursery:
        await nursery.start(edge.serve)
        nursery.start_soon(trio.serve_listeners, on_forwarded, forward_listeners)
        await link.send("ready", worker=index, pid=os.getpid(), forward=forward_address,
                        udp_forwards=edge.udp_forwards,
                        tunnel_listeners=[{"location": lst.location, "address": lst.address,
                                           "quic": lst.quic_address} for lst in edge.listeners.values()])
        nursery.start_soon(worker.report_routes)
        nursery.start_soon(worker.report_taken)
        worker.routes_changed.set()
        async with trio.open_nursery() as calls:
            await worker.serve(calls)
            calls.cancel_scope.cancel()
        log.info("worker %d: shutting down", index)
        edge.request_shutdown()
        await edge.stopped.wait()
        nursery.cancel_scope.cancel()


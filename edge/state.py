"""The edge's in-memory state: live connections, faults, request history, metrics, store view.

Plain objects with explicit arguments (no globals), so tests can build an edge piece by piece.
`EdgeState` bundles them; the handlers (tunnel connections, eyeball proxying, the CONNECT proxy, the
management API) get it instead of the whole server. This module imports no other module of the edge
but its config: the registry knows a connection only by the `LiveConnection` protocol.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from tunnel_lab.edge.config import EdgeConfig
from tunnel_lab.wire.errors import ConfigError

log = logging.getLogger(__name__)


# ---- live connections ---------------------------------------------------------------------------
class RegisteredAs(Protocol):
    """What the registry reads of a connection's registration."""

    @property
    def tunnel_id(self) -> uuid.UUID: ...
    @property
    def conn_index(self) -> int: ...
    @property
    def connector_id(self) -> uuid.UUID: ...


class LiveConnection(Protocol):
    """What the registry, the metrics and the API selectors read of a tunnel connection."""

    @property
    def serial(self) -> int: ...
    @property
    def id(self) -> str: ...
    @property
    def location(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def registration(self) -> RegisteredAs | None: ...
    @property
    def routable(self) -> bool: ...
    @property
    def active_streams(self) -> int: ...


C = TypeVar("C", bound=LiveConnection)


class Registry(Generic[C]):
    """Every live tunnel connection; picks a connection for a tunnel (round robin)."""

    def __init__(self) -> None:
        self._conns: dict[int, C] = {}
        self._rr: dict[uuid.UUID, int] = {}
        # Called (synchronously) when the set of routable connections may have changed: a worker of a
        # multi-process edge tells its parent which tunnels it can serve (edge/worker.py).
        self.on_change: Callable[[], None] | None = None

    def add(self, conn: C) -> None:
        """A connection was accepted."""
        self._conns[conn.serial] = conn
        self.changed()

    def remove(self, conn: C) -> None:
        """A connection closed."""
        self._conns.pop(conn.serial, None)
        self.changed()

    def changed(self) -> None:
        """A connection registered, started draining or went (the connections call it too)."""
        if self.on_change is not None:
            self.on_change()

    def routable_tunnels(self) -> set[str]:
        """The ids of tunnels with at least one routable connection."""
        return {str(c.registration.tunnel_id) for c in self._conns.values()
                if c.routable and c.registration is not None}

    def all(self) -> list[C]:
        """Every live connection, registered or not, oldest first."""
        return list(self._conns.values())

    def listed(self) -> list[C]:
        """Connections the API lists: registered or draining."""
        return [c for c in self._conns.values()
                if c.registration is not None and c.state in ("registered", "draining")]

    def routable(self, tunnel_id: uuid.UUID) -> list[C]:
        """Registered, non-draining connections of a tunnel."""
        return [c for c in self._conns.values()
                if c.routable and c.registration is not None and c.registration.tunnel_id == tunnel_id]

    def pick(self, tunnel_id: uuid.UUID, exclude: Iterable[C] = ()) -> C | None:
        """Round robin over the tunnel's routable connections (across data centres)."""
        skip = set(id(c) for c in exclude)
        candidates = [c for c in self.routable(tunnel_id) if id(c) not in skip]
        if not candidates:
            return None
        # Interleave locations so consecutive picks alternate data centres.
        candidates.sort(key=lambda c: (c.registration.conn_index if c.registration else 0, c.location))
        n = self._rr.get(tunnel_id, 0)
        self._rr[tunnel_id] = n + 1
        return candidates[n % len(candidates)]

    def find_duplicate(self, tunnel_id: uuid.UUID, connector_id: uuid.UUID, conn_index: int,
                       location: str) -> C | None:
        """EDUPCONN: the same connector's connIndex already registered at this data centre."""
        for c in self._conns.values():
            reg = c.registration
            if (reg is not None and c.state == "registered" and reg.tunnel_id == tunnel_id
                    and reg.connector_id == connector_id and reg.conn_index == conn_index
                    and c.location == location):
                return c
        return None

    def select(self, spec: dict[str, Any]) -> list[C]:
        """Connections chosen by an API selector: `connection`, `tunnel_id`(+`conn_index`), `location`."""
        conns = self.listed()

        def reg(c: C) -> Any:
            return c.registration

        if "connection" in spec:
            conns = [c for c in conns if c.id == str(spec["connection"])]
        if "tunnel_id" in spec:
            conns = [c for c in conns if str(reg(c).tunnel_id) == str(spec["tunnel_id"])]
        if "conn_index" in spec:
            conns = [c for c in conns if reg(c).conn_index == int(spec["conn_index"])]
        if "location" in spec:
            conns = [c for c in conns if c.location == str(spec["location"])]
        return conns


# ---- faults ------------------------------------------------------------------------------------
FAULT_KINDS = ("drop-connection", "goaway", "reset-streams", "dc-down", "dc-up", "refuse-registrations",
               "delay-registrations", "swap-cert", "latency", "quic-blackhole", "quic-idle",
               "quic-refuse-handshake")
QUIC_CONNECTION_REFUSED = 0x2  # RFC 9000 §20.1 CONNECTION_REFUSED: the default quic-refuse-handshake code
BROKEN_CERT_KINDS = ("expired", "not-yet-valid", "wrong-san", "unknown-ca", "self-signed")
# Bounds on fault parameters: a value outside them is a 400, never a hung edge or a half-applied fault.
MAX_LATENCY_MS = 600_000  # ten minutes per request
MAX_DELAY_SECONDS = 3600.0
MAX_ERROR_CODE = 2**32 - 1  # HTTP/2 error codes are 32-bit


@dataclass
class Fault:
    """An active fault (one-shot actions are not kept)."""

    id: str
    kind: str
    params: dict[str, Any]
    created: float = field(default_factory=time.time)
    remaining: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The API's view."""
        out = {"id": self.id, "kind": self.kind, **self.params, "created": self.created}
        if self.remaining is not None:
            out["remaining"] = self.remaining
        return out


class Faults:
    """Fault injection knobs; every active one is logged at WARNING when set and when used."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.active: dict[str, Fault] = {}
        # what POST /faults did, one-shot faults included (the live view's `fault` events)
        self.applied: deque[dict[str, Any]] = deque(maxlen=200)
        self._applied_seq = itertools.count(1)

    def new_id(self) -> str:
        """A fresh fault id (`f1`, `f2`, ...)."""
        return f"f{next(self._ids)}"

    def add(self, kind: str, params: dict[str, Any], remaining: int | None = None) -> Fault:
        """Keep a persistent fault."""
        fault = Fault(id=self.new_id(), kind=kind, params=params, remaining=remaining)
        self.active[fault.id] = fault
        log.warning("fault active: id=%s kind=%s %s", fault.id, kind,
                    " ".join(f"{k}={v}" for k, v in params.items()))
        return fault

    def note_applied(self, answer: dict[str, Any]) -> None:
        """Remember the answer of one POST /faults."""
        self.applied.append({"seq": next(self._applied_seq), "time": time.time(), **answer})

    def applied_since(self, seq: int) -> list[dict[str, Any]]:
        """Applied faults after `seq`."""
        return [e for e in self.applied if e["seq"] > seq]

    def remove(self, fault_id: str) -> Fault | None:
        """Clear one fault."""
        fault = self.active.pop(fault_id, None)
        if fault is not None:
            log.warning("fault cleared: id=%s kind=%s", fault.id, fault.kind)
        return fault

    def of_kind(self, kind: str) -> list[Fault]:
        """Active faults of a kind, oldest first."""
        return [f for f in self.active.values() if f.kind == kind]

    def _take(self, kind: str) -> Fault | None:
        for fault in self.of_kind(kind):
            if fault.remaining is None:
                return fault
            if fault.remaining > 0:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self.active.pop(fault.id, None)
                    log.warning("fault used up: id=%s kind=%s", fault.id, kind)
                return fault
        return None

    def take_registration_refusal(self) -> tuple[str, bool] | None:
        """(cause, should_retry) when the next registration must be refused."""
        fault = self._take("refuse-registrations")
        if fault is None:
            return None
        return str(fault.params.get("cause", "Unauthorized: Invalid tunnel secret")), bool(
            fault.params.get("should_retry", False))

    def take_registration_delay(self) -> float:
        """Seconds to hold the next registration's answer."""
        fault = self._take("delay-registrations")
        return float(fault.params.get("seconds", 0)) if fault else 0.0

    def take_quic_handshake_refusal(self, location: str) -> tuple[int, str] | None:
        """(error code, reason) when the next QUIC handshake at `location` must be refused."""
        for fault in self.of_kind("quic-refuse-handshake"):
            if fault.params.get("location", location) != location:
                continue
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.active.pop(fault.id, None)
                    log.warning("fault used up: id=%s kind=%s", fault.id, fault.kind)
            return (int(fault.params.get("error_code", QUIC_CONNECTION_REFUSED)),
                    str(fault.params.get("reason", "refused by a fault")))
        return None

    def latency(self) -> float:
        """Seconds of added latency per eyeball request."""
        return sum(float(f.params.get("ms", 0)) for f in self.of_kind("latency")) / 1000.0


def parse_fault(body: Any) -> tuple[str, dict[str, Any]]:
    """Validate a POST /faults body; raises ConfigError naming the problem."""
    if not isinstance(body, dict):
        raise ConfigError("fault must be a JSON object", source="POST /faults")
    kind = body.get("kind")
    if kind not in FAULT_KINDS:
        raise ConfigError(f"unknown fault kind {kind!r}", source="POST /faults",
                          hint="one of " + ", ".join(FAULT_KINDS))
    params = {k: v for k, v in body.items() if k != "kind"}

    def need(name: str, types: type | tuple[type, ...]) -> None:
        value = params.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(f"fault {kind} needs {name!r}", source="POST /faults")

    def number(name: str, low: float, high: float, *, integer: bool = False) -> None:
        """An optional number within [low, high] (finite; an int when `integer`)."""
        value = params.get(name)
        if value is None:
            return
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not low <= value <= high:
            what = "an integer" if integer else "a number"
            raise ConfigError(f"fault {kind}: {name} must be {what} from {low:g} to {high:g}, got {value!r}",
                              source="POST /faults")

    if kind in ("dc-down", "dc-up", "quic-blackhole"):
        need("location", str)
    elif kind == "quic-refuse-handshake":
        number("error_code", 0, 2**62 - 1, integer=True)  # a QUIC varint
        if not isinstance(params.get("reason", ""), str):
            raise ConfigError("quic-refuse-handshake: reason must be a string", source="POST /faults")
    elif kind == "swap-cert":
        need("location", str)
        need("cert", str)
        if params["cert"] not in (*BROKEN_CERT_KINDS, "valid"):
            raise ConfigError(f"unknown cert kind {params['cert']!r}", source="POST /faults",
                              hint="one of valid, " + ", ".join(BROKEN_CERT_KINDS))
    elif kind == "refuse-registrations":
        params.setdefault("cause", "Unauthorized: Invalid tunnel secret")
        params.setdefault("should_retry", False)
        if not isinstance(params["cause"], str):
            raise ConfigError("refuse-registrations: cause must be a string", source="POST /faults")
    elif kind == "delay-registrations":
        need("seconds", (int, float))
        number("seconds", 0, MAX_DELAY_SECONDS)
    elif kind == "latency":
        need("ms", (int, float))
        number("ms", 0, MAX_LATENCY_MS)
    elif kind == "goaway":
        number("error_code", 0, MAX_ERROR_CODE, integer=True)
    for name in ("conn_index",):
        number(name, 0, 2**31 - 1, integer=True)
    for name in ("connection", "tunnel_id", "location"):
        if name in params and not isinstance(params[name], str):
            raise ConfigError(f"fault {kind}: {name} must be a string", source="POST /faults")
    for name in ("count",):
        if name in params and (not isinstance(params[name], int) or isinstance(params[name], bool)
                               or params[name] < 1):
            raise ConfigError(f"{name} must be a positive integer", source="POST /faults")
    return kind, params


def connection_json(conn: Any) -> dict[str, Any]:
    """A live connection as JSON (`GET /connections`, the live view)."""
    reg = conn.registration
    return {
        "id": conn.id,
        "tunnel_id": str(reg.tunnel_id) if reg else None,
        "tunnel_name": reg.tunnel_name if reg else None,
        "location": conn.location,
        "conn_index": reg.conn_index if reg else None,
        "connector_id": str(reg.connector_id) if reg else None,
        "client_version": reg.client_version if reg else None,
        "arch": reg.arch if reg else None,
        "features": list(reg.features) if reg else [],
        "state": conn.state,
        "remote": conn.remote,
        "streams": conn.active_streams,
        "registered_at": reg.registered_at if reg else None,
    }


# ---- history and metrics ------------------------------------------------------------------------
class History:
    """The request history the API serves (bounded)."""

    def __init__(self, limit: int = 10000) -> None:
        self._seq = itertools.count(1)
        self.entries: deque[dict[str, Any]] = deque(maxlen=limit)

    def record(self, **fields: Any) -> dict[str, Any]:
        """Append one request's outcome."""
        entry = {"seq": next(self._seq), "time": time.time(), **fields}
        self.entries.append(entry)
        return entry

    def since(self, seq: int) -> list[dict[str, Any]]:
        """Entries after `seq`."""
        return [e for e in self.entries if e["seq"] > seq]

    def last_seq(self) -> int:
        """The newest entry's `seq` (0 when empty)."""
        return self.entries[-1]["seq"] if self.entries else 0


class MergedHistory(History):
    """The history of a multi-process edge: the workers' entries, renumbered in the order the parent
    collected them, so `since` stays a cursor a client can poll with. Each worker's own `seq` is kept as
    `worker_seq`, its number as `worker`."""

    def __init__(self, limit: int = 10000) -> None:
        super().__init__(limit)
        self.cursors: dict[int, int] = {}  # worker -> the last worker_seq taken

    def absorb(self, worker: int, entries: list[dict[str, Any]]) -> None:
        """Add a worker's entries newer than what was taken from it before (older ones are ignored)."""
        cursor = self.cursors.get(worker, 0)
        for entry in sorted(entries, key=lambda e: e["seq"]):
            if entry["seq"] <= cursor:
                continue
            cursor = entry["seq"]
            self.entries.append({**entry, "seq": next(self._seq), "worker": worker, "worker_seq": cursor})
        self.cursors[worker] = cursor


class Counter:
    """A labelled Prometheus counter."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1, **labels: Any) -> None:
        """Add to the series named by the labels."""
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        self.values[key] = self.values.get(key, 0) + amount

    def snapshot(self) -> list[list[Any]]:
        """The series as JSON: [[[label, value], ...], amount] each."""
        return [[[list(pair) for pair in key], value] for key, value in self.values.items()]

    def absorb(self, series: list[list[Any]]) -> None:
        """Add a snapshot's series to these (the merge of several processes' counters)."""
        for key, value in series:
            labels = tuple(sorted((str(k), str(v)) for k, v in key))
            self.values[labels] = self.values.get(labels, 0) + float(value)

    def render(self, kind: str = "counter") -> list[str]:
        """Prometheus text lines."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {kind}"]
        for key, value in sorted(self.values.items()):
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
            lines.append(f"{self.name}{{{labels}}} {value:g}" if labels else f"{self.name} {value:g}")
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The edge's Prometheus metrics."""

    def __init__(self) -> None:
        self.requests = Counter("tunnel_lab_edge_requests_total", "Eyeball requests by outcome.")
        self.registrations = Counter("tunnel_lab_edge_registrations_total", "registerConnection calls.")
        self.request_seconds = Counter("tunnel_lab_edge_request_duration_seconds_sum",
                                       "Total time spent on eyeball requests.")
        self.bytes = Counter("tunnel_lab_edge_body_bytes_total", "Body bytes relayed by direction.")
        self.faults = Counter("tunnel_lab_edge_faults_total", "Faults injected through the API.")
        self.waf_hits = Counter("tunnel_lab_edge_waf_hits_total", "WAF and rate-limiting rule hits.")
        self.forwarded = Counter("tunnel_lab_edge_forwarded_total",
                                 "Eyeball requests sent to another process's data centres.")
        self.extra: list[Counter] = []  # more gauges (a multi-process edge's worker processes)

    def counters(self) -> tuple[Counter, ...]:
        """The counters (not the gauges, which are read from the registry)."""
        return (self.requests, self.registrations, self.request_seconds, self.bytes, self.faults,
                self.waf_hits, self.forwarded)

    def snapshot(self) -> dict[str, list[list[Any]]]:
        """Every counter's series as JSON, by counter name (what a worker reports)."""
        return {c.name: c.snapshot() for c in self.counters()}

    def merged(self, snapshots: Iterable[dict[str, list[list[Any]]]]) -> Metrics:
        """A new Metrics: these counters plus every snapshot's (unknown names are ignored)."""
        out = Metrics()
        for mine, theirs in zip(self.counters(), out.counters(), strict=True):
            theirs.values = dict(mine.values)
        by_name = {c.name: c for c in out.counters()}
        for snap in snapshots:
            for name, series in snap.items():
                if name in by_name:
                    by_name[name].absorb(series)
        return out

    def render(self, registry: Registry[Any]) -> str:
        """Prometheus exposition text."""
        lines: list[str] = []
        for counter in self.counters():
            lines += counter.render()
        gauge = Counter("tunnel_lab_edge_connections", "Live tunnel connections by state.")
        streams = Counter("tunnel_lab_edge_streams", "Eyeball streams in flight.")
        for conn in registry.all():
            gauge.inc(location=conn.location, state=conn.state)
            streams.inc(conn.active_streams, location=conn.location)
        lines += gauge.render("gauge") + streams.render("gauge")
        for extra in self.extra:
            lines += extra.render("gauge")
        return "\n".join(lines) + "\n"


# ---- the tunnel store, read live ----------------------------------------------------------------
class TunnelsView:
    """Live reads of lab.store, so a tunnel created or a route added by an admin command while the
    edge runs is honoured on the next request.

    The store detects changes with a query per read; on the request path we first look at the
    database files (SQLite in WAL mode: every write changes `state.db-wal` or `state.db`) and
    answer from a small cache while they are unchanged.
    """

    def __init__(self, state_dir: Path) -> None:
        from tunnel_lab.lab import paths
        from tunnel_lab.lab.store import Store

        self.db = paths.db_path(state_dir)
        self.store = Store(self.db)
        self._stamp: tuple[Any, ...] | None = None
        self._hosts: dict[str, Any] = {}
        self._checked = 0.0

    def _files_stamp(self) -> tuple[Any, ...]:
        stamp: list[Any] = []
        for suffix in ("", "-wal"):
            try:
                st = os.stat(f"{self.db}{suffix}")
            except FileNotFoundError:
                stamp.append(None)
            else:
                stamp.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamp)

    def resolve_hostname(self, host: str) -> Any:
        """The tunnel routed for a Host value (exact beats wildcard), or None."""
        stamp = self._files_stamp()
        now = time.monotonic()
        # File times can be coarse (a few ms): also forget the cache at least once a second.
        if stamp != self._stamp or now - self._checked > 1.0:
            self._stamp, self._checked = stamp, now
            self._hosts.clear()
        try:
            return self._hosts[host]
        except KeyError:
            pass
        tunnel = self.store.resolve_hostname(host)
        if len(self._hosts) > 4096:
            self._hosts.clear()
        self._hosts[host] = tunnel
        return tunnel

    def load_balancer(self, host: str) -> Any:
        """The pools (lists of tunnels) of the load balancer for a Host value, or None (`route lb`)."""
        self.resolve_hostname(host)  # refreshes the cache when the store changed
        key = "lb:" + host
        try:
            return self._hosts[key]
        except KeyError:
            pools = self._hosts[key] = self.store.load_balancer(host)
            return pools

    def by_id(self, tunnel_id: uuid.UUID) -> Any:
        """The tunnel with this id, or None (registration is rare: always asks the store)."""
        return self.store.tunnel_by_id(tunnel_id)

    def resolve_ip(self, ip: str) -> Any:
        """The tunnel whose `route ip` CIDR holds this address (most specific), or None."""
        return self.store.resolve_ip(ip)


# ---- what the handlers share ----------------------------------------------------------------------
@dataclass(eq=False, kw_only=True)
class EdgeState(Generic[C]):
    """The state every handler of one edge shares, passed to each explicitly (built by `edge.server`).

    `default_location` names the edge in ray ids when no connection is involved (the first data centre).
    """

    config: EdgeConfig
    tunnels: TunnelsView
    registry: Registry[C] = field(default_factory=Registry)
    faults: Faults = field(default_factory=Faults)
    history: History = field(default_factory=History)
    metrics: Metrics = field(default_factory=Metrics)
    pushed_configs: dict[str, bytes] = field(default_factory=dict)  # tunnel id -> last local config
    access: Any = None  # edge.access.AccessGate, made on first use
    waf: Any = None  # edge.waf.WafGate, made on first use
    lb_turns: dict[str, int] = field(default_factory=dict)  # load balancer hostname -> requests so far
    v4api: Any = None  # lab.v4api.V4Api for the v4 API on the management port (edge.v4api), made on first use
    default_location: str = "LAB"
    trace: Any = None  # transport.trace.Tracer with `--trace`, else None (each hook checks this once)
    # In a worker of a multi-process edge (edge/forward.py): sends a request for a tunnel with no routable
    # connection here to the data centre that has one; None in a single-process edge.
    peers: Forwarder | None = None


class Forwarder(Protocol):
    """What the proxy asks of the forwarding between data centres (edge.forward.Peers)."""

    async def forward(self, ex: Any, host: str, record: Any) -> bool:
        """Serve `ex` through another process when this one has no connection for `host`'s tunnel;
        True when it did (the request is answered), False to go on locally. `record` is the proxy's history
        entry for `ex`: its `tunnel` is set when the request is to be forwarded, and its `recorded` once the
        request has reached the other process, which records it from then on; its `lb_choice`, when a load
        balancer's tunnel was chosen here and is served here."""

    async def forward_raw(self, tunnel_id: Any, eyeball: Any, first: bytes, client: tuple[str, int],
                          what: str, handed_over: Callable[[], None]) -> bool:
        """The same for a `--warp-listen` connection (its bytes read so far are `first`): True when another
        process served it; it records it once `handed_over` was called."""

    async def open_link(self, tunnel_id: Any, what: str, *, here: bool | None = None) -> Any:
        """A link (a stream) to another process with a routable connection of the tunnel, when this one
        cannot serve `what` (`here`); None to serve it here (a UDP flow, edge.udp)."""

"""The protocol trace writer (docs/trace.md): a bounded queue and one thread that decodes and writes.

The edge and the connector hold a `Tracer` when started with `--trace FILE` and `None` otherwise, so a
hook costs one attribute check when tracing is off. When it is on, a hook only timestamps what it was
given and appends it to a queue (plaintext bytes are copied, nothing is decoded on the tunnel's
thread); the writer thread runs the sans-I/O builders of `wire.trace` (HTTP/2 frames, HPACK, Cap'n
Proto, QUIC stream heads, redaction) and writes one JSON line per record. The queue is bounded (items
and bytes): when the thread cannot keep up, items are dropped and counted, never waited for, and the
`trace.end` record says how many. A connection whose bytes were dropped cannot be decoded further (its
HPACK state is lost): a `trace.gap` record says so and that connection's frames stop there.

The edge's tracer also keeps a `RayRing`: the records it wrote for each of the last requests (by ray), so
the live view can draw a selected request from the trace without reading the file back.

A multi-process edge (docs/trace.md, "A multi-process edge") writes one file per worker (`part_path`), each
record marked with its `worker`, and the parent's file names them (`parts` in its `trace.start`); readers
merge them by time.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from tunnel_lab.wire.trace import (
    VERSION,
    H2FrameDecoder,
    QuicStreamDecoder,
    RpcDecoder,
    TraceRedactor,
    datagram_record,
    http1_head_fields,
    tls_record,
)

__all__ = ["ConnTrace", "RayRing", "Tracer", "open_tracer", "part_path"]

MAX_ITEMS = 16384  # queued hook calls
MAX_BYTES = 64 * 1024 * 1024  # queued plaintext bytes

RING_RAYS = 256  # requests whose records the ring keeps (the live page lists the last 50)
RING_BYTES = 8 * 1024 * 1024  # their records' JSON, in all
RING_RAY_RECORDS = 400  # per request: the first 200 and the last 200 (a long body or WebSocket has more)
RING_FORGOTTEN = 4096  # evicted rays remembered by id, so the page can say "evicted" rather than "unknown"


class RayRing:
    """The trace records of the most recent requests, by ray: bounded by requests, bytes and records per
    request. Written by the tracer's thread, read by the live view (a lock: both sides are short)."""

    def __init__(self, *, max_rays: int = RING_RAYS, max_bytes: int = RING_BYTES,
                 max_records: int = RING_RAY_RECORDS) -> None:
        self.max_rays = max_rays
        self.max_bytes = max_bytes
        self.max_records = max_records
        self._lock = threading.Lock()
        # ray -> [first records, last records (bounded deque), records left out between them]
        self._rays: OrderedDict[str, tuple[list[str], deque[str], list[int]]] = OrderedDict()
        self._forgotten: OrderedDict[str, None] = OrderedDict()
        self._bytes = 0

    def add(self, ray: str, line: str) -> None:
        """Keep one record (its JSON line) of request `ray`."""
        with self._lock:
            entry = self._rays.get(ray)
            if entry is None:
                entry = self._rays[ray] = ([], deque(), [0])
                self._forgotten.pop(ray, None)
            head, tail, omitted = entry
            if len(head) < self.max_records // 2:
                head.append(line)
            else:
                tail.append(line)
                if len(tail) > self.max_records - self.max_records // 2:
                    self._bytes -= len(tail.popleft())
                    omitted[0] += 1
            self._bytes += len(line)
            while len(self._rays) > self.max_rays or (self._bytes > self.max_bytes and len(self._rays) > 1):
                self._evict()

    def _evict(self) -> None:
        old, (head, tail, _) = self._rays.popitem(last=False)
        self._bytes -= sum(map(len, head)) + sum(map(len, tail))
        self._forgotten[old] = None
        while len(self._forgotten) > RING_FORGOTTEN:
            self._forgotten.popitem(last=False)

    def get(self, ray: str) -> tuple[list[str], int] | None:
        """The JSON lines kept for `ray` and how many were left out in the middle, or None."""
        with self._lock:
            entry = self._rays.get(ray)
            if entry is None:
                return None
            head, tail, omitted = entry
            return [*head, *tail], omitted[0]

    def evicted(self, ray: str) -> bool:
        """Whether `ray` was kept once and has been evicted since."""
        with self._lock:
            return ray in self._forgotten

    def __len__(self) -> int:
        with self._lock:
            return len(self._rays)


class ConnTrace:
    """One connection's end of the trace: its ids and its decoders (the latter used by the thread only).

    `h2_client_out`: on this side we are the HTTP/2 client (the edge), so our outgoing bytes start with
    the client preface. For QUIC, `request_direction` is the direction ConnectRequests travel here.
    """

    __slots__ = ("_h2", "_quic", "_seen", "_sent", "broken", "h2_client_out", "ids", "request_direction",
                 "tracer")

    def __init__(self, tracer: Tracer, ids: dict[str, Any], *, h2_client_out: bool = False,
                 request_direction: str = "in") -> None:
        self.tracer = tracer
        self.ids = ids
        self.h2_client_out = h2_client_out
        self.request_direction = request_direction
        self._sent = 0  # wire items offered (producer side)
        self._seen = 0  # wire items processed (thread side)
        self._h2: dict[str, H2FrameDecoder] = {}
        self._quic: QuicStreamDecoder | None = None
        self.broken = False

    # ---- hooks (the tunnel's thread) -----------------------------------------------------------
    def received(self, data: bytes | bytearray | memoryview) -> None:
        """Plaintext HTTP/2 bytes read from the peer."""
        self._wire(("h2", "in", bytes(data)))

    def sent(self, data: bytes | bytearray | memoryview) -> None:
        """Plaintext HTTP/2 bytes written to the peer."""
        self._wire(("h2", "out", bytes(data)))

    def quic_stream(self, direction: str, stream: int, data: bytes, *, fin: bool = False,
                    reset: bool = False) -> None:
        """QUIC stream bytes received ("in") or sent ("out")."""
        self._wire(("quic", direction, bytes(data), stream, fin, reset))

    def datagram(self, direction: str, data: bytes, version: int = 2) -> None:
        """A QUIC datagram received or sent."""
        self.tracer._put((time.monotonic(), "datagram", self, (direction, bytes(data), version), 0))

    def quic_event(self, event: Any) -> None:
        """A qh3 event the connection received: stream data, a reset, a datagram, the handshake's end."""
        name = type(event).__name__
        if name == "StreamDataReceived":
            self.quic_stream("in", event.stream_id, event.data, fin=event.end_stream)
        elif name == "StreamReset":
            self.quic_stream("in", event.stream_id, b"", reset=True)
        elif name == "DatagramFrameReceived":
            self.datagram("in", event.data)
        elif name == "HandshakeCompleted":
            self.event("tls.handshake", side="quic", version="TLSv1.3", alpn=event.alpn_protocol,
                       session_resumed=event.session_resumed)
        elif name == "ConnectionTerminated":
            self.event("quic.closed", error_code=event.error_code, reason=event.reason_phrase)

    def event(self, kind: str, **fields: Any) -> None:
        """A record built on the tunnel's side (already-decoded facts: TLS, heads, classification)."""
        self.tracer._put((time.monotonic(), "event", self, {"kind": kind, **fields}, 0))

    def tls(self, ssl_object: Any, *, side: str, sni: str | None = None) -> None:
        """A `tls.handshake` record from a finished handshake's `ssl.SSLObject` (or `SSLSocket`)."""
        try:
            peer = ssl_object.getpeercert() or None
        except ValueError:  # no handshake (cannot happen after one; never fail the connection for it)
            peer = None
        self.tracer._put((time.monotonic(), "event", self, tls_record(
            version=ssl_object.version(), cipher=ssl_object.cipher(),
            alpn=ssl_object.selected_alpn_protocol(), sni=sni or ssl_object.server_hostname,
            peer_cert=peer, side=side), 0))

    def update(self, **ids: Any) -> None:
        """New ids for this connection's later records (the tunnel and connection uuid once registered)."""
        self.tracer._put((time.monotonic(), "ids", self, ids, 0))

    def _wire(self, item: tuple[Any, ...]) -> None:
        self._sent += 1
        self.tracer._put((time.monotonic(), "wire", self, (self._sent, item), len(item[2])))

    # ---- the writer thread ---------------------------------------------------------------------
    def _decode(self, seq: int, item: tuple[Any, ...], redactor: TraceRedactor) -> list[dict[str, Any]]:
        missed = seq - self._seen - 1
        self._seen = seq
        if self.broken:
            return []
        if missed:
            self.broken = True
            return [{"kind": "trace.gap", "missed": missed}]
        if item[0] == "h2":
            _, direction, data = item
            decoder = self._h2.get(direction)
            if decoder is None:
                rpc = next((d.rpc for d in self._h2.values()), None) or RpcDecoder()
                rays = next((d.rays for d in self._h2.values()), None)
                preface = self.h2_client_out == (direction == "out")
                decoder = self._h2[direction] = H2FrameDecoder(
                    direction=direction, redactor=redactor, preface=preface, rpc=rpc, rays=rays)
            records = decoder.feed(data)
        else:
            _, direction, data, stream, fin, reset = item
            if self._quic is None:
                self._quic = QuicStreamDecoder(request_direction=self.request_direction, redactor=redactor)
            records = self._quic.feed(direction, stream, data, fin=fin, reset=reset)
        for record in records:
            record["dir"] = direction
        return records


class Tracer:
    """The trace file of one component (`component`: "edge" or "connector").

    In a multi-process edge, a worker's tracer has its `worker` index (on every record, and in its
    connections' labels, which each worker numbers from 1), and the parent's names the workers' files in
    `parts` (relative to its own)."""

    def __init__(self, path: str | os.PathLike[str], *, component: str, secrets: Iterable[str] = (),
                 max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES, ring: RayRing | None = None,
                 worker: int | None = None, parts: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.component = component
        self.worker = worker
        self.ring = ring  # the records of recent requests, for the live view (the edge's only)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.dropped = 0
        self.records = 0
        self._redactor = TraceRedactor(secrets)
        self._items: deque[tuple[Any, ...]] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self._conn_serial = 0
        self._file: TextIO | None = self.path.open("w", encoding="utf-8")
        start: dict[str, Any] = {"kind": "trace.start", "format": "tunnel-lab trace", "pid": os.getpid(),
                                 "clock": "CLOCK_MONOTONIC seconds", "wall": time.time()}
        if parts:
            start["parts"] = list(parts)
        self._write([start], time.monotonic(), {})
        # on disk at once: a process killed before its first batch (an idle worker, a multi-process edge's
        # parent, which writes nothing else) still leaves a readable trace, and the parts it names
        with contextlib.suppress(OSError):
            self._file.flush()
        self._thread = threading.Thread(target=self._run, name=f"trace-{component}", daemon=True)
        self._thread.start()

    def connection(self, *, h2_client_out: bool = False, request_direction: str = "in",
                   **ids: Any) -> ConnTrace:
        """A new connection's trace; `ids` (conn, dc, tunnel, ...) go on each of its records."""
        self._conn_serial += 1
        ids.setdefault("conn", f"{self.component}#{self._conn_serial}")
        if self.worker is not None:  # each worker numbers its connections from 1: edge#1@w0, edge#1@w1
            ids["conn"] = f"{ids['conn']}@w{self.worker}"
        return ConnTrace(self, ids, h2_client_out=h2_client_out, request_direction=request_direction)

    def event(self, kind: str, **fields: Any) -> None:
        """A record tied to no connection (eyeball side, lifecycle)."""
        self._put((time.monotonic(), "event", None, {"kind": kind, **fields}, 0))

    def add_secret(self, secret: str) -> None:
        """Redact this value from every later record (e.g. a tunnel secret, base64)."""
        self._put((time.monotonic(), "secret", None, secret, 0))

    def _put(self, item: tuple[Any, ...]) -> None:
        size = item[4]
        with self._cond:
            if (self._closing or len(self._items) >= self.max_items
                    or (size and self._bytes + size > self.max_bytes)):
                self.dropped += 1
                return
            self._items.append(item)
            self._bytes += size
            if len(self._items) == 1:
                self._cond.notify()

    def close(self) -> None:
        """Write what is queued and the `trace.end` record (dropped count), then close the file."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self._thread.join()
        self._write([{"kind": "trace.end", "records": self.records + 1, "dropped": self.dropped}],
                    time.monotonic(), {})
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                batch = list(self._items)
                self._items.clear()
                self._bytes = 0
                closing = self._closing
            for item in batch:
                self._process(item)
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.flush()
            if closing and not batch:
                return

    def _process(self, item: tuple[Any, ...]) -> None:
        t, what, conn, payload, _ = item
        try:
            ids = conn.ids if conn is not None else {}
            if what == "wire":
                seq, wire = payload
                self._write(conn._decode(seq, wire, self._redactor), t, ids)
            elif what == "event":
                if "headers" in payload:
                    payload["headers"] = self._redactor.headers(payload["headers"])
                if "raw_head" in payload:
                    payload.update(http1_head_fields(payload.pop("raw_head"), self._redactor))
                self._write([payload], t, ids)
            elif what == "ids":
                conn.ids = {**conn.ids, **payload}
            elif what == "datagram":
                direction, data, version = payload
                self._write([{**datagram_record(data, version=version), "dir": direction}], t, ids)
            elif what == "secret":
                self._redactor.add(payload)
        except Exception as exc:  # a builder's bug must not end the trace (nor the tunnel)
            self._write([{"kind": "trace.error", "error": f"{type(exc).__name__}: {exc}"}], t, ids)

    def _write(self, records: list[dict[str, Any]], t: float, ids: dict[str, Any]) -> None:
        if self._file is None:
            return
        lines = []
        for record in records:
            self.records += 1
            full = {"v": VERSION, "t": round(t, 6), "kind": record.pop("kind"), "component": self.component,
                    **ids, **record}
            if self.worker is not None:
                full["worker"] = self.worker
            redacted = self._redactor.record(full)
            line = json.dumps(redacted, separators=(",", ":"), ensure_ascii=False, default=str)
            lines.append(line)
            if self.ring is not None and isinstance(redacted.get("ray"), str):
                self.ring.add(redacted["ray"], line)
        if lines:
            try:
                self._file.write("\n".join(lines) + "\n")
            except OSError:
                self.dropped += len(lines)


def open_tracer(path: str | os.PathLike[str] | None, *, component: str,
                secrets: Iterable[str] = (), ring: bool = False, worker: int | None = None) -> Tracer | None:
    """A `Tracer` for `--trace PATH` (with a `RayRing` when `ring`), or None without one. A worker of a
    multi-process edge writes to its `part_path` of PATH instead."""
    if not path:
        return None
    if worker is not None:
        path = part_path(path, worker)
    return Tracer(path, component=component, secrets=secrets, ring=RayRing() if ring else None, worker=worker)


def part_path(path: str | os.PathLike[str], worker: int) -> Path:
    """Worker `worker`'s trace file beside `path`: `edge.trace.jsonl` -> `edge.trace.w0.jsonl` (a name
    without the `.jsonl` suffix gets `.w0` appended)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return path.with_name(f"{path.stem}.w{worker}.jsonl")
    return path.with_name(f"{path.name}.w{worker}")

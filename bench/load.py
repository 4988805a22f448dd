"""Load generators for `tunnel-lab bench`.

The client must not be the bottleneck, so the request loop is deliberately lean: blocking sockets, one
hand-rolled HTTP/1.1 keep-alive exchange per request (the bench origin always answers with a
Content-Length), and several worker processes so that the client is not limited to one core's GIL.
h2load or wrk are used instead when they are installed (`pick_client`).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

from tunnel_lab.wire.errors import TunnelLabError


@dataclass
class LoadResult:
    """What one load run measured. Latencies are in seconds."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    client: str = "tunnel-lab"
    client_cpu_s: float = 0.0
    client_peak_rss_mb: float = 0.0
    # Set when an external client (wrk) reports percentiles instead of raw latencies.
    reported_percentiles_ms: dict[float, float] | None = None

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if self.reported_percentiles_ms is not None:
            return self.reported_percentiles_ms.get(q, 0.0)
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
        return ordered[index] * 1000


class HTTPClientError(TunnelLabError):
    """The server's answer was not the HTTP/1.1 response the bench expects."""


def _read_response(sock: socket.socket, buf: bytearray, *, keep: int = 0) -> tuple[int, int, bytes]:
    """Read one response with a Content-Length from `sock`: (status, body length, first `keep` body bytes)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise HTTPClientError("connection closed before the response head")
        buf += chunk
    head_end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:head_end])
    del buf[:head_end]
    try:
        status = int(head[9:12])
    except ValueError:
        raise HTTPClientError(f"bad status line {head[:40]!r}") from None
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    else:
        raise HTTPClientError(f"status {status} response without Content-Length")
    kept = bytearray(buf[:min(keep, length)])
    remaining = length - len(buf)
    if remaining <= 0:
        del buf[:length]
        return status, length, bytes(kept)
    buf.clear()
    while remaining > 0:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise HTTPClientError(f"connection closed with {remaining} body bytes to go")
        if len(kept) < keep:
            kept += chunk[: keep - len(kept)]
        remaining -= len(chunk)
    return status, length, bytes(kept)


def _connect(address: tuple[str, int], timeout: float) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _worker(address: tuple[str, int], request: bytes, deadline: float, connections: int,
            queue: mp.Queue, limit: int | None = None) -> None:
    """One worker process: `connections` sockets served round-robin, each strictly request/response,
    until the deadline or (with `limit`) once `limit` requests were sent."""
    import selectors

    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    errors = 0
    received = 0
    state: dict[socket.socket, tuple[float, bytearray]] = {}
    sent = 0

    def more() -> bool:
        return time.perf_counter() < deadline and (limit is None or sent < limit)

    def start(sock: socket.socket) -> None:
        nonlocal sent
        sent += 1
        sock.sendall(request)
        state[sock] = (time.perf_counter(), bytearray())
        sel.register(sock, selectors.EVENT_READ)

    for _ in range(connections if limit is None else min(connections, limit)):
        start(_connect(address, 10))
    while state:
        for key, _ in sel.select(timeout=1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            started, buf = state[sock]
            try:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise HTTPClientError("closed")
                buf += chunk
                if b"\r\n\r\n" not in buf:
                    continue
                head_end = buf.index(b"\r\n\r\n") + 4
                length = 0
                for line in bytes(buf[:head_end]).split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if len(buf) - head_end < length:
                    continue
                status = int(buf[9:12])
                received += length
                if status != 200:
                    errors += 1
                latencies.append(time.perf_counter() - started)
            except (OSError, ValueError, HTTPClientError):
                errors += 1
                sel.unregister(sock)
                del state[sock]
                sock.close()
                if more():
                    with contextlib.suppress(OSError):
                        start(_connect(address, 10))
                continue
            sel.unregister(sock)
            del state[sock]
            if more():
                start(sock)
            else:
                sock.close()
    usage = os.times()
    queue.put((latencies, errors, received, usage.user + usage.system, _own_peak_rss_mb()))


def _own_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_requests(address: tuple[str, int], request: bytes, *, concurrency: int, seconds: float,
                 processes: int | None = None, total: int | None = None) -> LoadResult:
    """Closed-loop load: `concurrency` connections, each sending `request` again as soon as answered,
    for `seconds` (or, with `total`, until that many requests were sent; `seconds` is then a bound)."""
    processes = processes or max(1, min(concurrency, os.cpu_count() or 1))
    per_worker = [concurrency // processes + (1 if i < concurrency % processes else 0)
                  for i in range(processes)]
    limits: list[int | None] = [None] * processes
    if total is not None:
        limits = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()
    started = time.perf_counter()
    deadline = started + seconds
    workers = [ctx.Process(target=_worker, args=(address, request, deadline, n, queue, limit))
               for n, limit in zip(per_worker, limits, strict=True) if n]
    for worker in workers:
        worker.start()
    result = LoadResult()
    for _ in workers:
        latencies, errors, received, cpu, rss = queue.get(timeout=seconds + 60)
        result.latencies += latencies
        result.errors += errors
        result.bytes += received
        result.client_cpu_s += cpu
        result.client_peak_rss_mb = max(result.client_peak_rss_mb, rss)
    for worker in workers:
        worker.join(timeout=10)
    result.seconds = time.perf_counter() - started
    result.requests = len(result.latencies)
    return result


def get_request(host: str, path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tunnel-lab-bench\r\n\r\n".encode()


def post_request(host: str, path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tunnel-lab-bench\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def bulk_download(address: tuple[str, int], host: str, path: str, expected: int) -> LoadResult:
    """One GET whose body is `expected` bytes, read in 1 MiB pieces and thrown away."""
    result = LoadResult()
    started = time.perf_counter()
    with _connect(address, 30) as sock:
        sock.settimeout(120)
        sock.sendall(get_request(host, path))
        status, length, _ = _read_response(sock, bytearray())
    result.seconds = time.perf_counter() - started
    if status != 200 or length != expected:
        raise HTTPClientError(f"download: status {status}, {length} bytes (wanted 200, {expected})")
    result.bytes = length
    result.requests = 1
    result.latencies = [result.seconds]
    return result


def bulk_upload(address: tuple[str, int], host: str, path: str, size: int) -> LoadResult:
    """One POST of `size` bytes (Content-Length) from a repeating 1 MiB block; the origin digests it."""
    block = hashlib.sha256(b"tunnel-lab").digest() * (1 << 15)  # 1 MiB
    result = LoadResult()
    started = time.perf_counter()
    with _connect(address, 30) as sock:
        sock.settimeout(120)
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        sock.sendall(head)
        sent = 0
        view = memoryview(block)
        while sent < size:
            piece = view[: min(len(block), size - sent)]
            sock.sendall(piece)
            sent += len(piece)
        status, _, answer = _read_response(sock, bytearray(), keep=4096)
    result.seconds = time.perf_counter() - started
    if status != 200 or f'"body_length": {size},'.encode() not in answer:
        raise HTTPClientError(f"upload: status {status}, answer {answer[:200]!r} (wanted all {size} bytes)")
    result.bytes = size
    result.requests = 1
    result.latencies = [result.seconds]
    return result


def websocket_echo(address: tuple[str, int], host: str, path: str, *, messages: int,
                   size: int = 32) -> LoadResult:
    """Round trips of one WebSocket: send a message, wait for its echo, repeat."""
    import wsproto
    from wsproto.events import AcceptConnection, BytesMessage, Request, TextMessage

    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    result = LoadResult()
    payload = os.urandom(size)
    with _connect(address, 30) as sock:
        sock.settimeout(30)
        sock.sendall(ws.send(Request(host=host, target=path)))
        accepted = False
        while not accepted:
            data = sock.recv(65536)
            if not data:
                raise HTTPClientError("connection closed during the WebSocket handshake")
            ws.receive_data(data)
            for event in ws.events():
                if not isinstance(event, AcceptConnection):
                    raise HTTPClientError(f"WebSocket handshake refused: {event!r}")
                accepted = True
        started = time.perf_counter()
        for _ in range(messages):
            sent_at = time.perf_counter()
            sock.sendall(ws.send(BytesMessage(data=payload)))
            got = False
            while not got:
                data = sock.recv(65536)
                if not data:
                    raise HTTPClientError("connection closed mid-echo")
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, (BytesMessage, TextMessage)):
                        got = True
            result.latencies.append(time.perf_counter() - sent_at)
        result.seconds = time.perf_counter() - started
    result.requests = messages
    result.bytes = messages * size
    return result


CLIENTS = ("auto", "wrk", "tunnel-lab")
_chosen = "auto"


def choose_client(name: str) -> None:
    """`auto` (wrk when installed), `wrk` or `tunnel-lab` (our own multi-process client)."""
    global _chosen
    if name not in CLIENTS:
        raise ValueError(f"unknown load client {name!r}")
    _chosen = name


def pick_client() -> str:
    """Name the load client that the small-GET workloads use."""
    if _chosen == "auto":
        return "wrk" if shutil.which("wrk") else "tunnel-lab"
    return _chosen


def run_wrk(url: str, *, host: str, concurrency: int, seconds: float) -> LoadResult:
    """Run wrk with one thread per core and parse its summary (latency percentiles via --latency)."""
    threads = max(1, min(concurrency, os.cpu_count() or 1))
    cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency",
           "-H", f"Host: {host}", url]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = LoadResult(client="wrk", seconds=time.perf_counter() - started)
    result.client_cpu_s = rusage.ru_utime + rusage.ru_stime
    result.client_peak_rss_mb = rusage.ru_maxrss / 1024
    if proc.returncode != 0:
        raise HTTPClientError(f"wrk exited with {proc.returncode}: {output.strip()[-300:]}")
    percentiles: dict[str, float] = {}
    rate = None
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].endswith("%"):
            percentiles[parts[0]] = _wrk_duration(parts[1])
        elif line.strip().startswith("Requests/sec:"):
            rate = float(parts[1])
        elif "requests in" in line:
            result.requests = int(parts[0])
            result.seconds = _wrk_duration(parts[3].rstrip(","))
        elif "Non-2xx" in line or "Socket errors" in line:
            result.errors += sum(int(p.rstrip(",")) for p in parts if p.rstrip(",").isdigit())
    if rate is None or not result.requests:
        raise HTTPClientError(f"wrk printed no request rate: {output.strip()[-300:]}")
    result.reported_percentiles_ms = {float(k.rstrip("%")): v * 1000 for k, v in percentiles.items()}
    return result


def _wrk_duration(text: str) -> float:
    for suffix, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)



def idle_connections(address: tuple[str, int], host: str, path: str, count: int, *,
                     batch: int = 32) -> list[socket.socket]:
    """`count` keep-alive connections, each left open after one answered GET (what an idle eyeball
    costs the server). Opened `batch` at a time, so the tunnel is never asked for more streams at once
    than a small-GET workload asks. The caller closes them."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            opened = []
            for _ in range(min(batch, count - len(socks))):
                sock = _connect(address, 30)
                sock.settimeout(30)
                socks.append(sock)
                opened.append(sock)
                sock.sendall(get_request(host, path))
            for sock in opened:
                status, _, _ = _read_response(sock, bytearray())
                if status != 200:
                    raise HTTPClientError(f"idle connection {len(socks)}: status {status}")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks

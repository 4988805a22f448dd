"""`tunnel diag`'s network jobs: traceroutes to the edge regions, and the connectivity pre-checks.

What cloudflared 2026.8.2 does (facts from its `diagnostic/`, `diagnostic/network/` and `prechecks/`):

- **Traceroutes** ("raw network information", "network information"). Four runs at once, one per host and
  IP version, named `HOST-v4` / `HOST-v6`: `traceroute` or `traceroute6` with `-I -w 5 -m 5 HOST` (ICMP,
  5 s wait, 5 hops), stdout read, stderr dropped. Both jobs share the one gathering. `raw-network.txt`
  holds, per run, its name, a newline, its whole output and a newline, or `no content` when the run
  failed; `network.json` maps each name to its hops (`{hop, domain, rtts}`, Go's `omitempty`; rtts are
  the milliseconds times 1000, truncated) or `null`. Either job fails with the first failed run's error:
  `error starting traceroute: ...` (the tool is missing), `error finishing traceroute: exit status N` or
  `signal: killed` (the diag's 45 s deadline passed). `decode_output` is the pure parser.
- **Pre-checks** ("connectivity pre-checks", since 2026.5.0): DNS discovery of the two regions (SRV
  `_v2-origintunneld._tcp.argotunnel.com`, or `_REGION-v2-...` with `--region`; as for `tunnel run`,
  without cloudflared's fallback to DNS-over-TLS at 1.1.1.1), then at once: a QUIC
  handshake (SNI `probe.cftunnel.com`, ALPN `argotunnel`) and a TCP + TLS handshake (same SNI) to one
  IPv4 and one IPv6 address of each region, each closed right away, and a TCP connect to
  `api.cloudflare.com:443`. 5 s a probe, a failed probe retried twice after 1 s and 2 s, 15 s for the
  whole suite. `prechecks.json` is Go's struct as it is: `{RunID, Results: [{Type, Component, Target,
  ProbeStatus, Details, Action}], SuggestedProtocol}` with numbers for the enums. The job always succeeds.

History (the connector claims 2026.8.2 and follows it): the traceroutes arrived with `tunnel diag` in
2024.12.0, where a failed run was left out of both files and never failed the job; 2024.12.2 brought
`no content`, `null` and the failure; the pre-checks job arrived in 2026.5.0.

Where ours differs: nothing leaves the machine, so a name resolving to an address that is neither
loopback nor one of this machine's is neither traced nor probed (the run, or the pre-checks job, fails
saying so; in `tunnel-lab sandbox` every name resolves to the lab). Go writes the runs in its map's
random order and fails with whichever failed run it meets first; ours keeps the order above. A line of
only `*` makes cloudflared's parser panic; ours skips it. QUIC and TLS probes use the system trust
(`SSL_CERT_FILE`) without Cloudflare's own roots.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import math
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from qh3.quic.configuration import QuicConfiguration

from tunnel_lab.connector.edge_discovery import RESOLV_CONF, lookup, nameservers, udp_exchange
from tunnel_lab.connector.quic_transport import QuicTransport
from tunnel_lab.transport.tls import TLSStream
from tunnel_lab.wire import dns
from tunnel_lab.wire.errors import ProtocolError, TunnelLabError

# --- only this machine -------------------------------------------------------------------------------------

class OutsideError(TunnelLabError):
    """A network job would reach an address outside this machine (the lab never does)."""


def is_local(ip: str) -> bool:
    """Whether packets to `ip` stay on this machine: loopback, or an address of one of its interfaces
    (in `tunnel-lab sandbox` the regions' 2001:db8:... addresses are on `lo`). Binding sends nothing."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return False
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(address), 0))
    except OSError:
        return False
    return True


def outside_text(name: str, ips: Sequence[str]) -> str:
    shown = ", ".join(ips)
    return (f"{name} resolves to {shown}, outside this machine: tunnel-lab's diag reaches only the lab "
            "(run it in `tunnel-lab sandbox`, or pass --no-diag-network)")


def resolve(host: str, family: int) -> list[str]:
    """The addresses of `host` in `family` (the system resolver; [] when it has none)."""
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# --- traceroutes -------------------------------------------------------------------------------------------

TRACE_TARGETS = (("region1.v2.argotunnel.com", True), ("region1.v2.argotunnel.com", False),
                 ("region2.v2.argotunnel.com", True), ("region2.v2.argotunnel.com", False))
TRACE_HOPS = 5
TRACE_WAIT = 5  # seconds traceroute waits for each probe's answer
MAX_LINE = 64 * 1024  # Go's bufio.Scanner gives up on a longer line
# Go's unicode.IsSpace, which strings.Fields splits on
_GO_SPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
# Go's strconv.ParseFloat, decimal form (what traceroute prints); anything else is part of the domain
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


@dataclass(frozen=True)
class Hop:
    """One traceroute line: hop number, the rest as one string (`*` for a hop that never answered) and
    the round trips in microseconds."""

    hop: int
    domain: str
    rtts: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Go's `omitempty`: hop 0, an empty domain and no rtts are left out."""
        out: dict[str, Any] = {}
        if self.hop:
            out["hop"] = self.hop
        if self.domain:
            out["domain"] = self.domain
        if self.rtts:
            out["rtts"] = list(self.rtts)
        return out


class TraceDecodeError(TunnelLabError):
    """The output could not be read at all (only a line longer than Go's scanner takes)."""


def decode_line(text: str) -> Hop | None:
    """One line of `traceroute -I` output as a hop, or None when it is not one (the header, garbage)."""
    parts = [f for f in _GO_SPACE.split(text) if f and f not in ("*", "ms")]
    if not parts:
        return None  # cloudflared's parser indexes an empty list here and panics
    if not parts[0].isascii() or not parts[0].isdigit() or int(parts[0]) > 255:
        return None  # strconv.ParseUint(s, 10, 8)
    index = int(parts[0])
    if len(parts) == 1:
        return Hop(index, "*")
    words: list[str] = []
    rtts: list[int] = []
    for part in parts[1:]:
        value = float(part) if _DECIMAL.fullmatch(part) else math.nan
        if math.isfinite(value) and abs(value * 1000.0) < 2**63:
            rtts.append(int(value * 1000.0))  # time.Duration(ms * 1000): truncated toward zero
        else:
            words.append(part)
    if not words:
        return None  # "domain must not be empty"
    return Hop(index, " ".join(words), tuple(rtts))


def decode_output(output: bytes) -> list[Hop]:
    """Every hop line of traceroute's stdout, in order; other lines are skipped (`TraceDecodeError` only
    for a line past Go's 64 KiB scanner limit)."""
    hops = []
    for raw_line in output.split(b"\n"):
        if len(raw_line) >= MAX_LINE:
            raise TraceDecodeError("scanner reported an error: bufio.Scanner: token too long")
        line = raw_line.removesuffix(b"\r").decode("utf-8", "replace")
        if line and (hop := decode_line(line)) is not None:
            hops.append(hop)
    return hops


def trace_command(host: str, v4: bool) -> list[str]:
    return ["traceroute" if v4 else "traceroute6", "-I", "-w", str(TRACE_WAIT), "-m", str(TRACE_HOPS), host]


@dataclass(frozen=True)
class TraceResult:
    """One run: its name, its hops (None: the run failed, or printed no hop), its stdout, its error."""

    name: str
    hops: tuple[Hop, ...] | None
    raw: bytes
    error: str | None = None


def _exit_text(returncode: int) -> str:
    """Go's `*exec.ExitError` text."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.strsignal(-returncode) or ""
    except ValueError:
        name = ""
    return f"signal: {name.lower() or f'signal {-returncode}'}"


def run_trace(host: str, v4: bool, deadline: float, *,
              local: Callable[[str], bool] = is_local) -> TraceResult:
    """One traceroute, killed at `deadline` (time.monotonic) as cloudflared's context kills it. Only to
    this machine: a host that resolves elsewhere is not traced (a name that does not resolve is left to
    traceroute, which fails on it)."""
    name = f"{host}-{'v4' if v4 else 'v6'}"
    command = trace_command(host, v4)
    path = shutil.which(command[0])
    if path is None:
        return TraceResult(name, None, b"", f'error starting traceroute: exec: "{command[0]}": executable '
                                            "file not found in $PATH")
    outside = [ip for ip in resolve(host, socket.AF_INET if v4 else socket.AF_INET6) if not local(ip)]
    if outside:
        return TraceResult(name, None, b"", outside_text(host, outside))
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return TraceResult(name, None, b"", "error starting traceroute: context deadline exceeded")
    try:
        done = subprocess.run([path, *command[1:]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=remaining, check=False)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        return TraceResult(name, None, b"", f"error finishing traceroute: {_exit_text(-signal.SIGKILL)}")
    except OSError as exc:
        return TraceResult(name, None, b"", f"error starting traceroute: fork/exec {path}: "
                                            f"{(exc.strerror or str(exc)).lower()}")
    if done.returncode != 0:
        return TraceResult(name, None, b"", f"error finishing traceroute: {_exit_text(done.returncode)}")
    try:
        hops = decode_output(done.stdout)
    except TraceDecodeError as exc:
        return TraceResult(name, None, done.stdout, str(exc))
    return TraceResult(name, tuple(hops) or None, done.stdout)


def gather_traces(deadline: float,
                  trace: Callable[[str, bool, float], TraceResult] = run_trace) -> list[TraceResult]:
    """The four runs at once (threads: each only waits on its process)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(TRACE_TARGETS)) as pool:
        futures = [pool.submit(trace, host, v4, deadline) for host, v4 in TRACE_TARGETS]
        return [f.result() for f in futures]


def _first_error(results: Sequence[TraceResult]) -> str | None:
    return next((r.error for r in results if r.error is not None), None)


def raw_network_text(results: Sequence[TraceResult]) -> tuple[bytes, str | None]:
    """`raw-network.txt` and the job's error."""
    body = b"".join(r.name.encode() + b"\n" + (b"no content" if r.error is not None else r.raw) + b"\n"
                    for r in results)
    return body, _first_error(results)


def go_json(value: Any) -> bytes:
    """JSON as Go's encoder with a two-space indent writes it: UTF-8 with `<`, `>`, `&`, U+2028 and
    U+2029 escaped, a final newline (keys in the order given: callers sort a map's, not a struct's)."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                          ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return (text + "\n").encode()


def network_json(results: Sequence[TraceResult]) -> tuple[bytes, str | None]:
    """`network.json` and the job's error."""
    doc = {r.name: [h.to_json() for h in r.hops] if r.hops else None
           for r in sorted(results, key=lambda r: r.name)}  # a Go map: sorted keys; a hop keeps its order
    return go_json(doc), _first_error(results)


# --- connectivity pre-checks -------------------------------------------------------------------------------

PROBE_SNI = "probe.cftunnel.com"
ALPN = "argotunnel"
API_TARGET = ("api.cloudflare.com", 443)
PROBE_TIMEOUT = 5.0
SUITE_TIMEOUT = 15.0  # what `tunnel diag` gives the suite (its diagnostic timeout)
RETRY_DELAYS = (1.0, 2.0)  # two retries, exponential backoff from 1 s without jitter

# prechecks.ProbeType and prechecks.Status, as Go encodes them (numbers)
DNS, QUIC, HTTP2, MANAGEMENT_API = 0, 1, 2, 3
PASS, FAIL, SKIP = 0, 1, 2
PROTOCOL_HTTP2, PROTOCOL_QUIC = 0, 1  # connection.Protocol

_COMPONENT = {DNS: "DNS Resolution", QUIC: "UDP Connectivity", HTTP2: "TCP Connectivity",
              MANAGEMENT_API: "Cloudflare API"}
_PASSED = {QUIC: "QUIC connection successful", HTTP2: "HTTP/2 connection successful",
           MANAGEMENT_API: "API is reachable"}
_FAILED = {QUIC: ("QUIC connection failed", "Allow outbound QUIC traffic on port 7844 or use HTTP2."),
           HTTP2: ("HTTP/2 connection is blocked or unreachable", "Allow outbound TCP on port 7844."),
           MANAGEMENT_API: ("API Connection failed",
                            "cloudflared will still run, but automatic software updates are unavailable. "
                            "Ensure port 443 TCP to api.cloudflare.com is open if you want auto-updates.")}
_DNS_ACTION = "Ensure your DNS resolver can resolve '{0}'. Run: dig A {0} @1.1.1.1. If that fails, contact " \
              "your network administrator."


@dataclass(frozen=True)
class CheckResult:
    """One row of the report (prechecks.CheckResult)."""

    type: int
    target: str
    status: int
    details: str
    action: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"Type": self.type, "Component": _COMPONENT[self.type], "Target": self.target,
                "ProbeStatus": self.status, "Details": self.details, "Action": self.action}


def probe_result(kind: int, target: str, ok: bool) -> CheckResult:
    """A transport or API probe's row."""
    if ok:
        return CheckResult(kind, target, PASS, _PASSED[kind])
    details, action = _FAILED[kind]
    return CheckResult(kind, target, FAIL, details, action)


def region_targets(region: str) -> tuple[str, str]:
    """The labels of the two regions' rows (fixed by `--region`, whatever the SRV record names)."""
    prefix = {"us": "us-", "fed": "fed-"}.get(region, "")
    return f"{prefix}region1.v2.argotunnel.com", f"{prefix}region2.v2.argotunnel.com"


def srv_name(region: str) -> str:
    return f"_{region + '-' if region else ''}v2-origintunneld._tcp.argotunnel.com"


Address = tuple[str, int]  # IP, port
Groups = list[list[Address]]  # the addresses of each SRV target (the SRV port), in the SRV answer's order


def dns_rows(region: str, found: Groups | str) -> list[tuple[list[Address], CheckResult]]:
    """Each region's addresses and DNS row, from what discovery found (or its error text)."""
    targets = region_targets(region)
    if isinstance(found, str) or not found:
        detail = found if isinstance(found, str) else "No addresses returned"
        return [([], CheckResult(DNS, t, FAIL, detail, _DNS_ACTION.format(t))) for t in targets]
    rows = []
    for target, group in zip(targets, found, strict=False):
        if group:
            rows.append((group, CheckResult(DNS, target, PASS, "DNS Resolved successfully")))
        else:
            rows.append(([], CheckResult(DNS, target, FAIL, "No addresses returned",
                                         _DNS_ACTION.format(target))))
    return rows


def probe_addresses(group: Sequence[Address]) -> list[Address]:
    """One IPv4 and one IPv6 address of a region (`--edge-ip-version auto`), IPv4 first (cloudflared
    takes any one of each family; ours the first)."""
    v4 = [a for a in group if ":" not in a[0]]
    v6 = [a for a in group if ":" in a[0]]
    return [*v4[:1], *v6[:1]]


def suggested_protocol(quic: Sequence[CheckResult], http2: Sequence[CheckResult]) -> int | None:
    """QUIC when the worst status of its rows (FAIL over PASS over SKIP) is PASS, else HTTP/2 when its
    is, else none."""
    def worst(rows: Sequence[CheckResult]) -> int:
        statuses = {r.status for r in rows}
        return FAIL if FAIL in statuses else PASS if PASS in statuses else SKIP

    if quic and worst(quic) == PASS:
        return PROTOCOL_QUIC
    if http2 and worst(http2) == PASS:
        return PROTOCOL_HTTP2
    return None


def report_json(run_id: str, rows: Sequence[CheckResult], suggested: int | None) -> bytes:
    """`prechecks.json`: Go's Report struct, fields in its order."""
    return go_json({"RunID": run_id, "Results": [r.to_json() for r in rows], "SuggestedProtocol": suggested})


Probe = Callable[[str, int], Awaitable[bool]]  # (IP, port) -> handshake done


@dataclass(frozen=True)
class Probes:
    """The suite's I/O, injectable: DNS discovery, the two transport probes, the API probe."""

    discover: Callable[[str], Awaitable[Groups]]  # SRV name -> groups; OSError/ValueError: the error text
    quic: Probe
    http2: Probe
    api: Probe
    api_addresses: Callable[[], Awaitable[list[str]]]  # api.cloudflare.com's addresses
    local: Callable[[str], bool] = is_local


async def _with_retry(attempt: Callable[[], Awaitable[bool]], deadline: float) -> bool:
    ok = await attempt()
    for delay in RETRY_DELAYS:
        if ok:
            break
        with trio.move_on_at(deadline) as scope:
            await trio.sleep(delay)
        if scope.cancelled_caught:
            break
        ok = await attempt()
    return ok


async def _bounded(probe: Callable[[], Awaitable[bool]], deadline: float) -> bool:
    """One probe within its 5 s and the suite's deadline (past either: failed)."""
    if trio.current_time() >= deadline:
        return False  # an expired context fails a Go dial at once
    with trio.move_on_at(min(deadline, trio.current_time() + PROBE_TIMEOUT)):
        return await probe()
    return False


def _attempt(probe: Probe, ip: str, port: int, deadline: float) -> Callable[[], Awaitable[bool]]:
    return lambda: _bounded(lambda: probe(ip, port), deadline)


async def run_prechecks(region: str, probes: Probes, *,
                        timeout: float = SUITE_TIMEOUT) -> tuple[list[CheckResult], int | None]:
    """The suite: its rows (DNS, then QUIC, HTTP/2, API) and the protocol it suggests."""
    deadline = trio.current_time() + timeout
    targets: list[tuple[list[Address], CheckResult]] = []

    async def dns_attempt() -> bool:
        nonlocal targets
        try:
            found: Groups | str = await probes.discover(srv_name(region))
        except (OSError, ValueError) as exc:
            found = str(exc)
        targets = dns_rows(region, found)
        return bool(targets) and all(row.status != FAIL for _, row in targets)

    # cloudflared's discovery takes no deadline (each DNS exchange has its own timeout): only the waits
    # between attempts end at the suite's
    await _with_retry(dns_attempt, deadline)
    rows = [row for _, row in targets]
    api_ips = await probes.api_addresses()
    for name, ips in [*((row.target, [ip for ip, _ in probe_addresses(group)]) for group, row in targets),
                      (API_TARGET[0], api_ips)]:
        if outside := [ip for ip in ips if not probes.local(ip)]:
            raise OutsideError(outside_text(name, outside))
    results: dict[int, list[CheckResult]] = {}

    async def transport(kind: int, probe: Probe) -> None:
        out = []
        for group, row in targets:
            addresses = probe_addresses(group)
            if not addresses:
                out.append(CheckResult(kind, row.target, SKIP,
                                       "No suitable address found for configured IP version"))
                continue
            best = False
            for ip, port in addresses:  # any address passing passes the region
                if await _with_retry(_attempt(probe, ip, port, deadline), deadline):
                    best = True
            out.append(probe_result(kind, row.target, best))
        results[kind] = out

    async def api() -> None:
        async def attempt() -> bool:  # Go's dialer: each address in turn until one answers
            for ip in api_ips:
                if await _attempt(probes.api, ip, API_TARGET[1], deadline)():
                    return True
            return False

        ok = await _with_retry(attempt, deadline)
        results[MANAGEMENT_API] = [probe_result(MANAGEMENT_API, API_TARGET[0] + ":443", ok)]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(api)
        if any(group for group, _ in targets):
            nursery.start_soon(transport, QUIC, probes.quic)
            nursery.start_soon(transport, HTTP2, probes.http2)
        else:
            for kind in (QUIC, HTTP2):
                results[kind] = [CheckResult(kind, row.target, SKIP, "DNS prerequisite failed")
                                 for row in rows]
    rows += results[QUIC] + results[HTTP2] + results[MANAGEMENT_API]
    return rows, suggested_protocol(results[QUIC], results[HTTP2])


def prechecks_json(rows: Sequence[CheckResult], suggested: int | None) -> bytes:
    return report_json(str(uuid.uuid4()), rows, suggested)


# --- the probes' I/O ---------------------------------------------------------------------------------------

def discover_groups(exchange: Callable[[bytes], bytes], server: str, name: str) -> Groups:
    """SRV `name`, then each target's A and AAAA records (cloudflared's allregions.EdgeDiscovery); the
    errors carry Go's texts."""
    try:
        srvs = lookup(exchange, name, dns.SRV)
    except (OSError, ProtocolError) as exc:
        raise OSError(f"Could not lookup srv records on {name}: lookup {name} on {server}: {exc}") from None
    if not srvs:
        raise OSError(f"Could not lookup srv records on {name}: lookup {name} on {server}: no such host")
    groups = []
    for srv in srvs:
        data = srv.data
        assert isinstance(data, dns.SrvData)
        shown = f"&{{{data.target.rstrip('.')}. {data.port} {data.priority} {data.weight}}}"
        ips: list[Address] = []
        errors = []
        for rtype in (dns.A, dns.AAAA):
            try:
                ips += [(str(r.data), data.port) for r in lookup(exchange, data.target, rtype)]
            except (OSError, ProtocolError) as exc:
                errors.append(str(exc))
        if not ips:
            why = errors[0] if errors else "no such host"
            host = data.target.rstrip(".")
            raise OSError(f"Couldn't resolve SRV record {shown}: lookup {host} on {server}: {why}")
        groups.append(ips)
    return groups


def system_discover(name: str) -> Groups:
    """`discover_groups` against the first nameserver of /etc/resolv.conf (in the sandbox: the lab's)."""
    try:
        with open(RESOLV_CONF, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        text = ""
    server = nameservers(text)[0]
    shown = f"[{server}]:53" if ":" in server else f"{server}:53"
    return discover_groups(udp_exchange(server), shown, name)


async def probe_http2(ip: str, port: int) -> bool:
    """TCP + TLS with SNI probe.cftunnel.com (no ALPN), closed once the handshake is done."""
    ctx = ssl.create_default_context()  # the system pool: SSL_CERT_FILE in the sandbox
    try:
        tcp = await trio.open_tcp_stream(ip, port)
    except OSError:
        return False
    try:
        stream = TLSStream(tcp, ctx, server_hostname=PROBE_SNI)
        await stream.do_handshake()
        return True
    except (trio.BrokenResourceError, OSError, ssl.SSLError):
        return False
    finally:
        tcp.socket.close()


async def _handshake_outcome(transport: QuicTransport) -> bool:
    """True once the handshake completes; False as soon as the edge closes the connection. qh3 reports
    a peer's CONNECTION_CLOSE only after its draining period (about 2 s), quic-go's dial fails at once:
    its pending close event says so first."""
    while not transport.handshake_done.is_set():
        if transport.closed or getattr(transport.quic, "_close_event", None) is not None:
            return False
        await transport.wait_progress()
    return not transport.closed


async def probe_quic(ip: str, port: int) -> bool:
    """A QUIC handshake with SNI probe.cftunnel.com and ALPN argotunnel, then CONNECTION_CLOSE (0,
    "precheck complete"): no stream is opened."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=PROBE_SNI,
                               idle_timeout=PROBE_TIMEOUT)
    transport = QuicTransport(config, (ip, port), keepalive=None)
    ok = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.serve)
            ok = await _handshake_outcome(transport)
            transport.close(0, "precheck complete")
            nursery.cancel_scope.cancel()
    except OSError:
        return False
    finally:
        transport.close(0, "precheck complete")
    return ok


async def probe_tcp(ip: str, port: int) -> bool:
    """A TCP connect (the API probe: api.cloudflare.com:443, no TLS)."""
    try:
        stream = await trio.open_tcp_stream(ip, port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def _discover_in_thread(name: str) -> Groups:
    return await trio.to_thread.run_sync(system_discover, name, abandon_on_cancel=True)


async def _api_addresses() -> list[str]:
    return await trio.to_thread.run_sync(resolve, API_TARGET[0], socket.AF_UNSPEC, abandon_on_cancel=True)


SYSTEM_PROBES = Probes(discover=_discover_in_thread, quic=probe_quic, http2=probe_http2, api=probe_tcp,
                       api_addresses=_api_addresses)


def collect_prechecks(region: str, remaining: float, probes: Probes = SYSTEM_PROBES) -> bytes:
    """The job's file: the suite run to its end (within `remaining` seconds of the diag's deadline)."""
    async def main() -> tuple[list[CheckResult], int | None]:
        return await run_prechecks(region, probes, timeout=max(0.0, min(SUITE_TIMEOUT, remaining)))

    rows, suggested = trio.run(main)  # OutsideError: the job fails, nothing was probed
    return prechecks_json(rows, suggested)

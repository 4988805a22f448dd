"""`tunnel diag`: the diagnostic endpoints of the metrics server and the command that collects them.

The metrics server answers what cloudflared's diagnostic handler answers (facts from cloudflared's
`diagnostic/`): `/diag/tunnel` (`{tunnelID, connectorID, connections[{isConnected, protocol, edgeAddress,
index}]}`, Go's `omitempty`: index 0 and protocol http2 (0) are left out), `/diag/system` (`{info, errors}`:
memory and file descriptors in use and their maximum, the OS, host name, architecture, disks in kB) and
`/diag/configuration` (the set flags that are never secret, as strings, plus `uid`). The runtime profiles
are ours, not Go's: `/debug/pprof/goroutine` is the trio task tree and `/debug/pprof/heap` a summary of the
Python heap, both text.

`tunnel diag` (ours, against either connector) does what cloudflared's does: find the instance (`--metrics`,
else the known addresses localhost:20241-20245, asking each for `/diag/tunnel`), run the jobs in order,
write each result to a file, and zip them with `task-result.json` into `cloudflared-diag-TIME.zip` in the
working directory, all within cloudflared's 45 s. The network jobs (traceroutes to the edge regions,
connectivity pre-checks) are in connector.diag_network.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import trio

from tunnel_lab.connector import diag_network
from tunnel_lab.connector.state import ConnectorState
from tunnel_lab.wire.errors import TunnelLabError

log = logging.getLogger("cloudflared")

KNOWN_ADDRESSES = tuple(f"localhost:{port}" for port in range(20241, 20246))
TIMEOUT = 15.0  # cloudflared's diagnostic client timeout
RUN_TIMEOUT = 45.0  # cloudflared's deadline for all the jobs (it kills a traceroute still running then)
MANAGED_LOG = "/var/log/cloudflared.err"  # where cloudflared looks for the logs of a service run as root
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386"}


# --- the endpoints (metrics server) ----------------------------------------------------------------------

def tunnel_state(state: ConnectorState) -> dict[str, Any]:
    """The `/diag/tunnel` body."""
    connections = []
    for index, conn in sorted(state.connections.items()):
        entry: dict[str, Any] = {"isConnected": True}
        if conn.protocol == "quic":  # connection.Protocol: HTTP2 is 0 and left out
            entry["protocol"] = 1
        if conn.edge_ip:
            entry["edgeAddress"] = conn.edge_ip
        if index:
            entry["index"] = index
        connections.append(entry)
    body: dict[str, Any] = {"tunnelID": str(state.tunnel_id or ""), "connectorID": str(state.connector_id)}
    if connections:
        body["connections"] = connections
    return body


def configuration(state: ConnectorState) -> dict[str, str]:
    """The `/diag/configuration` body: the flags, and the user the connector runs as (key order: Go's, for
    a map)."""
    return dict(sorted({**state.cli_flags, "uid": str(os.getuid())}.items()))


def _meminfo() -> tuple[int, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = int(value.strip().removesuffix("kB").strip() or 0)
    return fields["MemTotal"], fields["MemTotal"] - fields["MemAvailable"]


def _file_descriptors() -> tuple[int, int]:
    allocated, _unused, maximum = Path("/proc/sys/fs/file-nr").read_text().split()
    return int(maximum), int(allocated)


def _disks() -> list[dict[str, Any]]:
    """Every mounted filesystem with blocks, as `df -k` lists them (size and use in kB)."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        device, mount_point = line.split()[:2]
        try:
            st = os.statvfs(mount_point.replace("\\040", " "))
        except OSError:
            continue
        if st.f_blocks == 0:
            continue
        out.append({"name": device, "sizeMaximum": st.f_blocks * st.f_frsize // 1024,
                    "sizeCurrent": (st.f_blocks - st.f_bfree) * st.f_frsize // 1024})
    return out


def system_information(version: str) -> dict[str, Any]:
    """The `/diag/system` body: what could be read, and an error per part that could not."""
    info: dict[str, Any] = {}
    errors: dict[str, dict[str, str]] = {}

    def memory() -> None:
        info["memoryMaximum"], info["memoryCurrent"] = _meminfo()

    def files() -> None:
        info["fileDescriptorMaximum"], info["fileDescriptorCurrent"] = _file_descriptors()

    def disks() -> None:
        info["disk"] = _disks()

    parts = [("memoryInformationError", memory), ("fileDescriptorsInformationError", files),
             ("diskVolumeInformationError", disks)]
    for key, part in parts:
        try:
            part()
        except (OSError, ValueError, KeyError) as exc:
            errors[key] = {"error": str(exc), "rawInfo": ""}
    uname = os.uname()
    disk = info.pop("disk", None)
    info |= {"osSystem": uname.sysname, "hostName": uname.nodename, "osVersion": uname.release,
             "osRelease": uname.version, "architecture": uname.machine, "cloudflaredVersion": version,
             "goVersion": f"{platform.python_implementation().lower()}{platform.python_version()}",
             "goArch": _GOARCH.get(uname.machine, uname.machine)}
    if disk is not None:  # last, as cloudflared's SystemInformation orders its fields
        info["disk"] = disk
    return {"info": info, "errors": errors}


def _task_lines(task: trio.lowlevel.Task, depth: int) -> Iterator[str]:
    yield "  " * depth + task.name
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            yield from _task_lines(child, depth + 1)


def task_dump() -> bytes:
    """`/debug/pprof/goroutine`: the connector's trio task tree (call inside trio)."""
    root = trio.lowlevel.current_root_task()
    lines = list(_task_lines(root, 0)) if root is not None else []
    return (f"trio task tree: total {len(lines)}\n" + "\n".join(lines) + "\n").encode()


def heap_dump() -> bytes:
    """`/debug/pprof/heap`: the Python heap in brief (allocated blocks, collector counts, top types)."""
    counts = Counter(type(o).__name__ for o in gc.get_objects())
    lines = [f"python heap: allocated blocks {sys.getallocatedblocks()}, gc counts {gc.get_count()}",
             "objects tracked by the collector, by type:"]
    lines += [f"{n:10d} {name}" for name, n in counts.most_common(40)]
    return ("\n".join(lines) + "\n").encode()


# --- the command -----------------------------------------------------------------------------------------

class DiagFlags(Protocol):
    def get(self, name: str) -> Any: ...


class _Client:
    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.base + "/" + path.lstrip("/"),
                                         headers={"Accept": "application/json;version=1"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=TIMEOUT) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:  # cloudflared copies whatever body came
            with exc:
                return bytes(exc.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DiagError(f'error GET request: Get "{request.full_url}": {getattr(exc, "reason", exc)}') \
                from None

    def json(self, path: str) -> Any:
        try:
            return json.loads(self.get(path))
        except ValueError as exc:
            raise DiagError(f"failed to decode body: {exc}") from None


class DiagError(TunnelLabError):
    """One job failed (its text goes to task-result.json, as cloudflared's error text does); `path`: the
    file it wrote all the same, which goes into the zip (cloudflared zips every job's file)."""

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def _pretty(value: Any, *, sort: bool = True) -> bytes:
    """Indented as cloudflared writes its files; what it copies as generic JSON has its keys sorted
    (Go's maps), the tunnel state keeps its struct's order."""
    return (json.dumps(value, indent=2, sort_keys=sort) + "\n").encode()


def _find_instance(address: str | None) -> tuple[str, Any] | tuple[None, list[tuple[str, Any]]]:
    if address:
        return (address if address.startswith("http://") else "http://" + address), None
    found = []
    for known in KNOWN_ADDRESSES:
        base = "http://" + known
        try:
            found.append((base, _Client(base).json("/diag/tunnel")))
        except DiagError as exc:
            log.debug("error getting tunnel state from address %s: %s", known, exc)
    if len(found) == 1:
        return found[0]
    return None, found


def _logs(client: _Client, workdir: Path, *, managed: Path = Path(MANAGED_LOG)) -> Path:
    conf = client.json("/diag/configuration")
    if not isinstance(conf, dict) or "uid" not in conf:
        raise DiagError("error getting log configuration: key not found")
    if str(conf["uid"]) == "0":
        # Run as root: cloudflared assumes a service and looks where the service writes its log.
        path = managed
    elif conf.get("logfile"):
        path = Path(conf["logfile"])
    elif conf.get("log-directory"):
        target = workdir / "cloudflared_logs.txt"
        with target.open("wb") as out:
            for item in sorted(Path(conf["log-directory"]).iterdir()):
                if item.is_file():
                    out.write(item.read_bytes())
        return target
    else:
        raise DiagError("error getting log configuration: managed log not found")
    target = workdir / "cloudflared_logs.txt"
    try:
        with path.open("rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    except OSError as exc:
        raise DiagError(f"error opening log file while collecting logs: open {path}: "
                        f"{(exc.strerror or str(exc)).lower()}") from None
    return target


def run(flags: DiagFlags, *, now: Callable[[], datetime.datetime] | None = None) -> int:
    """`tunnel diag`: collect from a running connector's metrics server into a zip in the working
    directory. Exit code 0, as cloudflared's (failures are logged and listed in task-result.json)."""
    address = flags.get("metrics")
    if not address:
        log.info("If your instance is running in a Docker/Kubernetes environment you need to setup port "
                 "forwarding for your application.")
    base, found = _find_instance(address)
    if base is None:
        if not found:
            log.warning("No instances found")
        else:
            log.info("Found multiple instances running:")
            for url, state in found:
                log.info("Instance: tunnel-id=%s connector-id=%s metrics-address=%s",
                         state.get("tunnelID"), state.get("connectorID"), url)
            log.info("To select one instance use the option --metrics")
        return 0
    log.info("Selected server %s starting diagnostic...", base)
    deadline = time.monotonic() + RUN_TIMEOUT
    client = _Client(base)
    known_state = found
    with tempfile.TemporaryDirectory(prefix="tunnel-lab-diag-") as tmp:
        workdir = Path(tmp)

        def fetch_json(path: str, name: str) -> Path:
            (workdir / name).write_bytes(_pretty(client.json(path)))
            return workdir / name

        def fetch_raw(path: str, name: str) -> Path:
            (workdir / name).write_bytes(client.get(path))
            return workdir / name

        def state_job() -> Path:
            state = known_state or client.json("/diag/tunnel")
            (workdir / "tunnelstate.json").write_bytes(_pretty(state, sort=False))
            return workdir / "tunnelstate.json"

        traces: list[diag_network.TraceResult] = []

        def network_job(name: str, write: Callable[[list[diag_network.TraceResult]], tuple[bytes, str | None]]
                        ) -> Path:
            if not traces:  # one gathering for both files, as cloudflared's sync.Once
                traces.extend(diag_network.gather_traces(deadline))
            body, error = write(traces)
            (workdir / name).write_bytes(body)
            if error is not None:
                raise DiagError(error, path=workdir / name)
            return workdir / name

        def prechecks_job() -> Path:
            region = str(flags.get("region") or "")
            try:
                body = diag_network.collect_prechecks(region, deadline - time.monotonic())
            except diag_network.OutsideError as exc:
                raise DiagError(str(exc)) from None
            (workdir / "prechecks.json").write_bytes(body)
            return workdir / "prechecks.json"

        jobs: list[tuple[str, Callable[[], Path], bool]] = [
            ("tunnel state", state_job, False),
            ("system information", lambda: fetch_json("/diag/system", "systeminformation.json"),
             bool(flags.get("no-diag-system"))),
            ("goroutine profile", lambda: fetch_raw("debug/pprof/goroutine", "goroutine.pprof"),
             bool(flags.get("no-diag-runtime"))),
            ("heap profile", lambda: fetch_raw("debug/pprof/heap", "heap.pprof"),
             bool(flags.get("no-diag-runtime"))),
            ("metrics", lambda: fetch_raw("metrics", "metrics.txt"), bool(flags.get("no-diag-metrics"))),
            ("log information", lambda: _logs(client, workdir), bool(flags.get("no-diag-logs"))),
            ("raw network information",
             lambda: network_job("raw-network.txt", diag_network.raw_network_text),
             bool(flags.get("no-diag-network"))),
            ("network information", lambda: network_job("network.json", diag_network.network_json),
             bool(flags.get("no-diag-network"))),
            ("cli configuration", lambda: fetch_json("/diag/configuration", "cli-configuration.json"), False),
            ("configuration", lambda: fetch_json("/config", "configuration.json"), False),
            ("connectivity pre-checks", prechecks_job, bool(flags.get("no-diag-network"))),
        ]
        report: dict[str, dict[str, str]] = {}
        paths: list[Path] = []
        for name, job, skip in jobs:
            if skip:
                continue
            log.info("Collecting %s...", name)
            try:
                paths.append(job())
            except (DiagError, OSError) as exc:
                if isinstance(exc, DiagError) and exc.path is not None:
                    paths.append(exc.path)
                report[name] = {"error": str(exc), "result": "failure"}
                log.error("Job: %s finished with error. error=%s", name, json.dumps(str(exc)))
            else:
                report[name] = {"result": "success"}
                log.info("Collected %s.", name)
        (workdir / "task-result.json").write_bytes(_pretty(dict(sorted(report.items()))))
        paths.append(workdir / "task-result.json")
        stamp = (now or (lambda: datetime.datetime.now().astimezone()))().replace(microsecond=0)
        text = stamp.isoformat().replace("+00:00", "Z")
        zip_name = f"cloudflared-diag-{text}.zip".replace(":", "-")
        with zipfile.ZipFile(zip_name, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in paths:
                archive.write(path, path.name)
    log.info("Diagnostic file written: %s", zip_name)
    if any(r["result"] == "failure" for r in report.values()):
        log.warning("Diagnostic completed with one or more errors")
    else:
        log.info("Diagnostic completed")
    return 0


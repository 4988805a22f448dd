"""`tunnel-lab sandbox [-- COMMAND...]`: a private Internet where the real cloudflared needs no lab flag.

COMMAND (default: an interactive shell) runs in a private network, mount and PID namespace
(`lab.runner.netns`) where the lab plays Cloudflare: a DNS server on 127.0.0.1:53 (`lab.dns`: edge
discovery, the API and login names, every routed hostname), the edge's tunnel listeners at the
addresses that discovery names (port 7844; IPv4 and IPv6 per region, `REGIONS6`), eyeball listeners
on ports 80 and 443 of 127.0.0.1 and `EYEBALLS6` (routed names have A and AAAA records), the v4 API
at `https://api.cloudflare.com/client/v4` (`lab.v4api` behind `lab.services`), and the lab CA
trusted through `SSL_CERT_FILE`, `CURL_CA_BUNDLE`, `REQUESTS_CA_BUNDLE` and a bind mount over the
system bundle (inside the namespace only). HOME is the sandbox's own directory, so `~/.cloudflared`
is the sandbox's. Nothing outside the namespace changes; when COMMAND exits, everything stops.
docs/sandbox.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from tunnel_lab.lab.api import LabError, edge_argv, management_call
from tunnel_lab.lab.dns import DEFAULT_PROTOCOLS, HTTP2_ONLY, LabZone, serve_dns, serve_dns_tcp
from tunnel_lab.lab.login import issue_origin_cert
from tunnel_lab.lab.loginflow import LoginTransfers, Page
from tunnel_lab.lab.paths import without_state
from tunnel_lab.lab.pki import LabPKI
from tunnel_lab.lab.runner import netns
from tunnel_lab.lab.runner.procs import TUNNEL_LAB, Component, ComponentError, child_env, tail
from tunnel_lab.lab.services import Services, serve_services, services_ssl_context
from tunnel_lab.lab.store import Store
from tunnel_lab.lab.v4api import V4Api
from tunnel_lab.wire.errors import TunnelLabError

log = logging.getLogger(__name__)

MODULE = "tunnel_lab.lab.sandbox"
START_TIMEOUT = 30.0

# Where things live inside the namespace (any 127/8 address is local there).
REGIONS = {"region1.v2.argotunnel.com": ("127.0.1.1", "127.0.1.2"),
           "region2.v2.argotunnel.com": ("127.0.2.1", "127.0.2.2")}
# Each region's IPv6 addresses (AAAA), added to lo inside the namespace only. They are from the
# documentation prefix 2001:db8::/32 (RFC 3849, never routed) rather than ULA fd00::/8 because address
# selection (RFC 6724, which Go's resolver applies to cloudflared's lookups) ranks ULA below IPv4 but a
# global-scope address above it: with these, `--edge-ip-version auto` prefers IPv6 as on a dual-stack
# host on the real network (docs/sandbox.md, "IPv6").
REGIONS6 = {"region1.v2.argotunnel.com": ("2001:db8:1::1", "2001:db8:1::2"),
            "region2.v2.argotunnel.com": ("2001:db8:2::1", "2001:db8:2::2")}
EYEBALLS = "127.0.0.1"
# The eyeball listeners' IPv6 address, global-scope for the same reason as REGIONS6: clients such as curl
# (getaddrinfo's RFC 6724 order) then try it before 127.0.0.1, as on a dual-stack network.
EYEBALLS6 = "2001:db8::1"
SERVICES = "127.0.3.1"
DNS_ADDRESS = ("127.0.0.1", 53)
# The system CA bundles that common clients read (Debian/Ubuntu, Fedora/RHEL, Alpine, openSUSE).
SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                  "/etc/ssl/cert.pem", "/etc/ssl/ca-bundle.pem")


class SandboxError(TunnelLabError):
    """The sandbox could not be set up, or COMMAND could not be run (`status`: the exit status to use)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Layout:
    """The sandbox's directories inside its state directory."""

    state: Path

    @property
    def home(self) -> Path:
        return self.state / "home"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def bin(self) -> Path:
        return self.state / "bin"

    @property
    def bundle(self) -> Path:
        return self.state / "ca-bundle.pem"


def _trust_lab_ca(layout: Layout, ca: Path) -> list[str]:
    """Write the bundle (system roots + lab CA) and bind-mount it over the system bundles that exist.

    The namespace has its own mount table (unshare --mount, private propagation), so the host never
    sees these mounts. Returns the paths mounted over.
    """
    system = next((Path(p) for p in SYSTEM_BUNDLES if os.path.isfile(p)), None)
    parts = [system.read_bytes()] if system is not None else []
    parts.append(ca.read_bytes())
    layout.bundle.write_bytes(b"\n".join(parts))
    mounted = []
    for path in SYSTEM_BUNDLES:
        if os.path.isfile(path):
            done = subprocess.run(["mount", "--bind", str(layout.bundle), path], capture_output=True,
                                  text=True, check=False)
            if done.returncode != 0:
                raise SandboxError(f"cannot bind-mount the CA bundle over {path}: {done.stderr.strip()}")
            mounted.append(path)
    return mounted


def _allow_ping() -> None:
    """Let every group open ICMP sockets in this network namespace (the sysctl is per namespace, so the
    host keeps its own): cloudflared's ICMP proxy then starts instead of warning that it cannot."""
    with contextlib.suppress(OSError):
        Path("/proc/sys/net/ipv4/ping_group_range").write_text("0 2147483647\n")


def _add_ipv6_addresses(addresses: Sequence[str]) -> bool:
    """Add `addresses` to lo (this namespace only); False, with a warning, when IPv6 is not available."""
    if not socket.has_ipv6 or shutil.which("ip") is None:
        log.warning("no IPv6 (or no `ip` command): edge discovery answers A records only")
        return False
    for address in addresses:
        # nodad: usable at once (no duplicate address detection on a private loopback)
        done = subprocess.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log.warning("cannot add %s to lo (%s): edge discovery answers A records only", address,
                        done.stderr.strip())
            return False
    return True


def regions(ipv6: bool) -> dict[str, list[str]]:
    """Each discovery target's addresses: IPv4, then IPv6 when the namespace has it."""
    return {name: [*REGIONS[name], *(REGIONS6[name] if ipv6 else ())] for name in REGIONS}


def command_env(layout: Layout, *, cloudflared: Path | None) -> dict[str, str]:
    """COMMAND's environment: the caller's, with the sandbox's HOME, state and CA bundle."""
    env = {k: v for k, v in os.environ.items() if k != netns.MARKER and not k.startswith("TUNNEL_")}
    bundle = str(layout.bundle)
    env.update({"HOME": str(layout.home), "TUNNEL_LAB_STATE": str(layout.state), "TUNNEL_LAB_SANDBOX": "1",
                "SSL_CERT_FILE": bundle, "CURL_CA_BUNDLE": bundle, "REQUESTS_CA_BUNDLE": bundle,
                "NODE_EXTRA_CA_CERTS": bundle})
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env.pop(proxy, None)
    path = [str(layout.bin), str(Path(TUNNEL_LAB[0]).parent)]
    if cloudflared is not None:
        link = layout.bin / "cloudflared"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(cloudflared)
    env["PATH"] = os.pathsep.join([*path, env.get("PATH", os.defpath)])
    return env


def _eyeballs(ipv6: bool) -> dict[str, list[str]]:
    """The eyeball listeners' addresses: IPv4 first (the ready file's `http`/`https`), then IPv6."""
    hosts = [EYEBALLS, *([f"[{EYEBALLS6}]"] if ipv6 else [])]
    return {"http": [f"{host}:80" for host in hosts], "https": [f"{host}:443" for host in hosts]}


async def _start_edge(layout: Layout, loglevel: str, addresses: Sequence[str], *,
                      quic: bool, ipv6: bool) -> tuple[Component, dict[str, object]]:
    ready = layout.state / "edge.ready.json"
    datacentres = [(f"LAB{n}", f"[{address}]:7844" if ":" in address else f"{address}:7844")
                   for n, address in enumerate(addresses, start=1)]
    eyeballs = _eyeballs(ipv6)
    flags = [] if quic else ["--no-quic"]
    for what in ("http", "https"):
        for address in eyeballs[what][1:]:  # the first is edge_argv's http= / https=
            flags += [f"--{what}-listen", address]
    argv = edge_argv(layout.state, datacentres, ready=ready, http=eyeballs["http"][0],
                     https=eyeballs["https"][0], loglevel=loglevel, flags=flags)
    edge = Component("edge", argv, layout.logs / "edge.log",
                     env=child_env({"TUNNEL_LAB_STATE": str(layout.state)}, home=str(layout.home)),
                     ready_file=ready)
    try:
        await edge.start()
        info = await edge.wait_ready_file(START_TIMEOUT)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await edge.stop(grace=1.0)
        if isinstance(exc, ComponentError | OSError):
            raise LabError(f"the edge did not start: {exc}", {"edge": tail(edge.log_path)}) from exc
        raise
    return edge, info


def _banner(layout: Layout, info: dict[str, object], mounted: Sequence[str], ipv6: bool) -> str:
    hosts = [EYEBALLS, *([EYEBALLS6] if ipv6 else [])]
    return "\n".join([
        "tunnel-lab sandbox: a private network where the lab plays Cloudflare",
        f"  state     {layout.state}   (HOME={layout.home})",
        f"  edge      SRV _v2-origintunneld._tcp.argotunnel.com -> region1/region2 port 7844; "
        f"management API http://{info.get('api')}",
        "  API       https://api.cloudflare.com/client/v4 (lab CA trusted: SSL_CERT_FILE"
        + (f", {', '.join(mounted)}" if mounted else "") + ")",
        f"  eyeballs  ports 80 and 443 of {' and '.join(hosts)} (every routed hostname resolves here)",
        "  try       cloudflared tunnel login (open the printed link with curl, or run `tunnel-lab login`), "
        "then cloudflared tunnel create app; docs/sandbox.md",
        "",
    ])


async def run_sandbox(command: Sequence[str], layout: Layout, *, cloudflared: Path | None,
                      loglevel: str, quiet: bool, quic: bool = True, ipv6: bool = True) -> int:
    """Bring the lab up in this (already private) namespace, run COMMAND, tear down; COMMAND's status."""
    for d in (layout.home, layout.logs, layout.bin):
        d.mkdir(parents=True, exist_ok=True)
    pki = LabPKI(layout.state)
    mounted = _trust_lab_ca(layout, pki.ca_pem_path)
    _allow_ping()
    store = Store(layout.state / "state.db")
    env = command_env(layout, cloudflared=cloudflared)
    ipv6 = ipv6 and _add_ipv6_addresses([*(a for pair in REGIONS6.values() for a in pair), EYEBALLS6])
    zone = LabZone(regions=regions(ipv6),
                   services=SERVICES, eyeballs=EYEBALLS, eyeballs6=EYEBALLS6 if ipv6 else None,
                   routed=store.is_routed,
                   protocols=DEFAULT_PROTOCOLS if quic else HTTP2_ONLY)
    # Signals are watched from the start: one that arrives while the lab starts aborts the start-up
    # (PID 1 of a namespace would otherwise ignore it); later ones go to COMMAND.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        return await _serve(command, layout, env, zone, store, pki, mounted, signals, loglevel=loglevel,
                            quiet=quiet, quic=quic)


async def _serve(command: Sequence[str], layout: Layout, env: dict[str, str], zone: LabZone, store: Store,
                 pki: LabPKI, mounted: Sequence[str], signals: AsyncIterator[int], *, loglevel: str,
                 quiet: bool, quic: bool) -> int:
    status: int | None = None
    process: trio.Process | None = None
    edge: Component | None = None
    try:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                nonlocal status
                async for sig in signals:
                    if process is None:
                        status = -sig
                        nursery.cancel_scope.cancel()
                        return
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(sig)

            nursery.start_soon(watch_signals)
            edge, info = await _start_edge(layout, loglevel, [a for r in zone.regions.values() for a in r],
                                           quic=quic, ipv6=zone.eyeballs6 is not None)
            token = str(info.get("api_token") or "") or (layout.state / "api-token").read_text().strip()
            edge_api = functools.partial(management_call, str(info["api"]), token)

            async def access_transfer(path: str) -> Page:
                # `cloudflared access login` polls login.cloudflareaccess.org/transfer/KEY; the edge
                # holds the sealed tokens (edge/access_cli.py), so the poll waits there.
                try:
                    key = path[len("/transfer/"):]
                    answer = await edge_api("GET", f"/access/transfers/{key}?wait=45")
                except LabError:
                    return Page(status=404, content_type="text/plain", body=b"no such transfer\n")
                if not isinstance(answer, dict) or "body" not in answer:
                    return Page(status=404, content_type="text/plain", body=b"not yet\n")
                return Page(status=200, content_type="text/plain", body=str(answer["body"]).encode(),
                            headers=(("service-public-key", str(answer["service_public_key"])),))

            await nursery.start(serve_dns, zone, DNS_ADDRESS)
            await nursery.start(serve_dns_tcp, zone, DNS_ADDRESS)
            services = Services.on_edge(V4Api(layout.state, store),
                                        LoginTransfers(lambda: issue_origin_cert(layout.state)), edge_api,
                                        access_transfer=access_transfer)
            await nursery.start(serve_services, services, (SERVICES, 443), services_ssl_context(pki))
            if not quiet:
                print(_banner(layout, info, mounted, zone.eyeballs6 is not None), file=sys.stderr, flush=True)
            process = await nursery.start(_run_command, list(command), env)
            # Written once COMMAND runs: whoever waits for this file may signal the sandbox from then on.
            (layout.state / "sandbox.json").write_text(json.dumps({
                "dns": f"{DNS_ADDRESS[0]}:{DNS_ADDRESS[1]}", "services": f"{SERVICES}:443",
                "eyeballs": {"http": f"{EYEBALLS}:80", "https": f"{EYEBALLS}:443",
                             "all": _eyeballs(zone.eyeballs6 is not None)},
                "regions": {k: list(v) for k, v in zone.regions.items()}, "edge_api": info.get("api"),
                "ca": str(pki.ca_pem_path), "bundle": str(layout.bundle), "command_pid": process.pid},
                indent=1) + "\n")
            status = await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if edge is not None:
                await edge.stop(grace=5.0)
        store.close()
    assert status is not None
    return 128 - status if status < 0 else status


async def _run_command(command: list[str], env: dict[str, str], *,
                       task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        process = await trio.lowlevel.open_process(command, env=env, stdin=None)
    except OSError as exc:
        status = 127 if isinstance(exc, FileNotFoundError) else 126  # what a shell answers
        raise SandboxError(f"cannot run {command[0]!r}: {exc.strerror or exc}", status) from exc
    task_status.started(process)
    # If the lab fails first, this wait is cancelled and COMMAND outlives it only until this process,
    # PID 1 of the namespace, exits: the kernel then ends every process inside.
    await process.wait()


def _inside(argv: Sequence[str]) -> int:
    """The namespace's first process: set up, run the lab and COMMAND, return COMMAND's status."""
    args = _parser().parse_args(argv)
    command = _command(args.command)
    try:
        netns.enter_inside(dns_stub=False)
    except (netns.NetnsError, OSError) as exc:
        print(f"tunnel-lab sandbox: cannot set the namespace up: {exc}", file=sys.stderr)
        return 2
    named = args.state is not None
    state = Path(args.state).resolve() if named else Path(tempfile.mkdtemp(prefix="tunnel-lab-sandbox-"))
    logging.basicConfig(level=logging.WARNING, format="tunnel-lab sandbox: %(message)s")
    # Ctrl-C belongs to COMMAND (it reaches the whole foreground group): a handler that does nothing
    # keeps trio from turning it into KeyboardInterrupt here, and COMMAND decides for itself.
    signal.signal(signal.SIGINT, lambda _sig, _frame: None)
    try:
        state.mkdir(parents=True, exist_ok=True)
        cloudflared = Path(args.cloudflared).resolve() if args.cloudflared else None
        return trio.run(lambda: run_sandbox(command, Layout(state), cloudflared=cloudflared,
                                            loglevel=args.loglevel, quiet=args.quiet, quic=not args.no_quic,
                                            ipv6=not args.no_ipv6))
    except (TunnelLabError, OSError) as exc:
        print(f"tunnel-lab sandbox: {exc}", file=sys.stderr)
        return exc.status if isinstance(exc, SandboxError) else 2
    except BaseExceptionGroup as group:
        # Raised from inside the nursery: report the cause as for a plain error; anything else is a bug.
        known, other = group.split((TunnelLabError, OSError))
        if other is not None or known is None:
            raise
        leaf = _first_leaf(known)
        print(f"tunnel-lab sandbox: {leaf}", file=sys.stderr)
        return leaf.status if isinstance(leaf, SandboxError) else 2
    finally:
        if not named:
            shutil.rmtree(state, ignore_errors=True)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunnel-lab sandbox",
        usage="tunnel-lab sandbox [-h] [--state DIR] [--cloudflared PATH] [--no-quic] [--no-ipv6] "
              "[-- COMMAND [ARGS...]]",
        description="Run COMMAND (default: an interactive shell) in a private network namespace where the "
        "lab answers for Cloudflare: DNS (edge discovery, api.cloudflare.com, login, routed hostnames), the "
        "v4 API, the edge and eyeball listeners on ports 80 and 443, the lab CA trusted. The real "
        "cloudflared runs there with no lab flag. Needs Linux, unshare, and root or CAP_SYS_ADMIN.")
    p.add_argument("--state", metavar="DIR", help="keep the lab's state here (default: a temporary "
                   "directory removed at the end)")
    p.add_argument("--cloudflared", metavar="PATH", help="put this cloudflared binary on COMMAND's PATH")
    p.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"],
                   help="the edge's log level (its log: STATE/logs/edge.log)")
    p.add_argument("--no-quic", action="store_true", help="an edge without QUIC listeners, and edge "
                   "discovery that says http2 (cloudflared's `--protocol auto` then starts on http2)")
    p.add_argument("--no-ipv6", action="store_true", help="no IPv6 edge: discovery and routed hostnames "
                   "answer A records only, as for a network whose edge has no IPv6 (default: each region "
                   "also has two AAAA addresses, 2001:db8:R::1 and ::2, and the eyeball listeners "
                   f"{EYEBALLS6}, on the namespace's lo)")
    p.add_argument("--quiet", action="store_true", help="no banner on stderr")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS...]")
    return p


def _command(command: Sequence[str]) -> list[str]:
    command = list(command)
    if command[:1] == ["--"]:
        command = command[1:]
    return command or [os.environ.get("SHELL") or "/bin/sh", "-i"]


def main(argv: Sequence[str]) -> int:
    """`tunnel-lab sandbox`: re-execute inside a fresh namespace and return COMMAND's exit status."""
    args = _parser().parse_args(list(argv))
    if args.cloudflared and not os.access(args.cloudflared, os.X_OK):
        print(f"tunnel-lab sandbox: --cloudflared {args.cloudflared}: not an executable file",
              file=sys.stderr)
        return 2
    ok, why = netns.available()
    if not ok:
        print(f"tunnel-lab sandbox: cannot create a private network namespace: {why}", file=sys.stderr)
        return 2
    inner = list(argv)
    if args.state:
        # The inner process must find the same directory whatever its working directory.
        inner = ["--state", str(Path(args.state).resolve()), *_drop_state(inner)]
    return netns.run_isolated(inner, module=MODULE)


def _drop_state(argv: list[str]) -> list[str]:
    out: list[str] = []
    for i, arg in without_state(argv):
        if arg == "--":  # what follows is the command's, --state included
            return out + argv[i:]
        out.append(arg)
    return out


if __name__ == "__main__":
    if not netns.inside():
        sys.exit(main(sys.argv[1:]))
    arguments = sys.argv[1:]
    sys.exit(_inside(arguments[1:] if arguments[:1] == ["--"] else arguments))

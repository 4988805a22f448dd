"""The public side of Cloudflare for one scenario (`topology.internet: true`), so that a `cli` step can run
the connector's own admin commands (`CONNECTOR tunnel login|create|route dns|run NAME|cleanup`) with no lab
flag, as `tunnel-lab sandbox` lets a user run them (docs/sandbox.md).

Per scenario, on loopback addresses of its own (`allocate`): a DNS server on port 53 (`lab.dns.LabZone`:
edge discovery naming the edge's four tunnel listeners on port 7844, the service names, routed hostnames),
the HTTPS services on port 443 (`lab.services`: v4 API, login, quick tunnels), both served in the runner's
process. Each `cli` command runs in a mount namespace of its own (`unshare --mount`) where
/etc/resolv.conf names that DNS server; `SSL_CERT_FILE` is the lab CA; HOME is the scenario's. The network
is the runner's: the edge, the origins and the runner's own eyeball requests meet the connector as in
every other scenario. The protocol record says QUIC first under `run --protocol quic`, http2 otherwise,
so `--protocol auto` (the default) follows the run. docs/scenarios.md, "The documented flow".
"""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import json
import os
import random
import re
import shutil
import socket
import subprocess
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from tunnel_lab.lab.runner.procs import TUNNEL_LAB, ComponentError, child_env

if TYPE_CHECKING:
    from tunnel_lab.lab.runner.lab import Lab

EDGE_PORT = 7844  # what the SRV record names (lab.dns.EDGE_PORT)
LOGIN_URL = re.compile(r"https://dash\.cloudflare\.com/argotunnel\?\S+")
CALLBACK_FIELD = re.compile(r'name="callback" value="([^"]*)"')
REGION_NAMES = ("region1.v2.argotunnel.com", "region2.v2.argotunnel.com")
RESOLV_CONF = "/etc/resolv.conf"
# The mount namespace's first (and only) process: bind the scenario's resolv.conf, then become COMMAND.
# Mounts over resolv.conf go first: the runner's own namespace binds a file it has since unlinked
# (lab.runner.netns), and the kernel refuses to mount over an unlinked file (ENOENT).
_WRAP = ('while umount /etc/resolv.conf 2>/dev/null; do :; done; '
         'mount --bind "$0" /etc/resolv.conf && exec "$@"')


class InternetError(ComponentError):
    """The scenario's public side could not be set up, or a login could not be approved."""


@functools.cache
def available() -> tuple[bool, str]:
    """Can a command get a mount namespace of its own here, with a resolv.conf to replace? (ok, reason)."""
    if shutil.which("unshare") is None:
        return False, "`unshare` (util-linux) is not installed"
    if not os.path.exists(RESOLV_CONF):
        return False, f"{RESOLV_CONF} does not exist, so there is nothing to bind the lab's resolver over"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return False, (f"unshare --mount failed: {probe.stderr.strip() or probe.returncode} "
                       "(needs root or CAP_SYS_ADMIN)")
    return True, ""


@dataclass(frozen=True)
class Addresses:
    """Where one scenario's public side lives: DNS (port 53), services (443), edge listeners (7844)."""

    dns: str
    services: str
    regions: dict[str, tuple[str, str]]

    @property
    def edges(self) -> list[str]:
        return [address for pair in self.regions.values() for address in pair]


def _free(address: str, port: int, kinds: tuple[int, ...]) -> bool:
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def allocate(rng: random.Random | None = None) -> Addresses:
    """Addresses in a /24 of 127.100-199.x.0 whose fixed ports are free now. Other labs on the machine
    (other runs, other helpers' tests) bind fixed ports too, so a random network is tried, then another."""
    rng = rng or random.SystemRandom()
    both = (socket.SOCK_STREAM, socket.SOCK_DGRAM)
    for _ in range(50):
        net = f"127.{rng.randrange(100, 200)}.{rng.randrange(0, 256)}"
        found = Addresses(dns=f"{net}.1", services=f"{net}.2",
                          regions={REGION_NAMES[0]: (f"{net}.11", f"{net}.12"),
                                   REGION_NAMES[1]: (f"{net}.21", f"{net}.22")})
        if (_free(found.dns, 53, both) and _free(found.services, 443, (socket.SOCK_STREAM,))
                and all(_free(a, EDGE_PORT, both) for a in found.edges)):
            return found
    raise InternetError("no free loopback network for the lab's DNS, API and edge (ports 53, 443, 7844) "
                        "after 50 tries")


def read_cert(path: Path) -> dict[str, str]:
    """The JSON inside a cert.pem (`zoneID`, `accountID`, `apiToken`); InternetError if there is none."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        body = "".join(line for line in lines if not line.startswith("-----"))
        data = json.loads(base64.b64decode(body))
    except (OSError, ValueError) as exc:
        raise InternetError(f"no readable cert.pem at {path} (run `tunnel login` first): {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("accountID", "apiToken")):
        raise InternetError(f"{path} holds no accountID and apiToken")
    return {str(k): str(v) for k, v in data.items()}


@dataclass
class Internet:
    """One scenario's public side, once served: what `cli` and `v4_api` steps need."""

    addresses: Addresses
    resolv_conf: Path
    ca: str

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` in a mount namespace of its own where /etc/resolv.conf names the lab's DNS server."""
        return ["unshare", "--mount", "sh", "-c", _WRAP, str(self.resolv_conf), *argv]

    def env(self, home: Path) -> dict[str, str]:
        """A clean environment (no TUNNEL_* variable: they act as flags) trusting the lab CA."""
        return child_env({"SSL_CERT_FILE": self.ca}, home=str(home))


def connector_command(lab: Lab) -> list[str]:
    """CONNECTOR: the binary under test."""
    if lab.options.connector == "cloudflared":
        return [lab.options.cloudflared or "cloudflared"]
    return [*TUNNEL_LAB, "connector"]


async def serve_internet(lab: Lab, *, task_status: trio.TaskStatus[Internet] = trio.TASK_STATUS_IGNORED
                         ) -> None:
    """Serve DNS and the HTTPS services for `lab` (its edge is up) until cancelled."""
    from tunnel_lab.lab.dns import DEFAULT_PROTOCOLS, HTTP2_ONLY, LabZone, serve_dns, serve_dns_tcp
    from tunnel_lab.lab.login import issue_origin_cert
    from tunnel_lab.lab.loginflow import LoginTransfers
    from tunnel_lab.lab.pki import LabPKI
    from tunnel_lab.lab.services import Services, serve_services, services_ssl_context
    from tunnel_lab.lab.store import Store
    from tunnel_lab.lab.v4api import V4Api

    addresses = lab.internet_addresses
    assert addresses is not None
    eyeballs = str(lab.edge_ready.get("http", "127.0.0.1:80")).rpartition(":")[0]
    resolv = lab.state / "resolv.conf"
    resolv.write_text(f"nameserver {addresses.dns}\noptions timeout:2 attempts:2\n")
    with Store(lab.state / "state.db") as store:
        zone = LabZone(regions={k: list(v) for k, v in addresses.regions.items()},
                       services=addresses.services, eyeballs=eyeballs,
                       routed=lambda name: store.resolve_hostname(name) is not None,
                       protocols=DEFAULT_PROTOCOLS if lab.options.protocol == "quic" else HTTP2_ONLY)
        logins = LoginTransfers(lambda: issue_origin_cert(lab.state))
        services = Services.on_edge(V4Api(lab.state, store), logins, lab.api)
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(serve_dns, zone, (addresses.dns, 53))
                await nursery.start(serve_dns_tcp, zone, (addresses.dns, 53))
                await nursery.start(serve_services, services, (addresses.services, 443),
                                    services_ssl_context(LabPKI(lab.state)))
            except OSError as exc:
                raise InternetError(f"the lab's DNS or API could not listen on {addresses.dns}:53 / "
                                    f"{addresses.services}:443: {exc}") from exc
            lab.recorder.op("internet", dns=f"{addresses.dns}:53", services=f"{addresses.services}:443",
                            edges=addresses.edges)
            task_status.started(Internet(addresses, resolv, str(lab.edge_ready.get("ca"))))


async def around_steps(lab: Lab, steps: Callable[[], Awaitable[None]]) -> None:
    """Run `steps` with the scenario's public side served, when it has one."""
    if lab.internet_addresses is None:
        await steps()
        return
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        lab.internet = await nursery.start(serve_internet, lab)
        try:
            await steps()
        except Exception as exc:  # raised as itself below, not inside the nursery's exception group
            failure = exc
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def approve_login(lab: Lab, output: Path, process: trio.Process, timeout: float) -> str:
    """Approve the login that `process` (`CONNECTOR tunnel login`) printed a link for, as a user would on
    the page: open the link, submit its form. Returns the link."""
    from tunnel_lab.lab.runner import client

    internet = lab.internet
    assert internet is not None
    url = None
    with trio.move_on_after(timeout):
        while url is None:
            found = LOGIN_URL.search(output.read_text(errors="replace")) if output.exists() else None
            if found is not None:
                url = found.group(0)
            elif process.returncode is not None:
                raise InternetError(f"`tunnel login` exited with code {process.returncode} before it printed "
                                    "the login link")
            else:
                await trio.sleep(0.05)
    if url is None:
        raise InternetError("`tunnel login` printed no https://dash.cloudflare.com/argotunnel?... link "
                            f"within {timeout:g}s")
    parts = urllib.parse.urlsplit(url)
    services = f"{internet.addresses.services}:443"
    page = await client.http_request(services, host=parts.hostname or "", path=f"{parts.path}?{parts.query}",
                                     tls=True, ca_path=internet.ca)
    form = CALLBACK_FIELD.search(bytes(page.body_prefix).decode("utf-8", "replace"))
    if page.status != 200 or form is None:
        raise InternetError(f"the login page {url} answered {page.status or page.error} without the approval "
                            "form")
    body = urllib.parse.urlencode({"callback": html.unescape(form.group(1))}).encode()
    approved = await client.http_request(
        services, method="POST", host=parts.hostname or "", path="/argotunnel/approve", body=body,
        body_length=len(body), headers=[("Content-Type", "application/x-www-form-urlencoded")], tls=True,
        ca_path=internet.ca)
    if approved.status != 200:
        raise InternetError(f"approving the login answered {approved.status or approved.error}")
    return url


async def v4_call(lab: Lab, method: str, path: str, body: Any) -> tuple[int | None, Any, str]:
    """One call to https://api.cloudflare.com/client/v4 + `path` with the cert.pem's API token:
    (status, parsed JSON or None, error)."""
    from tunnel_lab.lab.runner import client

    internet = lab.internet
    assert internet is not None
    cert = read_cert(lab.cert_path)
    lab.redactor.add(cert["apiToken"])
    data = json.dumps(body).encode() if body is not None else None
    headers = [("Authorization", f"Bearer {cert['apiToken']}"), ("Accept", "application/json;version=1")]
    if data is not None:
        headers.append(("Content-Type", "application/json"))
    resp = await client.http_request(
        f"{internet.addresses.services}:443", method=method, host="api.cloudflare.com",
        path="/client/v4" + path, headers=headers, body=data, body_length=None if data is None else len(data),
        tls=True, ca_path=internet.ca)
    parsed = None
    with contextlib.suppress(ValueError):
        parsed = json.loads(bytes(resp.body_prefix))
    return resp.status, parsed, resp.error or ""

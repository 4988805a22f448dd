"""The pytest plugin: your own server behind a tunnel in your own tests (docs/pytest.md).

    def test_through_the_tunnel(tunnel_lab, my_server):
        site = tunnel_lab.expose(my_server.url)       # a fresh tunnel, routed, with a connector
        assert site.get("/").status == 200            # an eyeball request through the edge
        site.failover()                               # its data centre fails; the connector moves
        assert site.get("/").status == 200
        assert site.received()[-1].header("cf-connecting-ip")

Registered through the `pytest11` entry point, so it is loaded in every pytest run of an environment where
tunnel-lab is installed: importing it costs only this module, and nothing starts until a test asks for a
fixture. `tunnel_lab_session` (session scope) is the lab: an edge with data centres and the lab CA, run by
`lab.api.start_lab` on a trio loop in a helper thread, its processes stopped when the session ends (also on
Ctrl-C; a reaper process stops them if pytest itself is killed). `tunnel_lab` (function scope) is what a
test uses; whatever it created (tunnels, routes, connectors, recorders, origins, faults) is gone when the
test ends. Under pytest-xdist each worker has its own lab: every port is chosen by the kernel or below
its ephemeral range, and the state directory is a fresh temporary one.

`--tunnel-lab-cloudflared PATH` runs a real cloudflared as the connector. It must run in a private network
namespace, and the test's servers must be reachable from it, so the whole session re-executes itself
inside one (`tunnel-lab netns`): only loopback exists there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import sys
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the plugin must stay cheap to import: lab.api (trio, ...) loads with the first fixture
    from tunnel_lab.lab.api import Connector, Origin, SyncLab, Tunnel
    from tunnel_lab.lab.recorder import Received, Recorder
    from tunnel_lab.lab.runner.client import Response, WebSocketResult

DEFAULT_DATACENTRES = 3
# Set when --tunnel-lab-cloudflared cannot be honoured: every test that asks for the lab fails with it.
_PROBLEM = pytest.StashKey[str]()
_USED = pytest.StashKey["TunnelLab"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tunnel-lab", "tunnel-lab (an offline Cloudflare Tunnel lab; docs/pytest.md)")
    group.addoption(
        "--tunnel-lab-cloudflared",
        metavar="PATH",
        default=None,
        help="run this cloudflared binary as the tunnel_lab connector; the session then re-executes itself "
        "in a private network namespace (needs root or CAP_SYS_ADMIN)",
    )
    parser.addini(
        "tunnel_lab_datacentres",
        f"data centres of the tunnel_lab edge (default {DEFAULT_DATACENTRES})",
        default=str(DEFAULT_DATACENTRES),
    )
    parser.addini("tunnel_lab_edge_flags", "extra command-line flags for the tunnel_lab edge", type="args")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """With --tunnel-lab-cloudflared, run this same session again inside a private network namespace."""
    path = config.getoption("tunnel_lab_cloudflared")
    # An xdist worker of this session (config.workerinput, set by xdist before this hook): its controller
    # already decided. Not the PYTEST_XDIST_WORKER variable: a pytest run started from a worker (a test
    # suite's own subprocess) inherits it and would skip the namespace.
    if not path or config.option.help or config.option.version or hasattr(config, "workerinput"):
        return None
    from tunnel_lab.lab.runner import cloudflared, netns
    from tunnel_lab.wire.errors import TunnelLabError

    if netns.isolated():
        return None  # already inside one (this is the re-executed session, or a sandbox)
    try:
        cloudflared.check_path(path)
    except TunnelLabError as exc:
        config.stash[_PROBLEM] = f"--tunnel-lab-cloudflared: {exc}"
        return None
    ok, why = netns.available()
    if not ok:
        config.stash[_PROBLEM] = (
            f"--tunnel-lab-cloudflared: cannot create the private network namespace cloudflared must run "
            f"in: {why}"
        )
        return None
    return netns.run_isolated([sys.executable, "-m", "pytest", *config.invocation_params.args])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that used the lab shows the last log lines of the components it ran."""
    report: pytest.TestReport = yield
    used = item.stash.get(_USED, None)
    if used is not None and used.components and report.failed:
        text = used.log_report()
        if text:
            report.sections.append(("tunnel-lab: last log lines", text))
    return report


class LabSession:
    """The session's lab (`tunnel_lab_session`): a `lab.api.SyncLab` and what the tests share."""

    def __init__(self, lab: SyncLab, cloudflared: str | None) -> None:
        self.lab = lab
        self.cloudflared = cloudflared
        self.counter = 0
        self.hostnames: dict[str, str] = {}  # hostname -> node id of the test that routes it now
        self.history_seen = 0

    def next_number(self) -> int:
        self.counter += 1
        return self.counter


@pytest.fixture(scope="session")
def tunnel_lab_session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[LabSession]:
    """The session's lab: an edge with data centres (ini `tunnel_lab_datacentres`) and the lab CA."""
    config = request.config
    problem = config.stash.get(_PROBLEM, None)
    if problem:
        pytest.fail(problem, pytrace=False)
    from tunnel_lab.lab.api import cloudflared_path, start_lab
    from tunnel_lab.lab.runner.reaper import REAPER

    cloudflared = config.getoption("tunnel_lab_cloudflared")
    try:
        datacentres = int(config.getini("tunnel_lab_datacentres"))
    except ValueError:
        value = config.getini("tunnel_lab_datacentres")
        pytest.fail(f"tunnel_lab_datacentres: {value!r} is not a number", pytrace=False)
    if cloudflared:
        with _failing("--tunnel-lab-cloudflared: "):
            cloudflared = cloudflared_path(cloudflared)
    # The reaper stops the lab's processes and removes its state directory when this process ends without
    # having done so itself (killed, or interrupted again while it tore the lab down).
    REAPER.start()
    with contextlib.ExitStack() as stack:
        with _failing("tunnel-lab: the lab did not start: "):
            lab = stack.enter_context(
                start_lab(
                    datacentres=datacentres,
                    edge_flags=list(config.getini("tunnel_lab_edge_flags")),
                    logs=tmp_path_factory.mktemp("tunnel-lab"),
                )
            )
        yield LabSession(lab, cloudflared)
    REAPER.stop()  # only after a clean teardown


@pytest.fixture
def tunnel_lab(tunnel_lab_session: LabSession, request: pytest.FixtureRequest) -> Iterator[TunnelLab]:
    """The lab for one test: expose servers, make eyeball requests, inject faults, read the history.
    Everything the test created is removed when it ends."""
    tl = TunnelLab(tunnel_lab_session, request.node.nodeid)
    request.node.stash[_USED] = tl
    yield tl
    tl.close()


@contextlib.contextmanager
def _failing(prefix: str = "") -> Iterator[None]:
    """A `LabError` fails the test with its message (and the logs it names), without a traceback."""
    __tracebackhide__ = True
    from tunnel_lab.lab.api import LabError

    message = None
    try:
        yield
    except LabError as exc:
        message = prefix + str(exc)
    if message is not None:  # the message says it all: no chained exceptions in the report
        raise pytest.fail.Exception(message, pytrace=False) from None


class _Async:
    """`obj.aio.method(...)`: `obj.method(...)` in a worker thread, awaitable from trio or asyncio, so the
    test's own event loop (and a server running on it) goes on while the lab works."""

    def __init__(self, target: object) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._target, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            import sniffio

            fn = functools.partial(method, *args, **kwargs)
            if sniffio.current_async_library() == "trio":
                import trio

                return await trio.to_thread.run_sync(fn)
            import asyncio

            return await asyncio.to_thread(fn)

        return call


class Site:
    """One exposed server: its hostname, tunnel and connector, and requests to it through the edge."""

    def __init__(self, owner: TunnelLab, hostname: str, tunnel: Tunnel, connector: Connector,
                 target: str, recorder: Recorder | None, ha_connections: int) -> None:
        self._owner = owner
        self.hostname = hostname
        self.tunnel = tunnel
        self.connector = connector
        self.target = target  # the server's URL as the test gave it
        self.recorder = recorder
        self.ha_connections = ha_connections
        self.aio = _Async(self)

    def __repr__(self) -> str:
        return f"<Site {self.hostname} -> {self.target} tunnel={self.tunnel.name}>"

    def request(self, path: str = "/", **kwargs: Any) -> Response:
        """An eyeball request for this hostname (keywords of `TunnelLab.request`)."""
        return self._owner.request(self.hostname, path, **kwargs)

    def get(self, path: str = "/", **kwargs: Any) -> Response:
        return self.request(path, method="GET", **kwargs)

    def post(self, path: str = "/", body: bytes = b"", **kwargs: Any) -> Response:
        return self.request(path, method="POST", body=body, **kwargs)

    def websocket(self, path: str = "/", messages: Sequence[str | bytes] = (), **kwargs: Any
                  ) -> WebSocketResult:
        return self._owner.websocket(self.hostname, path, messages, **kwargs)

    def received(self) -> list[Received]:
        """What the server received through the tunnel, one `lab.recorder.Received` per request."""
        if self.recorder is None:
            pytest.fail(f"{self.target}: what it receives is not recorded (only http:// servers are, "
                        "unless expose(..., record=False))", pytrace=False)
        return list(self.recorder.records)

    def connections(self) -> list[dict[str, Any]]:
        """The tunnel connections the edge holds for this site's tunnel (management API records)."""
        return [c for c in self._owner.connections() if c.get("tunnel_id") == self.tunnel.id]

    def history(self) -> list[dict[str, Any]]:
        """The edge's request history for this hostname during this test."""
        return [h for h in self._owner.history() if h.get("host") == self.hostname]

    def failover(self, *, mid_request: bool = False, timeout: float = 30.0) -> str | None:
        """Take down the data centre serving this tunnel (a `dc-down` fault, cleared when the test ends).

        Without `mid_request`: now, then wait until the connector serves the tunnel from other data centres
        only (its remaining connection at once with `ha_connections` >= 2, a new one otherwise); returns the
        location. With `mid_request=True`: armed for the next request the server receives, which is held
        until the data centre carrying it is down (that request then fails at the eyeball, as it would in
        production); returns None at once. `wait_connections` waits for the connector's full strength.
        """
        __tracebackhide__ = True
        owner = self._owner
        owner.faulted = True
        if not mid_request:
            location = self._serving_location(self.connections())
            owner.fault("dc-down", location=location)
            self.wait_connections(1, avoid=location, timeout=timeout)
            return location
        if self.recorder is None:
            pytest.fail("failover(mid_request=True) needs a recorded server (an http:// URL)", pytrace=False)
        tunnel_id = self.tunnel.id

        async def when_received() -> None:
            from tunnel_lab.lab.api import Lab

            lab: Lab = owner.session.lab.lab
            conns = [c for c in await lab.connections() if c.get("tunnel_id") == tunnel_id]
            await lab.fault("dc-down", location=self._serving_location(conns))

        self.recorder.on_request = when_received
        return None

    @staticmethod
    def _serving_location(conns: list[dict[str, Any]]) -> str:
        __tracebackhide__ = True
        if not conns:
            pytest.fail("the connector holds no connection to fail over from", pytrace=False)
        # The connection with a stream open carries the request in flight; otherwise the first one.
        busy = [c for c in conns if c.get("streams")]
        chosen = min(busy or conns, key=lambda c: int(c.get("conn_index", 0)))
        return str(chosen["location"])

    def wait_connections(self, count: int, *, avoid: str | None = None, timeout: float = 30.0) -> None:
        """Wait until the connector has `count` registered connections (none in data centre `avoid`)."""
        __tracebackhide__ = True
        tunnel_id = self.tunnel.id

        async def wait(lab: Any) -> None:
            import trio

            from tunnel_lab.lab.api import LabError

            last: list[dict[str, Any]] = []
            with trio.move_on_after(timeout):
                while True:
                    last = [c for c in await lab.connections()
                            if c.get("tunnel_id") == tunnel_id and c.get("state") == "registered"]
                    if len(last) >= count and all(c.get("location") != avoid for c in last):
                        return
                    if not self.connector.running:
                        break
                    await trio.sleep(0.05)
            where = ", ".join(f"{c.get('location')}#{c.get('conn_index')}" for c in last) or "none"
            raise LabError(
                f"connector {self.connector.name} did not reach {count} registered connection(s)"
                + (f" outside {avoid}" if avoid else "")
                + f" within {timeout:g}s (has: {where}; running: {self.connector.running})",
                self._owner.session.lab.log_tails(),
            )

        with _failing():
            self._owner.session.lab.run(wait)


class TunnelLab:
    """What the `tunnel_lab` fixture gives a test. Blocking methods; `.aio` has awaitable versions."""

    def __init__(self, session: LabSession, nodeid: str) -> None:
        self.session = session
        self.nodeid = nodeid
        self.sites: list[Site] = []
        self.origins: list[Origin] = []
        self.components: list[str] = []
        self.faulted = False
        self.aio = _Async(self)
        with _failing():
            seen = session.lab.history(session.history_seen)
        if seen:
            session.history_seen = max(int(h["seq"]) for h in seen)
        self._since = session.history_seen

    # --- what the session has -------------------------------------------------------------------------------
    @property
    def lab(self) -> SyncLab:
        """The underlying `lab.api.SyncLab` (every method of docs/api.md)."""
        return self.session.lab

    @property
    def ca(self) -> str:
        """The lab CA certificate (PEM path): trust it for HTTPS to the edge."""
        return str(self.session.lab.ca)

    @property
    def edge(self) -> Any:
        """The edge's addresses (`lab.api.Edge`: http, https, api, datacentres, ...)."""
        return self.session.lab.edge

    # --- exposing a server ---------------------------------------------------------------------------------
    def expose(self, target: str | int, *, hostname: str | None = None, ha_connections: int | None = None,
               record: bool = True, origin_request: dict[str, Any] | None = None,
               timeout: float = 30.0) -> Site:
        """Put the server at `target` (a URL as cloudflared's `--url` takes it, or a port on 127.0.0.1)
        behind a fresh tunnel routed from `hostname` (default: one made from the test's name), with a
        connector (ours, or --tunnel-lab-cloudflared) that has `ha_connections` registered connections
        (default: one fewer than the data centres, at most 2). `record`: keep what it receives."""
        __tracebackhide__ = True
        session = self.session
        url = f"http://127.0.0.1:{target}" if isinstance(target, int) else target
        _check_listening(url)
        n = session.next_number()
        hostname = (hostname or _hostname_for(self.nodeid, n)).lower().rstrip(".")
        owner = session.hostnames.get(hostname)
        if owner is not None:
            here = "this test" if owner == self.nodeid else owner
            pytest.fail(f"{hostname} is already routed to a tunnel of {here}; a hostname goes to one "
                        "tunnel at a time (pass another hostname=)", pytrace=False)
        datacentres = len(session.lab.edge.datacentres)
        ha = ha_connections if ha_connections is not None else max(1, min(2, datacentres - 1))
        lab = session.lab
        with _failing():
            tunnel = lab.create_tunnel(f"t{n}")
            self.components.append(f"tunnel:{tunnel.name}")
            try:
                tunnel = lab.route_dns(tunnel, hostname)
            except Exception:
                lab.delete_tunnel(tunnel)
                raise
            session.hostnames[hostname] = self.nodeid
            recorder = None
            connector_url = url
            if record and re.match(r"http://(\[[^\]]+\]|[^/:]+):\d+(/|$)", url):
                connector_url, recorder = lab.start_recorder(url)
            site_connector_name = f"connector-{n}"
            self.components.append(site_connector_name)
            connector = lab.start_connector(
                tunnel, url=connector_url, ha_connections=ha, cloudflared=session.cloudflared,
                name=site_connector_name, origin_request=origin_request, timeout=timeout,
            )
        site = Site(self, hostname, tunnel, connector, url, recorder, ha)
        self.sites.append(site)
        return site

    def origin(self, kind: str = "echo", **kwargs: Any) -> Origin:
        """Start a bundled origin (`echo`, `hello`, `stream`, `ws-echo`, ...: docs/origins.md)."""
        __tracebackhide__ = True
        name = kwargs.pop("name", None) or f"{kind}-{self.session.next_number()}"
        with _failing():
            origin = self.session.lab.start_origin(kind, name=name, **kwargs)
        self.origins.append(origin)
        self.components.append(f"origin:{name}")
        return origin

    # --- eyeballs ------------------------------------------------------------------------------------------
    def request(self, hostname: str, path: str = "/", *, method: str = "GET",
                headers: Sequence[tuple[str, str]] = (), body: bytes | None = None, https: bool = False,
                http2: bool = False) -> Response:
        """One eyeball request to the edge (HTTP/1.1; `https` over TLS trusting the lab CA; `http2` h2 over
        TLS). Statuses never raise; transport failures are in `response.error`."""
        __tracebackhide__ = True
        with _failing():
            return self.session.lab.request(hostname, path, method=method, headers=headers, body=body,
                                            https=https, http2=http2)

    def websocket(self, hostname: str, path: str = "/", messages: Sequence[str | bytes] = (), *,
                  headers: Sequence[tuple[str, str]] = (), https: bool = False) -> WebSocketResult:
        """A WebSocket through the edge: send each message and read one back after each."""
        __tracebackhide__ = True
        with _failing():
            return self.session.lab.websocket(hostname, path, messages, headers=headers, https=https)

    # --- faults and what happened --------------------------------------------------------------------------
    def fault(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Inject a fault through the management API (kinds: docs/edge.md); cleared when the test ends."""
        __tracebackhide__ = True
        self.faulted = True
        with _failing():
            return self.session.lab.fault(kind, **fields)

    def clear_faults(self) -> None:
        __tracebackhide__ = True
        with _failing():
            self.session.lab.clear_faults()

    def history(self) -> list[dict[str, Any]]:
        """The edge's request history during this test (docs/edge.md, `GET /history`)."""
        __tracebackhide__ = True
        with _failing():
            return self.session.lab.history(self._since)

    def connections(self) -> list[dict[str, Any]]:
        __tracebackhide__ = True
        with _failing():
            return self.session.lab.connections()

    def log_report(self, lines: int = 15) -> str:
        """The last lines of the logs of the edge and of what this test started."""
        tails = self.session.lab.log_tails(lines)
        mine = ["edge", *self.components]
        return "\n".join(
            f"--- {name}\n" + "\n".join(tails[name]) for name in mine if tails.get(name)
        )

    # --- teardown -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop what this test started and remove its tunnels and routes; clear faults it injected."""
        lab = self.session.lab
        errors: list[str] = []
        for site in self.sites:
            try:
                lab.stop(site.connector.name)
                if site.recorder is not None:
                    lab.stop_recorder(site.recorder)
                lab.delete_tunnel(site.tunnel)
            except Exception as exc:
                errors.append(str(exc))
            self.session.hostnames.pop(site.hostname, None)
        for origin in self.origins:
            try:
                lab.stop(f"origin:{origin.name}")
            except Exception as exc:
                errors.append(str(exc))
        if self.faulted:
            try:
                lab.clear_faults()
            except Exception as exc:
                errors.append(str(exc))
        with contextlib.suppress(Exception):
            seen = lab.history(self.session.history_seen)
            if seen:
                self.session.history_seen = max(int(h["seq"]) for h in seen)
        if errors:
            pytest.fail("tunnel-lab: cleaning up after the test failed: " + "; ".join(errors), pytrace=False)


def _hostname_for(nodeid: str, n: int) -> str:
    """`test_name-N.lab.test`: readable in the edge's logs, one DNS label of at most 63 characters."""
    name = nodeid.rpartition("::")[2]
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:50].strip("-") or "test"
    return f"{label}-{n}.lab.test"


def _check_listening(url: str) -> None:
    """Fail at once, naming the address, when nothing listens where the test says its server is."""
    __tracebackhide__ = True
    m = re.match(r"(?:https?|tcp|ssh|rdp|smb)://(\[[^\]]+\]|[^/:]+):(\d+)", url)
    if m is None:
        if url.startswith("unix:") and not os.path.exists(url.split(":", 1)[1]):
            pytest.fail(f"{url}: no such socket; start the server before tunnel_lab.expose()", pytrace=False)
        return
    host, port = m.group(1).strip("[]"), int(m.group(2))
    try:
        with socket.create_connection((host, port), timeout=5):
            return
    except OSError as exc:
        why = exc.strerror or str(exc)
    pytest.fail(
        f"nothing answers at {host}:{port} ({why}): start the server before tunnel_lab.expose({url!r})",
        pytrace=False,
    )

"""The edge process: listeners, the connection nursery, faults that act on listeners, shutdown.

Structure (hypercorn-style graceful shutdown): every connection handler runs in `handlers`, a nursery
that outlives the listeners. Shutdown stops the listeners, lets in-flight tunnel streams finish
within `shutdown_timeout`, sends GOAWAY, closes, then cancels whatever is left.

`Edge` owns the process-wide parts (listeners, PKI, nurseries); the handlers get only what they use:
the shared `EdgeState`, plus the eyeball certificates (HTTPS) or the `EdgeControl` interface (API).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from tunnel_lab.edge import api, warp
from tunnel_lab.edge.config import Address, EdgeConfig, TunnelListen, changed_knobs
from tunnel_lab.edge.eyeball_h1 import handle_h1_connection
from tunnel_lab.edge.eyeball_tls import EyeballCertificates, handle_tls_connection
from tunnel_lab.edge.state import EdgeState, Faults, History, Metrics, Registry, TunnelsView
from tunnel_lab.edge.tunnel import H2TunnelConnection
from tunnel_lab.lab import paths
from tunnel_lab.lab.pki import LabPKI
from tunnel_lab.transport.tls import TLSStream, honour_keylog
from tunnel_lab.transport.trace import Tracer, open_tracer
from tunnel_lab.transport.tunnel import TunnelConnection

log = logging.getLogger(__name__)


# accept(2) errors that mean "out of descriptors or memory for now" (trio.serve_listeners' list): the
# listener backs off and tries again instead of ending the edge.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class PatientListener(trio.abc.Listener[trio.SocketStream]):
    """A socket listener for `trio.serve_listeners` that waits out a lack of descriptors or memory itself.

    serve_listeners would retry too, but logs a traceback at ERROR every 100 ms; this logs once at
    WARNING, waits `retry_delay` between tries (connections already open go on being served), and logs
    the recovery.
    """

    def __init__(self, listener: trio.SocketListener, what: str, retry_delay: float) -> None:
        self.listener = listener
        self.what = what
        self.retry_delay = retry_delay

    async def accept(self) -> trio.SocketStream:
        refused = 0
        while True:
            try:
                stream = await self.listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                if not refused:
                    log.warning("%s listener cannot accept: %s (%s); open connections are served, new ones "
                                "wait (retrying every %gs)", self.what, errno.errorcode[exc.errno],
                                os.strerror(exc.errno), self.retry_delay)
                refused += 1
                await trio.sleep(self.retry_delay)
                continue
            if refused:
                log.warning("%s listener accepting again after %d failed accepts", self.what, refused)
            return stream

    async def aclose(self) -> None:
        await self.listener.aclose()


class TunnelListener:
    """One data centre: a TLS listener for connectors, stoppable and restartable (dc-down/dc-up)."""

    def __init__(self, spec: TunnelListen) -> None:
        self.location = spec.location
        self.host = spec.address.host
        self.port = spec.address.port
        self.cert_kind = "valid"
        self.ssl_context: ssl.SSLContext | None = None
        self.scope: trio.CancelScope | None = None
        self.up = False
        self.closed = trio.Event()  # set when the listening socket is closed (re-armed on start)
        self.quic_address = ""  # the UDP QUIC listener beside it ("" when there is none)

    @property
    def address(self) -> str:
        return str(Address(self.host, self.port))


class Edge:
    """The running edge: the listeners, the PKI and the nurseries everything runs in; `state` is what the
    handlers share. Implements `edge.api.EdgeControl` for the management API."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.state_dir = paths.state_dir(config.state_dir)
        self.pki = LabPKI(self.state_dir)
        self.state: EdgeState[TunnelConnection] = EdgeState(
            config=config, tunnels=TunnelsView(self.state_dir),
            default_location=config.tunnel_listens[0].location if config.tunnel_listens else "LAB")
        self.eyeball_certs = EyeballCertificates(self.pki, self.state.tunnels,
                                                 max_on_demand=config.max_on_demand_certs)
        self.listeners = {spec.location: TunnelListener(spec) for spec in config.tunnel_listens}
        self._api_token = paths.api_token(self.state_dir)
        self.udp_forwards: list[dict[str, str]] = []  # `--udp-forward` and API-made UDP ports
        self.bound: dict[str, str | None] = {"http": None, "https": None, "warp": None, "api": None}
        self.eyeballs: dict[str, list[str]] = {"http": [], "https": []}  # every eyeball listener, in order
        self._handlers: trio.Nursery | None = None
        self._listener_nursery: trio.Nursery | None = None
        self._shutdown = trio.Event()
        self.stopped = trio.Event()
        self.state.trace = self._open_tracer()

    # ---- the shared state, for tests and embedders ----------------------------------------------
    @property
    def registry(self) -> Registry[TunnelConnection]:
        return self.state.registry

    @property
    def tunnels(self) -> TunnelsView:
        return self.state.tunnels

    @property
    def faults(self) -> Faults:
        return self.state.faults

    @property
    def history(self) -> History:
        return self.state.history

    @property
    def metrics(self) -> Metrics:
        return self.state.metrics

    @property
    def pushed_configs(self) -> dict[str, bytes]:
        return self.state.pushed_configs

    # ---- EdgeControl (the management API) --------------------------------------------------------
    @property
    def api_token(self) -> str:
        return self._api_token

    @property
    def ca_pem_path(self) -> Path:
        return self.pki.ca_pem_path

    def locations(self) -> list[str]:
        """The data centres' location names."""
        return list(self.listeners)

    def processes(self) -> list[dict[str, Any]]:
        """`GET /processes`: this one process (edge/cluster.py lists its workers)."""
        return [{"worker": 0, "pid": os.getpid(), "alive": True, "exit_code": None,
                 "locations": self.locations(), "forward": None}]

    async def refresh(self) -> None:
        """The state the API reads is this process's own: nothing to pull."""

    async def publish(self) -> None:
        """The faults act here already: nothing to push."""

    # ---- helpers -----------------------------------------------------------------------------
    def _open_tracer(self) -> Tracer | None:
        """`--trace`: the edge's tracer, with the ring the live view reads; None without it."""
        return open_tracer(self.config.trace, component="edge", ring=True)

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown."""
        self._shutdown.set()

    def edge_ssl_context(self, cert_kind: str) -> ssl.SSLContext:
        """The tunnel listeners' context: the edge certificate or a broken one (swap-cert)."""
        ctx = self.pki.server_ssl_context("edge", broken=None if cert_kind == "valid" else cert_kind)
        if self.state.trace is not None:
            ctx.sni_callback = _note_sni  # the server side of `ssl` shows the SNI only to this callback
        return honour_keylog(ctx)  # $SSLKEYLOGFILE: a capture of the tunnel decrypts (docs/trace.md)

    # ---- main --------------------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[Edge] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until `request_shutdown`; then drain and return."""

        try:
            await self._serve(task_status)
        finally:
            if self.state.trace is not None:
                self.state.trace.close()
            self.stopped.set()

    async def _serve(self, task_status: trio.TaskStatus[Edge]) -> None:
        cfg = self.config
        state = self.state
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            async with trio.open_nursery() as listeners:
                self._listener_nursery = listeners
                for lst in self.listeners.values():
                    await listeners.start(self._serve_tunnel_listener, lst)
                    if cfg.quic:
                        from tunnel_lab.edge.quic import serve_quic_endpoint

                        lst.quic_address = await listeners.start(serve_quic_endpoint, state, self.pki, lst,
                                                                 self._handlers.start_soon,
                                                                 paths.quic_reset_key(self.state_dir))
                for address in cfg.http_listens:
                    self.eyeballs["http"].append(await listeners.start(
                        self._serve_tcp, address, "http",
                        lambda s, peer: handle_h1_connection(state, s, scheme="http", client=_fmt(peer),
                                                             client_ip=peer[0])))
                for address in cfg.https_listens:
                    self.eyeballs["https"].append(await listeners.start(
                        self._serve_tcp, address, "https",
                        lambda s, peer: handle_tls_connection(state, self.eyeball_certs, s, peer)))
                for what, bound in self.eyeballs.items():  # the first under the key readers expect
                    self.bound[what] = bound[0] if bound else None
                if cfg.warp_listen is not None:
                    self.bound["warp"] = await listeners.start(
                        self._serve_tcp, cfg.warp_listen, "warp",
                        lambda s, peer: warp.handle_warp_connection(state, s, peer))
                for listen, dest in cfg.udp_forwards:
                    await self.start_udp_forward(listen, dest)
                if cfg.api_listen is not None:
                    self.bound["api"] = await listeners.start(
                        self._serve_tcp, cfg.api_listen, "api",
                        lambda s, peer: api.handle_api_connection(state, self, s, peer))
                listeners.start_soon(self._watch_store)
                self._write_ready()
                self._log_startup()
                task_status.started(self)
                await self._shutdown.wait()
                log.info("shutting down: listeners closed, draining %d tunnel connections",
                         len(self.registry.all()))
                listeners.cancel_scope.cancel()
            await self._drain_all()
            handlers.cancel_scope.cancel()
        log.info("edge stopped")

    async def _watch_store(self) -> None:
        """Close the live connections of tunnels deleted from the store while the edge runs.

        One cheap query (the store's version counter) per interval; the tunnels are looked up only
        after a change.
        """
        store = self.tunnels.store
        seen: int | None = None
        while True:
            try:
                version = store.version()
                if version != seen:
                    seen = version
                    self.close_deleted_tunnels()
            except Exception as exc:  # a locked or broken database must not stop the edge
                log.warning("store check failed: %s", exc)
            await trio.sleep(self.config.store_check_interval)

    def close_deleted_tunnels(self) -> int:
        """Drop every registered connection whose tunnel is no longer in the store."""
        known: dict[Any, bool] = {}
        closed = 0
        for conn in self.registry.all():
            reg = conn.registration
            if reg is None or conn.closed.is_set():
                continue
            if reg.tunnel_id not in known:
                known[reg.tunnel_id] = self.tunnels.by_id(reg.tunnel_id) is not None
            if not known[reg.tunnel_id]:
                log.info("tunnel deleted from the store: closing the connection %s", conn.ident())
                conn.abort("tunnel deleted")
                closed += 1
        return closed

    async def _drain_all(self) -> None:
        conns = self.registry.all()
        if not conns:
            return
        with trio.move_on_after(self.config.shutdown_timeout + 3):
            async with trio.open_nursery() as nursery:
                for conn in conns:
                    conn.state = "draining" if conn.state == "registered" else conn.state
                    nursery.start_soon(conn.drain_and_close, self.config.shutdown_timeout,
                                       "edge shutting down")

    # ---- listeners ---------------------------------------------------------------------------
    async def _open(self, host: str, port: int, what: str) -> list[PatientListener]:
        sockets = await trio.open_tcp_listeners(port, host=host)
        return [PatientListener(sock, what, self.config.accept_retry_delay) for sock in sockets]

    async def _serve_listeners(self, handler: Callable[[trio.SocketStream], Awaitable[None]],
                               listeners: list[PatientListener]) -> None:
        """Accept on every socket until cancelled; handlers run in the handler nursery, which outlives
        the listeners (graceful shutdown)."""
        assert self._handlers is not None
        accepting: list[trio.abc.Listener[trio.SocketStream]] = list(listeners)
        try:
            await trio.serve_listeners(handler, accepting, handler_nursery=self._handlers)
        finally:
            for lst in listeners:  # already closed unless cancelled before serve_listeners took them
                with trio.CancelScope(shield=True):
                    await lst.aclose()

    async def _serve_tcp(self, address: Address, what: str,
                         handler: Callable[[trio.SocketStream, Any], Awaitable[None]],
                         task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await self._open(address.host, address.port, what)
        host, port = listeners[0].listener.socket.getsockname()[:2]

        async def guarded(stream: trio.SocketStream) -> None:
            await _guard(handler, stream, _peer(stream), what)

        task_status.started(str(Address(host, port)))  # the sockets listen already: connections queue
        await self._serve_listeners(guarded, listeners)

    async def _serve_tunnel_listener(self, lst: TunnelListener,
                                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        lst.ssl_context = self.edge_ssl_context(lst.cert_kind)
        listeners = await self._open(lst.host, lst.port, f"tunnel {lst.location}")
        lst.port = listeners[0].listener.socket.getsockname()[1]
        lst.up = True
        lst.closed = trio.Event()

        async def handle(tcp: trio.SocketStream) -> None:
            await self._handle_tunnel(tcp, lst)

        try:
            with trio.CancelScope() as scope:
                lst.scope = scope
                task_status.started()
                await self._serve_listeners(handle, listeners)
        finally:
            lst.up = False
            lst.closed.set()

    async def _handle_tunnel(self, tcp: trio.SocketStream, lst: TunnelListener) -> None:
        try:
            await self._tunnel_connection(tcp, lst)
        finally:
            # Whatever happened (even cancellation at shutdown), the socket is closed.
            with trio.CancelScope(shield=True):
                await tcp.aclose()

    async def _tunnel_connection(self, tcp: trio.SocketStream, lst: TunnelListener) -> None:
        peer = _fmt(_peer(tcp))
        assert lst.ssl_context is not None
        tls = TLSStream(tcp, lst.ssl_context, server_side=True)
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__ or exc
            log.info("TLS handshake with a connector failed: %s location=%s remote=%s",
                     cause or type(exc).__name__, lst.location, peer)
            return
        conn = H2TunnelConnection(self.state, tls, location=lst.location, remote=peer)
        if conn.trace is not None:
            conn.trace.tls(tls.ssl_object, side="server", sni=getattr(tls.ssl_object, "traced_sni", None))
        log.info("connector connected location=%s remote=%s conn=#%d", lst.location, peer, conn.serial)
        self.registry.add(conn)
        await conn.run()

    # ---- faults acting on listeners ---------------------------------------------------------
    async def dc_down(self, location: str) -> int:
        """Stop a data centre's listener and close its connections. Returns connections closed."""
        lst = self.listeners[location]
        if lst.scope is not None:
            lst.scope.cancel()
            lst.scope = None
        # Let the listener's finally close the socket before we report success.
        if lst.up:
            with trio.move_on_after(2):
                await lst.closed.wait()
        closed = 0
        for conn in self.registry.all():
            if conn.location == location:
                conn.abort(f"data centre {location} taken down")
                closed += 1
        log.warning("fault dc-down: location=%s listener %s stopped, %d connections closed",
                    location, lst.address, closed)
        return closed

    async def dc_up(self, location: str) -> None:
        """Start a data centre's listener again, on the same address."""
        lst = self.listeners[location]
        if lst.up:
            return
        assert self._listener_nursery is not None
        await self._listener_nursery.start(self._serve_tunnel_listener, lst)
        log.warning("fault dc-up: location=%s listening again on %s", location, lst.address)

    def swap_cert(self, location: str, kind: str) -> None:
        """Serve a (broken) certificate on a data centre's listener from the next handshake on."""
        lst = self.listeners[location]
        lst.cert_kind = kind
        lst.ssl_context = self.edge_ssl_context(kind)

    # ---- ready file and start-up lines --------------------------------------------------------
    async def start_udp_forward(self, listen: tuple[str, int], dest: tuple[str, int], *,
                                drop_every: int = 0) -> dict[str, str]:
        """A UDP port forwarding into the tunnel routed to `dest` (edge/udp.py); lives with the listeners."""
        from functools import partial

        from tunnel_lab.edge.udp import serve_udp_forward

        assert self._listener_nursery is not None
        bound = await self._listener_nursery.start(partial(serve_udp_forward, drop_every=drop_every),
                                                   self.state, listen, dest)
        forward = {"listen": bound, "destination": f"{dest[0]}:{dest[1]}"}
        self.udp_forwards.append(forward)
        return forward

    def ready_info(self) -> dict[str, Any]:
        """What the ready file and STATE/edge.json hold."""
        return {
            "pid": os.getpid(),
            "tunnel_listeners": [{"location": lst.location, "address": lst.address,
                                  "quic": lst.quic_address} for lst in self.listeners.values()],
            "http": self.bound["http"], "https": self.bound["https"], "warp": self.bound["warp"],
            "http_listeners": self.eyeballs["http"], "https_listeners": self.eyeballs["https"],
            "udp_forwards": self.udp_forwards,
            "api": self.bound["api"], "api_token": self.api_token,
            "ca": str(self.pki.ca_pem_path),
        }

    def _write_ready(self) -> None:
        info = json.dumps(self.ready_info(), indent=2) + "\n"
        targets = [paths.edge_json_path(self.state_dir)]
        if self.config.ready_file is not None:
            targets.append(Path(self.config.ready_file))
        for target in targets:
            _write_atomic(target, info)

    def _log_startup(self) -> None:
        for lst in self.listeners.values():
            log.info("tunnel listener location=%s address=%s (TLS, SNI h2.cftunnel.com)", lst.location,
                     lst.address)
        for what in ("http", "https", "warp", "api"):
            for address in self.eyeballs.get(what, [self.bound[what]]):
                if address:
                    log.info("%s listener address=%s", what, address)
        log.info("lab CA: %s (fingerprint %s)", self.pki.ca_pem_path, self.pki.ca_fingerprint())
        for name, value, default in changed_knobs(self.config):
            log.info("knob %s=%s (default %s)", name, value, default)


def _note_sni(ssl_object: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
    """Keep the SNI a connector sent, for its `tls.handshake` trace record (only with --trace; returning
    None lets the handshake go on unchanged)."""
    ssl_object.traced_sni = server_name


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ready-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _peer(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        addr = stream.socket.getpeername()
        return str(addr[0]), int(addr[1])
    except OSError:
        return "0.0.0.0", 0


def _fmt(peer: tuple[str, int]) -> str:
    return str(Address(peer[0], peer[1]))


async def _guard(handler: Callable[[trio.SocketStream, Any], Awaitable[None]], stream: trio.SocketStream,
                 peer: Any, what: str) -> None:
    """A connection handler's failure never reaches the server (serve_listeners closes the socket)."""
    try:
        await handler(stream, peer)
    except Exception:
        log.exception("%s connection handler failed remote=%s", what, _fmt(peer))


async def serve_edge(config: EdgeConfig, *, task_status: trio.TaskStatus[Edge] = trio.TASK_STATUS_IGNORED
                     ) -> None:
    """Build and run an edge (for tests: `edge = await nursery.start(serve_edge, config)`)."""
    edge = Edge(config)
    await edge.serve(task_status=task_status)

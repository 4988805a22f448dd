"""`run_tunnel`: the connector process once its settings are resolved (our `cloudflared tunnel run`).

One nursery holds the metrics server, the signal watcher, the supervisor (HA edge connections, see
`connector.supervisor`) and whatever the stream handlers start (the hello-world origin). SIGTERM/SIGINT
start a graceful shutdown (unregister every connection, let in-flight streams finish within
`--grace-period`, exit 0); a second signal ends the process at once.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

import trio

from tunnel_lab.connector.logging_setup import format_value as q
from tunnel_lab.connector.settings import HTTPService, IngressRule, StatusService, TunnelSettings
from tunnel_lab.connector.state import ConnectorState
from tunnel_lab.connector.streams import Proxy
from tunnel_lab.connector.supervisor import Supervisor
from tunnel_lab.wire.errors import TunnelLabError

log = logging.getLogger(__name__)

_SIGNAL_NAMES: dict[int, str] = {signal.SIGTERM: "terminated", signal.SIGINT: "interrupt"}


def _make_state(settings: TunnelSettings) -> ConnectorState:
    """The metrics server's view, with the local configuration installed as version -1."""
    state = ConnectorState(connector_id=settings.connector_id, tunnel_id=settings.credentials.tunnel_id,
                           version=settings.version, quick_tunnel_url=settings.quick_tunnel_url,
                           cli_flags=dict(settings.diag_flags))
    try:
        local = json.loads(settings.local_config_json or b"{}")
    except ValueError:
        local = {}
    if isinstance(local, dict):
        state.set_config(-1, {k: v for k, v in local.items() if k != "__configuration_flags"})
    return state


class TunnelHandle:
    """What `run_tunnel` hands to `task_status.started`: lets tests and embedders watch and stop it."""

    def __init__(self, supervisor: Supervisor, proxy: Proxy, state: ConnectorState,
                 metrics_address: str | None) -> None:
        self.supervisor = supervisor
        self.proxy = proxy
        self.state = state
        self.metrics_address = metrics_address

    @property
    def ready_connections(self) -> int:
        return self.supervisor.ready_connections

    def shutdown(self) -> None:
        """Start a graceful shutdown, as the first SIGTERM does."""
        self.supervisor.shutdown.set()

    def kill(self, code: int = 1) -> None:
        """Stop at once, as a second signal does."""
        self.supervisor.fail(code)


async def _watch_signals(supervisor: Supervisor) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = _SIGNAL_NAMES.get(signum, str(signum))
            if not supervisor.shutdown.is_set():
                log.info("Initiating graceful shutdown due to signal %s ...", name)
                supervisor.shutdown.set()
            else:
                log.warning("Received signal %s again, exiting now", name)
                supervisor.fail(128 + int(signum))
                return


async def _start_management(nursery: trio.Nursery, settings: TunnelSettings, proxy: Proxy,
                            state: ConnectorState) -> None:
    """cloudflared's management service behind its internal ingress rule (connector/management.py)."""
    from tunnel_lab.connector import management

    hub = management.ManagementHub()
    config = management.ManagementConfig(connector_id=str(settings.connector_id), label=settings.label,
                                         diagnostics=settings.management_diagnostics,
                                         service_ip=settings.edge_addrs[0] if settings.edge_addrs else None)
    host, port = await nursery.start(management.serve_management, hub, config, state)
    proxy.internal_rules = (IngressRule(index=-1, hostname=settings.management_hostname, path=None,
                                        service=HTTPService(scheme="http", host=host, port=port),
                                        service_text="management"),)
    management.install(hub)
    nursery.start_soon(_uninstall_at_exit, hub)


async def _uninstall_at_exit(hub: Any) -> None:
    from tunnel_lab.connector import management

    try:
        await trio.sleep_forever()
    finally:
        management.uninstall(hub)


async def run_tunnel(settings: TunnelSettings, *, task_status: Any = trio.TASK_STATUS_IGNORED,
                     handle_signals: bool = True, stdin: trio.abc.ReceiveStream | None = None) -> int:
    """Run the connector until shutdown; returns the process exit code (0 graceful, 1 fatal error).

    With `settings.stdin_control`, commands are read from `stdin` (default: the process's stdin)."""
    state = _make_state(settings)
    log.info("Starting tunnel tunnelID=%s", settings.credentials.tunnel_id)
    if settings.post_quantum and settings.protocol != "quic":
        # over QUIC (qh3) X25519MLKEM768 is offered first; Python's ssl module has no such group
        log.warning("--post-quantum: this connector's http2 TLS stack offers no X25519MLKEM768 key exchange; "
                    "using the default groups")
    code = 0
    proxy: Proxy | None = None
    try:
        async with trio.open_nursery() as nursery:
            proxy = Proxy(settings, nursery, state)
            try:
                supervisor = Supervisor(settings, proxy, state)
            except TunnelLabError as exc:
                log.error("%s", exc)
                code = 1
                nursery.cancel_scope.cancel()
                return code
            metrics_address = None
            if settings.metrics:
                from tunnel_lab.connector.metrics import serve_metrics

                try:
                    host, port = await nursery.start(serve_metrics, settings.metrics, state)
                except (OSError, TunnelLabError) as exc:
                    log.error("Error opening metrics server listener error=%s", q(str(exc)))
                    nursery.cancel_scope.cancel()
                    return 1
                metrics_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            await _start_management(nursery, settings, proxy, state)
            if handle_signals and threading.current_thread() is threading.main_thread():
                nursery.start_soon(_watch_signals, supervisor)
            if settings.stdin_control:
                from tunnel_lab.connector.stdin_control import stdin_control

                nursery.start_soon(stdin_control, supervisor, stdin)
            task_status.started(TunnelHandle(supervisor, proxy, state, metrics_address))
            rules = settings.ingress_rules
            if (len(rules) == 1 and isinstance(rules[0].service, StatusService)
                    and rules[0].service.status == 503):
                log.warning("No ingress rules were defined in provided config (if any) nor from the cli, "
                            "cloudflared will return 503 for all incoming HTTP requests")
            code = await supervisor.run()
            nursery.cancel_scope.cancel()
    finally:
        if proxy is not None:
            with trio.CancelScope(shield=True):
                await proxy.pool.aclose()
    if code == 0:
        log.info("Tunnel server stopped")
    return code

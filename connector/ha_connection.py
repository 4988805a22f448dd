"""What the http2 and the QUIC connection to the edge share: `HAConnection`, one HA connection (connIndex)
as the supervisor sees it, whatever the transport underneath.

It holds the connection's identity (settings, connIndex, the edge address), its registration
(`connector.registration.RegistrationClient`, run by `_serve_control`), and its end: the first
`EdgeConnectionError` passed to `_fail` (or `drop`) is what `run` raises.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Self

import trio

from tunnel_lab.connector.edge_dial import split_host_port
from tunnel_lab.connector.edge_errors import EdgeConnectionError
from tunnel_lab.connector.registration import ControlChannel, RegistrationClient
from tunnel_lab.connector.settings import TunnelSettings
from tunnel_lab.connector.state import ConnectorState
from tunnel_lab.transport.trace import ConnTrace
from tunnel_lab.wire import registration as reg


class HAConnection:
    """The transport-neutral part of `EdgeConnection` (http2) and `QuicEdgeConnection`."""

    protocol = ""  # as the registration log line names it

    def __init__(self, settings: TunnelSettings, *, conn_index: int, address: str, num_previous_attempts: int,
                 on_registered: Callable[[Self], None] | None,
                 on_unregistered: Callable[[Self], None] | None) -> None:
        self.settings = settings
        self.conn_index = conn_index
        self.address = address
        self.edge_ip = split_host_port(address)[0]
        self.num_previous_attempts = num_previous_attempts
        self.dead = False
        self.trace: ConnTrace | None = None  # the protocol trace of this connection (docs/trace.md)
        self.control: RegistrationClient[Self] | None = None
        self._on_registered = on_registered
        self._on_unregistered = on_unregistered
        self._failure: EdgeConnectionError | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def registered(self) -> bool:
        """Registered at the edge, and not unregistered or gone since."""
        return self.control is not None and self.control.registered

    @property
    def details(self) -> reg.ConnectionDetails | None:
        """What the edge answered to the registration (kept after the connection ended)."""
        return self.control.details if self.control is not None else None

    @property
    def label(self) -> str:
        return f"tunnel={self.settings.credentials.tunnel_id} connIndex={self.conn_index}"

    async def _serve_control(self: Self, channel: ControlChannel, shutdown: trio.Event, *, local_ip: str,
                             state: ConnectorState, wait_idle: Callable[[], Awaitable[object]],
                             active_streams: Callable[[], int]) -> None:
        """Register on the control stream, serve until `shutdown`, then unregister and let the in-flight
        streams end within the grace period."""
        assert self._nursery is not None
        control = self.control = RegistrationClient(
            channel, self.settings, self, conn_index=self.conn_index, edge_ip=self.edge_ip,
            protocol=self.protocol, on_registered=self._registered, on_unregistered=self._on_unregistered)
        await control.serve(self._nursery, shutdown, local_ip=local_ip,
                            num_previous_attempts=self.num_previous_attempts, state=state)
        await control.graceful_shutdown(wait_idle=wait_idle, active_streams=active_streams)

    def _registered(self, conn: Self) -> None:
        details = self.details
        if self.trace is not None and details is not None:
            self.trace.update(conn_uuid=str(details.uuid), dc=details.location_name)
        if self._on_registered:
            self._on_registered(conn)

    def _gone(self) -> None:
        """The connection ended: it no longer counts as registered."""
        self.dead = True
        if self.control is not None:
            self.control.unregistered()

    def drop(self, exc: EdgeConnectionError) -> bool:
        """End this connection from outside (`run` raises `exc`); False if not serving yet or dead."""
        if self.dead or self._nursery is None:
            return False
        self._fail(exc)
        return True

    def _fail(self, exc: EdgeConnectionError) -> None:
        """End the connection; the first failure is the one `run` raises."""
        if self._failure is None:
            self._failure = exc
        self.dead = True
        self._closing()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _closing(self) -> None:
        """What the transport does at once when the connection fails (before the tasks are cancelled)."""

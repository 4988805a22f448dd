"""What the running connector knows about itself, for the metrics server (`/ready`, `/metrics`, `/config`).

Plain data updated by the runtime (one trio thread, so no locks): connections register and unregister,
requests start and finish, remote configurations get applied. `connector.metrics` only reads it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ConnectionInfo:
    conn_index: int
    connection_id: str
    location: str
    edge_ip: str
    registered_at: float = field(default_factory=time.time)
    protocol: str = "http2"


@dataclass
class ConnectorState:
    """Counters and status of one connector process."""

    connector_id: uuid.UUID
    tunnel_id: uuid.UUID | None = None
    version: str = ""
    quick_tunnel_url: str = ""
    started_at: float = field(default_factory=time.time)
    connections: dict[int, ConnectionInfo] = field(default_factory=dict)
    locations_seen: dict[tuple[int, str], int] = field(default_factory=dict)  # (connIndex, location) -> 0/1
    total_requests: int = 0
    request_errors: int = 0
    concurrent_requests: int = 0
    max_concurrent_requests: int = 0
    responses_by_code: Counter[str] = field(default_factory=Counter)
    tcp_active_sessions: int = 0
    tcp_total_sessions: int = 0
    register_success: int = 0
    register_fail: Counter[str] = field(default_factory=Counter)  # cause -> count
    local_config_pushes: int = 0
    local_config_push_errors: int = 0
    config_version: int = -1
    # The /config body's "config": {"ingress": [...], "warp-routing": {...}, "originRequest": {...}}
    config: dict[str, Any] = field(default_factory=dict)
    # /diag/configuration: the set flags that cloudflared lists there (connector.diag), as strings
    cli_flags: dict[str, str] = field(default_factory=dict)

    # --- connections
    @property
    def ready_connections(self) -> int:
        return len(self.connections)

    def connection_registered(self, conn_index: int, connection_id: str, location: str, edge_ip: str,
                              protocol: str = "http2") -> None:
        self.connections[conn_index] = ConnectionInfo(conn_index, str(connection_id), location, edge_ip,
                                                      protocol=protocol)
        for key in list(self.locations_seen):
            if key[0] == conn_index:
                self.locations_seen[key] = 0
        self.locations_seen[(conn_index, location)] = 1
        self.register_success += 1

    def connection_unregistered(self, conn_index: int) -> None:
        self.connections.pop(conn_index, None)

    def registration_failed(self, cause: str) -> None:
        self.register_fail[cause] += 1

    # --- requests
    def request_started(self) -> None:
        self.total_requests += 1
        self.concurrent_requests += 1
        self.max_concurrent_requests = max(self.max_concurrent_requests, self.concurrent_requests)

    def request_finished(self, status: int | None = None, *, error: bool = False) -> None:
        self.concurrent_requests = max(0, self.concurrent_requests - 1)
        if status is not None:
            self.responses_by_code[str(status)] += 1
        if error:
            self.request_errors += 1

    def tcp_session_started(self) -> None:
        self.tcp_active_sessions += 1
        self.tcp_total_sessions += 1

    def tcp_session_finished(self) -> None:
        self.tcp_active_sessions = max(0, self.tcp_active_sessions - 1)

    # --- configuration
    def set_config(self, version: int, config: Any) -> None:
        """A remote configuration was applied (or the local one installed with version -1)."""
        self.config_version = version
        self.config = dict(config) if isinstance(config, dict) else {}

    def versioned_config(self) -> dict[str, Any]:
        """The `/config` body."""
        return {"version": self.config_version, "config": self.config}

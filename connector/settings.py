"""The connector's resolved settings: what the command line, config file and environment decided.

`connector.cli` builds a `TunnelSettings` (flags > environment > config file > defaults, as cloudflared
does) and hands it to `connector.runtime.run_tunnel`. Everything here is plain data, free of I/O.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from tunnel_lab.wire.credentials import Credentials

VERSION = "2026.8.2-lab"


@dataclass(frozen=True, kw_only=True)
class AccessConfig:
    """`originRequest.access`: require a valid `Cf-Access-Jwt-Assertion` (connector/access_jwt.py)."""

    required: bool = False
    team_name: str = ""
    aud_tag: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class OriginRequestConfig:
    """cloudflared's `originRequest` block; durations in seconds (defaults: docs/protocol.md §5.8)."""

    connect_timeout: float = 30.0
    tls_timeout: float = 10.0
    tcp_keep_alive: float = 30.0
    keep_alive_connections: int = 100
    keep_alive_timeout: float = 90.0
    http_host_header: str | None = None
    origin_server_name: str | None = None
    match_sni_to_host: bool = False
    ca_pool: str | None = None
    no_tls_verify: bool = False
    disable_chunked_encoding: bool = False
    http2_origin: bool = False
    access: AccessConfig | None = None


@dataclass(frozen=True, kw_only=True)
class HTTPService:
    """`http://`, `https://`, `ws://`, `wss://` origins (ws maps to http, wss to https)."""

    scheme: str  # "http" or "https" after the ws mapping
    host: str
    port: int
    unix_path: str | None = None  # `unix:PATH` / `unix+tls:PATH` (scheme http / https; host "", port 0)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


@dataclass(frozen=True, kw_only=True)
class StatusService:
    """`http_status:NNN`: answer every request with that status and no body."""

    status: int


@dataclass(frozen=True, kw_only=True)
class HelloWorldService:
    """`hello_world`: the connector's own HTTPS test origin."""


@dataclass(frozen=True, kw_only=True)
class StreamService:
    """`tcp://`, `ssh://`, `rdp://`, `smb://`: the connector terminates the WebSocket and pipes raw TCP."""

    scheme: str
    host: str
    port: int


Service = HTTPService | StatusService | HelloWorldService | StreamService


@dataclass(frozen=True, kw_only=True)
class IngressRule:
    """One ingress rule; `hostname` None matches any host, `path` is a regex source or None."""

    index: int
    hostname: str | None
    path: str | None
    service: Service
    service_text: str
    origin_request: OriginRequestConfig = field(default_factory=OriginRequestConfig)


@dataclass(frozen=True, kw_only=True)
class WarpRoutingConfig:
    connect_timeout: float = 5.0
    max_active_flows: int | None = None
    tcp_keep_alive: float = 30.0


@dataclass(frozen=True, kw_only=True)
class TunnelSettings:
    """Everything `run_tunnel` needs. `ingress_rules` is never empty: with no rules at all it holds one
    catch-all `StatusService(503)` (cloudflared's behaviour, docs/protocol.md §5.7)."""

    credentials: Credentials
    edge_addrs: tuple[str, ...]  # "host:port", in the order given
    # Discovered edges: each region's addresses, and --edge-ip-version (after --edge-bind-address) that
    # filters them; with --edge (no regions) the addresses alternate between two regions, always "auto"
    edge_regions: tuple[tuple[str, ...], ...] = ()
    edge_ip_version: str = "auto"
    ca_cert: str | None = None  # --cacert: the only roots for the edge when set
    ha_connections: int = 4
    metrics: str | None = None  # "host:port"
    grace_period: float = 30.0
    retries: int = 5
    rpc_timeout: float = 5.0
    max_edge_addr_retries: int = 8
    edge_bind_address: str | None = None
    loglevel: str = "info"
    ingress_rules: tuple[IngressRule, ...]
    warp_routing: WarpRoutingConfig = field(default_factory=WarpRoutingConfig)
    connector_id: uuid.UUID = field(default_factory=uuid.uuid4)
    features: tuple[str, ...] = (
        "allow_remote_config",
        "serialized_headers",
        "support_datagram_v2",
        "support_quic_eof",
        "management_logs",
    )
    version: str = VERSION
    arch: str = "linux_amd64"
    tags: tuple[tuple[str, str], ...] = ()
    local_config_json: bytes = b"{}"  # pushed with updateLocalConfiguration on connIndex 0
    post_quantum: bool = False
    stdin_control: bool = False  # --stdin-control: `reconnect [DURATION]` lines on stdin
    protocol: str = "http2"  # the transport to start with: "http2" or "quic" (connector/protocol.py)
    protocol_can_fall_back: bool = False  # QUIC may fall back to http2 (`--protocol auto` with a token)
    quick_tunnel_url: str = ""  # a quick tunnel's hostname (metrics /quicktunnel)
    # The management service (connector/management.py): requests for this hostname are answered here.
    management_hostname: str = "management.argotunnel.com"
    management_diagnostics: bool = True  # /metrics over the management service
    label: str = ""  # --label: /host_details says `custom:LABEL` instead of the host name
    diag_flags: tuple[tuple[str, str], ...] = ()  # /diag/configuration: set flags as strings (connector.diag)
    # Timing knobs (docs/connector.md, "Knobs"): no flag sets them; tests pass smaller values here.
    backoff_base: float = 1.0  # per-connIndex retry backoff: attempt k waits up to 2^k * base
    supervisor_backoff_base: float = 10.0  # extra wait after any failed connection (supervisor.py)
    ha_start_interval: float = 0.0  # between starting connIndex 1..N-1 (cloudflared: 1 s)
    # `--trace FILE`: the open transport.trace.Tracer (docs/trace.md), None when off; each hook checks it once
    trace: Any = field(default=None, compare=False, repr=False)

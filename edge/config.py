"""The edge's settings (a frozen dataclass built by the command line or by tests)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tunnel_lab.wire.errors import ConfigError


@dataclass(frozen=True)
class Address:
    """A host and port to listen on (port 0: any free port)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TunnelListen:
    """A tunnel listener: one "data centre" with its location name."""

    location: str
    address: Address


def parse_address(text: str, *, source: str) -> Address:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (loopback)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:  # `2001:db8::1:80` would split anywhere: say so rather than guess
            raise ConfigError(f"bad address {text!r}: an IPv6 address needs brackets", source=source,
                              hint="use [V6]:PORT, e.g. [::1]:0")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"bad address {text!r}", source=source, hint="use HOST:PORT, e.g. 127.0.0.1:0")
    return Address(host or "127.0.0.1", int(port))


def parse_listens(texts: list[str], *, source: str) -> tuple[Address, ...]:
    """A repeatable listen flag's addresses, in order (ConfigError on a bad or repeated one)."""
    addresses = tuple(parse_address(text, source=source) for text in texts)
    for i, address in enumerate(addresses):
        if address.port != 0 and address in addresses[:i]:
            raise ConfigError(f"{address} is given twice", source=source,
                              hint="name each address once (port 0 may repeat: each gets a free port)")
    return addresses


def parse_tunnel_listen(text: str, index: int) -> TunnelListen:
    """`LOC=HOST:PORT` or `HOST:PORT` (location `LAB<index>`)."""
    location, sep, rest = text.partition("=")
    if not sep:
        location, rest = f"LAB{index}", text
    location = location.strip()
    if not location or not location.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"bad location name {location!r}", source="--tunnel-listen",
                          hint="letters, digits, - and _ only, e.g. LAB1=127.0.0.1:7844")
    return TunnelListen(location, parse_address(rest, source="--tunnel-listen"))


@dataclass(frozen=True, kw_only=True)
class EdgeConfig:
    """Everything the edge needs to run; timeouts in seconds, sizes in bytes."""

    state_dir: Path
    tunnel_listens: tuple[TunnelListen, ...] = ()
    # Eyeball listeners (`--http-listen`, `--https-listen`, repeatable: e.g. an IPv4 and an IPv6 address).
    http_listens: tuple[Address, ...] = ()
    https_listens: tuple[Address, ...] = ()
    warp_listen: Address | None = None
    api_listen: Address | None = None
    ready_file: Path | None = None
    origin_timeout: float = 100.0  # 524 after this (Cloudflare's default is 100 s)
    max_response_headers: int = 256 * 1024  # the lab's per-stream limit (502 above it)
    max_request_headers: int = 32 * 1024  # eyeball request head limit (431 above it)
    stream_window: int = 1024 * 1024  # our INITIAL_WINDOW_SIZE on tunnel connections
    connection_window: int = 16 * 1024 * 1024
    registration_timeout: float = 30.0
    refusal_close_delay: float = 0.3
    drain_timeout: float = 30.0  # after unregisterConnection
    rpc_close_grace: float = 0.5  # after draining: wait this long for the connector's Abort
    shutdown_timeout: float = 10.0  # graceful shutdown: in-flight streams get this long
    stream_queue_limit: int = 256
    stream_queue_timeout: float = 10.0
    handshake_timeout: float = 10.0
    write_timeout: float = 30.0  # a peer that does not read for this long is disconnected
    eyeball_header_timeout: float = 15.0
    eyeball_idle_timeout: float = 60.0
    store_check_interval: float = 0.5  # store version reads: a deleted tunnel's connections close
    # Limits against hostile eyeballs (docs/edge.md, "Limits"); each is logged at WARNING when it trips.
    eyeball_max_streams: int = 100  # concurrent requests per HTTP/2 eyeball connection (incl. reset ones)
    eyeball_reset_limit: int = 200  # stream resets from one HTTP/2 eyeball per window: more -> GOAWAY
    eyeball_reset_window: float = 10.0
    max_on_demand_certs: int = 256  # unrouted SNI names that get a certificate of their own (per run)
    api_max_body: int = 1024 * 1024  # management API request bodies; over it: 413
    # `--udp-forward LISTEN=DEST`: UDP ports that forward into tunnel sessions (edge/udp.py)
    udp_forwards: tuple[tuple[tuple[str, int], tuple[str, int]], ...] = ()
    quic: bool = True  # a UDP QUIC listener beside each tunnel listener (same host and port; edge/quic.py)
    accept_retry_delay: float = 0.1  # out of file descriptors: accept again after this long
    trace: Path | None = None  # `--trace FILE`: the protocol trace (docs/trace.md)


# EdgeConfig fields no command-line flag sets (docs/edge.md, "Knobs" and "Limits"): tests and embedders
# pass them to the constructor; the edge logs every one that differs from its default when it starts.
KNOBS = (
    "max_request_headers", "stream_window", "connection_window", "registration_timeout",
    "refusal_close_delay", "rpc_close_grace", "stream_queue_limit", "stream_queue_timeout",
    "handshake_timeout", "write_timeout", "eyeball_header_timeout", "eyeball_idle_timeout",
    "store_check_interval", "eyeball_max_streams", "eyeball_reset_limit", "eyeball_reset_window",
    "max_on_demand_certs", "api_max_body", "accept_retry_delay",
)


def changed_knobs(config: EdgeConfig) -> list[tuple[str, Any, Any]]:
    """(name, value, default) of every knob set to something other than its default."""
    defaults = {f.name: f.default for f in fields(EdgeConfig)}
    return [(name, getattr(config, name), defaults[name]) for name in KNOBS
            if getattr(config, name) != defaults[name]]

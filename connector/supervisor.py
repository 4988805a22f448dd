"""HA connections: which address each connIndex uses, when it (re)connects, and when the process gives up.

cloudflared's rules (docs/protocol.md §9.1, §9.4-§9.6):
- connIndex 0 starts first; once it registered, connIndex 1..N-1 start (cloudflared: one per second, the
  first at once; we start them all at once, `TunnelSettings.ha_start_interval` = 0, so that all N are
  ready within a second);
- each connIndex holds its own address; dial/TLS errors and EDUPCONN move it to a free address;
- per-connIndex backoff: a random wait in [0, 2^k * base) with k = 1..retries, then capped; reset when the
  connection registers;
- then every failed connection, registered or not (a dial error too), logs `Connection terminated` and
  waits the supervisor backoff (`SupervisorBackoff`: base 10 s, same doubling, one timer shared by all
  connIndexes, reset after a grace time once all are back), except connIndex 0 while it is still in
  cloudflared's first-tunnel loop (`startFirstTunnel`): an error that loop retries (`retry_initial`: dial,
  EDUPCONN, control stream, and over QUIC the end of an established connection, `StreamListenerError`)
  reconnects after the per-connIndex backoff only; the first other error takes connIndex 0 out of that
  loop for good;
- `reconnect DELAY` (`--stdin-control`): the delay, the per-connIndex backoff, `Connection terminated`, then
  a new connection at once (no supervisor backoff); connIndex 0 leaves its first loop;
- before the very first registration, only "network" errors and `Unauthorized` are retried; anything else
  ends the process with exit code 1 (`initial tunnel connection failed`).
Unlike cloudflared, every retry waits: there is no busy loop even with a single edge address.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any

import trio

from tunnel_lab.connector.edge_addrs import EdgeAddresses, NoEdgeAddressesError
from tunnel_lab.connector.edge_conn import EdgeConnection
from tunnel_lab.connector.edge_dial import edge_ssl_context
from tunnel_lab.connector.edge_errors import (
    ConnectionLostError,
    DuplicateConnectionError,
    EdgeConnectionError,
    EdgeDialError,
    ReconnectSignal,
    RegistrationRefusedError,
    UnauthorizedError,
)
from tunnel_lab.connector.logging_setup import format_value as q
from tunnel_lab.connector.protocol import HTTP2, QUIC, QUIC_BROKEN_WARNING, ProtocolChoice, after_failure
from tunnel_lab.connector.registration import first_of
from tunnel_lab.connector.settings import TunnelSettings
from tunnel_lab.connector.state import ConnectorState
from tunnel_lab.connector.streams import Proxy
from tunnel_lab.wire.errors import TunnelLabError

log = logging.getLogger(__name__)

MIN_WAIT_FRACTION = 0.1  # never retry sooner than this fraction of the base: no busy loop
RegistrationErrors = (DuplicateConnectionError, RegistrationRefusedError, UnauthorizedError)
KNOBS = ("backoff_base", "supervisor_backoff_base", "ha_start_interval")  # TunnelSettings timing knobs


def log_knobs(settings: TunnelSettings) -> None:
    """Say which timing knob differs from its default (no flag sets them: only a test or an embedder)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TunnelSettings)}
    for name in KNOBS:
        value = getattr(settings, name)
        if value != defaults[name]:
            log.info("knob %s=%gs (default %gs)", name, value, defaults[name])


class Backoff:
    """Jittered exponential backoff: attempt k (1-based, capped at `retries`) waits up to 2^k * base."""

    def __init__(self, base: float, retries: int, rng: random.Random | None = None) -> None:
        self.base = base
        self.retries = max(retries, 1)
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_bound(self) -> float:
        k = min(self.attempts + 1, self.retries)
        return self.base * (2**k)

    def next_wait(self, *, after_reset: bool = False) -> tuple[float, float]:
        """(wait, shown): the random wait for the next retry and the bound cloudflared's log line states.

        cloudflared's line is off in two places, kept for log readers: right after a reset (a connection
        that had registered) it says `base` (the real bound is 2 * base), and once capped it says twice the
        real bound (1m4s for 32 s)."""
        capped = self.attempts >= self.retries
        bound = self.next_bound()
        self.attempts += 1
        wait = max(self._rng.uniform(0, bound), self.base * MIN_WAIT_FRACTION)
        shown = self.base if after_reset else (2 * bound if capped else bound)
        return wait, shown

    def reset(self) -> None:
        self.attempts = 0


class SupervisorBackoff:
    """The supervisor's one backoff, shared by every connIndex, as data (docs/protocol.md §9.4).

    cloudflared's supervisor Run loop (supervisor/supervisor.go) and retry.BackoffHandler: a connection that
    ends (registered or not) joins the pending timer, or starts one: attempt k (capped at `retries`) waits a
    random time in [0, 2^k * base). Every connIndex waiting restarts when the timer fires. The count resets
    only lazily: once every connection the supervisor (re)started has registered and none waits, a grace
    deadline is drawn in [0, 2^(k+2) * base) from then, and the first draw after that deadline starts from
    k = 1 again. Times are the caller's clock (`now`); no I/O, no sleeping.
    """

    def __init__(self, base: float, retries: int, rng: random.Random | None = None) -> None:
        self.base = base
        self.retries = max(retries, 0)
        self.attempts = 0
        self.timer_at: float | None = None  # when the pending timer fires
        self.reset_at: float | None = None  # the grace deadline: the next draw after it resets the count
        self.waiting: set[int] = set()  # connIndexes waiting for the timer
        self.connecting: set[int] = set()  # (re)started by the supervisor, not registered yet
        self._rng = rng or random.Random()

    def started(self, index: int) -> None:
        """connIndex `index` was started outside the timer (connIndex 1..N-1 at first, a reconnect signal)."""
        self.connecting.add(index)

    def terminated(self, index: int, now: float) -> float:
        """connIndex `index` ended with an error: the time at which it starts again."""
        self._fire(now)
        self.connecting.discard(index)
        self.waiting.add(index)
        if self.timer_at is None:
            if self.reset_at is not None and now > self.reset_at:
                self.attempts = 0
                self.reset_at = None
            if self.attempts < self.retries:
                self.attempts += 1
            self.timer_at = now + self._rng.uniform(0, self.base * 2**self.attempts)
        return self.timer_at

    def registered(self, index: int, now: float) -> float | None:
        """connIndex `index` registered: the grace deadline drawn if it was the last one outstanding."""
        self._fire(now)
        if index not in self.connecting:
            return None  # connIndex 0 in its first loop: the supervisor does not watch it
        self.connecting.discard(index)
        if self.connecting or self.waiting:
            return None
        self.reset_at = now + self._rng.uniform(0, self.base * 2 ** (self.attempts + 2))
        return self.reset_at

    def _fire(self, now: float) -> None:
        # The timer fires once for all: whoever waited is connecting again, whether or not its own task
        # has woken up yet.
        if self.timer_at is not None and now >= self.timer_at:
            self.connecting |= self.waiting
            self.waiting.clear()
            self.timer_at = None


def _duration(seconds: float) -> str:
    """Go's Duration.String() for whole seconds and minutes (4s, 1m4s); fractions for tiny test values."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if float(seconds).is_integer():
        s = int(seconds)
        return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"
    return f"{seconds:g}s"


# Kept under its old name for callers and tests (connector/edge_addrs.py holds the model).
AddressPool = EdgeAddresses.static


class Supervisor:
    """Runs the HA connections until shutdown; `run` returns the process exit code."""

    def __init__(self, settings: TunnelSettings, proxy: Proxy, state: ConnectorState | None = None) -> None:
        self.settings = settings
        self.proxy = proxy
        self.addresses = (EdgeAddresses.discovered(settings.edge_regions, settings.edge_ip_version)
                          if settings.edge_regions else EdgeAddresses.static(settings.edge_addrs))
        available = self.addresses.available()
        self.ha = max(1, min(settings.ha_connections, available))
        if settings.ha_connections > available:
            log.warning("You requested %d HA connections but I can give you at most %d.",
                        settings.ha_connections, available)
        log_knobs(settings)
        self.shutdown = trio.Event()
        self.connections: dict[int, EdgeConnection] = {}
        self.ever_registered = False
        self.connected_with_quic = False  # some connection registered over QUIC: no fallback any more
        self._first_registered = trio.Event()
        self._first_loop = True  # connIndex 0 is in cloudflared's startFirstTunnel loop
        self.state = state
        self._ready = 0
        self._exit_code = 0
        self._supervisor_backoff = SupervisorBackoff(settings.supervisor_backoff_base, settings.retries)
        self._ssl_context = edge_ssl_context(settings.ca_cert)
        self._nursery: trio.Nursery | None = None

    @property
    def ready_connections(self) -> int:
        return self._ready

    def _next_protocol(self, protocol: str, error: EdgeConnectionError, backoff: Backoff, index: int,
                       may_fall_back: bool, ip: str) -> str:
        """cloudflared's selectNextProtocol: QUIC falls back to http2 (docs/connector.md, "Protocols")."""
        from tunnel_lab.connector.quic_conn import QuicIdleTimeoutError

        decision = after_failure(
            ProtocolChoice(self.settings.protocol, self.settings.protocol_can_fall_back), protocol,
            may_fall_back=may_fall_back, attempts=backoff.attempts, retries=backoff.retries,
            quic_broken=isinstance(error, QuicIdleTimeoutError) or getattr(error, "quic_broken", False),
            connected_with_quic=self.connected_with_quic)
        if decision.warn_quic_broken:
            log.warning("%s connIndex=%d event=0 ip=%s", QUIC_BROKEN_WARNING, index, ip)
        if not decision.switch:
            return protocol
        log.info("Switching to fallback protocol %s connIndex=%d event=0 ip=%s", HTTP2, index, ip)
        backoff.reset()
        return HTTP2

    def _registered(self, conn: EdgeConnection) -> None:
        if getattr(conn, "protocol", HTTP2) == QUIC:
            self.connected_with_quic = True
        self.ever_registered = True
        self._first_registered.set()
        self._ready += 1
        grace = self._supervisor_backoff.registered(conn.conn_index, trio.current_time())
        if grace is not None:
            log.debug("Supervisor backoff: every connection is back, count resets after %.1fs",
                      grace - trio.current_time())
        if self.state is not None and conn.details is not None:
            details = conn.details
            self.state.connection_registered(conn.conn_index, str(details.uuid), details.location_name,
                                             conn.edge_ip, getattr(conn, "protocol", HTTP2))

    def _conn_aware_level(self) -> int:
        # cloudflared's ConnAwareLogger: an error while no connection is registered, else a warning
        return logging.WARNING if self._ready else logging.ERROR

    def _unregistered(self, conn: EdgeConnection) -> None:
        self._ready = max(0, self._ready - 1)
        if self.state is not None:
            self.state.connection_unregistered(conn.conn_index)

    async def run(self) -> int:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._run_index, 0)
            nursery.start_soon(self._start_others)
        if self._exit_code == 0:
            log.error("no more connections active and exiting")  # cloudflared's conn-aware level: none left
        return self._exit_code

    async def _start_others(self) -> None:
        if self.ha <= 1:
            return
        await first_of(self._first_registered.wait, self.shutdown.wait)
        if self.shutdown.is_set() or not self._first_registered.is_set():
            return
        assert self._nursery is not None
        for index in range(1, self.ha):
            if self.shutdown.is_set():
                return
            self._supervisor_backoff.started(index)
            self._nursery.start_soon(self._run_index, index)
            if index < self.ha - 1:
                await trio.sleep(self.settings.ha_start_interval)

    def reconnect(self, delay: float) -> int | None:
        """`--stdin-control`'s `reconnect DURATION`: drop one registered connection (the lowest connIndex);
        it reconnects after `delay` without backoff. Returns the connIndex dropped (None: none serving)."""
        for index in sorted(self.connections):
            conn = self.connections[index]
            if conn.registered and conn.drop(ReconnectSignal(delay)):
                return index
        return None

    async def _reconnect_signalled(self, index: int, signal: ReconnectSignal, conn: EdgeConnection,
                                   backoff: Backoff) -> None:
        """After `reconnect DELAY` (docs/protocol.md §9.7): the delay, then the per-connIndex backoff as
        after any other error (same address; it counts an attempt), then the supervisor's line and an
        immediate restart, which also takes connIndex 0 out of its first loop."""
        log.info("Restarting connection due to reconnect signal in %s connIndex=%d event=0 ip=%s",
                 _duration(signal.delay) if signal.delay else "0s", index, conn.edge_ip)
        with trio.move_on_after(signal.delay):
            await self.shutdown.wait()
        if self.shutdown.is_set():
            return
        if conn.details is not None:
            backoff.reset()
        wait, shown = backoff.next_wait(after_reset=conn.details is not None)
        log.info("Retrying connection in up to %s connIndex=%d event=0 ip=%s", _duration(shown), index,
                 conn.edge_ip)
        with trio.move_on_after(wait):
            await self.shutdown.wait()
        if self.shutdown.is_set():
            return
        log.log(self._conn_aware_level(), "Connection terminated error=%s connIndex=%d", q(str(signal)),
                index)
        if index == 0:
            self._first_loop = False
        self._supervisor_backoff.started(index)

    def fail(self, code: int) -> None:
        """End every connection at once (fatal error or a second signal)."""
        self._exit_code = code
        self.shutdown.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _run_index(self, index: int) -> None:
        backoff = Backoff(self.settings.backoff_base, self.settings.retries)
        try:
            address = self.addresses.take(index)
        except NoEdgeAddressesError as exc:  # e.g. --edge-ip-version 6 and no AAAA record
            if not self.ever_registered:
                log.error("initial tunnel connection failed error=%s", q(str(exc)))
                log.error("Initiating shutdown error=%s", q(str(exc)))
                self.fail(1)
            return
        protocol = self.settings.protocol
        dial_failures = 0
        while not self.shutdown.is_set():
            conn = new_connection(protocol, self.settings, self.proxy, conn_index=index, address=address,
                                  ssl_context=self._ssl_context, num_previous_attempts=backoff.attempts,
                                  on_registered=self._registered, on_unregistered=self._unregistered)
            self.connections[index] = conn
            try:
                await conn.run(self.shutdown)
                log.log(self._conn_aware_level(), "Connection terminated connIndex=%d", index)
                return  # graceful shutdown
            except EdgeConnectionError as exc:
                error = exc
            except TunnelLabError as exc:  # e.g. a bad edge address: retried like a lost connection
                error = ConnectionLostError(str(exc))
            except Exception as exc:  # a bug must not take the other connections down with it
                log.exception("Connection crashed connIndex=%d", index)  # a bug: the traceback helps
                error = ConnectionLostError(f"internal error: {exc!r}")
            finally:
                self.connections.pop(index, None)
            if self.shutdown.is_set():
                return
            was_registered = conn.details is not None
            if isinstance(error, ReconnectSignal):
                await self._reconnect_signalled(index, error, conn, backoff)
                continue
            level = logging.ERROR if index == 0 else logging.WARNING
            if was_registered:
                backoff.reset()
                if conn.protocol == HTTP2:  # cloudflared's http2 connection logs it; its QUIC one does not
                    log.info("Lost connection with the edge connIndex=%d", index)
            if isinstance(error, EdgeDialError):  # cloudflared logs the dial failure, then the generic line
                log.log(level, "Unable to establish connection with Cloudflare edge error=%s connIndex=%d "
                        "event=0 ip=%s", q(str(error)), index, conn.edge_ip)
            log.log(level, "%s error=%s connIndex=%d event=0 ip=%s", error.log_message, q(str(error)), index,
                    conn.edge_ip)
            if self.state is not None and isinstance(error, RegistrationErrors):
                self.state.registration_failed(str(error))
            if not self.ever_registered and not error.retry_initial:
                log.error("Initiating shutdown error=%s", q(str(error)))
                log.error("initial tunnel connection failed error=%s", q(str(error)))
                self.fail(1)
                return
            may_fall_back = not isinstance(error, DuplicateConnectionError)
            if isinstance(error, EdgeDialError) or type(error).__name__ == "EdgeQuicDialError":
                # cloudflared's IpAddrFallback: after --max-edge-addr-retries of them, a connectivity
                # error that lets the protocol fall back; before, a new address only
                if dial_failures >= self.settings.max_edge_addr_retries:
                    dial_failures = 0
                else:
                    dial_failures += 1
                    may_fall_back = False
            if error.rotate_address:
                new = self.addresses.rotate(index)
                if new != address:  # at debug, in cloudflared's words (edge discovery)
                    log.debug("edge discovery: giving new address to connection connIndex=%d event=0 ip=%s "
                              "available=%d", index, new, self.addresses.available())
                address = new
            wait, shown = backoff.next_wait(after_reset=was_registered)
            log.info("Retrying connection in up to %s connIndex=%d event=0 ip=%s", _duration(shown), index,
                     conn.edge_ip)
            with trio.move_on_after(wait):
                await self.shutdown.wait()
            protocol = self._next_protocol(protocol, error, backoff, index, may_fall_back, conn.edge_ip)
            if index == 0 and self._first_loop:
                if error.retry_initial:
                    continue  # startFirstTunnel serves again at once: no supervisor backoff
                self._first_loop = False
            if self.shutdown.is_set():
                return
            # Everything else, registered or not (a dial error too), goes through the supervisor: its
            # line, then its backoff, shared with every other connIndex waiting (SupervisorBackoff).
            log.log(self._conn_aware_level(), "Connection terminated error=%s connIndex=%d", q(str(error)),
                    index)
            now = trio.current_time()
            restart_at = self._supervisor_backoff.terminated(index, now)
            log.debug("Supervisor backoff: reconnecting in %.1fs connIndex=%d", restart_at - now, index)
            with trio.move_on_at(restart_at):
                await self.shutdown.wait()


def new_connection(protocol: str, settings: TunnelSettings, proxy: Proxy, **kwargs: Any) -> EdgeConnection:
    """An edge connection over `protocol` ("http2" or "quic"); both have the same interface."""
    if protocol == QUIC:
        from tunnel_lab.connector.quic_conn import QuicEdgeConnection

        return QuicEdgeConnection(settings, proxy, **kwargs)  # type: ignore[return-value]
    return EdgeConnection(settings, proxy, **kwargs)

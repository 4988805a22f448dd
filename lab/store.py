"""The tunnel store: tunnels, hostname routes and IP routes in `STATE/state.db`.

SQLite in WAL mode, so the edge can read while admin commands write from other processes. Writes
are short `BEGIN IMMEDIATE` transactions; every connection waits up to `BUSY_TIMEOUT_S` for a lock.
Every write bumps a version counter (`Store.version()`); a `Store` caches its routing tables and
re-reads them only when the counter moved, so the edge can call `resolve_hostname` per request.

Semantics (what the real Cloudflare API does, reduced to one account):
- one lab account per state directory: a random 32-hex-digit account tag, created once;
- a tunnel has a UUID, a unique name, the account tag, a 32-byte random secret and a creation time;
- a hostname route maps an exact name or a `*.suffix` wildcard (any depth, not the suffix itself)
  to a tunnel; names are compared case-insensitively in their IDNA (punycode) form and a port is
  ignored; an exact route beats a wildcard and the longest wildcard wins;
- an IP route maps a CIDR (IPv4 or IPv6) to a tunnel; the most specific network wins;
- a load balancer (`route lb`) maps an exact hostname to pools in the order they were added, a pool
  (named) holds tunnels as origins; a hostname is either a DNS route or a load balancer, never both.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import re
import secrets
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunnel_lab.wire.errors import ConfigError, TunnelLabError

if TYPE_CHECKING:
    from tunnel_lab.wire.credentials import Credentials

BUSY_TIMEOUT_S = 10.0
SECRET_BYTES = 32
SCHEMA_VERSION = 1

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tunnels (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    account_tag TEXT NOT NULL,
    secret BLOB NOT NULL,
    created_at TEXT NOT NULL,
    credentials_file TEXT
);
CREATE TABLE IF NOT EXISTS hostname_routes (
    hostname TEXT PRIMARY KEY,
    tunnel_id TEXT NOT NULL REFERENCES tunnels(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ip_routes (
    network TEXT PRIMARY KEY,
    tunnel_id TEXT NOT NULL REFERENCES tunnels(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL
);
"""


class StoreError(TunnelLabError):
    """The store file cannot be opened, read or written (not a user mistake in the command)."""


# -- names ----------------------------------------------------------------------------------------

def _idna_label(label: str, original: str) -> str:
    if label.isascii():
        return label.lower()
    try:
        import idna  # a dependency of trio; IDNA 2008 with UTS #46 mapping, as browsers do

        return idna.encode(label, uts46=True).decode("ascii")
    except ImportError:  # pragma: no cover - trio always brings idna
        try:
            return label.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ConfigError(f"invalid hostname {original!r}: {exc}") from exc
    except (idna.IDNAError, UnicodeError) as exc:
        raise ConfigError(f"invalid hostname {original!r}: label {label!r}: {exc}") from exc


def normalize_hostname(host: str, *, allow_wildcard: bool = False) -> str:
    """Lower-case, IDNA-encode and validate a DNS name (`*.suffix` too when `allow_wildcard`).

    Raises `ConfigError` for anything that is not a usable hostname (IP addresses included).
    """
    original = host
    name = host.strip().rstrip(".")
    if not name:
        raise ConfigError(f"invalid hostname {original!r}: empty")
    prefix = ""
    if name.startswith("*."):
        if not allow_wildcard:
            raise ConfigError(f"invalid hostname {original!r}: a wildcard is not allowed here")
        prefix, name = "*.", name[2:]
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise ConfigError(f"invalid hostname {original!r}: an IP address is not a hostname")
    labels = [_idna_label(label, original) for label in name.split(".")]
    for label in labels:
        if not _LABEL.match(label):
            raise ConfigError(f"invalid hostname {original!r}: bad label {label!r}",
                              hint="labels are 1-63 letters, digits, '-' (not first or last) or '_'")
    result = prefix + ".".join(labels)
    if len(result) > 253:
        raise ConfigError(f"invalid hostname {original!r}: longer than 253 characters")
    return result


def strip_port(host: str) -> str:
    """`example.com:8443` -> `example.com`, `[::1]:80` -> `::1`; a bare IPv6 address is kept."""
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def parse_network(cidr: str) -> IPNetwork:
    """Parse a CIDR (host bits are dropped: `10.1.2.3/8` -> `10.0.0.0/8`; a bare IP is a host route)."""
    try:
        return ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError as exc:
        raise ConfigError(f"invalid IP network {cidr!r}: {exc}",
                          hint="give a CIDR such as 10.0.0.0/8 or 2001:db8::/32") from exc


def _parse_ip(ip: str | IPAddress) -> IPAddress | None:
    if isinstance(ip, str):
        try:
            ip = ipaddress.ip_address(strip_port(ip) if "[" in ip or ip.count(":") == 1 else ip)
        except ValueError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _check_name(name: str) -> str:
    if not name or name != name.strip() or any(ch.isspace() or not ch.isprintable() for ch in name):
        raise ConfigError(f"invalid tunnel name {name!r}",
                          hint="use a non-empty name without spaces or control characters")
    if len(name) > 255:
        raise ConfigError("invalid tunnel name: longer than 255 characters")
    try:
        uuid.UUID(name)
    except ValueError:
        return name
    raise ConfigError(f"invalid tunnel name {name!r}: a UUID cannot be a tunnel name")


def _now() -> datetime.datetime:
    # Full precision keeps creation order for tunnels made within one second.
    return datetime.datetime.now(datetime.UTC)


def format_time(when: datetime.datetime) -> str:
    """`2026-11-25T09:10:01Z`: how cloudflared prints times."""
    return when.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- records --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tunnel:
    """A named tunnel of the lab account. `secret` never appears in `repr` or `as_dict`."""

    id: uuid.UUID
    name: str
    account_tag: str
    secret: bytes = field(repr=False)
    created_at: datetime.datetime
    credentials_file: str | None = None

    def credentials(self) -> Credentials:
        """The tunnel's credentials (what `tunnel create` writes and the edge checks)."""
        from tunnel_lab.wire.credentials import Credentials

        return Credentials(account_tag=self.account_tag, tunnel_secret=self.secret, tunnel_id=self.id)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able description (no secret)."""
        return {"id": str(self.id), "name": self.name, "account_tag": self.account_tag,
                "created_at": format_time(self.created_at)}


@dataclass(frozen=True)
class Route:
    """A hostname route (`kind` "dns", `target` a name or `*.suffix`) or an IP route ("ip", a CIDR)."""

    kind: str
    target: str
    tunnel_id: uuid.UUID
    tunnel_name: str
    created_at: datetime.datetime

    def as_dict(self) -> dict[str, Any]:
        """JSON-able description."""
        return {"kind": self.kind, "target": self.target, "tunnel_id": str(self.tunnel_id),
                "tunnel_name": self.tunnel_name,
                "created_at": format_time(self.created_at)}


@dataclass
class _Snapshot:
    version: int
    tunnels: dict[uuid.UUID, Tunnel]
    exact: dict[str, uuid.UUID]
    wildcard: dict[str, uuid.UUID]  # suffix without the "*."
    networks: list[tuple[IPNetwork, uuid.UUID]]  # most specific first
    # load balancer hostname -> its pools in the order they were added, each its tunnels (oldest first)
    balancers: dict[str, list[tuple[uuid.UUID, ...]]] = field(default_factory=dict)


# -- the store ------------------------------------------------------------------------------------
# Load balancers (`route lb`), created on open also in stores made before they existed.
_LB_SCHEMA = """
CREATE TABLE IF NOT EXISTS lb_pool_origins (
    pool TEXT NOT NULL,
    tunnel_id TEXT NOT NULL REFERENCES tunnels(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    PRIMARY KEY (pool, tunnel_id)
);
CREATE TABLE IF NOT EXISTS load_balancers (
    hostname TEXT NOT NULL,
    pool TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (hostname, pool)
)
"""
POOL_NAME = re.compile(r"^[_a-zA-Z0-9][-_.a-zA-Z0-9]{0,255}$")  # cloudflared's validateName, bounded


class Store:
    """The tunnel store in one SQLite file. Safe to share between threads and processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._snapshot: _Snapshot | None = None
        try:
            # The tunnel secrets live here: create the file private (SQLite copies its mode to
            # the -wal and -shm files). O_EXCL: closing a descriptor of a file this process has
            # open elsewhere would drop that connection's SQLite (POSIX) locks.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open the tunnel store: {exc.strerror or exc}") from exc
        try:
            with self._creation_lock():
                self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                           check_same_thread=False)
                self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                self._db.execute("PRAGMA foreign_keys = ON")
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"{self.path}: cannot switch the store to WAL mode (got {mode})")
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._init_schema()
                self._init_lb_schema()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the tunnel store: {exc}") from exc
        except OSError as exc:
            reason = exc.strerror or exc
            raise StoreError(f"{self.path}.lock: cannot lock the tunnel store: {reason}") from exc

    @contextmanager
    def _creation_lock(self) -> Iterator[None]:
        """Serialise opening (WAL switch, schema) across processes with a `flock` on `STATE.db.lock`.

        The busy timeout does not cover `PRAGMA journal_mode = WAL`: two connections that both read
        the header and then want to write it deadlock, and SQLite fails one at once with "database
        is locked" instead of calling its busy handler.
        """
        with open(self.path.with_name(self.path.name + ".lock"), "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # -- plumbing

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _init_schema(self) -> None:
        ready = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if ready and self._db.execute("SELECT 1 FROM meta WHERE key = 'account_tag'").fetchone():
            return
        # Two processes may get here at once: IMMEDIATE serialises them, and every statement is
        # idempotent, so the second one changes nothing (in particular not the account tag).
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('account_tag', ?)",
                             (secrets.token_hex(16),))
            self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)",
                             (str(SCHEMA_VERSION),))
            self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('version', '0')")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _init_lb_schema(self) -> None:
        have = {row[0] for row in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('lb_pool_origins', "
            "'load_balancers')")}
        if len(have) == 2:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _LB_SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction that also bumps the version counter."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute(
                        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: tunnel store write failed: {exc}") from exc

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: tunnel store read failed: {exc}") from exc

    def version(self) -> int:
        """A counter bumped by every write from any process: cheap change detection for caches."""
        rows = self._query("SELECT value FROM meta WHERE key = 'version'")
        return int(rows[0][0]) if rows else 0

    @property
    def account_tag(self) -> str:
        """The lab account's tag (32 hex digits, one per state directory)."""
        return str(self._query("SELECT value FROM meta WHERE key = 'account_tag'")[0][0])

    def _load(self) -> _Snapshot:
        with self._lock:
            version = self.version()
            if self._snapshot is not None and self._snapshot.version == version:
                return self._snapshot
            try:
                self._db.execute("BEGIN")
                try:
                    version = self.version()
                    t_rows = self._db.execute(
                        "SELECT id, name, account_tag, secret, created_at, credentials_file FROM tunnels"
                    ).fetchall()
                    h_rows = self._db.execute("SELECT hostname, tunnel_id FROM hostname_routes").fetchall()
                    i_rows = self._db.execute("SELECT network, tunnel_id FROM ip_routes").fetchall()
                    lb_rows = self._db.execute(
                        "SELECT b.hostname, b.pool, o.tunnel_id FROM load_balancers b "
                        "LEFT JOIN lb_pool_origins o ON o.pool = b.pool "
                        "ORDER BY b.hostname, b.created_at, b.pool, o.created_at, o.tunnel_id").fetchall()
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: tunnel store read failed: {exc}") from exc
            tunnels = {}
            for row in t_rows:
                tunnel = _tunnel_from_row(row)
                tunnels[tunnel.id] = tunnel
            exact: dict[str, uuid.UUID] = {}
            wildcard: dict[str, uuid.UUID] = {}
            for hostname, tid in h_rows:
                if hostname.startswith("*."):
                    wildcard[hostname[2:]] = uuid.UUID(tid)
                else:
                    exact[hostname] = uuid.UUID(tid)
            networks = [(ipaddress.ip_network(net), uuid.UUID(tid)) for net, tid in i_rows]
            networks.sort(key=lambda item: item[0].prefixlen, reverse=True)
            pools: dict[str, dict[str, list[uuid.UUID]]] = {}
            for hostname, pool, tid in lb_rows:
                members = pools.setdefault(hostname, {}).setdefault(pool, [])
                if tid is not None:
                    members.append(uuid.UUID(tid))
            balancers = {h: [tuple(m) for m in by_pool.values()] for h, by_pool in pools.items()}
            self._snapshot = _Snapshot(version, tunnels, exact, wildcard, networks, balancers)
            return self._snapshot

    # -- tunnels

    def create_tunnel(self, name: str, *, tunnel_id: uuid.UUID | None = None,
                      secret: bytes | None = None) -> Tunnel:
        """Create a tunnel named `name` (fresh UUID and 32-byte secret unless given)."""
        _check_name(name)
        tunnel_id = tunnel_id or uuid.uuid4()
        secret = secrets.token_bytes(SECRET_BYTES) if secret is None else secret
        created = _now()
        with self._write() as db:
            account = db.execute("SELECT value FROM meta WHERE key = 'account_tag'").fetchone()[0]
            clash = db.execute("SELECT name FROM tunnels WHERE name = ? OR id = ?",
                               (name, str(tunnel_id))).fetchone()
            if clash is not None:
                if clash[0] == name:
                    raise ConfigError(f"a tunnel named {name!r} already exists",
                                      hint="pick another name or delete it first")
                raise ConfigError(f"a tunnel with id {tunnel_id} already exists")
            db.execute("INSERT INTO tunnels(id, name, account_tag, secret, created_at) VALUES (?,?,?,?,?)",
                       (str(tunnel_id), name, account, secret, created.isoformat()))
        return Tunnel(tunnel_id, name, account, secret, created)

    def set_credentials_file(self, tunnel: Tunnel | str | uuid.UUID, path: str | Path | None) -> None:
        """Remember where the tunnel's credentials file was written (so `delete` can remove it)."""
        t = self.require_tunnel(tunnel)
        with self._write() as db:
            db.execute("UPDATE tunnels SET credentials_file = ? WHERE id = ?",
                       (None if path is None else str(path), str(t.id)))

    def get_tunnel(self, name_or_id: Tunnel | str | uuid.UUID) -> Tunnel | None:
        """The tunnel with this UUID or name, or None."""
        if isinstance(name_or_id, Tunnel):
            name_or_id = name_or_id.id
        snap = self._load()
        if isinstance(name_or_id, uuid.UUID):
            return snap.tunnels.get(name_or_id)
        try:
            return snap.tunnels.get(uuid.UUID(name_or_id))
        except ValueError:
            pass
        for tunnel in snap.tunnels.values():
            if tunnel.name == name_or_id:
                return tunnel
        return None

    def require_tunnel(self, name_or_id: Tunnel | str | uuid.UUID) -> Tunnel:
        """Like `get_tunnel` but raises `ConfigError` when there is no such tunnel."""
        tunnel = self.get_tunnel(name_or_id)
        if tunnel is None:
            shown = name_or_id.name if isinstance(name_or_id, Tunnel) else str(name_or_id)
            raise ConfigError(f"{shown} is neither the ID nor the name of any of your tunnels",
                              hint="see `tunnel-lab tunnel list`")
        return tunnel

    def tunnel_by_id(self, tunnel_id: uuid.UUID | str) -> Tunnel | None:
        """The tunnel with this UUID, or None (what the edge checks at registration)."""
        try:
            tid = tunnel_id if isinstance(tunnel_id, uuid.UUID) else uuid.UUID(tunnel_id)
        except ValueError:
            return None
        return self._load().tunnels.get(tid)

    def list_tunnels(self) -> list[Tunnel]:
        """All tunnels, oldest first."""
        return sorted(self._load().tunnels.values(), key=lambda t: (t.created_at, t.name))

    def delete_tunnel(self, name_or_id: Tunnel | str | uuid.UUID) -> Tunnel:
        """Delete a tunnel and all its routes; returns what was deleted."""
        tunnel = self.require_tunnel(name_or_id)
        with self._write() as db:
            db.execute("DELETE FROM tunnels WHERE id = ?", (str(tunnel.id),))
        return tunnel

    # -- routes

    def route_dns(self, tunnel: Tunnel | str | uuid.UUID, hostname: str, *,
                  overwrite: bool = False) -> Route:
        """Route `hostname` (or `*.suffix`) to `tunnel`.

        Routing a name that already goes to the same tunnel changes nothing; a name that goes to
        another tunnel is a `ConfigError` unless `overwrite`.
        """
        name = normalize_hostname(hostname, allow_wildcard=True)
        t = self.require_tunnel(tunnel)
        with self._write() as db:
            if db.execute("SELECT 1 FROM load_balancers WHERE hostname = ?", (name,)).fetchone():
                raise ConfigError(f"{name} is a load balancer (`route lb`), not a DNS route")
            row = db.execute("SELECT tunnel_id FROM hostname_routes WHERE hostname = ?", (name,)).fetchone()
            if row is not None and row[0] != str(t.id) and not overwrite:
                other = db.execute("SELECT name FROM tunnels WHERE id = ?", (row[0],)).fetchone()
                raise ConfigError(
                    f"{name} is already routed to tunnel {other[0] if other else row[0]}",
                    hint="use --overwrite-dns to point it at this tunnel")
            if row is None or row[0] != str(t.id):
                db.execute("INSERT OR REPLACE INTO hostname_routes(hostname, tunnel_id, created_at) "
                           "VALUES (?,?,?)", (name, str(t.id), _now().isoformat()))
        route = self.find_route(name)
        assert route is not None
        return route

    def route_lb(self, tunnel: Tunnel | str | uuid.UUID, hostname: str, pool: str) -> tuple[str, str]:
        """Make `tunnel` an origin of `pool` and `pool` a pool of the load balancer `hostname`, creating
        either as needed; returns what changed for each (`new`, `updated` or `unchanged`), as the API
        answers `route lb`. A hostname routed by `route dns` is a `ConfigError`."""
        name = normalize_hostname(hostname)
        if not POOL_NAME.match(pool):
            raise ConfigError(f"{pool!r} is not a valid pool name",
                              hint="letters, digits, '-', '_' and '.', not starting with '-' or '.'")
        t = self.require_tunnel(tunnel)
        now = _now().isoformat()
        with self._write() as db:
            if db.execute("SELECT 1 FROM hostname_routes WHERE hostname = ?", (name,)).fetchone():
                raise ConfigError(f"{name} is routed to a tunnel by a DNS route: it cannot also be a load "
                                  "balancer", hint="delete the DNS route first")
            origins = {row[0] for row in db.execute("SELECT tunnel_id FROM lb_pool_origins WHERE pool = ?",
                                                    (pool,))}
            pool_change = "unchanged" if str(t.id) in origins else "updated" if origins else "new"
            pools = {row[0] for row in db.execute("SELECT pool FROM load_balancers WHERE hostname = ?",
                                                  (name,))}
            lb_change = "unchanged" if pool in pools else "updated" if pools else "new"
            db.execute("INSERT OR IGNORE INTO lb_pool_origins(pool, tunnel_id, created_at) VALUES (?,?,?)",
                       (pool, str(t.id), now))
            db.execute("INSERT OR IGNORE INTO load_balancers(hostname, pool, created_at) VALUES (?,?,?)",
                       (name, pool, now))
        return lb_change, pool_change

    def load_balancer(self, host: str) -> list[list[Tunnel]] | None:
        """The pools of the load balancer serving `host` (a Host value), each its tunnels, or None."""
        try:
            name = normalize_hostname(strip_port(host))
        except ConfigError:
            return None
        snap = self._load()
        pools = snap.balancers.get(name)
        if pools is None:
            return None
        return [[snap.tunnels[tid] for tid in pool if tid in snap.tunnels] for pool in pools]

    def is_routed(self, host: str) -> bool:
        """Whether a DNS route or a load balancer serves `host` (what the sandbox's DNS answers)."""
        return self.resolve_hostname(host) is not None or self.load_balancer(host) is not None

    def route_ip(self, cidr: str, tunnel: Tunnel | str | uuid.UUID) -> Route:
        """Route the network `cidr` to `tunnel` (`ConfigError` if that exact network is routed)."""
        network = parse_network(cidr)
        t = self.require_tunnel(tunnel)
        with self._write() as db:
            row = db.execute("SELECT t.name FROM ip_routes r JOIN tunnels t ON t.id = r.tunnel_id "
                             "WHERE r.network = ?", (str(network),)).fetchone()
            if row is not None:
                raise ConfigError(f"the route for {network} already exists (tunnel {row[0]})",
                                  hint="delete it first with `tunnel-lab tunnel route ip delete`")
            db.execute("INSERT INTO ip_routes(network, tunnel_id, created_at) VALUES (?,?,?)",
                       (str(network), str(t.id), _now().isoformat()))
        route = self.find_route(str(network), kind="ip")
        assert route is not None
        return route

    def delete_route(self, target: str, *, kind: str = "dns") -> Route:
        """Delete the hostname route (kind "dns") or the IP route ("ip") for `target`."""
        route = self.find_route(target, kind=kind)
        if route is None:
            raise ConfigError(f"there is no {'IP' if kind == 'ip' else 'DNS'} route for {target}")
        table, col = ("ip_routes", "network") if kind == "ip" else ("hostname_routes", "hostname")
        with self._write() as db:
            db.execute(f"DELETE FROM {table} WHERE {col} = ?", (route.target,))
        return route

    def find_route(self, target: str, *, kind: str = "dns") -> Route | None:
        """The route stored for exactly this hostname pattern or network (no matching), or None."""
        if kind == "ip":
            key = str(parse_network(target))
            rows = self._query("SELECT network, tunnel_id, created_at FROM ip_routes WHERE network = ?",
                               (key,))
        else:
            key = normalize_hostname(target, allow_wildcard=True)
            rows = self._query(
                "SELECT hostname, tunnel_id, created_at FROM hostname_routes WHERE hostname = ?", (key,))
        if not rows:
            return None
        return self._route(kind, rows[0])

    def _route(self, kind: str, row: tuple[Any, ...]) -> Route:
        tid = uuid.UUID(row[1])
        tunnel = self._load().tunnels.get(tid)
        return Route(kind, row[0], tid, tunnel.name if tunnel else "",
                     datetime.datetime.fromisoformat(row[2]))

    def list_routes(self, kind: str | None = None) -> list[Route]:
        """Hostname routes (sorted by name) then IP routes (sorted by network); `kind` filters."""
        routes: list[Route] = []
        if kind in (None, "dns"):
            rows = self._query("SELECT hostname, tunnel_id, created_at FROM hostname_routes "
                               "ORDER BY hostname")
            routes += [self._route("dns", row) for row in rows]
        if kind in (None, "ip"):
            rows = self._query("SELECT network, tunnel_id, created_at FROM ip_routes")
            ip_routes = [self._route("ip", row) for row in rows]
            ip_routes.sort(key=lambda r: _network_sort_key(ipaddress.ip_network(r.target)))
            routes += ip_routes
        return routes

    # -- resolution (the edge's hot path: served from the cached snapshot)

    def resolve_hostname(self, host: str) -> Tunnel | None:
        """The tunnel serving `host` (a Host header: any port is ignored), or None.

        An exact route wins over wildcards; among wildcards the longest suffix wins.
        """
        try:
            name = normalize_hostname(strip_port(host))
        except ConfigError:
            return None
        snap = self._load()
        tid = snap.exact.get(name)
        if tid is None:
            labels = name.split(".")
            for i in range(1, len(labels)):
                tid = snap.wildcard.get(".".join(labels[i:]))
                if tid is not None:
                    break
        return snap.tunnels.get(tid) if tid is not None else None

    def resolve_ip(self, ip: str | IPAddress) -> Tunnel | None:
        """The tunnel whose most specific IP route contains `ip`, or None."""
        addr = _parse_ip(ip)
        if addr is None:
            return None
        snap = self._load()
        for network, tid in snap.networks:
            if network.version == addr.version and addr in network:
                return snap.tunnels.get(tid)
        return None


def _network_sort_key(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def _tunnel_from_row(row: tuple[Any, ...]) -> Tunnel:
    tid, name, account, secret, created, cred_file = row
    return Tunnel(uuid.UUID(tid), name, account, bytes(secret),
                  datetime.datetime.fromisoformat(created), cred_file)

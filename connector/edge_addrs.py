"""Which edge address each HA connection dials: cloudflared's two regions and their IP families (no I/O).

Mirrors cloudflared's edgediscovery/allregions (region.go, regions.go, discovery.go), unchanged from
2024.1.0 to 2026.8.2 (docs/cloudflared.md, "IPv6 and --edge-ip-version"):

- The addresses are split into two regions: the two SRV targets of edge discovery, or the `--edge`
  addresses taken alternately (first, third, ... in region 1; second, fourth, ... in region 2).
- In each region the family of its first address (after the resolver's RFC 6724 sort, which puts IPv6
  first on a host that has a global IPv6 address) is the primary set, the other family the secondary.
  `--edge-ip-version 4` or `6` keeps one family and no secondary; it applies to discovered addresses
  only: `--edge` addresses always behave as `auto`.
- Only the active set (primary at first) hands out addresses, so the number of HA connections is capped
  by the primary family's addresses. A connection that gives back an IPv6 address after a failure
  switches its region to the secondary (IPv4) set for ten minutes; a failed IPv4 address never switches
  to IPv6, and, while on the secondary set, brings the region straight back to its primary.

Where cloudflared picks at random (which region when both have as many free addresses, which free
address of a set), this picks predictably: region `conn_index % 2`, then the set's first free address,
so that connIndex i starts on the i-th `--edge` address as before.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tunnel_lab.wire.errors import ConfigError

IP_VERSIONS = ("4", "6", "auto")
NO_ADDRESSES_LEFT = "there are no free edge addresses left to resolve to"
PRIMARY_TIMEOUT = 600.0  # region.go timeoutDuration: 10 minutes on the secondary family after an IPv6 failure


class NoEdgeAddressesError(ConfigError):
    """No address is left for a connection (cloudflared's ErrNoAddressesLeft)."""


def parse_ip_version(text: str) -> str:
    """The `--edge-ip-version` value: 4, 6 or auto (cloudflared's parseConfigIPVersion)."""
    if text not in IP_VERSIONS:
        raise ConfigError(f"invalid value for edge-ip-version: {text}", source="--edge-ip-version",
                          hint="use 4, 6 or auto")
    return text


def adjust_for_bind(ip_version: str, bind_address: str | None) -> tuple[str, str | None]:
    """cloudflared's adjustIPVersionByBindAddress: a bind address forces its own family.

    Returns the version to use and the warning cloudflared logs when that overrides the flag."""
    if not bind_address:
        return ip_version, None
    if ipaddress.ip_address(bind_address).version == 4:
        warning = "IPv4 bind address is specified, but edge-ip-version is IPv6" if ip_version == "6" else None
        return "4", warning
    warning = "IPv6 bind address is specified, but edge-ip-version is IPv4" if ip_version == "4" else None
    return "6", warning


def family(address: str) -> int:
    """6 for `[v6]:port` (or a bare IPv6 address), else 4."""
    host = address.rpartition(":")[0] if address.count(":") == 1 or address.startswith("[") else address
    return 6 if ":" in host else 4


def with_port(ip: str, port: int) -> str:
    """`ip:port`, with brackets around an IPv6 address."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass
class Region:
    """One region's addresses: the primary family's set, the other family's, and which one is active."""

    primary: list[str]
    secondary: list[str]
    primary_active: bool = True
    primary_until: float = 0.0

    @classmethod
    def build(cls, addresses: Sequence[str], ip_version: str = "auto") -> Region:
        """region.go NewRegion: the first address's family is primary unless the version says otherwise."""
        v4 = [a for a in addresses if family(a) == 4]
        v6 = [a for a in addresses if family(a) == 6]
        if ip_version == "4":
            return cls(v4, [])
        if ip_version == "6":
            return cls(v6, [])
        if addresses and family(addresses[0]) == 4:
            return cls(v4, v6)
        return cls(v6, v4)

    @property
    def active(self) -> list[str]:
        return self.primary if self.primary_active else self.secondary

    def __contains__(self, address: object) -> bool:
        return address in self.primary or address in self.secondary

    def give_back(self, address: str, now: float) -> None:
        """region.go GiveBack after a connectivity error (the only way cloudflared's supervisor calls it)."""
        if self.primary_active and family(address) == 6 and self.secondary:
            self.primary_active = False
            self.primary_until = now + PRIMARY_TIMEOUT
        elif not self.primary_active and (family(address) == 4 or self.primary_until < now):
            self.primary_active = True


@dataclass
class EdgeAddresses:
    """The two regions and which connIndex holds which address (cloudflared's edgediscovery.Edge)."""

    regions: list[Region]
    clock: Callable[[], float] = time.monotonic
    held: dict[int, str] = field(default_factory=dict)

    @classmethod
    def discovered(cls, regions: Sequence[Sequence[str]], ip_version: str = "auto",
                   clock: Callable[[], float] = time.monotonic) -> EdgeAddresses:
        """The SRV targets' addresses (each in the resolver's order), filtered by `--edge-ip-version`."""
        return cls([Region.build(r, ip_version) for r in regions], clock)

    @classmethod
    def static(cls, addresses: Sequence[str], clock: Callable[[], float] = time.monotonic) -> EdgeAddresses:
        """`--edge` addresses (regions.go NewNoResolve): alternately in two regions, always `auto`."""
        return cls([Region.build(addresses[0::2]), Region.build(addresses[1::2])], clock)

    def _free(self, region: Region, excluding: str | None = None) -> list[str]:
        used = set(self.held.values())
        return [a for a in region.active if a not in used and a != excluding]

    def available(self) -> int:
        """Free addresses in the active sets (what caps the HA connections at start)."""
        return sum(len(self._free(r)) for r in self.regions)

    def _assign(self, conn_index: int, excluding: str | None) -> str | None:
        # regions.go GetUnusedAddr: the region with more free addresses first (a tie: conn_index % 2)
        n = len(self.regions)
        order = sorted(range(n), key=lambda i: (-len(self._free(self.regions[i])), (i - conn_index) % n))
        for i in order:
            free = self._free(self.regions[i], excluding)
            if free:
                self.held[conn_index] = free[0]
                return free[0]
        return None

    def take(self, conn_index: int) -> str:
        """The address this connection holds, else a free one (raises `NoEdgeAddressesError`)."""
        if conn_index in self.held:
            return self.held[conn_index]
        address = self._assign(conn_index, None)
        if address is None:
            raise NoEdgeAddressesError(NO_ADDRESSES_LEFT)
        return address

    def rotate(self, conn_index: int) -> str:
        """After a failure: give the address back (maybe switching its region's family) and take another;
        the same one when nothing else is free (the connection then backs off, no busy loop)."""
        old = self.held.pop(conn_index, None)
        if old is not None:
            for region in self.regions:
                if old in region:
                    region.give_back(old, self.clock())
                    break
        new = self._assign(conn_index, old)
        if new is None:
            if old is None:
                raise NoEdgeAddressesError(NO_ADDRESSES_LEFT)
            self.held[conn_index] = new = old
        return new


# --- the resolver's order: RFC 6724 destination address selection, as Go's net/addrselect.go ---------------

# (prefix, precedence, label): RFC 6724 §2.1's default policy table, longest prefix first.
_POLICY = sorted(((ipaddress.IPv6Network(p), prec, label) for p, prec, label in (
    ("::1/128", 50, 0), ("::/0", 40, 1), ("::ffff:0:0/96", 35, 4), ("2002::/16", 30, 2),
    ("2001::/32", 5, 5), ("fc00::/7", 3, 13), ("::/96", 1, 3), ("fec0::/10", 1, 11), ("3ffe::/16", 1, 12))),
    key=lambda row: -row[0].prefixlen)
_LINK_LOCAL, _SITE_LOCAL, _GLOBAL = 0x2, 0x5, 0xE


def _as6(ip: str) -> ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip)
    return ipaddress.IPv6Address(f"::ffff:{addr}") if addr.version == 4 else addr


def _policy(ip: str) -> tuple[int, int]:
    addr = _as6(ip)
    return next((prec, label) for net, prec, label in _POLICY if addr in net)


def _scope(ip: str) -> int:
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback or addr.is_link_local:
        return _LINK_LOCAL
    if addr.version == 6 and addr.is_multicast:
        return addr.packed[1] & 0xF
    if addr.version == 6 and addr.packed[0] == 0xFE and addr.packed[1] & 0xC0 == 0xC0:
        return _SITE_LOCAL
    return _GLOBAL


def _common_prefix(a: str, b: str) -> int:
    # Go compares at most the 64-bit prefix (the part before the interface identifier)
    x, y = int(ipaddress.IPv6Address(a)) >> 64, int(ipaddress.IPv6Address(b)) >> 64
    return 64 - (x ^ y).bit_length()


def sort_by_rfc6724(ips: Sequence[str], source_of: Callable[[str], str | None]) -> list[str]:
    """`ips` in the order Go's resolver returns them: rules 1, 2, 5, 6, 8, 9 (IPv6 only) and 10 of
    RFC 6724 §6; `source_of(ip)` is the local address the kernel would use for it (None: unreachable)."""
    sources = {ip: source_of(ip) for ip in ips}

    def key(ip: str) -> tuple[int, ...]:
        src = sources[ip]
        if src is None:
            return (1,)  # rule 1: unusable destinations last
        prec, label = _policy(ip)
        v6 = ipaddress.ip_address(ip).version == 6 and ipaddress.ip_address(src).version == 6
        return (0, _scope(ip) != _scope(src), _policy(src)[1] != label, -prec, _scope(ip),
                -_common_prefix(src, ip) if v6 else 0)

    return sorted(ips, key=key)  # stable: rule 10 keeps the answer's order

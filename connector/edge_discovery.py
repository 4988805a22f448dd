"""Edge discovery through DNS, for a connector started without `--edge` (cloudflared's allregions).

cloudflared looks up the SRV record `_v2-origintunneld._tcp.argotunnel.com` (one target a region, port
7844), then the addresses of each target (A and AAAA, whatever `--edge-ip-version` says: the version
only filters them afterwards, connector.edge_addrs), in the order Go's resolver gives them (RFC 6724,
`edge_addrs.sort_by_rfc6724`), and reads the TXT record `protocol-v2.argotunnel.com` for
`--protocol auto`. Here the questions go to the first `nameserver` of /etc/resolv.conf over UDP (TCP
when the answer is truncated), with the wire codec `wire.dns`; in `tunnel-lab sandbox` that is the
lab's DNS server. This runs once at start-up, before the trio runtime, so it uses blocking sockets with
a timeout on every exchange. cloudflared's fallback to DNS-over-TLS at 1.1.1.1 is left out: nothing
may leave the machine.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tunnel_lab.connector.edge_addrs import sort_by_rfc6724, with_port
from tunnel_lab.wire import dns
from tunnel_lab.wire.errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)

SRV_NAME = "_v2-origintunneld._tcp.argotunnel.com"
PROTOCOL_TXT = "protocol-v2.argotunnel.com"
RESOLV_CONF = "/etc/resolv.conf"
TIMEOUT = 2.0  # per exchange; Go's resolver also waits a few seconds, then tries again
ATTEMPTS = 2

Exchange = Callable[[bytes], bytes]
SourceOf = Callable[[str], "str | None"]  # destination IP -> the local address the kernel would use


class DiscoveryError(ConfigError):
    """The edge could not be discovered (no answer, no record)."""


def nameservers(resolv_conf: str) -> list[str]:
    """The `nameserver` addresses of a resolv.conf text, in order (127.0.0.1 when there is none)."""
    found = []
    for line in resolv_conf.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            found.append(parts[1])
    return found or ["127.0.0.1"]


def udp_exchange(server: str, port: int = 53, timeout: float = TIMEOUT) -> Exchange:
    """A blocking query/answer function for `server` (UDP, then TCP when the answer is truncated)."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET

    def exchange(query: bytes) -> bytes:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((server, port))
            sock.send(query)
            answer = sock.recv(65535)
        header = dns.decode_header(answer)
        if header is not None and header.flags & dns.TC:
            with socket.create_connection((server, port), timeout=timeout) as tcp:
                tcp.sendall(struct.pack("!H", len(query)) + query)
                size = struct.unpack("!H", _recv_exact(tcp, 2))[0]
                answer = _recv_exact(tcp, size)
        return answer

    return exchange


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed in the middle of a DNS answer")
        data += chunk
    return data


def lookup(exchange: Exchange, name: str, rtype: int) -> list[dns.Record]:
    """The answers of type `rtype` for `name`; [] for NXDOMAIN or NODATA; OSError/ProtocolError otherwise."""
    query = dns.Message(id=secrets.randbits(16), flags=dns.RD,
                        questions=(dns.Question(name=name, qtype=rtype),))
    last: Exception | None = None
    for _ in range(ATTEMPTS):
        try:
            answer = dns.decode_message(exchange(dns.encode_message(query)))
        except (OSError, ProtocolError) as exc:
            last = exc
            continue
        if answer.id != query.id or not answer.is_response:
            last = ProtocolError(f"DNS answer for {name} does not match the question")
            continue
        if answer.rcode not in (dns.NOERROR, dns.NXDOMAIN):
            raise ProtocolError(f"lookup {name}: server answered with rcode {answer.rcode}")
        return [r for r in answer.answers if r.rtype == rtype]
    assert last is not None
    raise last


@dataclass(frozen=True)
class Discovery:
    """What DNS said: the edge addresses (regions interleaved), each region's addresses in the resolver's
    order (empty: split `addresses` alternately) and the protocol percentages, if any."""

    addresses: tuple[str, ...]
    protocol_percentages: dict[str, int] | None
    regions: tuple[tuple[str, ...], ...] = ()


def source_address(ip: str) -> str | None:
    """The local address a datagram to `ip` would leave from (None: no route), as Go's resolver asks
    the kernel before it sorts (a connected UDP socket sends nothing)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((ip, 9))
            return str(sock.getsockname()[0]).partition("%")[0]
    except OSError:
        return None


def discover(exchange: Exchange, *, source_of: SourceOf = source_address) -> Discovery:
    """SRV -> each region's addresses; the TXT protocol-v2 record (None when it cannot be read)."""
    log.debug("edge discovery: looking up edge SRV record domain=%s", SRV_NAME)
    try:
        srvs = lookup(exchange, SRV_NAME, dns.SRV)
    except (OSError, ProtocolError) as exc:
        log.error("edge discovery: error looking up Cloudflare edge IPs: the DNS query failed error=%s", exc)
        raise DiscoveryError(f"Could not lookup srv records on _v2-origintunneld._tcp.argotunnel.com: {exc}",
                             hint="without --edge the connector discovers the edge through DNS (as in "
                                  "`tunnel-lab sandbox`); else pass --edge HOST:PORT") from None
    if not srvs:
        raise DiscoveryError("Could not lookup srv records on _v2-origintunneld._tcp.argotunnel.com: no such "
                             "host", hint="pass --edge HOST:PORT outside `tunnel-lab sandbox`")
    if len(srvs) < 2:
        raise DiscoveryError("expected at least 2 Cloudflare Regions regions, but SRV only returned "
                             f"{len(srvs)}")
    regions: list[list[str]] = []
    for srv in srvs:
        data = srv.data
        assert isinstance(data, dns.SrvData)
        ips: list[str] = []
        for rtype in (dns.A, dns.AAAA):  # Go asks for both, A first
            try:
                ips += [str(r.data) for r in lookup(exchange, data.target, rtype)]
            except (OSError, ProtocolError) as exc:
                raise DiscoveryError(f"Couldn't resolve SRV record {data.target}:{data.port}: "
                                     f"{exc}") from None
        if not ips:
            raise DiscoveryError(f"SRV record {data.target}:{data.port} had no IPs")
        ips = sort_by_rfc6724(ips, source_of)
        log.debug("edge discovery: resolved edge addresses addresses=%s", ",".join(ips))
        regions.append([with_port(ip, data.port) for ip in ips])
    # cloudflared uses the first two regions (regions.go ResolveEdge)
    return Discovery(addresses=tuple(_interleave(regions[:2])), protocol_percentages=_percentages(exchange),
                     regions=tuple(tuple(r) for r in regions[:2]))


def _interleave(regions: Sequence[Sequence[str]]) -> list[str]:
    # cloudflared spreads HA connections over the regions: connIndex 0 in region 1, 1 in region 2, ...
    out = []
    for i in range(max(len(r) for r in regions)):
        out += [r[i] for r in regions if i < len(r)]
    return out


def _percentages(exchange: Exchange) -> dict[str, int] | None:
    try:
        records = lookup(exchange, PROTOCOL_TXT, dns.TXT)
    except (OSError, ProtocolError):
        return None
    if not records:
        return None
    data = records[0].data
    text = b"".join(data).decode("utf-8", "replace") if isinstance(data, tuple) else ""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    out: dict[str, int] = {}
    if isinstance(doc, list):
        for item in doc:
            if isinstance(item, dict) and isinstance(item.get("protocol"), str) and \
                    isinstance(item.get("percentage"), int):
                out[item["protocol"]] = item["percentage"]
    return out


def discover_from_system(ip_version: str = "auto") -> Discovery:
    """`discover` against the first nameserver of /etc/resolv.conf (`ip_version` filters later, in
    connector.edge_addrs: cloudflared resolves both families whatever it says)."""
    del ip_version
    try:
        with open(RESOLV_CONF, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        text = ""
    return discover(udp_exchange(nameservers(text)[0]))

"""The sandbox's DNS server: the Internet that cloudflared and its users look up, answered by the lab.

`LabZone` decides (no I/O): edge discovery (the SRV record `_v2-origintunneld._tcp.argotunnel.com`
naming two regions on port 7844, each with A records and, where the edge listens on IPv6, AAAA
records, as the real regions have; and the TXT records `protocol-v2` and
`cfd-features` that cloudflared reads at start-up), the Cloudflare service names (API, quick
tunnels, login, dashboard) and every hostname routed in the store point at the lab; everything
else is NXDOMAIN. A known name asked for a type it has no record of gets an empty NOERROR answer
(NODATA), as a real authoritative server gives, so that a resolver asking A and AAAA together
keeps the A answer. `serve_dns` and `serve_dns_tcp` are the trio shells (UDP, and TCP with the
two-byte length prefix of RFC 1035 §4.2.2, for resolvers that retry there).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from tunnel_lab.wire import dns

log = logging.getLogger(__name__)

SRV_NAME = "_v2-origintunneld._tcp.argotunnel.com"
PROTOCOL_TXT = "protocol-v2.argotunnel.com"
FEATURES_TXT = "cfd-features.argotunnel.com"
EDGE_PORT = 7844
SERVICE_NAMES = ("api.cloudflare.com", "api.trycloudflare.com", "login.cloudflareaccess.org",
                 "dash.cloudflare.com")
# Served by the edge's eyeball listeners, which forward it to a connector (edge/management.py).
MANAGEMENT_NAME = "management.argotunnel.com"
TTL = 60
ACCESS_SUFFIX = ".cloudflareaccess.com"

# The protocol percentages cloudflared reads in `--protocol auto` (edgediscovery.ProtocolPercentage):
# it takes the first of quic, http2 whose percentage is above its per-account threshold, so QUIC first,
# with http2 as its fallback. `HTTP2_ONLY` is for an edge without QUIC listeners (`sandbox --no-quic`).
DEFAULT_PROTOCOLS = ({"protocol": "quic", "percentage": 100}, {"protocol": "http2", "percentage": 100})
HTTP2_ONLY = ({"protocol": "quic", "percentage": 0}, {"protocol": "http2", "percentage": 100})
# features.featuresRecord: datagram v3 off; prechecks as by default.
DEFAULT_FEATURES = {"dv3_2": 0}


@dataclass(frozen=True, kw_only=True)
class LabZone:
    """What the sandbox's resolver answers. `routed(name)` says whether a hostname has a route."""

    regions: Mapping[str, Sequence[str]]  # target name -> its addresses, IPv4 and IPv6 (tunnel listeners)
    services: str  # the address of the API / login / dashboard server
    eyeballs: str  # the address of the eyeball listeners (ports 80 and 443)
    eyeballs6: str | None = None  # their IPv6 address, if they listen on one (AAAA for routed names)
    routed: Callable[[str], bool] = field(default=lambda _name: False)
    protocols: Sequence[Mapping[str, object]] = DEFAULT_PROTOCOLS
    features: Mapping[str, object] = field(default_factory=lambda: dict(DEFAULT_FEATURES))

    def records(self, name: str) -> list[dns.Record] | None:
        """Every record the zone has for `name` (any type), or None if the name does not exist."""
        name = dns.canonical_name(name)
        if name == SRV_NAME:
            return [dns.Record(name=name, rtype=dns.SRV, ttl=TTL, data=dns.SrvData(
                priority=1, weight=1, port=EDGE_PORT, target=target)) for target in self.regions]
        if name in self.regions:
            return [_address(name, ip) for ip in self.regions[name]]
        if name == PROTOCOL_TXT:
            return [self._txt(name, list(map(dict, self.protocols)))]
        if name == FEATURES_TXT:
            return [self._txt(name, dict(self.features))]
        if name in SERVICE_NAMES:
            return [dns.Record(name=name, rtype=dns.A, ttl=TTL, data=self.services)]
        if name == MANAGEMENT_NAME or self.routed(name) or name.endswith(ACCESS_SUFFIX):
            # Access team domains are served by the edge's eyeball listeners (edge/access.py).
            return [_address(name, ip) for ip in (self.eyeballs, self.eyeballs6) if ip]
        return None

    @staticmethod
    def _txt(name: str, value: object) -> dns.Record:
        return dns.Record(name=name, rtype=dns.TXT, ttl=TTL,
                          data=dns.txt_strings(json.dumps(value, separators=(",", ":"))))

    def answer(self, query: dns.Message) -> dns.Message:
        """The response to one query message."""
        if query.is_response:
            return dns.reply(query, rcode=dns.FORMERR)
        if query.opcode != 0:
            return dns.reply(query, rcode=dns.NOTIMP)
        if len(query.questions) != 1:
            return dns.reply(query, rcode=dns.FORMERR)
        question = query.questions[0]
        if question.qclass != dns.IN:
            return dns.reply(query, rcode=dns.REFUSED)
        found = self.records(question.name)
        if found is None:
            return dns.reply(query, rcode=dns.NXDOMAIN)
        # Answer with the name as asked (case preserved by the resolver's question, RFC 4343).
        answers = tuple(dns.Record(name=question.name, rtype=r.rtype, ttl=r.ttl, data=r.data)
                        for r in found if r.rtype == question.qtype)
        return dns.reply(query, answers=answers)

    def respond(self, datagram: bytes) -> bytes | None:
        """Bytes in, bytes out: the answer to a datagram, FORMERR for a malformed one, None for junk."""
        try:
            query = dns.decode_message(datagram)
        except dns.DnsFormatError:
            header = dns.decode_header(datagram)
            if header is None or header.is_response:
                return None
            return dns.encode_message(dns.reply(header, rcode=dns.FORMERR))
        return dns.encode_message(self.answer(query))


def _address(name: str, ip: str) -> dns.Record:
    """An A record for an IPv4 address, an AAAA record for an IPv6 one."""
    return dns.Record(name=name, rtype=dns.AAAA if ":" in ip else dns.A, ttl=TTL, data=ip)


async def serve_dns(zone: LabZone, address: tuple[str, int], *,
                    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer DNS queries on UDP `address` until cancelled; reports the bound address."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(address)
        task_status.started(sock.getsockname())
        while True:
            datagram, peer = await sock.recvfrom(4096)
            answer = zone.respond(datagram)
            if answer is None:
                log.warning("dns: dropped %d bytes of junk from %s", len(datagram), peer)
                continue
            try:
                await sock.sendto(answer, peer)
            except OSError as exc:  # the asker went away: its problem, not the server's
                log.debug("dns: cannot answer %s: %s", peer, exc)


TCP_IDLE_TIMEOUT = 10.0


async def _answer_tcp(zone: LabZone, stream: trio.SocketStream) -> None:
    buffer = bytearray()
    while True:
        with trio.move_on_after(TCP_IDLE_TIMEOUT):
            while len(buffer) < 2 or len(buffer) < 2 + int.from_bytes(buffer[:2], "big"):
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
        if len(buffer) < 2 or len(buffer) < 2 + int.from_bytes(buffer[:2], "big"):
            return  # idle or cut short: close
        size = int.from_bytes(buffer[:2], "big")
        message, buffer = bytes(buffer[2:2 + size]), buffer[2 + size:]
        answer = zone.respond(message)
        if answer is None:
            return
        await stream.send_all(len(answer).to_bytes(2, "big") + answer)


async def serve_dns_tcp(zone: LabZone, address: tuple[str, int], *,
                        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer DNS over TCP on `address` until cancelled; reports the bound address."""
    listeners = await trio.open_tcp_listeners(address[1], host=address[0])

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _answer_tcp(zone, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("dns/tcp: connection ended: %r", exc)
        finally:
            await trio.aclose_forcefully(stream)

    sockname = listeners[0].socket.getsockname()
    task_status.started((sockname[0], sockname[1]))
    await trio.serve_listeners(handle, listeners)

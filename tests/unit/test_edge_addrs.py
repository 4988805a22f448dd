"""connector.edge_addrs: cloudflared's regions, IP families and address order, without sockets.

The expectations are what cloudflared 2026.8.2 did in `tunnel-lab sandbox` (docs/cloudflared.md, "IPv6
and --edge-ip-version"): e.g. with each region's IPv6 addresses down, `auto` registered over IPv4 after
one failed IPv6 dial per region; with IPv4 down it never tried IPv6.
"""

from __future__ import annotations

import pytest

from tunnel_lab.connector import edge_addrs as ea
from tunnel_lab.connector import edge_discovery as ed
from tunnel_lab.lab.dns import LabZone
from tunnel_lab.wire import dns
from tunnel_lab.wire.errors import ConfigError

R1 = ["[2001:db8:1::1]:7844", "[2001:db8:1::2]:7844", "127.0.1.1:7844", "127.0.1.2:7844"]
R2 = ["[2001:db8:2::1]:7844", "[2001:db8:2::2]:7844", "127.0.2.1:7844", "127.0.2.2:7844"]
V6 = {a for a in R1 + R2 if a.startswith("[")}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_auto_uses_the_first_family_of_each_region_and_caps_ha_by_it() -> None:
    edges = ea.EdgeAddresses.discovered([R1, R2])
    assert edges.available() == 4
    taken = [edges.take(i) for i in range(4)]
    assert set(taken) == V6 and len(set(taken)) == 4
    with pytest.raises(ea.NoEdgeAddressesError, match="there are no free edge addresses left to resolve to"):
        edges.take(4)
    ipv4_first = ea.EdgeAddresses.discovered([R1[2:] + R1[:2], R2[2:] + R2[:2]])
    assert {ipv4_first.take(i) for i in range(4)} == {a for a in R1 + R2 if a not in V6}


@pytest.mark.parametrize(("version", "family"), [("4", 4), ("6", 6)])
def test_a_version_keeps_one_family_and_no_fallback(version: str, family: int) -> None:
    edges = ea.EdgeAddresses.discovered([R1, R2], version)
    assert edges.available() == 4
    first = edges.take(0)
    assert ea.family(first) == family
    for _ in range(10):  # failures rotate within the family, never to the other
        assert ea.family(edges.rotate(0)) == family


def test_version_6_without_aaaa_records_leaves_no_address() -> None:
    edges = ea.EdgeAddresses.discovered([R1[2:], R2[2:]], "6")
    assert edges.available() == 0
    with pytest.raises(ea.NoEdgeAddressesError, match=r"^there are no free edge addresses left to resolve"):
        edges.take(0)


def test_a_failed_ipv6_address_switches_its_region_to_ipv4_and_an_ipv4_failure_back() -> None:
    edges = ea.EdgeAddresses.discovered([R1, R2], clock=Clock())
    assert edges.take(0) == R1[0]
    # Region 1 is now on IPv4; both regions have two free addresses: the tie goes to region 1 here
    # (cloudflared picks one at random).
    assert edges.rotate(0) == "127.0.1.1:7844"
    assert not edges.regions[0].primary_active and edges.regions[1].primary_active
    assert edges.take(1) == R2[0]
    # A failed IPv4 address brings its region straight back to IPv6, whatever the time.
    assert edges.rotate(0) == R1[0]
    assert edges.regions[0].primary_active


def test_the_secondary_family_lasts_until_the_timeout_after_ipv6_failures() -> None:
    clock = Clock()
    region = ea.Region.build(R1)
    region.give_back(R1[0], clock.now)
    assert not region.primary_active and region.active == R1[2:]
    region.give_back(R1[1], clock.now + 60)  # IPv6 while on IPv4, before the timeout: stay
    assert not region.primary_active
    region.give_back(R1[1], clock.now + ea.PRIMARY_TIMEOUT + 1)
    assert region.primary_active


def test_a_failed_ipv4_primary_never_falls_back_to_ipv6() -> None:
    edges = ea.EdgeAddresses.static(["127.0.1.1:7844", "127.0.2.1:7844", "[::1]:1", "[::1]:2"])
    assert edges.available() == 2  # cloudflared: "... HA connections but I can give you at most 2."
    seen = {edges.take(0)}
    for _ in range(10):
        seen.add(edges.rotate(0))
    assert seen == {"127.0.1.1:7844", "127.0.2.1:7844"}


def test_static_addresses_alternate_between_regions_and_start_predictably() -> None:
    edges = ea.EdgeAddresses.static(["a:1", "b:1", "c:1"])
    assert [r.primary for r in edges.regions] == [["a:1", "c:1"], ["b:1"]]
    assert edges.take(0) == "a:1" and edges.take(1) == "b:1" and edges.take(2) == "c:1"
    ipv6_first = ea.EdgeAddresses.static(["[::1]:1", "[::1]:2", "127.0.0.1:3", "127.0.0.1:4"])
    assert [ipv6_first.take(i) for i in range(2)] == ["[::1]:1", "[::1]:2"]
    assert ipv6_first.rotate(0) == "127.0.0.1:3"  # IPv6 first: its failure falls back to IPv4


def test_version_and_bind_address_are_combined_as_cloudflared_does() -> None:
    assert ea.parse_ip_version("auto") == "auto"
    with pytest.raises(ConfigError, match="invalid value for edge-ip-version: 5"):
        ea.parse_ip_version("5")
    assert ea.adjust_for_bind("auto", None) == ("auto", None)
    assert ea.adjust_for_bind("auto", "127.0.0.1") == ("4", None)
    assert ea.adjust_for_bind("6", "127.0.0.1") == (
        "4", "IPv4 bind address is specified, but edge-ip-version is IPv6")
    assert ea.adjust_for_bind("4", "::1") == (
        "6", "IPv6 bind address is specified, but edge-ip-version is IPv4")
    assert ea.adjust_for_bind("auto", "::1") == ("6", None)


def test_families_and_ports() -> None:
    addresses = ("127.0.0.1:1", "[::1]:1", "::1", "10.0.0.1", "host:7844")
    assert [ea.family(a) for a in addresses] == [4, 6, 6, 4, 4]
    assert ea.with_port("::1", 7844) == "[::1]:7844" and ea.with_port("127.0.0.1", 1) == "127.0.0.1:1"


def same(ip: str) -> str:
    return ip  # every destination is a local address (as in the sandbox's namespace)


def test_rfc6724_puts_global_ipv6_before_ipv4_and_ula_after() -> None:
    assert ea.sort_by_rfc6724(["127.0.1.1", "2001:db8:1::1", "fd00::1"], same) == [
        "2001:db8:1::1", "127.0.1.1", "fd00::1"]
    assert ea.sort_by_rfc6724(["127.0.0.1", "::1"], same) == ["::1", "127.0.0.1"]
    # Rule 1: without a route to IPv6 (an IPv4-only host) IPv4 comes first, as on such a host.
    assert ea.sort_by_rfc6724(["2001:db8::1", "127.0.0.1"], lambda ip: None if ":" in ip else ip) == [
        "127.0.0.1", "2001:db8::1"]
    # Rule 10: otherwise the answer's order stays.
    assert ea.sort_by_rfc6724(["127.0.1.2", "127.0.1.1"], same) == ["127.0.1.2", "127.0.1.1"]
    # Rule 9 (IPv6 only): the longer prefix shared with the source first.
    assert ea.sort_by_rfc6724(["2001:db8:9::1", "2001:db8:1::1"], lambda ip: "2001:db8:1::5") == [
        "2001:db8:1::1", "2001:db8:9::1"]


def zone_exchange(zone: LabZone) -> ed.Exchange:
    def exchange(query: bytes) -> bytes:
        return dns.encode_message(zone.answer(dns.decode_message(query)))

    return exchange


DUAL = LabZone(regions={"region1.v2.argotunnel.com": ["127.0.1.1", "127.0.1.2", "2001:db8:1::1",
                                                      "2001:db8:1::2"],
                        "region2.v2.argotunnel.com": ["127.0.2.1", "2001:db8:2::1"]},
               services="127.0.3.1", eyeballs="127.0.0.1", eyeballs6="::1")


def test_discovery_reads_a_and_aaaa_in_the_resolvers_order() -> None:
    found = ed.discover(zone_exchange(DUAL), source_of=same)
    assert found.regions == (
        ("[2001:db8:1::1]:7844", "[2001:db8:1::2]:7844", "127.0.1.1:7844", "127.0.1.2:7844"),
        ("[2001:db8:2::1]:7844", "127.0.2.1:7844"))
    no_v6_route = ed.discover(zone_exchange(DUAL), source_of=lambda ip: None if ":" in ip else ip)
    assert no_v6_route.regions[1] == ("127.0.2.1:7844", "[2001:db8:2::1]:7844")


def test_the_zone_answers_aaaa_only_for_ipv6_addresses() -> None:
    def ask(name: str, qtype: int) -> list[object]:
        query = dns.Message(id=1, flags=dns.RD, questions=(dns.Question(name=name, qtype=qtype),))
        return [r.data for r in DUAL.answer(query).answers]

    assert ask("region2.v2.argotunnel.com", dns.AAAA) == ["2001:db8:2::1"]
    assert ask("region2.v2.argotunnel.com", dns.A) == ["127.0.2.1"]
    assert ask("management.argotunnel.com", dns.AAAA) == ["::1"]
    v4_only = LabZone(regions=DUAL.regions, services="x", eyeballs="127.0.0.1")
    query = dns.Message(id=1, flags=dns.RD, questions=(dns.Question(name="management.argotunnel.com",
                                                                    qtype=dns.AAAA),))
    answer = v4_only.answer(query)
    assert answer.rcode == dns.NOERROR and answer.answers == ()  # NODATA, not NXDOMAIN


def test_one_srv_target_is_an_error_as_in_cloudflared() -> None:
    one = LabZone(regions={"region1.v2.argotunnel.com": ["127.0.1.1"]}, services="x", eyeballs="y")
    with pytest.raises(ed.DiscoveryError, match="expected at least 2 Cloudflare Regions regions, but "
                                                "SRV only returned 1"):
        ed.discover(zone_exchange(one), source_of=same)

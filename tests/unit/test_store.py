"""lab.store: tunnels, hostname and IP routes, resolution rules, persistence and sharing."""

from __future__ import annotations

import ipaddress
import os
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel_lab.lab.store import Store, StoreError, normalize_hostname, strip_port
from tunnel_lab.wire.credentials import credentials_json, parse_credentials_file
from tunnel_lab.wire.errors import ConfigError


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as s:
        yield s


# -- tunnels ---------------------------------------------------------------------------------------

def test_create_and_lookup(store: Store) -> None:
    t = store.create_tunnel("web")
    assert len(t.secret) == 32
    assert re.fullmatch(r"[0-9a-f]{32}", t.account_tag)
    assert t.account_tag == store.account_tag
    assert store.get_tunnel("web") == t
    assert store.get_tunnel(str(t.id)) == t
    assert store.get_tunnel(t.id) == t
    assert store.tunnel_by_id(t.id) == t
    assert store.tunnel_by_id(str(t.id).upper()) == t
    assert store.tunnel_by_id("not-a-uuid") is None
    assert store.get_tunnel("nope") is None
    assert store.tunnel_by_id(uuid.uuid4()) is None


def test_secrets_are_random_and_account_is_shared(store: Store) -> None:
    a, b = store.create_tunnel("a"), store.create_tunnel("b")
    assert a.secret != b.secret and a.id != b.id
    assert a.account_tag == b.account_tag
    assert [t.name for t in store.list_tunnels()] == ["a", "b"]


def test_fixed_id_and_secret(store: Store) -> None:
    tid = uuid.UUID("6ff42ae2-765d-4adf-8112-31c55c1551ef")
    t = store.create_tunnel("fixed", tunnel_id=tid, secret=b"\x01" * 32)
    assert (t.id, t.secret) == (tid, b"\x01" * 32)
    with pytest.raises(ConfigError, match="already exists"):
        store.create_tunnel("other", tunnel_id=tid)


@pytest.mark.parametrize("name", ["", " web", "a b", "tab\there", "6ff42ae2-765d-4adf-8112-31c55c1551ef"])
def test_bad_tunnel_names(store: Store, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid tunnel name"):
        store.create_tunnel(name)


def test_duplicate_name(store: Store) -> None:
    store.create_tunnel("web")
    with pytest.raises(ConfigError, match="'web' already exists"):
        store.create_tunnel("web")
    assert len(store.list_tunnels()) == 1


def test_secret_not_in_repr_or_dict(store: Store) -> None:
    t = store.create_tunnel("web", secret=b"S3CRET-BYTES-0123456789abcdefghi")
    assert "S3CRET" not in repr(t)
    assert "secret" not in t.as_dict()
    assert set(t.as_dict()) == {"id", "name", "account_tag", "created_at"}


def test_credentials_round_trip(store: Store) -> None:
    t = store.create_tunnel("web")
    creds = parse_credentials_file(credentials_json(t.credentials()), "test")
    assert (creds.account_tag, creds.tunnel_secret, creds.tunnel_id) == (t.account_tag, t.secret, t.id)


def test_require_and_delete_unknown(store: Store) -> None:
    with pytest.raises(ConfigError, match="neither the ID nor the name"):
        store.require_tunnel("ghost")
    with pytest.raises(ConfigError, match="neither the ID nor the name"):
        store.delete_tunnel("ghost")


# -- hostname routes -------------------------------------------------------------------------------

def test_exact_beats_wildcard_and_longest_wildcard_wins(store: Store) -> None:
    broad, narrow, exact = (store.create_tunnel(n) for n in ("broad", "narrow", "exact"))
    store.route_dns(broad, "*.example.com")
    store.route_dns(narrow, "*.api.example.com")
    store.route_dns(exact, "v1.api.example.com")
    assert store.resolve_hostname("v1.api.example.com") == exact
    assert store.resolve_hostname("v2.api.example.com") == narrow
    assert store.resolve_hostname("deep.v2.api.example.com") == narrow
    assert store.resolve_hostname("api.example.com") == broad  # `*.api...` does not match its apex
    assert store.resolve_hostname("www.example.com") == broad
    assert store.resolve_hostname("a.b.c.example.com") == broad
    assert store.resolve_hostname("example.com") is None
    assert store.resolve_hostname("example.org") is None


def test_case_port_and_trailing_dot_are_ignored(store: Store) -> None:
    t = store.create_tunnel("t")
    store.route_dns(t, "App.Example.COM.")
    assert store.find_route("app.example.com") is not None
    for host in ("app.example.com", "APP.EXAMPLE.COM", "app.example.com:8443", "app.example.com.",
                 "App.Example.Com.:80"):
        assert store.resolve_hostname(host) == t, host


def test_idna_is_normalised(store: Store) -> None:
    t = store.create_tunnel("t")
    route = store.route_dns(t, "Bücher.Example")
    assert route.target == "xn--bcher-kva.example"
    assert store.resolve_hostname("xn--bcher-kva.example") == t
    assert store.resolve_hostname("BÜCHER.example:443") == t
    store.route_dns(t, "*.münchen.test")
    assert store.resolve_hostname("a.xn--mnchen-3ya.test") == t


@pytest.mark.parametrize("host", ["", ".", "a..b", "-a.com", "a-.com", "*", "a.*.com", "*.", "**.a.com",
                                  "1.2.3.4", "::1", "a b.com", "x" * 64 + ".com",
                                  ".".join(["abcdefghi"] * 26)])
def test_invalid_hostnames_are_refused(store: Store, host: str) -> None:
    t = store.create_tunnel("t")
    with pytest.raises(ConfigError, match="invalid hostname"):
        store.route_dns(t, host)
    assert store.list_routes() == []


@pytest.mark.parametrize("host", ["", "[::1]:80", "1.2.3.4", "a..b", "???", "[", ":80"])
def test_unroutable_hosts_resolve_to_none(store: Store, host: str) -> None:
    store.route_dns(store.create_tunnel("t"), "*.example.com")
    assert store.resolve_hostname(host) is None


def test_strip_port() -> None:
    assert strip_port("a.com:80") == "a.com"
    assert strip_port("[::1]:80") == "::1"
    assert strip_port("::1") == "::1"
    assert strip_port("a.com") == "a.com"


def test_route_dns_conflicts_and_overwrite(store: Store) -> None:
    a, b = store.create_tunnel("a"), store.create_tunnel("b")
    first = store.route_dns(a, "app.example.com")
    assert store.route_dns("a", "APP.example.com") == first  # same tunnel: no change
    with pytest.raises(ConfigError, match="already routed to tunnel a"):
        store.route_dns(b, "app.example.com")
    assert store.resolve_hostname("app.example.com") == a
    route = store.route_dns(b, "app.example.com", overwrite=True)
    assert (route.tunnel_id, route.tunnel_name) == (b.id, "b")
    assert store.resolve_hostname("app.example.com") == b
    assert [r.target for r in store.list_routes("dns")] == ["app.example.com"]


def test_route_to_unknown_tunnel(store: Store) -> None:
    with pytest.raises(ConfigError, match="neither the ID nor the name"):
        store.route_dns("ghost", "a.example.com")
    with pytest.raises(ConfigError, match="neither the ID nor the name"):
        store.route_ip("10.0.0.0/8", "ghost")


def test_delete_dns_route(store: Store) -> None:
    t = store.create_tunnel("t")
    store.route_dns(t, "*.example.com")
    assert store.delete_route("*.EXAMPLE.com").target == "*.example.com"
    assert store.resolve_hostname("a.example.com") is None
    with pytest.raises(ConfigError, match="no DNS route"):
        store.delete_route("*.example.com")


# -- IP routes -------------------------------------------------------------------------------------

def test_most_specific_ip_route_wins(store: Store) -> None:
    wide, mid, host, v6 = (store.create_tunnel(n) for n in ("wide", "mid", "host", "v6"))
    store.route_ip("10.0.0.0/8", wide)
    store.route_ip("10.1.2.3/16", mid)  # host bits dropped
    store.route_ip("10.1.2.3", host)  # a bare address is a host route
    store.route_ip("fd00::/8", v6)
    assert store.resolve_ip("10.9.9.9") == wide
    assert store.resolve_ip("10.1.9.9") == mid
    assert store.resolve_ip("10.1.2.3") == host
    assert store.resolve_ip(ipaddress.ip_address("10.1.2.3")) == host
    assert store.resolve_ip("::ffff:10.1.2.3") == host  # v4-mapped v6 is the v4 address
    assert store.resolve_ip("fd12::1") == v6
    assert store.resolve_ip("[fd12::1]:443") == v6
    assert store.resolve_ip("10.1.2.3:22") == host
    assert store.resolve_ip("11.0.0.1") is None
    assert store.resolve_ip("fe80::1") is None
    assert store.resolve_ip("not-an-ip") is None
    assert [r.target for r in store.list_routes("ip")] == [
        "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "fd00::/8"]


def test_ip_route_errors(store: Store) -> None:
    t = store.create_tunnel("t")
    store.route_ip("10.0.0.0/8", t)
    with pytest.raises(ConfigError, match="already exists"):
        store.route_ip("10.200.0.0/8", t)  # same network after normalisation
    for bad in ("10.0.0.0/33", "bad", "", "10.0.0/8x"):
        with pytest.raises(ConfigError, match="invalid IP network"):
            store.route_ip(bad, t)
    assert store.delete_route("10.0.0.0/8", kind="ip").target == "10.0.0.0/8"
    with pytest.raises(ConfigError, match="no IP route"):
        store.delete_route("10.0.0.0/8", kind="ip")


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), min_size=1, max_size=8),
       st.integers(0, 2**32 - 1))
def test_resolve_ip_matches_longest_prefix_oracle(tmp_path_factory: pytest.TempPathFactory,
                                                   nets: list[tuple[int, int]], addr: int) -> None:
    networks = {ipaddress.ip_network((a, p), strict=False) for a, p in nets}
    # One file for all examples (a fresh database per example would dominate the run time).
    with Store(tmp_path_factory.getbasetemp() / "ip-oracle.db") as s:
        for old in s.list_tunnels():
            s.delete_tunnel(old)
        owner = {}
        for i, net in enumerate(sorted(networks, key=str)):
            owner[net] = s.create_tunnel(f"t{i}")
            s.route_ip(str(net), owner[net])
        ip = ipaddress.IPv4Address(addr)
        containing = [n for n in networks if ip in n]
        expected = owner[max(containing, key=lambda n: n.prefixlen)] if containing else None
        assert s.resolve_ip(str(ip)) == expected


# Labels start with a letter: an all-digit name such as 0.0.0.0 is an IP address, not a hostname.
_label = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@settings(max_examples=100)
@given(st.lists(_label, min_size=1, max_size=5))
def test_normalize_hostname_is_case_insensitive_and_idempotent(labels: list[str]) -> None:
    name = ".".join(labels)
    assert normalize_hostname(name) == name
    assert normalize_hostname(name.upper() + ".") == name
    assert normalize_hostname("*." + name, allow_wildcard=True) == "*." + name
    with pytest.raises(ConfigError):
        normalize_hostname("*." + name)


# -- deletion, persistence, sharing ----------------------------------------------------------------

def test_delete_cascades_to_routes(store: Store) -> None:
    a, b = store.create_tunnel("a"), store.create_tunnel("b")
    store.route_dns(a, "a.example.com")
    store.route_dns(a, "*.a.example.com")
    store.route_ip("10.0.0.0/8", a)
    store.route_dns(b, "b.example.com")
    store.route_ip("192.168.0.0/16", b)
    assert store.delete_tunnel("a") == a
    assert store.get_tunnel("a") is None
    assert store.resolve_hostname("a.example.com") is None
    assert store.resolve_hostname("x.a.example.com") is None
    assert store.resolve_ip("10.0.0.1") is None
    assert [r.target for r in store.list_routes()] == ["b.example.com", "192.168.0.0/16"]
    assert store.resolve_hostname("b.example.com") == b
    # The name is free again.
    assert store.create_tunnel("a").id != a.id


def test_two_instances_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as s1, Store(path) as s2:
        account = s1.account_tag
        assert account == s2.account_tag
        t = s1.create_tunnel("web")
        assert s2.get_tunnel("web") == t
        assert s2.resolve_hostname("app.example.com") is None  # s2 caches this state
        v = s1.version()
        s2.route_dns("web", "app.example.com")
        assert s1.version() > v
        assert s1.resolve_hostname("app.example.com") == t
        s1.delete_tunnel("web")
        assert s2.resolve_hostname("app.example.com") is None
        assert s2.list_tunnels() == []
    with Store(path) as s3:
        assert s3.account_tag == account  # one account per state directory, kept


def test_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as s:
        s.create_tunnel("t")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unusable_file_is_a_store_error(tmp_path: Path) -> None:
    bad = tmp_path / "state.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"state\.db"):
        Store(bad)
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "missing-dir" / "state.db")


_WRITER = textwrap.dedent("""
    import sys
    from tunnel_lab.lab.store import Store
    s = Store(sys.argv[1])
    for i in range(25):
        t = s.create_tunnel(f"{sys.argv[2]}-{i}")
        s.route_dns(t, f"{sys.argv[2]}-{i}.example.com")
    print(s.account_tag)
""")


def test_concurrent_processes_write_safely(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("p1", "p2", "p3")]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    tags = {out.strip() for out, _ in outs}
    assert len(tags) == 1  # the racing creators agreed on one account
    with Store(path) as s:
        assert len(s.list_tunnels()) == 75
        assert len(s.list_routes("dns")) == 75
        assert s.resolve_hostname("p2-24.example.com") == s.get_tunnel("p2-24")
        assert s.account_tag in tags


@settings(max_examples=200)
@given(st.text(max_size=80))
def test_resolution_never_raises_on_hostile_input(tmp_path_factory: pytest.TempPathFactory,
                                                  host: str) -> None:
    with Store(tmp_path_factory.getbasetemp() / "fuzz.db") as s:
        if s.get_tunnel("t") is None:
            s.route_dns(s.create_tunnel("t"), "*.example.com")
            s.route_ip("0.0.0.0/0", "t")
        assert s.resolve_hostname(host) in (None, s.get_tunnel("t"))
        assert s.resolve_ip(host) in (None, s.get_tunnel("t"))
        assert s.resolve_hostname(host + ".example.com") in (None, s.get_tunnel("t"))


def test_usable_from_another_thread(store: Store) -> None:
    import threading

    t = store.create_tunnel("t")
    store.route_dns(t, "a.example.com")
    seen: list[object] = []
    worker = threading.Thread(target=lambda: seen.append(store.resolve_hostname("a.example.com")))
    worker.start()
    worker.join(timeout=10)
    assert seen == [t]

"""`tunnel-lab up --topology FILE`: the scenario loader checks it, with file:line errors; and the banner."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnel_lab.lab.up import banner, load_topology
from tunnel_lab.wire.errors import ConfigError

TOPOLOGY = """\
datacenters: [LAB1, LAB2, LAB3]
origins:
  api: {kind: echo}
tunnels:
  main: {dns: [api.lab.test]}
connector:
  tunnel: main
  ha_connections: 2
  url: "${origins.api.url}"
"""


def test_a_bare_topology_and_a_whole_scenario_file_both_load(tmp_path: Path) -> None:
    bare = tmp_path / "lab.yaml"
    bare.write_text(TOPOLOGY)
    sc = load_topology(str(bare))
    assert [d.name for d in sc.datacentres] == ["LAB1", "LAB2", "LAB3"]
    assert sc.connector is not None and sc.connector.ha_connections == 2
    indented = "".join(f"  {line}\n" for line in TOPOLOGY.splitlines())
    whole = tmp_path / "scenario.yaml"
    whole.write_text(f"name: x\ndescription: y\ntopology:\n{indented}steps: []\n")
    assert load_topology(str(whole)).tunnels == sc.tunnels


def test_mistakes_name_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "lab.yaml"
    bad.write_text(TOPOLOGY.replace("kind: echo", "kind: nonsense"))
    with pytest.raises(ConfigError) as info:
        load_topology(str(bad))
    assert info.value.source == str(bad) and info.value.line == 3
    bad.write_text(TOPOLOGY.replace("ha_connections: 2", "ha_connections: 3"))
    with pytest.raises(ConfigError, match="needs at least 4 data centres") as info:
        load_topology(str(bad))
    assert info.value.line == 8
    bad.write_text("datacenters: [LAB1, LAB2]\n")
    with pytest.raises(ConfigError, match="no connector"):
        load_topology(str(bad))


def test_banner_gives_curl_lines_with_the_ca_and_the_namespace_prefix() -> None:
    info = {
        "state": "/s",
        "state_kept": False,
        "logs": "/s/logs",
        "hostnames": ["app.lab.test"],
        "url": "http://127.0.0.1:9",
        "origin_note": "echo",
        "tunnel": {"name": "app", "id": "u"},
        "connector": "builtin",
        "datacentres": {"LAB1": "127.0.0.1:1"},
        "http": "127.0.0.1:80",
        "https": "127.0.0.1:443",
        "api": "127.0.0.1:90",
        "api_token_file": "/s/api-token",
        "ca": "/s/pki/ca.pem",
    }
    text = banner(info, enter="nsenter --target 7 --net ")
    assert "  nsenter --target 7 --net curl -H 'Host: app.lab.test' http://127.0.0.1:80/" in text
    assert (
        "curl --cacert /s/pki/ca.pem --resolve app.lab.test:443:127.0.0.1 https://app.lab.test:443/" in text
    )

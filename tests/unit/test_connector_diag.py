"""connector/diag.py: the diagnostic endpoints' bodies and the parts of `tunnel diag` that need no socket."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from tunnel_lab.connector import diag
from tunnel_lab.connector.cli import diag_flags, resolve
from tunnel_lab.connector.state import ConnectorState
from tunnel_lab.edge.v4api import is_v4_target

TUNNEL = uuid.UUID("6d5e1c6a-1f60-4cfb-9a4f-000000000001")
CONNECTOR = uuid.UUID("6d5e1c6a-1f60-4cfb-9a4f-000000000002")


def test_tunnel_state_leaves_out_zero_values_as_go_omitempty_does() -> None:
    state = ConnectorState(connector_id=CONNECTOR, tunnel_id=TUNNEL)
    assert diag.tunnel_state(state) == {"tunnelID": str(TUNNEL), "connectorID": str(CONNECTOR)}
    state.connection_registered(1, "c1", "LAB2", "127.0.0.2", "quic")
    state.connection_registered(0, "c0", "LAB1", "127.0.0.1")
    assert diag.tunnel_state(state)["connections"] == [
        {"isConnected": True, "edgeAddress": "127.0.0.1"},
        {"isConnected": True, "protocol": 1, "edgeAddress": "127.0.0.2", "index": 1},
    ]
    state.connection_unregistered(1)
    assert len(diag.tunnel_state(state)["connections"]) == 1


def test_configuration_lists_set_non_secret_flags_sorted_with_the_uid(tmp_path: Path) -> None:
    res = resolve({"ha-connections": 2, "logfile": "rel.log", "token": "secret-token", "url": "http://x:1"},
                  {"metrics": "127.0.0.1:0", "no-autoupdate": True}, {}, None)
    flags = dict(diag_flags(res))
    assert flags == {"ha-connections": "2", "logfile": os.path.abspath("rel.log"), "url": "http://x:1",
                     "metrics": "127.0.0.1:0", "no-autoupdate": "true"}  # never the token
    state = ConnectorState(connector_id=CONNECTOR, cli_flags=flags)
    body = diag.configuration(state)
    assert list(body) == sorted(body) and body["uid"] == str(os.getuid())


def test_system_information_has_cloudflareds_fields_in_its_order() -> None:
    body = diag.system_information("2026.8.2-lab")
    info = body["info"]
    assert body["errors"] == {}
    assert list(info) == ["memoryMaximum", "memoryCurrent", "fileDescriptorMaximum", "fileDescriptorCurrent",
                          "osSystem", "hostName", "osVersion", "osRelease", "architecture",
                          "cloudflaredVersion", "goVersion", "goArch", "disk"]
    assert 0 < info["memoryCurrent"] <= info["memoryMaximum"]
    assert info["cloudflaredVersion"] == "2026.8.2-lab" and info["osSystem"] == os.uname().sysname
    assert all(set(d) == {"name", "sizeMaximum", "sizeCurrent"} for d in info["disk"])


def test_heap_dump_is_text() -> None:
    assert diag.heap_dump().startswith(b"python heap: allocated blocks ")


class FakeClient:
    def __init__(self, conf: Any) -> None:
        self.conf = conf

    def json(self, path: str) -> Any:
        assert path == "/diag/configuration"
        return self.conf


@pytest.mark.parametrize("uid", ["0", "1000"])
def test_logs_follow_cloudflareds_choice(tmp_path: Path, uid: str) -> None:
    logfile = tmp_path / "cf.log"
    logfile.write_text("a line\n")
    work = tmp_path / "work"
    work.mkdir()
    client: Any = FakeClient({"uid": uid, "logfile": str(logfile)})
    if uid == "0":  # a service run as root writes to the managed path, whatever --logfile says
        managed = tmp_path / "service.err"
        with pytest.raises(diag.DiagError, match=f"open {managed}: no such file"):
            diag._logs(client, work, managed=managed)
    else:
        assert diag._logs(client, work).read_text() == "a line\n"


def test_logs_from_a_directory_and_without_configuration(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "1.log").write_text("one\n")
    (tmp_path / "logs" / "2.log").write_text("two\n")
    client: Any = FakeClient({"uid": "1000", "log-directory": str(tmp_path / "logs")})
    assert diag._logs(client, tmp_path).read_text() == "one\ntwo\n"
    with pytest.raises(diag.DiagError, match="key not found"):
        diag._logs(FakeClient({}), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(diag.DiagError, match="managed log not found"):
        diag._logs(FakeClient({"uid": "1000"}), tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize(("target", "v4"), [
    ("/client/v4/accounts/a/cfd_tunnel", True),
    ("/client/v4/accounts/a/cfd_tunnel/x/connections?client_id=1", True),
    ("/client/v4/accounts/a/teamnet/routes", True),
    ("/client/v4/zones/z/tunnels/x/routes", True),
    ("/client/v4/accounts/a/access/apps", False),  # the Access API keeps the management token
    ("/client/v4/zones/z/rulesets", False),  # the WAF too
    ("/client/v4/accounts/a/cfd_tunnelx", False),
    ("/connections", False),
])
def test_which_management_paths_are_the_v4_api(target: str, v4: bool) -> None:
    assert is_v4_target(target) is v4

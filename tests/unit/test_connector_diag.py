"""connector/diag.py: the diagnostic endpoints' bodies and the parts of `tunnel diag` that need no socket."""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tunnel_lab.connector import diag, diag_network
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


class FakeServer:
    """A metrics server for `diag.run` (every endpoint answers, the configuration names no log)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str) -> bytes:
        return b"text\n"

    def json(self, path: str) -> Any:
        return {"uid": "1000"} if path == "/diag/configuration" else {}


@pytest.mark.parametrize("no_network", [False, True])
def test_network_jobs_write_their_files_and_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    no_network: bool) -> None:
    gathered = []
    missing = 'error starting traceroute: exec: "traceroute": executable file not found in $PATH'

    def gather(deadline: float) -> list[diag_network.TraceResult]:
        gathered.append(deadline)
        hop = diag_network.Hop(1, "::1 (::1)", (5000,))
        return [diag_network.TraceResult("region1.v2.argotunnel.com-v4", None, b"", missing),
                diag_network.TraceResult("region1.v2.argotunnel.com-v6", (hop,), b" 1  ::1 (::1)  5 ms\n")]

    regions = []

    def prechecks(region: str, remaining: float) -> bytes:
        regions.append(region)
        assert 0 < remaining <= diag.RUN_TIMEOUT
        return b"{}\n"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(diag, "_Client", FakeServer)
    monkeypatch.setattr(diag_network, "gather_traces", gather)
    monkeypatch.setattr(diag_network, "collect_prechecks", prechecks)
    flags = {"metrics": "127.0.0.1:1", "region": "us", "no-diag-network": no_network}
    assert diag.run(flags) == 0
    [archive] = tmp_path.glob("cloudflared-diag-*.zip")
    with zipfile.ZipFile(archive) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    tasks = json.loads(files["task-result.json"])
    network = {"raw-network.txt", "network.json", "prechecks.json"}
    jobs = {"raw network information", "network information", "connectivity pre-checks"}
    if no_network:
        assert not network & set(files) and not jobs & set(tasks) and not gathered and not regions
        return
    assert network <= set(files) and len(gathered) == 1 and regions == ["us"]  # one gathering, two files
    assert tasks["raw network information"] == tasks["network information"] == {"error": missing,
                                                                                "result": "failure"}
    assert tasks["connectivity pre-checks"] == {"result": "success"}
    assert files["raw-network.txt"] == (b"region1.v2.argotunnel.com-v4\nno content\n"
                                        b"region1.v2.argotunnel.com-v6\n 1  ::1 (::1)  5 ms\n\n")
    assert json.loads(files["network.json"]) == {"region1.v2.argotunnel.com-v4": None,
                                                 "region1.v2.argotunnel.com-v6": [
                                                     {"hop": 1, "domain": "::1 (::1)", "rtts": [5000]}]}
    assert files["prechecks.json"] == b"{}\n"


def test_prechecks_that_would_leave_the_machine_fail_the_job(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def outside(region: str, remaining: float) -> bytes:
        raise diag_network.OutsideError(diag_network.outside_text("api.cloudflare.com", ["192.0.2.1"]))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(diag, "_Client", FakeServer)
    monkeypatch.setattr(diag_network, "gather_traces", lambda deadline: [])
    monkeypatch.setattr(diag_network, "collect_prechecks", outside)
    diag.run({"metrics": "127.0.0.1:1"})
    [archive] = tmp_path.glob("cloudflared-diag-*.zip")
    with zipfile.ZipFile(archive) as zf:
        assert "prechecks.json" not in zf.namelist()
        tasks = json.loads(zf.read("task-result.json"))
    assert tasks["connectivity pre-checks"]["result"] == "failure"
    assert tasks["connectivity pre-checks"]["error"].startswith(
        "api.cloudflare.com resolves to 192.0.2.1, outside this machine")

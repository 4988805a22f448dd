"""`lab.api` with real processes on loopback: a tunnel, a failover mid-test, history, teardown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tunnel_lab.lab.api import LabError, open_lab, start_lab
from tunnel_lab.lab.runner import netns

TIMEOUT = 60


async def test_failover_history_and_teardown() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_lab(datacentres=3) as lab:
            state = lab.state
            tunnel = await lab.create_tunnel("app", hostnames=["app.lab.test"])
            origin = await lab.start_origin("echo")
            connector = await lab.start_connector(tunnel, url=origin.url, ha_connections=2)
            [first] = {c["location"] for c in await lab.connections() if c["conn_index"] == 0}
            before = await lab.request("app.lab.test", "/before", http2=True)
            assert before.status == 200, before.error
            await lab.fault("dc-down", location=first)
            # The connector replaces the lost connection from a data centre still up.
            with trio.fail_after(TIMEOUT):
                while {c["location"] for c in await lab.connections()} & {first} or len(
                    await lab.connections()
                ) < 2:
                    await trio.sleep(0.05)
            await connector.wait_ready(2)
            after = await lab.request("app.lab.test", "/after")
            assert after.status == 200, after.error
            history = await lab.history()
            assert [h["path"] for h in history] == ["/before", "/after"]
            assert history[1]["location"] != first
            seen = [json.loads(json.dumps(r))["target"] for r in lab.origin_history("echo")]
            assert seen == ["/before", "/after"]
            pids = [c.pid for c in lab.components.values()]
    assert not state.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_sync_lab_and_its_errors(tmp_path: Path) -> None:
    with start_lab(state=tmp_path / "state", datacentres=2) as lab:
        tunnel = lab.create_tunnel("app", hostnames=["app.lab.test"])
        origin = lab.start_origin("hello")
        with pytest.raises(LabError, match="needs at least 3 data centres"):
            lab.start_connector(tunnel, url=origin.url, ha_connections=2)
        with pytest.raises(LabError, match="missing: no such file"):
            lab.start_connector(tunnel, url=origin.url, cloudflared=str(tmp_path / "missing"))
        lab.start_connector(tunnel, url=origin.url)
        assert lab.request("app.lab.test", "/_health").status == 200
        unrouted = lab.request("other.lab.test", "/")
        assert unrouted.status == 404
        with pytest.raises(LabError, match="answered 400"):
            lab.fault("no-such-fault")
    assert (tmp_path / "state" / "state.db").exists()  # a named state directory is kept


@pytest.mark.skipif(netns.isolated(), reason="this process is already in a private namespace")
async def test_a_real_cloudflared_is_refused_outside_a_namespace(tmp_path: Path) -> None:
    binary = tmp_path / "cloudflared"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    with trio.fail_after(TIMEOUT):
        async with open_lab() as lab:
            tunnel = await lab.create_tunnel("app", hostnames=["app.lab.test"])
            with pytest.raises(LabError, match=r"only inside a private network namespace.*tunnel-lab netns"):
                await lab.start_connector(tunnel, url="http://127.0.0.1:9", cloudflared=str(binary))
            assert lab.connectors == {}  # nothing was started

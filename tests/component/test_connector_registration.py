"""The connector against a scripted edge: registration, retries, address rotation, shutdown."""

from __future__ import annotations

import json
import uuid

import pytest
import trio

from connector import supervisor
from tests.component.connector_edge import (
    CREDS,
    FakeEdge,
    make_ca,
    make_settings,
    start_connector,
    status_rule,
)
from wire.registration import ConnectionDetails, RegistrationError


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF_BASE", 0.05)
    monkeypatch.setattr(supervisor, "SUPERVISOR_BACKOFF_BASE", 0.05)
    monkeypatch.setattr(supervisor, "HA_START_INTERVAL", 0.05)


async def test_registers_pushes_local_config_and_unregisters(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="connector")
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            settings = make_settings(ca_path, [addr], (status_rule(404),), ha_connections=1,
                                     local_config_json=b'{"ingress":[]}')
            run = await start_connector(nursery, settings)
            await edge.wait_for(lambda: len(edge.registered) == 1)
            side = edge.registered[0]
            params = side.params
            assert params is not None
            assert params.tunnel_id == CREDS.tunnel_id
            assert params.auth.account_tag == CREDS.account_tag
            assert params.auth.tunnel_secret == CREDS.tunnel_secret
            assert params.conn_index == 0
            assert params.options.client.client_id == settings.connector_id.bytes
            assert params.options.origin_local_ip == bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
            assert params.options.num_previous_attempts == 0
            assert side.control_response is not None
            assert (b":status", b"200") in side.control_response
            # the local configuration follows on connIndex 0
            await edge.wait_for(lambda: side.local_config is not None)
            assert side.local_config == b'{"ingress":[]}'
            assert run.handle.ready_connections == 1
            assert run.handle.state.ready_connections == 1
            # an HTTP request through the http_status rule
            resp = await side.request([(b":method", b"GET"), (b":scheme", b"https"),
                                       (b":authority", b"a.test"), (b":path", b"/")])
            assert resp.status == 404
            assert resp.header(b"cf-cloudflared-response-meta") == b'{"src":"origin"}'
            assert resp.header(b"cf-cloudflared-response-headers") == b""
            run.handle.shutdown()
            assert await run.exit_code() == 0
            assert side.unregistered.is_set()
            await side.rpc_aborted.wait()
            assert side.control_ended
            nursery.cancel_scope.cancel()
    text = caplog.text
    assert "Registered tunnel connection connIndex=0 connection=" in text
    assert "event=0 ip=127.0.0.1 location=LAB1 protocol=http2" in text
    assert "Unregistered tunnel connection connIndex=0" in text

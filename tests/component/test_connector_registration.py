"""The connector against a scripted edge: registration, retries, address rotation, shutdown."""

from __future__ import annotations

import json
import uuid

import pytest
import trio

from tests.component.connector_edge import (
    CREDS,
    FakeEdge,
    make_ca,
    make_settings,
    start_connector,
    status_rule,
    wait_ready,
)
from tests.frames import FrameFactory
from tunnel_lab.connector import supervisor
from tunnel_lab.wire.registration import ConnectionDetails, RegistrationError


async def test_registers_pushes_local_config_and_unregisters(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="tunnel_lab.connector")
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            settings = make_settings(
                ca_path, [addr], (status_rule(404),), ha_connections=1, local_config_json=b'{"ingress":[]}'
            )
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
            await wait_ready(run)
            assert run.handle.state.local_config_pushes == 1
            assert run.handle.state.local_config_push_errors == 0
            assert run.handle.state.ready_connections == 1
            # an HTTP request through the http_status rule
            resp = await side.request(
                [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]
            )
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


@pytest.mark.parametrize("close_delay", [0.05, 0.0])
async def test_unauthorized_is_retried_with_backoff(tmp_path, caplog, close_delay):
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    ca, ca_path = make_ca(tmp_path)

    def decide(params, attempt):
        if attempt < 2:
            return RegistrationError("Unauthorized: Invalid tunnel secret")
        return ConnectionDetails(uuid=uuid.uuid4(), location_name="LAB1")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca, decide=decide)
            edge.close_delay = close_delay  # 0: the edge closes right behind its answer
            addr = await nursery.start(edge.serve)
            run = await start_connector(nursery, make_settings(ca_path, [addr], (status_rule(),)))
            await edge.wait_for(lambda: len(edge.registered) == 1)
            assert [p.options.num_previous_attempts for p in edge.attempts] == [0, 1, 2]
            await wait_ready(run)
            run.handle.shutdown()
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()
    assert caplog.text.count("Retrying connection in up to") == 2
    assert "Unauthorized: Invalid tunnel secret" in caplog.text


async def test_permanent_error_on_first_connection_exits_1(tmp_path, caplog):
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca, decide=lambda p, a: RegistrationError("tunnel deleted", should_retry=True))
            addr = await nursery.start(edge.serve)
            run = await start_connector(nursery, make_settings(ca_path, [addr], (status_rule(),)))
            assert await run.exit_code() == 1
            nursery.cancel_scope.cancel()
    assert len(edge.attempts) == 1
    assert "initial tunnel connection failed" in caplog.text
    assert "tunnel deleted" in caplog.text


async def test_edupconn_moves_to_another_address(tmp_path, caplog):
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            dup = FakeEdge(ca, decide=lambda p, a: RegistrationError("EDUPCONN", should_retry=True))
            good = FakeEdge(ca)
            addr_dup = await nursery.start(dup.serve, "127.0.0.1")
            addr_good = await nursery.start(good.serve, "127.0.0.2")
            run = await start_connector(
                nursery, make_settings(ca_path, [addr_dup, addr_good], (status_rule(),), ha_connections=1)
            )
            await good.wait_for(lambda: len(good.registered) == 1)
            assert len(dup.attempts) == 1
            assert good.attempts[0].options.num_previous_attempts == 1
            run.handle.shutdown()
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()


async def test_no_busy_loop_with_one_untrusted_edge(tmp_path, caplog):
    """cloudflared retries TLS failures on a single address ~2300 times a second; we back off."""
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    _ca, ca_path = make_ca(tmp_path)
    other_ca, _ = make_ca(tmp_path / "x") if (tmp_path / "x").mkdir() is None else (None, None)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(other_ca)  # a certificate our CA did not sign
            addr = await nursery.start(edge.serve)
            run = await start_connector(nursery, make_settings(ca_path, [addr], (status_rule(),), retries=2))
            await trio.sleep(1.0)
            assert not run.done.is_set()  # dial/TLS errors are retried even before the first registration
            assert 3 <= edge.accepted <= 40
            run.handle.shutdown()
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()
    # Go's wording, as cloudflared logs it
    assert ("TLS handshake with edge error: tls: failed to verify certificate: x509: certificate signed by "
            "unknown authority") in caplog.text


async def test_ha_connections_use_distinct_addresses_and_reconnect(tmp_path, caplog):
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            e1, e2, e3 = FakeEdge(ca), FakeEdge(ca), FakeEdge(ca)
            a1 = await nursery.start(e1.serve, "127.0.0.1")
            a2 = await nursery.start(e2.serve, "127.0.0.2")
            a3 = await nursery.start(e3.serve, "127.0.0.3")
            run = await start_connector(
                nursery, make_settings(ca_path, [a1, a2, a3], (status_rule(),), ha_connections=2)
            )
            edges = (e1, e2, e3)

            def registered() -> list:
                return [s for e in edges for s in e.registered if not s.closed.is_set()]

            while len(registered()) < 2:
                await trio.sleep(0.01)
            await wait_ready(run, 2)
            indexes = sorted(s.params.conn_index for s in registered())
            assert indexes == [0, 1]
            assert len({id(s.edge) for s in registered()}) == 2
            assert e1.registered and e1.registered[0].params.conn_index == 0
            assert run.handle.state.ready_connections == 2
            # the edge drops connIndex 1: it comes back (a lost connection is retried)
            victim = next(s for s in registered() if s.params.conn_index == 1)
            total = sum(len(e.registered) for e in edges)
            await victim.close()
            while sum(len(e.registered) for e in edges) == total:  # a new registration comes
                await trio.sleep(0.01)
            await wait_ready(run, 2)
            assert len(registered()) == 2
            assert sorted(s.params.conn_index for s in registered()) == [0, 1]
            run.handle.shutdown()
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()
    assert "Lost connection with the edge connIndex=1" in caplog.text


async def test_malformed_frame_drops_only_that_connection(tmp_path, caplog):
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            run = await start_connector(nursery, make_settings(ca_path, [addr], (status_rule(),)))
            await edge.wait_for(lambda: len(edge.registered) == 1)
            first = edge.registered[0]
            # a WINDOW_UPDATE frame with a 3-byte payload: FRAME_SIZE_ERROR, a connection error
            async with first._lock:
                await first.stream.send_all(FrameFactory.raw(0x8, b"abc"))
            await edge.wait_for(lambda: len(edge.registered) == 2)
            await first.closed.wait()
            assert first.goaway is not None
            run.handle.shutdown()
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()
    assert "Malformed HTTP/2 from the edge" in caplog.text


async def test_shutdown_without_unregister_answer_waits_grace_period(tmp_path):
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            run = await start_connector(
                nursery, make_settings(ca_path, [addr], (status_rule(),), grace_period=0.3)
            )
            await edge.wait_for(lambda: len(edge.registered) == 1)
            side = edge.registered[0]
            side.answer_unregister = False
            start = trio.current_time()
            run.handle.shutdown()
            assert await run.exit_code() == 0
            # It waited for the unanswered unregister until the grace period ran out (a lower bound only:
            # a busy machine can make it later, never earlier; the fail_after catches a hang).
            assert trio.current_time() - start >= 0.3
            assert side.unregistered.is_set()
            nursery.cancel_scope.cancel()


def test_backoff_bounds_double_and_cap():
    b = supervisor.Backoff(1.0, 3)
    shown = [b.next_wait()[1] for _ in range(5)]
    assert shown == [2, 4, 8, 16, 16]  # capped at 8 s, stated as 16 s like cloudflared
    assert b.next_bound() == 8
    b.reset()
    wait, bound = b.next_wait(after_reset=True)
    assert bound == 1 and 0.1 <= wait < 2
    assert supervisor._duration(64) == "1m4s" and supervisor._duration(4) == "4s"


def test_local_config_json_is_shown_as_version_minus_one(tmp_path):
    from tunnel_lab.connector.runtime import _make_state

    _ca, ca_path = make_ca(tmp_path)
    settings = make_settings(
        ca_path,
        ["127.0.0.1:1"],
        (status_rule(),),
        local_config_json=b'{"__configuration_flags":{"a":"b"},"ingress":[{"service":"x"}]}',
    )
    state = _make_state(settings)
    assert state.versioned_config() == {"version": -1, "config": {"ingress": [{"service": "x"}]}}
    assert json.loads(settings.local_config_json)["ingress"]


def test_address_pool_rotation_never_shares_an_address():
    pool = supervisor.AddressPool(("a:1", "b:1", "c:1"))
    assert pool.take(0) == "a:1" and pool.take(1) == "b:1"
    for _ in range(20):
        new = pool.rotate(0)
        assert new in ("a:1", "c:1") and new != pool.held[1]
    single = supervisor.AddressPool(("only:1",))
    assert single.take(0) == "only:1"
    assert single.rotate(0) == "only:1"  # nothing free: keep it (and back off, no busy loop)


def test_ip_port_destinations_and_websocket_accept():
    from tunnel_lab.connector.streams import parse_ip_port
    from tunnel_lab.connector.websocket import WebSocketBridge, websocket_accept

    assert parse_ip_port("127.0.0.1:22") == ("127.0.0.1", 22)
    assert parse_ip_port("[::1]:443") == ("::1", 443)
    for bad in ("example.com:22", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "[::1]", ""):
        assert parse_ip_port(bad) is None, bad
    # RFC 6455's example
    assert websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    bridge = WebSocketBridge()
    frame = bridge.to_edge(b"abc")
    assert frame == b"\x82\x03abc"  # unmasked binary frame from the server side
    assert bridge.close().startswith(b"\x88")
    assert bridge.to_edge(b"late") == b""


async def test_garbage_on_the_control_stream_reconnects(tmp_path, caplog):
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            run = await start_connector(nursery, make_settings(ca_path, [addr], (status_rule(),)))
            await edge.wait_for(lambda: len(edge.registered) == 1)
            first = edge.registered[0]
            # a segment table claiming 2^31 segments: not Cap'n Proto
            await first.send_data(first.control_id, b"\xff\xff\xff\x7f" + b"\x00" * 60)
            await edge.wait_for(lambda: len(edge.registered) == 2)
            await wait_ready(run)
            run.handle.shutdown()
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()
    assert "Malformed RPC message from the edge" in caplog.text


async def test_shutdown_during_a_hanging_dial_is_prompt(tmp_path):
    """An edge that accepts TCP but never finishes TLS must not hold a shutdown for the 15 s dial timeout."""
    _, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]

            dialled = trio.Event()

            async def silent(stream: trio.SocketStream) -> None:
                dialled.set()
                await trio.sleep_forever()

            nursery.start_soon(trio.serve_listeners, silent, listeners)
            run = await start_connector(
                nursery, make_settings(ca_path, [f"127.0.0.1:{port}"], (status_rule(),))
            )
            await dialled.wait()  # the connector is inside its TLS handshake now
            run.handle.shutdown()
            # the test's fail_after (10 s) is shorter than the dial timeout (15 s): waiting it out fails
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()


async def test_metrics_address_in_use_exits_1(tmp_path, caplog):
    from tunnel_lab.connector.runtime import run_tunnel

    caplog.set_level("INFO", logger="tunnel_lab.connector")
    _, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        settings = make_settings(ca_path, ["127.0.0.1:1"], (status_rule(),), metrics=f"127.0.0.1:{port}")
        try:
            assert await run_tunnel(settings, handle_signals=False) == 1
        finally:
            for listener in listeners:
                await listener.aclose()
    assert "Error opening metrics server listener" in caplog.text

"""Stream lifecycle end to end in one trio run: eyeball -> the lab edge -> our connector -> an origin.

Everything here (edge, connector, origin, eyeball) runs in-process on loopback, so both sides' counts
of active request streams can be read, and `trio.testing.wait_all_tasks_blocked` can tell that data has
stopped moving (a busy machine only delays that moment, it cannot fake it).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trio.testing

from tests.component.connector_edge import (
    FAST_KNOBS,
    FakeEdge,
    Running,
    connector_streams,
    count_request_streams,
    get,
    http_rule,
    make_ca,
    make_settings,
    start_connector,
    wait_ready,
    wait_until,
)
from tests.component.test_edge_support import make_tunnel, running_edge, split
from tunnel_lab.connector.settings import TunnelSettings
from tunnel_lab.edge.config import Address
from tunnel_lab.wire.credentials import Credentials

pytestmark = [pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning")]

CHUNK = 64 * 1024



class EndlessOrigin:
    """Answers every request with a chunked body that never ends; counts what it wrote and sees the
    connector close the connection (the origin request cancelled)."""

    def __init__(self) -> None:
        self.sent = 0
        self.requests = 0
        self.closed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(65536)
            if not data:
                return
            head += data
        self.requests += 1
        chunk = b"%x\r\n" % CHUNK + b"d" * CHUNK + b"\r\n"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_close, stream, nursery.cancel_scope)
                await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                while True:
                    await stream.send_all(chunk)
                    self.sent += CHUNK
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.closed.set()

    async def _watch_close(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


def edge_streams(edge: Any) -> int:
    """The edge's own count of active tunnel streams, over every registered connection."""
    return sum(conn.active_streams for conn in edge.registry.listed())


@asynccontextmanager
async def lab(tmp_path: Any, origin_port: int) -> Any:
    """The lab edge (with HTTPS) and our connector registered to it; yields (edge, running connector)."""
    async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),)) as (edge, nursery):
        t = make_tunnel(edge, "t1", "app.test")
        lst = edge.listeners["LAB1"]
        settings = TunnelSettings(
            credentials=Credentials(account_tag=t.account_tag, tunnel_secret=t.secret, tunnel_id=t.id),
            edge_addrs=(f"{lst.host}:{lst.port}",), ca_cert=str(edge.pki.ca_pem_path),
            ingress_rules=(http_rule(origin_port),), ha_connections=1, grace_period=2.0, retries=3,
            rpc_timeout=2.0, **FAST_KNOBS)
        run = await start_connector(nursery, settings)
        await wait_ready(run)
        await wait_until(lambda: len(edge.registry.listed()) == 1)
        yield edge, run
        run.handle.shutdown()
        assert await run.exit_code() == 0


async def h1_start_download(edge: Any) -> tuple[trio.SocketStream, bytes]:
    """An HTTP/1.1 eyeball that sends a GET and reads until the first body bytes arrived."""
    host, port = split(edge.bound["http"])
    eyeball = await trio.open_tcp_stream(host, port)
    await eyeball.send_all(b"GET /download HTTP/1.1\r\nHost: app.test\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 100:
        data = await eyeball.receive_some(65536)
        assert data, got
        got += data
    return eyeball, got


async def assert_cleaned_up(edge: Any, run: Running, origin: EndlessOrigin) -> None:
    # Once nothing moves any more, the clean-up is over (or stuck, which fails at once, not at fail_after).
    await trio.testing.wait_all_tasks_blocked(0.1)
    assert (edge_streams(edge), connector_streams(run)) == (0, 0)
    assert origin.closed.is_set()  # the connector cancelled the origin request
    assert len(edge.registry.listed()) == 1  # the tunnel connection itself lives on


async def test_eyeball_that_stops_reading_stops_the_origin_within_the_windows(tmp_path):
    """Backpressure all the way: an eyeball that reads nothing stalls the edge's tunnel stream (its window
    is not returned), so the connector stops reading the origin; what the origin got rid of is bounded by
    the HTTP/2 windows plus socket buffers, not the endless body."""
    origin = EndlessOrigin()
    with trio.fail_after(30):
        async with trio.open_nursery() as on:
            port = await on.start(origin.serve)
            async with lab(tmp_path, port) as (edge, run):
                eyeball, got = await h1_start_download(edge)
                assert got.startswith(b"HTTP/1.1 200 ")
                # An endless body: without backpressure some task stays busy and this never returns.
                await trio.testing.wait_all_tasks_blocked(0.2)
                stalled = origin.sent
                # 1 MiB stream window + 16 MiB of loopback socket buffers (3 sockets) at most, never 100s
                assert 0 < stalled < 32 * 1024 * 1024, stalled
                assert edge_streams(edge) == 1 and connector_streams(run) == 1
                # reading again resumes the download
                more = 0
                while more < 4 * 1024 * 1024:
                    more += len(await eyeball.receive_some(1 << 20))
                assert origin.sent > stalled
                await eyeball.aclose()
                await assert_cleaned_up(edge, run, origin)
            on.cancel_scope.cancel()


async def test_eyeball_close_mid_download_cleans_up_both_sides(tmp_path):
    origin = EndlessOrigin()
    with trio.fail_after(30):
        async with trio.open_nursery() as on:
            port = await on.start(origin.serve)
            async with lab(tmp_path, port) as (edge, run):
                eyeball, _ = await h1_start_download(edge)
                assert edge_streams(edge) == 1 and connector_streams(run) == 1
                await eyeball.aclose()
                await assert_cleaned_up(edge, run, origin)
                # the tunnel still serves: a second download starts and is cleaned up the same way
                origin.closed = trio.Event()
                eyeball, _ = await h1_start_download(edge)
                await eyeball.aclose()
                await assert_cleaned_up(edge, run, origin)
                assert origin.requests == 2
            on.cancel_scope.cancel()




async def h2_download_then_reset(tmp_path: Any, read_before_reset: int) -> None:
    """An HTTP/2 eyeball reads `read_before_reset` bytes of an endless download, then RST_STREAM(CANCEL)."""
    origin = EndlessOrigin()
    with trio.fail_after(30):
        async with trio.open_nursery() as on:
            port = await on.start(origin.serve)
            async with lab(tmp_path, port) as (edge, run):
                host, https_port = split(edge.bound["https"])
                ctx = edge.pki.client_ssl_context()
                ctx.set_alpn_protocols(["h2"])
                tls = trio.SSLStream(await trio.open_tcp_stream(host, https_port), ctx,
                                     server_hostname="app.test")
                try:
                    conn = h2.connection.H2Connection(
                        h2.config.H2Configuration(client_side=True, header_encoding=None))
                    conn.initiate_connection()
                    request = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"app.test"),
                               (b":path", b"/download")]
                    conn.send_headers(1, request, end_stream=True)
                    await tls.send_all(conn.data_to_send())
                    received = 0
                    while received < read_before_reset:
                        for ev in conn.receive_data(await tls.receive_some(65536)):
                            if isinstance(ev, h2.events.DataReceived):
                                received += len(ev.data)
                                conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                            assert not isinstance(ev, h2.events.StreamReset | h2.events.StreamEnded), ev
                        await tls.send_all(conn.data_to_send())
                    assert edge_streams(edge) == 1 and connector_streams(run) == 1
                    conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
                    await tls.send_all(conn.data_to_send())
                    await assert_cleaned_up(edge, run, origin)
                    # the eyeball's connection itself stays usable
                    conn.ping(b"12345678")
                    await tls.send_all(conn.data_to_send())
                    acked = False
                    while not acked:
                        events = conn.receive_data(await tls.receive_some(65536))
                        acked = any(isinstance(ev, h2.events.PingAckReceived) for ev in events)
                finally:
                    with trio.CancelScope(shield=True):
                        await tls.aclose()
            on.cancel_scope.cancel()


async def test_eyeball_h2_rst_stream_early_in_a_download_cleans_up_both_sides(tmp_path):
    await h2_download_then_reset(tmp_path, 100)


async def test_eyeball_h2_rst_stream_mid_download_cleans_up_both_sides(tmp_path):
    await h2_download_then_reset(tmp_path, 2 * 1024 * 1024)


async def test_more_data_than_content_length_resets_the_stream(tmp_path):
    """The connector's HTTP/2 stack (h2, as Go's server) refuses DATA beyond `content-length`: the stream
    is reset with PROTOCOL_ERROR, the origin never sees the extra bytes, the connection lives on."""
    from tests.component.connector_edge import RawOrigin

    origin = RawOrigin()
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(origin.serve)
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            run = await start_connector(nursery, make_settings(ca_path, [addr], (http_rule(port),)))
            await edge.wait_for(lambda: len(edge.registered) == 1)
            await wait_ready(run)
            side = edge.registered[0]
            es = await side.open(get("/up", method="POST", extra=[(b"content-length", b"5")]))
            # the scripted edge's h2 does not police its own sends: 10 bytes go out against a length of 5
            await es.send(b"0123456789", end_stream=True)
            resp = await es.wait(lambda r: r.ended or r.reset is not None or side.closed.is_set())
            assert not side.closed.is_set(), "the connector dropped the whole tunnel connection"
            assert resp.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR, resp
            await wait_until(lambda: connector_streams(run) == 0 and count_request_streams(side) == 0)
            assert all(len(r.body) <= 5 for r in origin.requests)
            ok = await side.request(get("/after"))
            assert ok.status == 200 and bytes(ok.body) == b"ok"
            run.handle.shutdown()
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()


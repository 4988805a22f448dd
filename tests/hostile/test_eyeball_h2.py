"""Attacks on the HTTPS eyeball listener over HTTP/2: rapid reset, SETTINGS and PING floods."""

from __future__ import annotations

import contextlib
import os
import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from tests.hostile.support import HOST, Lab, fd_count, running_lab, split


async def h2_tls(lab: Lab) -> trio.SSLStream[trio.SocketStream]:
    ctx = ssl.create_default_context(cafile=lab.ready["ca"])
    ctx.set_alpn_protocols(["h2"])
    host, port = split(lab.https)
    tls = trio.SSLStream(await trio.open_tcp_stream(host, port), ctx, server_hostname=HOST)
    await tls.do_handshake()
    assert tls.selected_alpn_protocol() == "h2"
    return tls


def client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    return conn


def request_headers(path: str) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", HOST.encode()),
            (b":path", path.encode())]


async def response_status(conn: h2.connection.H2Connection, tls: trio.SSLStream[trio.SocketStream],
                          stream_id: int) -> int:
    """Read until `stream_id` ends; its status."""
    status = 0
    while True:
        data = await tls.receive_some(65536)
        assert data, "the edge closed the connection"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == stream_id:
                status = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset) and ev.stream_id == stream_id:
                return status
        await tls.send_all(conn.data_to_send())


def origin_sockets(lab: Lab) -> int:
    """The connector's TCP connections to the origin (from /proc/net/tcp: remote port = the origin's)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{lab.connector.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{lab.connector.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            cols = line.split()
            if int(cols[2].split(":")[1], 16) == lab.origin_port and cols[9] in inodes:
                count += 1
    return count


async def test_rapid_reset_leaks_nothing_and_the_tunnel_serves_at_once(tmp_path):
    """HEADERS + RST_STREAM pairs for a 2 MiB download, in one write, several rounds (issue 11, defect 1)."""
    with trio.fail_after(90):
        async with running_lab(tmp_path) as lab:
            edge_fds = fd_count(lab.edge.pid)
            conn = client()
            for _ in range(60):  # under eyeball_max_streams: the honest request below gets a slot
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, request_headers("/large?bytes=2097152"), end_stream=True)
                conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            last = conn.get_next_available_stream_id()  # then an honest request on the same connection
            conn.send_headers(last, request_headers("/large?bytes=1000"), end_stream=True)
            tls = await h2_tls(lab)
            async with tls:
                await tls.send_all(conn.data_to_send())
                assert await response_status(conn, tls, last) == 200
            await lab.assert_healthy()
            # the connector ended the origin requests of the reset streams (keep-alive pool aside)
            assert origin_sockets(lab) <= 8
            assert fd_count(lab.edge.pid) <= edge_fds + 8


async def test_a_rapid_reset_flood_is_cut_off_and_leaves_nothing_behind(tmp_path):
    """The issue's 20,000-pair variant, scaled down: past eyeball_reset_limit the edge sends GOAWAY
    ENHANCE_YOUR_CALM; the handlers it started are bounded by eyeball_max_streams and all unwind."""
    with trio.fail_after(90):
        async with running_lab(tmp_path) as lab:
            edge_fds, edge_rss = fd_count(lab.edge.pid), rss(lab.edge.pid)
            conn = client()
            for _ in range(2000):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, request_headers("/large?bytes=2097152"), end_stream=True)
                conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            tls = await h2_tls(lab)
            async with tls:
                with contextlib.suppress(trio.BrokenResourceError):
                    await tls.send_all(conn.data_to_send())
                codes = []
                with contextlib.suppress(trio.BrokenResourceError, h2.exceptions.ProtocolError):
                    while data := await tls.receive_some(65536):
                        codes += [int(ev.error_code) for ev in conn.receive_data(data)
                                  if isinstance(ev, h2.events.ConnectionTerminated)]
            assert codes == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
            await lab.assert_healthy()
            _, history = await lab.api("GET", "/history")
            assert len(history) <= 1 + 200  # the honest request, and at most eyeball_reset_limit handlers
            assert origin_sockets(lab) <= 8
            assert fd_count(lab.edge.pid) <= edge_fds + 8
            assert rss(lab.edge.pid) <= edge_rss + 64 * 1024 * 1024


def rss(pid: int) -> int:
    """Resident memory of a process in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_settings_and_ping_floods(tmp_path):
    with trio.fail_after(60):
        async with running_lab(tmp_path) as lab:
            conn = client()
            for i in range(5000):
                conn.ping(i.to_bytes(8, "big"))
                conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535 + i % 7})
            tls = await h2_tls(lab)
            async with tls:
                # never read: the edge's answers pile up unread; other eyeballs must not notice
                await tls.send_all(conn.data_to_send())
                await lab.assert_healthy()

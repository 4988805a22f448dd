"""Garbage at a tunnel listener (before TLS, after TLS, malformed HTTP/2, a PING flood): the edge ends that
connection only, registers nothing, and keeps serving the tunnel."""

from __future__ import annotations

import contextlib
import os
import ssl

import h2.config
import h2.connection
import trio

from tests.frames import FrameFactory
from tests.hostile.support import fd_count, read_all, running_lab, split


async def tls_to_tunnel_listener(address: str, ca: str) -> trio.SSLStream[trio.SocketStream]:
    host, port = split(address)
    ctx = ssl.create_default_context(cafile=ca)
    tls = trio.SSLStream(await trio.open_tcp_stream(host, port), ctx, server_hostname="h2.cftunnel.com")
    await tls.do_handshake()
    return tls


async def test_garbage_at_the_tunnel_listener(tmp_path):
    with trio.fail_after(90):
        async with running_lab(tmp_path) as lab:
            address = lab.ready["tunnel_listeners"][0]["address"]
            edge_fds = fd_count(lab.edge.pid)
            host, port = split(address)
            for _ in range(5):  # not TLS at all
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(os.urandom(4096))
                    await read_all(stream)
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            client.initiate_connection()
            frames = FrameFactory()
            flood = client.data_to_send() + b"".join(frames.ping(i.to_bytes(8, "big")) for i in range(3000))
            attacks = [
                os.urandom(8192),  # TLS, then not HTTP/2
                frames.data(1, b"abcd") * 50,  # DATA frames, no SETTINGS first
                FrameFactory.raw(0x4, b"\x00" * 100, length=0xFFFFFF),  # an oversized frame
                flood,  # SETTINGS, then 3000 PINGs
            ]
            for data in attacks:
                tls = await tls_to_tunnel_listener(address, lab.ready["ca"])
                async with tls:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await tls.send_all(data)
                        await read_all(tls)  # the edge ends the connection
            await lab.assert_healthy()
            _, metrics = await lab.api("GET", "/metrics")
            refused = [line for line in metrics.decode().splitlines()
                       if line.startswith("tunnel_lab_edge_registrations_total")
                       and 'result="ok"' not in line]
            assert refused == []
            while fd_count(lab.edge.pid) > edge_fds + 4:
                await trio.sleep(0.05)

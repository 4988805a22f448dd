"""The edge out of file descriptors (issue 11, defect 3): it keeps serving the connections it has, waits for
new ones, logs it once, and recovers."""

from __future__ import annotations

import contextlib

import trio

from tests.hostile.support import HOST, parse_reply, read_all, running_lab, split

NOFILE = 160  # the edge's own needs (listeners, state, TLS files, tunnel connections) fit in well under this


async def test_out_of_file_descriptors_the_edge_serves_on_and_recovers(tmp_path):
    with trio.fail_after(90):
        async with running_lab(tmp_path, edge_nofile=NOFILE) as lab:
            host, port = split(lab.http)
            keep = await trio.open_tcp_stream(host, port)  # an eyeball connected before the flood
            idle: list[trio.SocketStream] = []
            try:
                for _ in range(NOFILE + 40):  # far more than the edge can accept
                    idle.append(await trio.open_tcp_stream(host, port))
                async with keep:
                    head = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
                    await keep.send_all(head.encode())
                    assert parse_reply(await read_all(keep)).status == 200
                while "cannot accept: EMFILE" not in lab.edge_log.read_text():
                    await trio.sleep(0.05)
            finally:
                for stream in idle:
                    with contextlib.suppress(OSError):
                        await stream.aclose()
            # the queued connections were closed by their clients; new ones are accepted again
            await lab.assert_healthy()
            text = lab.edge_log.read_text()
            assert text.count("cannot accept: EMFILE") == 1
            assert lab.edge.returncode is None

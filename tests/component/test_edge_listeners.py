"""The edge's accept loops: every socket of a listener accepts (trio.serve_listeners), and connection
handlers run in the handler nursery, so they outlive a listener that stopped (graceful shutdown)."""

from __future__ import annotations

import pytest
import trio

from tests.component.test_edge_support import running_edge
from tunnel_lab.edge.server import PatientListener


async def test_every_socket_accepts_and_handlers_outlive_their_listeners(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path) as (edge, nursery):
            hosts = ("127.0.0.1", "127.0.0.2")
            sockets = [(await trio.open_tcp_listeners(0, host=host))[0] for host in hosts]
            addresses = [sock.socket.getsockname()[:2] for sock in sockets]
            accepted: list[str] = []
            both = trio.Event()
            release = trio.Event()
            stopped = trio.Event()

            async def handler(stream: trio.SocketStream) -> None:
                accepted.append(stream.socket.getsockname()[0])
                if len(accepted) == 2:
                    both.set()
                await release.wait()
                await stream.send_all(b"still served")

            scope = trio.CancelScope()

            async def serve() -> None:
                try:
                    with scope:
                        listeners = [PatientListener(sock, "test", 0.1) for sock in sockets]
                        await edge._serve_listeners(handler, listeners)
                finally:
                    stopped.set()

            nursery.start_soon(serve)
            clients = [await trio.open_tcp_stream(host, port) for host, port in addresses]
            await both.wait()
            assert sorted(accepted) == ["127.0.0.1", "127.0.0.2"]
            scope.cancel()  # the listeners stop, as at shutdown ...
            await stopped.wait()
            with pytest.raises(OSError):
                await trio.open_tcp_stream(*addresses[1])
            release.set()  # ... while the connections they accepted are still served
            for client in clients:
                async with client:
                    assert await client.receive_some(100) == b"still served"

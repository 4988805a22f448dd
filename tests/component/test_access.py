"""`access tcp` against a local fake edge that speaks WebSocket (wsproto) on loopback."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from tunnel_lab.connector.access import EdgeTarget, connect_websocket, main, pipe_websocket, serve_access_tcp
from tunnel_lab.wire.errors import ConfigError, OriginError

TIMEOUT = 10


@dataclass
class FakeEdge:
    """Accepts WebSocket upgrades for `routed` hostnames and echoes binary messages reversed per message."""

    routed: str = "tcp.example.test"
    hosts: list[str] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    message_sizes: list[int] = field(default_factory=list)
    closes: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        self.hosts.append(event.host)
                        if event.host != self.routed:
                            await stream.send_all(
                                ws.send(
                                    RejectConnection(
                                        status_code=404, headers=[(b"content-length", b"9")], has_body=True
                                    )
                                )
                            )
                            await stream.send_all(ws.send(RejectData(data=b"no route\n")))
                            return
                        await stream.send_all(ws.send(AcceptConnection()))
                    elif isinstance(event, BytesMessage):
                        self.received += event.data
                        if event.message_finished:
                            self.message_sizes.append(len(event.data))
                        await stream.send_all(ws.send(BytesMessage(data=bytes(event.data)[::-1])))
                    elif isinstance(event, TextMessage):
                        await stream.send_all(ws.send(TextMessage(data=event.data)))
                    elif isinstance(event, CloseConnection):
                        self.closes += 1
                        await stream.send_all(ws.send(event.response()))
                        return
        except trio.BrokenResourceError:
            return
        finally:
            await stream.aclose()

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[:2])
        await trio.serve_listeners(self.handle, listeners)


async def recv_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


async def test_tcp_bytes_travel_as_binary_messages() -> None:
    edge = FakeEdge()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            edge_addr = await nursery.start(edge.serve)
            target = EdgeTarget("tcp.example.test", f"127.0.0.1:{edge_addr[1]}")
            listen = await nursery.start(serve_access_tcp, "127.0.0.1:0", target)
            clients = [await trio.open_tcp_stream(*listen) for _ in range(2)]
            for i, client in enumerate(clients):
                await client.send_all(b"hello %d" % i)
            for i, client in enumerate(clients):
                assert await recv_exactly(client, 7) == (b"hello %d" % i)[::-1]
            await clients[0].send_all(b"\x00\xff")
            assert await recv_exactly(clients[0], 2) == b"\xff\x00"
            for client in clients:
                await client.aclose()
            assert edge.hosts == ["tcp.example.test", "tcp.example.test"]
            assert bytes(edge.received).count(b"hello") == 2
            while edge.closes < 2:  # closing the local socket sends a WebSocket close
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def test_messages_are_at_most_16_kib_as_the_real_client_sends() -> None:
    """cloudflared reads a WebSocket message into 16 KiB and drops the rest: the real `access tcp` sends
    no more than that per message, and neither may ours."""
    edge = FakeEdge()
    payload = bytes(range(256)) * 4096  # 1 MiB
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            edge_addr = await nursery.start(edge.serve)
            target = EdgeTarget("tcp.example.test", f"127.0.0.1:{edge_addr[1]}")
            listen = await nursery.start(serve_access_tcp, "127.0.0.1:0", target)
            client = await trio.open_tcp_stream(*listen)
            nursery.start_soon(client.send_all, payload)
            back = await recv_exactly(client, len(payload))
            assert len(back) == len(payload)
            assert bytes(edge.received) == payload
            assert edge.message_sizes and max(edge.message_sizes) <= 16 * 1024
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_rejected_hostname_closes_the_local_connection(caplog: pytest.LogCaptureFixture) -> None:
    edge = FakeEdge(routed="other.test")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            edge_addr = await nursery.start(edge.serve)
            target = EdgeTarget("tcp.example.test", f"http://127.0.0.1:{edge_addr[1]}")
            listen = await nursery.start(serve_access_tcp, "127.0.0.1:0", target)
            client = await trio.open_tcp_stream(*listen)
            assert await client.receive_some(10) == b""
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert any("HTTP 404" in r.getMessage() and "no route" in r.getMessage() for r in caplog.records)


async def test_open_websocket_errors_name_the_edge() -> None:
    with trio.fail_after(TIMEOUT):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        await listener.aclose()  # nothing listens there any more
        with pytest.raises(OriginError, match=f"127.0.0.1:{port}"):
            await connect_websocket(EdgeTarget("a.test", f"127.0.0.1:{port}"))


async def test_answer_after_local_eof_still_arrives() -> None:
    """stdin/stdout mode: `printf x | access tcp` closes its input first, then reads the answer."""
    import trio.testing

    edge = FakeEdge()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            edge_addr = await nursery.start(edge.serve)
            stream, ws = await connect_websocket(EdgeTarget("tcp.example.test", f"127.0.0.1:{edge_addr[1]}"))
            to_pipe_send, to_pipe_recv = trio.testing.memory_stream_one_way_pair()
            from_pipe_send, from_pipe_recv = trio.testing.memory_stream_one_way_pair()
            await to_pipe_send.send_all(b"abc")
            await to_pipe_send.aclose()  # EOF before any answer came back
            async with stream:
                await pipe_websocket(stream, ws, to_pipe_recv, from_pipe_send)
            assert await from_pipe_recv.receive_some(10) == b"cba"
            assert edge.closes == 1
            nursery.cancel_scope.cancel()


def test_edge_target_parsing() -> None:
    t = EdgeTarget("h.test", None)
    assert (t.host, t.port, t.tls) == ("h.test", 443, True)  # wss://HOSTNAME/ as cloudflared
    t = EdgeTarget("h.test", "https://[::1]:8443/")
    assert (t.host, t.port, t.tls) == ("::1", 8443, True)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        EdgeTarget("h.test", "nonsense")


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["tcp", "--url", "127.0.0.1:0"], 1, "--hostname is required"),
        (["tcp", "--hostname", "h", "--url", "127.0.0.1:0", "--edge-eyeball", "bad"], 1, "HOST:PORT"),
        (["tcp", "--hostname", "h", "--url", "nope", "--edge-eyeball", "127.0.0.1:1"], 1, "not HOST:PORT"),
        (["frobnicate"], 2, "unknown subcommand"),
    ],
)
def test_main_errors(
    argv: list[str],
    code: int,
    needle: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TUNNEL_SERVICE_HOSTNAME", raising=False)
    monkeypatch.delenv("TUNNEL_LAB_EYEBALL", raising=False)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.fixture(autouse=True)
def _restore_root_logger() -> object:
    """`main` installs the connector's log handlers on the root logger; put it back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)

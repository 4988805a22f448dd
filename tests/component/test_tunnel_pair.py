"""The real edge connection against the real connector connection (tests/component/tunnel_pair.py)."""

from __future__ import annotations

import functools
from pathlib import Path

import trio
import trio.testing

from tests.component.connector_edge import RawOrigin, http_rule, rule
from tests.component.tunnel_pair import open_tunnel_pair, request_headers
from tunnel_lab.connector.edge_errors import ConnectionLostError
from tunnel_lab.connector.settings import StreamService, WarpRoutingConfig
from tunnel_lab.connector.websocket import websocket_accept
from tunnel_lab.transport.tunnel import TunnelStream
from tunnel_lab.wire.headers import RESPONSE_HEADERS, deserialize_response_headers, first_value

UPGRADE = ((b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
           (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"Sec-WebSocket-Version", b"13"))


async def _response(stream: TunnelStream) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, origin headers and the whole body of a response, acknowledging as it reads."""
    head = await stream.response_headers()
    status = int(first_value(head, b":status") or b"0")
    origin = deserialize_response_headers(first_value(head, RESPONSE_HEADERS) or b"")
    body = bytearray()
    while (item := await stream.receive()) is not None:
        body += item[0]
        await stream.ack(item[1])
    return status, origin, bytes(body)


async def _read_exactly(stream: TunnelStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        item = await stream.receive()
        assert item is not None, f"stream ended after {len(got)} of {n} bytes"
        got += item[0]
        await stream.ack(item[1])
    return bytes(got)


async def _serve(nursery: trio.Nursery, handler) -> int:  # type: ignore[no-untyped-def]
    async def closing(stream: trio.SocketStream) -> None:
        async with stream:
            await handler(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, closing, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_registration(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_tunnel_pair(tmp_path, (http_rule(9),), local_config_json=b'{"ingress":[]}') as pair:
            registration = pair.edge_conn.registration
            details = pair.connector_conn.details
            assert registration is not None and details is not None
            assert details.uuid == registration.conn_uuid and details.location_name == "LAB1"
            assert registration.tunnel_id == pair.connector_conn.settings.credentials.tunnel_id
            assert registration.connector_id == pair.connector_conn.settings.connector_id
            assert registration.conn_index == 0
            assert [c.id for c in pair.edge.registry.routable(registration.tunnel_id)] == [pair.edge_conn.id]
            assert pair.connector_conn.registered
            # connIndex 0 pushes its local configuration; the edge keeps it per tunnel
            await trio.testing.wait_all_tasks_blocked()  # only memory streams here: nothing left to move
            assert pair.edge.pushed_configs[str(registration.tunnel_id)] == b'{"ingress":[]}'
            state = pair.proxy.state
            assert state.local_config_pushes == 1 and state.local_config_push_errors == 0


async def test_http_request_with_a_body(tmp_path: Path) -> None:
    origin = RawOrigin(lambda rec: b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-Seen: "
                       + str(len(rec.body)).encode() + b"\r\n\r\nmade!")
    body = bytes(range(256)) * 1024  # 256 KiB: several windows' worth of DATA frames
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(origin.serve)
            async with open_tunnel_pair(tmp_path, (http_rule(port),)) as pair:
                headers = request_headers("POST", "/upload?x=1",
                                          ((b"Content-Length", str(len(body)).encode()),))
                stream = await pair.edge_conn.open_stream(headers, end_stream=False)
                await stream.send(body, end=True)
                status, fields, answer = await _response(stream)
                await stream.release()
            nursery.cancel_scope.cancel()
    assert (status, answer) == (201, b"made!")
    assert (b"X-Seen", str(len(body)).encode()) in fields
    [request] = origin.requests
    assert request.request.target == b"/upload?x=1" and request.body == body
    assert pair.edge_conn.active_streams == 0


async def _websocket_echo_origin(stream: trio.SocketStream) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Accept: " + websocket_accept(key) + b"\r\n\r\n")
    while data := await stream.receive_some(65536):  # raw bytes back (frames are the eyeball's business)
        await stream.send_all(data)


async def test_websocket_upgrade_and_bytes_both_ways(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, _websocket_echo_origin)
            async with open_tunnel_pair(tmp_path, (http_rule(port),)) as pair:
                headers = request_headers("GET", "/chat", UPGRADE, websocket=True)
                stream = await pair.edge_conn.open_stream(headers, end_stream=False)
                head = await stream.response_headers()
                assert first_value(head, b":status") == b"200"  # the origin's 101, as cloudflared sends it
                origin = dict(deserialize_response_headers(first_value(head, RESPONSE_HEADERS) or b""))
                assert origin[b"Sec-Websocket-Accept"] == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
                for message in (b"\x81\x05hello", b"\x82\x03\x01\x02\x03" * 1000):
                    await stream.send(message)
                    assert await _read_exactly(stream, len(message)) == message
                await stream.end()
                await stream.release()
            nursery.cancel_scope.cancel()


async def _tcp_echo(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def test_tcp_stream_to_a_private_address(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, _tcp_echo)
            async with open_tunnel_pair(tmp_path, (http_rule(9),), warp_routing=WarpRoutingConfig()) as pair:
                headers = [(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{port}".encode()),
                           (b"cf-cloudflared-proxy-src", b"tcp://192.0.2.1:5555")]
                stream = await pair.edge_conn.open_stream(headers, end_stream=False)
                head = await stream.response_headers()
                assert first_value(head, b":status") == b"200"
                payload = b"ssh-2.0 " * 20000
                await stream.send(payload)
                assert await _read_exactly(stream, len(payload)) == payload
                await stream.end()
                assert await _read_exactly(stream, 0) == b""
                while (item := await stream.receive()) is not None:  # our end ends the pipe there too
                    assert item[0] == b""
                await stream.release()
            nursery.cancel_scope.cancel()


async def test_tcp_service_over_websocket(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, _tcp_echo)
            service = StreamService(scheme="tcp", host="127.0.0.1", port=port)
            async with open_tunnel_pair(tmp_path, (rule(service, f"tcp://127.0.0.1:{port}"),)) as pair:
                headers = request_headers("GET", "/", UPGRADE, websocket=True)
                stream = await pair.edge_conn.open_stream(headers, end_stream=False)
                assert first_value(await stream.response_headers(), b":status") == b"200"
                # a masked binary frame "ping" in; the service's echo comes back as an unmasked frame
                await stream.send(b"\x82\x84\x00\x00\x00\x00ping")
                assert await _read_exactly(stream, 6) == b"\x82\x04ping"
                await stream.release()
            nursery.cancel_scope.cancel()


async def test_drain_lets_the_stream_in_flight_finish(tmp_path: Path) -> None:
    asked, answer = trio.Event(), trio.Event()

    async def slow_origin(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        asked.set()
        await answer.wait()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, slow_origin)
            async with open_tunnel_pair(tmp_path, (http_rule(port),)) as pair:
                stream = await pair.edge_conn.open_stream(request_headers(), end_stream=True)
                await asked.wait()
                pair.shutdown.set()  # SIGTERM: unregister, then serve what is in flight
                await pair.unregistered.wait()  # the edge answered unregisterConnection: it drains
                assert pair.edge_conn.state == "draining" and not pair.edge_conn.routable
                assert pair.connector_conn.active_streams == 1
                answer.set()
                status, _, body = await _response(stream)
                assert (status, body) == (200, b"late")
                await stream.release()
                await pair.connector_done.wait()
                await pair.edge_conn.closed.wait()
                # Not a registration or protocol failure. The edge may close right after the last stream
                # before the connector saw its stream task finish: a lost connection then, which the
                # supervisor ignores once shutting down (as in production).
                assert pair.connector_error is None or isinstance(pair.connector_error, ConnectionLostError)
                assert pair.edge_conn.close_reason == "drained"
                assert pair.edge.registry.all() == []
            nursery.cancel_scope.cancel()

"""The edge's QUIC transport (edge/quic.py) against a scripted connector: a qh3 QUIC client on loopback
UDP that registers on the first stream and answers the edge's data streams, like cloudflared does."""

from __future__ import annotations

import logging
import math
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from qh3.quic import events as qevents
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from tests.component.test_edge_support import LabTunnel, http_request, make_tunnel, running_edge, split
from tunnel_lab.wire import rpc, session_rpc
from tunnel_lab.wire.quic_stream import (
    DATA_STREAM_SIGNATURE,
    ConnectionType,
    ConnectRequest,
    ConnectResponse,
    StreamHeadReader,
    StreamKind,
    connect_response_for_http,
    encode_connect_response,
)
from tunnel_lab.wire.registration import (
    ClientInfo,
    ConnectionDetails,
    ConnectionOptions,
    RegisterConnectionParams,
    RegistrationError,
    TunnelAuth,
)

# A handler gets the ConnectRequest and the request body, and returns the bytes to answer with.
Handler = Callable[[ConnectRequest, bytes], Awaitable[bytes]]


async def echo_handler(request: ConnectRequest, body: bytes) -> bytes:
    answer = connect_response_for_http(200, [(b"Content-Type", b"text/plain"), (b"X-Method", b"")])
    text = f"{request.get('HttpMethod')} {request.dest} {len(body)}".encode()
    return encode_connect_response(answer) + text


class _Incoming:
    """An edge-opened stream as the scripted connector reads it (a data stream, or an RPC stream)."""

    def __init__(self) -> None:
        self.reader = StreamHeadReader(expect="request", allow_rpc=True)
        self.request: ConnectRequest | None = None
        self.rpc: session_rpc.SessionRpcServer | None = None
        self.body = bytearray()
        self.answered = False


class QuicConnector:
    """One QUIC tunnel connection played by the test: qh3 client, RPC client on stream 0."""

    def __init__(self, address: str, cafile: str, handler: Handler = echo_handler, *,
                 alpn: str = "argotunnel", server_name: str = "quic.cftunnel.com") -> None:
        host, port = split(address)
        self.addr = (host, port)
        config = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name=server_name,
                                   max_datagram_frame_size=16383)
        config.load_verify_locations(cafile)
        self.quic = QuicConnection(configuration=config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.handler = handler
        self.rpc = rpc.RpcClient()
        self.rpc_events: list[Any] = []
        self.connected = trio.Event()
        self.closed = trio.Event()
        self.terminated: qevents.ConnectionTerminated | None = None
        self.requests: list[ConnectRequest] = []
        self.resets: list[tuple[int, int]] = []
        self.configs: list[tuple[int, bytes]] = []
        self.stopped: set[int] = set()
        self._wake = trio.lowlevel.ParkingLot()
        self._streams: dict[int, _Incoming] = {}
        self._nursery: trio.Nursery | None = None

    def transmit(self) -> None:
        for data, addr in self.quic.datagrams_to_send(now=trio.current_time()):
            self.sock.sendto(data, addr)
        self._wake.unpark_all()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            self.sock.close()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.quic.connect(self.addr, now=trio.current_time())
        self.transmit()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while not self.closed.is_set():
                timer = self.quic.get_timer()
                with trio.move_on_at(timer if timer is not None else math.inf):
                    await trio.lowlevel.wait_readable(self.sock)
                    while True:
                        try:
                            data, addr = self.sock.recvfrom(65536)
                        except BlockingIOError:
                            break
                        self.quic.receive_datagram(data, addr, now=trio.current_time())
                if timer is not None and trio.current_time() >= timer:
                    self.quic.handle_timer(trio.current_time())
                self._events()
                self.transmit()
            nursery.cancel_scope.cancel()

    def _events(self) -> None:
        events = []
        while (event := self.quic.next_event()) is not None:
            events.append(event)
            if isinstance(event, qevents.StopSendingReceived):
                # qh3 resets our side; like quic-go, write nothing more there (data past the final size
                # would be a connection error at the edge), even for data events of the same batch, and
                # keep qh3 from sending what was written before (edge.quic._hold_unsent says why)
                self.stopped.add(event.stream_id)
                state = self.quic._streams.get(event.stream_id)
                if state is not None:
                    state.is_blocked = True
        for event in events:
            if isinstance(event, qevents.HandshakeCompleted):
                self.connected.set()
            elif isinstance(event, qevents.ConnectionTerminated):
                self.terminated = event
                self.closed.set()
                self.connected.set()
            elif isinstance(event, qevents.StreamReset):
                self.resets.append((event.stream_id, event.error_code))
                self._wake.unpark_all()

            elif isinstance(event, qevents.StreamDataReceived):
                if event.stream_id == 0:
                    self.rpc_events += self.rpc.receive_data(event.data)
                    self._wake.unpark_all()
                else:
                    self._data(event.stream_id, event.data, event.end_stream)

    def _data(self, stream_id: int, data: bytes, end: bool) -> None:
        state = self._streams.setdefault(stream_id, _Incoming())
        if state.rpc is not None:
            self._rpc_stream(stream_id, state.rpc, data)
            return
        if state.request is None:
            head = state.reader.feed(data)
            if head is not None and head.kind is StreamKind.RPC:
                state.rpc = session_rpc.SessionRpcServer()
                self._rpc_stream(stream_id, state.rpc, head.rest)
                return
            if head is not None:
                assert isinstance(head.message, ConnectRequest)
                state.request = head.message
                self.requests.append(head.message)
                state.body += head.rest
        else:
            state.body += data
        # Once only: qh3 repeats the FIN event for a retransmitted frame (tests/unit/test_qh3_pins.py), and a
        # second answer would go to a stream qh3 has already forgotten.
        if end and state.request is not None and not state.answered and self._nursery is not None:
            state.answered = True
            self._nursery.start_soon(self._answer, stream_id, state.request, bytes(state.body))

    def _rpc_stream(self, stream_id: int, server: session_rpc.SessionRpcServer, data: bytes) -> None:
        for event in server.receive_data(data):
            if isinstance(event, session_rpc.UpdateConfigurationCalled):
                self.configs.append((event.version, event.config))
                error = "" if b"ingress" in event.config else "no ingress"
                latest = event.version if not error else -1
                server.answer_update_configuration(event.question_id, latest, error)
        out = server.data_to_send()
        if out and stream_id not in self.stopped:
            self.quic.send_stream_data(stream_id, out)

    async def _answer(self, stream_id: int, request: ConnectRequest, body: bytes) -> None:
        answer = await self.handler(request, body)
        if stream_id in self.stopped:
            return
        self.quic.send_stream_data(stream_id, answer, end_stream=True)
        self.transmit()

    async def register(self, tunnel: LabTunnel, *, secret: bytes | None = None) -> Any:
        with trio.fail_after(5):
            await self.connected.wait()
        params = RegisterConnectionParams(
            auth=TunnelAuth(account_tag=tunnel.account_tag, tunnel_secret=secret or tunnel.secret),
            tunnel_id=tunnel.id, conn_index=0,
            options=ConnectionOptions(
                client=ClientInfo(client_id=uuid.uuid4().bytes, features=("support_quic_eof",),
                                  version="test-quic", arch="linux_amd64"),
                origin_local_ip=b"\0" * 10 + b"\xff\xff\x7f\0\0\1"))
        self.rpc.register_connection(params)
        self.quic.send_stream_data(0, self.rpc.data_to_send())
        self.transmit()
        with trio.fail_after(5):
            while True:
                for ev in self.rpc_events:
                    if isinstance(ev, rpc.RegistrationAnswered):
                        return ev.result
                if self.closed.is_set():
                    raise ConnectionError("closed before the registration answer")
                await self._wake.park()

    def close(self) -> None:
        self.quic.close()
        self.transmit()
        self.closed.set()


async def quic_connector(nursery: trio.Nursery, edge: Any, handler: Handler = echo_handler, *,
                         location: str = "LAB1", **kwargs: Any) -> QuicConnector:
    conn = QuicConnector(edge.listeners[location].quic_address, str(edge.pki.ca_pem_path), handler, **kwargs)
    await nursery.start(conn.run)
    return conn


async def wait_routable(edge: Any, tunnel: LabTunnel) -> None:
    with trio.fail_after(5):
        while not edge.registry.routable(tunnel.id):
            await trio.sleep(0.01)


async def test_registration_and_a_request_over_quic(tmp_path):
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await quic_connector(nursery, edge, location="LAB2")
            result = await conn.register(t)
            assert isinstance(result, ConnectionDetails)
            assert result.location_name == "LAB2"
            await wait_routable(edge, t)
            [listed] = edge.registry.listed()
            assert type(listed).__name__ == "QuicTunnelConnection"
            reply = await http_request(edge.bound["http"], "GET", "/p?q=1", host="app.test",
                                       headers=[(b"x-two", b"a"), (b"X-Two", b"b")])
            assert reply.status == 200
            assert reply.body == b"GET http://app.test/p?q=1 0"
            assert reply.header(b"content-type") == b"text/plain"
            [request] = conn.requests
            assert request.type is ConnectionType.HTTP
            assert request.get("HttpHost") == "app.test"
            assert [v for k, v in request.metadata if k == "HttpHeader:X-Two"] == ["a", "b"]
            reply = await http_request(edge.bound["http"], "POST", "/up", host="app.test", body=b"x" * 70000)
            assert (reply.status, reply.body) == (200, b"POST http://app.test/up 70000")
            conn.close()


async def test_wrong_secret_is_refused_and_closed(tmp_path):
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await quic_connector(nursery, edge)
            result = await conn.register(t, secret=b"y" * 32)
            assert isinstance(result, RegistrationError) and "Unauthorized" in result.cause
            await conn.closed.wait()  # the edge closes the connection after a refusal
            assert edge.registry.listed() == []


async def test_a_malformed_answer_costs_only_its_request(tmp_path, caplog):
    async def handler(request: ConnectRequest, body: bytes) -> bytes:
        if request.dest.endswith("/bad"):
            return b"GET / HTTP/1.1\r\n\r\n"  # not a data-stream signature
        if request.dest.endswith("/noversion"):
            return DATA_STREAM_SIGNATURE + b"x!"
        return await echo_handler(request, body)

    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await quic_connector(nursery, edge, handler)
            assert isinstance(await conn.register(t), ConnectionDetails)
            await wait_routable(edge, t)
            with caplog.at_level(logging.WARNING, logger="tunnel_lab.edge.quic"):
                bad = await http_request(edge.bound["http"], "GET", "/bad", host="app.test")
                noversion = await http_request(edge.bound["http"], "GET", "/noversion", host="app.test")
            assert (bad.status, noversion.status) == (502, 502)
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any("bad ConnectResponse" in w and "unknown stream signature 474554202f20" in w
                       for w in warnings), warnings
            assert any("version b'x!' is not two digits" in w for w in warnings), warnings
            good = await http_request(edge.bound["http"], "GET", "/good", host="app.test")
            assert (good.status, good.body) == (200, b"GET http://app.test/good 0")
            assert edge.registry.routable(t.id)


async def test_an_error_answer_is_the_connectors_502(tmp_path):
    async def handler(request: ConnectRequest, body: bytes) -> bytes:
        return encode_connect_response(ConnectResponse(error="dial tcp 127.0.0.1:1: connection refused",
                                                       metadata=(("HttpStatus", "502"),)))

    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await quic_connector(nursery, edge, handler)
            assert isinstance(await conn.register(t), ConnectionDetails)
            await wait_routable(edge, t)
            reply = await http_request(edge.bound["http"], "GET", "/", host="app.test")
            assert reply.status == 502
            assert b"could not reach the origin" in reply.body


async def test_garbage_and_wrong_alpn_leave_others_alone(tmp_path, caplog):
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            host, port = split(edge.listeners["LAB1"].quic_address)
            with caplog.at_level(logging.WARNING, logger="tunnel_lab.edge.quic"):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
                    for payload in (b"", b"\x00", b"\xff" * 40, b"\xc0\x00\x00\x00\x01" + b"\x08" * 30,
                                    b"\x40" + b"\x11" * 1300):
                        junk.sendto(payload, (host, port))
                wrong = await quic_connector(nursery, edge, alpn="h3")
                with trio.fail_after(5):
                    await wrong.closed.wait()
                assert wrong.terminated is not None and wrong.terminated.error_code != 0
                conn = await quic_connector(nursery, edge)
                assert isinstance(await conn.register(t), ConnectionDetails)
                # The edge's side of the failed handshake ends after QUIC's closing period.
                with trio.fail_after(10):
                    while not any("handshake with a connector failed" in r.getMessage()
                                  for r in caplog.records):
                        await trio.sleep(0.05)
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any("QUIC garbage: dropped a datagram" in w for w in warnings), warnings
            assert any("QUIC handshake with a connector failed" in w for w in warnings), warnings
            await wait_routable(edge, t)
            reply = await http_request(edge.bound["http"], "GET", "/", host="app.test")
            assert reply.status == 200


async def test_a_stream_the_connector_opens_is_refused(tmp_path, caplog):
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await quic_connector(nursery, edge)
            assert isinstance(await conn.register(t), ConnectionDetails)
            with caplog.at_level(logging.WARNING, logger="tunnel_lab.edge.quic"):
                stream_id = conn.quic.get_next_available_stream_id()
                conn.quic.send_stream_data(stream_id, b"hello")
                conn.transmit()
                with trio.fail_after(5):
                    while not conn.resets:
                        await conn._wake.park()
            assert conn.resets[0][0] == stream_id
            assert any("connector opened QUIC stream" in r.getMessage() for r in caplog.records)
            await wait_routable(edge, t)


async def test_no_quic_means_no_udp_listener(tmp_path):
    async with running_edge(tmp_path, quic=False) as (edge, _):
        assert all(lst.quic_address == "" for lst in edge.listeners.values())


async def test_configuration_push_over_an_rpc_stream(tmp_path):
    import json

    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            conn = await quic_connector(nursery, edge)
            assert isinstance(await conn.register(t), ConnectionDetails)
            await wait_routable(edge, t)
            [tunnel_conn] = edge.registry.routable(t.id)
            config = {"ingress": [{"service": "http_status:404"}]}
            assert await tunnel_conn.push_configuration(7, json.dumps(config).encode()) == (7, "")
            assert await tunnel_conn.push_configuration(8, b"{}") == (-1, "no ingress")
            assert conn.configs == [(7, json.dumps(config).encode()), (8, b"{}")]
            # the management API does the same
            from tunnel_lab.lab.api import management_call

            body = {"version": 9, "config": config}
            answer = await management_call(edge.bound["api"], edge.api_token, "POST",
                                           f"/tunnels/{t.id}/configuration", body)
            assert tunnel_conn.registration is not None
            assert answer == [{"connection": tunnel_conn.id,
                               "connector_id": str(tunnel_conn.registration.connector_id),
                               "lastAppliedVersion": 9, "err": None}]
            assert len(conn.configs) == 3
            # a tunnel with no connector running: nothing to push to
            other = make_tunnel(edge, "t2", "other.test")
            assert await management_call(edge.bound["api"], edge.api_token, "POST",
                                         f"/tunnels/{other.id}/configuration", body) == []
            assert tunnel_conn.streams == {} and tunnel_conn.raw_streams == {}


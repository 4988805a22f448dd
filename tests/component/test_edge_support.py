"""Support for the edge's component tests: a running edge in-process, and a scripted connector.

The scripted connector dials the edge over loopback TLS (lab CA, SNI h2.cftunnel.com), is the
HTTP/2 *server* (h2, client_side=False) and the RPC client (wire.rpc.RpcClient) on stream 1, like
cloudflared. Each request stream the edge opens is handed to a test-supplied handler.
No tests live here.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.events
import h2.exceptions
import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings

from tunnel_lab.edge.config import Address, EdgeConfig, TunnelListen
from tunnel_lab.edge.server import Edge, serve_edge
from tunnel_lab.wire import rpc
from tunnel_lab.wire.headers import (
    META_CLOUDFLARED,
    META_ORIGIN,
    RESPONSE_HEADERS,
    RESPONSE_META,
    serialize_response_headers,
)
from tunnel_lab.wire.registration import ClientInfo, ConnectionOptions, RegisterConnectionParams, TunnelAuth

Headers = list[tuple[bytes, bytes]]
_OPEN: list[trio.abc.AsyncResource] = []  # transports the helpers opened, closed by running_edge


def edge_config(state: Path, **overrides: Any) -> EdgeConfig:
    """A test edge: two data centres on 127.0.0.1 and 127.0.0.2, HTTP + API on port 0."""
    values: dict[str, Any] = dict(
        state_dir=state,
        tunnel_listens=(TunnelListen("LAB1", Address("127.0.0.1", 0)),
                        TunnelListen("LAB2", Address("127.0.0.2", 0))),
        http_listens=(Address("127.0.0.1", 0),),
        api_listen=Address("127.0.0.1", 0),
        refusal_close_delay=0.05,
        drain_timeout=5.0,
        shutdown_timeout=2.0,
    )
    values.update(overrides)
    return EdgeConfig(**values)


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class LabTunnel:
    id: uuid.UUID
    name: str
    account_tag: str
    secret: bytes


def make_tunnel(edge: Edge, name: str, *hostnames: str) -> LabTunnel:
    """Create a tunnel in the edge's store and route hostnames to it."""
    store = edge.tunnels.store
    t = store.create_tunnel(name)
    for host in hostnames:
        store.route_dns(t, host)
    return LabTunnel(t.id, t.name, t.account_tag, t.secret)


class ServerStream:
    """A request stream as the scripted connector sees it."""

    def __init__(self, conn: ScriptedConnector, stream_id: int, headers: Headers, ended: bool) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self.ended = ended
        self.reset_code: int | None = None
        self.chunks: deque[bytes] = deque()
        self.lot = trio.lowlevel.ParkingLot()
        self.trailers: Headers | None = None

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    async def read(self) -> bytes | None:
        """Next body chunk (acknowledged as it is taken), None at END_STREAM."""
        while not self.chunks:
            if self.ended:
                return None
            if self.reset_code is not None:
                raise ConnectionResetError(f"edge reset stream {self.id}: {self.reset_code}")
            await self.lot.park()
        data = self.chunks.popleft()
        if data:
            self.conn.h2.acknowledge_received_data(len(data), self.id)
            await self.conn.flush()
        return data

    async def read_all(self) -> bytes:
        out = bytearray()
        while (chunk := await self.read()) is not None:
            out += chunk
        return bytes(out)

    async def respond(self, status: int, headers: Headers = (), *, end: bool = False,  # type: ignore[assignment]
                      meta: bytes = META_ORIGIN, raw: Headers | None = None) -> None:
        """Send response HEADERS the way cloudflared does (serialized origin headers + meta)."""
        fields = raw if raw is not None else [
            (b":status", str(status).encode()),
            (RESPONSE_HEADERS, serialize_response_headers(list(headers))),
            (RESPONSE_META, meta),
        ]
        self.conn.h2.send_headers(self.id, fields, end_stream=end)
        await self.conn.flush()

    async def respond_error(self, status: int = 502) -> None:
        fields = [(b":status", str(status).encode()), (RESPONSE_META, META_CLOUDFLARED),
                  (b"content-length", b"0")]
        self.conn.h2.send_headers(self.id, fields, end_stream=True)
        await self.conn.flush()

    async def send(self, data: bytes, *, end: bool = False) -> None:
        """Send DATA honouring the edge's windows."""
        view = memoryview(data)
        while view:
            h2c = self.conn.h2
            window = min(h2c.local_flow_control_window(self.id), h2c.max_outbound_frame_size)
            if window <= 0:
                await self.conn.window_lot.park()
                continue
            chunk, view = bytes(view[:window]), view[window:]
            self.conn.h2.send_data(self.id, chunk, end_stream=end and not view)
            await self.conn.flush()
        if end and not data:
            self.conn.h2.end_stream(self.id)
            await self.conn.flush()

    async def send_trailers(self, trailers: Headers) -> None:
        self.conn.h2.send_headers(self.id, trailers, end_stream=True)
        await self.conn.flush()

    async def reset(self, code: int = 2) -> None:
        self.conn.h2.reset_stream(self.id, code)
        await self.conn.flush()


Handler = Callable[[ServerStream], Awaitable[None]]


class ScriptedConnector:
    """One tunnel connection played by the test: h2 server + RPC client over TLS."""

    def __init__(self, transport: trio.abc.Stream, handler: Handler | None = None, *,
                 max_concurrent_streams: int | None = None, initial_window: int = 1048576) -> None:
        self.transport = transport
        self.handler = handler
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        values = {SettingCodes.INITIAL_WINDOW_SIZE: initial_window, SettingCodes.MAX_FRAME_SIZE: 16384,
                  SettingCodes.MAX_HEADER_LIST_SIZE: 1048896}
        if max_concurrent_streams is not None:
            values[SettingCodes.MAX_CONCURRENT_STREAMS] = max_concurrent_streams
        self.h2.local_settings = Settings(client=False, initial_values=values)
        self.rpc = rpc.RpcClient()
        self.rpc_events: list[Any] = []
        self.rpc_lot = trio.lowlevel.ParkingLot()
        self.window_lot = trio.lowlevel.ParkingLot()
        self.streams: dict[int, ServerStream] = {}
        self.lock = trio.Lock()
        self.closed = trio.Event()
        self.goaway: Any = None
        self.control_headers: Headers | None = None
        self.control_answered = False
        self.opened: list[int] = []

    async def flush(self) -> None:
        async with self.lock:
            data = self.h2.data_to_send()
            if data:
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.transport.send_all(data)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.h2.initiate_connection()
        await self.flush()
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        data = await self.transport.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        break
                    for event in self.h2.receive_data(data):
                        await self._event(event, nursery)
                    await self.flush()
                nursery.cancel_scope.cancel()
        finally:
            self.closed.set()
            for s in self.streams.values():
                if s.reset_code is None:
                    s.reset_code = -1
                s.lot.unpark_all()
            self.rpc_lot.unpark_all()

    async def _event(self, event: Any, nursery: trio.Nursery) -> None:
        if isinstance(event, h2.events.RequestReceived):
            headers = list(event.headers)
            if event.stream_id == 1:
                self.control_headers = headers
                return
            self.opened.append(event.stream_id)
            s = ServerStream(self, event.stream_id, headers, ended=event.stream_ended is not None)
            self.streams[event.stream_id] = s
            if self.handler is not None:
                nursery.start_soon(self._run_handler, s)
        elif isinstance(event, h2.events.DataReceived):
            if event.stream_id == 1:
                self.h2.acknowledge_received_data(event.flow_controlled_length, 1)
                self.rpc_events += self.rpc.receive_data(event.data)
                self.rpc_lot.unpark_all()
                return
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.chunks.append(event.data)
                if event.flow_controlled_length > len(event.data):
                    self.h2.acknowledge_received_data(event.flow_controlled_length - len(event.data),
                                                      event.stream_id)
                s.lot.unpark_all()
        elif isinstance(event, h2.events.StreamEnded):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.ended = True
                s.lot.unpark_all()
        elif isinstance(event, h2.events.TrailersReceived):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamReset):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.reset_code = int(event.error_code)
                s.lot.unpark_all()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window_lot.unpark_all()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    async def _run_handler(self, s: ServerStream) -> None:
        assert self.handler is not None
        with suppress(ConnectionResetError, h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            await self.handler(s)

    async def _send_rpc(self) -> None:
        out = self.rpc.data_to_send()
        if not out:
            return
        if not self.control_answered:
            self.h2.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/octet-stream")])
            self.control_answered = True
        self.h2.send_data(1, out)
        await self.flush()

    async def wait_rpc(self, kind: type, timeout: float = 5) -> Any:
        with trio.fail_after(timeout):
            while True:
                for ev in self.rpc_events:
                    if isinstance(ev, kind):
                        self.rpc_events.remove(ev)
                        return ev
                if self.closed.is_set():
                    raise ConnectionError("connection closed while waiting for RPC")
                await self.rpc_lot.park()

    async def register(self, tunnel: LabTunnel, *, conn_index: int = 0, connector_id: uuid.UUID | None = None,
                       secret: bytes | None = None, account_tag: str | None = None) -> Any:
        """registerConnection; returns the result (ConnectionDetails or RegistrationError)."""
        with trio.fail_after(5):
            while self.control_headers is None:
                if self.closed.is_set():
                    raise ConnectionError("closed before the control stream")
                await trio.sleep(0.005)
        params = RegisterConnectionParams(
            auth=TunnelAuth(account_tag=account_tag if account_tag is not None else tunnel.account_tag,
                            tunnel_secret=secret if secret is not None else tunnel.secret),
            tunnel_id=tunnel.id, conn_index=conn_index,
            options=ConnectionOptions(
                client=ClientInfo(client_id=(connector_id or uuid.uuid4()).bytes,
                                  features=("serialized_headers", "allow_remote_config"),
                                  version="test-1.0", arch="linux_amd64"),
                origin_local_ip=b"\0" * 10 + b"\xff\xff\x7f\0\0\1"))
        self.rpc.register_connection(params)
        await self._send_rpc()
        answer = await self.wait_rpc(rpc.RegistrationAnswered)
        return answer.result

    async def push_config(self, config: dict[str, Any]) -> None:
        self.rpc.update_local_configuration(json.dumps(config).encode())
        await self._send_rpc()
        await self.wait_rpc(rpc.CallReturned)

    async def unregister(self) -> None:
        self.rpc.unregister_connection()
        await self._send_rpc()
        await self.wait_rpc(rpc.CallReturned)


async def dial_edge(edge: Edge, location: str = "LAB1", *, server_name: str = "h2.cftunnel.com"
                    ) -> trio.SSLStream[trio.SocketStream]:
    lst = edge.listeners[location]
    tcp = await trio.open_tcp_stream(lst.host, lst.port)
    tls = trio.SSLStream(tcp, edge.pki.client_ssl_context(), server_hostname=server_name)
    try:
        await tls.do_handshake()
    except BaseException:
        await tcp.aclose()
        raise
    return tls


@asynccontextmanager
async def connector(nursery: trio.Nursery, edge: Edge, handler: Handler | None = None, *,
                    location: str = "LAB1", **kwargs: Any) -> Any:
    """A connected (not yet registered) scripted connector."""
    tls = await dial_edge(edge, location)
    conn = ScriptedConnector(tls, handler, **kwargs)
    await nursery.start(conn.run)
    try:
        yield conn
    finally:
        with trio.CancelScope(shield=True):
            await tls.aclose()


async def registered(nursery: trio.Nursery, edge: Edge, tunnel: LabTunnel, handler: Handler, *,
                     location: str = "LAB1", conn_index: int = 0, **kwargs: Any) -> ScriptedConnector:
    """Dial, register, and wait until the edge routes to the connection."""
    tls = await dial_edge(edge, location)
    _OPEN.append(tls)
    conn = ScriptedConnector(tls, handler, **kwargs)
    await nursery.start(conn.run)
    result = await conn.register(tunnel, conn_index=conn_index)
    assert type(result).__name__ == "ConnectionDetails", result
    return conn


class _Errors(logging.Handler):
    """Collects ERROR records of the edge's loggers: an internal error fails the test."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@asynccontextmanager
async def running_edge(tmp_path: Path, **overrides: Any) -> Any:
    errors = _Errors()
    logging.getLogger("tunnel_lab.edge").addHandler(errors)
    try:
        async with _running_edge(tmp_path, **overrides) as pair:
            yield pair
    finally:
        logging.getLogger("tunnel_lab.edge").removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]


@asynccontextmanager
async def _running_edge(tmp_path: Path, **overrides: Any) -> Any:
    async with trio.open_nursery() as nursery:
        edge: Edge = await nursery.start(serve_edge, edge_config(tmp_path / "state", **overrides))
        try:
            yield edge, nursery
        finally:
            edge.request_shutdown()
            with trio.move_on_after(5):
                await edge.stopped.wait()
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                while _OPEN:
                    await _OPEN.pop().aclose()


# ---- a tiny HTTP/1.1 eyeball client ----------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: Headers
    body: bytes
    complete: bool = True

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)


async def http_request(address: str, method: str, path: str, *, host: str, headers: Headers = (),  # type: ignore[assignment]
                       body: bytes | None = None, chunks: list[bytes] | None = None) -> Reply:
    """One HTTP/1.1 request with h11 (Connection: close); `complete` False if the body was cut."""
    import h11

    hostname, port = split(address)
    stream = await trio.open_tcp_stream(hostname, port)
    conn = h11.Connection(h11.CLIENT)
    hdrs = [(b"host", host.encode()), (b"connection", b"close"), *headers]
    if body is not None:
        hdrs.append((b"content-length", str(len(body)).encode()))
    elif chunks is not None:
        hdrs.append((b"transfer-encoding", b"chunked"))
    async with stream:
        await stream.send_all(conn.send(h11.Request(method=method, target=path, headers=hdrs)))
        if body:
            await stream.send_all(conn.send(h11.Data(data=body)))
        for chunk in chunks or []:
            await stream.send_all(conn.send(h11.Data(data=chunk)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        status, rheaders, out = 0, [], bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return Reply(status, rheaders, bytes(out), complete=False)
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    try:
                        conn.receive_data(b"")
                    except h11.RemoteProtocolError:
                        return Reply(status, rheaders, bytes(out), complete=False)
                    continue
                conn.receive_data(data)
                continue
            if isinstance(event, h11.RemoteProtocolError):
                return Reply(status, rheaders, bytes(out), complete=False)
            if isinstance(event, h11.Response):
                status, rheaders = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                out += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Reply(status, rheaders, bytes(out))
            elif isinstance(event, h11.ConnectionClosed):
                return Reply(status, rheaders, bytes(out), complete=False)


async def echo_handler(s: ServerStream) -> None:
    """Answer with the request as JSON: method, path, authority, headers, body length."""
    body = await s.read_all() if not s.ended or s.chunks else b""
    payload = json.dumps({
        "headers": [[n.decode(), v.decode("latin-1")] for n, v in s.headers],
        "body_length": len(body), "body": body[:4096].decode("latin-1"),
        "trailers": [[n.decode(), v.decode()] for n, v in (s.trailers or [])],
    }).encode()
    await s.respond(200, [(b"Content-Type", b"application/json"), (b"X-Origin", b"echo"),
                          (b"Content-Length", str(len(payload)).encode())])
    await s.send(payload, end=True)


async def wait_history(edge: Edge, count: int) -> list[dict[str, Any]]:
    """The history once it holds `count` entries (records are written just after the response)."""
    with trio.fail_after(5):
        while len(edge.history.since(0)) < count:
            await trio.sleep(0.01)
    return edge.history.since(0)

"""A scripted edge for the connector's component tests: TLS server (trustme CA), HTTP/2 client, RPC server.

Each accepted connection is an `EdgeSide`: it opens the control stream, answers the RPC through
`wire.rpc.RpcServer` (registration decided by the test's `decide` callable) and lets the test open
request streams and read what the connector answers. Also: a raw HTTP/1.1 origin that records the exact
bytes it receives, and helpers to build `TunnelSettings`.
"""

from __future__ import annotations

import contextlib
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11
import trio
import trustme

from tunnel_lab.connector.settings import (
    HTTPService,
    IngressRule,
    OriginRequestConfig,
    Service,
    StatusService,
    TunnelSettings,
)
from tunnel_lab.wire.credentials import Credentials
from tunnel_lab.wire.registration import ConnectionDetails, RegisterConnectionParams, RegistrationError
from tunnel_lab.wire.rpc import (
    RegisterConnectionCalled,
    RpcAborted,
    RpcServer,
    UnregisterConnectionCalled,
    UpdateLocalConfigurationCalled,
)

TUNNEL_ID = uuid.UUID("6ff42ae2-765d-4adf-8112-31c55c1551ef")
CREDS = Credentials(
    account_tag="0123456789abcdef0123456789abcdef", tunnel_secret=bytes(range(32)), tunnel_id=TUNNEL_ID
)

Decision = Callable[[RegisterConnectionParams, int], ConnectionDetails | RegistrationError]


def accept_all(params: RegisterConnectionParams, attempt: int) -> ConnectionDetails | RegistrationError:
    return ConnectionDetails(uuid=uuid.uuid4(), location_name="LAB1")


@dataclass
class Response:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class EdgeStream:
    """The edge's view of one request stream."""

    def __init__(self, side: EdgeSide, stream_id: int) -> None:
        self.side = side
        self.stream_id = stream_id
        self.response = Response()
        self.changed = trio.Event()
        self.auto_ack = True

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def send(self, data: bytes, *, end_stream: bool = False) -> None:
        await self.side.send_data(self.stream_id, data, end_stream=end_stream)

    async def wait(self, predicate: Callable[[Response], bool]) -> Response:
        while not predicate(self.response):
            await self.changed.wait()
        return self.response

    async def headers(self) -> Response:
        return await self.wait(lambda r: r.status is not None or r.reset is not None)

    async def finished(self) -> Response:
        return await self.wait(lambda r: r.ended or r.reset is not None)

    async def wait_body(self, n: int) -> bytes:
        await self.wait(lambda r: len(r.body) >= n or r.ended or r.reset is not None)
        return bytes(self.response.body)


class EdgeSide:
    """One connection the connector dialled, seen from the edge."""

    def __init__(self, edge: FakeEdge, stream: trio.SSLStream[trio.SocketStream], index: int) -> None:
        self.edge = edge
        self.stream = stream
        self.index = index
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        # like the lab edge: room for large serialized response headers (D13)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 20,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.h2.decoder.max_header_list_size = 1 << 20
        self.rpc = RpcServer()
        self.streams: dict[int, EdgeStream] = {}
        self.registered = trio.Event()
        self.unregistered = trio.Event()
        self.rpc_aborted = trio.Event()
        self.closed = trio.Event()
        self.params: RegisterConnectionParams | None = None
        self.local_config: bytes | None = None
        self.control_response: list[tuple[bytes, bytes]] | None = None
        self.control_ended = False
        self.goaway: int | None = None
        self.answer_unregister = True
        self.remote_settings: dict[int, int] = {}
        self._lock = trio.Lock()
        self._window = trio.Event()
        self._control_backlog = bytearray()

    async def flush(self) -> None:
        async with self._lock:
            data = self.h2.data_to_send()
            if data:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.stream.send_all(data)

    async def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        view = memoryview(data)
        while True:
            try:
                window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            except h2.exceptions.ProtocolError:
                return
            if len(view) and window <= 0:
                await self._window.wait()
                continue
            chunk, view = view[:window], view[window:]
            try:
                self.h2.send_data(stream_id, bytes(chunk), end_stream=end_stream and not len(view))
            except h2.exceptions.ProtocolError:  # the connector closed or reset it meanwhile
                return
            await self.flush()
            if not len(view):
                return

    async def open(self, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False) -> EdgeStream:
        stream_id = self.h2.get_next_available_stream_id()
        es = EdgeStream(self, stream_id)
        self.streams[stream_id] = es
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        await self.flush()
        return es

    async def request(self, headers: list[tuple[bytes, bytes]], body: bytes | None = None) -> Response:
        es = await self.open(headers, end_stream=body is None)
        if body is not None:
            await es.send(body, end_stream=True)
        return await es.finished()

    async def close(self) -> None:
        await self.stream.aclose()

    async def run(self) -> None:
        self.h2.initiate_connection()
        await self.flush()
        ctrl = self.h2.get_next_available_stream_id()
        self.control_id = ctrl
        self.h2.send_headers(
            ctrl,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", b"cftunnel.com"),
                (b":path", b"/"),
                (b"cf-cloudflared-proxy-connection-upgrade", b"control-stream"),
            ],
        )
        await self.flush()
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    await self.flush()
                    break
                for ev in events:
                    await self._event(ev)
                await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed.set()
            for es in self.streams.values():
                es._notify()

    async def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            for code, change in ev.changed_settings.items():
                self.remote_settings[int(code)] = change.new_value
            self._wake()
        elif isinstance(ev, h2.events.WindowUpdated):
            self._wake()
        elif isinstance(ev, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            if ev.stream_id == self.control_id:
                self.control_response = list(ev.headers or [])
                return
            es = self.streams.get(ev.stream_id or 0)
            if es is not None and isinstance(ev, h2.events.ResponseReceived):
                es.response.headers = [(bytes(k), bytes(v)) for k, v in ev.headers or []]
                es.response.status = int(dict(es.response.headers)[b":status"])
                es._notify()
        elif isinstance(ev, h2.events.TrailersReceived):
            es = self.streams.get(ev.stream_id or 0)
            if es is not None:
                es.response.trailers = [(bytes(k), bytes(v)) for k, v in ev.headers or []]
        elif isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id or 0
            if sid == self.control_id:
                self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
                for rpc_ev in self.rpc.receive_data(ev.data or b""):
                    await self._rpc_event(rpc_ev)
                    self.edge._notify()
                self._queue_control(self.rpc.data_to_send())
                return
            es = self.streams.get(sid)
            if es is not None:
                es.response.body += ev.data or b""
                if es.auto_ack:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
                es._notify()
            else:
                self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
        elif isinstance(ev, h2.events.StreamEnded):
            if ev.stream_id == self.control_id:
                self.control_ended = True
                self.edge._notify()
                return
            es = self.streams.get(ev.stream_id or 0)
            if es is not None:
                es.response.ended = True
                es._notify()
        elif isinstance(ev, h2.events.StreamReset):
            if ev.stream_id == self.control_id:
                return
            es = self.streams.get(ev.stream_id or 0)
            if es is not None:
                es.response.reset = int(ev.error_code or 0)
                es._notify()
            self._wake()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = int(ev.error_code or 0)
            self.edge._notify()

    def _wake(self) -> None:
        self._window.set()
        self._window = trio.Event()
        self._pump_control()

    def _queue_control(self, data: bytes) -> None:
        """RPC bytes for the control stream, sent as far as the flow-control windows allow now and the rest
        as WINDOW_UPDATEs arrive. The reader calls this: it must never wait for window itself, since the
        WINDOW_UPDATE that would open it is behind it in the socket."""
        self._control_backlog += data
        self._pump_control()

    def _pump_control(self) -> None:
        while self._control_backlog:
            try:
                window = min(self.h2.local_flow_control_window(self.control_id),
                             self.h2.max_outbound_frame_size)
                if window <= 0:
                    return
                chunk = bytes(self._control_backlog[:window])
                self.h2.send_data(self.control_id, chunk)
            except h2.exceptions.ProtocolError:  # the control stream is gone
                self._control_backlog.clear()
                return
            del self._control_backlog[:len(chunk)]

    async def _rpc_event(self, ev: object) -> None:
        if isinstance(ev, RegisterConnectionCalled):
            self.params = ev.params
            attempt = len(self.edge.attempts)
            self.edge.attempts.append(ev.params)
            result = self.edge.decide(ev.params, attempt)
            self.rpc.answer_registration(ev.question_id, result)
            if isinstance(result, ConnectionDetails):
                self.registered.set()
                self.edge.registered.append(self)
                self.edge._notify()
            else:
                self.edge.refused += 1
                self._queue_control(self.rpc.data_to_send())
                await self.flush()
                # like the real edge: close shortly after a refusal
                self.edge.nursery.start_soon(self._close_soon)
        elif isinstance(ev, UpdateLocalConfigurationCalled):
            self.local_config = ev.config
            self.rpc.answer_empty(ev.question_id)
        elif isinstance(ev, UnregisterConnectionCalled):
            self.unregistered.set()
            if self.answer_unregister:
                self.rpc.answer_empty(ev.question_id)
            self.edge._notify()
        elif isinstance(ev, RpcAborted):
            self.rpc_aborted.set()

    async def _close_soon(self) -> None:
        if self.edge.close_delay:
            await trio.sleep(self.edge.close_delay)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        await self.flush()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.aclose()


class FakeEdge:
    """TLS listener(s) speaking the edge's side of the tunnel protocol."""

    def __init__(self, ca: trustme.CA, *, decide: Decision = accept_all) -> None:
        self.ca = ca
        self.decide = decide
        self.sides: list[EdgeSide] = []
        self.registered: list[EdgeSide] = []
        self.attempts: list[RegisterConnectionParams] = []
        self.accepted = 0
        self.refused = 0
        self.close_delay = 0.05  # after a refused registration
        self.changed = trio.Event()
        cert = ca.issue_cert("h2.cftunnel.com", "cftunnel.com")
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.ctx)
        self.nursery: trio.Nursery

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self.changed.wait()

    async def serve(
        self, host: str = "127.0.0.1", *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host=host)
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started(f"{host}:{port}")
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        self.accepted += 1
        self._notify()
        stream = trio.SSLStream(tcp, self.ctx, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            return
        side = EdgeSide(self, stream, len(self.sides))
        self.sides.append(side)
        self._notify()
        await side.run()
        self._notify()


# -------------------------------------------------------------------------------------------------
# A raw HTTP/1.1 origin


@dataclass
class OriginRequestRecord:
    raw: bytes
    request: h11.Request
    body: bytes
    connection: int


class RawOrigin:
    """Records the exact bytes of every request; answers with `respond(record) -> bytes` (raw response)."""

    def __init__(
        self,
        respond: Callable[[OriginRequestRecord], bytes] | None = None,
        *,
        close_after_response: bool = False,
    ) -> None:
        self.close_after_response = close_after_response
        self.requests: list[OriginRequestRecord] = []
        self.connections = 0
        self.respond = respond or (
            lambda rec: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Origin: raw\r\n\r\nok"
        )
        self.changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn_no = self.connections
        conn = h11.Connection(h11.SERVER)
        raw = bytearray()
        req: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    raw += data
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    req = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert req is not None
                    leftover = len(conn.trailing_data[0])
                    consumed = bytes(raw[: len(raw) - leftover])
                    del raw[: len(raw) - leftover]
                    rec = OriginRequestRecord(consumed, req, bytes(body), conn_no)
                    self.requests.append(rec)
                    self.changed.set()
                    self.changed = trio.Event()
                    await stream.send_all(self.respond(rec))
                    if self.close_after_response:
                        await stream.aclose()
                        return
                    # hand the raw bytes over to a fresh parser (we write responses ourselves)
                    conn = h11.Connection(h11.SERVER)
                    pending = bytes(raw)
                    if pending:
                        conn.receive_data(pending)
                    req, body = None, bytearray()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return


# -------------------------------------------------------------------------------------------------
# Settings


def rule(
    service: Service,
    text: str,
    *,
    index: int = 0,
    hostname: str | None = None,
    path: str | None = None,
    **origin_request: Any,
) -> IngressRule:
    return IngressRule(
        index=index,
        hostname=hostname,
        path=path,
        service=service,
        service_text=text,
        origin_request=OriginRequestConfig(**origin_request),
    )


def http_rule(port: int, **origin_request: Any) -> IngressRule:
    return rule(
        HTTPService(scheme="http", host="127.0.0.1", port=port), f"http://127.0.0.1:{port}", **origin_request
    )


def status_rule(status: int = 503) -> IngressRule:
    return rule(StatusService(status=status), f"http_status:{status}")


FAST_KNOBS: dict[str, float] = {"backoff_base": 0.05, "supervisor_backoff_base": 0.05}


def make_settings(
    ca_path: Path, edges: list[str], rules: tuple[IngressRule, ...], **kw: Any
) -> TunnelSettings:
    # Retries back off 50 ms instead of seconds, so reconnect paths run in test time.
    opts: dict[str, Any] = {"grace_period": 2.0, "retries": 3, "rpc_timeout": 2.0, **FAST_KNOBS}
    opts.update(kw)
    return TunnelSettings(
        credentials=CREDS, edge_addrs=tuple(edges), ca_cert=str(ca_path), ingress_rules=rules, **opts
    )


def get(
    path: str = "/",
    authority: str = "app.example.test",
    method: str = "GET",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
        *(extra or []),
    ]


# -------------------------------------------------------------------------------------------------
# Running the connector in-process


@dataclass
class Running:
    handle: object
    code: list[int]
    done: trio.Event

    async def exit_code(self) -> int:
        await self.done.wait()
        return self.code[0]


async def start_connector(nursery: trio.Nursery, settings: TunnelSettings) -> Running:
    """Start `run_tunnel` (no signal handling) and return its handle and future exit code."""
    from tunnel_lab.connector.runtime import run_tunnel

    code: list[int] = []
    done = trio.Event()

    async def runner(task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            code.append(await run_tunnel(settings, task_status=task_status, handle_signals=False))
        finally:
            done.set()

    handle = await nursery.start(runner)
    return Running(handle, code, done)


def make_ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


def count_request_streams(side: EdgeSide) -> int:
    """Request streams the edge's HTTP/2 state machine still holds open (the control stream not counted)."""
    return sum(1 for sid, st in list(side.h2.streams.items()) if sid != side.control_id and st.open)


def connector_streams(running: Running, index: int = 0) -> int:
    """The connector's own count of active request streams on connection `index` (0 when it is gone)."""
    conn = running.handle.supervisor.connections.get(index)  # type: ignore[attr-defined]
    return 0 if conn is None else conn.active_streams


async def wait_until(predicate: Callable[[], bool]) -> None:
    """For state that has no event to wait on: re-check after every scheduler pass (callers bound it
    with `fail_after`). `trio.testing.wait_all_tasks_blocked` stands in for "nothing more happens"."""
    while not predicate():
        await trio.sleep(0.005)


async def wait_ready(running: Running, n: int = 1) -> None:
    """Until the connector itself counts `n` registered connections."""
    while running.handle.ready_connections != n:  # type: ignore[attr-defined]
        await trio.sleep(0.005)

"""The connector's management service over loopback: the HTTP routes, and `/logs` streaming log lines
over a WebSocket with cloudflared's session protocol (connector/management.py)."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import h11
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Request, TextMessage

from tunnel_lab.connector import management as m
from tunnel_lab.connector.state import ConnectorState

TIMEOUT = 10
CONNECTOR_ID = uuid.UUID("8edfe971-f0df-4522-8bc2-4808ff9298f5")
log = logging.getLogger("tunnel_lab.connector.test_component")


def token(actor: str = "me") -> str:
    def b64(doc: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    claims = {"tun": {"id": "t", "account_tag": "a"}, "actor": {"id": actor}}
    return f"{b64({'alg': 'ES256'})}.{b64(claims)}.c2ln"


@pytest.fixture
async def service(nursery: trio.Nursery) -> AsyncIterator[tuple[str, int]]:
    hub = m.ManagementHub()
    config = m.ManagementConfig(connector_id=str(CONNECTOR_ID), label="box", service_ip="127.0.0.1:7844")
    addr = await nursery.start(m.serve_management, hub, config, ConnectorState(connector_id=CONNECTOR_ID))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    m.install(hub)
    try:
        yield addr
    finally:
        m.uninstall(hub)
        root.setLevel(level)


async def get(addr: tuple[str, int], target: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(conn.send(h11.Request(method="GET", target=target, headers=[("Host", "m")])))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body


async def test_http_routes(service: tuple[str, int]) -> None:
    with trio.fail_after(TIMEOUT):
        status, body = await get(service, "/ping")
        assert (status, json.loads(body)) == (
            400,
            {"errors": [{"code": 1001, "message": "missing access_token query parameter"}]},
        )
        assert (await get(service, "/ping?access_token=not-a-jwt"))[0] == 400
        assert await get(service, f"/ping?access_token={token()}") == (200, b"")
        status, body = await get(service, f"/host_details?access_token={token()}")
        assert json.loads(body) == {
            "connector_id": str(CONNECTOR_ID),
            "ip": "127.0.0.1",
            "hostname": "custom:box",
        }
        status, body = await get(service, f"/metrics?access_token={token()}")
        assert status == 200 and b"cloudflared_tunnel_total_requests" in body
        assert await get(service, f"/nope?access_token={token()}") == (404, b"404 page not found\n")


async def test_profiles_only_with_diagnostics(nursery: trio.Nursery) -> None:
    # cloudflared serves /debug/pprof/{heap,goroutine} on the management service when diagnostics are on
    # (management/service.go); ours are text: the trio task tree and a heap summary (connector.diag)
    state = ConnectorState(connector_id=CONNECTOR_ID)
    with trio.fail_after(TIMEOUT):
        on = await nursery.start(m.serve_management, m.ManagementHub(), m.ManagementConfig(
            connector_id=str(CONNECTOR_ID), label="box", service_ip="127.0.0.1:7844"), state)
        off = await nursery.start(m.serve_management, m.ManagementHub(), m.ManagementConfig(
            connector_id=str(CONNECTOR_ID), label="box", service_ip="127.0.0.1:7844", diagnostics=False),
            state)
        status, body = await get(on, f"/debug/pprof/goroutine?access_token={token()}")
        assert status == 200 and b"serve_management" in body
        status, body = await get(on, f"/debug/pprof/heap?access_token={token()}")
        assert status == 200 and body
        for path in ("/debug/pprof/goroutine", "/debug/pprof/heap", "/metrics"):
            assert (await get(off, f"{path}?access_token={token()}"))[0] == 404


class Client:
    """A `/logs` WebSocket client (what `tail` does)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []

    @classmethod
    async def open(cls, addr: tuple[str, int], actor: str = "me") -> Client:
        client = cls(await trio.open_tcp_stream(*addr))
        await client.stream.send_all(
            client.ws.send(Request(host="m", target=f"/logs?access_token={token(actor)}"))
        )
        assert isinstance(await client.next(), AcceptConnection)
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stream.aclose()

    async def next(self) -> Event:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.ws.receive_data(data)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def send(self, doc: Any) -> None:
        await self.stream.send_all(
            self.ws.send(TextMessage(data=doc if isinstance(doc, str) else json.dumps(doc)))
        )

    async def lines(self, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """The next streamed line, past the markers in `skip` (wait_streaming may log several)."""
        while True:
            event = await self.next()
            assert isinstance(event, TextMessage), event
            doc = json.loads(event.data)
            assert doc["type"] == "logs" and len(doc["logs"]) == 1
            if doc["logs"][0].get("message") not in skip:
                return dict(doc["logs"][0])


async def wait_streaming(client: Client, marker: str) -> dict[str, Any]:
    """Log `marker` lines until one arrives (the session starts when the server read start_streaming)."""
    while True:
        log.info("%s", marker)
        with trio.move_on_after(0.2):
            line = await client.lines()
            if line.get("message") == marker:
                return line


async def test_logs_stream_with_filters(service: tuple[str, int]) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.open(service) as client:
            await client.send({"type": "start_streaming", "filters": {"level": "info"}})
            await wait_streaming(client, "ready")
            m.log.info("the service's own line")  # never streamed
            log.debug("below the level")
            log.warning("Retrying connection connIndex=%d event=0", 2)
            line = await client.lines(skip=("ready",))
            assert line["level"] == "warn" and line["message"] == "Retrying connection"
            assert line["fields"] == {"connIndex": 2} and "event" not in line
            # stop, then start again without filters: streaming resumes, debug lines included (the root
            # logger goes down to DEBUG only while such a session streams)
            await client.send({"type": "stop_streaming"})
            await client.send({"type": "start_streaming"})
            line = await wait_streaming(client, "again")
            assert line["message"] == "again" and logging.getLogger().level == logging.DEBUG
            log.debug("a debug line")
            line = await client.lines(skip=("again",))
            assert line == {"time": line["time"], "message": "a debug line"}


async def test_one_session_at_a_time(service: tuple[str, int]) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.open(service, actor="alice") as first:
            await first.send({"type": "start_streaming"})
            await wait_streaming(first, "first")
            async with await Client.open(service, actor="bob") as other:
                await other.send({"type": "start_streaming"})
                closed = await other.next()
                assert isinstance(closed, CloseConnection) and closed.code == m.STATUS_SESSION_LIMIT
                assert closed.reason == "limit exceeded for streaming sessions"
            # the same actor takes over: the old session ends normally
            async with await Client.open(service, actor="alice") as again:
                await again.send({"type": "start_streaming"})
                while True:
                    event = await first.next()
                    if isinstance(event, CloseConnection):
                        break
                assert (event.code, event.reason) == (1000, "context closed")
                await wait_streaming(again, "second")


async def test_a_bad_message_closes_the_socket(service: tuple[str, int]) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.open(service) as client:
            await client.send('{"type":"shout"}')
            closed = await client.next()
            assert isinstance(closed, CloseConnection) and closed.code == m.STATUS_UNSUPPORTED_DATA
            assert closed.reason == "invalid client message type was provided: shout"

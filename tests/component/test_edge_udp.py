"""edge.udp.UdpSessions against a scripted QUIC connection: v3 registration by datagram, payloads both ways,
and bad datagrams from the connector (a WARNING naming them, dropped, bounded)."""

from __future__ import annotations

import ipaddress
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from tunnel_lab.edge.udp import INBOX, UdpSession, UdpSessionError, UdpSessions
from tunnel_lab.wire import datagram as dg


@dataclass
class Registration:
    features: tuple[str, ...]


@dataclass
class FakeQuicConnection:
    """What UdpSessions uses of a QuicTunnelConnection."""

    registration: Registration
    sent: list[bytes] = field(default_factory=list)
    datagram_handler: Any = None
    rpc_stream_handler: Any = None

    def send_datagram(self, data: bytes) -> None:
        self.sent.append(data)

    tasks: list[Any] = field(default_factory=list)

    def ident(self) -> str:
        return "tunnel=t conn=c connIndex=0 location=LAB1"

    def start_soon(self, fn: Any, *args: Any) -> None:
        self.tasks.append((fn, args))


def v3_sessions() -> tuple[FakeQuicConnection, UdpSessions]:
    conn = FakeQuicConnection(Registration(("support_datagram_v3_2",)))
    return conn, UdpSessions.of(conn)  # type: ignore[arg-type]


async def test_v3_flow_registers_and_carries_payloads() -> None:
    conn, sessions = v3_sessions()
    assert sessions.version == 3 and conn.datagram_handler is not None
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            opened: list[Any] = []

            async def open_it() -> None:
                opened.append(await sessions.open("10.0.0.53", 53, idle=30))

            nursery.start_soon(open_it)
            await trio.testing.wait_all_tasks_blocked()
            reg = dg.decode_v3(conn.sent.pop())
            assert isinstance(reg, dg.V3Registration)
            assert reg.address == ipaddress.IPv4Address("10.0.0.53")
            assert (reg.port, reg.idle_hint_seconds) == (53, 30)
            conn.datagram_handler(dg.encode_v3(dg.V3RegistrationResponse(request_id=reg.request_id,
                                                                         response=dg.V3Response.OK)))
        (session,) = opened
        session.send(b"query")
        assert dg.decode_v3(conn.sent.pop()) == dg.V3Payload(request_id=reg.request_id, payload=b"query")
        conn.datagram_handler(dg.encode_v3(dg.V3Payload(request_id=reg.request_id, payload=b"answer")))
        assert await session.receive() == b"answer"
        await session.close("done")
        assert await session.receive() is None and not sessions.sessions


async def test_a_refused_flow_is_an_error_naming_the_reason() -> None:
    conn, sessions = v3_sessions()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def refuse() -> None:
                await trio.testing.wait_all_tasks_blocked()
                reg = dg.decode_v3(conn.sent.pop())
                conn.datagram_handler(dg.encode_v3(dg.V3RegistrationResponse(
                    request_id=reg.request_id, response=dg.V3Response.TOO_MANY_ACTIVE_FLOWS)))  # type: ignore[union-attr]

            nursery.start_soon(refuse)
            with pytest.raises(UdpSessionError, match="TOO_MANY_ACTIVE_FLOWS"):
                await sessions.open("10.0.0.53", 53, idle=30)
    assert not sessions.sessions


async def test_bad_datagrams_from_the_connector_are_dropped_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    conn, sessions = v3_sessions()
    handler = conn.datagram_handler
    handler(b"")
    handler(b"\x09junk")
    handler(dg.encode_v3(dg.V3Payload(request_id=42, payload=b"x")))
    handler(dg.encode_v3(dg.V3RegistrationResponse(request_id=7, response=dg.V3Response.OK)))
    handler(dg.encode_v3(dg.V3Icmp(payload=b"\x08\x00")))
    assert sessions.dropped == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5
    assert "at least 1 byte" in warnings[0] and "unknown datagram type received: 9" in warnings[1]
    assert "unknown UDP session 0000000000000000000000000000002a" in warnings[2]
    assert "unknown flow" in warnings[3] and "V3Icmp" in warnings[4]


async def test_a_session_inbox_is_bounded() -> None:
    conn = FakeQuicConnection(Registration(()))
    sessions = UdpSessions.of(conn)  # type: ignore[arg-type]
    assert sessions.version == 2
    send, receive = trio.open_memory_channel[bytes](INBOX)
    key = uuid.uuid4()
    sessions.sessions[key] = UdpSession(sessions, key, "10.0.0.1:7", send, receive)
    for _ in range(INBOX + 10):
        conn.datagram_handler(dg.encode_v2_session(key, b"flood"))  # type: ignore[misc]
    assert receive.statistics().current_buffer_used == INBOX and sessions.dropped == 10


async def test_sessions_end_with_their_connection() -> None:
    conn = FakeQuicConnection(Registration(()))
    sessions = UdpSessions.of(conn)  # type: ignore[arg-type]
    ((watch, args),) = conn.tasks
    send, receive = trio.open_memory_channel[bytes](INBOX)
    key = uuid.uuid4()
    session = UdpSession(sessions, key, "10.0.0.1:7", send, receive)
    sessions.sessions[key] = session
    with trio.fail_after(5):
        async with trio.open_nursery() as connection_lifetime:
            connection_lifetime.start_soon(watch, *args)
            await trio.testing.wait_all_tasks_blocked()
            connection_lifetime.cancel_scope.cancel()  # the connection closed
        assert await session.receive() is None
    assert session.closed and "tunnel connection closed" in session.closed_by and not sessions.sessions

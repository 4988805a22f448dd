"""connector.registration.RegistrationClient on its own, over an in-memory control channel whose far end is
the edge's `wire.rpc.RpcServer`: what both the http2 and the QUIC connection rely on."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import trio

from tests.component.connector_edge import make_settings, status_rule
from tunnel_lab.connector.edge_errors import (
    ConnectionLostError,
    DuplicateConnectionError,
    EdgeConnectionError,
    ServerRefusedError,
    UnauthorizedError,
)
from tunnel_lab.connector.registration import RegistrationClient
from tunnel_lab.connector.state import ConnectorState
from tunnel_lab.wire.registration import ConnectionDetails, RegistrationError, RegistrationResult
from tunnel_lab.wire.rpc import (
    RegisterConnectionCalled,
    RpcAborted,
    RpcServer,
    UnregisterConnectionCalled,
    UpdateLocalConfigurationCalled,
)

DETAILS = ConnectionDetails(uuid=uuid.UUID("11111111-2222-3333-4444-555555555555"), location_name="LAB1")


class EdgeChannel:
    """A `ControlChannel` whose far end is the edge's RegistrationServer, answering at once."""

    def __init__(self, result: RegistrationResult) -> None:
        self.server = RpcServer()
        self.result = result
        self.inbox = bytearray()
        self.wake = trio.Event()
        self.local_ended = False
        self.reset_received = False
        self.remote_ended = False
        self.hold_answers = False  # keep the edge's bytes back (as if still in flight when it closes)
        self.configs: list[bytes] = []
        self.unregistered = False
        self.aborted = False

    async def receive_some(self) -> bytes:
        while not self.inbox or self.hold_answers:
            if self.remote_ended:
                return b""
            await self.wake.wait()
            self.wake = trio.Event()
        data = bytes(self.inbox)
        self.inbox.clear()
        return data

    async def send(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        for ev in self.server.receive_data(data):
            if isinstance(ev, RegisterConnectionCalled):
                self.server.answer_registration(ev.question_id, self.result)
            elif isinstance(ev, UpdateLocalConfigurationCalled):
                self.configs.append(ev.config)
                self.server.answer_empty(ev.question_id)
            elif isinstance(ev, UnregisterConnectionCalled):
                self.unregistered = True
                self.server.answer_empty(ev.question_id)
            elif isinstance(ev, RpcAborted):
                self.aborted = True
        self.inbox += self.server.data_to_send()
        self.wake.set()

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()
        self.local_ended = True

    def end(self) -> None:
        self.remote_ended = True
        self.wake.set()


def _client(tmp_path: Path, channel: EdgeChannel, events: list[str], *, conn_index: int = 0,
            protocol: str = "quic") -> RegistrationClient[str]:
    settings = make_settings(tmp_path / "ca.pem", ["127.0.0.1:7844"], (status_rule(404),),
                             local_config_json=b'{"ingress":[]}')
    return RegistrationClient(channel, settings, "conn", conn_index=conn_index, edge_ip="127.0.0.1",
                              protocol=protocol, on_registered=lambda c: events.append(f"registered {c}"),
                              on_unregistered=lambda c: events.append(f"unregistered {c}"))


async def test_registers_pushes_the_local_config_and_unregisters(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="tunnel_lab.connector")
    channel = EdgeChannel(DETAILS)
    events: list[str] = []
    client = _client(tmp_path, channel, events)
    state = ConnectorState(connector_id=uuid.uuid4())
    shutdown = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async def stop_once_pushed() -> None:
                while not channel.configs:
                    await channel.wake.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert client.registered and client.details == DETAILS and events == ["registered conn"]
                shutdown.set()

            nursery.start_soon(stop_once_pushed)
            await client.serve(nursery, shutdown, local_ip="127.0.0.1", num_previous_attempts=0, state=state)
            await client.graceful_shutdown(wait_idle=trio.lowlevel.checkpoint, active_streams=lambda: 0)
            nursery.cancel_scope.cancel()
    assert channel.configs == [b'{"ingress":[]}']
    assert state.local_config_pushes == 1 and state.local_config_push_errors == 0
    assert channel.unregistered and channel.aborted and channel.local_ended
    assert not client.registered and client.details == DETAILS
    assert events == ["registered conn", "unregistered conn"]
    lines = [r.getMessage() for r in caplog.records]
    assert "Registering tunnel connection connIndex=0 event=0 ip=127.0.0.1" in lines
    assert (f"Registered tunnel connection connIndex=0 connection={DETAILS.uuid} event=0 ip=127.0.0.1 "
            "location=LAB1 protocol=quic") in lines
    assert "Sent local configuration to the edge connIndex=0" in lines
    assert "Unregistered tunnel connection connIndex=0 event=0 ip=127.0.0.1" in lines


@pytest.mark.parametrize(("cause", "error"), [
    ("EDUPCONN", DuplicateConnectionError),
    ("Unauthorized: tunnel not found", UnauthorizedError),
    ("no such tunnel", ServerRefusedError),
])
async def test_a_refusal_becomes_the_error_that_decides_the_retry(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, cause: str,
        error: type[EdgeConnectionError]) -> None:
    channel = EdgeChannel(RegistrationError(cause=cause))
    events: list[str] = []
    client = _client(tmp_path, channel, events)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            with pytest.raises(error):
                await client.register(local_ip="127.0.0.1", num_previous_attempts=0)
            nursery.cancel_scope.cancel()
    assert isinstance(client.failure, error)
    assert channel.aborted and channel.local_ended  # the RPC session ended, as cloudflared closes it
    assert not client.registered and events == []
    assert "failed to serve incoming request error=" in caplog.text


async def test_an_unread_refusal_explains_a_closed_connection(tmp_path: Path) -> None:
    channel = EdgeChannel(RegistrationError(cause="Unauthorized", should_retry=True))
    channel.hold_answers = True  # the answer arrives, but the connection closes before the reader gets it
    client = _client(tmp_path, channel, [], protocol="http2")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            nursery.start_soon(lambda: client.register(local_ip="127.0.0.1", num_previous_attempts=0))
            while not channel.inbox:
                await channel.wake.wait()
            assert isinstance(client.refusal([bytes(channel.inbox)]), UnauthorizedError)
            nursery.cancel_scope.cancel()


async def test_the_control_stream_ending_before_shutdown_is_a_lost_connection(tmp_path: Path) -> None:
    channel = EdgeChannel(DETAILS)
    client = _client(tmp_path, channel, [], conn_index=1)
    with trio.fail_after(10), pytest.RaisesGroup(
            pytest.RaisesExc(ConnectionLostError, match="control stream ended: EOF")):
        async with trio.open_nursery() as nursery:
            async def end_when_registered() -> None:
                while not client.registered:
                    await channel.wake.wait()
                channel.end()

            nursery.start_soon(end_when_registered)
            await client.serve(nursery, trio.Event(), local_ip="127.0.0.1", num_previous_attempts=0,
                               state=ConnectorState(connector_id=uuid.uuid4()))
    assert channel.configs == []  # only connection 0 pushes the local configuration

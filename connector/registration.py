"""The registration client of one connection to the edge: the Cap'n Proto RPC on its control stream.

cloudflared serves the control stream the same way over http2 and QUIC (`controlStream.ServeControlStream`
in connection/control.go), so one `RegistrationClient` serves both: registerConnection and the mapping of
its answer to the `EdgeConnectionError` that tells the supervisor how to retry, the local-configuration push
of connection 0, unregisterConnection and the end of the RPC session at a graceful shutdown. The
connection hands it a `ControlChannel`: how bytes reach the edge and how the stream ends, which is all that
differs between the transports. The connector is the **RPC client** (`wire.rpc.RpcClient`) on it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, Protocol, TypeVar

import trio

from tunnel_lab.connector.edge_errors import (
    ConnectionLostError,
    ControlStreamError,
    DuplicateConnectionError,
    EdgeConnectionError,
    RegistrationRefusedError,
    ServerRefusedError,
    UnauthorizedError,
)
from tunnel_lab.connector.logging_setup import format_value as q
from tunnel_lab.connector.settings import TunnelSettings
from tunnel_lab.connector.state import ConnectorState
from tunnel_lab.wire import registration as reg
from tunnel_lab.wire.errors import TunnelLabError
from tunnel_lab.wire.rpc import CallFailed, CallReturned, RegistrationAnswered, RpcAborted, RpcClient

log = logging.getLogger(__name__)

Answer = RegistrationAnswered | CallReturned | CallFailed
C = TypeVar("C")  # the connection, handed to its owner's callbacks


class ControlChannel(Protocol):
    """The control stream as the registration client uses it (an http2 or a QUIC stream underneath)."""

    @property
    def local_ended(self) -> bool: ...
    @property
    def reset_received(self) -> bool: ...
    async def receive_some(self) -> bytes:
        """The next bytes from the edge; b"" once its side ended or was reset."""
    async def send(self, data: bytes) -> None:
        """Put `data` on the wire before returning (the answer is awaited next); a stream that is gone
        drops it silently: the reader notices the end."""
    async def close(self) -> None:
        """End our side after the RPC session was aborted, as Go's transport does."""


class RegistrationClient(Generic[C]):
    """The RPC session on one connection's control stream, from registerConnection to its end.

    `registered` holds from the edge's answer to the unregistration (`on_registered` and `on_unregistered`
    get `conn` then); `details` stays once set; `closed` says why the edge's side of the control stream
    ended (None while it is open)."""

    def __init__(self, channel: ControlChannel, settings: TunnelSettings, conn: C, *, conn_index: int,
                 edge_ip: str, protocol: str, on_registered: Callable[[C], None] | None = None,
                 on_unregistered: Callable[[C], None] | None = None) -> None:
        self.channel = channel
        self.settings = settings
        self.conn = conn
        self.conn_index = conn_index
        self.edge_ip = edge_ip
        self.protocol = protocol
        self.on_registered = on_registered
        self.on_unregistered = on_unregistered
        self.details: reg.ConnectionDetails | None = None
        self.registered = False
        self.closed: str | None = None
        # a refusal wins over the close the edge sends right behind it (see `refusal`)
        self.failure: EdgeConnectionError | None = None
        self._rpc = RpcClient()
        self._results: dict[int, Answer] = {}
        self._event = trio.Event()
        self._register_qid: int | None = None

    async def serve(self, nursery: trio.Nursery, shutdown: trio.Event, *, local_ip: str,
                    num_previous_attempts: int, state: ConnectorState) -> None:
        """Read the control stream (a task in `nursery`), register, push the local configuration from
        connection 0, then wait for `shutdown`. Raises an `EdgeConnectionError` when the registration fails
        or the control stream ends first."""
        nursery.start_soon(self._reader)
        details = await self.register(local_ip=local_ip, num_previous_attempts=num_previous_attempts)
        if self.conn_index == 0 and not details.tunnel_is_remotely_managed:
            nursery.start_soon(self.push_local_config, state)
        if not shutdown.is_set():
            await first_of(shutdown.wait, self._wait_closed)
            if not shutdown.is_set():
                raise ConnectionLostError(f"control stream ended: {self.closed}")

    # -- the reader
    async def _reader(self) -> None:
        while True:
            data = await self.channel.receive_some()
            if not data:
                self._close("reset by the edge" if self.channel.reset_received else "EOF")
                return
            try:
                events = self._rpc.receive_data(data)
            except TunnelLabError as exc:
                log.warning("Malformed RPC message from the edge error=%s connIndex=%d event=0 ip=%s",
                            q(str(exc)), self.conn_index, self.edge_ip)
                self._close(f"malformed RPC: {exc}")
                return
            for ev in events:
                if isinstance(ev, Answer):
                    self._results[ev.question_id] = ev
                elif isinstance(ev, RpcAborted):
                    self.closed = f"rpc aborted by the edge: {ev.reason}"
            self._notify()
            await self._send()  # Finish messages the answers called for

    def _close(self, why: str) -> None:
        self.closed = why
        self._notify()

    def _notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def _wait_closed(self) -> None:
        while self.closed is None:
            await self._event.wait()

    async def _send(self) -> None:
        data = self._rpc.data_to_send()
        if data and not self.channel.local_ended:
            await self.channel.send(data)

    async def _answer(self, question_id: int) -> Answer:
        while question_id not in self._results:
            if self.closed is not None:
                raise ControlStreamError(f"control stream ended before the answer: {self.closed}")
            await self._event.wait()
        return self._results.pop(question_id)

    # -- the calls
    async def register(self, *, local_ip: str, num_previous_attempts: int) -> reg.ConnectionDetails:
        """registerConnection; raises the `EdgeConnectionError` a refusal or a timeout means (after
        aborting the RPC session, as cloudflared closes its registration client)."""
        creds = self.settings.credentials
        params = reg.RegisterConnectionParams(
            auth=reg.TunnelAuth(creds.account_tag, creds.tunnel_secret),
            tunnel_id=creds.tunnel_id,
            conn_index=self.conn_index,
            options=reg.ConnectionOptions(
                client=reg.ClientInfo(self.settings.connector_id.bytes, tuple(self.settings.features),
                                      self.settings.version, self.settings.arch),
                origin_local_ip=reg.origin_local_ip_bytes(local_ip),
                num_previous_attempts=min(num_previous_attempts, 255),
            ),
        )
        log.debug("Registering tunnel connection connIndex=%d event=0 ip=%s", self.conn_index, self.edge_ip)
        qid = self._register_qid = self._rpc.register_connection(params)
        await self._send()
        try:
            with trio.fail_after(self.settings.rpc_timeout):
                answer = await self._answer(qid)
        except trio.TooSlowError:
            self._rpc.cancel(qid)  # Finish(releaseResultCaps=true), as Go does for an abandoned call
            await self.abort()
            raise RegistrationRefusedError("register tunnel connection: context deadline exceeded") from None
        error = registration_error(answer)
        if error is not None:
            self.failure = error
            await self.abort()
            raise error
        assert isinstance(answer, RegistrationAnswered) and isinstance(answer.result, reg.ConnectionDetails)
        details = self.details = answer.result
        log.info("Registered tunnel connection connIndex=%d connection=%s event=0 ip=%s location=%s "
                 "protocol=%s", self.conn_index, details.uuid, self.edge_ip, details.location_name,
                 self.protocol)
        self.registered = True
        if self.on_registered:
            self.on_registered(self.conn)
        return details

    def unregistered(self) -> None:
        """The connection no longer counts as registered (unregistered, or gone)."""
        if self.registered:
            self.registered = False
            if self.on_unregistered:
                self.on_unregistered(self.conn)

    def refusal(self, unread: Iterable[bytes]) -> EdgeConnectionError | None:
        """The registration refusal that explains a closed connection, if any: an edge that refuses a
        registration closes the connection right after its answer, and the answer may be among the
        control stream's `unread` bytes; it decides how the supervisor retries."""
        if self.failure is not None:
            return self.failure
        qid = self._register_qid
        if qid is None or self.details is not None or qid in self._results:
            return None
        with contextlib.suppress(TunnelLabError):
            for data in unread:
                for ev in self._rpc.receive_data(data):
                    if isinstance(ev, Answer):
                        self._results[ev.question_id] = ev
        answer = self._results.get(qid)
        return registration_error(answer) if answer is not None else None

    async def push_local_config(self, state: ConnectorState) -> None:
        """updateLocalConfiguration with the local config (connection 0 of a locally managed tunnel)."""
        state.local_config_pushes += 1
        error: str | None = None
        try:
            qid = self._rpc.update_local_configuration(self.settings.local_config_json)
            await self._send()
            with trio.fail_after(self.settings.rpc_timeout):
                answer = await self._answer(qid)
            if isinstance(answer, CallFailed):
                error = answer.reason
        except trio.TooSlowError:
            error = "context deadline exceeded"
        except TunnelLabError as exc:
            error = str(exc)
        if error is not None:
            state.local_config_push_errors += 1
            log.error("unable to send local configuration error=%s connIndex=%d", q(error), self.conn_index)
        else:
            log.debug("Sent local configuration to the edge connIndex=%d", self.conn_index)

    async def abort(self) -> None:
        """Abort the RPC session and end our side of the control stream."""
        with contextlib.suppress(TunnelLabError):
            self._rpc.abort("rpc: shutdown")
        await self._send()
        await self.channel.close()

    async def graceful_shutdown(self, *, wait_idle: Callable[[], Awaitable[object]],
                                active_streams: Callable[[], int]) -> None:
        """Unregister, then let in-flight streams end (`wait_idle`) until the grace period expires; the
        RPC session ends meanwhile."""
        deadline = trio.current_time() + self.settings.grace_period
        if self.registered and self.closed is None and not self._rpc.aborted:
            await self._unregister(deadline)
        self.unregistered()  # whether the edge answered or not
        with trio.move_on_at(deadline):
            if self.closed is None and not self.channel.local_ended:
                await self.abort()
            await wait_idle()
        n = active_streams()
        if n:
            log.info("Grace period over, closing the connection with %d streams in flight connIndex=%d", n,
                     self.conn_index)

    async def _unregister(self, deadline: float) -> None:
        qid = self._rpc.unregister_connection()
        answer: object = None
        # Sending is bounded too: an edge that grants no flow-control window (a wedged tunnel) must not
        # hold the connector past its grace period.
        with trio.move_on_at(deadline):
            await self._send()
            try:
                answer = await self._answer(qid)
            except ControlStreamError as exc:
                answer = exc
        if isinstance(answer, CallReturned):
            log.info("Unregistered tunnel connection connIndex=%d event=0 ip=%s", self.conn_index,
                     self.edge_ip)
            return
        if answer is None and not self._rpc.aborted:
            self._rpc.cancel(qid)  # gave up: Finish(releaseResultCaps=true), as Go does
        reason = ("context deadline exceeded" if answer is None
                  else getattr(answer, "reason", None) or str(answer))
        log.error("failed to serve incoming request error=%s connIndex=%d",
                  q(f"Error shutting down control stream: {reason}"), self.conn_index)


def registration_error(answer: object) -> EdgeConnectionError | None:
    """The error a registration answer means (logged), or None when it registered."""
    if isinstance(answer, CallFailed):
        return RegistrationRefusedError(
            f"tunnelrpc/proto/tunnelrpc.capnp:RegistrationServer.registerConnection: rpc exception: "
            f"{answer.reason}")
    if not isinstance(answer, RegistrationAnswered):
        return RegistrationRefusedError(f"unexpected answer to registerConnection: {answer!r}")
    result = answer.result
    if not isinstance(result, reg.RegistrationError):
        return None
    error: EdgeConnectionError
    if "EDUPCONN" in result.cause:
        error = DuplicateConnectionError("already connected to this server, trying another address")
    elif "Unauthorized" in result.cause:
        error = UnauthorizedError(result.cause)
    else:
        error = ServerRefusedError(result.cause)
    # cloudflared logs the control stream's failure first, without connection fields
    log.error("failed to serve incoming request error=%s", q(str(error)))
    return error


async def first_of(*waits: Callable[[], Awaitable[object]]) -> bool:
    """Run the waits concurrently; return True once the first finishes (the others are cancelled)."""
    done = False
    async with trio.open_nursery() as nursery:
        async def one(fn: Callable[[], Awaitable[object]]) -> None:
            nonlocal done
            await fn()
            done = True
            nursery.cancel_scope.cancel()

        for fn in waits:
            nursery.start_soon(one, fn)
    return done

"""The stream interface of a tunnel connection, as the edge's eyeball side uses it.

`edge/proxy.py`, `edge/warp.py`, the registry (`edge/state.py`) and the management API (`edge/api.py`)
talk to a tunnel connection only through these two protocols, so an HTTP/2 connection
(`edge.tunnel.H2TunnelConnection`) and a QUIC one plug in behind them alike. The errors are the
transport-neutral ones every implementation raises; `Registration` is what every implementation
records of a successful registerConnection.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import trio

from tunnel_lab.wire.errors import ProtocolError

Headers = list[tuple[bytes, bytes]]


class TunnelStreamError(ProtocolError):
    """A tunnel stream failed. `retryable` is True when the connector cannot have processed it."""

    def __init__(self, message: str, *, retryable: bool = False, reset_code: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.reset_code = reset_code


class NoCapacityError(TunnelStreamError):
    """The connection has no free stream slot (its concurrent-stream limit) within the wait."""


class OversizedHeadersError(TunnelStreamError):
    """The connector's response header block is over the lab's per-stream limit."""


@dataclass
class Registration:
    """What a successful registerConnection told us."""

    tunnel_id: uuid.UUID
    tunnel_name: str
    conn_index: int
    connector_id: uuid.UUID
    client_version: str
    arch: str
    features: tuple[str, ...]
    conn_uuid: uuid.UUID
    registered_at: float = field(default_factory=time.time)


class TunnelStream(Protocol):
    """A stream the edge opened on a tunnel connection: request out, response in.

    Error codes are HTTP/2's (`h2.errors.ErrorCodes`); a QUIC implementation maps them."""

    @property
    def id(self) -> int:
        """The stream id (for log lines)."""

    @property
    def trailers(self) -> Headers | None:
        """The response trailers, once the stream ended with them."""

    @property
    def ready(self) -> bool:
        """Would `receive` return (or raise) without waiting?"""

    @property
    def fully_received(self) -> bool:
        """The response ended and every buffered chunk was taken."""

    async def response_headers(self) -> Headers:
        """Wait for the response head (raises TunnelStreamError if the stream dies first)."""

    async def receive(self) -> tuple[bytes, int] | None:
        """Next body chunk and its flow-controlled length (give it back with `ack` once handed on);
        None at the end; raises TunnelStreamError on reset or connection loss."""

    async def receive_many(self, max_bytes: int) -> tuple[bytes, int] | None:
        """Like `receive`, with every chunk already queued (up to about `max_bytes`) joined into one."""

    async def ack(self, flow_controlled_length: int) -> None:
        """Give the window back for bytes that were handed on (the backpressure point)."""

    async def send(self, data: bytes, *, end: bool = False) -> None:
        """Send request-body bytes within the connector's windows."""

    async def end(self, trailers: Headers | None = None) -> None:
        """End the request body, with trailers when given."""

    async def reset(self, code: int = ...) -> None:
        """Abandon the stream (RST_STREAM CANCEL by default)."""

    async def release(self) -> None:
        """The handler is done with the stream: reset it if still open, return unread window."""


class TunnelConnection(Protocol):
    """One registered (or registering) tunnel connection from a connector."""

    @property
    def serial(self) -> int:
        """A process-wide number, unique per connection (the registry's key)."""

    @property
    def id(self) -> str:
        """The id the API shows: the connection uuid once registered."""

    @property
    def location(self) -> str:
        """The data centre name of the listener it came in on."""

    @property
    def remote(self) -> str:
        """The connector's address, host:port."""

    @property
    def registration(self) -> Registration | None:
        """What registerConnection said, once it succeeded."""

    state: str  # connecting -> registered -> draining -> closed (or refused)

    @property
    def routable(self) -> bool:
        """May new eyeball streams go to this connection?"""

    @property
    def active_streams(self) -> int:
        """Eyeball streams in flight (the control stream not counted)."""

    @property
    def closed(self) -> trio.Event:
        """Set once the connection has closed."""

    def ident(self) -> str:
        """Identity fields for log lines."""

    async def open_stream(self, headers: Headers, *, end_stream: bool) -> TunnelStream:
        """Open a request stream; waits (bounded) for a slot. Raises TunnelStreamError."""

    async def send_goaway(self, error_code: int = 0, debug: bytes = b"") -> None:
        """No new streams from the edge (a fault); in-flight ones go on."""

    async def reset_all_streams(self, code: int = ...) -> int:
        """Reset every eyeball stream in flight (a fault). Returns how many."""

    async def drain_and_close(self, deadline: float, why: str) -> None:
        """Let in-flight streams finish (up to `deadline` seconds), then close."""

    def abort(self, why: str) -> None:
        """Drop the connection now."""

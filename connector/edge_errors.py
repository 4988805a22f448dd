"""The errors of a connection to the edge: the class tells the supervisor what to do next."""

from __future__ import annotations

from tunnel_lab.wire.errors import TunnelLabError


class EdgeConnectionError(TunnelLabError):
    """A connection to the edge ended badly. `rotate_address`: take another edge address;
    `retry_initial`: retried even before any connection ever registered (cloudflared's "network" errors)."""

    rotate_address = False
    retry_initial = False
    # the supervisor's log line for it, as cloudflared's supervisor/tunnel.go words it per error type
    log_message = "Serve tunnel error"


class EdgeDialError(EdgeConnectionError):
    """TCP connect or TLS handshake with the edge failed."""

    rotate_address = True
    retry_initial = True


class DuplicateConnectionError(EdgeConnectionError):
    """The edge said EDUPCONN: this connector already has a connection there."""

    rotate_address = True
    retry_initial = True
    log_message = "Unable to establish connection."


class UnauthorizedError(EdgeConnectionError):
    """The edge refused the registration with an `Unauthorized` cause (assumed propagation lag)."""

    retry_initial = True
    log_message = "Register tunnel error from server side"


class ControlStreamError(EdgeConnectionError):
    """The control stream broke before registration finished."""

    retry_initial = True


class RegistrationRefusedError(EdgeConnectionError):
    """A permanent registration error (any other cause, an RPC exception, a timeout)."""


class ServerRefusedError(RegistrationRefusedError):
    """The edge answered the registration with an error and any cause but EDUPCONN and Unauthorized."""

    log_message = "Register tunnel error from server side"


class ConnectionLostError(EdgeConnectionError):
    """The edge closed the connection, or broke the HTTP/2 protocol."""


class StreamListenerError(ConnectionLostError):
    """A QUIC connection that had been serving ended (an edge close, a Stateless Reset, the idle timeout).

    cloudflared's connection ends with its stream listener (`connection.StreamListenerError`), one of the
    errors its `startFirstTunnel` retries at once on connIndex 0; `cause` is quic-go's text for the end."""

    retry_initial = True

    def __init__(self, cause: str) -> None:
        super().__init__("accept stream listener encountered a failure while serving")
        self.cause = cause


class ReconnectSignal(EdgeConnectionError):
    """`--stdin-control`'s `reconnect [DURATION]` dropped this connection.

    The supervisor reconnects it after `delay` and the per-connIndex backoff, without the supervisor's."""

    retry_initial = True

    def __init__(self, delay: float) -> None:
        super().__init__("reconnect signal")  # cloudflared's text, whatever the delay
        self.delay = delay


class StreamGone(TunnelLabError):
    """The stream was reset by the edge or its connection is gone; stop working on it."""

"""qh3 internals the QUIC shells (edge/quic.py, connector/quic_transport.py) depend on, in one place.

Pinned by tests/unit/test_qh3_pins.py: a qh3 upgrade that changes one of them fails there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TextIO

from qh3 import tls

# qh3's packet-header parser lives in its private Rust module: `pull_quic_header(data, offset,
# host_cid_length)` -> (version, packet type, ..., destination cid, source cid, ...), ValueError on garbage.
from qh3._hazmat import pull_quic_header as pull_quic_header
from qh3.quic import events as qevents
from qh3.quic.connection import QuicConnection, QuicConnectionState
from qh3.quic.packet import QuicErrorCode

from tunnel_lab.wire.errors import ProtocolError
from tunnel_lab.wire.stateless_reset import MIN_RESET_SIZE, reset_token

_KEYLOGS: dict[str, TextIO] = {}  # one append handle per key log path, shared by every configuration


def quic_keylog(config: Any) -> Any:
    """Have a qh3 `QuicConfiguration` append its TLS secrets to `$SSLKEYLOGFILE` when that is set
    (qh3's `secrets_log_file`, NSS key log format: Wireshark decrypts QUIC with it too)."""
    path = os.environ.get("SSLKEYLOGFILE")
    if path:
        handle = _KEYLOGS.get(path)
        if handle is None:
            handle = _KEYLOGS[path] = open(path, "a", buffering=1, encoding="ascii")  # noqa: SIM115
        config.secrets_log_file = handle
    return config


def stream_state(quic: Any, stream_id: int) -> Any:
    """qh3's own record of a stream (`QuicConnection._streams`), or None once it forgot it."""
    return quic._streams.get(stream_id)


def peer_certificate(quic: Any) -> Any:
    """The certificate the peer presented in the handshake (qh3's `tls.Context._peer_certificate`), or
    None before one arrived."""
    return getattr(getattr(quic, "tls", None), "_peer_certificate", None)


def hold_unsent(state: Any) -> None:
    """Keep qh3 from sending a reset stream's unsent data.

    qh3 1.9.4 announces the bytes sent so far as the final size of a RESET_STREAM but goes on sending the
    data still in the stream's buffer afterwards: data beyond the final size, a FINAL_SIZE_ERROR that
    makes the peer (cloudflared, or our edge) close the whole connection. Its packet builder skips a
    stream marked blocked (the flag is otherwise used only for streams over MAX_STREAMS), so the rest
    stays unsent.
    """
    if state is not None:
        state.is_blocked = True


class KeyedResetConnection(QuicConnection):
    """A server-side QuicConnection whose stateless reset tokens derive from a key (wire.stateless_reset).

    qh3 draws each token with os.urandom, in `__init__` for the first connection id and in
    `_replenish_connection_ids` for the ones it issues later, so a restarted edge could never reset a
    connection it forgot. Both are overwritten here, before any of them is sent (the transport
    parameters and NEW_CONNECTION_ID frames are written later, when packets are built).
    """

    def __init__(self, *, reset_key: bytes, check_server_name: Callable[[str | None], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reset_key = reset_key
        self._check_server_name = check_server_name
        self._derive_tokens()

    def _initialize(self, peer_cid: bytes) -> None:
        # qh3's TLS server parses the ClientHello's server name and drops it (no callback, nothing kept):
        # `check_server_name` sees it first, and refuses the handshake by raising a tls.Alert (qh3 turns
        # that into CONNECTION_CLOSE with CRYPTO_ERROR 0x100 + the alert).
        super()._initialize(peer_cid)
        check = self._check_server_name
        if check is None:
            return
        handle_hello = self.tls._server_handle_hello

        def server_handle_hello(input_buf: Any, *buffers: Any) -> None:
            start = input_buf.tell()
            name = tls.pull_client_hello(input_buf).server_name
            input_buf.seek(start)
            check(name)
            handle_hello(input_buf, *buffers)

        self.tls._server_handle_hello = server_handle_hello  # type: ignore[method-assign,assignment]

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        self._derive_tokens()

    def _derive_tokens(self) -> None:
        # Deterministic: re-deriving a token already sent gives the same bytes.
        for host_cid in self._host_cids:
            host_cid.stateless_reset_token = reset_token(self._reset_key, host_cid.cid)


class ResetAwareConnection(QuicConnection):
    """A client-side QuicConnection that notices a Stateless Reset (RFC 9000 §10.3.1).

    qh3 1.9.4's client drops a datagram whose destination connection id is none of its own before it looks
    for a reset, and a reset has random bytes there: a reset from a restarted edge would never end the
    connection, only the 5 s idle timeout would. So the check runs here first, for short-header datagrams
    that are not ours (ours go to qh3, which checks them when they fail to decrypt), and ends the
    connection as qh3 itself does on a reset it recognises.
    """

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        if (len(data) >= MIN_RESET_SIZE and data[0] & 0xC0 == 0x40
                and data[1:1 + len(self.host_cid)] not in self._host_cid_seq_map
                and self._is_stateless_reset(data)):
            if self._state not in (QuicConnectionState.DRAINING, QuicConnectionState.TERMINATED):
                self._close_event = qevents.ConnectionTerminated(
                    error_code=QuicErrorCode.NO_ERROR, frame_type=None, reason_phrase="Stateless reset")
                self._close_end()
            return
        super().receive_datagram(data, addr, now)


def ack_now(quic: QuicConnection) -> None:
    """Make qh3 acknowledge what it received in its next packet instead of 1 ms later (if anything awaits).

    qh3 sets `ack_at = now + 1 ms` on the first unacknowledged packet and sends the ACK only when its
    timer fires or a later packet is built after that moment.
    """
    space = quic._spaces.get(tls.Epoch.ONE_RTT)
    if space is not None and space.ack_at is not None:
        space.ack_at = 0.0


class _NoPacer:
    """qh3's pacer interface (qh3._hazmat.QuicPacketPacer), never holding a packet back."""

    def start_pacing(self, now: float, congestion_window: int, smoothed_rtt: float) -> None:
        pass

    def next_send_time(self, now: float) -> float | None:
        return None

    def update_after_send(self, now: float) -> None:
        pass

    def update_bucket(self, now: float) -> None:
        pass

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        pass


def without_pacing(quic: QuicConnection) -> None:
    """Let qh3 send what its congestion window allows in one round instead of pacing it.

    qh3 paces at congestion window / RTT with a burst of at most 16 packets, then sets a timer for the
    next one: on loopback that is every few tens of microseconds, which a trio loop on a busy machine
    serves milliseconds late, and each wake-up sends one small burst. Sending a whole window in one go
    (one GSO system call per 64 packets, transport.udp) is what made QUIC uploads through cloudflared
    faster and cheaper (A/B in the commit). The congestion window still bounds what is in flight.
    """
    quic._loss._pacer = _NoPacer()  # type: ignore[assignment]  # the same methods, duck-typed


class AlertUnrecognizedName(tls.Alert, ProtocolError):
    """TLS unrecognized_name (RFC 6066 section 3), which qh3 lacks; qh3 catches it as any tls.Alert."""

    description = tls.AlertDescription.unrecognized_name


class TracedQuicConnection(QuicConnection):
    """A qh3 connection whose sends the protocol trace sees (`trace`: a `transport.trace.ConnTrace`).

    Used instead of `QuicConnection` only when tracing is on (qh3's connection has `__slots__`, so its
    methods cannot be wrapped per instance); what is received the shells hand to `trace.quic_event`."""

    trace: Any = None

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if self.trace is not None:
            self.trace.quic_stream("out", stream_id, data, fin=end_stream)
        super().send_stream_data(stream_id, data, end_stream)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        if self.trace is not None:
            self.trace.quic_stream("out", stream_id, b"", reset=True)
        super().reset_stream(stream_id, error_code)

    def send_datagram_frame(self, data: bytes) -> None:
        if self.trace is not None:
            self.trace.datagram("out", data)
        super().send_datagram_frame(data)


class TracedKeyedResetConnection(TracedQuicConnection, KeyedResetConnection):
    """The edge's connection with --trace: traced sends, keyed stateless reset tokens, the SNI check."""


class TracedResetAwareConnection(TracedQuicConnection, ResetAwareConnection):
    """Our connector's connection with --trace: traced sends, and it notices a Stateless Reset."""

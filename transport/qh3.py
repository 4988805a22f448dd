"""qh3 internals the QUIC shells (edge/quic.py, connector/quic_transport.py) depend on, in one place.

Pinned by tests/unit/test_qh3_pins.py: a qh3 upgrade that changes one of them fails there.
"""

from __future__ import annotations

import os
from typing import Any, TextIO

from qh3.quic.connection import QuicConnection

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

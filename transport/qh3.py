"""qh3 internals the QUIC shells (edge/quic.py, connector/quic_transport.py) depend on, in one place.

Pinned by tests/unit/test_qh3_pins.py: a qh3 upgrade that changes one of them fails there.
"""

from __future__ import annotations

from typing import Any

# qh3's packet-header parser lives in its private Rust module: `pull_quic_header(data, offset,
# host_cid_length)` -> (version, packet type, ..., destination cid, source cid, ...), ValueError on garbage.
from qh3._hazmat import pull_quic_header

__all__ = ["hold_unsent", "peer_certificate", "pull_quic_header", "stream_state"]


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

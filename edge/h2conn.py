"""The edge's h2 state machine for a tunnel connection (its SETTINGS), and the frame guard.

The h2 overrides (a connection that survives GOAWAY for the streams already open, no eager repr, the
DATA fast path) live in transport/h2.py.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.settings import SettingCodes

from tunnel_lab.transport.h2 import TunnelH2Connection

# Our HPACK decoder accepts header blocks this large; the lab's own, smaller, per-stream limit is
# enforced by the edge afterwards so that an oversized block costs one stream, not the connection.
DECODER_HEADER_LIST_LIMIT = 64 * 1024 * 1024

# What we advertise as SETTINGS_MAX_HEADER_LIST_SIZE (the same value cloudflared advertises).
ADVERTISED_HEADER_LIST_SIZE = 1048896


def new_tunnel_h2(*, initial_window: int, max_frame_size: int = 65536) -> TunnelH2Connection:
    """The edge's HTTP/2 client state machine for one tunnel connection (preface not yet sent).

    h2 closes the whole connection on a GOAWAY; RFC 9113 §6.8 lets both peers finish the streams
    already open and cloudflared relies on it (docs/protocol.md §9.3), so this one keeps them."""
    # The request fields are built by wire.eyeball to RFC 9113's rules (lower-case names, no
    # connection-specific fields, pseudo-headers first): h2's re-check of every field on every request
    # is a few per cent of the edge's CPU per request, so it is off.
    config = H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
    # These are the values of our first SETTINGS frame.
    return TunnelH2Connection(config, local_settings={
        SettingCodes.ENABLE_PUSH: 0,
        SettingCodes.MAX_CONCURRENT_STREAMS: 100,
        SettingCodes.MAX_HEADER_LIST_SIZE: ADVERTISED_HEADER_LIST_SIZE,
        SettingCodes.INITIAL_WINDOW_SIZE: initial_window,
        SettingCodes.MAX_FRAME_SIZE: max_frame_size,
    }, keep_streams_after_goaway=True, decoder_header_list_limit=DECODER_HEADER_LIST_LIMIT)


"""QUIC Stateless Resets (RFC 9000 §10.3), sans-I/O: tokens derived from a key, and the reset datagram.

An edge that lost a connection's state (it restarted) cannot decrypt that connection's packets. With
tokens derived from a key it keeps (in the lab's state directory) rather than drawn at random, it can still
compute the token it once gave the peer for the packet's connection id, and answer with a Stateless Reset
that ends the connection at once instead of at the peer's idle timeout (the design of RFC 9000 §10.3.2).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable

TOKEN_SIZE = 16
KEY_SIZE = 32
# RFC 9000 §10.3: a reset is at least 5 unpredictable bytes then the token; receivers ignore shorter
# ones (quic-go checks exactly this, protocol.MinReceivedStatelessResetSize).
MIN_RESET_SIZE = 5 + TOKEN_SIZE
# What we send in answer to a long packet: quic-go's size (a short header with a 20-byte connection id).
RESET_SIZE = 42
_LABEL = b"tunnel-lab quic stateless reset\x00"


def reset_token(key: bytes, cid: bytes) -> bytes:
    """The stateless reset token for host connection id `cid` (HMAC-SHA256 of the key, truncated)."""
    return hmac.new(key, _LABEL + cid, hashlib.sha256).digest()[:TOKEN_SIZE]


def reset_for(key: bytes, datagram: bytes, cid_length: int,
              random: Callable[[int], bytes] = os.urandom) -> bytes | None:
    """The Stateless Reset answering `datagram`, a packet for no connection we know; None if it gets none.

    Only a short-header packet gets one (a long header carries no token-bearing connection id yet), and
    only if the reset can be both valid (>= MIN_RESET_SIZE) and strictly smaller than the packet, so two
    endpoints that lost state cannot reset each other forever (RFC 9000 §10.3.3). As RFC 9000 §10.3
    recommends, a packet of 43 bytes or fewer gets a reset one byte shorter, so the reset looks like any
    other short packet.
    """
    if not datagram or datagram[0] & 0x80 or not datagram[0] & 0x40:
        return None  # a long header, or not QUIC v1 (the fixed bit is clear)
    size = min(len(datagram) - 1, RESET_SIZE)
    if size < MIN_RESET_SIZE or len(datagram) < 1 + cid_length:
        return None
    cid = datagram[1:1 + cid_length]
    head = bytearray(random(size - TOKEN_SIZE))
    head[0] = 0x40 | (head[0] & 0x3F)  # a short header with the fixed bit: indistinguishable from a packet
    return bytes(head) + reset_token(key, cid)

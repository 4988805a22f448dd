"""Which transport each HA connection uses, and when it falls back from QUIC to http2 (pure, no I/O).

cloudflared's rules (connection/protocol.go NewProtocolSelector, supervisor/tunnel.go selectNextProtocol):
- `--protocol http2` / `quic`: that protocol only, never a fallback (`h2mux` means http2, with a warning);
- `--protocol auto` with a token: QUIC, falling back to http2; with a credentials file: the protocol the
  TXT record `protocol-v2.argotunnel.com` names for the account (read when the edge is discovered through
  DNS, connector/edge_discovery.py), and http2 when it was not read (with `--edge` our connector makes no
  DNS lookup, which is what cloudflared gets offline);
- a connection falls back once its backoff reached `--retries`, or at once when QUIC looks broken (the
  connection went idle: UDP to the edge is dropped), unless some connection already registered over QUIC.
docs/protocol.md §13.8; docs/connector.md, "Protocols".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

HTTP2 = "http2"
QUIC = "quic"
AUTO = "auto"

QUIC_BROKEN_WARNING = (
    "If this log occurs persistently, and cloudflared is unable to connect to Cloudflare Network with `quic` "
    "protocol, then most likely your machine/network is getting its egress UDP to port 7844 (or others) "
    "blocked or dropped. Make sure to allow egress connectivity as per "
    "https://developers.cloudflare.com/cloudflare-one/connections/connect-apps/configuration/ports-and-ips/\n"
    "If you are using private routing to this Tunnel, then ICMP, UDP (and Private DNS Resolution) will not "
    "work unless your cloudflared can connect with Cloudflare Network with `quic`.")


@dataclass(frozen=True)
class ProtocolChoice:
    """The protocol to start with and whether a connection may fall back to http2."""

    initial: str
    can_fall_back: bool


def choose_protocol(flag: str, *, token_given: bool, percentages: Mapping[str, int] | None = None,
                    account_tag: str = "") -> ProtocolChoice:
    """`--protocol` as cloudflared resolves it (`flag` already validated: auto/http2/quic/h2mux).

    `percentages` is the TXT record `protocol-v2.argotunnel.com` when it was read (edge discovery through
    DNS), else None: then `auto` without a token starts with http2, as cloudflared does without an answer.
    """
    flag = flag.lower()
    if flag == QUIC:
        return ProtocolChoice(QUIC, False)
    if flag == AUTO and token_given:
        return ProtocolChoice(QUIC, True)
    if flag == AUTO and percentages is not None:
        # connection/protocol.go getProtocol: the first of (quic, http2) whose percentage beats the
        # account's threshold; none does: the first.
        threshold = switch_threshold(account_tag)
        chosen = next((p for p in (QUIC, HTTP2) if percentages.get(p, 0) > threshold), QUIC)
        return ProtocolChoice(chosen, chosen == QUIC)
    return ProtocolChoice(HTTP2, False)


def switch_threshold(account_tag: str) -> int:
    """cloudflared's switchThreshold: FNV-1a (32 bit) of the account tag, modulo 100."""
    h = 0x811C9DC5
    for byte in account_tag.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % 100


@dataclass(frozen=True)
class FallbackDecision:
    """After a failed attempt: log the "UDP may be blocked" warning, and switch this connection to http2."""

    warn_quic_broken: bool
    switch: bool


def after_failure(choice: ProtocolChoice, current: str, *, may_fall_back: bool, attempts: int, retries: int,
                  quic_broken: bool, connected_with_quic: bool) -> FallbackDecision:
    """cloudflared's EdgeTunnelServer.Serve tail and selectNextProtocol, once the backoff wait is over.

    `may_fall_back` is Serve's shouldFallbackProtocol: for dial errors, whether this connection used up
    `--max-edge-addr-retries` addresses; `attempts` is the backoff's retry count (ReachedMaxRetries compares
    it with `--retries`); `quic_broken` is isQuicBroken (the QUIC connection or handshake went idle).
    """
    if not may_fall_back or (current == QUIC and connected_with_quic):
        return FallbackDecision(False, False)
    has_fallback = choice.can_fall_back and current == QUIC
    if not (attempts >= retries or (has_fallback and quic_broken)):
        return FallbackDecision(False, False)
    return FallbackDecision(quic_broken, has_fallback)

"""connector.protocol: cloudflared's protocol choice and QUIC -> http2 fallback (connection/protocol.go,
supervisor/tunnel.go selectNextProtocol)."""

from __future__ import annotations

import pytest

from tunnel_lab.connector.protocol import FallbackDecision, ProtocolChoice, after_failure, choose_protocol

AUTO_TOKEN = ProtocolChoice("quic", True)
QUIC_ONLY = ProtocolChoice("quic", False)


@pytest.mark.parametrize(("flag", "token", "expected"), [
    ("auto", True, AUTO_TOKEN),
    ("auto", False, ProtocolChoice("http2", False)),  # no TXT answer offline: http2, no fallback
    ("quic", False, QUIC_ONLY),
    ("quic", True, QUIC_ONLY),
    ("http2", True, ProtocolChoice("http2", False)),
    ("Auto", True, AUTO_TOKEN),
])
def test_choose_protocol(flag: str, token: bool, expected: ProtocolChoice) -> None:
    assert choose_protocol(flag, token_given=token) == expected


def decide(choice: ProtocolChoice = AUTO_TOKEN, current: str = "quic", **kw: object) -> FallbackDecision:
    args: dict[str, object] = {"may_fall_back": True, "attempts": 1, "retries": 5, "quic_broken": False,
                               "connected_with_quic": False}
    args.update(kw)
    return after_failure(choice, current, **args)  # type: ignore[arg-type]


def test_broken_quic_falls_back_at_once_with_the_warning() -> None:
    assert decide(quic_broken=True) == FallbackDecision(True, True)


def test_exhausted_retries_fall_back_without_the_warning() -> None:
    assert decide(attempts=5) == FallbackDecision(False, True)
    assert decide(attempts=4) == FallbackDecision(False, False)


def test_no_fallback_before_the_addresses_are_used_up() -> None:
    assert decide(quic_broken=True, attempts=9, may_fall_back=False) == FallbackDecision(False, False)


def test_no_fallback_once_some_connection_registered_over_quic() -> None:
    assert decide(quic_broken=True, connected_with_quic=True) == FallbackDecision(False, False)


def test_static_quic_warns_but_never_switches() -> None:
    assert decide(QUIC_ONLY, quic_broken=True) == FallbackDecision(False, False)  # no fallback: no select
    assert decide(QUIC_ONLY, quic_broken=True, attempts=5) == FallbackDecision(True, False)


def test_already_on_http2_stays() -> None:
    assert decide(current="http2", attempts=9, quic_broken=True) == FallbackDecision(True, False)

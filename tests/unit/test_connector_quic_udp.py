"""connector.quic_udp: Go's duration text in the session-idle reasons cloudflared sends to the edge."""

from __future__ import annotations

import pytest

from tunnel_lab.connector.quic_udp import _go_duration


@pytest.mark.parametrize(("seconds", "text"), [
    (0.3, "300ms"), (0.0015, "1.5ms"), (5, "5s"), (1.5, "1.5s"), (30, "30s"), (210, "3m30s"),
    (90.5, "1m30.5s"), (3600, "1h0m0s"), (3725, "1h2m5s"),
])
def test_go_duration(seconds: float, text: str) -> None:
    assert _go_duration(seconds) == text

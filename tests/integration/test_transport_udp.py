"""transport.udp on real loopback sockets: a GSO send arrives as the same datagrams, GRO or not."""

from __future__ import annotations

import socket

import pytest

from tunnel_lab.transport import udp


@pytest.mark.parametrize("gso", [True, False])
@pytest.mark.parametrize("gro", [True, False])
def test_datagrams_arrive_whole_and_in_order(gso: bool, gro: bool) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        tx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        gro_on = udp.enable_gro(rx) if gro else False
        sent = [bytes([i]) * 1400 for i in range(40)] + [b"tail"]
        sender = udp.DatagramSender(tx, gso=gso)
        sender.send(sent, rx.getsockname())
        received: list[bytes] = []
        while len(received) < len(sent):
            datagrams, addr = udp.receive(rx, gro_on)
            assert addr == tx.getsockname()
            received += datagrams
        assert received == sent
        assert sender.dropped == 0

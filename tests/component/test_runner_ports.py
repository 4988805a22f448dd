"""Ports the runner hands to components that cannot report theirs must not be taken by anyone else."""

from __future__ import annotations

import socket

from tunnel_lab.lab.runner.procs import _ephemeral_range, free_port


def test_free_ports_are_outside_the_ephemeral_range_unique_and_bindable() -> None:
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= port <= high for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))

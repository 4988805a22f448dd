"""UDP origins: `udp-echo` (every datagram back, unchanged) and `dns` (origin_fixtures/dns.py answers).

Both record one history line per datagram (method `UDP` or `DNS`, target = the sender, body fields = the
datagram), so a scenario can check what reached the origin through the tunnel.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from typing import NoReturn

import trio

from tunnel_lab.origin_fixtures import dns
from tunnel_lab.origin_fixtures.history import History, RequestRecord

log = logging.getLogger(__name__)

UDP_KINDS = ("udp-echo", "dns")
MAX_DATAGRAM = 65535


async def serve_udp_origin(kind: str, host: str, port: int, history: History, *,
                           task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                           ) -> NoReturn:
    """Serve UDP origin `kind` on `host:port` until cancelled; `task_status` gets the bound address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((host, port))
        bound = sock.getsockname()
        log.info("origin kind=%s listening on udp %s:%d", kind, bound[0], bound[1])
        task_status.started((bound[0], bound[1]))
        while True:
            data, peer = await sock.recvfrom(MAX_DATAGRAM)
            reply = data if kind == "udp-echo" else dns.answer(data)
            if reply is not None:
                try:
                    await sock.sendto(reply, peer)
                except OSError as exc:  # the sender went away: UDP carries on
                    log.info("origin kind=%s cannot answer %s: %s", kind, peer, exc)
            _record(history, kind, data, peer)


def _record(history: History, kind: str, data: bytes, peer: tuple[object, ...]) -> None:
    record = history.begin(RequestRecord(
        seq=history.next_seq(), time=History.now(), kind=kind, peer=f"{peer[0]}:{peer[1]}", tls=False,
        method="UDP" if kind == "udp-echo" else "DNS", target="", http_version="",
        body_length=len(data), body_sha256=hashlib.sha256(data).hexdigest()))
    history.finish(record)

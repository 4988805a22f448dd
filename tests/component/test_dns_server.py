"""lab/dns.py's shells on loopback: UDP answers, TCP answers with the length prefix, junk is survived."""

from __future__ import annotations

import trio

from tunnel_lab.lab.dns import LabZone, serve_dns, serve_dns_tcp
from tunnel_lab.wire import dns

ZONE = LabZone(regions={"region1.v2.argotunnel.com": ["127.0.1.1", "127.0.1.2"]}, services="127.0.3.1",
               eyeballs="127.0.0.1")


def query(name: str, qtype: int = dns.A, msg_id: int = 5) -> bytes:
    return dns.encode_message(dns.Message(id=msg_id, flags=dns.RD,
                                          questions=(dns.Question(name=name, qtype=qtype),)))


async def test_udp_answers_and_survives_junk() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_dns, ZONE, ("127.0.0.1", 0))
            with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
                await sock.connect((host, port))
                await sock.send(b"\x00")  # junk first: dropped, the server goes on
                await sock.send(query("api.cloudflare.com"))
                reply = dns.decode_message(await sock.recv(4096))
            assert reply.id == 5 and [r.data for r in reply.answers] == ["127.0.3.1"]
            nursery.cancel_scope.cancel()


async def test_tcp_answers_two_queries_on_one_connection() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_dns_tcp, ZONE, ("127.0.0.1", 0))
            stream = await trio.open_tcp_stream(host, port)
            first, second = query("region1.v2.argotunnel.com", msg_id=1), query("nope.example", msg_id=2)
            # Both queries in one write, the second split across the boundary: framing is by length only.
            await stream.send_all(len(first).to_bytes(2, "big") + first + len(second).to_bytes(2, "big"))
            await stream.send_all(second)
            buffer = bytearray()
            replies = []
            while len(replies) < 2:
                buffer += await stream.receive_some()
                while len(buffer) >= 2 and len(buffer) >= 2 + int.from_bytes(buffer[:2], "big"):
                    size = int.from_bytes(buffer[:2], "big")
                    replies.append(dns.decode_message(bytes(buffer[2:2 + size])))
                    del buffer[:2 + size]
            assert [r.data for r in replies[0].answers] == ["127.0.1.1", "127.0.1.2"]
            assert replies[1].id == 2 and replies[1].rcode == dns.NXDOMAIN
            await stream.aclose()
            nursery.cancel_scope.cancel()

"""`--warp-listen`: an HTTP CONNECT proxy into private networks (docs/protocol.md §7, §11.3).

`CONNECT 10.1.2.3:22` opens a private-network stream (`cf-cloudflared-proxy-src`, `:authority`
IP:port) to the tunnel whose `tunnel route ip` CIDR holds 10.1.2.3; after the connector's 200 the
proxy answers `200 Connection established` and pipes raw bytes both ways. This stands in for a WARP
client, so `curl -x` and `ssh -o ProxyCommand='nc -X connect -x ...'` work through the lab.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
import urllib.parse
from typing import Any

import h11
import trio
from h2.errors import ErrorCodes

from tunnel_lab.edge import pages
from tunnel_lab.edge.eyeball_h1 import reason
from tunnel_lab.edge.state import EdgeState
from tunnel_lab.transport.pipe import PipeDone, Way, pipe, prepend, receive_acked
from tunnel_lab.transport.tunnel import TunnelConnection, TunnelStream, TunnelStreamError

log = logging.getLogger(__name__)


async def _reply(stream: trio.abc.Stream, conn: h11.Connection, status: int, detail: str, ray: str) -> None:
    headers, body = pages.error_page(status, detail, ray=ray)
    try:
        await stream.send_all(conn.send(h11.Response(status_code=status, reason=reason(status),
                                                     headers=[*headers, (b"connection", b"close")])))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass


def forward_request_head(request: h11.Request) -> tuple[str, int, bytes]:
    """`GET http://IP[:PORT]/path` -> (ip, port, the origin-form head to send, with Connection: close)."""
    url = urllib.parse.urlsplit(request.target.decode("latin-1"))
    host = url.hostname or ""
    ip = str(ipaddress.ip_address(host))
    port = url.port or 80
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    lines = [request.method + b" " + path.encode("latin-1") + b" HTTP/1.1"]
    for name, value in request.headers:
        if name.lower() not in (b"connection", b"proxy-connection", b"keep-alive", b"proxy-authorization"):
            lines.append(bytes(name) + b": " + bytes(value))
    lines.append(b"Connection: close")
    return ip, port, b"\r\n".join(lines) + b"\r\n\r\n"


def parse_destination(target: str) -> tuple[str, int]:
    """`IP:PORT` or `[IPv6]:PORT` -> (ip, port); ValueError otherwise (no hostnames, docs/protocol.md §7)."""
    if target.startswith("["):
        host, _, port = target[1:].partition("]:")
    else:
        host, _, port = target.rpartition(":")
    ip = ipaddress.ip_address(host)
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError("port out of range")
    return str(ip), number


async def handle_warp_connection(edge: EdgeState[TunnelConnection], stream: trio.abc.Stream,
                                 peer: tuple[str, int]) -> None:
    """One CONNECT request, then a raw pipe. In a worker of a multi-process edge, a connection whose
    tunnel has no connection in this worker goes, raw, to a worker that has one (edge/forward.py)."""
    from tunnel_lab.wire.eyeball import new_ray_id

    started = time.monotonic()
    client = f"{peer[0]}:{peer[1]}"
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=edge.config.max_request_headers)
    ray = new_ray_id(edge.default_location, os.urandom(8))
    record: dict[str, Any] = {"host": "", "method": "CONNECT", "path": "", "status": 0, "tunnel_id": None,
                              "connection": None, "location": None, "outcome": "error"}
    received = bytearray()  # what the eyeball sent, for a worker this connection is forwarded to
    forwarded = False
    try:
        try:
            with trio.fail_after(edge.config.eyeball_header_timeout):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = bytes(await stream.receive_some(65536))
                        if edge.peers is not None:
                            received += data
                        conn.receive_data(data)
                        continue
                    break
        except (trio.TooSlowError, h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
            log.info("warp: bad or slow CONNECT request (%s) client=%s", exc, client)
            if conn.our_state is h11.SEND_RESPONSE or conn.our_state is h11.IDLE:
                await _reply(stream, conn, 400, "Malformed or slow CONNECT request.", ray)
            return
        if not isinstance(event, h11.Request):
            return
        target = event.target.decode("latin-1")
        record.update(path=target, host=target, method=event.method.decode("latin-1"))
        forward_head: bytes | None = None
        try:
            if event.method == b"CONNECT":
                ip, port = parse_destination(target)
            elif target.lower().startswith("http://"):
                # A plain-HTTP proxy request (what `curl -x` sends for http:// URLs): forward it over
                # a private-network stream as an origin-form request with Connection: close.
                ip, port, forward_head = forward_request_head(event)
            else:
                record["status"] = 405
                await _reply(stream, conn, 405, "This listener is an HTTP proxy: CONNECT IP:PORT, or an "
                                                "absolute http://IP:PORT/ URL.", ray)
                return
        except ValueError:
            record["status"] = 400
            await _reply(stream, conn, 400, f"{target!r} is not IP:PORT; private-network routes take "
                                            "IP addresses, not hostnames.", ray)
            return
        tunnel = edge.tunnels.resolve_ip(ip)
        if tunnel is None:
            record.update(status=404, outcome="no-route")
            await _reply(stream, conn, 404, f"No private network route holds {ip}; add one with "
                                            f"`tunnel-lab tunnel route ip CIDR TUNNEL`.", ray)
            return
        record["tunnel_id"] = str(tunnel.id)
        if edge.peers is not None:
            def handed_over() -> None:
                nonlocal forwarded
                forwarded = True  # the receiving worker records it, as from this eyeball

            if await edge.peers.forward_raw(tunnel.id, stream, bytes(received), peer, f"warp {target!r}",
                                            handed_over):
                return
        tconn = edge.registry.pick(tunnel.id)
        if tconn is None:
            record.update(status=530, outcome="no-connection")
            await _reply(stream, conn, 530, f"Error 1033: tunnel {tunnel.id} has no healthy connection.", ray)
            return
        ray = new_ray_id(tconn.location, os.urandom(8))
        record.update(connection=tconn.id, location=tconn.location)
        authority = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        headers = [(b":method", b"CONNECT"), (b":authority", authority.encode()),
                   (b"cf-cloudflared-proxy-src", f"tcp://{client}".encode()), (b"cf-ray", ray.encode())]
        ident = f"{tconn.ident()} ray={ray} dest={authority}"
        try:
            tstream = await tconn.open_stream(headers, end_stream=False)
        except TunnelStreamError as exc:
            record.update(status=502, outcome="stream-failed")
            await _reply(stream, conn, 502, f"Could not open a stream: {exc}", ray)
            return
        try:
            with trio.move_on_after(edge.config.origin_timeout) as waited:
                try:
                    response = await tstream.response_headers()
                except TunnelStreamError as exc:
                    record.update(status=502, outcome="stream-failed")
                    await _reply(stream, conn, 502, f"The tunnel stream failed: {exc}", ray)
                    return
            if waited.cancelled_caught:
                record.update(status=524, outcome="timeout")
                await _reply(stream, conn, 524, "The connector did not answer in time.", ray)
                return
            status = int(dict(response).get(b":status", b"0"))
            if status != 200:
                record.update(status=502, outcome="connector-error")
                log.info("warp: connector could not reach %s (status %d) %s", authority, status, ident)
                await _reply(stream, conn, 502, f"The connector could not reach {authority}.", ray)
                return
            record.update(status=200, outcome="tcp")
            leftover = bytes(conn.trailing_data[0])
            if forward_head is None:
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[],
                                                             reason=b"Connection established")))
            else:
                leftover = forward_head + leftover  # the origin's answer goes back raw
            log.info("warp: %s established %s", record["method"], ident)
            await pipe_tcp(stream, tstream, leftover)
            log.info("warp: %s closed %s", record["method"], ident)
        finally:
            await tstream.release()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("warp: client went away (%s) client=%s", exc, client)
    finally:
        if not forwarded:
            edge.history.record(ray=ray, duration_ms=round((time.monotonic() - started) * 1000, 3), **record)
            edge.metrics.requests.inc(status=record["status"], outcome=record["outcome"])
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def pipe_tcp(sock: trio.abc.Stream, tstream: TunnelStream, leftover: bytes = b"") -> None:
    """Raw bytes both ways with half-close: each side's EOF becomes the other's end of stream."""

    async def read_client() -> bytes:
        try:
            return bytes(await sock.receive_some(65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await tstream.reset(ErrorCodes.CANCEL)
            raise PipeDone from None

    send_eof = getattr(sock, "send_eof", None)
    await pipe(Way(prepend(leftover, read_client), tstream.send, at_eof=tstream.end,
                   quiet=(TunnelStreamError,), ends_pipe=False, error_ends_pipe=False),
               # After the connector's end: give the client a moment to finish its side, then close.
               Way(receive_acked(tstream), sock.send_all, at_eof=send_eof,
                   quiet=(TunnelStreamError, trio.BrokenResourceError, trio.ClosedResourceError), linger=5))

"""The origin client on its own: keep-alive pool, timeouts, stale connections, error texts."""

from __future__ import annotations

import trio

from tests.component.connector_edge import RawOrigin
from tunnel_lab.connector.origin_client import OriginPool, OriginTarget
from tunnel_lab.connector.settings import OriginRequestConfig


async def _get(pool: OriginPool, target: OriginTarget, cfg: OriginRequestConfig, path: str = "/") -> bytes:
    conn = await pool.acquire(target, cfg)
    conn.start_request("GET", websocket=False)
    await conn.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    body = b""
    while True:
        ev = await conn.next_event()
        name = type(ev).__name__
        if name == "Body":
            body += bytes(ev.data)  # type: ignore[attr-defined]
        elif name == "End":
            break
    await pool.release(conn, cfg, reusable=True)
    return body


async def test_keep_alive_reuse_limits_and_expiry():
    origin = RawOrigin()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(origin.serve)
            target = OriginTarget("http", "127.0.0.1", port)
            pool = OriginPool()
            cfg = OriginRequestConfig()
            assert await _get(pool, target, cfg) == b"ok"
            assert await _get(pool, target, cfg) == b"ok"
            assert origin.connections == 1  # reused
            # no idle connections allowed: every request dials
            none = OriginRequestConfig(keep_alive_connections=0)
            await _get(pool, OriginTarget("http", "127.0.0.1", port, server_name="other"), none)
            await _get(pool, OriginTarget("http", "127.0.0.1", port, server_name="other"), none)
            assert origin.connections == 3
            # idle longer than keepAliveTimeout: not reused
            short = OriginRequestConfig(keep_alive_timeout=0.05)
            t2 = OriginTarget("http", "127.0.0.1", port, server_name="short")
            await _get(pool, t2, short)
            await trio.sleep(0.1)
            await _get(pool, t2, short)
            assert origin.connections == 5
            await pool.aclose()
            nursery.cancel_scope.cancel()


async def test_stale_idle_connection_is_not_used():
    # the origin closes every connection after answering, without saying so (an idle timeout, say)
    origin = RawOrigin(close_after_response=True)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(origin.serve)
            target = OriginTarget("http", "127.0.0.1", port)
            pool = OriginPool()
            cfg = OriginRequestConfig()
            assert await _get(pool, target, cfg) == b"ok"
            await trio.sleep(0.05)  # the FIN arrives while the connection idles in the pool
            assert await _get(pool, target, cfg) == b"ok"
            assert origin.connections == 2
            await pool.aclose()
            nursery.cancel_scope.cancel()


async def test_tls_handshake_timeout_and_refused_texts():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]

            async def silent(stream: trio.SocketStream) -> None:
                await trio.sleep_forever()

            nursery.start_soon(trio.serve_listeners, silent, listeners)
            pool = OriginPool()
            cfg = OriginRequestConfig(tls_timeout=0.2)
            try:
                await pool.acquire(OriginTarget("https", "127.0.0.1", port), cfg)
            except Exception as exc:
                assert "TLS handshake timeout" in str(exc)
            else:
                raise AssertionError("a silent TLS origin must time out")
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.1", 0))
            free = sock.getsockname()[1]
            sock.close()
            try:
                await pool.acquire(OriginTarget("http", "127.0.0.1", free), cfg)
            except Exception as exc:
                assert str(exc) == f"dial tcp 127.0.0.1:{free}: connect: connection refused"
            else:
                raise AssertionError("nothing listens there")
            nursery.cancel_scope.cancel()

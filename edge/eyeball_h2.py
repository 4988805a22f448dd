"""The HTTP/2 eyeball server (h2, server side), for HTTPS eyeballs that negotiated h2 by ALPN.

Each request stream runs `proxy_request` in its own task. Request DATA is acknowledged only after
it was forwarded into the tunnel; responses honour the eyeball's windows. WebSockets over HTTP/2
(extended CONNECT) are out of scope.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from typing import Any

import h2.events
import h2.exceptions
import trio
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings

from tunnel_lab.edge.proxy import EyeballGone, proxy_request
from tunnel_lab.edge.state import EdgeState
from tunnel_lab.transport.h2 import TunnelH2Connection, send_within_window
from tunnel_lab.transport.tunnel import TunnelConnection
from tunnel_lab.transport.writer import H2Writer, WriteStalled
from tunnel_lab.wire.errors import StreamConversionError
from tunnel_lab.wire.eyeball import EyeballExchange, h2_response_fields
from tunnel_lab.wire.guard import ResetFloodGuard

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]


class _H2Server:
    def __init__(self, edge: EdgeState[TunnelConnection], transport: trio.abc.Stream, client: str,
                 client_ip: str) -> None:
        self.edge = edge
        self.transport = transport
        self.client = client
        self.client_ip = client_ip
        # transport's h2: no eager repr of every frame, the DATA fast path, the long-value HPACK encoder
        # (an origin's huge response head must not stall the eyeball); h2's own GOAWAY handling.
        self.h2 = TunnelH2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: edge.config.eyeball_max_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: 1024 * 1024,
            SettingCodes.MAX_HEADER_LIST_SIZE: edge.config.max_request_headers,
        })
        self.writer = H2Writer(self.h2, transport, write_timeout=edge.config.write_timeout)
        self.writer_error = ""  # why the writer stopped, once it did
        self.lot = trio.lowlevel.ParkingLot()
        self.exchanges: dict[int, H2Exchange] = {}
        self._resets = ResetFloodGuard(edge.config.eyeball_reset_limit, edge.config.eyeball_reset_window)
        self._refused_logged = False

    async def flush(self) -> None:
        # Through the writer task, bounded like the tunnel side's: bytes taken from h2 go out whole.
        try:
            await self.writer.flush()
        except trio.BrokenResourceError as exc:
            raise EyeballGone(f"eyeball connection broke: {self.writer_error or exc}") from exc

    async def _write(self, nursery: trio.Nursery) -> None:
        try:
            await self.writer.run()
        except WriteStalled:
            self.writer_error = "eyeball did not read in time"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.writer_error = str(exc)
        log.debug("eyeball HTTP/2 connection ended: %s client=%s", self.writer_error, self.client)
        nursery.cancel_scope.cancel()

    async def run(self) -> None:
        self.h2.initiate_connection()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, nursery)
            try:
                await self.flush()
                await self._read_loop(nursery)
            except EyeballGone as exc:  # handled here, not inside the nursery's exception group
                log.debug("eyeball HTTP/2 connection ended: %s client=%s", exc, self.client)
            nursery.cancel_scope.cancel()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            with trio.move_on_after(self.edge.config.eyeball_idle_timeout) as idle:
                try:
                    data = await self.transport.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
            if idle.cancelled_caught and not self.exchanges:
                self.h2.close_connection()
                await self.flush()
                break
            if idle.cancelled_caught:
                continue
            if not data:
                break
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                log.info("eyeball HTTP/2 protocol error (%s) client=%s", exc, self.client)
                await self.flush()
                break
            for event in events:
                self.dispatch(event, nursery)
            if self._reset_flood():
                await self.flush()  # the GOAWAY
                break
            await self.flush()

    def _reset_flood(self) -> bool:
        """More RST_STREAMs than `eyeball_reset_limit` within the window (rapid reset): GOAWAY and close."""
        cfg = self.edge.config
        if not self._resets.flooded(trio.current_time()):
            return False
        log.warning("eyeball reset more than %d streams within %gs (rapid reset?): GOAWAY and close "
                    "(limit eyeball_reset_limit) client=%s", cfg.eyeball_reset_limit,
                    cfg.eyeball_reset_window, self.client)
        self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        return True

    def dispatch(self, event: Any, nursery: trio.Nursery) -> None:
        limit = self.edge.config.eyeball_max_streams
        if isinstance(event, h2.events.RequestReceived) and len(self.exchanges) >= limit:
            # Streams the eyeball already reset still hold a handler until it has unwound: those count
            # too, so HEADERS + RST_STREAM pairs cannot run more handlers than the advertised limit.
            if not self._refused_logged:
                self._refused_logged = True
                log.warning("eyeball opened more than %d concurrent streams: refusing the excess "
                            "(limit eyeball_max_streams) client=%s", self.edge.config.eyeball_max_streams,
                            self.client)
            with contextlib.suppress(h2.exceptions.ProtocolError):  # already reset by the eyeball
                self.h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if isinstance(event, h2.events.RequestReceived):
            try:
                core = EyeballExchange.from_h2(list(event.headers), ended=event.stream_ended is not None,
                                               client_ip=self.client_ip)
            except StreamConversionError:
                self.h2.reset_stream(event.stream_id, ErrorCodes.PROTOCOL_ERROR)  # flushed after dispatch
                return
            new = H2Exchange(self, event.stream_id, core)
            self.exchanges[event.stream_id] = new
            nursery.start_soon(self.handle, new)
            return
        ex = self.exchanges.get(getattr(event, "stream_id", 0))
        if isinstance(event, h2.events.DataReceived):
            if ex is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                ex.chunks.append((event.data, event.flow_controlled_length))
                ex.lot.unpark_all()
        elif isinstance(event, h2.events.TrailersReceived):
            if ex is not None:
                ex.request_trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            if ex is not None:
                ex.ended = True
                ex.lot.unpark_all()
        elif isinstance(event, h2.events.StreamReset):
            if event.remote_reset:
                self._resets.reset(trio.current_time())
            if ex is not None:
                ex.reset = True
                ex.lot.unpark_all()
                ex.scope.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.lot.unpark_all()

    async def handle(self, ex: H2Exchange) -> None:
        try:
            with ex.scope:
                await proxy_request(self.edge, ex)
        except EyeballGone as exc:
            log.debug("eyeball stream ended: %s stream=%d client=%s", exc, ex.stream_id, self.client)
        except Exception:
            log.exception("eyeball HTTP/2 stream failed stream=%d client=%s", ex.stream_id, self.client)
            await ex.abort()
        finally:
            self.exchanges.pop(ex.stream_id, None)
            unread = sum(n for _, n in ex.chunks) + ex.pending_ack
            ex.pending_ack = 0
            if unread:
                self.h2.acknowledge_received_data(unread, ex.stream_id)
            with contextlib.suppress(EyeballGone):
                await self.flush()


class H2Exchange:
    """One HTTP/2 eyeball stream for `proxy_request`."""

    def __init__(self, server: _H2Server, stream_id: int, core: EyeballExchange) -> None:
        self.server = server
        self.stream_id = stream_id
        self.core = core
        self.request = core.request
        self.has_body = core.has_body
        self.websocket = False
        self.ended = not core.has_body
        self.reset = False
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.lot = trio.lowlevel.ParkingLot()
        self.scope = trio.CancelScope()
        self.pending_ack = 0
        self.response_started = False
        self.request_trailers: Headers | None = None

    async def read_body(self) -> bytes | None:
        if self.pending_ack:
            self.server.h2.acknowledge_received_data(self.pending_ack, self.stream_id)
            self.pending_ack = 0
            await self.server.flush()
        while not self.chunks:
            if self.reset:
                raise EyeballGone("eyeball reset the stream")
            if self.ended:
                return None
            await self.lot.park()
        data, length = self.chunks.popleft()
        self.pending_ack = length
        return data

    async def start_response(self, status: int, headers: Headers) -> None:
        self.response_started = True
        try:
            self.server.h2.send_headers(self.stream_id, h2_response_fields(status, headers))
        except h2.exceptions.ProtocolError as exc:
            raise EyeballGone(f"cannot send response headers: {exc}") from exc
        await self.server.flush()

    async def send_body(self, data: bytes) -> None:
        if not data:
            return

        def check() -> None:
            if self.reset:
                raise EyeballGone("eyeball reset the stream")

        await send_within_window(self.server.h2, self.stream_id, data, end_stream=False,
                                 flush=self.server.flush, wait_for_window=self.server.lot.park, check=check,
                                 closed=lambda exc: EyeballGone(f"eyeball stream closed: {exc}"))
        await self.server.flush()

    async def finish(self, trailers: Headers | None = None) -> None:
        try:
            if trailers:
                self.server.h2.send_headers(self.stream_id, [(n.lower(), v) for n, v in trailers],
                                            end_stream=True)
            else:
                self.server.h2.end_stream(self.stream_id)
        except h2.exceptions.ProtocolError as exc:
            raise EyeballGone(f"cannot end the stream: {exc}") from exc
        await self.server.flush()

    async def flush(self) -> None:
        pass  # every call above already flushed

    async def abort(self) -> None:
        try:
            self.server.h2.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR)
            await self.server.flush()
        except (h2.exceptions.ProtocolError, EyeballGone):
            pass

    async def upgrade(self, status: int, headers: Headers) -> Any:
        raise EyeballGone("WebSockets over HTTP/2 eyeballs are not supported")


async def handle_h2_connection(edge: EdgeState[TunnelConnection], transport: trio.abc.Stream, *, client: str,
                               client_ip: str) -> None:
    """Serve one HTTP/2 eyeball connection until it closes (never raises but Cancelled)."""
    server = _H2Server(edge, transport, client, client_ip)
    try:
        await server.run()
    except EyeballGone as exc:
        log.debug("eyeball HTTP/2 connection ended: %s client=%s", exc, client)
    except Exception:
        log.exception("eyeball HTTP/2 connection failed client=%s", client)
    finally:
        with (trio.CancelScope(shield=True), trio.move_on_after(1),
              contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
            await transport.aclose()

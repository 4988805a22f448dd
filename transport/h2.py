"""The one h2 connection class of the project: every override of an h2 internal lives here.

Both tunnel ends and the HTTP/2 eyeball server use `TunnelH2Connection`. Each override below changes
a private method of `h2.connection.H2Connection`; tests/unit/test_transport_h2.py pins the source of
every method it replaces (and the h2 behaviour it works around), so an h2 upgrade that changes one
fails there first. pyproject.toml bounds h2 and hyperframe below their next major version.

- `_receive_frame`: h2's own version starts with `logger.trace("...", repr(frame))`, evaluated even
  with no logger: the repr of a DATA frame hex-encodes its whole payload (10-15% of a side's CPU in a
  bulk transfer). The same dispatch and stream-error handling, without that.
- `_prepare_for_sending` / `data_to_send`: unpadded DATA frames framed straight into the buffer, and
  the buffer handed over without h2's final copy (the same bytes; h2 copies a payload four times).
- `_receive_goaway_frame` (`keep_streams_after_goaway`): h2 moves the whole connection to CLOSED as
  soon as a GOAWAY is sent or received and then refuses everything, even on streams already open.
  RFC 9113 §6.8 lets both peers finish those, and cloudflared relies on it (docs/protocol.md §9.3):
  the edge's own bookkeeping stops opening new streams instead. `send_goaway` queues a GOAWAY
  without closing h2's state machine, for the same reason.
- `_receive_data_frame` / `_receive_headers_frame` (`body_errors_reset_stream`): h2 treats a request
  body longer or shorter than its `content-length`, and an unparsable or conflicting
  `content-length`, as a *connection* error. Go's HTTP/2 server (cloudflared's, x/net/http2
  server.go) never lets such a request cost more than its stream: the stream is reset with
  PROTOCOL_ERROR and reported as a `StreamProtocolError` event. Known differences, reachable only by
  an edge that sends malformed requests (the lab edge refuses them before forwarding): for a body
  *shorter* than declared Go fails the handler's body read instead, so cloudflared answers the
  request itself; an unparsable `content-length` counts as 0 there and conflicting ones as the first
  value, where h2 refuses the header block.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, StreamReset
from h2.exceptions import InvalidBodyLengthError, ProtocolError, StreamClosedError, StreamIDTooLowError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from tunnel_lab.transport.hpack import LongValueEncoder

_FRAME_HEADER = struct.Struct(">HBBBL")  # a frame header: 24-bit length (16 + 8), type, flags, stream id

# h2's messages for a bad content-length field (h2/stream.py `_initialize_content_length`); the tests
# fail if h2 changes them.
BAD_CONTENT_LENGTH = ("Invalid content-length header", "Conflicting content-length headers")


class StreamProtocolError(StreamReset):
    """We reset a stream the peer sent malformed (`reason` says how); remote_reset is False."""

    reason: str = ""


class TunnelH2Connection(H2Connection):
    """An h2 connection with the project's overrides (see the module docstring).

    `local_settings` become our first SETTINGS frame and count as in force at once (h2 copies some
    defaults before they are acknowledged: mirrored here). `decoder_header_list_limit` keeps the HPACK
    decoder's limit above the advertised one, so that a per-stream limit can be enforced later,
    at the cost of one stream rather than the connection."""

    def __init__(self, config: H2Configuration, *,
                 local_settings: dict[SettingCodes | int, int] | None = None,
                 keep_streams_after_goaway: bool = False, body_errors_reset_stream: bool = False,
                 decoder_header_list_limit: int | None = None) -> None:
        super().__init__(config=config)
        self.keep_streams_after_goaway = keep_streams_after_goaway
        self.body_errors_reset_stream = body_errors_reset_stream
        self.decoder_header_list_limit = decoder_header_list_limit
        self.encoder = LongValueEncoder()  # a huge header block must not stall the connection
        if local_settings is not None:
            self.local_settings = Settings(client=config.client_side,
                                           initial_values=local_settings)  # type: ignore[arg-type]
            if SettingCodes.MAX_FRAME_SIZE in local_settings:
                self.max_inbound_frame_size = local_settings[SettingCodes.MAX_FRAME_SIZE]
            if SettingCodes.MAX_HEADER_LIST_SIZE in local_settings:
                self.decoder.max_header_list_size = local_settings[SettingCodes.MAX_HEADER_LIST_SIZE]
        self.lift_header_list_limit()

    def lift_header_list_limit(self) -> None:
        """Put the decoder's own limit back (h2 resets it to the advertised one on SETTINGS ACK)."""
        if self.decoder_header_list_limit is not None:
            self.decoder.max_header_list_size = self.decoder_header_list_limit

    # -- sending ---------------------------------------------------------------------------------
    def send_goaway(self, error_code: int = 0, last_stream_id: int = 0, debug: bytes = b"") -> None:
        """Queue a GOAWAY frame without closing h2's state machine (in-flight streams go on)."""
        frame = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=int(error_code),
                            additional_data=debug)
        self._data_to_send += frame.serialize()

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        out = self._data_to_send
        for frame in frames:
            if type(frame) is DataFrame and "PADDED" not in frame.flags:
                data = frame.data
                length = len(data)
                if length > self.max_outbound_frame_size:
                    raise AssertionError("DATA frame larger than the peer's MAX_FRAME_SIZE")
                frame.body_len = length
                # RFC 9113 §4.1, §6.1: the bytes hyperframe would produce
                out += _FRAME_HEADER.pack(length >> 8, length & 0xFF, 0x0,
                                          0x1 if "END_STREAM" in frame.flags else 0x0, frame.stream_id)
                out += data
            else:
                out += frame.serialize()

    def data_to_send(self, amount: int | None = None) -> bytes:
        if amount is not None:
            return super().data_to_send(amount)
        data = self._data_to_send
        self._data_to_send = bytearray()
        return data  # type: ignore[return-value]  # a bytearray: every writer takes any buffer

    def has_data_to_send(self) -> bool:
        """Is anything queued for `data_to_send()` (without taking it)?"""
        return bool(self._data_to_send)

    # -- receiving -------------------------------------------------------------------------------
    def _receive_frame(self, frame: Frame) -> list[Any]:
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as exc:
            # Closed by RST_STREAM: a stream error (answer RST_STREAM); otherwise a connection error.
            if not self._stream_is_closed_by_reset(exc.stream_id):
                raise
            rst = RstStreamFrame(exc.stream_id)
            rst.error_code = exc.error_code
            self._prepare_for_sending([rst])
            return exc._events
        except StreamIDTooLowError as exc:
            if self._stream_is_closed_by_reset(exc.stream_id):
                rst = RstStreamFrame(exc.stream_id)
                rst.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([rst])
                return []
            if self._stream_is_closed_by_end(exc.stream_id):
                raise StreamClosedError(exc.stream_id) from exc
            raise
        self._prepare_for_sending(frames)
        return events

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        if not self.keep_streams_after_goaway:
            return super()._receive_goaway_frame(frame)
        # Unlike h2's own handler: no state change, no clearing of data we still have to send.
        event = ConnectionTerminated()
        event.error_code = _error_code(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def _receive_data_frame(self, frame: DataFrame) -> tuple[list[Any], list[Any]]:
        try:
            return super()._receive_data_frame(frame)
        except InvalidBodyLengthError as exc:
            if not self.body_errors_reset_stream:
                raise
            # h2 already counted the frame against the connection window: give that back.
            return self._stream_error(frame.stream_id, str(exc), frame.flow_controlled_length)

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Any], list[Any]]:
        try:
            return super()._receive_headers_frame(frame)
        except ProtocolError as exc:  # InvalidBodyLengthError too: END_STREAM short of content-length
            body_error = isinstance(exc, InvalidBodyLengthError) or str(exc).startswith(BAD_CONTENT_LENGTH)
            if not (self.body_errors_reset_stream and body_error):
                raise
            return self._stream_error(frame.stream_id, str(exc), 0)

    def _stream_error(self, stream_id: int, reason: str,
                      flow_controlled_length: int) -> tuple[list[Any], list[Any]]:
        self.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
        if flow_controlled_length:  # as the connector credits DATA: the connection window, at once
            self.increment_flow_control_window(flow_controlled_length)
        event = StreamProtocolError(stream_id=stream_id, error_code=ErrorCodes.PROTOCOL_ERROR,
                                    remote_reset=False)
        event.reason = reason
        return [], [event]


def _error_code(code: int) -> ErrorCodes | int:
    """An `ErrorCodes` member where there is one, as h2's events carry it."""
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


async def send_within_window(conn: TunnelH2Connection, stream_id: int, data: bytes | memoryview, *,
                             end_stream: bool,
                             flush: Callable[[], Awaitable[None]],
                             wait_for_window: Callable[[], Awaitable[None]],
                             closed: Callable[[Exception], Exception],
                             check: Callable[[], None] | None = None) -> int:
    """Queue `data` as DATA frames within the peer's windows and MAX_FRAME_SIZE (END_STREAM on the last
    when `end_stream`; an empty `data` with `end_stream` is one empty DATA frame).

    The one flow-control wait of the project: with no window left, what is queued goes out first
    (`flush`), then `wait_for_window()` parks until a WINDOW_UPDATE or SETTINGS (the caller's reader
    wakes it; there is no await between reading the window and parking, or a wakeup could be lost).
    `check()` runs before each frame (raise to stop: a reset stream); an h2 error because the stream
    closed becomes `closed(exc)`. The frames are queued, not flushed: the caller writes them its way.
    Returns the DATA bytes queued since the last `flush` this call made.
    """
    view = memoryview(data)
    unflushed = 0
    while True:
        if check is not None:
            check()
        try:
            window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
        except (StreamClosedError, ProtocolError) as exc:
            raise closed(exc) from exc
        if view and window <= 0:
            if unflushed or conn.has_data_to_send():
                # Frames queued so far go out before we wait; the window may grow meanwhile, so look
                # again before parking.
                unflushed = 0
                await flush()
                continue
            await wait_for_window()
            continue
        chunk, view = view[:window], view[window:]
        try:
            conn.send_data(stream_id, chunk, end_stream=end_stream and not view)
        except (StreamClosedError, ProtocolError) as exc:
            raise closed(exc) from exc
        unflushed += len(chunk)
        if not view:
            return unflushed


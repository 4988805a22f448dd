"""h2 state machines tuned for the edge's side of a tunnel connection.

h2 moves the whole connection to CLOSED as soon as a GOAWAY is sent or received, after which it
refuses to send or receive anything, even on streams that are still in flight. RFC 9113 §6.8 lets
both peers finish the streams that were already open, and cloudflared relies on it: it answers our
GOAWAY with its own and keeps serving open streams (docs/protocol.md §9.3). `EdgeH2Connection` keeps the
connection usable after a GOAWAY in either direction; the edge's own bookkeeping stops opening new
streams.
"""

from __future__ import annotations

import struct
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, RstStreamFrame

from wire.hpack_encoder import LongValueEncoder

# Our HPACK decoder accepts header blocks this large; the lab's own, smaller, per-stream limit is
# enforced by the edge afterwards so that an oversized block costs one stream, not the connection.
DECODER_HEADER_LIST_LIMIT = 64 * 1024 * 1024

# What we advertise as SETTINGS_MAX_HEADER_LIST_SIZE (the same value cloudflared advertises).
ADVERTISED_HEADER_LIST_SIZE = 1048896


_DATA_HEADER = struct.Struct(">HBBBL")  # a frame header: 24-bit length (16 + 8), type, flags, stream id


class EdgeH2Connection(H2Connection):
    """An h2 connection that survives GOAWAY for the streams already open."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        # Unlike h2's own handler: no state change, no clearing of data we still have to send.
        event = ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def _receive_frame(self, frame: Frame) -> list[Any]:
        # h2's own version starts with `logger.trace("...", repr(frame))`, evaluated even with no
        # logger: the repr of a DATA frame hex-encodes its whole payload (15% of the edge's CPU in
        # a bulk download). The same dispatch and stream-error handling, without that.
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

    def send_goaway(self, error_code: int = 0, last_stream_id: int = 0, debug: bytes = b"") -> None:
        """Queue a GOAWAY frame without closing h2's state machine (in-flight streams go on)."""
        frame = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=int(error_code),
                            additional_data=debug)
        self._data_to_send += frame.serialize()

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        # h2's own version copies a DATA payload four times on the way into its buffer (memoryview to
        # bytes, padding join, header + body, the join of all frames). Unpadded DATA frames are framed
        # here straight into the buffer (RFC 9113 §4.1, §6.1: the same bytes); everything else as h2 does.
        out = self._data_to_send
        for frame in frames:
            if type(frame) is DataFrame and "PADDED" not in frame.flags:
                data = frame.data
                length = len(data)
                if length > self.max_outbound_frame_size:
                    raise AssertionError("DATA frame larger than the peer's MAX_FRAME_SIZE")
                frame.body_len = length
                out += _DATA_HEADER.pack(length >> 8, length & 0xFF, 0x0,
                                         0x1 if "END_STREAM" in frame.flags else 0x0, frame.stream_id)
                out += data
            else:
                out += frame.serialize()

    def data_to_send(self, amount: int | None = None) -> bytes:
        # Without h2's final bytes() copy of the whole buffer (callers only write it out).
        if amount is not None:
            return super().data_to_send(amount)
        data = self._data_to_send
        self._data_to_send = bytearray()
        return data  # type: ignore[return-value]  # a bytearray: every writer takes any buffer

    def has_data_to_send(self) -> bool:
        """Is anything queued for `data_to_send()` (without taking it)?"""
        return bool(self._data_to_send)

    def lift_header_list_limit(self) -> None:
        """Keep the HPACK decoder's limit above the advertised one (h2 resets it on SETTINGS ACK)."""
        self.decoder.max_header_list_size = DECODER_HEADER_LIST_LIMIT


def new_tunnel_h2(*, initial_window: int, max_frame_size: int = 65536) -> EdgeH2Connection:
    """The edge's HTTP/2 client state machine for one tunnel connection (preface not yet sent)."""
    config = H2Configuration(client_side=True, header_encoding=None)
    conn = EdgeH2Connection(config=config)
    conn.encoder = LongValueEncoder()  # an eyeball's huge request head must not stall the connection
    # Replaced before the preface is sent, so these are the values of our first SETTINGS frame.
    conn.local_settings = Settings(client=True, initial_values={
        SettingCodes.ENABLE_PUSH: 0,
        SettingCodes.MAX_CONCURRENT_STREAMS: 100,
        SettingCodes.MAX_HEADER_LIST_SIZE: ADVERTISED_HEADER_LIST_SIZE,
        SettingCodes.INITIAL_WINDOW_SIZE: initial_window,
        SettingCodes.MAX_FRAME_SIZE: max_frame_size,
    })
    conn.max_inbound_frame_size = max_frame_size
    conn.lift_header_list_limit()
    return conn


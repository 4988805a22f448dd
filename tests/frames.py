"""`FrameFactory`: raw HTTP/2 frames for scripted peers, as h2's own test suite builds them.

Well-formed frames come from hyperframe (and hpack for header blocks); `raw` builds any frame header,
valid or not, for the misbehaviour that only a scripted peer sends (a wrong length, a frame before
SETTINGS, an oversized frame).
"""

from __future__ import annotations

import hpack
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class FrameFactory:
    """Serialized HTTP/2 frames (one HPACK encoder per factory, as per connection)."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    def preface(self, settings: dict[int, int] | None = None) -> bytes:
        """The client connection preface and its SETTINGS frame."""
        return PREFACE + self.settings(settings)

    def settings(self, settings: dict[int, int] | None = None, *, ack: bool = False) -> bytes:
        frame = SettingsFrame(0, settings=settings or {})
        if ack:
            frame.flags.add("ACK")
        return frame.serialize()

    def headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], *,
                end_stream: bool = False) -> bytes:
        frame = HeadersFrame(stream_id, data=self.encoder.encode(headers))
        frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    def data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> bytes:
        frame = DataFrame(stream_id, data=data)
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    def rst_stream(self, stream_id: int, error_code: int = 0) -> bytes:
        return RstStreamFrame(stream_id, error_code=error_code).serialize()

    def goaway(self, last_stream_id: int, error_code: int = 0, debug: bytes = b"") -> bytes:
        return GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code,
                           additional_data=debug).serialize()

    def window_update(self, stream_id: int, increment: int) -> bytes:
        return WindowUpdateFrame(stream_id, window_increment=increment).serialize()

    def ping(self, opaque: bytes = b"\0" * 8) -> bytes:
        return PingFrame(0, opaque_data=opaque).serialize()

    @staticmethod
    def raw(frame_type: int, payload: bytes = b"", *, stream_id: int = 0, flags: int = 0,
            length: int | None = None) -> bytes:
        """Any frame header (`length` overrides the payload's: a lie) and payload, unchecked."""
        size = len(payload) if length is None else length
        return size.to_bytes(3, "big") + bytes([frame_type, flags]) + stream_id.to_bytes(4, "big") + payload

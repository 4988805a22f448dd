"""tests/frames.py builds the bytes RFC 9113 §4.1 describes, and an h2 server accepts its frames."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events

from tests.frames import FrameFactory


def test_frame_bytes() -> None:
    frames = FrameFactory()
    assert frames.settings({0x3: 100}) == b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64"
    assert frames.data(3, b"abcd", end_stream=True) == b"\x00\x00\x04\x00\x01\x00\x00\x00\x03abcd"
    seven = (7).to_bytes(8, "big")
    assert frames.ping(seven) == b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + seven
    assert frames.window_update(0, 5) == b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x05"
    assert FrameFactory.raw(0x8, b"abc") == b"\x00\x00\x03\x08\x00\x00\x00\x00\x00abc"
    assert FrameFactory.raw(0x0, stream_id=5, length=16385) == b"\x00\x40\x01\x00\x00\x00\x00\x00\x05"


def test_an_h2_server_reads_a_request_built_from_frames() -> None:
    frames = FrameFactory()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    request = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")]
    events = server.receive_data(frames.preface() + frames.headers(1, request) + frames.data(1, b"hi")
                                 + frames.rst_stream(1, 8) + frames.goaway(1))
    kinds = [type(e) for e in events]
    assert kinds == [h2.events.RemoteSettingsChanged, h2.events.RequestReceived, h2.events.DataReceived,
                     h2.events.StreamReset, h2.events.ConnectionTerminated]
    assert events[1].headers == request and events[2].data == b"hi"

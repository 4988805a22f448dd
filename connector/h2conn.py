"""The connector's h2 state machine, with Go's stream-level errors kept at stream level.

h2 treats a request body longer or shorter than its `content-length`, and an unparsable or conflicting
`content-length`, as a *connection* error: it queues GOAWAY and refuses everything afterwards, so one
hostile request would drop every stream on the tunnel connection. Go's HTTP/2 server (cloudflared's,
x/net/http2 server.go as vendored in 2026.8.2) never lets such a request cost more than its stream:
a body longer than declared is `processData`'s "send_too_much", RST_STREAM PROTOCOL_ERROR.
`ConnectorH2Connection` resets the stream with PROTOCOL_ERROR in every one of these cases and reports
it as a `StreamProtocolError` event. Known differences, reachable only by an edge that sends malformed
requests (the lab edge refuses them before forwarding): for a body *shorter* than declared, Go does not
reset the stream but fails the handler's body read ("request declared a Content-Length of N but only
wrote M bytes"), so cloudflared answers the request itself; an unparsable `content-length` counts as 0
there and conflicting ones as the first value, where h2 refuses the header block.
"""

from __future__ import annotations

from typing import Any

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import StreamReset
from h2.exceptions import InvalidBodyLengthError, ProtocolError
from hyperframe.frame import DataFrame, HeadersFrame

# h2's messages for a bad content-length field (h2/stream.py `_initialize_content_length`); the test
# tests/unit/test_connector_h2conn.py fails if h2 changes them.
_BAD_CONTENT_LENGTH = ("Invalid content-length header", "Conflicting content-length headers")


class StreamProtocolError(StreamReset):
    """We reset a stream the edge sent malformed (`reason` says how); remote_reset is False."""

    reason: str = ""


class ConnectorH2Connection(H2Connection):
    """An h2 server connection where a malformed request costs only its stream."""

    def _receive_data_frame(self, frame: DataFrame) -> tuple[list[Any], list[Any]]:
        try:
            return super()._receive_data_frame(frame)
        except InvalidBodyLengthError as exc:
            # h2 already counted the frame against the connection window: give that back.
            return self._stream_error(frame.stream_id, str(exc), frame.flow_controlled_length)

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Any], list[Any]]:
        try:
            return super()._receive_headers_frame(frame)
        except InvalidBodyLengthError as exc:
            return self._stream_error(frame.stream_id, str(exc), 0)
        except ProtocolError as exc:
            if not str(exc).startswith(_BAD_CONTENT_LENGTH):
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

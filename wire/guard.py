"""The edge's guards against a misbehaving HTTP/2 peer, without I/O: frame headers checked as bytes
arrive, and counts of frames that cost the edge work for nothing (control-frame floods, rapid reset).

Each guard is fed the bytes or the current time (any monotonic clock, in seconds); the shell acts on
the `ProtocolError` or the True it gets back (GOAWAY and close).
"""

from __future__ import annotations

from collections import deque

from tunnel_lab.wire.errors import ProtocolError

__all__ = ["ControlFloodGuard", "FrameGuard", "ResetFloodGuard"]


class FrameGuard:
    """Checks frame headers as bytes arrive, before h2 buffers them.

    h2 waits for a whole frame before checking its length, so a peer sending text (or a 16 MiB length)
    would make it buffer instead of failing. The guard fails at once when the first frame is not
    SETTINGS (RFC 9113 §3.4) or a frame is longer than our SETTINGS_MAX_FRAME_SIZE.
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._header = b""
        self._skip = 0
        self._first = True

    def feed(self, data: bytes) -> None:
        """Account for `data`; raises `ProtocolError` on a bad frame header."""
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            take = data[i:i + 9 - len(self._header)]
            self._header += take
            i += len(take)
            if len(self._header) < 9:
                return
            length = int.from_bytes(self._header[:3], "big")
            frame_type = self._header[3]
            if self._first and frame_type != 0x4:
                raise ProtocolError(
                    f"the connector's first bytes are not an HTTP/2 SETTINGS frame "
                    f"({bytes(self._header)!r}); is it speaking HTTP/2?")
            if length > self.max_frame_size:
                raise ProtocolError(f"frame of {length} bytes exceeds our MAX_FRAME_SIZE "
                                    f"{self.max_frame_size}")
            self._first = False
            self._header = b""
            self._skip = length


class ControlFloodGuard:
    """Counts the connector's PING/SETTINGS frames (and the like) in fixed windows of `window` seconds:
    more than `limit` in one window is a flood (h2 answers each one, so they cost us writes)."""

    def __init__(self, limit: int, window: float, now: float) -> None:
        self.limit = limit
        self.window = window
        self._start = now
        self._count = 0

    def frame(self, now: float) -> None:
        """One more control frame at `now`; raises `ProtocolError` past the limit."""
        if now - self._start > self.window:
            self._start, self._count = now, 0
        self._count += 1
        if self._count > self.limit:
            raise ProtocolError(f"control-frame flood: more than {self.limit} PING/SETTINGS "
                                f"frames within {self.window:g}s")


class ResetFloodGuard:
    """Remembers when an eyeball reset its streams: more than `limit` RST_STREAMs within the last `window`
    seconds is a rapid-reset attack (each one may have cost a tunnel stream)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def reset(self, now: float) -> None:
        """The eyeball reset a stream at `now`."""
        self._times.append(now)

    def flooded(self, now: float) -> bool:
        """True when more than `limit` resets fall within the window that ends at `now`."""
        horizon = now - self.window
        while self._times and self._times[0] < horizon:
            self._times.popleft()
        return len(self._times) > self.limit

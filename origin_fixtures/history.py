"""What an origin fixture saw: one record per request (or per raw TCP connection).

In process, read `History.records`; from the command line, `--history FILE` appends one JSON object per
line as each record is made, so a scenario can assert what reached the origin.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(kw_only=True)
class RequestRecord:
    """One request as the origin received it.

    `headers` are raw names and values in wire order (latin-1 text); `status` is what the fixture
    answered (None when it answered nothing an HTTP client would call a status: never, reset, garbage).
    `sni` is the TLS server name the client asked for (None without TLS or without SNI).
    For `tcp-echo`, `method` is `"TCP"` and the body fields count the bytes echoed; for a WebSocket,
    `body_length` counts the message bytes echoed after the handshake.
    The record is listed as soon as the request was read; `status` and `note` are filled in as the
    exchange goes on, and the history file gets the line when the exchange is over.
    """

    seq: int
    time: float
    kind: str
    peer: str
    tls: bool
    sni: str | None = None
    method: str
    target: str
    http_version: str
    headers: list[list[str]] = field(default_factory=list)
    framing: str = "none"
    body_length: int = 0
    body_sha256: str = ""
    trailers: list[list[str]] = field(default_factory=list)
    status: int | None = None
    websocket: bool = False
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """The record as the JSON object written to `--history`."""
        return asdict(self)


class History:
    """The most recent `RequestRecord`s (at most `limit` kept in memory, so a long benchmark does not
    grow the origin), optionally mirrored in full to a JSON-lines file."""

    def __init__(self, path: str | Path | None = None, *, limit: int = 10_000) -> None:
        self.records: deque[RequestRecord] = deque(maxlen=limit)
        self.path = Path(path) if path is not None else None
        self._seq = 0

    def next_seq(self) -> int:
        """A fresh sequence number (1, 2, ...), taken when a request starts."""
        self._seq += 1
        return self._seq

    def begin(self, record: RequestRecord) -> RequestRecord:
        """List a record as soon as its request was read (in flight: status may still be None)."""
        self.records.append(record)
        return record

    def finish(self, record: RequestRecord) -> None:
        """The exchange is over: append the record to the history file if there is one."""
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")

    @staticmethod
    def now() -> float:
        """Wall-clock time for records (seconds since the epoch)."""
        return time.time()

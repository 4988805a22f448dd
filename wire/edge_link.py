"""The links between the processes of a multi-process edge (docs/architecture.md, "The edge in several
processes"): bytes only, no I/O.

- The control channel between the parent and each worker carries JSON Lines: one object per line, each with
  an `op` naming the message; a request carries an `id` its `reply` repeats. `encode_message` makes a line,
  `LineDecoder` turns received bytes into messages and refuses anything malformed or over `MAX_LINE`.
- A worker's answer to the live view's question about one request's trace (`fit_trace_answer`) is cut to fit
  one line.
- The forwarding link between workers (one data centre forwarding an eyeball's request to another that has a
  connection of the tunnel) is HTTP/1.1 after one preamble line naming the eyeball: `forward_preamble` and
  `parse_forward_preamble`.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from tunnel_lab.wire.errors import ProtocolError

MAX_LINE = 4 * 1024 * 1024  # a history batch of a big lab fits; a runaway peer does not
PARENT_OPS = frozenset({"start", "call", "peers", "shutdown"})  # parent -> worker
WORKER_OPS = frozenset({"ready", "reply", "routes", "took"})  # worker -> parent
FORWARD_MAGIC = b"TLFWD1"
MAX_PREAMBLE = 128
FORWARD_SCHEMES = ("http", "https")


def encode_message(op: str, **fields: Any) -> bytes:
    """One control message as a JSON line (ProtocolError when it would be over `MAX_LINE`)."""
    line = json.dumps({"op": op, **fields}, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ProtocolError(f"control message {op!r} is {len(line)} bytes, over the {MAX_LINE}-byte limit")
    return line


class LineDecoder:
    """Received control-channel bytes -> messages (dicts with a string `op` from `ops`)."""

    def __init__(self, ops: frozenset[str]) -> None:
        self.ops = ops
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The complete messages in `data` and what came before it; ProtocolError on a bad line."""
        self._buffer += data
        messages = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            messages.append(self._message(line))
        if len(self._buffer) > MAX_LINE:
            raise ProtocolError(f"control line over {MAX_LINE} bytes without a newline")
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held."""
        return len(self._buffer)

    def _message(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_LINE:
            raise ProtocolError(f"control line of {len(line)} bytes, over {MAX_LINE}")
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise ProtocolError(f"control line is not JSON: {exc} in {line[:80]!r}") from None
        if not isinstance(value, dict):
            raise ProtocolError(f"control line is not a JSON object: {line[:80]!r}")
        op = value.get("op")
        if not isinstance(op, str) or op not in self.ops:
            expected = ", ".join(sorted(self.ops))
            raise ProtocolError(f"unknown control message op={op!r}; expected one of {expected}")
        return value


TRACE_ANSWER_ROOM = MAX_LINE - 1024  # what a reply's envelope (op, id) leaves for the answer


def fit_trace_answer(answer: dict[str, Any], room: int = TRACE_ANSWER_ROOM) -> dict[str, Any]:
    """A worker's `edge.live.trace_answer` for one request, cut to fit one control line: when its records
    are too many bytes, they are left out and `problems` says so (the diagram's steps stay; the trace file
    has the records); when even the steps are, they go too."""
    if _size(answer) <= room:
        return answer
    records = answer.get("records", [])
    note = (f"the {len(records)} trace records of this request are over {room} bytes, too many to pass "
            "between the edge's processes: the trace file has them")
    cut = {**answer, "records": [], "problems": [*answer.get("problems", []), note]}
    if _size(cut) <= room:
        return cut
    steps = len(answer.get("steps", []))
    note = f"its {steps} diagram steps are too: left out"
    return {**cut, "steps": [], "problems": [*cut["problems"], note]}


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())


def forward_preamble(client_ip: str, scheme: str) -> bytes:
    """The first line on a forwarding link: the eyeball's address and scheme, which the receiving data centre
    uses as if the eyeball had connected to it (`cf-connecting-ip`, `x-forwarded-proto`)."""
    if scheme not in FORWARD_SCHEMES:
        raise ProtocolError(f"forwarding scheme {scheme!r} is neither http nor https")
    address = ipaddress.ip_address(client_ip).compressed.encode()
    return b"%s %s %s\r\n" % (FORWARD_MAGIC, address, scheme.encode())


def parse_forward_preamble(line: bytes) -> tuple[str, str]:
    """(client_ip, scheme) of a preamble line (without its CRLF); ProtocolError naming what is wrong."""
    if len(line) > MAX_PREAMBLE:
        raise ProtocolError(f"forwarding preamble of {len(line)} bytes, over {MAX_PREAMBLE}")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != FORWARD_MAGIC:
        raise ProtocolError(f"not a forwarding preamble: {line[:40]!r}")
    try:
        client_ip = ipaddress.ip_address(parts[1].decode("ascii")).compressed
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"forwarding preamble: bad client address {parts[1][:40]!r}") from None
    scheme = parts[2].decode("ascii", "replace")
    if scheme not in FORWARD_SCHEMES:
        raise ProtocolError(f"forwarding preamble: scheme {scheme!r} is neither http nor https")
    return client_ip, scheme

"""The links between the processes of a multi-process edge (docs/architecture.md, "The edge in several
processes"): bytes only, no I/O.

- The control channel between the parent and each worker carries JSON Lines: one object per line, each with
  an `op` naming the message; a request carries an `id` its `reply` repeats. `encode_message` makes a line,
  `LineDecoder` turns received bytes into messages and refuses anything malformed or over `MAX_LINE`.
- A worker's answer to the live view's question about one request's trace (`fit_trace_answer`) is cut to fit
  one line.
- The forwarding link between workers (one data centre forwarding an eyeball's request to another that has a
  connection of the tunnel) starts with one preamble line naming the eyeball and what follows
  (`forward_preamble`, `parse_forward_preamble` -> `Forwarded`): HTTP/1.1, a `--warp-listen` connection's raw
  bytes, or a UDP flow's datagrams (`encode_frame`, `FrameDecoder`).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from tunnel_lab.wire.errors import ProtocolError

MAX_LINE = 4 * 1024 * 1024  # a history batch of a big lab fits; a runaway peer does not
PARENT_OPS = frozenset({"start", "call", "peers", "shutdown"})  # parent -> worker
WORKER_OPS = frozenset({"ready", "reply", "routes", "took"})  # worker -> parent
FORWARD_MAGIC = b"TLFWD1"
MAX_PREAMBLE = 128
FORWARD_SCHEMES = ("http", "https", "warp", "udp")
MAX_FRAME = 0xFFFF  # a forwarded UDP datagram (the tunnel carries fewer: wire.datagram.MAX_PAYLOAD)


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


@dataclass(frozen=True, kw_only=True)
class Forwarded:
    """What a forwarding link's preamble says: who the eyeball is and what follows. `scheme` `http` or
    `https`: an HTTP/1.1 request; `warp`: the bytes of a `--warp-listen` proxy connection, raw; `udp`: the
    datagrams of one UDP flow to `destination`, each framed by `encode_frame`."""

    client_ip: str
    scheme: str
    client_port: int = 0  # warp and udp: the eyeball's port (`cf-cloudflared-proxy-src`)
    destination: tuple[str, int] | None = None  # udp only

    def __post_init__(self) -> None:
        if self.scheme not in FORWARD_SCHEMES:
            raise ProtocolError(f"forwarding scheme {self.scheme!r} is none of {', '.join(FORWARD_SCHEMES)}")
        if not 0 <= self.client_port < 65536:
            raise ProtocolError(f"forwarding preamble: client port {self.client_port} out of range")
        if (self.destination is not None) != (self.scheme == "udp"):
            raise ProtocolError("forwarding preamble: a destination comes with udp, and only with udp")
        if self.destination is not None and not 0 < self.destination[1] < 65536:
            raise ProtocolError(f"forwarding preamble: destination port {self.destination[1]} out of range")


def forward_preamble(client_ip: str, scheme: str, *, client_port: int = 0,
                     destination: tuple[str, int] | None = None) -> bytes:
    """The first line on a forwarding link: the eyeball's address and what follows (`Forwarded`), which the
    receiving data centre uses as if the eyeball had connected to it (`cf-connecting-ip`,
    `x-forwarded-proto`, `cf-cloudflared-proxy-src`). `TLFWD1 IP http|https`, `TLFWD1 IP warp PORT`,
    `TLFWD1 IP udp PORT DEST-IP DEST-PORT`."""
    fwd = Forwarded(client_ip=client_ip, scheme=scheme, client_port=client_port, destination=destination)
    fields = [FORWARD_MAGIC, ipaddress.ip_address(client_ip).compressed.encode(), scheme.encode()]
    if scheme in ("warp", "udp"):
        fields.append(b"%d" % client_port)
    if fwd.destination is not None:
        fields += [ipaddress.ip_address(fwd.destination[0]).compressed.encode(), b"%d" % fwd.destination[1]]
    return b" ".join(fields) + b"\r\n"


def parse_forward_preamble(line: bytes) -> Forwarded:
    """A preamble line (without its CRLF) as `Forwarded`; ProtocolError naming what is wrong."""
    if len(line) > MAX_PREAMBLE:
        raise ProtocolError(f"forwarding preamble of {len(line)} bytes, over {MAX_PREAMBLE}")
    parts = line.split(b" ")
    if len(parts) < 3 or parts[0] != FORWARD_MAGIC:
        raise ProtocolError(f"not a forwarding preamble: {line[:40]!r}")
    client_ip = _ip(parts[1], "client address")
    scheme = parts[2].decode("ascii", "replace")
    expected = {"http": 3, "https": 3, "warp": 4, "udp": 6}.get(scheme)
    if expected is None:
        raise ProtocolError(f"forwarding preamble: scheme {scheme!r} is none of {', '.join(FORWARD_SCHEMES)}")
    if len(parts) != expected:
        raise ProtocolError(f"forwarding preamble: {scheme} takes {expected} fields, not {len(parts)}")
    port = _port(parts[3], "client port") if expected > 3 else 0
    destination = None
    if expected > 4:
        destination = (_ip(parts[4], "destination"), _port(parts[5], "destination port"))
    return Forwarded(client_ip=client_ip, scheme=scheme, client_port=port, destination=destination)


def _ip(field: bytes, what: str) -> str:
    try:
        return ipaddress.ip_address(field.decode("ascii")).compressed
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"forwarding preamble: bad {what} {field[:40]!r}") from None


def _port(field: bytes, what: str) -> int:
    if not field.isdigit() or len(field) > 5:
        raise ProtocolError(f"forwarding preamble: bad {what} {field[:10]!r}")
    return int(field)


def encode_frame(payload: bytes) -> bytes:
    """One UDP datagram on a forwarding link: a 2-byte big-endian length, then the payload."""
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"a datagram of {len(payload)} bytes does not fit a frame (at most {MAX_FRAME})")
    return len(payload).to_bytes(2, "big") + payload


class FrameDecoder:
    """Received forwarding-link bytes -> the datagrams framed by `encode_frame` (at most one frame held)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """The datagrams completed by `data`."""
        self._buffer += data
        out = []
        while len(self._buffer) >= 2:
            size = int.from_bytes(self._buffer[:2], "big")
            if len(self._buffer) < 2 + size:
                break
            out.append(bytes(self._buffer[2:2 + size]))
            del self._buffer[:2 + size]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (a link that ends with some lost a datagram mid-way)."""
        return len(self._buffer)

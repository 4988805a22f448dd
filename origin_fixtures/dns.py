"""A tiny DNS server's decisions (pure): parse a query, build the answer (RFC 1035 §4.1).

The `dns` origin answers every name with fixed records so that a scenario can check what came back through
the tunnel: A -> 192.0.2.1, AAAA -> 2001:db8::1, TXT -> "tunnel-lab dns origin"; other types get an empty
answer (NOERROR, no records). A query it cannot parse gets FORMERR when at least its header is whole.
`build_query` and `parse_answer` are the client side (the scenario runner's `udp` step).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from tunnel_lab.wire.errors import ProtocolError

TYPE_A, TYPE_TXT, TYPE_AAAA = 1, 16, 28
TYPES = {"A": TYPE_A, "TXT": TYPE_TXT, "AAAA": TYPE_AAAA}
CLASS_IN = 1
RCODE_FORMERR = 1
A_ANSWER = "192.0.2.1"
AAAA_ANSWER = "2001:db8::1"
TXT_ANSWER = "tunnel-lab dns origin"
TTL = 60
MAX_NAME = 255


class DNSFormatError(ProtocolError):
    """The message is not a DNS message this fixture understands."""


@dataclass(frozen=True, kw_only=True)
class Question:
    id: int
    name: str
    qtype: int
    flags: int = 0x0100  # RD


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise DNSFormatError(f"label {label!r} is not 1-63 bytes")
        out += bytes((len(raw),)) + raw
    return out + b"\x00"


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    labels: list[str] = []
    while True:
        if offset >= len(data):
            raise DNSFormatError("name runs past the end of the message")
        length = data[offset]
        offset += 1
        if length == 0:
            break
        if length >= 64:
            raise DNSFormatError("compressed or bad label in a question")
        labels.append(data[offset:offset + length].decode("ascii", "replace"))
        offset += length
        if sum(len(x) + 1 for x in labels) > MAX_NAME:
            raise DNSFormatError("name longer than 255 bytes")
    return ".".join(labels) or ".", offset


def build_query(name: str, qtype: str = "A", *, query_id: int = 0x4C42) -> bytes:
    """A standard recursive query for `name`."""
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + _encode_name(name) + \
        struct.pack("!HH", TYPES[qtype], CLASS_IN)


def parse_query(data: bytes) -> Question:
    """The one question of a query; DNSFormatError otherwise."""
    if len(data) < 12:
        raise DNSFormatError(f"{len(data)} bytes is shorter than a DNS header")
    query_id, flags, qdcount = struct.unpack("!HHH", data[:6])
    if flags & 0x8000:
        raise DNSFormatError("a response, not a query")
    if qdcount != 1:
        raise DNSFormatError(f"{qdcount} questions (exactly one is supported)")
    name, offset = _read_name(data, 12)
    if offset + 4 > len(data):
        raise DNSFormatError("question type and class missing")
    qtype, _qclass = struct.unpack("!HH", data[offset:offset + 4])
    return Question(id=query_id, name=name, qtype=qtype, flags=flags)


def answer(data: bytes) -> bytes | None:
    """The response to a received datagram (None: not even a header, nothing to answer)."""
    try:
        q = parse_query(data)
    except DNSFormatError:
        if len(data) < 12:
            return None
        query_id = struct.unpack("!H", data[:2])[0]
        return struct.pack("!HHHHHH", query_id, 0x8000 | RCODE_FORMERR, 0, 0, 0, 0)
    records: list[bytes] = []
    if q.qtype == TYPE_A:
        records.append(ipaddress.IPv4Address(A_ANSWER).packed)
    elif q.qtype == TYPE_AAAA:
        records.append(ipaddress.IPv6Address(AAAA_ANSWER).packed)
    elif q.qtype == TYPE_TXT:
        text = TXT_ANSWER.encode()
        records.append(bytes((len(text),)) + text)
    question = _encode_name(q.name) + struct.pack("!HH", q.qtype, CLASS_IN)
    flags = 0x8000 | 0x0400 | (q.flags & 0x0100) | 0x0080  # QR, AA, RD copied, RA
    out = struct.pack("!HHHHHH", q.id, flags, 1, len(records), 0, 0) + question
    for rdata in records:
        out += b"\xc0\x0c" + struct.pack("!HHIH", q.qtype, CLASS_IN, TTL, len(rdata)) + rdata
    return out


def parse_answer(data: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, answers as text) of a response from this fixture; DNSFormatError otherwise."""
    if len(data) < 12:
        raise DNSFormatError(f"{len(data)} bytes is shorter than a DNS header")
    query_id, flags, qdcount, ancount = struct.unpack("!HHHH", data[:8])
    offset = 12
    for _ in range(qdcount):
        _name, offset = _read_name(data, offset)
        offset += 4
    answers: list[str] = []
    for _ in range(ancount):
        if data[offset:offset + 2] != b"\xc0\x0c":
            raise DNSFormatError("answer name is not a pointer to the question")
        rtype, _rclass, _ttl, length = struct.unpack("!HHIH", data[offset + 2:offset + 12])
        rdata = data[offset + 12:offset + 12 + length]
        offset += 12 + length
        if rtype == TYPE_A:
            answers.append(str(ipaddress.IPv4Address(rdata)))
        elif rtype == TYPE_AAAA:
            answers.append(str(ipaddress.IPv6Address(rdata)))
        elif rtype == TYPE_TXT:
            answers.append(rdata[1:1 + rdata[0]].decode("utf-8", "replace"))
    return query_id, flags & 0x000F, answers

"""DNS messages (RFC 1035), sans-I/O: bytes to `Message` and back.

Enough of DNS for the lab's resolver in `tunnel-lab sandbox`: the header, questions, and the record
types cloudflared and its users ask for (A, AAAA, SRV, TXT; RFC 3596, RFC 2782). Other record types
are kept as opaque RDATA, so any well-formed message decodes. Names are read with compression
pointers (RFC 1035 §4.1.4), guarded against loops; names are written uncompressed, which every
resolver accepts. Errors are `DnsFormatError` naming the offset where the message went wrong.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from tunnel_lab.wire.errors import ProtocolError

# RR types and classes (RFC 1035 §3.2.2, RFC 3596, RFC 2782, RFC 6891).
A = 1
TXT = 16
AAAA = 28
SRV = 33
OPT = 41
IN = 1

# RCODEs (RFC 1035 §4.1.1).
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5

# Header flag bits.
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080

HEADER_LEN = 12
MAX_NAME_LEN = 255  # RFC 1035 §3.1, wire form
MAX_LABEL_LEN = 63
_MAX_POINTERS = 32  # a legitimate name never needs this many jumps; more is a loop

TYPE_NAMES = {A: "A", TXT: "TXT", AAAA: "AAAA", SRV: "SRV", OPT: "OPT"}


class DnsFormatError(ProtocolError):
    """A DNS message is malformed: `offset` is where decoding stopped."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"DNS message at byte {offset}: {message}")
        self.offset = offset


@dataclass(frozen=True, kw_only=True)
class Question:
    name: str  # lower-case, no trailing dot ("" is the root)
    qtype: int
    qclass: int = IN


@dataclass(frozen=True, kw_only=True)
class Record:
    """A resource record. `data` is the decoded RDATA for A/AAAA (address text), SRV
    (`SrvData`), TXT (tuple of bytes strings); raw bytes for any other type."""

    name: str
    rtype: int
    rclass: int = IN
    ttl: int = 60
    data: object = b""


@dataclass(frozen=True, kw_only=True)
class SrvData:
    priority: int
    weight: int
    port: int
    target: str


@dataclass(frozen=True, kw_only=True)
class Message:
    id: int
    flags: int = 0  # every header bit except the RCODE (QR, OPCODE, AA, TC, RD, RA, Z)
    rcode: int = NOERROR
    questions: tuple[Question, ...] = ()
    answers: tuple[Record, ...] = ()
    authorities: tuple[Record, ...] = ()
    additionals: tuple[Record, ...] = field(default=())

    @property
    def is_response(self) -> bool:
        return bool(self.flags & QR)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF


def canonical_name(name: str) -> str:
    """`Api.Cloudflare.COM.` -> `api.cloudflare.com` (DNS names compare case-insensitively)."""
    return name.rstrip(".").lower() if name != "." else ""


# --- decoding ---------------------------------------------------------------------------------------------

def decode_message(data: bytes) -> Message:
    """Decode one DNS message (a UDP payload, or a TCP message without its length prefix)."""
    if len(data) < HEADER_LEN:
        raise DnsFormatError(f"{len(data)} bytes is shorter than the 12-byte header", len(data))
    msg_id, bits, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data, 0)
    pos = HEADER_LEN
    questions = []
    for _ in range(qd):
        name, pos = _read_name(data, pos)
        if pos + 4 > len(data):
            raise DnsFormatError("question ends before its type and class", pos)
        qtype, qclass = struct.unpack_from("!HH", data, pos)
        pos += 4
        questions.append(Question(name=name, qtype=qtype, qclass=qclass))
    sections: list[list[Record]] = [[], [], []]
    for section, count in zip(sections, (an, ns, ar), strict=True):
        for _ in range(count):
            record, pos = _read_record(data, pos)
            section.append(record)
    if pos != len(data):
        raise DnsFormatError(f"{len(data) - pos} bytes after the last record", pos)
    return Message(id=msg_id, flags=bits & ~0xF, rcode=bits & 0xF, questions=tuple(questions),
                   answers=tuple(sections[0]), authorities=tuple(sections[1]),
                   additionals=tuple(sections[2]))


def decode_header(data: bytes) -> Message | None:
    """Just the id and flags of `data` (None if even those are missing): enough to answer FORMERR."""
    if len(data) < 4:
        return None
    msg_id, bits = struct.unpack_from("!HH", data, 0)
    return Message(id=msg_id, flags=bits & ~0xF, rcode=bits & 0xF)


def _read_name(data: bytes, pos: int) -> tuple[str, int]:
    """Read a (possibly compressed) name at `pos`; returns it and the offset after it in place."""
    labels: list[str] = []
    wire_len = 1
    end: int | None = None
    jumps = 0
    while True:
        if pos >= len(data):
            raise DnsFormatError("name runs past the end of the message", pos)
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 2 > len(data):
                raise DnsFormatError("compression pointer cut short", pos)
            target = ((length & 0x3F) << 8) | data[pos + 1]
            jumps += 1
            if jumps > _MAX_POINTERS or target >= pos:
                # Pointers only ever point backwards in a sane message; forward or too many is a loop.
                raise DnsFormatError("compression pointer loop or forward pointer", pos)
            if end is None:
                end = pos + 2
            pos = target
            continue
        if kind != 0:
            raise DnsFormatError(f"unsupported label type 0x{kind:02x}", pos)
        if length == 0:
            return ".".join(labels).lower(), (pos + 1 if end is None else end)
        label = data[pos + 1:pos + 1 + length]
        if len(label) != length:
            raise DnsFormatError("label runs past the end of the message", pos)
        wire_len += length + 1
        if wire_len > MAX_NAME_LEN:
            raise DnsFormatError("name longer than 255 bytes", pos)
        try:
            text = label.decode("ascii")
        except UnicodeDecodeError:
            raise DnsFormatError("label is not ASCII", pos) from None
        if "." in text:
            raise DnsFormatError("label contains a dot", pos)
        labels.append(text)
        pos += 1 + length


def _read_record(data: bytes, pos: int) -> tuple[Record, int]:
    name, pos = _read_name(data, pos)
    if pos + 10 > len(data):
        raise DnsFormatError("record ends before its fixed fields", pos)
    rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
    pos += 10
    end = pos + rdlen
    if end > len(data):
        raise DnsFormatError(f"RDATA of {rdlen} bytes runs past the end of the message", pos)
    rdata = data[pos:end]
    value: object
    if rtype == A and rclass == IN:
        if rdlen != 4:
            raise DnsFormatError(f"A record with {rdlen} bytes of RDATA", pos)
        value = str(ipaddress.IPv4Address(rdata))
    elif rtype == AAAA and rclass == IN:
        if rdlen != 16:
            raise DnsFormatError(f"AAAA record with {rdlen} bytes of RDATA", pos)
        value = str(ipaddress.IPv6Address(rdata))
    elif rtype == SRV:
        if rdlen < 7:
            raise DnsFormatError(f"SRV record with {rdlen} bytes of RDATA", pos)
        priority, weight, port = struct.unpack_from("!HHH", data, pos)
        target, after = _read_name(data, pos + 6)
        if after != end:
            raise DnsFormatError("SRV target does not end where the RDATA does", after)
        value = SrvData(priority=priority, weight=weight, port=port, target=target)
    elif rtype == TXT:
        strings = []
        at = 0
        while at < rdlen:
            length = rdata[at]
            if at + 1 + length > rdlen:
                raise DnsFormatError("TXT string runs past its RDATA", pos + at)
            strings.append(rdata[at + 1:at + 1 + length])
            at += 1 + length
        value = tuple(strings)
    else:
        value = rdata
    return Record(name=name, rtype=rtype, rclass=rclass, ttl=ttl, data=value), end


# --- encoding ---------------------------------------------------------------------------------------------

def encode_message(msg: Message) -> bytes:
    """The wire form of `msg` (names uncompressed)."""
    out = bytearray(struct.pack(
        "!HHHHHH", msg.id, (msg.flags & ~0xF) | (msg.rcode & 0xF), len(msg.questions), len(msg.answers),
        len(msg.authorities), len(msg.additionals)))
    for q in msg.questions:
        out += encode_name(q.name) + struct.pack("!HH", q.qtype, q.qclass)
    for record in (*msg.answers, *msg.authorities, *msg.additionals):
        rdata = _encode_rdata(record)
        out += encode_name(record.name)
        out += struct.pack("!HHIH", record.rtype, record.rclass, record.ttl, len(rdata)) + rdata
    return bytes(out)


def encode_name(name: str) -> bytes:
    """A name in wire form; raises `ValueError` for an empty label or one over 63 bytes."""
    name = canonical_name(name)
    out = bytearray()
    if name:
        for label in name.split("."):
            raw = label.encode("ascii")
            if not 0 < len(raw) <= MAX_LABEL_LEN:
                raise ValueError(f"DNS name {name!r}: label {label!r} must be 1-63 bytes")
            out += bytes([len(raw)]) + raw
    out += b"\x00"
    if len(out) > MAX_NAME_LEN:
        raise ValueError(f"DNS name {name!r} is longer than 255 bytes")
    return bytes(out)


def _encode_rdata(record: Record) -> bytes:
    data = record.data
    if record.rtype == A and isinstance(data, str):
        return ipaddress.IPv4Address(data).packed
    if record.rtype == AAAA and isinstance(data, str):
        return ipaddress.IPv6Address(data).packed
    if record.rtype == SRV and isinstance(data, SrvData):
        return struct.pack("!HHH", data.priority, data.weight, data.port) + encode_name(data.target)
    if record.rtype == TXT and isinstance(data, tuple):
        return b"".join(bytes([len(s)]) + s for s in data)
    if isinstance(data, bytes):
        return data
    raise ValueError(f"record {record.name} type {record.rtype}: cannot encode RDATA {data!r}")


def txt_strings(text: str | bytes) -> tuple[bytes, ...]:
    """`text` as TXT character-strings: split into 255-byte pieces (a reader joins them again)."""
    raw = text.encode() if isinstance(text, str) else text
    return tuple(raw[i:i + 255] for i in range(0, len(raw), 255)) or (b"",)


def reply(query: Message, *, rcode: int = NOERROR, answers: tuple[Record, ...] = (),
          authoritative: bool = True) -> Message:
    """The response to `query`: same id, question and RD bit; QR and RA set."""
    flags = QR | RA | (query.flags & RD) | (query.flags & 0x7800)  # keep the OPCODE
    if authoritative:
        flags |= AA
    return Message(id=query.id, flags=flags, rcode=rcode, questions=query.questions, answers=answers)

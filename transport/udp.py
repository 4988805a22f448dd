"""UDP batching for the QUIC shells (edge/quic.py, connector/quic_transport.py), Linux only where it counts.

Pure-Python QUIC pays a system call per datagram: at 1452 bytes a packet, a 64 MiB transfer is ~46 000
sendto calls, about half of the edge's busy time over QUIC (py-spy, `tunnel-lab bench`). Generic
segmentation offload (UDP_SEGMENT, Linux >= 4.18) sends a run of equal-size datagrams to one address in one
`sendmsg`; the kernel cuts it into the same datagrams (quic-go does this too). Generic receive offload
(UDP_GRO, Linux >= 5.0) is the reverse: the kernel may hand several datagrams of one sender over in one
buffer, with their size in a control message. Where either is missing, plain per-datagram calls are used.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Any

SOL_UDP = 17
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
MAX_BATCH_BYTES = 65000  # one UDP send is at most 64 KiB including headers
GRO_BUFFER = 65535
_ANCILLARY = socket.CMSG_SPACE(4)
# Errors that mean "this socket or kernel cannot do GSO": fall back to one datagram per call.
_NO_GSO = (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE)


def gso_batches(datagrams: Sequence[bytes]) -> Iterator[tuple[bytes, int]]:
    """Group datagrams, in order, into (buffer, segment size) sends; segment size 0 means a single datagram.

    The kernel's rule: every segment but the last has exactly the segment size, the last may be shorter.
    """
    i, n = 0, len(datagrams)
    while i < n:
        first = datagrams[i]
        size = len(first)
        j = i + 1
        total = size
        while (j < n and j - i < MAX_SEGMENTS and total + len(datagrams[j]) <= MAX_BATCH_BYTES
               and 0 < len(datagrams[j]) <= size):
            total += len(datagrams[j])
            j += 1
            if len(datagrams[j - 1]) < size:
                break  # a shorter datagram can only end a batch
        if j - i == 1:
            yield first, 0
        else:
            yield b"".join(datagrams[i:j]), size
        i = j


class DatagramSender:
    """Sends datagrams on a non-blocking UDP socket, batched with GSO while the kernel accepts it.

    A full socket buffer drops what did not fit (QUIC recovers lost packets); other errors are raised
    except the "unreachable" ones, which a later packet may not meet (and QUIC's timers handle).
    """

    def __init__(self, sock: socket.socket, *, gso: bool = True) -> None:
        self.sock = sock
        self.gso = gso and hasattr(sock, "sendmsg")
        self.dropped = 0  # datagrams lost to a full socket buffer

    def send(self, datagrams: Sequence[bytes], addr: Any = None) -> None:
        """Send `datagrams` to `addr` (None on a connected socket), in order."""
        if not self.gso or len(datagrams) == 1:
            for data in datagrams:
                self._plain(data, addr)
            return
        for buffer, size in gso_batches(datagrams):
            if size == 0:
                self._plain(buffer, addr)
                continue
            control = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
            try:
                if addr is None:
                    self.sock.sendmsg([buffer], control)
                else:
                    self.sock.sendmsg([buffer], control, 0, addr)
            except BlockingIOError:
                self.dropped += -(-len(buffer) // size)
            except OSError as exc:
                if exc.errno not in _NO_GSO:
                    _raise_unless_unreachable(exc)
                    continue
                self.gso = False  # this kernel or socket cannot: one call per datagram from now on
                for start in range(0, len(buffer), size):
                    self._plain(buffer[start:start + size], addr)

    def _plain(self, data: bytes, addr: Any) -> None:
        try:
            if addr is None:
                self.sock.send(data)
            else:
                self.sock.sendto(data, addr)
        except BlockingIOError:
            self.dropped += 1
        except OSError as exc:
            _raise_unless_unreachable(exc)


def _raise_unless_unreachable(exc: OSError) -> None:
    if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
        raise exc


def enable_gro(sock: socket.socket) -> bool:
    """Ask the kernel to coalesce received datagrams (then read them with `receive`)."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def receive(sock: socket.socket, gro: bool) -> tuple[list[bytes], Any]:
    """One read: the datagrams it held (several when the kernel coalesced them) and the sender's address.

    Raises BlockingIOError when nothing is waiting, as recvfrom does."""
    if not gro:
        data, addr = sock.recvfrom(GRO_BUFFER)
        return [data], addr
    data, ancillary, _flags, addr = sock.recvmsg(GRO_BUFFER, _ANCILLARY)
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            size = struct.unpack("=i", value[:4])[0]
            if 0 < size < len(data):
                return [data[i:i + size] for i in range(0, len(data), size)], addr
    return [data], addr

"""I/O plumbing shared by the edge and the connector (trio allowed; no protocol decisions).

What goes on the wire is decided in `wire/`; this package moves bytes and holds every override of a
library internal (h2, hpack, qh3, trio), each pinned by a test (tests/*/test_transport_*.py,
tests/unit/test_hpack_encoder.py, tests/unit/test_qh3_pins.py):

- `transport.tunnel`: the stream interface the edge's eyeball side uses of a tunnel connection
  (typing.Protocol), which the HTTP/2 and the QUIC tunnel connections both present.
- `transport.tls`: the one TLS stream (memory BIOs), client and server: every received record in one read.
- `transport.h2`: one h2 connection class with the overrides both sides need.
- `transport.writer`: the one HTTP/2 writer task (coalesced writes, backpressure, the write timeout).
- `transport.hpack`: the HPACK encoder that leaves long values uncompressed (hpack's `Encoder.add`).
- `transport.pipe`: the one byte pipe between a tunnel stream and a byte stream.
- `transport.qh3`: the qh3 internals both QUIC shells read or work around.
- `transport.trio_ssl`: the SSLObject under trio's `SSLStream` (the origin fixtures' SNI).
"""

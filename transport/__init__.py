"""I/O plumbing shared by the edge and the connector (trio allowed; no protocol decisions).

What goes on the wire is decided in `wire/`; this package moves bytes and holds every override of a
library internal (h2, h11, trio's SSLStream), each pinned by a test in tests/unit/test_transport_*.py:

- `transport.tunnel`: the stream interface the edge's eyeball side uses of a tunnel connection
  (typing.Protocol), which the HTTP/2 and the QUIC tunnel connections both present.
- `transport.tls`: reading every buffered TLS record at once (trio's `SSLStream`, and a memory-BIO
  TLS client stream).
- `transport.h2`: one h2 connection class with the overrides both sides need.
- `transport.hpack`: the HPACK encoder that leaves long values uncompressed (hpack's `Encoder.add`).
- `transport.h11body`: the Content-Length body fast path around h11's buffer.
- `transport.pipe`: the one byte pipe between a tunnel stream and a byte stream.
"""

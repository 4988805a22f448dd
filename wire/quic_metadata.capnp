# tunnel-lab's description of the heads of QUIC tunnel data streams (cloudflared 2026.8.2).
#
# Written for this project from the wire as docs/protocol.md (QUIC chapter) describes it: ids, ordinals and
# field types as the wire has them, names as cloudflared's so test output reads like its logs. The runtime
# never loads this file (wire/quic_stream.py encodes by hand); the tests cross-check that codec with pycapnp.

@0xb29021ef7421cc32;

# The edge's head of a data stream: where to, what kind, and key-value metadata (HTTP method, host, fields).
struct ConnectRequest @0xc47116a1045e4061 {
  dest @0 :Text;
  type @1 :ConnectionType;
  metadata @2 :List(Metadata);
}

enum ConnectionType @0xc52e1bac26d379c8 {
  http @0;
  websocket @1;
  tcp @2;
}

# One key-value pair; a repeated HTTP field is one pair per value.
struct Metadata @0xe1446b97bfd1cd37 {
  key @0 :Text;
  val @1 :Text;
}

# The connector's answer: an error text (empty on success) and metadata (HTTP status and fields).
struct ConnectResponse @0xb1032ec91cef8727 {
  error @0 :Text;
  metadata @1 :List(Metadata);
}

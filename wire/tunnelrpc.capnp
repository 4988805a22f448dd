# tunnel-lab's description of the registration RPC that cloudflared 2026.8.2 speaks on the control stream.
#
# Written for this project from docs/protocol.md §3.5 (ids, ordinals and wire layouts as observed); only the
# parts the http2 transport uses, plus the QUIC-side interfaces for reference. The runtime never loads
# this file: wire/capnp.py and wire/registration.py encode by hand. The tests load it with pycapnp to
# cross-check the hand-written codec, so ids, ordinals and field types must stay exactly as the wire has
# them. Field names follow cloudflared's so that test output reads like the captures.

@0xdb8274f9144abc7e;

# --- registration (http2 and quic) -------------------------------------------------------------------

struct TunnelAuth @0x9496331ab9cd463f {
  accountTag @0 :Text;
  tunnelSecret @1 :Data;
}

struct ClientInfo @0x83ced0145b2f114b {
  # The connector id: 16 random bytes per process.
  clientId @0 :Data;
  # Feature flags; cloudflared sends them in random order.
  features @1 :List(Text);
  version @2 :Text;
  # GOOS_GOARCH, e.g. linux_amd64.
  arch @3 :Text;
}

struct ConnectionOptions @0xb4bf9861fe035d04 {
  client @0 :ClientInfo;
  # The connector's local address towards the edge, 16 bytes (IPv4 in IPv4-mapped form).
  originLocalIp @1 :Data;
  replaceExisting @2 :Bool;
  compressionQuality @3 :UInt8;
  numPreviousAttempts @4 :UInt8;
}

struct ConnectionResponse @0xdbaa9d03d52b62dc {
  result :union {
    error @0 :ConnectionError;
    connectionDetails @1 :ConnectionDetails;
  }
}

struct ConnectionError @0xf5f383d2785edb86 {
  cause @0 :Text;
  # Nanoseconds; cloudflared ignores it.
  retryAfter @1 :Int64;
  shouldRetry @2 :Bool;
}

struct ConnectionDetails @0xb5f39f082b9ac18a {
  # The connection's id: exactly 16 bytes or cloudflared rejects the answer.
  uuid @0 :Data;
  locationName @1 :Text;
  tunnelIsRemotelyManaged @2 :Bool;
}

interface RegistrationServer @0xf71695ec7fe85497 {
  registerConnection @0 (auth :TunnelAuth, tunnelId :Data, connIndex :UInt8,
                         options :ConnectionOptions) -> (result :ConnectionResponse);
  unregisterConnection @1 () -> ();
  updateLocalConfiguration @2 (config :Data) -> ();
}

# --- quic only (not used by the http2 lab; kept so the ids are written down once) ---------------------

struct Tag @0xcbd96442ae3bb01a {
  name @0 :Text;
  value @1 :Text;
}

struct RegisterUdpSessionResponse @0xab6d5210c1f26687 {
  err @0 :Text;
  spans @1 :Data;
}

struct UpdateConfigurationResponse @0xdb58ff694ba05cf9 {
  latestAppliedVersion @0 :Int32;
  err @1 :Text;
}

interface SessionManager @0x839445a59fb01686 {
  registerUdpSession @0 (sessionId :Data, dstIp :Data, dstPort :UInt16, closeAfterIdleHint :Int64,
                         traceContext :Text = "") -> (result :RegisterUdpSessionResponse);
  unregisterUdpSession @1 (sessionId :Data, message :Text) -> ();
}

interface ConfigurationManager @0xb48edfbdaa25db04 {
  updateConfiguration @0 (version :Int32, config :Data) -> (result :UpdateConfigurationResponse);
}

interface CloudflaredServer @0xf548cef9dea2a4a1 extends(SessionManager, ConfigurationManager) {}

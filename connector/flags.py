"""cloudflared's `tunnel` and `tunnel run` flags: names, aliases, levels, environment variables.

Pure data plus a Go-`flag`-style parser. Levels (docs/protocol.md §10.3): `T` = `tunnel` (and the root),
`R` = `run`, `TR` = both. `support` says what this connector does with a flag:

- `yes`: implemented;
- `noop`: accepted silently (it changes nothing here, or cloudflared ignores it too);
- `warn`: accepted with a warning that it has no effect here;
- `refuse`: a clear error (it would change behaviour in a way this connector cannot honour).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunnel_lab.connector.config import format_go_duration, parse_go_duration
from tunnel_lab.wire.errors import TunnelLabError


class UsageError(TunnelLabError):
    """A command-line usage error (cloudflared prints `Incorrect Usage.` and the help)."""

    def __init__(self, message: str, *, help_for: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.help_for = help_for


@dataclass(frozen=True)
class Flag:
    name: str
    kind: str  # bool | str | int | uint | dur | slice
    levels: str  # T | R | TR
    env: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    default: Any = None
    usage: str = ""
    show: bool = True  # listed by --help
    support: str = "yes"  # yes | noop | warn | refuse
    note: str = ""  # the warning or refusal text

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def _f(name: str, kind: str, levels: str, *env: str, **kw: Any) -> Flag:
    return Flag(name=name, kind=kind, levels=levels, env=tuple(env), **kw)


_LEGACY = " Only takes effect with --url (no ingress rules); prefer originRequest in the config file."

FLAGS: tuple[Flag, ...] = (
    # --- tunnel level: cloudflared's configureCloudflaredFlags
    _f("config", "str", "T", usage="Specifies a config file in YAML format."),
    _f("origincert", "str", "T", "TUNNEL_ORIGIN_CERT", support="noop",
       usage="Path to the certificate generated for your origin when you run cloudflared login (not needed "
             "for `run`)."),
    _f("autoupdate-freq", "dur", "T", default=86400.0, support="noop", usage="Autoupdate frequency."),
    _f("no-autoupdate", "bool", "T", "NO_AUTOUPDATE", default=False, support="noop",
       usage="Disable periodic check for updates (this connector never updates itself)."),
    _f("no-prechecks", "bool", "T", "TUNNEL_NO_PRECHECKS", default=False, support="noop",
       usage="Skip connectivity pre-checks at startup (this connector runs none)."),
    _f("metrics", "str", "T", "TUNNEL_METRICS", default="localhost:0",
       usage="Listen address for metrics reporting. If no address is passed the connector tries "
             "127.0.0.1:20241-20245, then a random port."),
    _f("pidfile", "str", "T", "TUNNEL_PIDFILE", usage="Write the application's PID to this file."),
    # tunnel-lab's own (cloudflared has no such flag): the protocol trace, docs/trace.md
    _f("trace", "str", "TR", "TUNNEL_LAB_TRACE",
       usage="tunnel-lab only: write a protocol trace (JSON Lines, secrets redacted) to this file."),
    # --- logging
    _f("loglevel", "str", "T", "TUNNEL_LOGLEVEL", default="info",
       usage="Application logging level {debug, info, warn, error, fatal}."),
    _f("transport-loglevel", "str", "T", "TUNNEL_PROTO_LOGLEVEL", "TUNNEL_TRANSPORT_LOGLEVEL",
       aliases=("proto-loglevel",), default="info", support="noop",
       usage="Transport logging level {debug, info, warn, error, fatal} (transport logs follow --loglevel)."),
    _f("logfile", "str", "T", "TUNNEL_LOGFILE", usage="Save application log to this file (JSON lines)."),
    _f("log-directory", "str", "T", "TUNNEL_LOGDIRECTORY",
       usage="Save application log to cloudflared.log in this directory."),
    _f("trace-output", "str", "T", "TUNNEL_TRACE_OUTPUT", support="warn", show=False),
    _f("output", "str", "T", "TUNNEL_MANAGEMENT_OUTPUT", "TUNNEL_LOG_OUTPUT", default="default",
       usage="Output format for the logs (default, json)"),
    # --- removed proxy-dns feature: cloudflared keeps the flags so that scripts do not break
    _f("proxy-dns", "bool", "T", "TUNNEL_DNS", support="warn", show=False, note="is a removed feature"),
    _f("proxy-dns-port", "int", "T", "TUNNEL_DNS_PORT", support="warn", show=False,
       note="is a removed feature"),
    _f("proxy-dns-address", "str", "T", "TUNNEL_DNS_ADDRESS", support="warn", show=False,
       note="is a removed feature"),
    _f("proxy-dns-upstream", "slice", "T", "TUNNEL_DNS_UPSTREAM", support="warn", show=False,
       note="is a removed feature"),
    _f("proxy-dns-max-upstream-conns", "int", "T", "TUNNEL_DNS_MAX_UPSTREAM_CONNS", support="warn",
       show=False, note="is a removed feature"),
    _f("proxy-dns-bootstrap", "slice", "T", "TUNNEL_DNS_BOOTSTRAP", support="warn", show=False,
       note="is a removed feature"),
    # --- tunnel level: tunnelFlags
    _f("credentials-file", "str", "TR", "TUNNEL_CRED_FILE", aliases=("cred-file",),
       usage="Filepath at which to read the tunnel credentials"),
    _f("is-autoupdated", "bool", "T", support="noop", show=False),
    _f("edge", "slice", "T", "TUNNEL_EDGE",
       usage="Address of the edge (HOST:PORT or [IPv6]:PORT); repeat for more addresses. Without it the "
             "edge is discovered through DNS (SRV, A and AAAA records), as in `tunnel-lab sandbox`."),
    _f("region", "str", "T", "TUNNEL_REGION", support="warn",
       note="only selects a regional SRV name for DNS discovery, which this connector does not look up",
       usage="Cloudflare Edge region to connect to (ignored: use --edge)."),
    _f("edge-ip-version", "str", "T", "TUNNEL_EDGE_IP_VERSION", default="auto",
       usage="Cloudflare Edge IP address version to connect with. {4, 6, auto} (discovered addresses "
             "only: --edge addresses always behave as auto, as in cloudflared)"),
    _f("edge-bind-address", "str", "T", "TUNNEL_EDGE_BIND_ADDRESS",
       usage="Bind to IP address for outgoing connections to the edge."),
    _f("cacert", "str", "T", "TUNNEL_CACERT",
       usage="Certificate Authority authenticating connections with the edge (the only roots when set)."),
    _f("hostname", "str", "T", "TUNNEL_HOSTNAME", support="warn", show=False,
       note="is ignored because you configured a Named Tunnel to run; route it with `tunnel-lab tunnel "
            "route dns`"),
    _f("id", "str", "T", "TUNNEL_ID", support="noop", show=False),
    _f("lb-pool", "str", "T", "TUNNEL_LB_POOL", support="warn", show=False),
    _f("api-key", "str", "T", "TUNNEL_API_KEY", support="noop", show=False),
    _f("api-email", "str", "T", "TUNNEL_API_EMAIL", support="noop", show=False),
    _f("api-ca-key", "str", "T", "TUNNEL_API_CA_KEY", support="noop", show=False),
    _f("api-url", "str", "T", "TUNNEL_API_URL", support="noop", show=False),
    _f("metrics-update-freq", "dur", "T", "TUNNEL_METRICS_UPDATE_FREQ", default=5.0, support="noop",
       usage="Frequency to update tunnel metrics"),
    _f("tag", "slice", "T", "TUNNEL_TAG",
       usage="Custom tags used to identify this tunnel via added HTTP request headers to the origin, in "
             "format `KEY=VALUE`. Multiple tags may be specified."),
    _f("heartbeat-interval", "dur", "T", default=5.0, support="noop", show=False),
    _f("heartbeat-count", "int", "T", default=5, support="noop", show=False),
    _f("max-edge-addr-retries", "int", "T", default=8,
       usage="Maximum number of times to retry on edge addrs before falling back to a lower protocol"),
    _f("retries", "int", "T", "TUNNEL_RETRIES", default=5,
       usage="Maximum number of retries for connection/protocol errors."),
    _f("ha-connections", "int", "T", default=4,
       usage="Number of HA connections (capped by the number of edge addresses)"),
    _f("rpc-timeout", "dur", "T", default=5.0, usage="Timeout of the registration RPCs"),
    _f("write-stream-timeout", "dur", "T", "TUNNEL_STREAM_WRITE_TIMEOUT", default=0.0, support="warn",
       show=False),
    _f("quic-disable-pmtu-discovery", "bool", "T", "TUNNEL_DISABLE_QUIC_PMTU", support="noop", show=False),
    _f("quic-connection-level-flow-control-limit", "int", "T", "TUNNEL_QUIC_CONN_LEVEL_FLOW_CONTROL_LIMIT",
       support="noop", show=False),
    _f("quic-stream-level-flow-control-limit", "int", "T", "TUNNEL_QUIC_STREAM_LEVEL_FLOW_CONTROL_LIMIT",
       support="noop", show=False),
    _f("label", "str", "T", usage="A meaningful label for this connector (the management service's "
       "host_details)."),
    _f("grace-period", "dur", "T", "TUNNEL_GRACE_PERIOD", default=30.0,
       usage="When the connector receives SIGINT/SIGTERM it will stop accepting new requests, wait for "
             "in-progress requests to terminate, then shutdown. Waiting for in-progress requests will "
             "timeout after this grace period, or when a second SIGTERM/SIGINT is received."),
    _f("compression-quality", "int", "T", "TUNNEL_COMPRESSION_LEVEL", default=0, support="noop", show=False),
    _f("use-reconnect-token", "bool", "T", "TUNNEL_USE_RECONNECT_TOKEN", default=True, support="noop",
       show=False),
    _f("dial-edge-timeout", "dur", "T", "DIAL_EDGE_TIMEOUT", default=15.0, support="noop", show=False),
    _f("stdin-control", "bool", "T", "STDIN_CONTROL", default=False, show=False,
       usage="Control the process using commands sent through stdin: `reconnect [DURATION]` drops one "
             "edge connection and reconnects it after DURATION (default 0s) without backoff."),
    _f("name", "str", "T", "TUNNEL_NAME", aliases=("n",), support="refuse", show=False,
       note="creates and routes a tunnel through Cloudflare's API; with the lab use `tunnel-lab tunnel "
            "create` and `tunnel-lab tunnel route dns`, then `run`"),
    _f("ui", "bool", "T", support="warn", show=False),
    _f("quick-service", "str", "T", support="noop", show=False),
    _f("max-fetch-size", "int", "T", "TUNNEL_MAX_FETCH_SIZE", support="noop", show=False),
    _f("post-quantum", "bool", "TR", "TUNNEL_POST_QUANTUM", aliases=("pq",), support="warn",
       note="(strict post-quantum key agreement) is not available in Python's TLS; the connector uses "
            "its normal TLS groups",
       usage="When given creates an experimental post-quantum secure tunnel"),
    _f("management-diagnostics", "bool", "T", "TUNNEL_MANAGEMENT_DIAGNOSTICS", default=True,
       usage="Enables the in-depth diagnostic routes over the management service (/metrics)"),
    _f("protocol", "str", "TR", "TUNNEL_TRANSPORT_PROTOCOL", aliases=("p",), default="auto",
       usage="Protocol implementation to connect with the edge: auto (quic with a token, falling back to "
             "http2; http2 with a credentials file, as offline), quic, http2 (h2mux means http2)."),
    _f("overwrite-dns", "bool", "T", "TUNNEL_FORCE_PROVISIONING_DNS", aliases=("f",), support="noop",
       show=False),
    # --- proxy (origin) flags: both levels (cloudflared's configureProxyFlags)
    _f("url", "str", "TR", "TUNNEL_URL", default="http://localhost:8080",
       usage="Connect to the local webserver at `URL`."),
    _f("hello-world", "bool", "TR", "TUNNEL_HELLO_WORLD", default=False, usage="Run Hello World Server"),
    _f("socks5", "bool", "TR", "TUNNEL_SOCKS", support="refuse", show=False,
       note="(a SOCKS5 origin) is not supported by tunnel-lab's connector"),
    _f("proxy-connect-timeout", "dur", "TR", default=30.0,
       usage="HTTP proxy timeout for establishing a new connection." + _LEGACY),
    _f("proxy-tls-timeout", "dur", "TR", default=10.0,
       usage="HTTP proxy timeout for completing a TLS handshake." + _LEGACY),
    _f("proxy-tcp-keepalive", "dur", "TR", default=30.0,
       usage="HTTP proxy TCP keepalive duration." + _LEGACY),
    _f("proxy-no-happy-eyeballs", "bool", "TR", support="noop",
       usage="HTTP proxy should disable \"happy eyeballs\" for IPv4/v6 fallback." + _LEGACY),
    _f("proxy-keepalive-connections", "int", "TR", default=100,
       usage="HTTP proxy maximum keepalive connection pool size." + _LEGACY),
    _f("proxy-keepalive-timeout", "dur", "TR", default=90.0,
       usage="HTTP proxy timeout for closing an idle connection." + _LEGACY),
    _f("proxy-connection-timeout", "dur", "TR", support="noop",
       usage="DEPRECATED. No longer has any effect."),
    _f("proxy-expect-continue-timeout", "dur", "TR", support="noop",
       usage="DEPRECATED. No longer has any effect."),
    _f("http-host-header", "str", "TR", "TUNNEL_HTTP_HOST_HEADER",
       usage="Sets the HTTP Host header for the local webserver." + _LEGACY),
    _f("origin-server-name", "str", "TR", "TUNNEL_ORIGIN_SERVER_NAME",
       usage="Hostname on the origin server certificate." + _LEGACY),
    _f("unix-socket", "str", "TR", "TUNNEL_UNIX_SOCKET",
       usage="Path to unix socket to use instead of --url"),
    _f("origin-ca-pool", "str", "TR", "TUNNEL_ORIGIN_CA_POOL",
       usage="Path to the CA for the certificate of your origin." + _LEGACY),
    _f("no-tls-verify", "bool", "TR", "NO_TLS_VERIFY",
       usage="Disables TLS verification of the certificate presented by your origin." + _LEGACY),
    _f("no-chunked-encoding", "bool", "TR", "TUNNEL_NO_CHUNKED_ENCODING",
       usage="Disables chunked transfer encoding; useful if you are running a WSGI server." + _LEGACY),
    _f("http2-origin", "bool", "TR", "TUNNEL_ORIGIN_ENABLE_HTTP2", support="warn",
       note="is not supported: origins are always reached over HTTP/1.1",
       usage="Enables HTTP/2 origin servers (not supported here)."),
    _f("management-hostname", "str", "TR", "TUNNEL_MANAGEMENT_HOSTNAME", default="management.argotunnel.com",
       support="noop", show=False),
    _f("service-op-ip", "str", "TR", "TUNNEL_SERVICE_OP_IP", support="noop", show=False),
    _f("local-ssh-port", "str", "TR", "LOCAL_SSH_PORT", support="noop", show=False),
    _f("ssh-idle-timeout", "dur", "TR", "SSH_IDLE_TIMEOUT", support="noop", show=False),
    _f("ssh-max-timeout", "dur", "TR", "SSH_MAX_TIMEOUT", support="noop", show=False),
    _f("bucket-name", "str", "TR", "BUCKET_ID", support="noop", show=False),
    _f("region-name", "str", "TR", "REGION_ID", support="noop", show=False),
    _f("secret-id", "str", "TR", "SECRET_ID", support="noop", show=False),
    _f("access-key-id", "str", "TR", "ACCESS_CLIENT_ID", support="noop", show=False),
    _f("session-token", "str", "TR", "SESSION_TOKEN_ID", support="noop", show=False),
    _f("s3-url-host", "str", "TR", "S3_URL", support="noop", show=False),
    _f("host-key-path", "str", "TR", "HOST_KEY_PATH", support="noop", show=False),
    _f("ssh-server", "bool", "TR", "TUNNEL_SSH_SERVER", support="refuse", show=False,
       note="(the built-in SSH server) is not supported by tunnel-lab's connector"),
    _f("bastion", "bool", "TR", "TUNNEL_BASTION", support="refuse",
       note="(jump host mode) is not supported by tunnel-lab's connector; use a tcp:// or ssh:// ingress "
            "rule",
       usage="Runs as jump host (not supported here)"),
    _f("proxy-address", "str", "TR", "TUNNEL_PROXY_ADDRESS", support="noop", show=False),
    _f("proxy-port", "int", "TR", "TUNNEL_PROXY_PORT", support="noop", show=False),
    # --- run level only
    _f("credentials-contents", "str", "R", "TUNNEL_CRED_CONTENTS",
       usage="Contents of the tunnel credentials JSON file to use. When provided along with "
             "credentials-file, this will take precedence."),
    _f("features", "slice", "R", aliases=("F",),
       usage="Opt into various features that are still being developed or tested."),
    _f("token", "str", "R", "TUNNEL_TOKEN",
       usage="The Tunnel token. When provided along with credentials, this will take precedence. Also takes "
             "precedence over token-file"),
    _f("token-file", "str", "R", "TUNNEL_TOKEN_FILE",
       usage="Filepath at which to read the tunnel token. When provided along with credentials, this will "
             "take precedence."),
    _f("icmpv4-src", "str", "R", "TUNNEL_ICMPV4_SRC", support="noop", show=False),
    _f("icmpv6-src", "str", "R", "TUNNEL_ICMPV6_SRC", support="noop", show=False),
    _f("max-active-flows", "uint", "R", "TUNNEL_MAX_ACTIVE_FLOWS",
       usage="Overrides the remote configuration for max active private network flows (TCP/UDP) that this "
             "connector supports"),
    # Silent: it is part of the lab's offline cloudflared command line (cloudflared then logs no "Failed to
    # initialize DNS local resolver"), which must work unchanged with this connector (docs/connector.md).
    _f("dns-resolver-addrs", "slice", "R", "TUNNEL_DNS_RESOLVER_ADDRS", support="noop",
       usage="Overrides the dynamic DNS resolver resolution to use these address:port's instead."),
)

BY_NAME: dict[str, Flag] = {}
for _flag in FLAGS:
    for _n in _flag.names:
        BY_NAME[_n] = _flag

# cloudflared's configFlags: what __configuration_flags of updateLocalConfiguration may hold
# (docs/protocol.md §3.8).
CONFIG_FLAGS = ("autoupdate-freq", "no-autoupdate", "retries", "protocol", "loglevel", "transport-loglevel",
                "origincert", "metrics", "metrics-update-freq", "edge-ip-version", "edge-bind-address",
                "max-active-flows")
# The flags whose values `/diag/configuration` may show (cloudflared's nonSecretFlagsList, cmd.go): never a
# secret. Names this connector does not define are never set, so they never show.
DIAG_FLAGS = (
    "config", "autoupdate-freq", "no-autoupdate", "no-prechecks", "metrics", "pidfile", "url", "hello-world",
    "socks5", "proxy-connect-timeout", "proxy-tls-timeout", "proxy-tcp-keepalive", "proxy-no-happy-eyeballs",
    "proxy-keepalive-connections", "proxy-keepalive-timeout", "proxy-connection-timeout",
    "proxy-expect-continue-timeout", "http-host-header", "origin-server-name", "unix-socket",
    "origin-ca-pool", "no-tls-verify", "no-chunked-encoding", "http2-origin", "management-hostname",
    "service-op-ip", "local-ssh-port", "ssh-idle-timeout", "ssh-max-timeout", "bucket-name", "region-name",
    "s3-url-host", "host-key-path", "ssh-server", "bastion", "proxy-address", "proxy-port", "loglevel",
    "transport-loglevel",
    "logfile", "log-directory", "trace-output", "is-autoupdated", "edge", "region", "edge-ip-version",
    "edge-bind-address", "cacert", "hostname", "id", "lb-pool", "api-url", "metrics-update-freq", "tag",
    "heartbeat-interval", "heartbeat-count", "max-edge-addr-retries", "retries", "ha-connections",
    "rpc-timeout", "write-stream-timeout", "quic-disable-pmtu-discovery",
    "quic-connection-level-flow-control-limit", "quic-stream-level-flow-control-limit", "label",
    "grace-period", "compression-quality", "use-reconnect-token", "dial-edge-timeout", "stdin-control",
    "name", "ui", "quick-service", "max-fetch-size", "post-quantum", "management-diagnostics", "protocol",
    "overwrite-dns", "help", "max-active-flows",
)
# Never printed (Settings line, environment echo): values are masked as cloudflared does.
SECRET_FLAGS = ("credentials-contents", "token", "secret-id", "access-key-id", "session-token", "api-key",
                "api-ca-key")


def flags_for(level: str) -> dict[str, Flag]:
    """Every name (and alias) defined at `level` ("T" or "R")."""
    return {n: f for n, f in BY_NAME.items() if level in f.levels}


# --- values -----------------------------------------------------------------------------------------

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid boolean {text!r}")


def parse_value(flag: Flag, text: str) -> Any:
    """A string from the command line or the environment -> the flag's typed value (ValueError if bad)."""
    if flag.kind == "bool":
        return parse_bool(text)
    if flag.kind in ("int", "uint"):
        try:
            value = int(text, 0)
        except ValueError:
            raise ValueError(f"invalid integer {text!r}") from None
        if flag.kind == "uint" and value < 0:
            raise ValueError(f"invalid non-negative integer {text!r}")
        return value
    if flag.kind == "dur":
        return parse_go_duration(text)
    return text


def value_text(flag: Flag, value: Any) -> str:
    """A typed value as urfave/cli's `c.String(name)` prints it (for __configuration_flags, Settings)."""
    if flag.kind == "bool":
        return "true" if value else "false"
    if flag.kind == "dur":
        return format_go_duration(float(value))
    if flag.kind == "slice":
        return "[" + " ".join(str(v) for v in value) + "]"
    return str(value)


@dataclass
class ParsedLevel:
    """Flags given at one level, in order: name -> typed value (slices accumulate)."""

    values: dict[str, Any]
    args: list[str]
    help: bool = False
    version: bool = False


def parse_level(argv: Sequence[str], level: str, *, stop_at_positional: bool = True,
                allow_version: bool = False, defined: Mapping[str, Flag] | None = None) -> ParsedLevel:
    """Parse flags like Go's `flag` package until the first positional argument.

    `-x`, `--x`, `--x=v`, `--x v`; bools take no separate value. Unknown flags raise `UsageError` with
    cloudflared's wording (`flag provided but not defined: -x`).
    """
    if defined is None:
        defined = flags_for(level)
    values: dict[str, Any] = {}
    out = ParsedLevel(values=values, args=[])
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.args.extend(argv[i + 1:])
            break
        if not arg.startswith("-") or arg == "-":
            if stop_at_positional:
                out.args.extend(argv[i:])
                break
            out.args.append(arg)
            i += 1
            continue
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, eq, inline = body.partition("=")
        if not name or name.startswith("-"):
            raise UsageError(f"bad flag syntax: {arg}")
        if name in ("h", "help"):
            out.help = True
            i += 1
            continue
        if allow_version and name in ("v", "version"):
            out.version = True
            i += 1
            continue
        flag = defined.get(name)
        if flag is None:
            raise UsageError(f"flag provided but not defined: -{name}")
        if flag.kind == "bool":
            text = inline if eq else "true"
            i += 1
        elif eq:
            text = inline
            i += 1
        else:
            if i + 1 >= len(argv):
                raise UsageError(f"flag needs an argument: -{name}")
            text = argv[i + 1]
            i += 2
        try:
            value = parse_value(flag, text)
        except ValueError as exc:
            raise UsageError(f'invalid value "{text}" for flag -{name}: {exc}') from None
        if flag.kind == "slice":
            values.setdefault(flag.name, []).append(value)
        else:
            values[flag.name] = value
    return out

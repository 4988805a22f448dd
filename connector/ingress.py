"""Ingress rules as cloudflared parses, validates and matches them (docs/protocol.md §4.3, §8, §3.8).

Pure: no I/O, no logging. Errors are `ConfigError`s naming the source, the rule number and, for YAML
files, the line. Warnings (keys we accept but do not act on) are collected in a list the caller logs.

- `parse_ingress(...)`: a config file's `ingress:` list (or `--url` / `--hello-world`, or nothing)
  -> `tuple[IngressRule, ...]`, never empty.
- `match_rule(rules, host, path)`: the first matching rule (the last one when none matches).
- `parse_remote_config(body)`: an update-configuration stream's body -> `(version, rules, warp)`.
- `local_config_json(flags, rules, warp)`: the `updateLocalConfiguration` payload.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from tunnel_lab.connector.config import parse_go_duration
from tunnel_lab.connector.settings import (
    AccessConfig,
    HelloWorldService,
    HTTPService,
    IngressRule,
    OriginRequestConfig,
    Service,
    StatusService,
    StreamService,
    WarpRoutingConfig,
)
from tunnel_lab.wire.errors import ConfigError, StreamConversionError

LineOf = Callable[..., int | None]

HTTP_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
# Default ports cloudflared adds to stream services without one.
STREAM_DEFAULT_PORTS = {"ssh": 22, "rdp": 3389, "smb": 445}
STREAM_FALLBACK_PORT = 7864

# originRequest keys -> (OriginRequestConfig field, kind). Order is cloudflared's JSON order.
ORIGIN_REQUEST_KEYS: dict[str, tuple[str, str]] = {
    "connectTimeout": ("connect_timeout", "duration"),
    "tlsTimeout": ("tls_timeout", "duration"),
    "tcpKeepAlive": ("tcp_keep_alive", "duration"),
    "keepAliveConnections": ("keep_alive_connections", "int"),
    "keepAliveTimeout": ("keep_alive_timeout", "duration"),
    "httpHostHeader": ("http_host_header", "str"),
    "originServerName": ("origin_server_name", "str"),
    "matchSNItoHost": ("match_sni_to_host", "bool"),
    "caPool": ("ca_pool", "str"),
    "noTLSVerify": ("no_tls_verify", "bool"),
    "disableChunkedEncoding": ("disable_chunked_encoding", "bool"),
    "http2Origin": ("http2_origin", "bool"),
}
# Legal in cloudflared, not acted on here: accepted with a warning.
ORIGIN_REQUEST_IGNORED = ("noHappyEyeballs", "bastionMode", "proxyAddress", "proxyPort", "proxyType",
                          "ipRules")
_JSON_ORDER = ("connectTimeout", "tlsTimeout", "tcpKeepAlive", "keepAliveConnections", "keepAliveTimeout",
               "httpHostHeader", "originServerName", "matchSNItoHost", "caPool", "noTLSVerify",
               "disableChunkedEncoding", "http2Origin")
WARP_KEYS = {"connectTimeout": ("connect_timeout", "duration"),
             "maxActiveFlows": ("max_active_flows", "uint"),
             "tcpKeepAlive": ("tcp_keep_alive", "duration")}

NO_RULES_WARNING = ("No ingress rules were defined in provided config (if any) nor from the cli, "
                    "cloudflared will return 503 for all incoming HTTP requests")
LAST_RULE_NOT_CATCH_ALL = ("The last ingress rule must match all URLs (i.e. it should not have a hostname "
                           "or path filter)")
BAD_WILDCARD = ('Hostname patterns can have at most one wildcard character ("*") and it can only be used '
                'for subdomains, e.g. "*.example.com"')


def _no_line(*_keys: Any) -> int | None:
    return None


def is_catch_all(hostname: str | None, path: str | None) -> bool:
    return (not hostname or hostname == "*") and not path


# --- originRequest --------------------------------------------------------------------------------

def parse_origin_request(raw: Any, base: OriginRequestConfig, *, source: str, where: str,
                         line_of: LineOf = _no_line, keys: tuple[Any, ...] = (),
                         json_durations: bool = False, warnings: list[str] | None = None
                         ) -> OriginRequestConfig:
    """Apply an `originRequest` mapping on top of `base`.

    YAML durations are Go strings ("30s"); remote-config (JSON) durations are whole seconds.
    JSON keys match case-insensitively, as Go's decoder does.
    """
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: originRequest must be a mapping", source=source, line=line_of(*keys),
                          hint="e.g. `originRequest: {connectTimeout: 10s}`")
    known = {k.lower(): k for k in (*ORIGIN_REQUEST_KEYS, *ORIGIN_REQUEST_IGNORED, "access")}
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        name = known.get(str(key).lower()) if json_durations else (str(key) if str(key) in known.values()
                                                                    else None)
        line = line_of(*keys, key)
        if name is None:
            if warnings is not None:
                warnings.append(_where_text(source, line) + f"{where}: unknown originRequest key {key!r} "
                                "ignored")
            continue
        if name in ORIGIN_REQUEST_IGNORED:
            if warnings is not None and value not in (None, False, "", [], {}):
                warnings.append(_where_text(source, line) + f"{where}: originRequest.{name} is not "
                                "supported by tunnel-lab's connector and is ignored")
            continue
        if name == "access":
            if value is not None:
                changes["access"] = parse_access(value, f"{where}: originRequest.access", source, line)
            continue
        attr, kind = ORIGIN_REQUEST_KEYS[name]
        if value is None:
            continue
        changes[attr] = _typed(value, kind, f"{where}: originRequest.{name}", source, line, json_durations)
    return replace(base, **changes) if changes else base


def parse_access(raw: Any, what: str, source: str, line: int | None) -> AccessConfig:
    """`originRequest.access: {required, teamName, audTag}`, checked as cloudflared checks it."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{what} must be a mapping", source=source, line=line,
                          hint="e.g. `access: {required: true, teamName: myteam, audTag: [AUD]}`")
    required = raw.get("required", False)
    team = raw.get("teamName") or ""
    tags = raw.get("audTag") or []
    if not isinstance(required, bool):
        raise ConfigError(f"{what}.required must be true or false, got {required!r}", source=source,
                          line=line)
    if not isinstance(team, str):
        raise ConfigError(f"{what}.teamName must be a string, got {team!r}", source=source, line=line)
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ConfigError(f"{what}.audTag must be a list of strings", source=source, line=line)
    if required and not team and tags:
        raise ConfigError(f"{what}: teamName cannot be blank when audTag is given", source=source, line=line)
    return AccessConfig(required=required, team_name=team, aud_tag=tuple(tags))


def _where_text(source: str, line: int | None) -> str:
    return f"{source}:{line}: " if line else (f"{source}: " if source else "")


def _typed(value: Any, kind: str, what: str, source: str, line: int | None, json_durations: bool) -> Any:
    if kind == "duration":
        if json_durations:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{what} must be a whole number of seconds, got {value!r}", source=source,
                                  line=line)
            return float(value)
        if isinstance(value, str):
            try:
                return parse_go_duration(value)
            except ValueError:
                pass
        raise ConfigError(f"{what}: invalid duration {value!r}", source=source, line=line,
                          hint='write a Go duration such as "30s", "1m30s" or "500ms"')
    if kind in ("int", "uint"):
        if isinstance(value, bool) or not isinstance(value, int) or (kind == "uint" and value < 0):
            raise ConfigError(f"{what} must be a{' non-negative' if kind == 'uint' else 'n'} integer, "
                              f"got {value!r}", source=source, line=line)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {value!r}", source=source, line=line)
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {value!r}", source=source, line=line)
    return value


def parse_warp_routing(raw: Any, *, source: str, line_of: LineOf = _no_line, json_durations: bool = False,
                       base: WarpRoutingConfig | None = None) -> WarpRoutingConfig:
    """A `warp-routing` mapping (connectTimeout, maxActiveFlows, tcpKeepAlive)."""
    base = base or WarpRoutingConfig()
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        raise ConfigError("warp-routing must be a mapping", source=source, line=line_of("warp-routing"))
    known = {k.lower(): k for k in WARP_KEYS}
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        lookup = str(key).lower() if json_durations else str(key)
        name = known.get(lookup) if json_durations else (lookup if lookup in WARP_KEYS else None)
        if name is None or value is None:
            continue  # "enabled" and other historical keys: cloudflared ignores them too
        attr, kind = WARP_KEYS[name]
        changes[attr] = _typed(value, kind, f"warp-routing.{name}", source, line_of("warp-routing", key),
                               json_durations)
    return replace(base, **changes) if changes else base


# --- services ---------------------------------------------------------------------------------------

def parse_service(text: Any, *, source: str, where: str, line: int | None = None,
                  allow_path: bool = False) -> Service:
    """One ingress `service:` value -> a `Service` (ConfigError when invalid or unsupported here)."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{where} has no service", source=source, line=line,
                          hint="add `service: http://127.0.0.1:8080` (or http_status:404, hello_world)")
    if text.startswith("http_status:"):
        code_text = text[len("http_status:"):]
        if not re.fullmatch(r"[+-]?\d+", code_text):
            raise ConfigError(f"{where}: invalid HTTP status code {code_text!r}", source=source, line=line,
                              hint="use http_status:NNN with NNN between 100 and 999")
        code = int(code_text)
        if not 100 <= code <= 999:
            raise ConfigError(f"{where}: invalid HTTP status code: {code}", source=source, line=line,
                              hint="use a status between 100 and 999")
        return StatusService(status=code)
    if text in ("hello_world", "hello-world"):
        return HelloWorldService()
    if text.startswith(("unix:", "unix+tls:")):
        tls = text.startswith("unix+tls:")
        path = text[len("unix+tls:"):] if tls else text[len("unix:"):]
        if not path:
            raise ConfigError(f"{where}: service {text!r} has no socket path", source=source, line=line,
                              hint="e.g. unix:/run/app.sock")
        return HTTPService(scheme="https" if tls else "http", host="", port=0, unix_path=path)
    if text in ("bastion", "socks-proxy"):
        raise ConfigError(f"{where}: service {text!r} is valid for cloudflared but not supported by "
                          "tunnel-lab's connector", source=source, line=line,
                          hint="use an http(s):// or tcp:// service")
    try:
        parts = urlsplit(text)
        port = parts.port
        hostname = parts.hostname
    except ValueError as exc:
        raise ConfigError(f"{where}: {text} is an invalid address: {exc}", source=source, line=line) from None
    scheme = parts.scheme.lower()
    if not scheme or not hostname:
        raise ConfigError(f"{where}: {text} is an invalid address, please make sure it has a scheme and a "
                          "hostname", source=source, line=line, hint="e.g. http://127.0.0.1:8080")
    if parts.path and not (allow_path and parts.path == "/"):
        raise ConfigError(f"{where}: {text} is an invalid address, ingress rules don't support proxying to a "
                          "different path on the origin service. The path will be the same as the eyeball "
                          "request's path", source=source, line=line, hint="remove the path from the service")
    if scheme in HTTP_SCHEMES:
        mapped = HTTP_SCHEMES[scheme]
        return HTTPService(scheme=mapped, host=hostname, port=port or (443 if mapped == "https" else 80))
    return StreamService(scheme=scheme, host=hostname,
                         port=port or STREAM_DEFAULT_PORTS.get(scheme, STREAM_FALLBACK_PORT))


def service_text(service: Service, original: str) -> str:
    """The service as cloudflared prints it (stream services get their default port added)."""
    if isinstance(service, StatusService):
        return f"http_status:{service.status}"
    if isinstance(service, HelloWorldService):
        return "hello_world"
    if isinstance(service, StreamService):
        host = f"[{service.host}]" if ":" in service.host else service.host
        return f"{service.scheme}://{host}:{service.port}"
    return original


def normalize_url(url: str) -> str:
    """`--url` as cloudflared's validation accepts it: a missing scheme means http://."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    return text


# --- rules --------------------------------------------------------------------------------------------

def parse_ingress(raw: Sequence[Any] | None, *, source: str, defaults: OriginRequestConfig,
                  url: str | None = None, hello_world: bool = False, line_of: LineOf = _no_line,
                  json_durations: bool = False, warnings: list[str] | None = None,
                  unix_socket: str | None = None) -> tuple[IngressRule, ...]:
    """Validate ingress rules like cloudflared and return them (never empty).

    With rules in `raw`, those win (`--url` is ignored, as in cloudflared). Without, `hello_world` or
    `url` makes a single catch-all rule; with neither, one catch-all `http_status:503` rule.
    `defaults` is the top-level originRequest (config file) or the origin flags (single rule).
    """
    if raw:
        if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
            raise ConfigError("ingress must be a list of rules", source=source, line=line_of("ingress"),
                              hint="start each rule with `- hostname: ...` / `- service: ...`")
        return tuple(_parse_rule(i, r, len(raw), source=source, defaults=defaults, line_of=line_of,
                                 json_durations=json_durations, warnings=warnings)
                     for i, r in enumerate(raw))
    if hello_world:
        return (IngressRule(index=0, hostname=None, path=None, service=HelloWorldService(),
                            service_text="hello_world", origin_request=defaults),)
    if url:
        text = normalize_url(url)
        service = parse_service(text, source="--url", where="--url", allow_path=True)
        shown = text[:-1] if text.endswith("/") and urlsplit(text).path == "/" else text
        return (IngressRule(index=0, hostname=None, path=None, service=service,
                            service_text=service_text(service, shown), origin_request=defaults),)
    if unix_socket:
        unix_service = HTTPService(scheme="http", host="", port=0, unix_path=unix_socket)
        return (IngressRule(index=0, hostname=None, path=None, service=unix_service,
                            service_text=f"unix:{unix_socket}", origin_request=defaults),)
    if warnings is not None:
        warnings.append(NO_RULES_WARNING)
    return default_rules(defaults)


def default_rules(defaults: OriginRequestConfig | None = None) -> tuple[IngressRule, ...]:
    """cloudflared's rules when none are configured: every request gets 503."""
    return (IngressRule(index=0, hostname=None, path=None, service=StatusService(status=503),
                        service_text="http_status:503", origin_request=defaults or OriginRequestConfig()),)


def _parse_rule(i: int, raw: Any, total: int, *, source: str, defaults: OriginRequestConfig,
                line_of: LineOf, json_durations: bool, warnings: list[str] | None) -> IngressRule:
    where = f"ingress rule #{i + 1}"
    line = line_of("ingress", i)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping with `service` (and optional hostname, path)",
                          source=source, line=line)
    known = ("hostname", "path", "service", "originRequest")
    get: dict[str, Any] = {}
    for key, value in raw.items():
        canon = next((k for k in known if k == key or (json_durations and k.lower() == str(key).lower())),
                     None)
        if canon is None:
            if warnings is not None:
                warnings.append(_where_text(source, line_of("ingress", i, key)) + f"{where}: unknown key "
                                f"{key!r} ignored")
            continue
        get[canon] = value
    hostname = get.get("hostname") or None
    path = get.get("path") or None
    for name, value in (("hostname", hostname), ("path", path)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string, got {value!r}", source=source,
                              line=line_of("ingress", i, name))
    service_raw = get.get("service")
    service = parse_service(service_raw, source=source, where=where,
                            line=line_of("ingress", i, "service") or line)
    origin_request = parse_origin_request(get.get("originRequest"), defaults, source=source, where=where,
                                          line_of=line_of, keys=("ingress", i, "originRequest"),
                                          json_durations=json_durations, warnings=warnings)
    host_line = line_of("ingress", i, "hostname") or line
    if hostname is not None:
        if _has_port(hostname):
            raise ConfigError(f"{where}: Hostname cannot contain a port", source=source, line=host_line,
                              hint=f"write {hostname.rsplit(':', 1)[0]!r}; the port of a request is ignored")
        if hostname.rfind("*") > 0:
            raise ConfigError(f"{where}: {BAD_WILDCARD}", source=source, line=host_line)
    catch_all = is_catch_all(hostname, path)
    if i == total - 1 and not catch_all:
        raise ConfigError(LAST_RULE_NOT_CATCH_ALL, source=source, line=line,
                          hint="add a last rule with only a service, e.g. `- service: http_status:404`")
    if i < total - 1 and catch_all:
        raise ConfigError(f"Rule #{i + 1} is matching the hostname '{hostname or ''}', but this will match "
                          "every hostname, meaning the rules which follow it will never be triggered.",
                          source=source, line=line, hint="give it a hostname or path, or move it last")
    if path is not None:
        try:
            re.compile(path)
        except re.error as exc:
            raise ConfigError(f"Rule #{i + 1} has an invalid regex: {exc}", source=source,
                              line=line_of("ingress", i, "path") or line) from None
    return IngressRule(index=i, hostname=hostname, path=path, service=service,
                       service_text=service_text(service, str(service_raw)), origin_request=origin_request)


def _has_port(hostname: str) -> bool:
    """Go's net.SplitHostPort succeeds: `host:port` or `[v6]:port`."""
    if hostname.startswith("["):
        return re.fullmatch(r"\[[^\]]*\]:[^:]*", hostname) is not None
    return hostname.count(":") == 1


# --- matching -------------------------------------------------------------------------------------------

def strip_port(host: str) -> str:
    """The host part of an `:authority` (Go's SplitHostPort; unchanged when it has no port)."""
    if host.startswith("["):
        m = re.fullmatch(r"\[([^\]]*)\]:[^:]*", host)
        return m.group(1) if m else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


@functools.lru_cache(maxsize=1024)
def _punycode(hostname: str) -> str | None:
    try:
        ascii_name = hostname.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return ascii_name if ascii_name != hostname else None


@functools.lru_cache(maxsize=1024)
def _compiled(path: str) -> re.Pattern[str]:
    return re.compile(path)


def _match_host(rule_host: str, req_host: str) -> bool:
    if rule_host == req_host:
        return True
    return rule_host.startswith("*.") and req_host.endswith(rule_host[1:])


def rule_matches(rule: IngressRule, host: str, path: str) -> bool:
    """cloudflared's Rule.Matches on a host without port."""
    if not rule.hostname or rule.hostname == "*":
        host_ok = True
    else:
        host_ok = _match_host(rule.hostname, host)
        if not host_ok and "*" not in rule.hostname[1:]:
            wild = rule.hostname.startswith("*.")
            puny = _punycode(rule.hostname[2:] if wild else rule.hostname)
            if puny is not None:
                host_ok = _match_host(("*." + puny) if wild else puny, host)
    return host_ok and (rule.path is None or _compiled(rule.path).search(path) is not None)


def match_rule(rules: Sequence[IngressRule], host: str, path: str) -> IngressRule:
    """The first rule matching `host` (port ignored) and `path`; the last rule when none does.

    `path` is the request path as on the wire, without the query; like Go's `URL.Path` it is matched
    percent-decoded (`/a%20b` is matched as `/a b`).
    """
    bare = strip_port(host)
    path = unquote(path)
    for rule in rules:
        if rule_matches(rule, bare, path):
            return rule
    return rules[-1]


def match_internal_rule(rules: Sequence[IngressRule], host: str, path: str) -> IngressRule | None:
    """The first internal rule (the management service's) matching; None lets the user's rules decide."""
    bare = strip_port(host)
    path = unquote(path)
    return next((rule for rule in rules if rule_matches(rule, bare, path)), None)


# --- remote configuration (update-configuration streams) -------------------------------------------

def remote_config_version(body: bytes) -> tuple[int, Any]:
    """Decode an update-configuration body's envelope -> `(version, config)`.

    Raises `StreamConversionError` when the body is not `{"version": int32, "config": ...}` JSON
    (cloudflared answers 502 then).
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StreamConversionError(f"update-configuration body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise StreamConversionError("update-configuration body is not a JSON object")
    lowered = {str(k).lower(): v for k, v in doc.items()}
    version = lowered.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or not -2**31 <= version < 2**31:
        raise StreamConversionError(f"update-configuration version is not an int32: {version!r}")
    return version, lowered.get("config")


def parse_remote_config(body: bytes) -> tuple[int, tuple[IngressRule, ...], WarpRoutingConfig]:
    """An update-configuration body -> `(version, rules, warp)` (docs/protocol.md §8).

    `StreamConversionError` for an undecodable envelope (answer 502); `ConfigError` for a config that
    decodes but is invalid (answer `{"lastAppliedVersion": current, "err": {}}`). The version rules
    (apply only when newer) are the runtime's; call `remote_config_version` first to apply them before
    validating, as cloudflared does.
    """
    version, config = remote_config_version(body)
    source = f"remote configuration version {version}"
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError("config must be a JSON object", source=source)
    lowered = {str(k).lower(): v for k, v in config.items()}
    defaults = parse_origin_request(lowered.get("originrequest"), OriginRequestConfig(), source=source,
                                    where="originRequest", json_durations=True)
    raw_rules = lowered.get("ingress")
    if raw_rules is not None and not isinstance(raw_rules, list):
        raise ConfigError("ingress must be a list", source=source)
    if not raw_rules:
        # An empty ingress is valid remotely; cloudflared then answers 503 to everything.
        rules = default_rules(defaults)
    else:
        rules = parse_ingress(raw_rules, source=source, defaults=defaults, json_durations=True)
    warp = parse_warp_routing(lowered.get("warp-routing"), source=source, json_durations=True)
    return version, rules, warp


# --- JSON views (updateLocalConfiguration, /config) ---------------------------------------------------

def _json_number(seconds: float) -> int | float:
    return int(seconds) if float(seconds).is_integer() else seconds


def origin_request_json(cfg: OriginRequestConfig) -> dict[str, Any]:
    """Non-default originRequest values, cloudflared's key order, durations in seconds."""
    default = OriginRequestConfig()
    by_attr = {attr: (key, kind) for key, (attr, kind) in ORIGIN_REQUEST_KEYS.items()}
    out: dict[str, Any] = {}
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for key in _JSON_ORDER:
        attr, kind = ORIGIN_REQUEST_KEYS[key]
        value = values[attr]
        if value == getattr(default, attr) or value in (None, ""):
            continue
        out[by_attr[attr][0]] = _json_number(value) if kind == "duration" else value
    if cfg.access is not None:
        out["access"] = {"required": cfg.access.required, "teamName": cfg.access.team_name,
                         "audTag": list(cfg.access.aud_tag)}
    return out


def rules_json(rules: Sequence[IngressRule]) -> list[dict[str, Any]]:
    out = []
    for rule in rules:
        item: dict[str, Any] = {}
        if rule.hostname:
            item["hostname"] = rule.hostname
        if rule.path:
            item["path"] = rule.path
        item["service"] = rule.service_text
        item["originRequest"] = origin_request_json(rule.origin_request)
        out.append(item)
    return out


def warp_json(warp: WarpRoutingConfig) -> dict[str, Any]:
    """Non-default warp-routing values (durations in seconds)."""
    default = WarpRoutingConfig()
    out: dict[str, Any] = {}
    if warp.connect_timeout != default.connect_timeout:
        out["connectTimeout"] = _json_number(warp.connect_timeout)
    if warp.max_active_flows:
        out["maxActiveFlows"] = warp.max_active_flows
    if warp.tcp_keep_alive != default.tcp_keep_alive:
        out["tcpKeepAlive"] = _json_number(warp.tcp_keep_alive)
    return out


def go_json(obj: Any) -> bytes:
    """Compact JSON as Go's encoding/json writes it (UTF-8, <>& escaped)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode("utf-8")


def local_config_json(flags: Mapping[str, str], rules: Sequence[IngressRule],
                      warp: WarpRoutingConfig) -> bytes:
    """The `updateLocalConfiguration` payload (docs/protocol.md §3.8)."""
    doc: dict[str, Any] = {}
    if flags:
        doc["__configuration_flags"] = dict(sorted(flags.items()))
    doc["ingress"] = rules_json(rules)
    doc["warp-routing"] = warp_json(warp)
    return go_json(doc)


def describe_rule(rule: IngressRule) -> str:
    """cloudflared's multi-line rule description (`tunnel ingress rule`)."""
    lines = []
    if rule.hostname:
        lines.append(f"\thostname: {rule.hostname}")
    if rule.path:
        lines.append(f"\tpath: {rule.path}")
    lines.append(f"\tservice: {rule.service_text}")
    return "\n".join(lines)


def is_ip_port(authority: str) -> bool:
    """True when `authority` is `IP:port` (a TCP stream destination, docs/protocol.md §7)."""
    host = strip_port(authority)
    if host == authority:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    port = authority.rsplit(":", 1)[1]
    return port.isdigit() and 0 < int(port) < 65536

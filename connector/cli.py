"""`tunnel-lab connector`: cloudflared's command line (`tunnel [flags] run [flags] [TUNNEL]`).

Flags > environment (`TUNNEL_*`, `NO_AUTOUPDATE`, ...) > YAML config file > defaults, as cloudflared.
The result is a `TunnelSettings` handed to `connector.runtime.run_tunnel` under `trio.run`.
Also `tunnel ingress validate`, `tunnel ingress rule URL`, `access tcp` and `--version`.
Errors are one line (file, line or key, fix) and exit code 1; never a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tunnel_lab.connector import ingress
from tunnel_lab.connector.admin import ADMIN_COMMANDS
from tunnel_lab.connector.cfapi import QuickTunnel
from tunnel_lab.connector.config import ConfigFile, find_default_config, load_config, search_path_text
from tunnel_lab.connector.edge_addrs import EdgeAddresses, adjust_for_bind, parse_ip_version, with_port
from tunnel_lab.connector.flags import (
    BY_NAME,
    CONFIG_FLAGS,
    DIAG_FLAGS,
    FLAGS,
    SECRET_FLAGS,
    Flag,
    ParsedLevel,
    UsageError,
    parse_bool,
    parse_level,
    parse_value,
    value_text,
)
from tunnel_lab.connector.logging_setup import format_value as q
from tunnel_lab.connector.logging_setup import setup_logging
from tunnel_lab.connector.protocol import choose_protocol
from tunnel_lab.connector.settings import VERSION, OriginRequestConfig, TunnelSettings, WarpRoutingConfig
from tunnel_lab.wire import credentials as wc
from tunnel_lab.wire.errors import ConfigError, TunnelLabError

if TYPE_CHECKING:
    from tunnel_lab.connector.edge_discovery import Discovery

log = logging.getLogger(__name__)
Discover = Callable[[str], "Discovery"]  # --edge-ip-version -> what DNS said

PROG = "tunnel-lab connector"
MAX_GRACE_PERIOD = 180.0
# Config-file keys that are not flags (cloudflared's Configuration struct).
CONFIG_KEYS = ("tunnel", "ingress", "originRequest", "warp-routing", "logDirectory")


@dataclass
class Resolved:
    """Flag values after merging the levels, the environment and the config file."""

    run_flags: dict[str, Any]
    tunnel_flags: dict[str, Any]
    env: Mapping[str, str]
    config: ConfigFile | None
    sources: dict[str, str] = field(default_factory=dict)  # name -> "flag" | "env:NAME" | "config"
    values: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def get(self, name: str) -> Any:
        flag = BY_NAME[name]
        return self.values.get(flag.name, flag.default)

    def is_set(self, name: str) -> bool:
        return BY_NAME[name].name in self.values


def resolve(run_flags: Mapping[str, Any], tunnel_flags: Mapping[str, Any], env: Mapping[str, str],
            config: ConfigFile | None) -> Resolved:
    """Merge: run-level flag > tunnel-level flag > environment > config file."""
    res = Resolved(run_flags=dict(run_flags), tunnel_flags=dict(tunnel_flags), env=env, config=config)
    for flag in FLAGS:
        if flag.name in run_flags:
            res.values[flag.name] = run_flags[flag.name]
            res.sources[flag.name] = "flag"
            continue
        if flag.name in tunnel_flags:
            res.values[flag.name] = tunnel_flags[flag.name]
            res.sources[flag.name] = "flag"
            continue
        env_hit = next((e for e in flag.env if e in env), None)
        if env_hit is not None:
            res.values[flag.name] = _env_value(flag, env_hit, env[env_hit])
            res.sources[flag.name] = f"env:{env_hit}"
            continue
        if config is not None:
            key = next((n for n in flag.names if n in config.data), None)
            if key is not None and config.data[key] is not None:
                res.values[flag.name] = _config_value(flag, key, config)
                res.sources[flag.name] = "config"
    if config is not None:
        for key in config.data:
            if key not in BY_NAME and key not in CONFIG_KEYS:
                res.warnings.append(f"{config.source}:{config.line(key)}: unused key {key!r} in the config "
                                    "file (not a cloudflared flag or setting)")
    return res


def _env_value(flag: Flag, name: str, text: str) -> Any:
    if flag.kind == "slice":
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        return parse_value(flag, text)
    except ValueError as exc:
        raise ConfigError(f'could not parse "{text}" as a {_kind_text(flag)} value from environment variable '
                          f'{name} for flag {flag.name}: {exc}', source=f"${name}") from None


def _kind_text(flag: Flag) -> str:
    return {"bool": "bool", "int": "int", "uint": "uint", "dur": "duration", "slice": "list",
            "str": "string"}[flag.kind]


def _config_value(flag: Flag, key: str, config: ConfigFile) -> Any:
    raw = config.data[key]
    line = config.line(key)
    hint = {"bool": "write true or false", "int": "write a whole number", "uint": "write a whole number",
            "dur": 'write a Go duration such as "5s" or "1m30s"', "slice": "write a list or one string",
            "str": "write a string"}[flag.kind]
    bad = ConfigError(f"{key}: expected {_kind_text(flag)}, found {raw!r}", source=config.source, line=line,
                      hint=hint)
    if flag.kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return parse_bool(raw)
            except ValueError:
                raise bad from None
        raise bad
    if flag.kind in ("int", "uint"):
        if isinstance(raw, bool) or not isinstance(raw, int) or (flag.kind == "uint" and raw < 0):
            raise bad
        return raw
    if flag.kind == "dur":
        if isinstance(raw, str):
            try:
                return parse_value(flag, raw)
            except ValueError:
                raise bad from None
        raise bad
    if flag.kind == "slice":
        if isinstance(raw, list) and all(isinstance(x, (str, int, float)) for x in raw):
            return [str(x) for x in raw]
        if isinstance(raw, (str, int)):
            return [str(raw)]
        raise bad
    if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
        return str(raw)
    raise bad


# --- config file ---------------------------------------------------------------------------------------

def load_config_for(tunnel_flags: Mapping[str, Any], notes: list[str]) -> ConfigFile | None:
    """`--config FILE`, else cloudflared's search path; None when there is none."""
    path = tunnel_flags.get("config")
    if path is None:
        found = find_default_config()
        if found is None:
            notes.append(f"Cannot determine default configuration path. No file {search_path_text()}")
            return None
        path = found
    cfg = load_config(path)
    if cfg.empty:
        notes.append(f"Configuration file {path} was empty")
    return cfg


# --- settings -----------------------------------------------------------------------------------------

def origin_defaults_from_flags(res: Resolved) -> OriginRequestConfig:
    """cloudflared's originRequestFromSingleRule: the origin flags, for a --url / hello-world rule."""
    base = OriginRequestConfig()
    changes: dict[str, Any] = {}
    mapping = {
        "proxy-connect-timeout": "connect_timeout", "proxy-tls-timeout": "tls_timeout",
        "proxy-tcp-keepalive": "tcp_keep_alive", "proxy-keepalive-connections": "keep_alive_connections",
        "proxy-keepalive-timeout": "keep_alive_timeout", "http-host-header": "http_host_header",
        "origin-server-name": "origin_server_name", "origin-ca-pool": "ca_pool",
        "no-tls-verify": "no_tls_verify", "no-chunked-encoding": "disable_chunked_encoding",
    }
    for name, attr in mapping.items():
        if res.is_set(name):
            changes[attr] = res.get(name)
    return dataclasses.replace(base, **changes)


def config_flags(res: Resolved) -> dict[str, str]:
    """`__configuration_flags`: set flags among cloudflared's configFlags, as strings."""
    out: dict[str, str] = {}
    for name in CONFIG_FLAGS:
        if res.is_set(name):
            text = value_text(BY_NAME[name], res.get(name))
            if text != "":
                out[name] = text
    return out


def diag_flags(res: Resolved) -> tuple[tuple[str, str], ...]:
    """What `/diag/configuration` lists (cloudflared's nonSecretCliFlags): the set flags of `DIAG_FLAGS` that
    are not empty, as strings; log paths made absolute."""
    out = []
    for name in DIAG_FLAGS:
        if name not in BY_NAME or not res.is_set(name):
            continue
        text = value_text(BY_NAME[name], res.get(name))
        if text and name in ("logfile", "log-directory"):
            text = os.path.abspath(text)
        if text:
            out.append((name, text))
    return tuple(out)


def _edge_addrs(res: Resolved, discover: Discover | None, ip_version: str) -> Discovery:
    """`--edge`, else the edge found through DNS (`discover`); and the protocol TXT record when read."""
    from tunnel_lab.connector.edge_discovery import Discovery

    addrs = [a for a in (res.get("edge") or []) if a]
    if not addrs:
        if discover is None:
            raise ConfigError("no edge address: --edge is needed here", source="--edge",
                              hint="pass --edge HOST:PORT (the lab edge's tunnel listeners, see its ready "
                                   "file), twice for two addresses, or set TUNNEL_EDGE")
        found = discover(ip_version)
        return found if found.regions else dataclasses.replace(
            found, regions=(found.addresses[0::2], found.addresses[1::2]))
    for addr in addrs:
        m = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]+):(\d{1,5})", addr)
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise ConfigError(f"invalid edge address {addr!r}", source="--edge",
                              hint="write HOST:PORT, e.g. 127.0.0.1:7844 or [::1]:7844")
    return Discovery(addresses=tuple(addrs), protocol_percentages=None)


def _edge_ip_version(res: Resolved, notes: list[str]) -> tuple[str, str | None]:
    """`--edge-ip-version` and `--edge-bind-address` checked and combined as cloudflared's
    prepareTunnelConfig does: a bind address overrides the version with its own family."""
    import ipaddress
    import socket

    version = parse_ip_version(str(res.get("edge-ip-version") or "auto"))
    bind = str(res.get("edge-bind-address") or "") or None
    if bind is None:
        return version, None
    try:
        ip = ipaddress.ip_address(bind)
    except ValueError:
        raise ConfigError(f"invalid value for edge-bind-address: {bind}", source="--edge-bind-address",
                          hint="an IP address of this machine") from None
    try:  # testIPBindable
        with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((bind, 0))
    except OSError as exc:
        raise ConfigError(f"invalid edge-bind-address {bind}: listen udp {with_port(bind, 0)}: bind: "
                          f"{(exc.strerror or str(exc)).lower()}", source="--edge-bind-address") from None
    adjusted, warning = adjust_for_bind(version, bind)
    if warning:
        notes.append(f"Overriding edge-ip-version error={q(warning)} edgeIPVersion={adjusted}")
    return adjusted, bind


def _tags(res: Resolved) -> tuple[tuple[str, str], ...]:
    tags = []
    for item in res.get("tag") or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"Tag '{item}' does not have the form KEY=VALUE", source="--tag",
                              hint="write --tag NAME=VALUE")
        tags.append((key, value))
    return tuple(tags)


def _protocol(res: Resolved, notes: list[str]) -> str:
    """The validated `--protocol` value (connector/protocol.py decides what it means)."""
    proto = str(res.get("protocol")).lower()
    if proto == "h2mux":
        notes.append("h2mux is no longer a supported protocol: upgrading edge connection to http2. Please "
                     "remove '--protocol h2mux' from runtime arguments to remove this warning.")
        return "http2"
    if proto in ("auto", "http2", "quic"):
        return proto
    raise ConfigError(f"Unknown protocol {proto}, available protocols: auto, http2, quic",
                      source="--protocol", hint="use --protocol http2 or quic")


def _credentials(res: Resolved, args: Sequence[str]) -> Any:
    if len(args) > 1:
        late = next((a for a in args[1:] if a.startswith("-")), None)
        hint = f" (flags such as {late} must come before the tunnel argument)" if late else ""
        raise UsageError('"tunnel run" accepts only one argument, the ID or name of the tunnel to run.'
                         + hint, help_for="run")
    token = res.get("token")
    if not token and res.is_set("token-file"):
        path = res.get("token-file")
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"Failed to read token file: {exc.strerror or exc}", source=path,
                              hint="check the --token-file path") from None
    if token:
        try:
            return wc.parse_token(token)
        except ConfigError as exc:
            raise ConfigError("Provided Tunnel token is not valid.", source="--token",
                              hint=f"{exc.message}; copy the token printed by `tunnel-lab tunnel token`"
                              ) from None
    ref = args[0] if args else None
    if ref is None and res.config is not None:
        cfg_tunnel = res.config.data.get("tunnel")
        if cfg_tunnel is not None:
            ref = str(cfg_tunnel)
    if not ref:
        raise UsageError('"tunnel run" requires the ID or name of the tunnel to run as the last command line '
                         'argument or in the configuration file.', help_for="run")
    tunnel_id: uuid.UUID | None
    try:
        tunnel_id = uuid.UUID(ref)
    except ValueError:
        tunnel_id = None
    if tunnel_id is None and not res.get("credentials-contents") and not res.get("credentials-file"):
        tunnel_id = _find_id_by_name(ref, res)
    if res.get("credentials-contents"):
        creds = wc.parse_credentials_file(res.get("credentials-contents"), "--credentials-contents")
    else:
        path = res.get("credentials-file")
        if not path:
            path = _find_credentials_file(tunnel_id, res)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"tunnel credentials file '{path}' doesn't exist or is not a file",
                              source="--credentials-file",
                              hint="pass the file written by `tunnel-lab tunnel create`") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read tunnel credentials file: {exc}", source=path) from None
        creds = wc.parse_credentials_file(text, path)
    if tunnel_id is not None and tunnel_id != creds.tunnel_id:
        creds = dataclasses.replace(creds, tunnel_id=tunnel_id)
    return creds


def _find_id_by_name(name: str, res: Resolved) -> uuid.UUID:
    """cloudflared's findID for a name: the API (origin certificate's token), non-deleted tunnels."""
    from tunnel_lab.connector import admin

    tunnel = {n: res.get(n) for n in ("origincert", "api-url") if res.is_set(n)}
    ctx = admin.Context(inv=admin.Invocation(name="run", flags={}, args=[], tunnel=tunnel))
    try:
        return ctx.find_id(name)
    except TunnelLabError as exc:
        raise ConfigError(f"error parsing tunnel ID: {exc}",
                          hint="run `tunnel login` first, or pass the tunnel's UUID or --credentials-file"
                          ) from None


def _find_credentials_file(tunnel_id: uuid.UUID | None, res: Resolved) -> str:
    """cloudflared looks for `<UUID>.json` beside the origin cert and in its config directories."""
    if tunnel_id is None:
        raise ConfigError("a tunnel name (not a UUID) needs a credentials file to find the tunnel's ID",
                          source="--credentials-file",
                          hint="pass --credentials-file FILE, or give the tunnel's UUID")
    dirs = []
    if res.is_set("origincert"):
        dirs.append(str(Path(res.get("origincert")).expanduser().parent))
    dirs += ["~/.cloudflared", "~/.cloudflare-warp", "~/cloudflare-warp", "/etc/cloudflared",
             "/usr/local/etc/cloudflared"]
    for d in dirs:
        candidate = Path(os.path.expanduser(d)) / f"{tunnel_id}.json"
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"tunnel credentials file not found for tunnel {tunnel_id}",
                      source="--credentials-file",
                      hint="pass --credentials-file FILE (written by `tunnel-lab tunnel create`)")


def _parse_rules(res: Resolved, warnings: list[str]) -> tuple[tuple[Any, ...], WarpRoutingConfig]:
    cfg = res.config
    if cfg is not None and cfg.data.get("ingress"):
        defaults = ingress.parse_origin_request(cfg.data.get("originRequest"), OriginRequestConfig(),
                                                source=cfg.source, where="originRequest", line_of=cfg.line,
                                                keys=("originRequest",), warnings=warnings)
        rules = ingress.parse_ingress(cfg.data["ingress"], source=cfg.source, defaults=defaults,
                                      line_of=cfg.line, warnings=warnings)
        for name in ("url", "hello-world"):
            if res.is_set(name) and res.get(name):
                warnings.append(f"--{name} is ignored: the ingress rules of {cfg.source} take precedence "
                                "(as in cloudflared)")
    else:
        defaults = origin_defaults_from_flags(res)
        no_rules: list[str] = []
        unix_socket = res.get("unix-socket") if res.is_set("unix-socket") else None
        if unix_socket and res.is_set("url"):
            raise ConfigError("--unix-socket must be used exclusively.", source="--unix-socket",
                              hint="give either --url or --unix-socket")
        rules = ingress.parse_ingress(None, source="", defaults=defaults,
                                      url=res.get("url") if res.is_set("url") else None,
                                      hello_world=bool(res.get("hello-world")), warnings=no_rules,
                                      unix_socket=unix_socket or None)
        if not res.is_set("token"):
            warnings.extend(no_rules)
    if cfg is None:
        return rules, WarpRoutingConfig()
    warp = ingress.parse_warp_routing(cfg.data.get("warp-routing"), source=cfg.source, line_of=cfg.line)
    return rules, warp


def build_settings(res: Resolved, args: Sequence[str], notes: list[str], *,
                   discover: Discover | None = None, quick: QuickTunnel | None = None) -> TunnelSettings:
    """Everything `run_tunnel` needs, from the resolved flags (raises ConfigError / UsageError).

    Without `--edge`, `discover` finds the edge (connector.edge_discovery; None: an error). `quick` is a
    quick tunnel the service just created: its credentials, one HA connection, QUIC unless `--protocol`.
    """
    for flag in FLAGS:
        if not res.is_set(flag.name):
            continue
        if flag.support == "refuse" and not (flag.kind == "bool" and not res.get(flag.name)):
            raise ConfigError(f"--{flag.name} {flag.note}", source=f"--{flag.name}")
        value = res.get(flag.name)
        if flag.support == "warn" and not (flag.kind == "bool" and bool(value) == bool(flag.default)):
            notes.append(f"--{flag.name} {flag.note or _NO_EFFECT}")
    protocol_flag = _protocol(res, notes)
    if quick is not None:
        creds = wc.Credentials(account_tag=quick.account_tag, tunnel_secret=quick.secret, tunnel_id=quick.id)
        if not res.is_set("protocol"):
            protocol_flag = "quic"
    else:
        creds = _credentials(res, args)
    ip_version, bind = _edge_ip_version(res, notes)
    found = _edge_addrs(res, discover, ip_version)
    edge_addrs, percentages = found.addresses, found.protocol_percentages
    choice = choose_protocol(protocol_flag, token_given=bool(res.get("token") or res.is_set("token-file")),
                             percentages=percentages, account_tag=creds.account_tag)
    ha = 1 if quick is not None else int(res.get("ha-connections"))
    if ha < 1:
        raise ConfigError(f"--ha-connections must be at least 1, got {ha}", source="--ha-connections")
    # Only the active (primary) family's addresses count (supervisor.initialize / AvailableAddrs).
    available = (EdgeAddresses.discovered(found.regions, ip_version) if found.regions
                 else EdgeAddresses.static(edge_addrs)).available()
    if ha > available:
        notes.append(f"You requested {ha} HA connections but I can give you at most {available}.")
        ha = available
    grace = float(res.get("grace-period"))
    if grace > MAX_GRACE_PERIOD:
        raise ConfigError("grace-period must be equal or less than 3m0s", source="--grace-period")
    rules, warp = _parse_rules(res, notes)
    if res.is_set("max-active-flows"):
        warp_effective = dataclasses.replace(warp, max_active_flows=int(res.get("max-active-flows")) or None)
    else:
        warp_effective = warp
    features = list(TunnelSettings.__dataclass_fields__["features"].default)  # type: ignore[arg-type]
    if res.get("post-quantum"):
        features.append("postquantum")
    for extra in res.get("features") or []:
        if extra not in features:
            features.append(extra)
    metrics = res.get("metrics") or "localhost:0"
    return TunnelSettings(
        credentials=creds,
        edge_addrs=edge_addrs,
        ca_cert=res.get("cacert") or None,
        ha_connections=ha,
        metrics=metrics,
        grace_period=grace,
        retries=int(res.get("retries")),
        rpc_timeout=float(res.get("rpc-timeout")),
        max_edge_addr_retries=int(res.get("max-edge-addr-retries")),
        edge_regions=found.regions,
        edge_ip_version=ip_version,
        edge_bind_address=bind,
        loglevel=str(res.get("loglevel")),
        ingress_rules=rules,
        warp_routing=warp_effective,
        features=tuple(features),
        tags=_tags(res),
        local_config_json=ingress.local_config_json(config_flags(res), rules, warp),
        post_quantum=bool(res.get("post-quantum")),
        stdin_control=bool(res.get("stdin-control")),
        protocol=choice.initial,
        protocol_can_fall_back=choice.can_fall_back,
        quick_tunnel_url=quick.hostname if quick is not None else "",
        management_hostname=str(res.get("management-hostname") or "management.argotunnel.com"),
        management_diagnostics=bool(res.get("management-diagnostics")),
        label=str(res.get("label") or ""),
        diag_flags=diag_flags(res),
    )


_NO_EFFECT = "is accepted for compatibility with cloudflared but has no effect in tunnel-lab's connector"


# --- command structure ------------------------------------------------------------------------------

@dataclass
class Command:
    """What `argv` asks for: the subcommand path, each level's flags and the positional args."""

    path: tuple[str, ...]  # e.g. ("tunnel", "run"), ("tunnel", "ingress", "validate")
    tunnel: ParsedLevel
    run: ParsedLevel | None = None
    args: list[str] = field(default_factory=list)
    sub_flags: dict[str, Any] = field(default_factory=dict)


TUNNEL_SUBCOMMANDS_ELSEWHERE: tuple[str, ...] = ()  # cloudflared commands this connector does not have


def parse_command(argv: Sequence[str]) -> Command:
    """Split argv into levels like urfave/cli (flags of each level before its subcommand)."""
    try:
        return _parse_command(argv)
    except UsageError as exc:
        if exc.help_for is None:
            exc.help_for = _level_of_error(argv)
        raise


def _level_of_error(argv: Sequence[str]) -> str:
    if "run" in argv:
        return "run"
    if "ingress" in argv:
        return "ingress"
    return "tunnel" if "tunnel" in argv else "root"


def _parse_command(argv: Sequence[str]) -> Command:
    root = parse_level(argv, "T", allow_version=True)
    if root.version:
        return Command(path=("version",), tunnel=root)
    if root.help and not root.args:
        return Command(path=("help",), tunnel=root)
    if not root.args:
        raise UsageError("no command given", help_for="root")
    cmd, rest = root.args[0], root.args[1:]
    if cmd == "version":
        return Command(path=("version",), tunnel=root)
    if cmd == "help":
        return Command(path=("help",), tunnel=root)
    if cmd == "access":
        return Command(path=("access",), tunnel=root, args=rest)
    if cmd == "tail":
        return Command(path=("tail",), tunnel=root, args=rest)
    if cmd != "tunnel":
        raise UsageError(f"unknown command {cmd!r}: this connector implements `tunnel`, `tail` and "
                         "`access ...`", help_for="root")
    tun = parse_level(rest, "T")
    tun.values = {**root.values, **tun.values}
    if tun.help and not tun.args:
        return Command(path=("tunnel", "help"), tunnel=tun)
    if not tun.args:
        return Command(path=("tunnel",), tunnel=tun)
    sub, rest = tun.args[0], tun.args[1:]
    if sub == "help":
        return Command(path=("tunnel", "help"), tunnel=tun)
    if sub == "run":
        run = parse_level(rest, "R")
        if run.help:
            return Command(path=("tunnel", "run", "help"), tunnel=tun, run=run)
        return Command(path=("tunnel", "run"), tunnel=tun, run=run, args=run.args)
    if sub == "ready":
        return Command(path=("tunnel", "ready"), tunnel=tun, args=rest)
    if sub == "ingress":
        if not rest or rest[0] in ("-h", "--help", "help"):
            return Command(path=("tunnel", "ingress", "help"), tunnel=tun)
        action, rest = rest[0], rest[1:]
        if action not in ("validate", "rule"):
            raise UsageError(f"unknown ingress command {action!r}: use `ingress validate` or "
                             "`ingress rule URL`", help_for="ingress")
        sub_flags: dict[str, Any] = {}
        args: list[str] = []
        i = 0
        while i < len(rest):
            a = rest[i]
            if action == "validate" and a in ("--json", "-json", "-j", "--j") and i + 1 < len(rest):
                sub_flags["json"] = rest[i + 1]
                i += 2
                continue
            if action == "validate" and a.startswith(("--json=", "-json=", "-j=")):
                sub_flags["json"] = a.split("=", 1)[1]
                i += 1
                continue
            if a in ("-h", "--help"):
                return Command(path=("tunnel", "ingress", "help"), tunnel=tun)
            if a.startswith("-") and a != "-" and not args:
                raise UsageError(f"flag provided but not defined: -{a.lstrip('-').split('=')[0]}",
                                 help_for="ingress")
            args.append(a)
            i += 1
        return Command(path=("tunnel", "ingress", action), tunnel=tun, args=args, sub_flags=sub_flags)
    if sub in ADMIN_COMMANDS:
        return Command(path=("tunnel", "admin"), tunnel=tun, args=[sub, *rest])
    if sub in TUNNEL_SUBCOMMANDS_ELSEWHERE:
        raise UsageError(f"`tunnel {sub}` is not implemented by tunnel-lab's connector", help_for="tunnel")
    raise UsageError(f"unknown tunnel command {sub!r}: use `tunnel [flags] run [flags] [TUNNEL]`",
                     help_for="tunnel")


# --- help --------------------------------------------------------------------------------------------

def _flag_help_line(flag: Flag) -> str:
    names = ", ".join(("--" if len(n) > 1 else "-") + n + ("" if flag.kind == "bool" else " value")
                      for n in flag.names)
    text = flag.usage or ""
    if flag.default not in (None, False, "", []) and flag.kind != "bool":
        shown = value_text(flag, flag.default)
        text += f' (default: "{shown}")' if flag.kind == "str" else f" (default: {shown})"
    elif flag.kind == "bool" and flag.default is True:
        text += " (default: true)"
    if flag.env:
        text += " [" + ", ".join("$" + e for e in flag.env) + "]"
    return f"   {names:<40} {text}"


def help_text(which: str) -> str:
    """cloudflared-style help for `root`, `tunnel`, `run` or `ingress`."""
    if which == "run":
        flags = [f for f in FLAGS if "R" in f.levels and f.show]
        return "\n".join([
            "NAME:", f"   {PROG} tunnel run - Proxy a local web server by running the given tunnel", "",
            "USAGE:", f"   {PROG} tunnel [tunnel command options] run [subcommand options] [TUNNEL]", "",
            "DESCRIPTION:",
            "   Runs the tunnel identified by UUID (or by name, with a credentials file), creating highly",
            "   available connections between your server and the edge. The tunnel can also be named in the",
            '   configuration file with "tunnel: TUNNEL". Credentials come from --token, --token-file,',
            "   --credentials-contents or --credentials-file (written by `tunnel-lab tunnel create`).", "",
            "OPTIONS:", *[_flag_help_line(f) for f in flags], "",
        ])
    if which == "ingress":
        return "\n".join([
            "NAME:", f"   {PROG} tunnel ingress - Validate and test the tunnel's ingress configuration", "",
            "USAGE:", f"   {PROG} tunnel [--config FILEPATH] ingress COMMAND [arguments...]", "",
            "COMMANDS:",
            "   validate  Validate the ingress configuration (--json JSON to validate inline rules)",
            "   rule      Check which ingress rule matches a given request URL", "",
            "DESCRIPTION:",
            "   Rules are tried in order; each matches a request's hostname (exact, or `*.example.com` for",
            "   subdomains) and optionally its path (a regular expression). The last rule must be a",
            "   catch-all (no hostname, no path), e.g. `- service: http_status:404`.", "",
        ])
    if which == "tunnel":
        flags = [f for f in FLAGS if "T" in f.levels and f.show]
        return "\n".join([
            "NAME:", f"   {PROG} tunnel - Use Cloudflare Tunnel to expose private services to the Internet "
            "(here: to the lab's edge)", "",
            "USAGE:", f"   {PROG} tunnel [tunnel command options] run [subcommand options] [TUNNEL]", "",
            "COMMANDS:",
            "   login    Generate a configuration file with your login details",
            "   create   Create a new tunnel with given name",
            "   route    Define which traffic routed from Cloudflare edge to this tunnel (dns, ip)",
            "   vnet     Configure and query virtual networks",
            "   list     List existing tunnels",
            "   info     List details about the active connectors for a tunnel",
            "   delete   Delete existing tunnel by UUID or name",
            "   cleanup  Cleanup tunnel connections",
            "   token    Fetch the credentials token for an existing tunnel",
            "   run      Proxy a local web server by running the given tunnel",
            "   ingress  Validate and test the tunnel's ingress configuration", "",
            "DESCRIPTION:",
            "   tunnel-lab's connector speaks cloudflared's tunnel protocols. In `tunnel-lab sandbox`",
            "   the admin commands talk to the lab's API as cloudflared's do. Outside it, create and",
            "   route tunnels with `tunnel-lab tunnel create NAME` and `tunnel-lab tunnel route dns NAME",
            "   HOST`, then:", "",
            f"      $ {PROG} tunnel --edge 127.0.0.1:7844 --edge 127.0.0.2:7844 --cacert ca.pem \\",
            "          run --credentials-file UUID.json --url http://127.0.0.1:8080 UUID", "",
            "   Flags may also be set with their environment variables or in a YAML --config file.", "",
            "OPTIONS:", *[_flag_help_line(f) for f in flags], "",
        ])
    return "\n".join([
        "NAME:", f"   {PROG} - tunnel-lab's connector: cloudflared's `tunnel run` on the http2 protocol", "",
        "USAGE:", f"   {PROG} [global options] command [command options] [arguments...]", "",
        "VERSION:", f"   {VERSION}", "",
        "COMMANDS:",
        "   tunnel   Run a tunnel (`tunnel run`), manage tunnels (`tunnel login|create|...`), check ingress",
        "   tail     Stream logs from a remote cloudflared (or tunnel-lab connector)",
        "   access   access login|token|curl|tcp|ssh: Access tokens; TCP/SSH through the tunnel",
        "   version  Print the version", "",
        "GLOBAL OPTIONS:",
        "   --help, -h     show help",
        "   --version, -v  print the version", "",
    ])


# --- entry points -----------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """`tunnel-lab connector ...`; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command = parse_command(args)
    except UsageError as exc:
        print(f"Incorrect Usage. {exc.message}\n", file=sys.stderr)
        print(help_text(exc.help_for or "root"), file=sys.stderr)
        return 1
    path = command.path
    if path == ("version",):
        print(f"{PROG} version {VERSION} (cloudflared 2026.8.2 compatible, protocol http2)")
        return 0
    if path[-1] == "help":
        which = {("help",): "root", ("tunnel", "help"): "tunnel", ("tunnel", "run", "help"): "run",
                 ("tunnel", "ingress", "help"): "ingress"}[path]
        print(help_text(which))
        return 0
    if path == ("access",):
        from tunnel_lab.connector import access
        return access.main(command.args)
    if path == ("tail",):
        from tunnel_lab.connector import tail
        return tail.main(command.args, prog=PROG)
    try:
        if path == ("tunnel",):
            return _tunnel_without_subcommand(command)
        if path[:2] == ("tunnel", "ingress"):
            return _ingress_command(command)
        if path == ("tunnel", "ready"):
            return _ready_command(command)
        if path == ("tunnel", "admin"):
            return _admin_command(command)
        return _run_command(command)
    except UsageError as exc:
        print(f"{exc.message}\nSee '{PROG} tunnel {'run ' if exc.help_for == 'run' else ''}--help'.",
              file=sys.stderr)
        return 1
    except TunnelLabError as exc:
        print(f"tunnel-lab: {exc}", file=sys.stderr)
        return 1


def _tunnel_without_subcommand(command: Command) -> int:
    notes: list[str] = []
    cfg = load_config_for(command.tunnel.values, notes)
    if cfg is not None and cfg.data.get("tunnel"):
        raise UsageError(f"Use `{PROG} tunnel run` to start tunnel {cfg.data['tunnel']}", help_for="tunnel")
    res = resolve({}, command.tunnel.values, os.environ, cfg)
    if (res.is_set("url") or res.is_set("hello-world")) and (res.get("quick-service") or QUICK_SERVICE):
        return _quick_tunnel(command, res)
    raise UsageError("You did not specify any valid additional argument to the tunnel command. "
                     f"Use `{PROG} tunnel [flags] run [flags] TUNNEL`.", help_for="tunnel")


QUICK_SERVICE = "https://api.trycloudflare.com"
QUICK_DISCLAIMER = (
    "Thank you for trying Cloudflare Tunnel. Doing so, without a Cloudflare account, is a quick way to "
    "experiment and try it out. However, be aware that these account-less Tunnels have no uptime guarantee, "
    "are subject to the Cloudflare Online Services Terms of Use (https://www.cloudflare.com/website-terms/), "
    "and Cloudflare reserves the right to investigate your use of Tunnels for violations of such terms. If "
    "you intend to use Tunnels in production you should use a pre-created named tunnel by following: "
    "https://developers.cloudflare.com/cloudflare-one/connections/connect-apps")


def _quick_tunnel(command: Command, res: Resolved) -> int:
    """`tunnel --url URL` without `run`: ask the quick-tunnel service for a tunnel, then run it."""
    from tunnel_lab.connector import admin, cfapi

    for note in setup_logging(str(res.get("loglevel")), output=str(res.get("output"))):
        log.error("%s", note)
    log.info("%s", QUICK_DISCLAIMER)
    log.info("Requesting new quick Tunnel on trycloudflare.com...")
    req = cfapi.quick_tunnel_request(str(res.get("quick-service") or QUICK_SERVICE))
    try:
        resp = admin.https_transport(req, {"Content-Type": cfapi.JSON_TYPE, "User-Agent": admin.USER_AGENT},
                                     admin.API_TIMEOUT)
    except cfapi.ApiError as exc:
        print(f"failed to request quick Tunnel: {exc}", file=sys.stderr)
        return 1
    try:
        quick = cfapi.decode_quick_tunnel(resp.body)
    except cfapi.ApiError as exc:
        log.error("Error unmarshaling QuickTunnel response: %s status_code=%s",
                  resp.body.decode("utf-8", "replace"), q(f"{resp.status}"))
        print(str(exc), file=sys.stderr)
        return 1
    url = quick.hostname if quick.hostname.startswith("https://") else "https://" + quick.hostname
    for line in ascii_box(["Your quick Tunnel has been created! Visit it at (it may take some time to be "
                           "reachable):", url]):
        log.info("%s", line)
    run = ParsedLevel(values={}, args=[])
    return _run_command(Command(path=("tunnel", "run"), tunnel=command.tunnel, run=run), quick=quick)


def ascii_box(lines: Sequence[str], padding: int = 2) -> list[str]:
    """cloudflared's LogTable: the lines in a `+---+` box."""
    width = max(len(line) for line in lines)
    border = "+" + "-" * (width + 2 * padding) + "+"
    spacer = " " * padding
    return [border, *("|" + spacer + line.ljust(width) + spacer + "|" for line in lines), border]


def _admin_command(command: Command) -> int:
    """`tunnel login|create|list|info|delete|cleanup|token|route ...` (connector.admin)."""
    from tunnel_lab.connector import admin

    notes: list[str] = []
    res = resolve({}, command.tunnel.values, os.environ, load_config_for(command.tunnel.values, notes))
    for note in setup_logging(str(res.get("loglevel")), output=str(res.get("output"))):
        log.error("%s", note)
    tunnel_values = {name: res.get(name) for name in ("origincert", "api-url", "credentials-file")
                     if res.is_set(name)}
    try:
        inv = admin.parse_invocation(command.args, tunnel_values)
    except admin.NoHelpTopic as exc:
        print(str(exc), file=sys.stderr)
        return admin.NoHelpTopic.exit_code
    except admin.CommandUsageError as exc:
        print(admin.usage_error_text(str(exc), PROG, " ".join(command.args[:2]) if command.args[0] == "route"
                                     else command.args[0]), file=sys.stderr)
        return admin.USAGE_EXIT
    except UsageError as exc:
        # urfave/cli for a subcommand's unknown flag: the error and the help on stdout, and exit code 0
        print(f"Incorrect Usage: {exc.message}\n")
        print(admin.help_text(command.args, PROG))
        return 0
    except admin.CommandError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if inv is None:
        print(admin.help_text(command.args, PROG))
        return 0
    return admin.run(inv, prog=PROG)


def _ready_command(command: Command) -> int:
    """`tunnel --metrics ADDR ready`: exit 0 when the running connector's /ready says 200."""
    import urllib.error
    import urllib.request

    notes: list[str] = []
    res = resolve({}, command.tunnel.values, os.environ, load_config_for(command.tunnel.values, notes))
    if not res.is_set("metrics"):
        raise UsageError("--metrics has to be provided", help_for="tunnel")
    url = f"http://{res.get('metrics')}/ready"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP(S)_PROXY
    try:
        with opener.open(url, timeout=5) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}", source="--metrics",
                          hint="is the connector running with this --metrics address?") from None
    if status != 200:
        print(f"{url} endpoint returned status code {status}\n{body.decode('utf-8', 'replace')}",
              file=sys.stderr)
        return 1
    return 0


def _ingress_command(command: Command) -> int:
    action = command.path[2]
    notes: list[str] = []
    if action == "validate" and "json" in command.sub_flags:
        print("Validating rules from cmdline flag --json")
        import json as _json
        try:
            doc = _json.loads(command.sub_flags["json"])
        except ValueError as exc:
            raise ConfigError(f"invalid JSON: {exc}", source="--json") from None
        if not isinstance(doc, dict):
            raise ConfigError("expected a JSON object with an `ingress` list", source="--json")
        cfg: ConfigFile | None = ConfigFile(source="--json", data=doc)
    else:
        cfg = load_config_for(command.tunnel.values, notes)
    if cfg is None:
        raise ConfigError("No configuration file was found. Please create one, or use the --config flag "
                          "to specify its filepath. You can use the help command to learn more about "
                          "configuration files")
    if cfg.source != "--json":
        print(("Validating rules from " if action == "validate" else "Using rules from ") + cfg.source)
    res = resolve({}, command.tunnel.values, os.environ, cfg)
    warnings: list[str] = []
    try:
        if not cfg.data.get("ingress"):
            raise ConfigError("The config file doesn't contain any ingress rules", source=cfg.source,
                              hint="add an `ingress:` list ending with a catch-all rule")
        defaults = ingress.parse_origin_request(cfg.data.get("originRequest"), OriginRequestConfig(),
                                                source=cfg.source, where="originRequest", line_of=cfg.line,
                                                keys=("originRequest",), warnings=warnings)
        rules = ingress.parse_ingress(cfg.data["ingress"], source=cfg.source, defaults=defaults,
                                      line_of=cfg.line, warnings=warnings)
    except ConfigError as exc:
        print(f"Validation failed: {exc}", file=sys.stderr)
        return 1
    if action == "validate":
        if res.is_set("url"):
            print("You can't set the --url flag (or $TUNNEL_URL) when using multiple-origin ingress rules",
                  file=sys.stderr)
            return 1
        unused = res.warnings + warnings
        if unused:
            print("Warning: unused keys detected in your config file. Here is a list of unused keys:")
            print("\n".join(unused))
            return 0
        print("OK")
        return 0
    if len(command.args) != 1:
        raise UsageError("tunnel ingress rule expects a single argument, the URL to test", help_for="ingress")
    url = command.args[0]
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise ConfigError(f"{url} is not a valid URL") from None
    if not host and not parts.scheme:
        raise ConfigError(f"{url} doesn't have a hostname, consider adding a scheme")
    rule = ingress.match_rule(rules, host, parts.path)
    print(f"Matched rule #{rule.index}")
    print(ingress.describe_rule(rule))
    return 0


def resolve_run(command: Command, env: Mapping[str, str]) -> tuple[Resolved, list[str]]:
    """Config file + environment + both levels' flags for `tunnel run`."""
    notes: list[str] = []
    cfg = load_config_for(command.tunnel.values, notes)
    assert command.run is not None
    res = resolve(command.run.values, command.tunnel.values, env, cfg)
    notes.extend(res.warnings)
    return res, notes


def prepare_run(command: Command, env: Mapping[str, str]) -> tuple[TunnelSettings, Resolved, list[str]]:
    """Parse config + env + flags for `tunnel run` into settings; returns (settings, resolved, notes)."""
    res, notes = resolve_run(command, env)
    settings = build_settings(res, command.args, notes)
    return settings, res, notes


def _run_command(command: Command, quick: QuickTunnel | None = None) -> int:
    res, notes = resolve_run(command, os.environ)
    # Logging first, so that every later message has cloudflared's format.
    logfile = res.get("logfile")
    if not logfile and res.get("log-directory"):
        logfile = str(Path(res.get("log-directory")) / "cloudflared.log")
    for note in setup_logging(str(res.get("loglevel")), output=str(res.get("output")), logfile=logfile):
        log.error("%s", note)
    from tunnel_lab.connector.edge_discovery import discover_from_system

    settings = build_settings(res, command.args, notes, discover=discover_from_system, quick=quick)
    # "Starting tunnel" and the no-ingress-rules warning are the runtime's lines (connector.runtime).
    for note in notes:
        if note == ingress.NO_RULES_WARNING:
            continue
        if note.startswith("INFO:"):
            log.info("%s", note[5:])
        elif note.startswith(("Cannot determine default configuration path", "You requested",
                              "Configuration file")):
            log.info("%s", note)
        else:
            log.warning("%s", note)
    log.info("Version %s (tunnel-lab connector)", VERSION)
    log.info("Settings: %s", _settings_map(res))
    secret_env = {e for name in SECRET_FLAGS for e in BY_NAME[name].env}
    env_echo = {k: ("*****" if k in secret_env else v) for k, v in sorted(os.environ.items())
                if any(k in f.env for f in FLAGS)}
    if env_echo:
        log.info("Environmental variables map[%s]", " ".join(f"{k}:{v}" for k, v in env_echo.items()))
    log.info("Generated Connector ID: %s", settings.connector_id)
    log.info("Initial protocol %s", settings.protocol)
    pidfile = res.get("pidfile")
    if pidfile:
        try:
            Path(pidfile).write_text(f"{os.getpid()}\n", encoding="utf-8")
        except OSError as exc:
            log.error("Unable to write pid to %s error=%s", pidfile, exc)
    try:
        from tunnel_lab.connector import runtime
    except ImportError as exc:
        raise ConfigError(f"the connector runtime (connector/runtime.py) is not available: {exc}") from None
    import trio

    if res.get("trace"):
        import base64
        import dataclasses as dc

        from tunnel_lab.transport.trace import Tracer

        secret = base64.b64encode(settings.credentials.tunnel_secret).decode()
        try:
            tracer = Tracer(res.get("trace"), component="connector", secrets=[secret])
        except OSError as exc:
            raise ConfigError(f"cannot write the trace file {res.get('trace')}: {exc.strerror or exc}",
                              source="--trace") from None
        settings = dc.replace(settings, trace=tracer)
    try:
        return int(trio.run(runtime.run_tunnel, settings))
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        # A nursery may wrap the runtime's error: report the first project error, never a traceback.
        leaf = _first_leaf(group, (TunnelLabError, OSError))
        if leaf is None:
            raise
        raise _as_lab_error(leaf) from None
    except OSError as exc:
        raise _as_lab_error(exc) from None
    finally:
        if settings.trace is not None:
            settings.trace.close()


def _first_leaf(group: BaseExceptionGroup, types_: tuple[type[BaseException], ...]) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_leaf(exc, types_)
            if found is not None:
                return found
        elif isinstance(exc, types_):
            return exc
    return None


def _as_lab_error(exc: BaseException) -> TunnelLabError:
    if isinstance(exc, TunnelLabError):
        return exc
    if isinstance(exc, OSError):
        return ConfigError(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
                           hint="check the addresses and files given on the command line")
    return ConfigError(str(exc))


def _settings_map(res: Resolved) -> str:
    """cloudflared's `Settings: map[...]` line: every set flag (secrets masked), names sorted."""
    items = []
    for name in sorted(res.values):
        flag = BY_NAME[name]
        text = "*****" if name in SECRET_FLAGS else value_text(flag, res.values[name])
        items.append(f"{name}:{text}")
    return "map[" + " ".join(items) + "]"


if __name__ == "__main__":
    sys.exit(main())

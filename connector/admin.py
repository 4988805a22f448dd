"""`tunnel-lab connector tunnel login|create|list|info|delete|cleanup|token|route`: the admin commands.

Each command sends the requests `connector.cfapi` builds, over HTTPS with Python's default trust (the
system pool, or `SSL_CERT_FILE`: in `tunnel-lab sandbox` that holds the lab CA), to `--api-url`
(`TUNNEL_API_URL`, default Cloudflare's). The API token and the account come from the origin
certificate (`--origincert`, `TUNNEL_ORIGIN_CERT`, else `cert.pem` in cloudflared's config directories)
that `tunnel login` saves. Output (stdout), log lines (stderr) and exit codes are cloudflared's: 0, 1
for an error, 255 for a usage error (cloudflared exits with -1).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import re
import secrets
import ssl
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import urlencode

from tunnel_lab.connector import cfapi, diag
from tunnel_lab.connector.flags import Flag, UsageError, parse_level
from tunnel_lab.wire import credentials as wc
from tunnel_lab.wire.errors import ConfigError, TunnelLabError
from tunnel_lab.wire.origin_cert import OriginCert, decode_origin_cert, encode_origin_cert

log = logging.getLogger(__name__)
T = TypeVar("T")

CONFIG_DIRS = ("~/.cloudflared", "~/.cloudflare-warp", "~/cloudflare-warp", "/etc/cloudflared",
               "/usr/local/etc/cloudflared")
LOGIN_URL = "https://dash.cloudflare.com/argotunnel"
CALLBACK_URL = "https://login.cloudflareaccess.org/"
API_TIMEOUT = 15.0  # cfapi's defaultTimeout
POLL_TIMEOUT = 60.0  # token.clientTimeout: the lab holds a poll for 45 s
POLL_ATTEMPTS = 10
USER_AGENT = "cloudflared/2026.8.2"
USAGE_EXIT = 255  # cli.Exit(msg, -1)
LIST_SORT = ("name", "id", "createdAt", "deletedAt", "numConnections")
INFO_SORT = ("id", "startedAt", "numConnections", "version")  # as cloudflared words it (the key is createdAt)
_NAME = re.compile(r"^[*_a-zA-Z0-9][-_.a-zA-Z0-9]*$")
_POOL = re.compile(r"^[_a-zA-Z0-9][-_.a-zA-Z0-9]*$")  # cloudflared's validateName (no wildcard)


class CommandError(TunnelLabError):
    """A command failed: printed as it is, exit code 1 (cloudflared's cli.Exit(err, 1))."""


class NoHelpTopic(TunnelLabError):
    """urfave/cli for an unknown subcommand of a command with subcommands: `No help topic for 'X'`, exit 3."""

    exit_code = 3


class CommandUsageError(TunnelLabError):
    """cloudflared's cliutil.UsageError: the message, then `See '... --help'.`, exit code 255."""


def _flag(name: str, kind: str, *aliases: str, env: tuple[str, ...] = (), default: Any = None) -> Flag:
    return Flag(name=name, kind=kind, levels="S", env=env, aliases=aliases, default=default)


OUTPUT = _flag("output", "str", "o")
CRED_FILE = _flag("credentials-file", "str", "cred-file", env=("TUNNEL_CRED_FILE",))
SUBCOMMAND_FLAGS: dict[str, tuple[Flag, ...]] = {
    "login": (_flag("loginURL", "str", default=LOGIN_URL), _flag("callbackURL", "str", default=CALLBACK_URL),
              _flag("fedramp", "bool", "f")),
    "create": (OUTPUT, CRED_FILE, _flag("secret", "str", "s", env=("TUNNEL_CREATE_SECRET",))),
    "list": (OUTPUT, _flag("show-deleted", "bool", "d"), _flag("name", "str", "n"),
             _flag("name-prefix", "str", "np"), _flag("exclude-name-prefix", "str", "enp"),
             _flag("when", "str", "w"), _flag("id", "str", "i"),
             _flag("show-recently-disconnected", "bool", "rd"),
             _flag("sort-by", "str", env=("TUNNEL_LIST_SORT_BY",), default="name"),
             _flag("invert-sort", "bool", env=("TUNNEL_LIST_INVERT_SORT",))),
    "info": (OUTPUT, _flag("show-recently-disconnected", "bool", "rd"),
             _flag("sort-by", "str", env=("TUNNEL_INFO_SORT_BY",), default="createdAt"),
             _flag("invert-sort", "bool", env=("TUNNEL_INFO_INVERT_SORT",))),
    "delete": (CRED_FILE, _flag("force", "bool", "f", env=("TUNNEL_RUN_FORCE_OVERWRITE",))),
    "cleanup": (_flag("connector-id", "str", "c", env=("TUNNEL_CLEANUP_CONNECTOR",)),),
    "token": (CRED_FILE,),
    "route dns": (_flag("overwrite-dns", "bool", "f", env=("TUNNEL_FORCE_PROVISIONING_DNS",)),),
    "route lb": (),
    "route ip add": (_flag("vnet", "str", "vn"),),
    "route ip show": (OUTPUT, _flag("filter-is-deleted", "bool"), _flag("filter-tunnel-id", "str"),
                      _flag("filter-network-is-subset-of", "str", "nsub"),
                      _flag("filter-network-is-superset-of", "str", "nsup"),
                      _flag("filter-comment-is", "str"),
                      _flag("filter-vnet-id", "str")),
    "route ip delete": (_flag("vnet", "str", "vn"),),
    "route ip get": (_flag("vnet", "str", "vn"),),
    "diag": (_flag("metrics", "str"), _flag("diag-container-id", "str"), _flag("diag-pod-id", "str"),
             _flag("no-diag-logs", "bool"), _flag("no-diag-metrics", "bool"), _flag("no-diag-system", "bool"),
             _flag("no-diag-runtime", "bool"), _flag("no-diag-network", "bool")),
    "vnet add": (_flag("default", "bool", "d"),),
    "vnet list": (_flag("id", "str"), _flag("name", "str"), _flag("is-default", "bool"),
                  _flag("show-deleted", "bool"), OUTPUT),
    "vnet delete": (_flag("force", "bool", "f"),),
    "vnet update": (_flag("name", "str", "n"), _flag("comment", "str", "c"), _flag("default", "bool", "d")),
}
ADMIN_COMMANDS = ("login", "create", "list", "info", "delete", "cleanup", "token", "route", "vnet", "diag")


@dataclass
class Invocation:
    """One admin command: its name (`route dns`), its own flags and arguments, the tunnel-level values."""

    name: str
    flags: dict[str, Any]
    args: list[str]
    tunnel: Mapping[str, Any]  # resolved tunnel-level flags: origincert, api-url, credentials-file
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)

    def get(self, name: str) -> Any:
        if name in self.flags:
            return self.flags[name]
        flag = next((f for f in SUBCOMMAND_FLAGS.get(self.name, ()) if f.name == name), None)
        if flag is not None:
            hit = next((e for e in flag.env if e in self.env), None)
            if hit is not None:
                return self.env[hit] if flag.kind != "bool" else self.env[hit].lower() in ("1", "t", "true")
            if name == "credentials-file" and self.tunnel.get("credentials-file"):
                return self.tunnel["credentials-file"]
            return flag.default
        return self.tunnel.get(name)


def parse_invocation(words: Sequence[str], tunnel: Mapping[str, Any],
                     env: Mapping[str, str] | None = None) -> Invocation | None:
    """`create --secret S NAME` -> Invocation; None when `--help` was asked for."""
    name, rest = words[0], list(words[1:])
    if name == "route":
        if rest and rest[0] not in ("dns", "ip", "lb"):
            raise NoHelpTopic(f"No help topic for '{rest[0]}'")
        if not rest:
            raise CommandUsageError('This command expects the format "cloudflared tunnel route dns <tunnel '
                                    'name/id> <hostname>"')
        name, rest = f"route {rest[0]}", rest[1:]
        if name == "route ip":
            action = rest[0] if rest else ""
            action = {"list": "show"}.get(action, action)
            if action and action not in ("add", "show", "delete", "get"):
                raise NoHelpTopic(f"No help topic for '{action}'")
            if not action:
                raise CommandUsageError("use `route ip add|show|delete|get`")
            name, rest = f"route ip {action}", rest[1:]
    if name == "vnet":
        action = rest[0] if rest else ""
        if action and action not in ("add", "list", "delete", "update"):
            raise NoHelpTopic(f"No help topic for '{action}'")
        if not action:
            raise CommandUsageError("use `vnet add|list|delete|update`")
        name, rest = f"vnet {action}", rest[1:]
    defined: dict[str, Flag] = {}
    for flag in SUBCOMMAND_FLAGS[name]:
        for n in flag.names:
            defined[n] = flag
    parsed = parse_level(rest, "S", defined=defined)
    if parsed.help:
        return None
    return Invocation(name=name, flags=parsed.values, args=parsed.args, tunnel=tunnel,
                      env=os.environ if env is None else env)


# --- I/O ------------------------------------------------------------------------------------------------

Transport = Callable[[cfapi.ApiRequest, dict[str, str], float], cfapi.ApiResponse]


def https_transport(req: cfapi.ApiRequest, headers: dict[str, str], timeout: float) -> cfapi.ApiResponse:
    """One request with urllib: default trust (honours SSL_CERT_FILE), never through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=ssl.create_default_context()))
    request = urllib.request.Request(req.url, data=req.body, method=req.method, headers=headers)
    try:
        with opener.open(request, timeout=timeout) as resp:
            return cfapi.ApiResponse(resp.status, resp.headers.get("Content-Type", ""), resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return cfapi.ApiResponse(exc.code, exc.headers.get("Content-Type", ""), exc.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        op = req.method[:1] + req.method[1:].lower()
        raise cfapi.ApiError(f'{op} "{req.url}": {reason}') from None


@dataclass
class Api:
    """The API client of one command: cloudflared's RESTClient (headers, paging, error mapping)."""

    client: cfapi.ApiClient
    token: str
    transport: Transport = https_transport
    user_agent: str = USER_AGENT

    def send(self, req: cfapi.ApiRequest) -> cfapi.ApiResponse:
        headers = {"User-Agent": self.user_agent, "Authorization": f"Bearer {self.token}",
                   "Accept": cfapi.ACCEPT}
        if req.body is not None:
            headers["Content-Type"] = cfapi.JSON_TYPE
        try:
            return self.transport(req, headers, API_TIMEOUT)
        except cfapi.ApiError as exc:
            raise cfapi.ApiError(f"REST request failed: {exc}") from None

    def call(self, req: cfapi.ApiRequest, op: str) -> Any:
        """A request whose 200 answer carries a result."""
        resp = self.send(req)
        if resp.status == 200:
            return cfapi.decode_envelope(resp).result
        raise _status_error(op, resp)

    def call_no_result(self, req: cfapi.ApiRequest, op: str) -> None:
        error = cfapi.status_error(op, self.send(req))
        if error is not None:
            raise error

    def list_all(self, make: Callable[[int], cfapi.ApiRequest], op: str) -> list[Any]:
        """cfapi's fetchExhaustively: pages until one is short or the total is reached."""
        out: list[Any] = []
        page = 0
        while True:
            page += 1
            try:
                resp = self.send(make(page))
                if resp.status != 200:
                    raise cfapi.ApiError(f"REST request failed: {_status_error(op, resp)}")
                env = cfapi.decode_envelope(resp)
            except cfapi.ApiError as exc:
                raise cfapi.ApiError(f"Error Parsing page {page}: {exc}") from None
            items = env.result if isinstance(env.result, list) else []
            if env.result is not None and not isinstance(env.result, list):
                raise cfapi.ApiError(f"Error Parsing page {page}: the Cloudflare API response was an "
                                     "unexpected type")
            out.extend(items)
            if env.count < env.per_page or len(out) >= env.total_count:
                return out

    def list_tunnels(self, params: dict[str, str]) -> list[cfapi.Tunnel]:
        filt = cfapi.TunnelFilter(params)
        items = self.list_all(lambda page: self.client.list_tunnels(filt, page), "list tunnels")
        return [cfapi.Tunnel.from_json(t) for t in items]


def _status_error(op: str, resp: cfapi.ApiResponse) -> cfapi.ApiError:
    error = cfapi.status_error(op, resp)
    return error or cfapi.ApiError(f"API call to {op} failed with status {resp.status}")


# --- the context every command shares ------------------------------------------------------------------

@dataclass
class Context:
    """cloudflared's subcommandContext: the origin certificate and the API client, found on first use."""

    inv: Invocation
    out: TextIO = sys.stdout
    transport: Transport = https_transport
    _api: Api | None = None
    _cert: tuple[OriginCert, Path] | None = None

    def origin_cert(self) -> tuple[OriginCert, Path]:
        if self._cert is None:
            self._cert = read_origin_cert(self.inv.tunnel.get("origincert") or None)
        return self._cert

    def api(self) -> Api:
        if self._api is None:
            cert, _ = self.origin_cert()
            base = str(self.inv.tunnel.get("api-url") or cfapi.DEFAULT_API_URL)
            client = cfapi.ApiClient(base, cert.account_id, cert.zone_id)
            self._api = Api(client, cert.api_token, self.transport)
        return self._api

    def find_id(self, ref: str) -> uuid.UUID:
        """cloudflared's findID: a UUID, else the credentials file's TunnelID, else the API by name."""
        try:
            return uuid.UUID(ref)
        except ValueError:
            pass
        cred_path = self.inv.get("credentials-file")
        if cred_path:
            try:
                creds = wc.parse_credentials_file(Path(cred_path).expanduser().read_text(encoding="utf-8"),
                                                  cred_path)
            except (OSError, UnicodeDecodeError, ConfigError):
                creds = None
            if creds is not None and creds.tunnel_id != wc.NIL_UUID:
                return creds.tunnel_id
        found = self.api().list_tunnels({"is_deleted": "false", "name": ref})
        if found:
            return found[0].id
        raise CommandError(f"{ref} is neither the ID nor the name of any of your tunnels")

    def find_ids(self, refs: Sequence[str]) -> list[uuid.UUID]:
        ids, names = [], []
        for ref in refs:
            try:
                ids.append(uuid.UUID(ref))
            except ValueError:
                names.append(ref)
        for name in names:
            found = self.api().list_tunnels({"is_deleted": "false", "name": name})
            if len(found) != 1:
                raise CommandError(f"there should only be 1 non-deleted Tunnel named {name}")
            ids.append(found[0].id)
        return ids

    def credentials_path(self, tunnel_id: uuid.UUID) -> Path | None:
        """cloudflared's credentialFinder: the given file, else `<ID>.json` by cert.pem or in config dirs."""
        given = self.inv.get("credentials-file")
        if given:
            path = Path(given).expanduser()
            return path if path.is_file() else None
        return find_credentials_file(tunnel_id, self.inv.tunnel.get("origincert") or None)


def default_origin_cert_path() -> Path | None:
    for d in CONFIG_DIRS:
        candidate = Path(os.path.expanduser(d)) / "cert.pem"
        if candidate.is_file():
            return candidate
    return None


def read_origin_cert(path: str | None) -> tuple[OriginCert, Path]:
    """credentials.Read: find, read and decode cert.pem, with cloudflared's log lines and errors."""
    if path is None:
        found = default_origin_cert_path()
        if found is None:
            log.error("Cannot determine default origin certificate path. No file cert.pem in [%s]. You need "
                      "to specify the origin certificate path by specifying the origincert option in the "
                      "configuration file, or set TUNNEL_ORIGIN_CERT environment variable originCertPath=",
                      " ".join(CONFIG_DIRS))
            raise CommandError("Error locating origin cert: client didn't specify origincert path")
        cert_path = found
    else:
        cert_path = Path(path).expanduser()
        if not cert_path.is_file():
            log.error("Cannot find a valid certificate for your origin at the path:\n\n    %s\n\nIf the path "
                      "above is wrong, specify the path with the -origincert option.\nIf you don't have a "
                      "certificate signed by Cloudflare, run the command:\n\n\tcloudflared login\n "
                      "originCertPath=%s",
                      cert_path, path)
            raise CommandError(f"Error locating origin cert: cannot find a valid certificate at the path "
                               f"{cert_path}")
    try:
        data = cert_path.read_bytes()
    except OSError:
        raise CommandError(f"Can't read origin cert from {cert_path}: cannot read {cert_path} to load origin "
                           "certificate") from None
    try:
        cert = decode_origin_cert(data, source=str(cert_path))
    except ConfigError as exc:
        raise CommandError(f"Error decoding origin cert: {exc.message}") from None
    if not cert.account_id:
        raise CommandError("Origin certificate needs to be refreshed before creating new tunnels.\nDelete "
                           f'{cert_path} and run "cloudflared login" to obtain a new cert.')
    return cert, cert_path


def find_credentials_file(tunnel_id: uuid.UUID, origincert: str | None) -> Path | None:
    dirs: list[Path] = []
    cert_path = Path(origincert).expanduser() if origincert else default_origin_cert_path()
    if cert_path is not None and cert_path.is_file():
        dirs.append(cert_path.parent)
    dirs += [Path(os.path.expanduser(d)) for d in CONFIG_DIRS]
    for d in dirs:
        candidate = d / f"{tunnel_id}.json"
        if candidate.is_file():
            return candidate
    return None


# --- output helpers --------------------------------------------------------------------------------------

def tabwrite(lines: Sequence[str], *, padding: int = 1) -> str:
    """Go's text/tabwriter with cloudflared's settings (minwidth 0, padding 1, spaces, no flags)."""
    rows = [line.split("\t") for line in lines]
    out: list[str] = []
    widths: list[int] = []

    def write(start: int, end: int) -> None:
        for row in rows[start:end]:
            text = "".join(cell.ljust(widths[j]) if j < len(widths) and j < len(row) - 1 else cell
                           for j, cell in enumerate(row))
            out.append(text)

    def fmt(line0: int, line1: int) -> None:
        column = len(widths)
        this = line0
        while this < line1:
            if column >= len(rows[this]) - 1:
                this += 1
                continue
            write(line0, this)
            line0 = this
            width = 0
            while this < line1 and column < len(rows[this]) - 1:
                width = max(width, len(rows[this][column]) + padding)
                this += 1
            widths.append(width)
            fmt(line0, this)
            widths.pop()
            line0 = this
        write(line0, line1)

    fmt(0, len(rows))
    return "".join(line + "\n" for line in out)


def render(fmt_name: str, value: Any, out: TextIO) -> None:
    """cloudflared's renderOutput: `json` (two-space indent) or `yaml`."""
    if fmt_name == "json":
        out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    elif fmt_name == "yaml":
        import yaml

        out.write(yaml.safe_dump(value, sort_keys=False, default_flow_style=False))
    else:
        raise CommandError(f"Unknown output format '{fmt_name}'")


def fmt_connections(conns: Sequence[cfapi.Connection], show_recently_disconnected: bool) -> str:
    per_colo: dict[str, int] = {}
    for c in conns:
        if not c.is_pending_reconnect or show_recently_disconnected:
            per_colo[c.colo_name] = per_colo.get(c.colo_name, 0) + 1
    return ", ".join(f"{per_colo[colo]}x{colo}" for colo in sorted(per_colo))


def valid_hostname(name: str) -> bool:
    """cloudflared's validateHostname: IDNA to ASCII (labels checked), then a name pattern with `*`."""
    try:
        puny = ".".join(label.encode("idna").decode("ascii") if label and label != "*" else label
                        for label in name.split("."))
    except UnicodeError:
        return False
    return len(puny) <= 253 and _NAME.match(puny) is not None


# --- commands ----------------------------------------------------------------------------------------

def login(ctx: Context) -> int:
    """`tunnel login`: print the dashboard URL, long-poll the callback store, save cert.pem."""
    inv = ctx.inv
    config_dir = Path(os.path.expanduser(CONFIG_DIRS[0]))
    path = config_dir / "cert.pem"
    if path.is_file() and path.stat().st_size > 0:
        log.error("You have an existing certificate at %s which login would overwrite.\nIf this is "
                  "intentional, please move or delete that file then run this command again.\n", path)
        return 0
    config_dir.mkdir(mode=0o700, exist_ok=True)
    if inv.get("fedramp"):
        raise CommandError("FedRAMP login is not available in the lab")
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    # cloudflared's key names the transfer; the certificate itself travels unencrypted.
    public = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key = base64.urlsafe_b64encode(public).decode("ascii")
    callback_store = str(inv.get("callbackURL"))
    base = str(inv.get("loginURL"))
    request_url = base + ("&" if "?" in base else "?") + urlencode(
        sorted({"aud": "", "callback": callback_store + key}.items()))
    print("Please open the following URL and log in with your Cloudflare account:\n\n"
          f"{request_url}\n\nLeave cloudflared running to download the cert automatically.", file=sys.stderr)
    sys.stderr.flush()
    data = poll_transfer(CALLBACK_URL + key, ctx.transport)
    try:
        cert = decode_origin_cert(data, source="the downloaded certificate")
    except ConfigError as exc:
        log.error("failed to decode origin certificate error=%s", json.dumps(exc.message))
        raise CommandError(exc.message) from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(encode_origin_cert(cert))
    except OSError as exc:
        raise CommandError(f"error writing cert to {path}: {exc.strerror or exc}") from None
    log.info("You have successfully logged in.\nIf you wish to copy your credentials to a server, they have "
             "been saved to:\n%s\n", path)
    return 0


def poll_transfer(url: str, transport: Transport) -> bytes:
    """token.transferRequest: poll until a 200 with a body; a non-200 below 500 means `not yet`."""
    for _ in range(POLL_ATTEMPTS):
        try:
            resp = transport(cfapi.ApiRequest("GET", url), {"User-Agent": USER_AGENT}, POLL_TIMEOUT)
        except cfapi.ApiError as exc:
            raise CommandError(str(exc)) from None
        if resp.status >= 500:
            raise CommandError(f"error on request {resp.status}: {resp.body.decode('utf-8', 'replace')}")
        if resp.status != 200:
            log.info("Waiting for login...")
            continue
        if resp.body:
            return resp.body
    raise CommandError("Failed to fetch resource")


def create(ctx: Context) -> int:
    inv = ctx.inv
    if len(inv.args) != 1:
        raise CommandUsageError('"cloudflared tunnel create" requires exactly 1 argument, the name of tunnel '
                                "to create.")
    name = inv.args[0]
    try:
        return _create(ctx, name)
    except TunnelLabError as exc:
        raise CommandError(f"failed to create tunnel: {exc}") from None


def _create(ctx: Context, name: str) -> int:
    inv = ctx.inv
    try:
        api = ctx.api()
    except TunnelLabError as exc:
        raise CommandError(f"couldn't create client to talk to Cloudflare Tunnel backend: {exc}") from None
    secret_text = inv.get("secret")
    if secret_text:
        try:
            secret = base64.b64decode(secret_text, validate=True)
        except ValueError as exc:
            raise CommandError(f"Couldn't decode tunnel secret from base64: {exc}") from None
        if len(secret) < 32:
            raise CommandError("Decoded tunnel secret must be at least 32 bytes long")
    else:
        secret = secrets.token_bytes(32)
    try:
        resp = api.send(api.client.create_tunnel(name, secret))
        if resp.status == 409:
            raise cfapi.TunnelNameConflict()
        if resp.status != 200:
            raise _status_error("create tunnel", resp)
        result = cfapi.decode_envelope(resp).result
        tunnel = cfapi.Tunnel.from_json(result)
    except cfapi.ApiError as exc:
        raise CommandError(f"Create Tunnel API call failed: {exc}") from None
    cert, cert_path = ctx.origin_cert()
    creds = wc.Credentials(account_tag=cert.account_id, tunnel_secret=secret, tunnel_id=tunnel.id,
                           endpoint=cert.endpoint)
    given = inv.get("credentials-file")
    used_cert_path = not given
    path = Path(given).expanduser() if given else cert_path.parent / f"{tunnel.id}.json"
    try:
        write_credentials(path, creds)
    except OSError as exc:
        lines = [f"Your tunnel '{tunnel.name}' was created with ID {tunnel.id}. However, cloudflared "
                 f"couldn't write tunnel credentials to {path}.",
                 f"The file-writing error is: {_os_error_text(exc, path)}"]
        try:
            api.call_no_result(api.client.delete_tunnel(tunnel.id, True), "delete tunnel")
        except cfapi.ApiError as del_exc:
            lines += [f"Cloudflared tried to delete the tunnel for you, but encountered an error. You "
                      f"should use `cloudflared tunnel delete {tunnel.id}` to delete the tunnel yourself, "
                      "because the tunnel can't be run without the tunnelfile.",
                      f"The delete tunnel error is: {del_exc}"]
        else:
            lines.append("The tunnel was deleted, because the tunnel can't be run without the credentials "
                         "file")
        raise CommandError("\n".join(lines)) from None
    if inv.get("output"):
        doc = tunnel.to_json()
        render(str(inv.get("output")), {**doc, "token": cfapi._str(result.get("token"))}, ctx.out)
        return 0
    text = f"Tunnel credentials written to {path}."
    if used_cert_path:
        text += " cloudflared chose this file based on where your origin certificate was found."
    text += " Keep this file secret. To revoke these credentials, delete the tunnel.\n"
    ctx.out.write(text + f"\nCreated tunnel {tunnel.name} with id {tunnel.id}\n")
    return 0


def _os_error_text(exc: OSError, path: Path) -> str:
    if isinstance(exc, FileExistsError):
        return f"{path} already exists"
    return f"open {path}: {(exc.strerror or str(exc)).lower()}"


def write_credentials(path: Path, creds: wc.Credentials) -> None:
    """cloudflared's writeTunnelCredentials: never replaces a file; mode 0400."""
    if path.exists():
        raise FileExistsError(str(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(wc.credentials_json(creds))


def list_tunnels(ctx: Context) -> int:
    inv = ctx.inv
    params: dict[str, str] = {}
    if not inv.get("show-deleted"):
        params["is_deleted"] = "false"
    for flag, key in (("name", "name"), ("name-prefix", "name_prefix"),
                      ("exclude-name-prefix", "exclude_prefix")):
        if inv.get(flag):
            params[key] = str(inv.get(flag))
    # cloudflared reads `--when` under another name (c.Timestamp("time")), so it never filters: nor here.
    if inv.get("id"):
        try:
            params["uuid"] = str(uuid.UUID(str(inv.get("id"))))
        except ValueError:
            raise CommandError(f"{inv.get('id')} is not a valid tunnel ID: invalid UUID length: "
                               f"{len(str(inv.get('id')))}") from None
    tunnels = ctx.api().list_tunnels(params)
    keys: dict[str, Callable[[cfapi.Tunnel], Any]] = {
        "name": lambda t: t.name, "id": lambda t: str(t.id),
        "createdAt": lambda t: int(t.created_at.timestamp()),
        "deletedAt": lambda t: int(t.deleted_at.timestamp()),
        "numConnections": lambda t: len(t.connections)}
    _sort(ctx, tunnels, keys, "name", LIST_SORT)
    if _rendered_or_empty(ctx, tunnels, "No tunnels were found for the given filter flags. You can use "
                          "'cloudflared tunnel create' to create a tunnel.\n"):
        return 0
    rd = bool(inv.get("show-recently-disconnected"))
    lines = ["You can obtain more detailed information for each tunnel with `cloudflared tunnel info "
             "<name/uuid>`", "ID\tNAME\tCREATED\tCONNECTIONS\t"]
    lines += [f"{t.id}\t{t.name}\t{cfapi.go_rfc3339(t.created_at)}\t{fmt_connections(t.connections, rd)}\t"
              for t in tunnels]
    ctx.out.write(tabwrite(lines))
    return 0


def info(ctx: Context) -> int:
    inv = ctx.inv
    tunnel_id = _one_tunnel(ctx, '"cloudflared tunnel info" accepts exactly one argument, the ID or name of '
                                 "the tunnel to get info about.")
    api = ctx.api()
    clients = [cfapi.ActiveClient.from_json(c)
               for c in _as_list(api.call(api.client.active_clients(tunnel_id), "list connection details"))]
    keys: dict[str, Callable[[cfapi.ActiveClient], Any]] = {
        "id": lambda c: str(c.id), "createdAt": lambda c: int(c.run_at.timestamp()),
        "numConnections": lambda c: len(c.connections), "version": lambda c: c.version}
    _sort(ctx, clients, keys, "createdAt", INFO_SORT)
    found = api.list_tunnels({"uuid": str(tunnel_id)})
    if len(found) != 1:
        raise CommandError(f"Expected to find a single tunnel with uuid {tunnel_id} but found {len(found)} "
                           "tunnels.")
    tunnel = found[0]
    if inv.get("output"):
        render(str(inv.get("output")), {"id": str(tunnel.id), "name": tunnel.name,
                                        "createdAt": cfapi._json_time(tunnel.created_at),
                                        "conns": [c.to_json() for c in clients]}, ctx.out)
        return 0
    if not clients:
        ctx.out.write(f"Your tunnel {tunnel_id} does not have any active connection.\n")
        return 0
    rd = bool(inv.get("show-recently-disconnected"))
    created = cfapi.go_time_string(tunnel.created_at)
    header = f"NAME:     {tunnel.name}\nID:       {tunnel.id}\nCREATED:  {created}\n\n"
    rows = [c for c in clients if fmt_connections(c.connections, rd)]
    if not rows:
        # cloudflared prints this line directly while the header still sits in its tabwriter.
        ctx.out.write("This tunnel has no active connectors.\n" + header)
        return 0
    lines = [*header.split("\n")[:-1], "CONNECTOR ID\tCREATED\tARCHITECTURE\tVERSION\tORIGIN IP\tEDGE\t"]
    lines += [f"{c.id}\t{cfapi.go_rfc3339(c.run_at)}\t{c.arch}\t{c.version}\t"
              f"{c.connections[0].origin_ip or '<nil>'}\t{fmt_connections(c.connections, rd)}\t"
              for c in rows]
    ctx.out.write(tabwrite(lines))
    return 0


def _api_do(ctx: Context, error: str, action: Callable[[Api], T]) -> T:
    """Runs `action` on the command's API client; an API error becomes `error: <why>`."""
    api = ctx.api()
    try:
        return action(api)
    except cfapi.ApiError as exc:
        raise CommandError(f"{error}: {exc}") from None


def _one_tunnel(ctx: Context, usage: str) -> uuid.UUID:
    """The single tunnel argument (ID or name) of `info` and `token`."""
    if len(ctx.inv.args) != 1:
        raise CommandUsageError(usage)
    try:
        return ctx.find_id(ctx.inv.args[0])
    except TunnelLabError as exc:
        raise CommandError(f"error parsing tunnel ID: {exc}") from None


def _sort(ctx: Context, items: list[T], keys: Mapping[str, Callable[[T], Any]], default: str,
          valid: Sequence[str]) -> None:
    """`--sort-by` and `--invert-sort`; an unknown field is logged and `default` used, as in cloudflared."""
    sort_by = str(ctx.inv.get("sort-by"))
    if sort_by not in keys and len(items) > 1:  # Go's sort never compares fewer than two
        log.error("%s is not a valid sort field. Valid sort fields are %s. Defaulting to 'name'.", sort_by,
                  ", ".join(valid))
    items.sort(key=keys.get(sort_by, keys[default]), reverse=bool(ctx.inv.get("invert-sort")))


def _rendered_or_empty(ctx: Context, items: Sequence[Any], empty: str) -> bool:
    """A listing's `--output json|yaml`, or the `empty` line when it found nothing: True if written."""
    if ctx.inv.get("output"):
        # Go renders the nil slice of an empty listing as null.
        render(str(ctx.inv.get("output")), [i.to_json() for i in items] or None, ctx.out)
        return True
    if not items:
        ctx.out.write(empty)
        return True
    return False


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise CommandError("the Cloudflare API response was an unexpected type")
    return value


def delete(ctx: Context) -> int:
    inv = ctx.inv
    if not inv.args:
        raise CommandUsageError('"cloudflared tunnel delete" requires at least 1 argument, the ID or name of '
                                "the tunnel to delete.")
    api = ctx.api()
    for tunnel_id in ctx.find_ids(inv.args):
        try:
            tunnel = cfapi.Tunnel.from_json(api.call(api.client.get_tunnel(tunnel_id), "get tunnel"))
        except cfapi.ApiError as exc:
            raise CommandError(f"Can't get tunnel information. Please check tunnel id: {tunnel_id}: "
                               f"{exc}") from None
        if tunnel.deleted_at != cfapi.ZERO_TIME:
            raise CommandError(f"Tunnel {tunnel.id} has already been deleted")
        try:
            api.call_no_result(api.client.delete_tunnel(tunnel.id, bool(inv.get("force"))), "delete tunnel")
        except cfapi.ApiError as exc:
            raise CommandError(f"Error deleting tunnel {tunnel.id}: {exc}") from None
        path = ctx.credentials_path(tunnel_id)
        if path is not None:
            try:
                path.unlink()
            except OSError as exc:
                log.info("Tunnel %s was deleted, but we could not remove its credentials file  %s: %s. "
                         "Consider deleting this file manually.", tunnel_id, path, exc)
    return 0


def cleanup(ctx: Context) -> int:
    inv = ctx.inv
    if not inv.args:
        raise CommandUsageError('"cloudflared tunnel cleanup" requires at least 1 argument, the IDs of the '
                                "tunnels to cleanup connections.")
    ids = ctx.find_ids(inv.args)  # cloudflared resolves the tunnels before it reads --connector-id
    client_id = None
    extra = ""
    if inv.get("connector-id"):
        try:
            client_id = uuid.UUID(str(inv.get("connector-id")))
        except ValueError:
            raise CommandError(f"{inv.get('connector-id')} is not a valid client ID (must be a "
                               "UUID)") from None
        extra = f" for connector-id {client_id}"
    api = ctx.api()
    for tunnel_id in ids:
        log.info("Cleanup connection for tunnel %s%s", tunnel_id, extra)
        try:
            api.call_no_result(api.client.cleanup_connections(tunnel_id, client_id), "cleanup connections")
        except cfapi.ApiError as exc:
            log.error("Error cleaning up connections for tunnel %s, error :%s", tunnel_id, exc)
    return 0


def token(ctx: Context) -> int:
    inv = ctx.inv
    tunnel_id = _one_tunnel(ctx, '"cloudflared tunnel token" requires exactly 1 argument, the name or UUID '
                                 "of tunnel to fetch the credentials token for.")
    api = ctx.api()
    try:
        text = api.call(api.client.tunnel_token(tunnel_id), "get tunnel token")
        if not isinstance(text, str):
            raise cfapi.ApiError("the Cloudflare API response was an unexpected type")
    except cfapi.ApiError as exc:
        log.error("Could not get the Token for the given Tunnel %s error=%s", tunnel_id, json.dumps(str(exc)))
        raise CommandError(str(exc)) from None
    try:
        creds = wc.parse_token(text)
    except ConfigError as exc:
        raise CommandError(exc.message) from None
    given = inv.flags.get("credentials-file") or inv.get("credentials-file")
    if given:
        path = Path(given).expanduser()
        try:
            write_credentials(path, creds)
        except OSError as exc:
            raise CommandError(f"error writing token credentials to JSON file in path {given}: "
                               f"{_os_error_text(exc, path)}") from None
        return 0
    ctx.out.write(wc.make_token(creds) + "\n")
    return 0


def route_dns(ctx: Context) -> int:
    inv = ctx.inv
    if len(inv.args) != 2:
        raise CommandUsageError('This command expects the format "cloudflared tunnel route dns <tunnel '
                                'name/id> <hostname>"')
    tunnel_id = ctx.find_id(inv.args[0])
    hostname = inv.args[1]
    if not hostname:
        raise CommandUsageError("The third argument should be the hostname")
    if not valid_hostname(hostname):
        raise CommandError(f"{hostname} is not a valid hostname")
    api = ctx.api()
    result = api.call(api.client.route_dns(tunnel_id, hostname, bool(inv.get("overwrite-dns"))), "add route")
    doc = result if isinstance(result, dict) else {}
    name = doc.get("name") or hostname
    summary = {"new": "Added CNAME {} which will route to this tunnel",
               "updated": "{} updated to route to your tunnel",
               "unchanged": "{} is already configured to route to your tunnel"}.get(str(doc.get("cname")), "")
    # An answer cloudflared does not know leaves Go's Sprintf with an empty format.
    text = summary.format(name) if summary else f"%!(EXTRA string={name})"
    log.info("%s tunnelID=%s", text, tunnel_id)
    return 0


# cfapi's LBRouteResult.SuccessSummary, by "load_balancer,pool" (%s: the load balancer, then the pool).
_LB_SUMMARY = {
    "new,new": "Created load balancer {0} and added a new pool {1} with this tunnel as an origin",
    "new,updated": "Created load balancer {0} with an existing pool {1} which was updated to use this tunnel "
                   "as an origin",
    "new,unchanged": "Created load balancer {0} with an existing pool {1} which already has this tunnel as "
                     "an origin",
    "updated,new": "Added new pool {1} with this tunnel as an origin to load balancer {0}",
    "updated,updated": "Updated pool {1} to use this tunnel as an origin and added it to load balancer {0}",
    "updated,unchanged": "Added pool {1}, which already has this tunnel as an origin, to load balancer {0}",
    "unchanged,updated": "Added this tunnel as an origin in pool {1} which is already used by load balancer "
                         "{0}",
    "unchanged,unchanged": "Load balancer {0} already uses pool {1} which has this tunnel as an origin",
}


def route_lb(ctx: Context) -> int:
    """`route lb TUNNEL HOSTNAME POOL`: cloudflared's lbRouteFromArg checks, then the zone's routes PUT."""
    inv = ctx.inv
    if len(inv.args) != 3:
        raise CommandUsageError('This command expects the format "cloudflared tunnel route lb <tunnel '
                                'name/id> <hostname> <load balancer pool>"')
    tunnel_id = ctx.find_id(inv.args[0])
    lb_name, pool = inv.args[1], inv.args[2]
    if not lb_name:
        raise CommandUsageError("The third argument should be the load balancer name")
    if not valid_hostname(lb_name):
        raise CommandError(f"{lb_name} is not a valid load balancer name")
    if not pool:
        raise CommandUsageError("The fourth argument should be the pool name")
    if _POOL.match(pool) is None:
        raise CommandError(f"{pool} is not a valid pool name")
    api = ctx.api()
    result = api.call(api.client.route_lb(tunnel_id, lb_name, pool), "add route")
    doc = result if isinstance(result, dict) else {}
    key = f"{doc.get('load_balancer', '')},{doc.get('pool', '')}"
    text = _LB_SUMMARY.get(key, "Something went wrong: failed to modify load balancer {0} with pool {1}; "
                                "please check traffic manager configuration in the dashboard")
    log.info("%s tunnelID=%s", text.format(lb_name, pool), tunnel_id)
    return 0


def route_ip_add(ctx: Context) -> int:
    inv = ctx.inv
    if len(inv.args) < 2:
        raise CommandError("You must supply at least 2 arguments, first the network you wish to route (in "
                           "CIDR form e.g. 1.2.3.4/32) and then the tunnel ID to proxy with")
    network = _cidr(inv.args[0])
    if network is None:
        raise CommandError(f"Invalid network CIDR: invalid CIDR address: {inv.args[0]}")
    try:
        tunnel_id = ctx.find_id(inv.args[1])
    except TunnelLabError as exc:
        raise CommandError(f"Invalid tunnel: {exc}") from None
    comment = inv.args[2] if len(inv.args) >= 3 else ""
    vnet_id = vnet_of(ctx)
    _api_do(ctx, "API error", lambda api: api.call(api.client.add_route(str(network), tunnel_id, comment,
                                                                         vnet_id), "add route"))
    ctx.out.write(f"Successfully added route for {network} over tunnel {tunnel_id}\n")
    return 0


def _cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if "/" not in text:
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def vnet_of(ctx: Context) -> uuid.UUID | None:
    """`--vnet ID|NAME` when given (cloudflared's getVnetId), else None: the account's default."""
    if "vnet" not in ctx.inv.flags:
        return None
    return find_vnet_id(ctx, str(ctx.inv.flags["vnet"]))


def find_vnet_id(ctx: Context, ref: str) -> uuid.UUID:
    try:
        return uuid.UUID(ref)
    except ValueError:
        pass
    found = list_vnets(ctx, {"is_deleted": "false", "name": ref})
    if len(found) != 1:
        raise CommandError(f"there should only be 1 non-deleted virtual network named {ref}")
    return found[0].id


def list_vnets(ctx: Context, params: dict[str, str]) -> list[cfapi.VirtualNetwork]:
    api = ctx.api()
    items = _as_list(api.call(api.client.list_vnets(params), "list virtual networks"))
    return [cfapi.VirtualNetwork.from_json(v) for v in items]


def route_ip_show(ctx: Context) -> int:
    inv = ctx.inv
    params: dict[str, str] = {"is_deleted": "true" if inv.get("filter-is-deleted") else "false"}
    # cloudflared maps both --filter-network-is-subset-of and -superset-of to `network_superset` (cfapi).
    for flag in ("filter-network-is-subset-of", "filter-network-is-superset-of"):
        if inv.get(flag):
            net = _cidr(str(inv.get(flag)))
            if net is None:
                raise CommandError("invalid config for routing filters: invalid CIDR address: "
                                   f"{inv.get(flag)}")
            params["network_superset"] = str(net)
    if inv.get("filter-comment-is"):
        params["comment"] = str(inv.get("filter-comment-is"))
    for flag, key in (("filter-tunnel-id", "tunnel_id"), ("filter-vnet-id", "virtual_network_id")):
        if inv.get(flag):
            try:
                params[key] = str(uuid.UUID(str(inv.get(flag))))
            except ValueError:
                raise CommandError(f"invalid config for routing filters: Couldn't parse UUID from {flag}: "
                                   f"invalid UUID length: {len(str(inv.get(flag)))}") from None
    api = ctx.api()
    items = api.list_all(lambda page: api.client.list_routes(params, page), "list routes")
    routes = [cfapi.DetailedRoute.from_json(r) for r in items]
    if _rendered_or_empty(ctx, routes, "No routes were found for the given filter flags. You can use "
                          "'cloudflared tunnel route ip add' to add a route.\n"):
        return 0
    ctx.out.write(_route_table(routes))
    return 0


def _route_table(routes: Sequence[cfapi.DetailedRoute]) -> str:
    lines = ["ID\tNETWORK\tVIRTUAL NET ID\tCOMMENT\tTUNNEL ID\tTUNNEL NAME\tCREATED\tDELETED\t"]
    for r in routes:
        deleted = "-" if r.deleted_at == cfapi.ZERO_TIME else cfapi.go_rfc3339(r.deleted_at)
        vnet = str(r.vnet_id) if r.vnet_id is not None else "default"
        lines.append(f"{r.id}\t{r.network}\t{vnet}\t{r.comment}\t{r.tunnel_id}\t{r.tunnel_name}\t"
                     f"{cfapi.go_rfc3339(r.created_at)}\t{deleted}\t")
    return tabwrite(lines)


def route_ip_delete(ctx: Context) -> int:
    inv = ctx.inv
    usage = "You must supply exactly one argument, the ID or CIDR of the route you want to delete"
    if len(inv.args) != 1:
        raise CommandError(usage)
    api = ctx.api()
    try:
        route_id = uuid.UUID(inv.args[0])
    except ValueError:
        network = _cidr(inv.args[0])
        if network is None:
            raise CommandError(usage) from None
        vnet_id = vnet_of(ctx)
        params = {"is_deleted": "false", "network_subset": str(network), "network_superset": str(network)}
        if vnet_id is not None:
            params["virtual_network_id"] = str(vnet_id)
        found = api.list_all(lambda page: api.client.list_routes(params, page), "list routes")
        if len(found) != 1:
            raise CommandError("unable to find route for provided network and vnet") from None
        route_id = cfapi.DetailedRoute.from_json(found[0]).id
    _api_do(ctx, "API error", lambda api: api.call(api.client.delete_route(route_id), "delete route"))
    ctx.out.write(f"Successfully deleted route with ID {route_id}\n")
    return 0


def route_ip_get(ctx: Context) -> int:
    inv = ctx.inv
    if len(inv.args) != 1:
        raise CommandError("You must supply exactly one argument, an IP whose route will be queried (e.g. "
                           "1.2.3.4 or 2001:0db8:::7334)")
    try:
        ip = ipaddress.ip_address(inv.args[0])
    except ValueError:
        raise CommandError(f"Invalid IP {inv.args[0]}") from None
    vnet_id = vnet_of(ctx)
    route = _api_do(ctx, "API error", lambda api: cfapi.DetailedRoute.from_json(
        api.call(api.client.route_by_ip(str(ip), vnet_id), "get route by IP") or {}))
    if route.is_zero:
        ctx.out.write(f"No route matches the IP {ip}\n")
    else:
        ctx.out.write(_route_table([route]))
    return 0


def vnet_add(ctx: Context) -> int:
    inv = ctx.inv
    if not inv.args:
        raise CommandError("You must supply at least 1 argument, the name of the virtual network you wish to "
                           "add.")
    name = inv.args[0]
    comment = inv.args[1] if len(inv.args) >= 2 else ""
    vnet = _api_do(ctx, "Could not add virtual network", lambda api: cfapi.VirtualNetwork.from_json(
        api.call(api.client.create_vnet(name, comment, bool(inv.get("default"))), "add virtual network")))
    extra = " (as the new default for this account) " if vnet.is_default else ""
    ctx.out.write(f"Successfully added virtual 'network' {name} with ID: {vnet.id}{extra}\n"
                  "You can now add IP routes attached to this virtual network. See `cloudflared tunnel route "
                  "ip add -help`\n")
    return 0


def vnet_list(ctx: Context) -> int:
    inv = ctx.inv
    params: dict[str, str] = {}
    if inv.get("id"):
        try:
            params["id"] = str(uuid.UUID(str(inv.get("id"))))
        except ValueError:
            raise CommandError(f"invalid flags for filtering virtual networks: {inv.get('id')} is not a "
                               f"valid virtual network ID: invalid UUID length: {len(str(inv.get('id')))}"
                               ) from None
    if inv.get("name"):
        params["name"] = str(inv.get("name"))
    if "is-default" in inv.flags:
        params["is_default"] = "true" if inv.flags["is-default"] else "false"
    params["is_deleted"] = "true" if inv.get("show-deleted") else "false"
    vnets = list_vnets(ctx, params)
    if _rendered_or_empty(ctx, vnets, "No virtual networks were found for the given filter flags. You can "
                          "use 'cloudflared tunnel vnet add' to add a virtual network.\n"):
        return 0
    lines = ["ID\tNAME\tIS DEFAULT\tCOMMENT\tCREATED\tDELETED\t"]
    for v in vnets:
        deleted = "-" if v.deleted_at == cfapi.ZERO_TIME else cfapi.go_rfc3339(v.deleted_at)
        lines.append(f"{v.id}\t{v.name}\t{'true' if v.is_default else 'false'}\t{v.comment}\t"
                     f"{cfapi.go_rfc3339(v.created_at)}\t{deleted}\t")
    ctx.out.write(tabwrite(lines))
    return 0


def vnet_delete(ctx: Context) -> int:
    inv = ctx.inv
    if not inv.args:
        raise CommandError("You must supply exactly one argument, either the ID or name of the virtual "
                           "network to delete")
    vnet_id = find_vnet_id(ctx, inv.args[0])
    _api_do(ctx, "API error", lambda api: api.call(api.client.delete_vnet(vnet_id, bool(inv.get("force"))),
                                                   "delete virtual network"))
    ctx.out.write(f"Successfully deleted virtual network '{inv.args[0]}'\n")
    return 0


def vnet_update(ctx: Context) -> int:
    inv = ctx.inv
    if len(inv.args) != 1:
        raise CommandError(" You must supply exactly one argument, either the ID or (current) name of the "
                           "virtual network to update")
    vnet_id = find_vnet_id(ctx, inv.args[0])
    updates: dict[str, Any] = {}
    if "name" in inv.flags:
        updates["name"] = str(inv.flags["name"])
    if "comment" in inv.flags:
        updates["comment"] = str(inv.flags["comment"])
    if "default" in inv.flags:
        updates["is_default_network"] = bool(inv.flags["default"])
    _api_do(ctx, "API error", lambda api: api.call(api.client.update_vnet(vnet_id, updates),
                                                   "update virtual network"))
    ctx.out.write(f"Successfully updated virtual network '{inv.args[0]}'\n")
    return 0


def diag_command(ctx: Context) -> int:
    """`tunnel diag`: collects from a running connector's metrics server (connector.diag)."""
    if ctx.inv.get("diag-container-id") or ctx.inv.get("diag-pod-id"):
        raise CommandError("--diag-container-id and --diag-pod-id are not available in the lab: run `tunnel "
                           "diag` where the connector runs")
    return diag.run(ctx.inv)


COMMANDS: dict[str, Callable[[Context], int]] = {
    "login": login, "create": create, "list": list_tunnels, "info": info, "delete": delete,
    "cleanup": cleanup, "token": token, "route dns": route_dns, "route lb": route_lb,
    "route ip add": route_ip_add, "route ip show": route_ip_show,
    "route ip delete": route_ip_delete, "route ip get": route_ip_get, "vnet add": vnet_add,
    "vnet list": vnet_list, "vnet delete": vnet_delete, "vnet update": vnet_update, "diag": diag_command,
}


def usage_error_text(message: str, prog: str, name: str) -> str:
    """cliutil.UsageError's text: the message, then where help is (`route dns` is named without `tunnel`)."""
    full = name if name.startswith("route ") else f"tunnel {name}"
    return f"{message}\nSee '{prog} {full} --help'."


def run(inv: Invocation, *, prog: str, out: TextIO | None = None,
        transport: Transport = https_transport) -> int:
    """Run one admin command; prints errors as cloudflared does and returns the exit code."""
    ctx = Context(inv=inv, out=out or sys.stdout, transport=transport)
    try:
        return COMMANDS[inv.name](ctx)
    except CommandUsageError as exc:
        print(usage_error_text(str(exc), prog, inv.name), file=sys.stderr)
        return USAGE_EXIT
    except UsageError as exc:
        print(f"Incorrect Usage. {exc.message}", file=sys.stderr)
        return 1
    except TunnelLabError as exc:
        print(str(exc), file=sys.stderr)
        return 1


_USAGE = {
    "login": ("Generate a configuration file with your login details", "login"),
    "create": ("Create a new tunnel with given name", "create [subcommand options] NAME"),
    "list": ("List existing tunnels", "list [subcommand options]"),
    "info": ("List details about the active connectors for a tunnel", "info [subcommand options] [TUNNEL]"),
    "delete": ("Delete existing tunnel by UUID or name", "delete [subcommand options] TUNNEL"),
    "cleanup": ("Cleanup tunnel connections", "cleanup [subcommand options] TUNNEL"),
    "token": ("Fetch the credentials token for an existing tunnel (by name or UUID) that allows to run it",
              "token [subcommand options] TUNNEL"),
    "diag": ("Creates a diagnostic report from a local cloudflared instance", "diag [subcommand options]"),
    "vnet": ("Configure and query virtual networks to manage private IP routes with overlapping IPs.",
             "vnet add|list|delete|update [subcommand options] [NAME|ID]"),
    "route": ("Define which traffic routed from Cloudflare edge to this tunnel",
              "route [dns TUNNEL HOSTNAME]|[lb TUNNEL HOSTNAME LB-POOL]|[ip add NETWORK TUNNEL [COMMENT]]"
              "|[ip show]|[ip delete ID|NETWORK]|[ip get IP]"),
}
_FLAG_HELP = {
    "metrics": "The metrics address of the instance (default: search localhost:20241-20245)",
    "diag-container-id": "Container ID or name (not in the lab)",
    "diag-pod-id": "Kubernetes pod (not in the lab)",
    "no-diag-logs": "Log collection will not be performed",
    "no-diag-metrics": "Metric collection will not be performed",
    "no-diag-system": "System information collection will not be performed",
    "no-diag-runtime": "Runtime information collection will not be performed",
    "no-diag-network": "Network diagnostics will not be performed (not available in the lab)",
    "output": "Render output using given FORMAT: 'json' or 'yaml'",
    "credentials-file": "Filepath at which to read/write the tunnel credentials",
    "secret": "Base64 encoded secret (at least 32 bytes decoded); random when not given",
    "show-deleted": "Include deleted tunnels in the list",
    "name": "List tunnels with the given NAME",
    "name-prefix": "List tunnels whose name starts with the given prefix",
    "exclude-name-prefix": "List tunnels whose name does not start with the given prefix",
    "when": "Accepted and ignored, as by cloudflared",
    "id": "List tunnel by ID",
    "show-recently-disconnected": "Include connections that have recently disconnected",
    "sort-by": "Sort by the given field",
    "invert-sort": "Invert the sort order",
    "force": "Delete even with live connections (the API's cascade)",
    "connector-id": "Only the connections of this connector (UUID)",
    "overwrite-dns": "Overwrite an existing DNS record for this hostname",
    "vnet": "The ID or name of the virtual network",
    "default": "Make it the account's default virtual network",
    "comment": "A new comment",
    "is-default": "Only the default (true) or the others (false)",
    "loginURL": "The URL used to login",
    "callbackURL": "The URL used for the callback",
    "fedramp": "Login with FedRAMP High environment (not in the lab)",
}


def help_text(words: Sequence[str], prog: str) -> str:
    """Help for an admin command as urfave/cli lays it out: name, usage, its own flags."""
    usage, form = _USAGE.get(words[0], ("", words[0]))
    positional = [w for w in words[:4] if not w.startswith("-")]
    key = " ".join(positional[:3])
    flags = next((v for k, v in sorted(SUBCOMMAND_FLAGS.items(), key=lambda kv: -len(kv[0]))
                  if key.startswith(k)), ())
    lines = ["NAME:", f"  {prog} tunnel {words[0]} - {usage}", "", "USAGE:",
             f"  {prog} tunnel [tunnel command options] {form}", "", "SUBCOMMAND OPTIONS:"]
    rows = [(", ".join(("--" if len(n) > 1 else "-") + n for n in flag.names), _FLAG_HELP.get(flag.name, ""))
            for flag in flags]
    rows.append(("--help, -h", "show help"))
    width = max(len(r[0]) for r in rows) + 2
    lines += [f"  {names.ljust(width)}{text}" for names, text in rows]
    return "\n".join(lines) + "\n"

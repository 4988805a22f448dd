"""`tunnel-lab connector tail [flags] [TUNNEL-ID]`: cloudflared's `tail`, streaming a connector's logs.

As cloudflared: a management token (`--token`, else `POST .../cfd_tunnel/ID/management/logs` with the
origin certificate), then a WebSocket to `wss://MANAGEMENT-HOSTNAME/logs?access_token=T[&connector_id=C]`
(TLS with the system trust: in `tunnel-lab sandbox` the lab CA, and the edge routes the hostname to the
connector), a `start_streaming` event with the filters, and one printed line a log event:
`TIME LEVEL EVENT MESSAGE FIELDS-JSON` (or the event's JSON with `--output json`). Problems are logged
to stderr and the exit code stays 0, as cloudflared's tail does; `tail token TUNNEL-ID` prints
`{"token":"..."}`.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import quote, urlencode

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from tunnel_lab.connector import admin, cfapi
from tunnel_lab.connector.flags import Flag, UsageError, parse_level
from tunnel_lab.connector.logging_setup import setup_logging
from tunnel_lab.connector.management import (
    EVENTS,
    LEVELS,
    MANAGEMENT_HOSTNAME,
    ManagementError,
    parse_management_token,
)
from tunnel_lab.wire.errors import TunnelLabError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0


def _flag(name: str, kind: str, *env: str, default: Any = None, aliases: tuple[str, ...] = ()) -> Flag:
    return Flag(name=name, kind=kind, levels="L", env=tuple(env), aliases=aliases, default=default)


TAIL_FLAGS = (
    _flag("connector-id", "str", "TUNNEL_MANAGEMENT_CONNECTOR", default=""),
    _flag("event", "slice", "TUNNEL_MANAGEMENT_FILTER_EVENTS", default=()),
    _flag("level", "str", "TUNNEL_MANAGEMENT_FILTER_LEVEL", default="debug"),
    _flag("sample", "str", "TUNNEL_MANAGEMENT_FILTER_SAMPLE", default="1.0"),
    _flag("token", "str", "TUNNEL_MANAGEMENT_TOKEN", default=""),
    _flag("management-hostname", "str", "TUNNEL_MANAGEMENT_HOSTNAME", default=MANAGEMENT_HOSTNAME),
    _flag("trace", "str", default=""),
    _flag("loglevel", "str", "TUNNEL_LOGLEVEL", default="info"),
    _flag("origincert", "str", "TUNNEL_ORIGIN_CERT", default=""),
    _flag("output", "str", "TUNNEL_MANAGEMENT_OUTPUT", "TUNNEL_LOG_OUTPUT", default="default"),
    _flag("api-url", "str", "TUNNEL_API_URL", default=cfapi.DEFAULT_API_URL),
)
_BY_NAME = {n: f for f in TAIL_FLAGS for n in f.names}


@dataclass(frozen=True)
class TailOptions:
    values: dict[str, Any]
    args: list[str]
    subcommand: str | None = None  # "token"

    def get(self, name: str) -> Any:
        return self.values.get(name, _BY_NAME[name].default)


def parse_tail(argv: Sequence[str], env: Mapping[str, str]) -> TailOptions:
    """Flags (command line > environment > default) and arguments; `tail token ID` too."""
    parsed = parse_level(argv, "L", defined=_BY_NAME)
    if parsed.help:
        raise UsageError("", help_for="tail")
    values = dict(parsed.values)
    for flag in TAIL_FLAGS:
        if flag.name in values:
            continue
        hit = next((e for e in flag.env if e in env), None)
        if hit is not None:
            values[flag.name] = [v for v in env[hit].split(",") if v] if flag.kind == "slice" else env[hit]
    args = list(parsed.args)
    sub = None
    if args and args[0] == "token":
        sub, args = "token", args[1:]
    return TailOptions(values=values, args=args, subcommand=sub)


def parse_filters(opts: TailOptions) -> dict[str, Any] | None:
    """cloudflared's parseFilters -> the `filters` object of start_streaming (None: no filters)."""
    level = str(opts.get("level") or "")
    events = [str(e) for e in (opts.get("event") or ())]
    try:
        sample = float(opts.get("sample"))
    except (TypeError, ValueError):
        raise ManagementError(f'invalid value "{opts.get("sample")}" for flag -sample: parse error') from None
    if level and level not in LEVELS:
        raise ManagementError("invalid --level filter provided, please use one of the following Log Levels: "
                              "debug, info, warn, error")
    if any(e not in EVENTS for e in events):
        raise ManagementError("invalid --event filter provided, please use one of the following EventTypes: "
                              "cloudflared, http, tcp, udp")
    if sample <= 0.0 or sample > 1.0:
        raise ManagementError("invalid --sample value provided, please make sure it is in the range "
                              "(0.0 .. 1.0)")
    if not level and not events and sample != 1.0:
        return None
    out: dict[str, Any] = {}
    if events:
        out["events"] = events
    if level:
        out["level"] = level
    out["sampling"] = int(sample) if sample == int(sample) else sample
    return out


def management_token(opts: TailOptions) -> str:
    """cliutil.GetManagementToken: the origin certificate's API token asks the API for a logs token."""
    cert, _ = admin.read_origin_cert(str(opts.get("origincert")) or None)
    if not opts.args or not opts.args[0]:
        raise cfapi.ApiError("no tunnel ID provided")
    try:
        tunnel_id = uuid.UUID(opts.args[0])
    except ValueError as exc:
        raise cfapi.ApiError(f"unable to parse provided tunnel id as a valid UUID: invalid UUID length: "
                             f"{len(opts.args[0])}") from exc
    api = admin.Api(cfapi.ApiClient(str(opts.get("api-url")), cert.account_id, cert.zone_id), cert.api_token)
    token = api.call(api.client.management_token(tunnel_id, "logs"), "get tunnel token")
    if not isinstance(token, str):
        raise cfapi.ApiError("the Cloudflare API response was an unexpected type")
    return token


def build_target(opts: TailOptions, token: str) -> tuple[str, str]:
    """(host, target) of the WebSocket: `/logs?access_token=T[&connector_id=C]` (keys sorted, as Go)."""
    try:
        claims = parse_management_token(token)
    except ManagementError as exc:
        raise ManagementError(f"failed to determine if token is FED: {exc}") from None
    host = "management.fed.argotunnel.com" if claims.issuer == "fed-tunnelstore" else \
        str(opts.get("management-hostname"))
    query = [("access_token", token)]
    connector = str(opts.get("connector-id") or "")
    if connector:
        try:
            query.append(("connector_id", str(uuid.UUID(connector))))
        except ValueError:
            raise ManagementError("unabled to parse 'connector-id' flag into a valid UUID: invalid UUID "
                                  f"length: {len(connector)}") from None
    return host, "/logs?" + urlencode(query, quote_via=quote)


def _go_json(value: Any) -> str:
    """json.Marshal's text: keys sorted, compact, `<`, `>` and `&` escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def format_line(event: Mapping[str, Any]) -> str:
    """printLine: `TIME LEVEL EVENT MESSAGE FIELDS` (absent level and event are debug and cloudflared)."""
    fields = event.get("fields")
    return (f"{event.get('time', '')} {event.get('level') or 'debug'} {event.get('event') or 'cloudflared'} "
            f"{event.get('message', '')} {_go_json(fields if fields else None)}")


def format_json(event: Mapping[str, Any]) -> str:
    """printJSON: the event with Go's field order and omitempty."""
    doc: dict[str, Any] = {}
    for key in ("time", "level", "message", "event", "fields"):
        value = event.get(key)
        if value not in (None, "", {}):
            doc[key] = value
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


async def stream_logs(host: str, target: str, filters: dict[str, Any] | None, *, output: str, out: TextIO,
                      trace: str = "", port: int = 443, ssl_context: ssl.SSLContext | None = None) -> None:
    """Dial the management WebSocket, start streaming, print events until the server closes."""
    ctx = ssl_context or ssl.create_default_context()
    with trio.fail_after(CONNECT_TIMEOUT):
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ctx, https_compatible=True)
    ws = WSConnection(ConnectionType.CLIENT)
    headers = [(b"User-Agent", admin.USER_AGENT.encode())]
    if trace:
        headers.append((b"cf-trace-id", trace.encode()))
    async with stream:
        await stream.send_all(ws.send(Request(host=host, target=target, extra_headers=headers)))
        reject: tuple[int, bytes] | None = None
        accepted = False
        parts: list[str] = []
        while True:
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                    start: dict[str, Any] = {"type": "start_streaming"}
                    if filters is not None:
                        start["filters"] = filters
                    await stream.send_all(ws.send(TextMessage(data=json.dumps(start, separators=(",", ":")))))
                    log.debug("connected connector-id= filters=%s", json.dumps(filters))
                elif isinstance(event, RejectConnection):
                    reject = (event.status_code, b"")
                    if not event.has_body:
                        _validation_error(*reject)
                        return
                elif isinstance(event, RejectData):
                    assert reject is not None
                    reject = (reject[0], reject[1] + bytes(event.data))
                    if event.body_finished:
                        _validation_error(*reject)
                        return
                elif isinstance(event, Ping):
                    await stream.send_all(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if event.code != 1000:
                        log.error("received remote closure: (%d) %s", event.code, event.reason or "")
                    return
                elif isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        _print_event("".join(parts), output, out)
                        parts = []
                elif isinstance(event, BytesMessage):
                    log.error("unable to read event from server error=%s",
                              json.dumps("invalid message type was provided"))
                    return
            data = await stream.receive_some(65536)
            if not data:
                if not accepted:
                    log.error("unable to start management log streaming session error=%s",
                              json.dumps("failed to WebSocket dial: unexpected EOF"))
                return
            ws.receive_data(bytes(data))


def _print_event(text: str, output: str, out: TextIO) -> None:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        log.error("unable to read event from server error=%s", json.dumps(str(exc)))
        return
    if not isinstance(doc, dict) or doc.get("type") != "logs":
        log.debug("unexpected log event type: %s", doc.get("type") if isinstance(doc, dict) else "")
        return
    for event in doc.get("logs") or []:
        if isinstance(event, dict):
            out.write((format_json(event) if output == "json" else format_line(event)) + "\n")
    out.flush()


def _validation_error(status: int, body: bytes) -> None:
    """handleValidationError: what the server said instead of switching protocols."""
    if status == 530:
        log.error("no cloudflared connector available or reachable via management request (a recent version "
                  "of cloudflared is required to use streaming logs)")
    try:
        doc = json.loads(body)
    except ValueError:
        log.error("unable to start management log streaming session: http response code returned %d", status)
        return
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list) or not errors or doc.get("success"):
        log.error("management tunnel validation returned success with invalid HTTP response code to convert "
                  "to a WebSocket request")
        return
    for err in errors:
        if isinstance(err, dict):
            log.error("management request failed validation: (%s) %s", err.get("code", 0),
                      err.get("message", ""))


def main(argv: Sequence[str], *, prog: str = "tunnel-lab connector", out: TextIO | None = None) -> int:
    """`tail ...`; 0 even when streaming could not start (cloudflared logs the reason and returns nil)."""
    out = out or sys.stdout
    try:
        opts = parse_tail(argv, os.environ)
    except UsageError as exc:
        if exc.message:
            print(f"Incorrect Usage. {exc.message}\n", file=sys.stderr)
        print(help_text(prog), file=sys.stderr if exc.message else sys.stdout)
        return 1 if exc.message else 0
    output = str(opts.get("output") or "default")
    setup_logging(str(opts.get("loglevel")), output="json" if output == "json" else "default")
    if output not in ("default", "json"):
        log.error("error=%s", json.dumps("invalid --output value provided, please make sure it is one of: "
                                         "default, json"))
        output = "default"
    if opts.subcommand == "token":
        try:
            token = management_token(opts)
        except TunnelLabError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        out.write(json.dumps({"token": token}) + "\n")
        return 0
    try:
        filters = parse_filters(opts)
    except ManagementError as exc:
        log.error("invalid filters provided error=%s", json.dumps(str(exc)))
        return 0
    try:
        token = str(opts.get("token") or "") or management_token(opts)
        host, target = build_target(opts, token)
    except (TunnelLabError, ManagementError) as exc:
        text = str(exc) if isinstance(exc, ManagementError) else \
            f"unable to acquire management token for requested tunnel id: {exc}"
        log.error("unable to construct management request URL error=%s", json.dumps(text))
        return 0
    try:
        trio.run(lambda: stream_logs(host, target, filters, output=output, out=out,
                                     trace=str(opts.get("trace") or "")))
    except KeyboardInterrupt:
        return 0
    except (OSError, trio.TooSlowError, ssl.SSLError) as exc:
        log.error("unable to start management log streaming session error=%s",
                  json.dumps(str(exc) or "timeout"))
    return 0


def help_text(prog: str) -> str:
    lines = ["NAME:", f"   {prog} tail - Stream logs from a remote cloudflared", "", "USAGE:",
             f"   {prog} tail [tail command options] [TUNNEL-ID]", "", "OPTIONS:"]
    lines += [f"   --{f.name}" for f in TAIL_FLAGS]
    return "\n".join(lines) + "\n"

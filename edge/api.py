"""The management API (`--api-listen`): JSON over HTTP/1.1, bearer token from STATE/api-token.

Routes are the table in docs/architecture.md ("Management API"); docs/edge.md shows examples.
"""

from __future__ import annotations

import hmac
import json
import logging
import urllib.parse
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

import h11
import trio
from h2.errors import ErrorCodes

from tunnel_lab.edge import v4api
from tunnel_lab.edge.live import serve_live
from tunnel_lab.edge.state import EdgeState, connection_json, parse_fault
from tunnel_lab.edge.tunnel import TunnelConnection
from tunnel_lab.wire.errors import ConfigError, TunnelLabError

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 32  # a fault body is one object deep; anything far deeper is an attack on the parser


class EdgeControl(Protocol):
    """What the management API may do to the running edge beyond its shared state (`edge.server.Edge`)."""

    @property
    def api_token(self) -> str: ...
    @property
    def ca_pem_path(self) -> Path: ...
    def locations(self) -> Collection[str]: ...
    async def dc_down(self, location: str) -> int: ...
    async def dc_up(self, location: str) -> None: ...
    def swap_cert(self, location: str, kind: str) -> None: ...
    @property
    def udp_forwards(self) -> list[dict[str, str]]: ...
    async def start_udp_forward(self, listen: tuple[str, int], dest: tuple[str, int], *,
                                drop_every: int = 0) -> dict[str, str]: ...
    def processes(self) -> list[dict[str, Any]]: ...
    async def refresh(self) -> None:
        """Before each request: bring the shared state up to date (a multi-process edge pulls it in)."""
    async def publish(self) -> None:
        """After each changing request: hand what changed to whoever acts on it (a multi-process edge's
        workers)."""


class ApiError(TunnelLabError):
    """An API answer other than 200."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_json(body: bytes) -> Any:
    """A request body as JSON: 400 for bad JSON, nesting deeper than MAX_JSON_DEPTH, NaN or infinities."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:  # nesting is checked before the parser recurses into it
        if in_string:
            escaped = not escaped and byte == 0x5C
            in_string = escaped or byte != 0x22
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    if deepest > MAX_JSON_DEPTH:
        raise ApiError(400, f"body is nested {deepest} deep; at most {MAX_JSON_DEPTH} levels")

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(body or b"null", parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"body is not JSON: {exc}") from None


async def apply_fault(edge: EdgeState[TunnelConnection], control: EdgeControl, body: Any) -> dict[str, Any]:
    """Validate and apply a POST /faults body; returns the answer."""
    kind, params = parse_fault(body)
    edge.metrics.faults.inc(kind=kind)
    selector: dict[str, Any] = {k: params[k] for k in ("connection", "tunnel_id", "conn_index", "location")
                                if k in params}
    if kind in ("drop-connection", "goaway", "reset-streams", "quic-idle"):
        if not selector:
            raise ConfigError(f"fault {kind} needs a selector: connection, tunnel_id (+conn_index) or "
                              "location", source="POST /faults")
        conns = edge.registry.select(selector)
        fault_id = edge.faults.new_id()
        affected = 0
        for conn in conns:
            if kind == "drop-connection":
                log.warning("fault drop-connection: id=%s closing TCP %s", fault_id, conn.ident())
                conn.abort("dropped by a fault")
                affected += 1
            elif kind == "goaway":
                code = int(params.get("error_code", ErrorCodes.NO_ERROR))
                log.warning("fault goaway: id=%s error_code=%d %s", fault_id, code, conn.ident())
                await conn.send_goaway(code)
                affected += 1
            elif kind == "quic-idle":
                if _silence(conn, f"quic-idle id={fault_id}"):
                    affected += 1
            else:
                n = await conn.reset_all_streams()
                log.warning("fault reset-streams: id=%s reset %d streams %s", fault_id, n, conn.ident())
                affected += n
        return {"id": fault_id, "kind": kind, "connections": [c.id for c in conns], "affected": affected}
    if kind in ("dc-down", "dc-up", "swap-cert", "quic-blackhole"):
        location = params["location"]
        if location not in control.locations():
            raise ApiError(404, f"no data centre {location!r}; known: {', '.join(control.locations())}")
    if kind == "dc-down":
        for old in edge.faults.of_kind("dc-down"):
            if old.params.get("location") == location:
                return {**old.to_json(), "closed": 0}
        closed = await control.dc_down(location)
        fault = edge.faults.add("dc-down", {"location": location})
        return {**fault.to_json(), "closed": closed}
    if kind == "quic-blackhole":
        for old in edge.faults.of_kind("quic-blackhole"):
            if old.params.get("location") == location:
                return {**old.to_json(), "silenced": 0}
        fault = edge.faults.add("quic-blackhole", {"location": location})
        silenced = sum(_silence(c, f"quic-blackhole id={fault.id}") for c in edge.registry.all()
                       if c.location == location)
        return {**fault.to_json(), "silenced": silenced}
    if kind == "dc-up":
        for old in edge.faults.of_kind("dc-down"):
            if old.params.get("location") == location:
                edge.faults.remove(old.id)
        await control.dc_up(location)
        return {"id": edge.faults.new_id(), "kind": kind, "location": location}
    if kind == "swap-cert":
        for old in edge.faults.of_kind("swap-cert"):
            if old.params.get("location") == location:
                edge.faults.remove(old.id)
        control.swap_cert(location, params["cert"])
        if params["cert"] == "valid":
            log.warning("fault swap-cert: location=%s serves the valid edge certificate again", location)
            return {"id": edge.faults.new_id(), "kind": kind, **params}
        return edge.faults.add("swap-cert", params).to_json()
    count = params.pop("count", None)
    return edge.faults.add(kind, params, remaining=count).to_json()


def _silence(conn: TunnelConnection, why: str) -> bool:
    """Silence a QUIC connection (faults quic-idle, quic-blackhole); http2 ones (no `silence`) are left be."""
    silence = getattr(conn, "silence", None)
    if silence is None:
        return False
    silence(why)
    return True


async def clear_fault(edge: EdgeState[TunnelConnection], control: EdgeControl,
                      fault_id: str | None) -> list[str]:
    """DELETE /faults[/ID]: undo what the faults did (listeners up, valid certificates)."""
    targets = list(edge.faults.active.values()) if fault_id is None else (
        [edge.faults.active[fault_id]] if fault_id in edge.faults.active else [])
    if fault_id is not None and not targets:
        raise ApiError(404, f"no active fault {fault_id!r}")
    for fault in targets:
        edge.faults.remove(fault.id)
        if fault.kind == "dc-down":
            await control.dc_up(fault.params["location"])
        elif fault.kind == "swap-cert":
            control.swap_cert(fault.params["location"], "valid")
    return [f.id for f in targets]


async def route(edge: EdgeState[TunnelConnection], control: EdgeControl, method: str, target: str,
                body: bytes) -> tuple[int, str, bytes]:
    """Dispatch one authenticated request: (status, content type, body)."""
    await control.refresh()
    try:
        return await _route(edge, control, method, target, body)
    finally:
        if method != "GET":
            await control.publish()


async def _route(edge: EdgeState[TunnelConnection], control: EdgeControl, method: str, target: str,
                 body: bytes) -> tuple[int, str, bytes]:
    url = urllib.parse.urlsplit(target)
    path = url.path.rstrip("/") or "/"
    query = urllib.parse.parse_qs(url.query)

    def ok(value: Any, status: int = 200) -> tuple[int, str, bytes]:
        return status, "application/json", (json.dumps(value, indent=1) + "\n").encode()

    if path.startswith(("/accounts/", "/client/v4/accounts/")):
        return _access_api(edge, method, path, body)
    if path.startswith(("/zones/", "/client/v4/zones/")):
        from tunnel_lab.edge.waf import gate_of
        from tunnel_lab.lab.waf_store import handle

        parts = path.removeprefix("/client/v4").strip("/").split("/")
        status, answer = handle(gate_of(edge).store, method, parts[2:], body)
        return status, "application/json", (json.dumps(answer, indent=1) + "\n").encode()
    if method == "GET" and path.startswith("/access/transfers/"):
        return ok(await _access_transfer(edge, "/transfer/" + path[len("/access/transfers/"):], query))
    if method == "GET":
        if path == "/ca":
            return 200, "application/x-pem-file", control.ca_pem_path.read_bytes()
        if path == "/tunnels":
            return ok([t.as_dict() for t in edge.tunnels.store.list_tunnels()])
        if path == "/routes":
            return ok([r.as_dict() for r in edge.tunnels.store.list_routes()])
        if path == "/connections":
            return ok([connection_json(c) for c in edge.registry.listed()])
        if path.startswith("/config/"):
            tunnel_id = path[len("/config/"):]
            config = edge.pushed_configs.get(tunnel_id)
            if config is None:
                raise ApiError(404, f"no configuration pushed for tunnel {tunnel_id}")
            return 200, "application/json", config
        if path == "/history":
            try:
                since = int(query.get("since", ["0"])[0])
            except ValueError:
                raise ApiError(400, "since must be an integer") from None
            return ok(edge.history.since(since))
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", edge.metrics.render(edge.registry).encode()
        if path == "/faults":
            return ok([f.to_json() for f in edge.faults.active.values()])
        if path == "/processes":
            return ok(control.processes())
    elif method == "POST" and path.startswith("/tunnels/") and path.endswith("/configuration"):
        return ok(await _push_configuration(edge, path[len("/tunnels/"):-len("/configuration")],
                                            parse_json(body)))
    elif method == "POST" and path == "/udp-forwards":
        return ok(await _udp_forward(control, parse_json(body)), 201)
    elif method == "POST" and path == "/faults":
        applied = await apply_fault(edge, control, parse_json(body))
        edge.faults.note_applied(applied)
        return ok(applied)
    elif method == "DELETE" and (path == "/faults" or path.startswith("/faults/")):
        fault_id = path[len("/faults/"):] if path.startswith("/faults/") else None
        return ok({"cleared": await clear_fault(edge, control, fault_id)})
    raise ApiError(404 if method in ("GET", "POST", "DELETE") else 405, f"no route {method} {path}")


def _access_api(edge: EdgeState[TunnelConnection], method: str, path: str,
                body: bytes) -> tuple[int, str, bytes]:
    """`/accounts/{account}/access/...` (also under `/client/v4`): lab.access_api in the v4 envelope."""
    from tunnel_lab.edge.access import api_login_codes, gate_of
    from tunnel_lab.lab.access_api import handle

    parts = path.removeprefix("/client/v4").strip("/").split("/")
    if len(parts) < 3 or parts[2] != "access":
        raise ApiError(404, f"no route {method} {path}")
    status, answer = handle(gate_of(edge).access, parts[1], method, parts[3:], body,
                            login_codes=lambda: api_login_codes(edge))
    return status, "application/json", (json.dumps(answer, indent=1) + "\n").encode()


async def _access_transfer(edge: EdgeState[TunnelConnection], path: str,
                           query: dict[str, list[str]]) -> dict[str, Any]:
    """`GET /access/transfers/KEY[?wait=S]`: `cloudflared access login`'s sealed tokens, for a transfer
    service outside the edge (the sandbox's login.cloudflareaccess.org); `{"pending": true}` if none came
    within S seconds (default 45, at most 55)."""
    from tunnel_lab.edge import access_cli
    from tunnel_lab.edge.access import gate_of

    key = access_cli.transfer_key_of_path(path)
    if key is None:
        raise ApiError(404, "no such transfer: the key is not a URL-safe base64 public key")
    try:
        wait = min(max(float(query.get("wait", ["45"])[0]), 0.0), 55.0)
    except ValueError:
        raise ApiError(400, "wait must be a number of seconds") from None
    answer: dict[str, Any] = await access_cli.api_transfer(gate_of(edge), key, wait)
    return answer


def _declared_length(request: h11.Request) -> int:
    value = dict(request.headers).get(b"content-length", b"0")
    return int(value) if value.isdigit() else 0


async def _answer(stream: trio.abc.Stream, conn: h11.Connection, status: int, ctype: str, payload: bytes,
                  *, close: bool = False) -> None:
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="tunnel-lab"'))
    if close:
        headers.append((b"connection", b"close"))
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=payload)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def handle_api_connection(edge: EdgeState[TunnelConnection], control: EdgeControl,
                                tcp: trio.SocketStream, peer: tuple[str, int]) -> None:
    """Serve management API requests on one connection (keep-alive), plain HTTP or HTTPS under the lab
    CA: the first byte tells (a TLS handshake record starts with 0x16), so one port serves both."""
    stream: trio.abc.Stream = tcp
    try:
        with trio.fail_after(30):
            stream = await v4api.maybe_tls(edge, tcp)
    except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
        log.debug("api connection ended before its first request: %r remote=%s:%d", exc, *peer)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        return
    conn = h11.Connection(h11.SERVER)
    expected = f"Bearer {control.api_token}".encode()
    limit = edge.config.api_max_body
    try:
        while True:
            request: h11.Request | None = None
            body = bytearray()
            with trio.move_on_after(60) as idle:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(bytes(data))
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > limit:
                            break  # answered 413 below, then the connection is closed
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
                    if request is not None and _declared_length(request) > limit:
                        break  # no need to read what will not be accepted
            if idle.cancelled_caught or request is None:
                return
            if len(body) > limit or _declared_length(request) > limit:
                log.warning("api request body over %d bytes: 413 (limit api_max_body) remote=%s:%d", limit,
                            *peer)
                await _answer(stream, conn, 413, "application/json",
                              (json.dumps({"error": f"body over {limit} bytes"}) + "\n").encode(), close=True)
                return
            method = request.method.decode()
            target = request.target.decode("latin-1")
            if target == "/live" or target.startswith(("/live?", "/live/")):
                if not await serve_live(edge, list(control.locations()), control.api_token, request,
                                        stream, conn):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
                continue
            auth = dict(request.headers).get(b"authorization", b"")
            try:
                if v4api.is_v4_target(target):  # cert.pem tokens, not the management token: edge/v4api.py
                    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
                    status, ctype, payload = await v4api.answer(edge, method, target, headers, bytes(body))
                elif target.split("?")[0] == "/healthz" and method == "GET":
                    status, ctype, payload = 200, "application/json", b'{"status":"ok"}\n'
                elif not hmac.compare_digest(bytes(auth), expected):
                    raise ApiError(401, "missing or wrong bearer token (see STATE/api-token)")
                else:
                    status, ctype, payload = await route(edge, control, method, target, bytes(body))
            except ApiError as exc:
                status, ctype = exc.status, "application/json"
                payload = (json.dumps({"error": exc.message}) + "\n").encode()
            except (ConfigError, TunnelLabError, KeyError, ValueError) as exc:
                status, ctype = 400, "application/json"
                payload = (json.dumps({"error": str(exc)}) + "\n").encode()
            except Exception as exc:  # a bug: still an answer, and the connection stays usable
                log.exception("api %s %s failed remote=%s:%d", method, target, *peer)
                status, ctype = 500, "application/json"
                payload = (json.dumps({"error": f"internal error: {exc!r}"}) + "\n").encode()
            log.debug("api %s %s -> %d remote=%s:%d", method, target, status, *peer)
            await _answer(stream, conn, status, ctype, payload)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
            ApiError) as exc:
        log.debug("api connection ended: %s", exc)
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


MAX_UDP_FORWARDS = 64


async def _udp_forward(edge: EdgeControl, body: Any) -> dict[str, str]:
    """`POST /udp-forwards {"destination": "IP:PORT", "listen": "127.0.0.1:0"}`: a new UDP port."""
    from tunnel_lab.edge.udp import parse_forward

    if not isinstance(body, dict) or not isinstance(body.get("destination"), str):
        raise ApiError(400, 'body must be {"destination": "IP:PORT"} (and optionally "listen")')
    listen = body.get("listen", "127.0.0.1:0")
    if not isinstance(listen, str):
        raise ApiError(400, "listen must be a string IP:PORT")
    try:
        bind, dest = parse_forward(f"{listen}={body['destination']}")
    except ValueError as exc:
        raise ApiError(400, f"bad udp forward: {exc}") from None
    drop_every = body.get("drop_every", 0)
    if not isinstance(drop_every, int) or isinstance(drop_every, bool) or not 0 <= drop_every <= 1_000_000:
        raise ApiError(400, "drop_every must be an integer 0..1000000 (0: no loss)")
    if len(edge.udp_forwards) >= MAX_UDP_FORWARDS:
        raise ApiError(409, f"at most {MAX_UDP_FORWARDS} UDP forwards")
    try:
        return await edge.start_udp_forward(bind, dest, drop_every=drop_every)
    except OSError as exc:
        raise ApiError(409, f"cannot listen on {listen}: {exc.strerror or exc}") from None


async def _push_configuration(edge: EdgeState[TunnelConnection], tunnel_id: str,
                              body: Any) -> list[dict[str, Any]]:
    """`POST /tunnels/ID/configuration {"version": N, "config": {...}}`: push to every running connector
    of the tunnel (one connection each; over QUIC the updateConfiguration RPC, over http2 an
    update-configuration stream), as Cloudflare pushes a remotely managed configuration. One result
    per connector: `connection`, `connector_id`, `lastAppliedVersion`, `err`; [] with none running."""
    from tunnel_lab.edge.remote_config import push_to_connectors

    if (not isinstance(body, dict) or not isinstance(body.get("version"), int)
            or isinstance(body.get("version"), bool) or "config" not in body):
        raise ApiError(400, 'body must be {"version": N, "config": {...}}')
    if not -2**31 <= body["version"] < 2**31:
        raise ApiError(400, "version must fit in a signed 32-bit integer")
    return await push_to_connectors(edge, tunnel_id, body["version"], body["config"])

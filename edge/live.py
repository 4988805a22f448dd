"""The live view: a web page on the management port showing the running lab as it changes.

`GET /live` serves one HTML page (no build step: plain HTML, CSS and JavaScript in `live.html`);
`GET /live/events` is a server-sent event stream the page listens to:

- `state`: a snapshot of data centres, tunnels, connections (state, age, streams in flight) and
  faults, sent when it differs from the last one sent (checked every `POLL` seconds);
- `request`: one history entry per request that crossed the edge, as `GET /history` gives it;
- `fault`: one entry per fault applied through the API, one-shot ones included.

`GET /live/trace?ray=ID` gives the trace records the edge kept for one request (when it runs with
`--trace`: the tracer's `RayRing`) and the steps of its sequence diagram (`wire.trace_sequence`, which
`tunnel-lab trace diagram` uses too); the page draws them. In a multi-process edge the parent asks its
workers, each of which keeps the ring of what it served.

Both need the API token, like every other route. A browser cannot put a bearer header on a page
load or an EventSource, so `GET /live?token=T` (or the sign-in form the page shows without one)
trades the token for an HttpOnly, SameSite=Strict cookie, valid for GET under `/live` only: it can
read the lab, never change it.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import urllib.parse
from importlib import resources
from typing import Any

import h11
import trio

from tunnel_lab.edge.state import EdgeState, connection_json
from tunnel_lab.edge.tunnel import TunnelConnection
from tunnel_lab.wire.trace_sequence import sequence, usable

log = logging.getLogger(__name__)

POLL = 0.25  # seconds between snapshot comparisons: a teaching view, not a monitor
HEARTBEAT = 15.0  # an SSE comment this often, so proxies and the browser see a live stream
SEND_TIMEOUT = 10.0  # a client that takes no bytes for this long is dropped, never waited for
RECENT_REQUESTS = 50  # history entries the first `request` burst replays
COOKIE = "tunnel_lab_live"


def snapshot(edge: EdgeState[TunnelConnection], locations: list[str], now: float) -> dict[str, Any]:
    """What the page's tables show, as plain JSON."""
    down = {f.params.get("location") for f in edge.faults.of_kind("dc-down")}
    conns = [connection_json(c) for c in edge.registry.listed()]
    for c in conns:
        c["age_s"] = round(now - c["registered_at"], 1) if c["registered_at"] else None
    dcs = [{"location": loc, "up": loc not in down,
            "connections": sum(1 for c in conns if c["location"] == loc)} for loc in locations]
    tunnels = []
    for t in edge.tunnels.store.list_tunnels():
        mine = [c for c in conns if c["tunnel_id"] == str(t.id)]
        tunnels.append({"id": str(t.id), "name": t.name,
                        "connectors": sorted({c["connector_id"] for c in mine if c["connector_id"]}),
                        "connections": len(mine),
                        "registered": sum(1 for c in mine if c["state"] == "registered")})
    faults = [f.to_json() for f in edge.faults.active.values()]
    return {"data_centres": dcs, "tunnels": tunnels, "connections": conns, "faults": faults,
            "streams": sum(c["streams"] for c in conns),
            "trace": getattr(edge.trace, "ring", None) is not None or hasattr(edge.trace, "answer")}


def trace_answer(tracer: Any, ray: str) -> dict[str, Any]:
    """`GET /live/trace?ray=ID`: the records the edge's tracer kept for `ray` and their diagram steps.

    `status` says what the page can show: `ok`, `off` (no `--trace`), `unknown` (no record of that ray),
    `evicted` (kept once, pushed out of the ring since); `message` says it in words. Records the
    diagram cannot use (not JSON, no kind or time) are counted in `problems`, never fatal."""
    ring = getattr(tracer, "ring", None)
    if ring is None:
        return {"ray": ray, "status": "off", "message": "the edge runs without --trace: no protocol trace "
                "to draw from"}
    kept = ring.get(ray)
    if kept is None:
        if ring.evicted(ray):
            return {"ray": ray, "status": "evicted", "message": f"the trace records of {ray} were evicted: "
                    f"the edge keeps those of the last {ring.max_rays} requests only (the trace file has "
                    "them all)"}
        return {"ray": ray, "status": "unknown", "message": f"the trace holds no record of {ray} (a request "
                "from before tracing started, or an id the edge never gave)"}
    lines, omitted = kept
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (TypeError, ValueError) as exc:
            problems.append(f"record {n}: not JSON ({exc}); skipped")
            continue
        if not usable(record):
            problems.append(f"record {n}: no kind or time; skipped")
            continue
        records.append(record)
    steps = [step.to_json() for step in sequence(records, ray)]
    dropped = int(getattr(tracer, "dropped", 0))
    return {"ray": ray, "status": "ok", "steps": steps, "records": records, "omitted": omitted,
            "problems": problems, "dropped": dropped,
            "complete": any(r["kind"] == "eyeball.done" for r in records)}


def _without_ages(state: dict[str, Any]) -> str:
    """The snapshot minus what changes by itself (ages), to decide whether to send."""
    conns = [{k: v for k, v in c.items() if k != "age_s"} for c in state["connections"]]
    return json.dumps({**state, "connections": conns}, sort_keys=True)


def sse(event: str, data: Any) -> bytes:
    """One server-sent event (JSON data on one line: json.dumps escapes newlines)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def authorised(request: h11.Request, token: str) -> bool:
    """The bearer header or the live cookie carries the API token."""
    headers = dict(request.headers)
    expected = token.encode()
    if hmac.compare_digest(headers.get(b"authorization", b""), b"Bearer " + expected):
        return True
    for part in headers.get(b"cookie", b"").split(b";"):
        name, _, value = part.strip().partition(b"=")
        if name == COOKIE.encode() and hmac.compare_digest(value, expected):
            return True
    return False


def _html(name: str) -> bytes:
    return resources.files("tunnel_lab.edge").joinpath(name).read_bytes()




def answer_page(request: h11.Request, token: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """`GET /live`: the page, the sign-in form, or the cookie for a token in the query."""
    url = urllib.parse.urlsplit(request.target.decode("latin-1"))
    given = urllib.parse.parse_qs(url.query).get("token", [""])[0]
    html = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store"),
            (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; "
                                         b"style-src 'self' 'unsafe-inline'; "
                                         b"script-src 'self' 'unsafe-inline'; frame-ancestors 'none'"),
            (b"referrer-policy", b"no-referrer")]
    if given:
        if not hmac.compare_digest(given.encode(), token.encode()):
            wrong = _html("live_signin.html").replace(b"<form", b'<p id="error">Wrong token.</p><form', 1)
            return 401, html, wrong
        # the token leaves the address bar (and the history) at once
        cookie = f"{COOKIE}={token}; Path=/live; HttpOnly; SameSite=Strict".encode()
        return 303, [(b"location", b"/live"), (b"set-cookie", cookie), (b"cache-control", b"no-store")], b""
    if not authorised(request, token):
        return 200, html, _html("live_signin.html")
    return 200, html, _html("live.html")


async def stream_events(edge: EdgeState[TunnelConnection], locations: list[str],
                        send: Any) -> None:
    """Feed one EventSource until it goes away (`send(bytes)` raises) or the edge stops."""
    last_state = ""
    history_seq = max(0, (edge.history.entries[-1]["seq"] if edge.history.entries else 0) - RECENT_REQUESTS)
    fault_seq = 0
    quiet_since = time.monotonic()
    await send(b"retry: 1000\n\n")
    while True:
        out = bytearray()
        state = snapshot(edge, locations, time.time())
        key = _without_ages(state)
        if key != last_state:
            last_state = key
            out += sse("state", state)
        for entry in edge.history.since(history_seq):
            history_seq = entry["seq"]
            out += sse("request", entry)
        for entry in edge.faults.applied_since(fault_seq):
            fault_seq = entry["seq"]
            out += sse("fault", entry)
        if not out and time.monotonic() - quiet_since > HEARTBEAT:
            out += b": still here\n\n"
        if out:
            quiet_since = time.monotonic()
            await send(bytes(out))
        await trio.sleep(POLL)


async def serve_live(edge: EdgeState[TunnelConnection], locations: list[str], token: str,
                     request: h11.Request, stream: trio.abc.Stream, conn: h11.Connection) -> bool:
    """Answer a request under `/live`. True: the connection may serve another request."""
    path = urllib.parse.urlsplit(request.target.decode("latin-1")).path.rstrip("/")

    async def send(data: bytes) -> None:
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(data)

    async def respond(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send(conn.send(h11.Response(status_code=status, headers=headers)))
        await send(conn.send(h11.Data(data=body)))
        await send(conn.send(h11.EndOfMessage()))

    plain = [(b"content-type", b"text/plain; charset=utf-8")]
    if request.method != b"GET":
        await respond(405, [*plain, (b"allow", b"GET")], b"the live view is read-only: GET only\n")
        return True
    if path == "/live":
        await respond(*answer_page(request, token))
        return True
    if path not in ("/live/events", "/live/trace"):
        await respond(404, plain, f"no live route {path}\n".encode())
        return True
    if not authorised(request, token):
        await respond(401, plain, b"sign in at /live first\n")
        return True
    if path == "/live/trace":
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.target.decode("latin-1")).query)
        ray = query.get("ray", [""])[0]
        if not ray:
            await respond(400, plain, b"which request? GET /live/trace?ray=ID\n")
            return True
        # expected answers (tracing off, an unknown or evicted ray) are 200s with a `status`: a 4xx
        # would be an error in the browser's console for what is a normal state of the lab
        # a multi-process edge's parent has no ring: it asks its workers (edge.cluster.RemoteTrace)
        ask = getattr(edge.trace, "answer", None)
        answer = await ask(ray) if ask is not None else trace_answer(edge.trace, ray)
        body = json.dumps(answer, separators=(",", ":"), default=str).encode()
        await respond(200, [(b"content-type", b"application/json"), (b"cache-control", b"no-store")], body)
        return True
    await send(conn.send(h11.Response(status_code=200, headers=[
        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"),
        (b"x-accel-buffering", b"no")])))

    async def send_event(data: bytes) -> None:
        await send(conn.send(h11.Data(data=data)))

    try:
        await stream_events(edge, locations, send_event)
    except trio.TooSlowError:
        log.info("live view: a client read nothing for %gs, dropped", SEND_TIMEOUT)
    return False

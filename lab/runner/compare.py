"""Differential conformance, the pure part: what two runs of one scenario observed in, differences out.

`tunnel-lab run --compare A,B` runs each scenario once with connector A and once with B. The engine
records one `Exchange` per request, WebSocket and TCP step (what the eyeball got: `observe_http`,
`observe_websocket`, `observe_tcp`); the origin fixtures' history files say what the origins got.
`compare_runs` removes per-run values (`RULES`, `WHOLE_VALUE_HEADERS`), attributes each origin record to
the step that caused it, and lists every remaining difference. No I/O here: lab/runner/comparerun.py
runs the scenarios and writes the reports.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunnel_lab.lab.runner.client import Response, WebSocketResult

# --- timing class ---------------------------------------------------------------------------------

# A gap of at least PAUSE between two body reads is a pause. A body is "streamed" when it arrived in
# bursts separated by at least STREAMED_MIN_PAUSES pauses that make up at least STREAMED_PAUSE_SHARE of
# the time between its first and last read: an origin pacing its writes (the library paces at 100 ms or
# more) gives that; a bulk transfer stalled once or twice by a busy machine does not.
PAUSE = 0.06
STREAMED_MIN_PAUSES = 2
STREAMED_PAUSE_SHARE = 0.25


def timing_class(body_length: int, body_first: float, body_last: float, pauses: Sequence[float]) -> str:
    """How the body reached the eyeball: "no body", "buffered" (one burst) or "streamed" (paced)."""
    if body_length == 0:
        return "no body"
    paused = [p for p in pauses if p >= PAUSE]
    span = body_last - body_first
    if len(paused) >= STREAMED_MIN_PAUSES and span > 0 and sum(paused) >= STREAMED_PAUSE_SHARE * span:
        return "streamed"
    return "buffered"


# --- normalisation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One kind of per-run value: where `pattern` matches, the text becomes `placeholder`."""

    name: str
    pattern: re.Pattern[str]
    placeholder: str
    why: str

    def apply(self, text: str) -> str:
        return self.pattern.sub(self.placeholder, text)


_MONTH = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"

# Applied to every header value, body text, error and failure message, in this order. The list is the
# documented normalisation of docs/scenarios.md ("Differential conformance"); tests/unit/test_compare.py
# holds an example of each.
RULES: tuple[Rule, ...] = (
    Rule(
        "ray id",
        re.compile(r"\b[0-9a-f]{16}-[A-Za-z0-9]+\b"),
        "<ray>",
        "the edge draws a random ray id per request; its suffix names the data centre of whichever HA "
        "connection carried the request",
    ),
    Rule(
        "uuid",
        re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"),
        "<uuid>",
        "tunnel ids (Cf-Warp-Tag-Id), connection ids and connector ids are created per run",
    ),
    Rule(
        "HTTP date",
        re.compile(rf"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (?:{_MONTH}) \d{{4}} \d\d:\d\d:\d\d GMT\b"),
        "<date>",
        "Date, Last-Modified, Expires and cookie expiries are the wall clock",
    ),
    Rule(
        "timestamp",
        re.compile(r"\b\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?"),
        "<time>",
        "ISO timestamps in bodies and log-derived messages are the wall clock",
    ),
    Rule(
        "uptime",
        re.compile(r'("uptime"\s*:\s*)"[^"]*"'),
        r'\1"<uptime>"',
        "the hello_world origin's /uptime answers the time since the connector started",
    ),
    Rule(
        "bytes back",
        re.compile(r"\b\d+ bytes back\b"),
        "<n> bytes back",
        "the runner's TCP errors say how many bytes had come back when the exchange failed: timing",
    ),
    Rule(
        "loopback port",
        re.compile(r"(?<![\w.])(127(?:\.\d{1,3}){3}|localhost|\[::1\]):\d{1,5}\b"),
        r"\1:<port>",
        "every component binds port 0, so addresses such as 127.0.0.1:41234 change per run",
    ),
)

# Header values replaced whole, whatever their shape (lower-case names): the first three are the per-run
# values above in any format; a WebSocket key is random per handshake and the accept value derives from it.
WHOLE_VALUE_HEADERS: Mapping[str, str] = {
    "date": "<date>",
    "cf-ray": "<ray>",
    "cf-warp-tag-id": "<uuid>",
    "sec-websocket-key": "<websocket key>",
    "sec-websocket-accept": "<websocket accept>",
}


def normalise_text(text: str) -> str:
    """`text` with every per-run value of `RULES` replaced by its placeholder."""
    for rule in RULES:
        text = rule.apply(text)
    return text


def normalise_headers(pairs: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """Header (name, value) pairs with per-run values replaced; names and order kept."""
    out: list[tuple[str, str]] = []
    for name, value in pairs:
        whole = WHOLE_VALUE_HEADERS.get(name.lower())
        out.append((name, whole if whole is not None else normalise_text(value)))
    return out


# --- observations ---------------------------------------------------------------------------------

# Bodies up to this size are kept as text, so per-run values inside them (an echo of the request's
# Cf-Ray, a port in an error page) can be normalised before digesting.
BODY_TEXT_LIMIT = 256 * 1024


@dataclass(frozen=True, kw_only=True)
class Exchange:
    """What the eyeball got in one request, WebSocket or TCP step (one repetition `n` of it)."""

    step: str  # the step index: "3", or "3.2" inside a parallel block
    title: str
    n: int
    kind: str  # "http", "websocket", "tcp" or "raw"
    target: str | None  # the request target sent (None for TCP)
    method: str | None = None  # the request method sent (None for TCP)
    started: float  # wall-clock seconds: origin records in [started, ended] belong to this exchange
    ended: float
    fields: Mapping[str, Any] = field(default_factory=dict)
    # the step's `compare_ignore`: "body" and "header:NAME" entries that are each connector's own
    ignore: tuple[str, ...] = ()


def observe_http(
    step: str,
    title: str,
    n: int,
    method: str,
    target: str,
    resp: Response,
    started: float,
    ended: float,
    *,
    ignore: tuple[str, ...] = (),
) -> Exchange:
    """The `Exchange` for one HTTP request as the runner's client saw it."""
    whole = resp.body_length == len(resp.body_prefix) and resp.body_length <= BODY_TEXT_LIMIT
    fields = {
        "status": resp.status,
        "error": resp.error,
        "http_version": resp.http_version,
        "headers": [list(p) for p in resp.headers],
        "trailers": [list(p) for p in resp.trailers],
        "body_length": resp.body_length,
        "body_sha256": resp.body_sha256,
        "body_text": bytes(resp.body_prefix).decode("latin-1") if whole else None,
        "timing": timing_class(resp.body_length, resp.body_first, resp.body_last, resp.body_pauses),
    }
    return Exchange(
        step=step,
        title=title,
        n=n,
        kind="http",
        method=method,
        target=target,
        started=started,
        ended=ended,
        fields=fields,
        ignore=ignore,
    )


def observe_raw(step: str, title: str, started: float, ended: float) -> Exchange:
    """A `raw` step: deliberately broken or racing bytes (a reset straight after its HEADERS, a bad
    chunk). What reaches the origin then depends on how fast each connector notices the reset, so its
    origin requests are attributed to it and left out of the comparison; the step's own expectations
    (the edge's answer) are checked by the scenario."""
    return Exchange(step=step, title=title, n=0, kind="raw", target=None, started=started, ended=ended,
                    ignore=("origin",))


def observe_websocket(
    step: str, title: str, n: int, target: str, result: WebSocketResult, started: float, ended: float
) -> Exchange:
    """The `Exchange` for one WebSocket exchange: handshake status, failure, what was echoed."""
    digest = hashlib.sha256()
    for message in result.received:
        digest.update(message.encode() if isinstance(message, str) else message)
    fields = {
        "status": result.status,
        "error": result.error,
        "messages": len(result.received),
        "messages_sha256": digest.hexdigest(),
    }
    return Exchange(
        step=step, title=title, n=n, kind="websocket", method="GET", target=target, started=started,
        ended=ended, fields=fields,
    )  # fmt: skip


def observe_tcp(
    step: str,
    title: str,
    n: int,
    status: int,
    error: str | None,
    sent: bytes,
    received: bytes,
    started: float,
    ended: float,
) -> Exchange:
    """The `Exchange` for one TCP step: CONNECT status (or 200 via access), failure, bytes back.

    The runner reads until as many bytes came back as it sent, so how much more arrived in the last read
    is down to timing: only the first len(sent) bytes back are compared."""
    back = received[: len(sent)]
    fields = {
        "status": status,
        "error": error,
        "received": len(back),
        "received_sha256": hashlib.sha256(back).hexdigest(),
    }
    return Exchange(
        step=step, title=title, n=n, kind="tcp", target=None, started=started, ended=ended, fields=fields
    )


@dataclass(frozen=True, kw_only=True)
class RunObservation:
    """One run of one scenario with one connector: how it ended and what eyeballs and origins saw."""

    status: str  # passed, failed, error
    step: str = ""
    message: str = ""
    exchanges: Sequence[Exchange] = ()
    origin: Sequence[Mapping[str, Any]] = ()  # origin history records (origin_fixtures.history)


# --- comparing ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Difference:
    """One field that differs between run A and run B of a scenario (values normalised, as text)."""

    step: str  # "" for the scenario's outcome
    title: str
    n: int | None
    field: str
    a: str
    b: str

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "title": self.title,
            "n": self.n,
            "field": self.field,
            "a": self.a,
            "b": self.b,
        }


# Fields not compared when both sides of an exchange ended in a transport error.
CUT_SHORT = (
    "body_length",
    "body_sha256",
    "body_text",
    "timing",
    "received",
    "received_sha256",
    "messages",
    "messages_sha256",
)

ABSENT = "(absent)"
NOT_REACHED = "(not reached)"


def eyeball_fields(ex: Exchange) -> dict[str, Any]:
    """The normalised fields of `ex` that a comparison looks at."""
    f = dict(ex.fields)
    text = f.pop("body_text", None)
    if f.get("error"):
        f["error"] = normalise_text(str(f["error"]))
    if "headers" in f:
        f["headers"] = normalise_headers(f["headers"])
        f["trailers"] = normalise_headers(f["trailers"])
    if isinstance(text, str):
        clean = normalise_text(text)
        if clean != text:
            # The body held per-run values: compare the normalised body, and its length stands in for
            # Content-Length (which counted the raw body).
            raw = clean.encode("latin-1")
            f["body_length"] = len(raw)
            f["body_sha256"] = hashlib.sha256(raw).hexdigest() + " (normalised)"
            f["headers"] = [
                (n, str(len(raw)) if n.lower() == "content-length" else v) for n, v in f["headers"]
            ]
        f["body_text"] = clean
    if "body" in ex.ignore:
        for key in ("body_length", "body_sha256", "body_text", "timing"):
            f.pop(key, None)
    names = {entry.removeprefix("header:").lower() for entry in ex.ignore if entry.startswith("header:")}
    if names and "headers" in f:
        f["headers"] = [(n, v) for n, v in f["headers"] if n.lower() not in names]
    return f


def origin_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """The normalised fields of one origin history record that a comparison looks at."""
    path, sep, query = str(record.get("target", "")).partition("?")
    return {
        "method": record.get("method"),
        "path": path,
        "query": query if sep else None,
        "http_version": record.get("http_version"),
        "headers": normalise_headers(record.get("headers", [])),
        "framing": record.get("framing"),
        "body_length": record.get("body_length"),
        "body_sha256": record.get("body_sha256"),
        "trailers": normalise_headers(record.get("trailers", [])),
        "tls": record.get("tls"),
        "sni": record.get("sni"),
        "websocket": record.get("websocket"),
        "status": record.get("status"),
        "note": normalise_text(str(record.get("note", ""))),
    }


def attribute(
    exchanges: Sequence[Exchange], records: Sequence[Mapping[str, Any]]
) -> dict[str, list[Mapping[str, Any]]]:
    """Group origin records by the step that caused them.

    A record belongs to the exchanges whose wall-clock window holds its time and whose method and target it
    has (any TCP or WebSocket exchange for a raw TCP record). Records of several steps running at once (a
    parallel block) go to the parallel step; a record outside every window (an origin that read a request
    after the eyeball gave up) goes to the latest matching exchange started before it, else to "".
    """
    out: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records:
        t = float(rec.get("time", 0.0))
        matching = [ex for ex in exchanges if _same_target(ex, rec)]
        inside = {ex.step for ex in matching if ex.started <= t <= ex.ended}
        if not inside:
            before = [ex for ex in matching if ex.started <= t]
            inside = {max(before, key=lambda ex: ex.started).step} if before else {""}
        out.setdefault(_common_step(inside), []).append(rec)
    return out


def _same_target(ex: Exchange, rec: Mapping[str, Any]) -> bool:
    if ex.kind == "raw":  # raw bytes may carry any request
        return rec.get("method") != "TCP"
    if rec.get("method") == "TCP":
        # A raw TCP origin is reached by TCP steps, and by WebSockets to a tcp:// ingress service.
        return ex.kind in ("tcp", "websocket")
    return ex.kind != "tcp" and rec.get("target") == ex.target and rec.get("method") == ex.method


def _common_step(steps: set[str]) -> str:
    if len(steps) == 1:
        return next(iter(steps))
    parents = {s.split(".")[0] for s in steps}
    return next(iter(parents)) if len(parents) == 1 else "+".join(sorted(steps, key=step_key))


def step_key(step: str) -> tuple[int, ...]:
    """Sort key for step indexes ("2" < "2.1" < "10"; "" first)."""
    return tuple(int(p) for p in step.split(".") if p.isdigit()) if step else ()


def show(value: Any) -> str:
    """A field value as text for reports."""
    if value is None:
        return ABSENT
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def compare_headers(
    a: Sequence[tuple[str, str]], b: Sequence[tuple[str, str]], what: str, *, order: bool = True
) -> list[tuple[str, str, str]]:
    """(field, A, B) for every header whose values differ, whose name is spelled differently, and (with
    `order`) for a different order of the headers both have. `what` prefixes the field ("header", ...)."""
    out: list[tuple[str, str, str]] = []
    ga, gb = _group(a), _group(b)
    for lname in sorted(set(ga) | set(gb)):
        (sa, va), (sb, vb) = ga.get(lname, ("", [])), gb.get(lname, ("", []))
        name = sa or sb
        if va != vb:
            out.append((f"{what} {name}", ", ".join(va) or ABSENT, ", ".join(vb) or ABSENT))
        elif sa != sb:
            out.append((f"{what} name {lname}", sa, sb))
    common = set(ga) & set(gb)
    order_a = [n for n in dict.fromkeys(n.lower() for n, _ in a) if n in common]
    order_b = [n for n in dict.fromkeys(n.lower() for n, _ in b) if n in common]
    if order and order_a != order_b:
        out.append((f"{what} order", ", ".join(order_a), ", ".join(order_b)))
    return out


def _group(pairs: Sequence[tuple[str, str]]) -> dict[str, tuple[str, list[str]]]:
    out: dict[str, tuple[str, list[str]]] = {}
    for name, value in pairs:
        out.setdefault(name.lower(), (name, []))[1].append(value)
    return out


def compare_fields(
    a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "", *, header_order: bool = True
) -> list[tuple[str, str, str]]:
    """(field, A, B) for every differing field of two normalised field mappings."""
    out: list[tuple[str, str, str]] = []
    for key in dict.fromkeys([*a, *b]):
        va, vb = a.get(key), b.get(key)
        if key in ("headers", "trailers"):
            what = f"{prefix}header" if key == "headers" else f"{prefix}trailer"
            out += compare_headers(va or [], vb or [], what, order=header_order)
        elif key == "body_text":
            # Where two kept bodies part ways, so a reader sees what differs, not only two digests.
            if isinstance(va, str) and isinstance(vb, str) and va != vb:
                out.append(("body", *body_excerpts(va, vb)))
        elif va != vb:
            out.append((f"{prefix}{key}", show(va), show(vb)))
    return out


EXCERPT = 160


def body_excerpts(a: str, b: str) -> tuple[str, str]:
    """The two bodies from a little before their first difference, control characters escaped."""
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    start = max(0, first - 40)

    def cut(text: str) -> str:
        part = json.dumps(text[start : start + EXCERPT], ensure_ascii=False)[1:-1]
        return ("..." if start else "") + part + ("..." if len(text) > start + EXCERPT else "")

    return cut(a), cut(b)


def outcome(run: RunObservation) -> str:
    """How a run ended, as compared: "passed", or the failing step and its normalised message."""
    if run.status == "passed":
        return "passed"
    return normalise_text(f"{run.status} at {run.step}: {run.message}")


def compare_runs(a: RunObservation, b: RunObservation) -> list[Difference]:
    """Every difference between two runs of one scenario, in step order."""
    diffs: list[Difference] = []
    if outcome(a) != outcome(b):
        diffs.append(
            Difference(step="", title="scenario", n=None, field="outcome", a=outcome(a), b=outcome(b))
        )
    ea = {(ex.step, ex.n): ex for ex in a.exchanges}
    eb = {(ex.step, ex.n): ex for ex in b.exchanges}
    titles = {ex.step: ex.title for ex in [*b.exchanges, *a.exchanges]}
    for key in sorted(set(ea) & set(eb), key=lambda k: (step_key(k[0]), k[1])):
        fa, fb = eyeball_fields(ea[key]), eyeball_fields(eb[key])
        if fa.get("error") and fb.get("error"):
            # Both aborted: how much arrived before the abort is down to timing.
            for name in CUT_SHORT:
                fa.pop(name, None)
                fb.pop(name, None)
        # Not the order of response headers: cloudflared copies them out of a Go map, whose iteration
        # order changes from one response to the next.
        step, index = key
        diffs += [
            Difference(step=step, title=titles[step], n=index, field=f, a=va, b=vb)
            for f, va, vb in compare_fields(fa, fb, header_order=False)
        ]
    # Exchanges only one run made (the other had stopped at a failing step): one line per step.
    for step in sorted({k[0] for k in set(ea) ^ set(eb)}, key=step_key):
        na, nb = sum(k[0] == step for k in ea), sum(k[0] == step for k in eb)
        diffs.append(
            Difference(step=step, title=titles[step], n=None, field="exchanges", a=_done(na), b=_done(nb))
        )
    oa, ob = attribute(a.exchanges, a.origin), attribute(b.exchanges, b.origin)
    unjudged = {ex.step for ex in [*a.exchanges, *b.exchanges] if "origin" in ex.ignore}
    for step in sorted((set(oa) | set(ob)) - unjudged, key=step_key):
        title = titles.get(step, "outside any request step" if not step else f"steps {step}")
        for n, f, va, vb in _compare_origin(oa.get(step, []), ob.get(step, [])):
            diffs.append(Difference(step=step, title=title, n=n, field=f, a=va, b=vb))
    return sorted(diffs, key=lambda d: (step_key(d.step), d.n or 0))


def _done(count: int) -> str:
    return f"{count} done" if count else NOT_REACHED


def _compare_origin(
    a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]
) -> list[tuple[int | None, str, str, str]]:
    """Pair the origin records of one step by method and target (in a canonical order, since requests
    running at once reach the origin in any order) and compare each pair."""
    out: list[tuple[int | None, str, str, str]] = []
    ga, gb = _by_request(a), _by_request(b)
    for key in sorted(set(ga) | set(gb)):
        la, lb = ga.get(key, []), gb.get(key, [])
        if len(la) != len(lb):
            out.append((None, f"origin requests {key}", str(len(la)), str(len(lb))))
        for i, (fa, fb) in enumerate(zip(la, lb, strict=False)):
            n = i if max(len(la), len(lb)) > 1 else None
            out += [(n, f, va, vb) for f, va, vb in compare_fields(fa, fb, "origin ")]
    return out


def _by_request(records: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        fields = origin_fields(rec)
        # With the origin's name when known: a request that reached another origin is a difference.
        where = f" at origin {rec['origin']}" if rec.get("origin") else ""
        key = f"{fields['method']} {rec.get('target', '')}".strip() + where
        out.setdefault(key, []).append(fields)
    for group in out.values():
        group.sort(key=lambda f: json.dumps(f, sort_keys=True, default=str))
    return out


# --- verdict --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """A scenario's comparison result: same, different, known-deviation or skipped."""

    status: str
    reason: str = ""


def verdict(
    differences: Sequence[Difference], known: Mapping[str, str], kinds: Sequence[str], skipped: str = ""
) -> Verdict:
    """Skipped by either side, same, different, or different only where the scenario declares a known
    deviation of one side's connector kind (`known_deviations: {cloudflared: reason}`)."""
    if skipped:
        return Verdict(status="skipped", reason=skipped)
    if not differences:
        return Verdict(status="same")
    reasons = [f"{kind}: {known[kind]}" for kind in dict.fromkeys(kinds) if kind in known]
    if reasons:
        return Verdict(status="known-deviation", reason="; ".join(reasons))
    return Verdict(status="different")

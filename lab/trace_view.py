"""Reading protocol traces (docs/trace.md) for `tunnel-lab trace show|diagram`: pure, no I/O.

`read_trace(lines, source)` parses JSON Lines into records and says what it could not read (a truncated
or corrupt line, a record of another format version) instead of failing; `select` filters;
`event_line` renders one record as one line; `sequence(records, ray)` (from `wire.trace_sequence`, which
the edge's live view shares) picks the steps of one request across eyeball, edge, connector and origin,
which `mermaid` and `svg` draw.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from tunnel_lab.wire.trace import VERSION
from tunnel_lab.wire.trace_sequence import PARTICIPANTS, Step, rays, sequence

__all__ = ["PARTICIPANTS", "Step", "TraceFile", "event_line", "mermaid", "parts", "rays", "read_trace",
           "select", "sequence", "svg"]


@dataclass
class TraceFile:
    """What `read_trace` made of one file: its records, and a note for each line it could not use."""

    source: str
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    versions: set[int] = field(default_factory=set)


def read_trace(lines: Iterable[str], source: str) -> TraceFile:
    """Parse a trace; bad lines become `problems` (`FILE:LINE: what`), never an exception."""
    out = TraceFile(source)
    other_version: dict[Any, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            what = "truncated" if not line.endswith("\n") else "not JSON"
            out.problems.append(f"{source}:{number}: {what} ({exc.msg}); line skipped")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            out.problems.append(f"{source}:{number}: not a trace record (no \"kind\"); line skipped")
            continue
        version = record.get("v")
        if version != VERSION:
            other_version[version] = other_version.get(version, 0) + 1
            if not isinstance(version, int):
                out.problems.append(f"{source}:{number}: no format version (\"v\"); line skipped")
                continue
        out.versions.add(version)
        if not isinstance(record.get("t"), int | float):
            record["t"] = out.records[-1]["t"] if out.records else 0.0
        out.records.append(record)
    for version, count in other_version.items():
        if isinstance(version, int):
            age = "newer" if version > VERSION else "older"
            out.problems.append(
                f"{source}: {count} records of format version {version} ({age} than the version {VERSION} "
                "this tunnel-lab reads); shown as far as their fields are known")
    if out.records and out.records[-1]["kind"] != "trace.end":
        out.problems.append(f"{source}: no trace.end record: the trace was cut short (the process was "
                            "killed, or is still running)")
    return out


def parts(trace: TraceFile) -> list[str]:
    """The files a multi-process edge's trace names in its `trace.start` (`parts`: one per worker, relative
    to the file naming them), which a reader loads with it."""
    names: list[str] = []
    for r in trace.records:
        if r["kind"] == "trace.start" and isinstance(r.get("parts"), list):
            names += [p for p in r["parts"] if isinstance(p, str) and p not in names]
    return names


def merge(files: Sequence[TraceFile]) -> list[dict[str, Any]]:
    """Every file's records in timestamp order (the clock is the machine's monotonic clock)."""
    records = [r for f in files for r in f.records]
    records.sort(key=lambda r: r["t"])
    return records


def select(records: Iterable[dict[str, Any]], *, tunnel: str | None = None, stream: int | None = None,
           ray: str | None = None, kinds: Sequence[str] = (), conn: str | None = None,
           ) -> list[dict[str, Any]]:
    """Records matching every filter given (`kinds`: a kind or its prefix, e.g. `h2` or `rpc.message`)."""
    out = []
    for r in records:
        if tunnel is not None and not str(r.get("tunnel", "")).startswith(tunnel):
            continue
        if stream is not None and r.get("stream") != stream:
            continue
        if ray is not None and r.get("ray") != ray:
            continue
        if conn is not None and conn not in (r.get("conn"), r.get("conn_uuid")):
            continue
        if kinds and not any(r["kind"] == k or r["kind"].startswith(k + ".") for k in kinds):
            continue
        out.append(r)
    return out


def _arrow(r: dict[str, Any]) -> str:
    return {"in": "<-", "out": "->"}.get(str(r.get("dir", "")), "  ")


def _fields(pairs: Any, limit: int = 6) -> str:
    if not isinstance(pairs, list):
        return ""
    shown = [f"{p[0]}={p[1]}" for p in pairs[:limit] if isinstance(p, list) and len(p) == 2]
    more = f" (+{len(pairs) - limit})" if len(pairs) > limit else ""
    return " ".join(shown) + more


def describe(r: dict[str, Any]) -> str:
    """What a record says, in a few words (unknown kinds: their fields)."""
    kind = r["kind"]
    if kind == "h2.frame":
        text = f"{r.get('type')} {'|'.join(r.get('flags') or [])}".rstrip()
        for key in ("error_code", "increment", "last_stream", "data_length", "debug"):
            if key in r:
                text += f" {key}={r[key]}"
        if "settings" in r:
            text += " " + " ".join(f"{k}={v}" for k, v in r["settings"].items())
        if "headers" in r:
            text += " " + _fields(r["headers"])
        return text
    if kind in ("h2.body", "quic.body"):
        return f"body {r.get('length')} bytes sha256={str(r.get('sha256'))[:12]} {r.get('head', '')!r}"
    if kind == "rpc.message":
        text = f"capnp {r.get('message')}"
        for key in ("question", "answer"):
            if key in r:
                text += f" #{r[key]}"
        if r.get("method"):
            text += f" {r.get('interface', '')}.{r['method']}".replace(" .", " ")
        if "results" in r:
            text += f" -> {json.dumps(r['results'], separators=(',', ':'))}"
        if "exception" in r:
            text += f" exception={r['exception']!r}"
        if r.get("message") == "abort":
            text += f" {r.get('reason')!r}"
        return text
    if kind == "tls.handshake":
        return (f"TLS {r.get('version')} {r.get('cipher')} alpn={r.get('alpn')} sni={r.get('sni')}"
                + (f" peer={r.get('peer_subject')!r} issuer={r.get('peer_issuer')!r}" if r.get("peer_subject")
                   else ""))
    if kind in ("origin.request", "eyeball.request"):
        return f"{r.get('method')} {r.get('target')} " + _fields(r.get("headers"), 4)
    if kind in ("origin.response", "eyeball.response"):
        return f"{r.get('status')} " + _fields(r.get("headers"), 4)
    if kind == "eyeball.done":
        return f"{r.get('status')} {r.get('outcome')} {r.get('duration_ms')} ms"
    if kind == "stream.classified":
        return f"stream kind {r.get('stream_kind')}"
    if kind == "quic.stream_head":
        return (f"{r.get('message', r.get('stream_kind'))} " + (f"{r.get('type')} {r.get('dest')} "
                if r.get("message") == "ConnectRequest" else "") + _fields(r.get("metadata"), 4)).strip()
    if kind == "quic.datagram":
        return f"datagram {r.get('type', '?')} {r.get('length')} bytes"
    if kind == "trace.end":
        return f"end of trace: {r.get('records')} records, {r.get('dropped')} dropped"
    skip = {"v", "t", "kind", "component", "conn", "dc", "tunnel", "stream", "ray", "dir", "conn_uuid",
            "remote", "transport", "conn_index", "edge"}
    return " ".join(f"{k}={v}" for k, v in r.items() if k not in skip)


PALETTE = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)


def group_key(r: dict[str, Any]) -> str:
    """The connection/stream a record belongs to (what `show` colours by)."""
    return f"{r.get('component', '?')}/{r.get('conn', '-')}/{r.get('stream', '-')}"


def event_line(r: dict[str, Any], *, start: float, colour: bool = False,
               colours: dict[str, int] | None = None) -> str:
    """One record as one line: time since `start`, who, which connection/stream, what."""
    where = f"{r.get('conn', '-')}"
    if r.get("stream") is not None:
        where += f" s{r['stream']}"
    ray = f" ray={r['ray']}" if r.get("ray") else ""
    text = (f"{r['t'] - start:+10.6f} {r.get('component', '?')!s:<9} {where:<16} {_arrow(r)} "
            f"{r['kind']:<17} {describe(r)}{ray}")
    if not colour:
        return text
    table = colours if colours is not None else {}
    code = table.setdefault(group_key(r), PALETTE[len(table) % len(PALETTE)])
    return f"\x1b[{code}m{text}\x1b[0m"


# ---- one request as a sequence diagram (the steps: wire.trace_sequence, shared with the live view) ---

def _mermaid_text(text: str) -> str:
    # `;` and `#` end or escape a Mermaid message; keep the text readable instead
    return text.replace(";", ",").replace("#", "no. ").replace("\n", " ")


def mermaid(steps: Sequence[Step], ray: str) -> str:
    """A Mermaid `sequenceDiagram` of the steps."""
    lines = ["sequenceDiagram", f"    title Request {ray}"]
    lines += [f"    participant {p}" for p in PARTICIPANTS]
    start = steps[0].t if steps else 0.0
    for step in steps:
        lines.append(f"    {step.source}->>{step.target}: {_mermaid_text(step.text)} "
                     f"(+{(step.t - start) * 1000:.1f} ms)")
    return "\n".join(lines) + "\n"


def svg(steps: Sequence[Step], ray: str) -> str:
    """The same diagram as a self-contained SVG (drawn here: no browser, no JavaScript)."""
    col, row, top, left = 260, 28, 70, 40
    xs = {p: left + i * col + col // 2 for i, p in enumerate(PARTICIPANTS)}
    width = left * 2 + col * len(PARTICIPANTS)
    height = top + row * (len(steps) + 1) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto">'
           '<path d="M0,0 L8,4 L0,8 z"/></marker></defs>',
           f'<text x="{left}" y="20" font-size="14">Request {escape(ray)}</text>']
    for p, x in xs.items():
        out.append(f'<rect x="{x - 50}" y="30" width="100" height="24" fill="#eef" stroke="#336"/>')
        out.append(f'<text x="{x}" y="46" text-anchor="middle">{p}</text>')
        out.append(f'<line x1="{x}" y1="54" x2="{x}" y2="{height - 10}" stroke="#999" stroke-dasharray="4"/>')
    start = steps[0].t if steps else 0.0
    for i, step in enumerate(steps):
        y = top + row * (i + 1)
        x1, x2 = xs[step.source], xs[step.target]
        label = escape(f"{step.text} (+{(step.t - start) * 1000:.1f} ms)")
        if x1 == x2:
            out.append(f'<path d="M{x1},{y - 8} h30 v10 h-30" fill="none" stroke="#333" '
                       'marker-end="url(#a)"/>')
            out.append(f'<text x="{x1 + 36}" y="{y}">{label}</text>')
        else:
            out.append(f'<line x1="{x1}" y1="{y}" x2="{x2}" y2="{y}" stroke="#333" marker-end="url(#a)"/>')
            out.append(f'<text x="{min(x1, x2) + 6}" y="{y - 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"

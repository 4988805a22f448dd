"""One request of a protocol trace (docs/trace.md) as the steps of a sequence diagram: pure, no I/O.

`sequence(records, ray)` picks the records of one request and turns each into an arrow between Eyeball,
Edge, Connector and Origin. `tunnel-lab trace diagram` draws the steps as Mermaid or SVG from trace
files; the edge's live view (`GET /live/trace`) computes them from the records its tracer kept and the
page draws them. Records are read defensively: a record without a kind or a numeric time, or with fields
of unexpected types, is skipped or shown as far as it can be, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["PARTICIPANTS", "Step", "rays", "sequence", "usable"]

PARTICIPANTS = ("Eyeball", "Edge", "Connector", "Origin")


@dataclass(frozen=True)
class Step:
    """One arrow of a sequence diagram (`source` == `target`: a decision inside one party)."""

    t: float
    source: str
    target: str
    text: str
    kind: str = ""  # the record kind it comes from

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "source": self.source, "target": self.target, "text": self.text,
                "kind": self.kind}


def usable(record: Any) -> bool:
    """A record `sequence` can place: a JSON object with a string `kind` and a numeric `t`."""
    return (isinstance(record, dict) and isinstance(record.get("kind"), str)
            and isinstance(record.get("t"), int | float) and not isinstance(record.get("t"), bool))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _pairs(value: Any) -> dict[str, str]:
    return {str(p[0]): str(p[1]) for p in _list(value) if isinstance(p, list) and len(p) == 2}


def _h2_text(r: dict[str, Any]) -> str:
    text = f"{r.get('type')} stream {r.get('stream')}"
    headers = _pairs(r.get("headers"))
    if ":method" in headers:
        text += f" {headers[':method']} {headers.get(':path', '')}"
    if ":status" in headers:
        text += f" :status {headers[':status']}"
    if "END_STREAM" in _list(r.get("flags")):
        text += " END_STREAM"
    if r.get("type") == "DATA":
        text += f" ({r.get('data_length', r.get('length'))} bytes)"
    if r.get("type") == "RST_STREAM":
        text += f" {r.get('error_code')}"
    return text


def _quic_head_text(r: dict[str, Any]) -> str:
    text = f"stream {r.get('stream')} {r.get('message')}"
    if r.get("message") == "ConnectRequest":
        text += f" {r.get('type')} {r.get('dest')}"
    elif r.get("message") == "ConnectResponse":
        meta = _pairs(r.get("metadata"))
        if "HttpStatus" in meta:
            text += f" HttpStatus {meta['HttpStatus']}"
        if r.get("error"):
            text += f" error {r.get('error')}"
    return text


# The records that are one step each: kind -> (from, to, the step's text).
_EVENT_STEPS: dict[str, tuple[str, str, Callable[[dict[str, Any]], str]]] = {
    "eyeball.request": ("Eyeball", "Edge",
                        lambda r: f"{r.get('method')} {r.get('target')} (Host {r.get('host')})"),
    "eyeball.response": ("Edge", "Eyeball", lambda r: f"{r.get('status')}"),
    "eyeball.done": ("Edge", "Edge", lambda r: f"done: {r.get('outcome')} in {r.get('duration_ms')} ms"),
    "origin.request": ("Connector", "Origin",
                       lambda r: f"{r.get('method')} {r.get('target')} HTTP/{r.get('http_version')}"),
    "origin.response": ("Origin", "Connector", lambda r: f"HTTP/{r.get('http_version')} {r.get('status')}"),
    "stream.classified": ("Connector", "Connector",
                          lambda r: f"stream {r.get('stream')}: {r.get('stream_kind')}"),
}
_TUNNEL_KINDS = ("h2.frame", "quic.stream_head", "h2.body", "quic.body")


def sequence(records: Iterable[Any], ray: str) -> list[Step]:
    """The steps of request `ray` across the four parties. The tunnel's frames come from the edge's
    trace when it has them (else the connector's): each frame appears in both when both were traced."""
    mine = [r for r in records if usable(r) and r.get("ray") == ray]
    edge_frames = any(r.get("component") == "edge" and r["kind"] in ("h2.frame", "quic.stream_head")
                      for r in mine)
    steps: list[Step] = []
    for r in mine:
        kind, comp, direction = r["kind"], r.get("component"), r.get("dir")
        if kind in _EVENT_STEPS:
            source, target, describe = _EVENT_STEPS[kind]
            steps.append(Step(float(r["t"]), source, target, describe(r), kind))
        elif kind in _TUNNEL_KINDS:
            if edge_frames and comp != "edge":
                continue
            from_edge = (comp == "edge") == (direction == "out")
            source, target = ("Edge", "Connector") if from_edge else ("Connector", "Edge")
            if kind == "h2.frame":
                if r.get("type") == "WINDOW_UPDATE":
                    continue
                text = _h2_text(r)
            elif kind == "quic.stream_head":
                text = _quic_head_text(r)
            else:
                text = f"body stream {r.get('stream')}: {r.get('length')} bytes"
            steps.append(Step(float(r["t"]), source, target, text, kind))
    steps.sort(key=lambda s: s.t)
    return steps


def rays(records: Iterable[Any]) -> list[str]:
    """Every ray id the records mention, in order of appearance."""
    seen: dict[str, None] = {}
    for r in records:
        if isinstance(r, dict) and isinstance(r.get("ray"), str):
            seen.setdefault(r["ray"], None)
    return list(seen)


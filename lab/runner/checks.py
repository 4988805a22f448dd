"""Expectations, pure: compare what a step got with what the scenario expects.

Each check returns a list of `Mismatch` (empty when all is well), so a failure report can show every
difference at once, expected against actual.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunnel_lab.lab.runner.client import Response


@dataclass(frozen=True)
class Mismatch:
    what: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        return f"{self.what}: expected {_short(self.expected)}, got {_short(self.actual)}"


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if isinstance(value, str):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def value_matches(expected: Any, actual: Any) -> bool:
    """Equality, except a string `re:REGEX` is a regex search on str(actual)."""
    if isinstance(expected, str) and expected.startswith("re:"):
        return actual is not None and re.search(expected[3:], str(actual)) is not None
    if isinstance(expected, int | float) and not isinstance(expected, bool) and isinstance(actual, str):
        return str(expected) == actual
    return bool(expected == actual)


def count_ok(spec: Any, n: int) -> bool:
    """`spec` is an int (exact) or {min, max}."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return n == spec
    return spec.get("min", 0) <= n <= spec.get("max", n)


def describe_count(spec: Any) -> str:
    if isinstance(spec, int):
        return str(spec)
    parts = []
    if "min" in spec:
        parts.append(f">= {spec['min']}")
    if "max" in spec:
        parts.append(f"<= {spec['max']}")
    return " and ".join(parts) or "any"


def json_path(data: Any, path: str) -> tuple[bool, Any]:
    """Follow a dotted path (`a.b.0.c`) through dicts and lists."""
    cur = data
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


def check_response(
    expect: Mapping[str, Any], resp: Response, *, sent_sha256: str | None = None
) -> list[Mismatch]:
    """Every expectation of a request step against the response."""
    out: list[Mismatch] = []
    error_spec = expect.get("error")
    if error_spec:
        if resp.error is None:
            out.append(
                Mismatch(
                    "transport error",
                    "the exchange to fail" if error_spec is True else f"an error matching {error_spec!r}",
                    f"a complete response (status {resp.status})",
                )
            )
        elif isinstance(error_spec, str) and not re.search(error_spec, resp.error):
            out.append(Mismatch("transport error", f"re:{error_spec}", resp.error))
    elif resp.error is not None:
        out.append(
            Mismatch(
                "transport",
                "a complete response",
                f"error: {resp.error} (status {resp.status or '-'}, {resp.body_length} body bytes)",
            )
        )
        return out
    if "status" in expect:
        want = expect["status"]
        ok = resp.status in want if isinstance(want, list) else resp.status == want
        if not ok:
            out.append(Mismatch("status", want, resp.status))
    for name, want in expect.get("headers", {}).items():
        got = resp.header(name)
        if got is None or not value_matches(want, got):
            out.append(Mismatch(f"header {name}", want, got))
    for name in expect.get("headers_absent", []):
        got = resp.header(name)
        if got is not None:
            out.append(Mismatch(f"header {name}", "absent", got))
    for name, want in expect.get("trailers", {}).items():
        got = next((v for n, v in resp.trailers if n.lower() == name.lower()), None)
        if got is None or not value_matches(want, got):
            out.append(Mismatch(f"trailer {name}", want, got))
    body = bytes(resp.body_prefix)
    text = body.decode("utf-8", "replace")
    if "body" in expect and text != expect["body"]:
        out.append(Mismatch("body", expect["body"], text))
    contains = expect.get("body_contains", [])
    for piece in [contains] if isinstance(contains, str) else contains:
        if piece not in text:
            out.append(Mismatch("body contains", piece, text[:500]))
    if "body_length" in expect and not count_ok(expect["body_length"], resp.body_length):
        out.append(Mismatch("body length", describe_count(expect["body_length"]), resp.body_length))
    if "body_sha256" in expect:
        want = expect["body_sha256"]
        if want.startswith("header:"):
            want = resp.header(want[7:]) or f"<no {want[7:]} header>"
        if want != resp.body_sha256:
            out.append(Mismatch("body sha256", want, resp.body_sha256))
    if "sse_events" in expect and not count_ok(expect["sse_events"], resp.sse_events):
        out.append(Mismatch("SSE events", describe_count(expect["sse_events"]), resp.sse_events))
    if "chunks" in expect and not count_ok(expect["chunks"], resp.chunks):
        out.append(Mismatch("body reads with data", describe_count(expect["chunks"]), resp.chunks))
    if "json" in expect or "origin_saw" in expect:
        try:
            data = json.loads(body)
        except ValueError:
            out.append(Mismatch("body", "JSON", text[:300]))
            data = None
        if data is not None:
            for path, want in expect.get("json", {}).items():
                found, got = json_path(data, path)
                if not found or not value_matches(want, got):
                    out.append(Mismatch(f"json {path}", want, got if found else "<missing>"))
            if "origin_saw" in expect:
                out += check_origin_saw(expect["origin_saw"], data, sent_sha256=sent_sha256)
    ms = resp.elapsed * 1000
    if "max_ms" in expect and ms > expect["max_ms"]:
        out.append(Mismatch("duration ms", f"<= {expect['max_ms']}", round(ms)))
    if "min_ms" in expect and ms < expect["min_ms"]:
        out.append(Mismatch("duration ms", f">= {expect['min_ms']}", round(ms)))
    if "ttfb_max_ms" in expect and resp.ttfb * 1000 > expect["ttfb_max_ms"]:
        out.append(Mismatch("time to first byte ms", f"<= {expect['ttfb_max_ms']}", round(resp.ttfb * 1000)))
    return out


def check_origin_saw(spec: Mapping[str, Any], echo: Any, *, sent_sha256: str | None) -> list[Mismatch]:
    """Checks on the echo origin's JSON: what the origin really received."""
    out: list[Mismatch] = []
    if not isinstance(echo, dict) or "headers" not in echo:
        return [Mismatch("origin_saw", "the echo origin's JSON", echo)]
    headers: list[tuple[str, str]] = [(str(h[0]), str(h[1])) for h in echo.get("headers", [])]
    for key in ("method", "target", "http_version", "framing", "body_length", "body"):
        if key in spec and not value_matches(spec[key], echo.get(key)):
            out.append(Mismatch(f"origin saw {key}", spec[key], echo.get(key)))
    if "body_sha256" in spec:
        want = sent_sha256 if spec["body_sha256"] == "sent" else spec["body_sha256"]
        if echo.get("body_sha256") != want:
            out.append(Mismatch("origin saw body sha256", want, echo.get("body_sha256")))
    for name, want in spec.get("headers", {}).items():
        got = next((v for n, v in headers if n.lower() == name.lower()), None)
        if got is None or not value_matches(want, got):
            out.append(Mismatch(f"origin saw header {name}", want, got))
    for pair in spec.get("headers_include", []):
        if not any(n == pair[0] and value_matches(pair[1], v) for n, v in headers):
            out.append(Mismatch("origin saw header line", f"{pair[0]}: {pair[1]}", _lines(headers)))
    for name in spec.get("headers_absent", []):
        present = [v for n, v in headers if n.lower() == name.lower()]
        if present:
            out.append(Mismatch(f"origin saw header {name}", "absent", present))
    for name, want in spec.get("header_count", {}).items():
        got_n = sum(1 for n, _ in headers if n.lower() == name.lower())
        if got_n != want:
            out.append(Mismatch(f"origin saw {name} lines", want, got_n))
    order = spec.get("header_order", [])
    if order:
        positions = []
        for name in order:
            pos = next((i for i, (n, _) in enumerate(headers) if n.lower() == name.lower()), None)
            positions.append(pos)
        if None in positions or positions != sorted(positions):  # type: ignore[type-var]
            out.append(Mismatch("origin saw header order", order, [n for n, _ in headers]))
    return out


def _lines(headers: Sequence[tuple[str, str]]) -> list[str]:
    return [f"{n}: {v}" for n, v in headers]


def filter_records(records: Sequence[Mapping[str, Any]], where: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in records if all(value_matches(v, r.get(k)) for k, v in where.items())]


def check_history(spec: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> list[Mismatch]:
    """Assertions over the edge's /history records."""
    out: list[Mismatch] = []
    chosen = filter_records(records, spec.get("where", {}))
    label = (
        f"history records matching {dict(spec.get('where', {}))}" if spec.get("where") else "history records"
    )
    if "count" in spec and not count_ok(spec["count"], len(chosen)):
        out.append(Mismatch(label, describe_count(spec["count"]), len(chosen)))
    for key, want in spec.get("all", {}).items():
        bad = [r.get(key) for r in chosen if not value_matches(want, r.get(key))]
        if bad:
            out.append(Mismatch(f"every record's {key}", want, f"{len(bad)} differ, e.g. {bad[:5]}"))
    if spec.get("any") and not filter_records(chosen, spec["any"]):
        out.append(Mismatch("some record with", dict(spec["any"]), f"none among {len(chosen)}"))
    if spec.get("none"):
        hits = filter_records(chosen, spec["none"])
        if hits:
            out.append(Mismatch("no record with", dict(spec["none"]), f"{len(hits)}, e.g. {list(hits[:2])}"))
    for key, want in spec.get("distinct", {}).items():
        values = {json.dumps(r.get(key), sort_keys=True) for r in chosen}
        if not count_ok(want, len(values)):
            out.append(Mismatch(f"distinct {key} values", describe_count(want), sorted(values)))
    return out


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> (name, labels, value) samples."""
    samples = []
    line_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = dict(label_re.findall(m.group(3) or ""))
        samples.append((m.group(1), labels, value))
    return samples


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """Sum of the samples named `name` whose labels include `labels`; None when there is none."""
    found = [
        v
        for n, lab, v in parse_prometheus(text)
        if n == name and all(lab.get(k) == val for k, val in (labels or {}).items())
    ]
    return sum(found) if found else None

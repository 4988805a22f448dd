"""The edge tracer's per-ray ring (transport/trace.py `RayRing`) and what the live view makes of it
(`edge.live.trace_answer`, `wire.trace_sequence.sequence`): its bounds, eviction, and damaged records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.edge.live import trace_answer
from tunnel_lab.transport.trace import RayRing, Tracer, open_tracer, part_path
from tunnel_lab.wire.edge_link import MAX_LINE, encode_message, fit_trace_answer
from tunnel_lab.wire.trace_sequence import sequence


class FakeTracer:
    def __init__(self, ring: RayRing | None, dropped: int = 0) -> None:
        self.ring = ring
        self.dropped = dropped


def _line(kind: str, ray: str, t: float, **fields: Any) -> str:
    return json.dumps({"v": 1, "t": t, "kind": kind, "component": "edge", "ray": ray, **fields})


def test_the_ring_keeps_the_last_rays_and_remembers_the_evicted() -> None:
    ring = RayRing(max_rays=3)
    for n in range(5):
        ring.add(f"ray{n}", _line("eyeball.request", f"ray{n}", n))
    assert len(ring) == 3
    assert ring.get("ray0") is None and ring.evicted("ray0") and ring.evicted("ray1")
    assert ring.get("ray4") == ([_line("eyeball.request", "ray4", 4)], 0)
    assert not ring.evicted("never-seen") and ring.get("never-seen") is None


def test_the_ring_is_bounded_by_bytes_but_keeps_the_newest_ray() -> None:
    ring = RayRing(max_bytes=1000)
    big = "x" * 400
    ring.add("a", big)
    ring.add("b", big)
    ring.add("c", big)  # 1200 bytes: "a" goes
    assert ring.get("a") is None and ring.evicted("a") and ring.get("b") is not None
    ring.add("d", "y" * 5000)  # alone over the budget: everything older goes, "d" stays
    assert len(ring) == 1 and ring.get("d") == (["y" * 5000], 0)


def test_a_long_request_keeps_its_first_and_last_records() -> None:
    ring = RayRing(max_records=10)
    for n in range(25):
        ring.add("long", str(n))
    lines, omitted = ring.get("long")  # type: ignore[misc]
    assert lines == ["0", "1", "2", "3", "4", "20", "21", "22", "23", "24"] and omitted == 15
    assert ring._bytes == sum(map(len, lines))


def test_trace_answer_says_why_there_is_nothing_to_draw() -> None:
    assert trace_answer(None, "r")["status"] == "off"
    ring = RayRing(max_rays=1)
    tracer = FakeTracer(ring)
    unknown = trace_answer(tracer, "r")
    assert unknown["status"] == "unknown" and "no record of r" in unknown["message"]
    ring.add("r", _line("eyeball.request", "r", 1.0))
    ring.add("s", _line("eyeball.request", "s", 2.0))
    evicted = trace_answer(tracer, "r")
    assert evicted["status"] == "evicted" and "last 1 requests" in evicted["message"]


def test_trace_answer_skips_damaged_records_and_draws_the_rest() -> None:
    ring = RayRing()
    for line in (_line("eyeball.request", "r", 1.0, method="GET", target="/a", host="h"),
                 "{not json", json.dumps([1, 2]), json.dumps({"kind": "h2.frame", "ray": "r"}),
                 _line("h2.frame", "r", 1.1, type="HEADERS", stream=3, dir="out", flags=7,
                       headers=[[":method", "GET"], [":path", "/a"], ["odd"]]),
                 _line("eyeball.done", "r", 1.2, outcome="ok", duration_ms=3)):
        ring.add("r", line)
    answer = trace_answer(FakeTracer(ring, dropped=2), "r")
    assert answer["status"] == "ok" and answer["complete"] and answer["dropped"] == 2
    assert [p.split(":")[0] for p in answer["problems"]] == ["record 2", "record 3", "record 4"]
    assert [s["text"] for s in answer["steps"]] == ["GET /a (Host h)", "HEADERS stream 3 GET /a",
                                                    "done: ok in 3 ms"]


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
keys = st.sampled_from(["kind", "t", "ray", "dir", "component", "type", "flags", "headers", "metadata",
                        "message", "stream", "data_length"])
kinds = st.sampled_from(["h2.frame", "quic.stream_head", "h2.body", "eyeball.request", "eyeball.done",
                         "origin.request", "stream.classified", "unknown.kind"])


@given(st.lists(st.one_of(values, st.dictionaries(keys, values | kinds, max_size=8).map(
    lambda d: {**d, "ray": "r"})), max_size=10))
def test_sequence_never_fails_on_unexpected_records(records: list[Any]) -> None:
    steps = sequence(records, "r")
    assert all(isinstance(s.text, str) for s in steps)


def test_a_workers_answer_fits_one_control_line() -> None:
    # The parent asks the worker over the control channel (wire.edge_link): an answer too big for one line
    # loses its records (the trace file has them), then its steps, and says so.
    answer = {"ray": "r", "status": "ok", "steps": [{"kind": "x"}] * 3, "records": [{"k": "y" * 100}] * 50,
              "problems": []}
    assert fit_trace_answer(answer) is answer
    cut = fit_trace_answer(answer, room=1000)
    assert cut["records"] == [] and cut["steps"] == answer["steps"] and cut["status"] == "ok"
    assert "the 50 trace records of this request are over 1000 bytes" in cut["problems"][0]
    tiny = fit_trace_answer(answer, room=100)
    assert tiny["steps"] == [] and "its 3 diagram steps are too" in tiny["problems"][1]
    assert len(encode_message("reply", id=1, result=fit_trace_answer(
        {**answer, "records": [{"k": "y" * 1000}] * 5000}))) <= MAX_LINE


def test_worker_trace_files_sit_beside_the_named_one(tmp_path: Path) -> None:
    assert part_path(tmp_path / "edge.trace.jsonl", 1) == tmp_path / "edge.trace.w1.jsonl"
    assert part_path(tmp_path / "edge-2.trace.jsonl", 0) == tmp_path / "edge-2.trace.w0.jsonl"
    assert part_path(tmp_path / "trace", 3) == tmp_path / "trace.w3"
    tracer = open_tracer(tmp_path / "edge.trace.jsonl", component="edge", worker=1)
    assert tracer is not None
    conn = tracer.connection(conn="edge#1", dc="LAB2")
    conn.event("tls.handshake", side="server")
    tracer.close()
    written = part_path(tmp_path / "edge.trace.jsonl", 1).read_text()
    records = [json.loads(line) for line in written.splitlines()]
    assert [r["kind"] for r in records] == ["trace.start", "tls.handshake", "trace.end"]
    assert {r["worker"] for r in records} == {1} and records[1]["conn"] == "edge#1@w1"
    assert not (tmp_path / "edge.trace.jsonl").exists()  # the parent's file is the parent's to write
    with Tracer(tmp_path / "edge.trace.jsonl", component="edge", parts=["edge.trace.w0.jsonl"]) as parent:
        assert parent.worker is None
        # on disk before anything else happens: a parent killed now still names its workers' files
        assert json.loads((tmp_path / "edge.trace.jsonl").read_text())["parts"] == ["edge.trace.w0.jsonl"]
    [start, end] = [json.loads(line) for line in (tmp_path / "edge.trace.jsonl").read_text().splitlines()]
    assert start["parts"] == ["edge.trace.w0.jsonl"] and "worker" not in start and end["kind"] == "trace.end"

"""Expectations (pure): responses, the echo origin's view, history, metrics; the DNS stub's answers;
the JUnit and JSON reports."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.lab.runner.checks import (
    check_history,
    check_origin_saw,
    check_response,
    count_ok,
    json_path,
    metric_value,
    value_matches,
)
from tunnel_lab.lab.runner.client import Response, _BodySink
from tunnel_lab.lab.runner.engine import ScenarioResult
from tunnel_lab.lab.runner.netns import nxdomain_answer
from tunnel_lab.lab.runner.report import write_json, write_junit


def response(**kw: object) -> Response:
    r = Response(status=200, headers=[("Content-Type", "application/json"), ("X-Origin", "echo")])
    for k, v in kw.items():
        setattr(r, k, v)
    return r


ECHO = {
    "method": "POST",
    "target": "/x?y=1",
    "http_version": "1.1",
    "framing": "chunked",
    "body_length": 3,
    "body_sha256": "abc",
    "body": "hey",
    "headers": [
        ["Host", "app.lab.test"],
        ["User-Agent", "t"],
        ["X-Custom", "v1"],
        ["X-Custom", "v2"],
        ["Connection", "keep-alive"],
    ],
}


def test_value_matches() -> None:
    assert value_matches("re:^a.c$", "abc")
    assert not value_matches("re:^a.c$", "abcd")
    assert not value_matches("re:x", None)
    assert value_matches(200, "200")
    assert value_matches(True, True)
    assert not value_matches("1", 1)


def test_counts() -> None:
    assert count_ok(3, 3) and not count_ok(3, 4)
    assert count_ok({"min": 2}, 5) and not count_ok({"min": 2}, 1)
    assert count_ok({"max": 2}, 0) and not count_ok({"min": 1, "max": 2}, 3)


def test_json_path() -> None:
    assert json_path(ECHO, "headers.0.1") == (True, "app.lab.test")
    assert json_path(ECHO, "headers.-1.0") == (True, "Connection")
    assert json_path(ECHO, "nope") == (False, None)
    assert json_path(ECHO, "headers.99") == (False, None)


def test_status_headers_and_body() -> None:
    r = response(body_prefix=bytearray(b"hello world"), body_length=11, body_sha256="d" * 64)
    assert (
        check_response(
            {
                "status": 200,
                "body": "hello world",
                "body_contains": ["world"],
                "headers": {"x-origin": "echo"},
                "headers_absent": ["Set-Cookie"],
            },
            r,
        )
        == []
    )
    problems = check_response(
        {
            "status": [201, 202],
            "body_length": {"min": 20},
            "headers": {"X-Origin": "re:^ECHO$"},
            "body_sha256": "e" * 64,
        },
        r,
    )
    assert [p.what for p in problems] == ["status", "header X-Origin", "body length", "body sha256"]
    assert "expected [201, 202], got 200" in str(problems[0])


def test_digest_from_header() -> None:
    r = response(body_sha256="f" * 64, headers=[("X-Body-Sha256", "f" * 64)])
    assert check_response({"body_sha256": "header:X-Body-Sha256"}, r) == []
    r.headers = []
    [p] = check_response({"body_sha256": "header:X-Body-Sha256"}, r)
    assert p.expected == "<no X-Body-Sha256 header>"


def test_transport_errors() -> None:
    broken = response(error="connection reset by the server", status=200, body_length=10)
    [p] = check_response({"status": 200}, broken)
    assert p.what == "transport" and "connection reset" in p.actual
    assert check_response({"error": True}, broken) == []
    assert check_response({"error": "reset"}, broken) == []
    assert check_response({"error": "timed out"}, broken)[0].what == "transport error"
    assert check_response({"error": True}, response())[0].expected == "the exchange to fail"


def test_timing_and_streaming() -> None:
    r = response(elapsed=1.5, ttfb=0.9, sse_events=3, chunks=1)
    problems = check_response(
        {"max_ms": 1000, "min_ms": 2000, "ttfb_max_ms": 800, "sse_events": 4, "chunks": {"min": 2}}, r
    )
    assert [p.what for p in problems] == [
        "SSE events",
        "body reads with data",
        "duration ms",
        "duration ms",
        "time to first byte ms",
    ]


def test_json_expectations_need_json() -> None:
    r = response(body_prefix=bytearray(b"<html>"))
    [p] = check_response({"json": {"a": 1}}, r)
    assert p.expected == "JSON"
    r = response(body_prefix=bytearray(json.dumps({"a": {"b": [1, 2]}}).encode()))
    assert check_response({"json": {"a.b.1": 2}}, r) == []
    assert check_response({"json": {"a.b.2": 2}}, r)[0].actual == "<missing>"


def test_origin_saw() -> None:
    ok = {
        "method": "POST",
        "target": "/x?y=1",
        "framing": "chunked",
        "body_length": 3,
        "body": "hey",
        "headers": {"host": "app.lab.test", "X-Custom": "v1"},
        "headers_include": [["X-Custom", "v2"]],
        "headers_absent": ["Keep-Alive"],
        "header_count": {"x-custom": 2},
        "header_order": ["Host", "X-Custom"],
        "body_sha256": "sent",
    }
    assert check_origin_saw(ok, ECHO, sent_sha256="abc") == []
    bad = {
        "method": "GET",
        "headers_include": [["x-custom", "v2"]],
        "headers_absent": ["Connection"],
        "header_count": {"X-Custom": 1},
        "header_order": ["X-Custom", "Host"],
        "body_sha256": "sent",
    }
    problems = check_origin_saw(bad, ECHO, sent_sha256="zzz")
    assert [p.what for p in problems] == [
        "origin saw method",
        "origin saw body sha256",
        "origin saw header line",
        "origin saw header Connection",
        "origin saw X-Custom lines",
        "origin saw header order",
    ]
    assert check_origin_saw({"method": "GET"}, {"not": "echo"}, sent_sha256=None)[0].what == "origin_saw"


def test_history() -> None:
    records = [
        {"path": "/a", "status": 200, "location": "LAB1", "connection": "c1"},
        {"path": "/a", "status": 200, "location": "LAB2", "connection": "c2"},
        {"path": "/b", "status": 502, "location": "LAB2", "connection": "c2"},
    ]
    assert (
        check_history(
            {
                "where": {"path": "/a"},
                "count": 2,
                "all": {"status": 200},
                "distinct": {"connection": {"min": 2}},
                "none": {"status": 502},
            },
            records,
        )
        == []
    )
    assert check_history({"any": {"path": "/b", "status": 502}, "count": {"min": 3}}, records) == []
    problems = check_history(
        {
            "where": {"path": "re:^/"},
            "count": 2,
            "all": {"status": 200},
            "none": {"location": "LAB2"},
            "any": {"status": 530},
            "distinct": {"location": 1},
        },
        records,
    )
    assert len(problems) == 5


def test_prometheus() -> None:
    text = (
        '# HELP x y\n# TYPE x counter\nreqs_total{location="LAB1",code="200"} 3\n'
        'reqs_total{location="LAB2",code="200"} 4\nup 1\nbad line\n'
    )
    assert metric_value(text, "reqs_total") == 7
    assert metric_value(text, "reqs_total", {"location": "LAB2"}) == 4
    assert metric_value(text, "up") == 1
    assert metric_value(text, "missing") is None


@given(st.lists(st.sampled_from([b"\n", b"\r\n", b"data: x", b"\n\n", b"id: 1\n"]), max_size=30), st.data())
def test_sse_events_counted_across_any_split(pieces: list[bytes], data: st.DataObject) -> None:
    body = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=6)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    r = Response()
    sink = _BodySink(r)
    for c in chunks:
        sink.feed(c)
    sink.done()
    assert r.body_length == len(body)
    assert r.sse_events == body.replace(b"\r", b"").count(b"\n\n")


@given(st.binary(min_size=12, max_size=300))
def test_dns_stub_answers_nxdomain_to_any_query(query: bytes) -> None:
    answer = nxdomain_answer(query)
    assert answer is not None
    assert answer[:2] == query[:2]  # same id
    assert answer[2] & 0x80  # QR: a response
    assert answer[3] & 0x0F == 3  # RCODE NXDOMAIN
    assert answer[4:6] == query[4:6] and answer[6:12] == bytes(6)
    assert answer[12:] == query[12:]


def test_dns_stub_ignores_junk() -> None:
    assert nxdomain_answer(b"short") is None


def test_reports(tmp_path: Path) -> None:
    results = [
        ScenarioResult("a", "a.yaml", "passed", duration=1.0),
        ScenarioResult(
            "b",
            "b.yaml",
            "failed",
            duration=2.0,
            step="step 2 (request, line 9)",
            message="did not meet expectations",
            mismatches=["status: expected 200, got 502"],
            logs={"edge": ["line 1"]},
        ),
        ScenarioResult("c", "c.yaml", "skipped", message="the cloudflared connector does not support: x"),
        ScenarioResult("d", "d.yaml", "error", step="set-up", message="edge did not start"),
    ]
    write_junit(tmp_path / "j.xml", results, connector="builtin", duration=3.0)
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == (
        "4",
        "1",
        "1",
        "1",
    )
    failure = suite.find("testcase[@name='b']/failure")
    assert (
        failure is not None
        and failure.get("message") == "step 2 (request, line 9): did not meet expectations"
    )
    assert (
        failure.text is not None
        and "status: expected 200, got 502" in failure.text
        and "| line 1" in failure.text
    )
    write_json(tmp_path / "r.json", results, connector="builtin", duration=3.0)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1, "deviation": 0}
    assert data["scenarios"][1]["mismatches"] == ["status: expected 200, got 502"]

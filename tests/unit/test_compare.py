"""`run --compare`'s pure core (lab.runner.compare) and its report helpers: the normaliser, the timing
class, origin attribution, the differ and the verdict."""

from __future__ import annotations

import hashlib
import json
import uuid
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.lab.runner import compare, comparerun
from tunnel_lab.lab.runner.client import Response, WebSocketResult
from tunnel_lab.lab.runner.compare import (
    Exchange,
    RunObservation,
    attribute,
    compare_headers,
    compare_runs,
    eyeball_fields,
    normalise_headers,
    normalise_text,
    observe_http,
    observe_tcp,
    timing_class,
    verdict,
)
from tunnel_lab.lab.runner.engine import ScenarioResult
from tunnel_lab.lab.runner.loader import load_scenario
from tunnel_lab.wire.errors import ConfigError

# One per-run value of each rule, as it appears in the lab; each must become the rule's placeholder.
EXAMPLES = {
    "ray id": ("cf-ray 8f3a9c0d12e4b567-LAB2 seen", "cf-ray <ray> seen"),
    "uuid": ('"Cf-Warp-Tag-Id": "0b9e6d4e-7c1a-4c57-9a53-5b1f2a3c4d5e"', '"Cf-Warp-Tag-Id": "<uuid>"'),
    "HTTP date": ("Date: Fri, 04 Dec 2026 15:05:15 GMT", "Date: <date>"),
    "timestamp": ('{"startTime": "2026-12-04T15:05:15.123456Z"}', '{"startTime": "<time>"}'),
    "uptime": ('{"uptime": "1m2.5s"}', '{"uptime": "<uptime>"}'),
    "bytes back": ("timed out after 10s (4096 bytes back)", "timed out after 10s (<n> bytes back)"),
    "loopback port": (
        "dial tcp 127.0.0.1:41234: refused; [::1]:80",
        "dial tcp 127.0.0.1:<port>: refused; [::1]:<port>",
    ),
}


def test_every_rule_has_an_example() -> None:
    assert sorted(EXAMPLES) == sorted(r.name for r in compare.RULES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_rule_replaces_its_per_run_value(name: str) -> None:
    raw, want = EXAMPLES[name]
    assert normalise_text(raw) == want


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1 without a port",
        "0123456789abcdef",  # hex without a data-centre suffix is not a ray id
        "HTTP/1.1 200 OK",
        "10s and 250ms",
        "content-length: 1000",
        '{"status": 404}',
    ],
)
def test_values_that_are_not_per_run_stay(text: str) -> None:
    assert normalise_text(text) == text


_hex = st.text("0123456789abcdef", min_size=16, max_size=16)


@given(
    st.uuids(),
    st.uuids(),
    _hex,
    _hex,
    st.integers(1, 65535),
    st.integers(1, 65535),
    st.sampled_from(["LAB1", "LAB2", "AMS"]),
)
def test_two_runs_differing_only_in_per_run_values_normalise_equal(
    u1: uuid.UUID, u2: uuid.UUID, r1: str, r2: str, p1: int, p2: int, dc: str
) -> None:
    template = '{{"Cf-Ray": "{ray}-' + dc + '", "Cf-Warp-Tag-Id": "{uuid}", "peer": "127.0.0.1:{port}"}}'
    a = template.format(ray=r1, uuid=u1, port=p1)
    b = template.format(ray=r2, uuid=u2, port=p2)
    assert normalise_text(a) == normalise_text(b)


@given(st.text(max_size=200))
def test_normalising_is_idempotent(text: str) -> None:
    once = normalise_text(text)
    assert normalise_text(once) == once


def test_whole_value_headers_are_replaced_whatever_their_shape() -> None:
    pairs = [("Date", "yesterday"), ("CF-RAY", "x"), ("Sec-WebSocket-Key", "abc=="), ("X-Keep", "same")]
    assert normalise_headers(pairs) == [
        ("Date", "<date>"),
        ("CF-RAY", "<ray>"),
        ("Sec-WebSocket-Key", "<websocket key>"),
        ("X-Keep", "same"),
    ]


# --- timing class ---------------------------------------------------------------------------------


def test_timing_no_body() -> None:
    assert timing_class(0, 0.0, 0.0, []) == "no body"


def test_timing_one_read_is_buffered() -> None:
    assert timing_class(8, 0.7, 0.7, []) == "buffered"


def test_timing_paced_reads_are_streamed() -> None:
    # 8 bytes 100 ms apart: 7 pauses filling the whole span.
    assert timing_class(8, 0.01, 0.71, [0.1] * 7) == "streamed"


def test_timing_a_bulk_transfer_stalled_twice_is_not_streamed() -> None:
    # 5 s of back-to-back reads with two 70 ms stalls from a busy machine.
    assert timing_class(1 << 30, 0.01, 5.0, [0.07, 0.07, 0.03]) == "buffered"


def test_timing_one_pause_is_not_enough() -> None:
    assert timing_class(100, 0.0, 0.5, [0.5]) == "buffered"


def test_timing_short_gaps_do_not_count() -> None:
    assert timing_class(100, 0.0, 0.1, [0.03, 0.03, 0.03]) == "buffered"


# --- observations and the differ --------------------------------------------------------------------


def response(
    *,
    status: int = 200,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"ok",
    pauses: list[float] | None = None,
    error: str | None = None,
) -> Response:
    r = Response(status=status, http_version="1.1", error=error)
    r.headers = headers if headers is not None else [("Content-Length", str(len(body)))]
    r.body_prefix = bytearray(body)
    r.body_length = len(body)
    r.body_sha256 = hashlib.sha256(body).hexdigest()
    r.chunks = 1 + len(pauses or [])
    r.body_first, r.body_last = 0.01, 0.01 + sum(pauses or [])
    r.body_pauses = list(pauses or [])
    return r


def http(
    step: str, resp: Response, *, target: str = "/", n: int = 0, t: float = 0.0, method: str = "GET"
) -> Exchange:
    return observe_http(step, f"step {step}", n, method, target, resp, 100.0 + t, 101.0 + t)


def record(target: str = "/", *, t: float = 100.5, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "seq": 1,
        "time": t,
        "kind": "echo",
        "peer": "127.0.0.1:40000",
        "tls": False,
        "sni": None,
        "method": "GET",
        "target": target,
        "http_version": "1.1",
        "headers": [["Host", "app.lab.test"], ["Cf-Ray", "0123456789abcdef-LAB1"]],
        "framing": "none",
        "body_length": 0,
        "body_sha256": "",
        "trailers": [],
        "status": 200,
        "websocket": False,
        "note": "",
    }
    return {**base, **fields}


def run(
    *exchanges: Exchange, origin: tuple[dict[str, Any], ...] = (), status: str = "passed"
) -> RunObservation:
    return RunObservation(status=status, exchanges=exchanges, origin=origin)


def test_identical_runs_apart_from_per_run_values_have_no_difference() -> None:
    def body(ray: str, port: int) -> bytes:
        return json.dumps({"headers": [["Cf-Ray", ray]], "peer": f"127.0.0.1:{port}"}).encode()

    a_body, b_body = body("0123456789abcdef-LAB1", 40001), body("fedcba9876543210-LAB2", 51234)
    a = run(
        http(
            "1",
            response(
                headers=[("Date", "Fri, 04 Dec 2026 15:05:15 GMT"), ("Content-Length", "1")], body=a_body
            ),
        ),
        origin=(record(peer="127.0.0.1:40000", seq=3),),
    )
    b = run(
        http(
            "1",
            response(
                headers=[("Date", "Sat, 05 Dec 2026 01:00:00 GMT"), ("Content-Length", "2")], body=b_body
            ),
        ),
        origin=(
            record(
                peer="127.0.0.1:50000",
                seq=9,
                headers=[["Host", "app.lab.test"], ["Cf-Ray", "ffff000011112222-LAB2"]],
            ),
        ),
    )
    assert compare_runs(a, b) == []


def test_normalised_body_stands_in_for_content_length() -> None:
    raw = b'{"ray": "0123456789abcdef-LAB1"}'
    fields = eyeball_fields(http("1", response(headers=[("Content-Length", str(len(raw)))], body=raw)))
    assert fields["body_length"] == len(b'{"ray": "<ray>"}')
    assert fields["headers"] == [("Content-Length", str(len(b'{"ray": "<ray>"}')))]
    assert fields["body_sha256"].endswith("(normalised)")


def test_compare_ignore_leaves_out_the_body_and_named_headers() -> None:
    page_a = response(headers=[("Content-Length", "5"), ("X-Same", "1")], body=b"ours.")
    page_b = response(headers=[("Transfer-Encoding", "chunked"), ("X-Same", "1")], body=b"theirs" * 400)
    plain = {d.field for d in compare_runs(run(http("1", page_a)), run(http("1", page_b)))}
    assert {"body", "header Content-Length", "header Transfer-Encoding"} <= plain
    ignore = ("body", "header:content-length", "header:Transfer-Encoding")
    a = run(replace(http("1", page_a), ignore=ignore))
    b = run(replace(http("1", page_b), ignore=ignore))
    assert compare_runs(a, b) == []
    c = run(replace(http("1", response(headers=[("X-Same", "2")], body=b"x")), ignore=ignore))
    assert [d.field for d in compare_runs(a, c)] == ["header X-Same"]  # other headers still count


def test_what_a_raw_step_lets_through_to_the_origin_is_not_compared() -> None:
    """A reset racing its HEADERS reaches the origin or not depending on the connector's speed."""
    raw = compare.observe_raw("1", "rapid reset", 100.0, 101.0)
    after = http("2", response(), target="/after", t=2.0)
    a = run(raw, after, origin=(record("/large", t=100.2), record("/after", t=102.5)))
    b = run(raw, after, origin=(*(record("/large", t=100.2 + i / 100) for i in range(30)),
                                record("/large", t=101.5), record("/after", t=102.5)))
    assert compare_runs(a, b) == []
    c = run(raw, after, origin=(record("/large", t=100.2),))  # the next request did not reach the origin
    assert [d.field for d in compare_runs(a, c)] == ["origin requests GET /after"]


def test_a_real_content_length_difference_is_reported() -> None:
    a = run(http("1", response(headers=[("Content-Length", "2")], body=b"ok")))
    b = run(http("1", response(headers=[("Transfer-Encoding", "chunked")], body=b"ok")))
    fields = {d.field: (d.a, d.b) for d in compare_runs(a, b)}
    assert fields == {
        "header Content-Length": ("2", "(absent)"),
        "header Transfer-Encoding": ("(absent)", "chunked"),
    }


def test_status_body_and_timing_differences() -> None:
    a = run(http("2", response(status=200, body=b"trickle.", pauses=[0.1] * 7)))
    b = run(http("2", response(status=502, body=b"bad gateway")))
    diffs = compare_runs(a, b)
    assert [d.field for d in diffs] == [
        "status",
        "header Content-Length",
        "body_length",
        "body_sha256",
        "timing",
        "body",
    ]
    timing, body = diffs[-2:]
    assert (timing.step, timing.n, timing.a, timing.b) == ("2", 0, "streamed", "buffered")
    assert (body.a, body.b) == ("trickle.", "bad gateway")


def test_body_excerpts_start_near_the_first_difference() -> None:
    a = "x" * 100 + "\nsame until here: A" + "y" * 300
    b = "x" * 100 + "\nsame until here: B"
    ea, eb = compare.body_excerpts(a, b)
    assert eb == "..." + "x" * 22 + "\\nsame until here: B"
    assert ea == "..." + "x" * 22 + "\\nsame until here: A" + "y" * 119 + "..."


def test_bodies_cut_short_on_both_sides_are_not_compared() -> None:
    a = run(http("1", response(body=b"data: 1\n\n", error="stream reset by the server (error code 2)")))
    b = run(
        http("1", response(body=b"data: 1\n\ndata: 2\n\n", error="stream reset by the server (error code 2)"))
    )
    diffs = compare_runs(a, b)
    # Only the Content-Length the test's helper derives from each body remains.
    assert [d.field for d in diffs] == ["header Content-Length"]
    c = run(http("1", response(body=b"data: 1\n\nmore")))
    assert "body_length" in [d.field for d in compare_runs(a, c)]


def test_header_name_spelling_and_order() -> None:
    a = [("Content-Type", "text/plain"), ("X-A", "1")]
    b = [("X-A", "1"), ("content-type", "text/plain")]
    assert compare_headers(a, b, "header") == [
        ("header name content-type", "Content-Type", "content-type"),
        ("header order", "content-type, x-a", "x-a, content-type"),
    ]


def test_response_header_order_is_not_compared() -> None:
    a = run(http("1", response(headers=[("X-A", "1"), ("Content-Length", "2")])))
    b = run(http("1", response(headers=[("Content-Length", "2"), ("X-A", "1")])))
    assert compare_runs(a, b) == []


def test_origin_request_header_order_is_compared() -> None:
    a = run(http("1", response()), origin=(record(headers=[["Host", "h"], ["Accept", "*/*"]]),))
    b = run(http("1", response()), origin=(record(headers=[["Accept", "*/*"], ["Host", "h"]]),))
    assert [(d.field, d.a, d.b) for d in compare_runs(a, b)] == [
        ("origin header order", "host, accept", "accept, host")
    ]


def test_repeated_header_values_are_compared_in_order() -> None:
    a = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    b = [("Set-Cookie", "a=1")]
    assert compare_headers(a, b, "header") == [("header Set-Cookie", "a=1, b=2", "a=1")]


def test_outcome_and_steps_not_reached() -> None:
    a = run(http("1", response()), http("2", response()))
    b = RunObservation(
        status="failed",
        step="step 2 (request, line 9)",
        message="timed out",
        exchanges=(http("1", response()),),
    )
    diffs = compare_runs(a, b)
    assert [(d.step, d.field, d.a, d.b) for d in diffs] == [
        ("", "outcome", "passed", "failed at step 2 (request, line 9): timed out"),
        ("2", "exchanges", "1 done", "(not reached)"),
    ]


def test_origin_differences_per_step() -> None:
    a = run(http("1", response()), origin=(record(framing="content-length", body_length=5),))
    b = run(http("1", response()), origin=(record(framing="chunked", body_length=5),))
    diffs = compare_runs(a, b)
    assert [(d.step, d.field, d.a, d.b) for d in diffs] == [
        ("1", "origin framing", "content-length", "chunked")
    ]


def test_origin_request_missing_on_one_side() -> None:
    a = run(http("1", response()), origin=(record(),))
    b = run(http("1", response()))
    assert [(d.field, d.a, d.b) for d in compare_runs(a, b)] == [("origin requests GET /", "1", "0")]


def test_a_request_that_reached_another_origin() -> None:
    a = run(http("1", response()), origin=(record(origin="app"),))
    b = run(http("1", response()), origin=(record(origin="other"),))
    assert [(d.field, d.a, d.b) for d in compare_runs(a, b)] == [
        ("origin requests GET / at origin app", "1", "0"),
        ("origin requests GET / at origin other", "0", "1"),
    ]


def test_origin_path_and_query_are_split() -> None:
    fields = compare.origin_fields(record("/a/b?x=1&y=2"))
    assert (fields["path"], fields["query"]) == ("/a/b", "x=1&y=2")
    assert compare.origin_fields(record("/a"))["query"] is None


def test_tcp_compares_only_the_bytes_up_to_those_sent() -> None:
    sent = b"GET / HTTP/1.0\r\n\r\n"
    short = observe_tcp("1", "s", 0, 200, None, sent, b"HTTP/1.1 200 OK\r\nDate: x\r\n", 0, 1)
    longer = observe_tcp("1", "s", 0, 200, None, sent, b"HTTP/1.1 200 OK\r\nDate: x\r\n\r\n{...}", 0, 1)
    assert short.fields == longer.fields


# --- attribution ------------------------------------------------------------------------------------


def test_attribution_by_window_and_target() -> None:
    ex = [http("1", response(), target="/a", t=0), http("2", response(), target="/b", t=2)]
    got = attribute(
        ex, [record("/a", t=100.5), record("/b", t=102.5), record("/b", t=200.0), record("/z", t=100.5)]
    )
    assert {k: [r["target"] for r in v] for k, v in got.items()} == {
        "1": ["/a"],
        "2": ["/b", "/b"],
        "": ["/z"],
    }


def test_a_raw_tcp_record_belongs_to_a_websocket_step_too() -> None:
    ws = compare.observe_websocket("2", "s", 0, "/", WebSocketResult(status=101), 100.0, 101.0)
    got = attribute([http("1", response(), t=-5), ws], [record("", method="TCP", t=100.5)])
    assert list(got) == ["2"]


def test_attribution_tells_methods_apart() -> None:
    ex = [
        http("4.1", response(), target="/item/1", method="PUT"),
        http("4.2", response(), target="/item/1", method="DELETE"),
    ]
    got = attribute(ex, [record("/item/1", method="DELETE"), record("/item/1", method="PUT")])
    assert {k: [r["method"] for r in v] for k, v in got.items()} == {"4.2": ["DELETE"], "4.1": ["PUT"]}


def test_attribution_of_concurrent_branches_goes_to_the_parallel_step() -> None:
    ex = [http("3.1", response(), target="/same"), http("3.2", response(), target="/same")]
    assert list(attribute(ex, [record("/same")])) == ["3"]


# --- verdict ----------------------------------------------------------------------------------------

DIFF = compare.Difference(step="1", title="step 1", n=0, field="status", a="200", b="502")


def test_verdicts() -> None:
    assert verdict([], {}, ["builtin", "cloudflared"]).status == "same"
    assert verdict([DIFF], {}, ["builtin", "cloudflared"]).status == "different"
    known = verdict([DIFF], {"cloudflared": "16 KiB messages"}, ["builtin", "cloudflared"])
    assert (known.status, known.reason) == ("known-deviation", "cloudflared: 16 KiB messages")
    # A deviation declared for a connector that is on neither side does not excuse anything.
    assert verdict([DIFF], {"cloudflared": "x"}, ["builtin", "builtin"]).status == "different"
    assert verdict([], {}, [], skipped="B: no hello-world").status == "skipped"


# --- the command line's helpers ---------------------------------------------------------------------


def test_sides(tmp_path: Path) -> None:
    exe = tmp_path / "cloudflared"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    a, b = comparerun.parse_sides([f"builtin,{exe}"])
    assert (a.kind, a.binary, a.folder) == ("builtin", None, "A-builtin")
    assert (b.kind, b.binary, b.folder) == ("cloudflared", str(exe), "B-cloudflared")
    assert comparerun.parse_sides(["builtin", "builtin"])[1].folder == "B-builtin"


@pytest.mark.parametrize("values", [["builtin"], ["builtin,builtin,builtin"], []])
def test_sides_need_exactly_two(values: list[str]) -> None:
    with pytest.raises(ConfigError, match="exactly two"):
        comparerun.parse_sides(values)


def test_a_side_that_is_not_an_executable(tmp_path: Path) -> None:
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    with pytest.raises(ConfigError, match=r"notes\.txt.*is not executable"):
        comparerun.parse_sides([f"builtin,{plain}"])
    with pytest.raises(ConfigError, match=r"missing.*no such file"):
        comparerun.parse_sides([f"{tmp_path}/missing,builtin"])


def test_compare_argv_names_absolute_binaries() -> None:
    sides = (comparerun.Side("A", "builtin"), comparerun.Side("B", "cloudflared", "/abs/cloudflared"))
    argv = ["-k", "http", "--compare", "builtin,./cloudflared", "--jobs", "2"]
    assert comparerun.compare_argv(argv, sides) == [
        "-k",
        "http",
        "--jobs",
        "2",
        "--compare",
        "builtin,/abs/cloudflared",
    ]


SCENARIO = """\
name: tiny
description: one request
topology:
  origins: {app: {kind: echo}}
  tunnels: {main: {dns: [app.lab.test]}}
  connector: {tunnel: main, url: "${origins.app.url}"}
steps:
  - request: {host: app.lab.test, path: /}
"""


def test_reports(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(SCENARIO)
    sc = load_scenario(path)
    sides = (comparerun.Side("A", "builtin"), comparerun.Side("B", "cloudflared", "/bin/cf"))
    runs = {
        "A": ScenarioResult("tiny", str(path), "passed", exchanges=[http("1", response(status=200))]),
        "B": ScenarioResult("tiny", str(path), "passed", exchanges=[http("1", response(status=201))]),
    }
    done = comparerun.judge(sc, sides, runs)
    assert done.verdict.status == "different"
    assert comparerun.compared_lines(done) == [
        "tiny: 1 difference",
        "    step 1 #0: status",
        "        A: 200",
        "        B: 201",
    ]
    comparerun.write_json(tmp_path / "r.json", [done], sides, 1.0)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"] == {"same": 0, "different": 1, "known-deviation": 0, "skipped": 0}
    assert data["scenarios"][0]["differences"][0] == {
        "step": "1",
        "title": "step 1",
        "n": 0,
        "field": "status",
        "a": "200",
        "b": "201",
    }
    comparerun.write_junit(tmp_path / "r.xml", [done], sides, 1.0)
    case = ET.parse(tmp_path / "r.xml").getroot().find("testsuite/testcase")
    assert case is not None and case.find("failure") is not None


def test_reading_origin_history_skips_a_cut_line(tmp_path: Path) -> None:
    (tmp_path / "origin-app.history.jsonl").write_text(json.dumps(record()) + "\n" + '{"seq": 2, "ti')
    records = comparerun.read_origin_history(str(tmp_path))
    assert [(r["seq"], r["origin"]) for r in records] == [(1, "app")]


def test_compare_refuses_connector_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from tunnel_lab.lab.runner import cli

    assert (
        cli.main(["--compare", "builtin,builtin", "--connector", "cloudflared", "-k", "http-get-echo"]) == 2
    )
    assert "--compare names both connectors" in capsys.readouterr().err


def test_known_deviation_and_skip_in_the_reports(tmp_path: Path) -> None:
    # `known_deviations` is read with getattr: the loader field may not exist on every branch.
    sc: Any = SimpleNamespace(name="marked", source="marked.yaml", known_deviations={"cloudflared": "16 KiB"})
    sides = (comparerun.Side("A", "builtin"), comparerun.Side("B", "cloudflared", "/bin/cf"))
    runs = {
        "A": ScenarioResult("marked", "marked.yaml", "passed", exchanges=[http("1", response(status=200))]),
        "B": ScenarioResult("marked", "marked.yaml", "passed", exchanges=[http("1", response(status=502))]),
    }
    known = comparerun.judge(sc, sides, runs)
    assert (known.verdict.status, known.verdict.reason) == ("known-deviation", "cloudflared: 16 KiB")
    assert (
        comparerun.compared_lines(known)[0] == "marked: 1 difference, known deviation (cloudflared: 16 KiB)"
    )
    plain: Any = SimpleNamespace(name="plain", source="plain.yaml")
    skip = comparerun.judge(
        plain, sides, {"A": ScenarioResult("plain", "plain.yaml", "skipped", message="no")}
    )
    assert (skip.verdict.status, skip.verdict.reason) == ("skipped", "A: no")
    comparerun.write_junit(tmp_path / "r.xml", [known, skip], sides, 1.0)
    cases = ET.parse(tmp_path / "r.xml").getroot().findall("testsuite/testcase")
    assert [c.find("failure") for c in cases] == [None, None]
    assert "16 KiB" in (cases[0].findtext("system-out") or "")
    assert cases[1].find("skipped") is not None

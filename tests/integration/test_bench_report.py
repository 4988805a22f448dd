"""The bench's pure parts: goals from figures, the table, percentiles, argv rewriting (no processes)."""

from __future__ import annotations

import pytest

from tunnel_lab.bench import load
from tunnel_lab.bench.cli import Run, _without_option, render_table, targets


def _runs(direct_rps: float, lab_rps: float, direct_p50: float, lab_p50: float) -> list[Run]:
    return [
        Run("get-c32", "direct", {"requests_per_s": direct_rps, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0}),
        Run("get-c32", "lab", {"requests_per_s": lab_rps, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0}),
        Run("get-c1", "direct", {"requests_per_s": 1.0, "p50_ms": direct_p50, "p90_ms": 1.0, "p99_ms": 1.0}),
        Run("get-c1", "lab", {"requests_per_s": 1.0, "p50_ms": lab_p50, "p90_ms": 1.0, "p99_ms": 1.0}),
        Run("download", "direct", {"bytes": 1 << 30, "mb_per_s": 200.0, "seconds": 5.0}),
        Run("download", "lab", {"bytes": 1 << 30, "mb_per_s": 50.0, "seconds": 20.0},
            components={"edge": {"cpu_s": 1.0, "peak_rss_mb": 80.0, "rss_growth_mb": 60.0},
                        "connector": {"cpu_s": 1.0, "peak_rss_mb": 40.0, "rss_growth_mb": 1.0}}),
        Run("ready", "lab", {"seconds": 3.1, "first_connection_s": 0.4}),
    ]


def _goal(goals: list[dict[str, object]], text: str) -> dict[str, object]:
    return next(g for g in goals if g["goal"] == text)


def test_goals_are_ratios_and_differences_against_direct() -> None:
    goals = targets(_runs(1000.0, 450.0, 0.1, 0.9))
    assert _goal(goals, "GET c=32 req/s >= 40% of direct") == {
        "target": 3, "path": "lab", "goal": "GET c=32 req/s >= 40% of direct", "value": 0.45, "unit": "ratio",
        "met": True}
    assert _goal(goals, "added p50 at c=1 < 1 ms")["value"] == pytest.approx(0.8)
    assert _goal(goals, "added p50 at c=1 < 1 ms")["met"] is True
    assert _goal(goals, "bulk download MB/s >= 60% of direct")["met"] is False
    assert _goal(goals, "edge peak RSS growth over a 1024 MiB download < 20 MB")["met"] is False
    assert _goal(goals, "connector peak RSS growth over a 1024 MiB download < 20 MB")["met"] is True
    assert _goal(goals, "ready with 4 HA connections < 1 s")["met"] is False
    assert _goal(goals, "first connection ready < 1 s")["met"] is True
    # No upload runs: those goals are unknown, not failed.
    upload = _goal(goals, "bulk upload MB/s >= 60% of direct")
    assert (upload["value"], upload["met"]) == (None, None)
    # Targets 1 and 2 need the real connector's figures: none without a cloudflared path.
    assert {g["target"] for g in goals} == {0, 3, 7}


def _costly(workload: str, path: str, count: float, edge_cpu: float, connector_cpu: float) -> Run:
    unit = "messages" if workload == "websocket-echo" else "requests"
    return Run(workload, path, {unit: count},
               components={"edge": {"cpu_s": edge_cpu}, "connector": {"cpu_s": connector_cpu}})


def test_cpu_targets_are_per_request_ratios_within_one_invocation() -> None:
    runs = [_costly("get-c32", "cloudflared", 1000, 0.9, 0.3), _costly("get-c32", "lab", 500, 0.45, 0.2),
            _costly("post-1mib-c8", "cloudflared", 100, 0.2, 0.25),
            _costly("post-1mib-c8", "lab", 100, 0.2, 0.5),
            _costly("websocket-echo", "cloudflared", 300, 0.1, 0.1)]
    goals = targets(runs)
    edge_get = _goal(goals, "get-c32: edge CPU per request <= cloudflared's")
    assert (edge_get["target"], edge_get["path"], edge_get["met"]) == (1, "cloudflared", False)
    assert edge_get["value"] == 3.0
    assert _goal(goals, "post-1mib-c8: edge CPU per request <= cloudflared's")["met"] is True
    assert _goal(goals, "websocket-echo: edge CPU per request <= cloudflared's")["value"] == 1.0
    # ours: 0.4 ms per request against cloudflared's 0.3 ms
    ours = _goal(goals, "get-c32: our connector CPU per request <= 1.5x cloudflared's")
    assert (ours["target"], ours["path"], ours["met"]) == (2, "lab", True)
    assert ours["value"] == pytest.approx(1.333)
    assert _goal(goals, "post-1mib-c8: our connector CPU per request <= 1.5x cloudflared's")["value"] == 2.0
    missing = _goal(goals, "websocket-echo: our connector CPU per request <= 1.5x cloudflared's")
    assert (missing["value"], missing["met"]) == (None, None)


def test_memory_targets_over_many_requests_and_idle_eyeballs() -> None:
    runs = [Run("many-requests", "lab", {"requests": 10000},
                components={"edge": {"rss_growth_mb": 19.9}, "connector": {"rss_growth_mb": 20.0}}),
            Run("idle-eyeballs", "lab", {"connections": 1000, "edge_rss_growth_mb": 49.0})]
    goals = targets(runs)
    assert _goal(goals, "edge peak RSS growth over 10000 requests < 20 MB")["met"] is True
    assert _goal(goals, "connector peak RSS growth over 10000 requests < 20 MB")["met"] is False
    idle = _goal(goals, "edge RSS for 1000 idle eyeball connections < 50 MB")
    assert (idle["target"], idle["value"], idle["met"]) == (7, 49.0, True)


def test_goals_missed_when_the_tunnel_is_slow() -> None:
    goals = targets(_runs(1000.0, 399.0, 0.1, 1.2))
    assert _goal(goals, "GET c=32 req/s >= 40% of direct")["met"] is False
    assert _goal(goals, "added p50 at c=1 < 1 ms")["met"] is False


def test_no_goals_without_a_tunnel_path() -> None:
    assert targets([r for r in _runs(1.0, 1.0, 1.0, 1.0) if r.path == "direct"]) == []


def test_table_shows_ratios_costs_goals_and_failures() -> None:
    failed = Run("upload", "lab", failure="TimeoutError: timed out", errors=1)
    runs = [*_runs(1000.0, 450.0, 0.1, 0.9), failed]
    text = render_table(runs, targets(runs))
    assert "45%" in text  # get-c32 lab/direct
    assert "25%" in text  # download lab/direct
    assert "FAILED" in text
    assert "upload on lab: TimeoutError: timed out" in text
    assert "first connection 0.400 s" in text
    assert "1.00 / 80" in text  # edge CPU s / peak RSS MB during the download
    assert "issue 16 targets" in text and "CPU ms per request" in text


def test_failed_run_json_has_no_figures() -> None:
    doc = Run("download", "lab", failure="boom", errors=1).as_json()
    assert doc == {"workload": "download", "path": "lab", "errors": 1, "failure": "boom"}


def test_percentiles_nearest_rank() -> None:
    result = load.LoadResult(latencies=[i / 1000 for i in range(1, 101)])
    assert result.percentile_ms(50) == pytest.approx(50.0)
    assert result.percentile_ms(99) == pytest.approx(99.0)
    assert load.LoadResult().percentile_ms(50) == 0.0
    reported = load.LoadResult(reported_percentiles_ms={50.0: 1.5})
    assert reported.percentile_ms(50) == 1.5


@pytest.mark.parametrize(("text", "seconds"), [("12.5us", 12.5e-6), ("3.2ms", 3.2e-3), ("1.01s", 1.01),
                                                ("2m", 120.0)])
def test_wrk_durations(text: str, seconds: float) -> None:
    assert load._wrk_duration(text) == pytest.approx(seconds)


def test_without_option_drops_both_spellings() -> None:
    argv = ["--tiny", "--json", "a.json", "--cloudflared=/x", "--json=b.json", "--workdir", "w"]
    assert _without_option(_without_option(argv, "--json"), "--cloudflared") == ["--tiny", "--workdir", "w"]


def test_profile_summary_self_time_and_project_lines() -> None:
    from tunnel_lab.bench.profile import summarize

    collapsed = "\n".join([
        "main (/work/x/edge/cli.py:10);_reader (/work/x/edge/tunnel.py:290);"
        "receive_data (/v/lib/python3.11/site-packages/h2/connection.py:1520) 3",
        "main (/work/x/edge/cli.py:10);flush (/work/x/edge/tunnel.py:682);"
        "send (/v/lib/python3.11/site-packages/trio/_socket.py:40) 1",
        "garbage line",
    ])
    text = summarize(collapsed)
    assert text.startswith("4 samples")
    assert "75.0%  receive_data (h2/connection.py)" in text
    assert "25.0%  send (trio/_socket.py)" in text
    assert "100.0%  edge/cli.py:10 main" in text
    assert "75.0%  edge/tunnel.py:290 _reader" in text
    assert summarize("") == "no samples\n"

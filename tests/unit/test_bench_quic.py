"""bench.quic: QUIC figures as same-run ratios against their http2 twins (no processes)."""

from __future__ import annotations

import pytest

from tunnel_lab.bench.cli import Run
from tunnel_lab.bench.quic import quic_ratios, render_quic_table


def _small(path: str, rps: float, requests: int, edge_cpu: float, conn_cpu: float) -> Run:
    return Run("get-c32", path, {"requests": requests, "requests_per_s": rps, "p50_ms": 1.0},
               components={"edge": {"cpu_s": edge_cpu}, "connector": {"cpu_s": conn_cpu}})


def _row(rows: list[dict[str, object]], path: str, figure: str) -> dict[str, object]:
    return next(r for r in rows if r["path"] == path and r["figure"] == figure)


def test_ratios_are_quic_over_its_own_http2_twin() -> None:
    runs = [
        _small("lab", 500.0, 1000, 1.0, 0.5), _small("lab-quic", 400.0, 800, 1.2, 0.8),
        Run("download", "lab", {"mb_per_s": 40.0}), Run("download", "lab-quic", {"mb_per_s": 18.0}),
        Run("upload", "lab", {"mb_per_s": 40.0}), Run("upload", "lab-quic", {"mb_per_s": 30.0}),
        Run("download", "cloudflared", {"mb_per_s": 100.0}),  # no cloudflared-quic: no rows for it
    ]
    rows = quic_ratios(runs)
    assert {r["path"] for r in rows} == {"lab-quic"}
    assert _row(rows, "lab-quic", "get-c32 requests/s")["ratio"] == pytest.approx(0.8)
    edge = _row(rows, "lab-quic", "get-c32 edge CPU per request")
    assert (edge["quic"], edge["http2"], edge["ratio"], edge["met"]) == (1.5, 1.0, 1.5, True)
    connector = _row(rows, "lab-quic", "get-c32 connector CPU per request")
    assert (connector["ratio"], connector["met"]) == (2.0, False)
    assert _row(rows, "lab-quic", "bulk download")["met"] is False  # 45 % < 50 %
    assert _row(rows, "lab-quic", "bulk upload")["met"] is True
    # Figures a run lacks are unknown, not failed.
    latency = _row(rows, "lab-quic", "get-c1 p50 latency")
    assert (latency["ratio"], latency["met"]) == (None, None)
    text = render_quic_table(rows)
    assert "lab-quic / lab" in text and "0.45" in text and "NO" in text


def test_a_failed_run_gives_no_ratio() -> None:
    failed = Run("download", "cloudflared-quic", {"mb_per_s": 5.0}, failure="OSError: reset")
    rows = quic_ratios([Run("download", "cloudflared", {"mb_per_s": 50.0}), failed])
    assert _row(rows, "cloudflared-quic", "bulk download")["ratio"] is None
    assert quic_ratios([Run("download", "lab", {"mb_per_s": 50.0})]) == []

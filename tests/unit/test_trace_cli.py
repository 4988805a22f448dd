"""`tunnel-lab trace show|diagram` on good and damaged traces (lab/trace_cli.py): clear messages, no
traceback, what could be read is shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunnel_lab.lab.trace_cli import main

RAY = "0123456789abcdef-LAB1"


def _write(path: Path, *records: dict[str, object], tail: str = "") -> str:
    lines = [json.dumps({"v": 1, "t": i / 10, **r}) + "\n" for i, r in enumerate(records)]
    path.write_text("".join(lines) + tail)
    return str(path)


def _trace(tmp_path: Path, tail: str = "") -> str:
    return _write(
        tmp_path / "edge.jsonl", {"kind": "trace.start", "component": "edge"},
        {"kind": "eyeball.request", "component": "edge", "ray": RAY, "method": "GET", "target": "/x"},
        {"kind": "h2.frame", "component": "edge", "conn": "edge#1", "stream": 3, "dir": "out",
         "type": "HEADERS", "flags": ["END_STREAM"], "ray": RAY, "headers": [[":path", "/x"]]},
        {"kind": "h2.frame", "component": "edge", "conn": "edge#1", "stream": 0, "dir": "in", "type": "PING"},
        {"kind": "trace.end", "component": "edge", "records": 5, "dropped": 0}, tail=tail)


def test_show_filters_and_colours_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _trace(tmp_path)
    assert main(["show", path, "--ray", RAY]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and "HEADERS END_STREAM :path=/x" in out and "\x1b[" not in out
    assert main(["show", path, "--kind", "h2", "--stream", "0", "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\x1b[") and "PING" in out and "HEADERS" not in out
    assert main(["show", path, "--group"]) == 0
    assert "== edge/edge#1/3" in capsys.readouterr().out
    assert main(["show", path, "--ray", "nope"]) == 1
    assert "no record matches" in capsys.readouterr().err


def test_damaged_or_foreign_input_is_read_as_far_as_it_goes(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = _trace(tmp_path, tail='{"v": 1, "t": 9, "kind": "h2.fr')
    newer = _write(tmp_path / "newer.jsonl", {"kind": "h9.thing", "component": "edge"})
    newer_text = Path(newer).read_text().replace('"v": 1', '"v": 7')
    Path(newer).write_text(newer_text)
    assert main(["show", path, newer, str(tmp_path / "missing.jsonl")]) == 0
    captured = capsys.readouterr()
    assert "PING" in captured.out and "h9.thing" in captured.out
    assert f"{path}:6: truncated" in captured.err and "format version 7 (newer" in captured.err
    assert "missing.jsonl: cannot read" in captured.err and "Traceback" not in captured.err
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\xff not a trace\n")
    assert main(["show", str(garbage)]) == 1
    assert "no readable record" in capsys.readouterr().err


def test_diagram_of_a_ray_and_of_an_unknown_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _trace(tmp_path)
    svg = tmp_path / "d.svg"
    assert main(["diagram", path, "--ray", RAY, "--svg", str(svg)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sequenceDiagram") and "Eyeball->>Edge: GET /x" in out
    assert svg.read_text().startswith("<svg")
    assert main(["diagram", path, "--ray", "other"]) == 1
    assert f"no record of ray 'other' in the trace; rays there: {RAY}" in capsys.readouterr().err


def test_a_multi_process_edges_trace_brings_its_workers_files(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # The parent's file names the workers' files (docs/trace.md, "A multi-process edge"); one name reads
    # them all, merged by time; naming a part again does not repeat it; a missing part is said, by name.
    parent = _write(tmp_path / "edge.trace.jsonl",
                    {"kind": "trace.start", "component": "edge",
                     "parts": ["edge.trace.w0.jsonl", "edge.trace.w1.jsonl", "edge.trace.w2.jsonl"]},
                    {"kind": "trace.end", "component": "edge", "records": 2, "dropped": 0})
    _write(tmp_path / "edge.trace.w0.jsonl", {"kind": "trace.start", "component": "edge", "worker": 0},
           {"kind": "h2.frame", "component": "edge", "conn": "edge#1@w0", "stream": 0, "dir": "in",
            "type": "PING", "worker": 0},
           {"kind": "trace.end", "component": "edge", "records": 3, "dropped": 0, "worker": 0})
    _trace(tmp_path)  # edge.jsonl: the request, at the same times as worker 0's records
    Path(tmp_path / "edge.jsonl").rename(tmp_path / "edge.trace.w1.jsonl")
    part = str(tmp_path / "edge.trace.w1.jsonl")
    assert main(["show", parent, part, "--kind", "h2", "--color", "never"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("PING") == 2 and captured.out.count("HEADERS") == 1, captured.out
    assert "edge#1@w0" in captured.out
    assert captured.err.count("edge.trace.w2.jsonl: cannot read (named by") == 1, captured.err
    assert main(["diagram", parent, "--ray", RAY]) == 0
    assert "Eyeball->>Edge: GET /x" in capsys.readouterr().out

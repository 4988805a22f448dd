"""The origin's in-memory history is bounded; the history file keeps everything."""

from __future__ import annotations

import json
from pathlib import Path

from tunnel_lab.origin_fixtures.history import History, RequestRecord


def _record(history: History) -> RequestRecord:
    return RequestRecord(seq=history.next_seq(), time=history.now(), kind="echo", peer="127.0.0.1:1",
                         tls=False, method="GET", target="/", http_version="1.1")


def test_memory_keeps_only_the_most_recent_records_and_the_file_keeps_all(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    history = History(path, limit=3)
    for _ in range(5):
        history.finish(history.begin(_record(history)))
    assert [r.seq for r in history.records] == [3, 4, 5]
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]

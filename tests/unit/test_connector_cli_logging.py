"""cloudflared's console log format, --output json, --logfile, --loglevel."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.connector.logging_setup import (
    ConsoleFormatter,
    JSONFormatter,
    format_value,
    setup_logging,
    split_fields,
)

LINE = (
    "Registered tunnel connection connIndex=0 connection=c0ffee00-1234-4abc-8def-0123456789ab event=0 "
    "ip=127.0.0.1 location=LAB1 protocol=http2"
)


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(msg: str, level: int = logging.INFO, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("tunnel_lab.connector.edge_conn", level, __file__, 1, msg, args, None)
    rec.created = 1795596600.0  # 2026-11-25T08:50:00Z
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_console_format_is_cloudflareds() -> None:
    out = ConsoleFormatter().format(record(LINE))
    assert out == "2026-11-25T08:50:00Z INF " + LINE
    levels = {logging.DEBUG: "DBG", logging.WARNING: "WRN", logging.ERROR: "ERR", logging.CRITICAL: "FTL"}
    for level, abbrev in levels.items():
        assert ConsoleFormatter().format(record("x", level)).split(" ")[1] == abbrev


def test_extra_fields_sorted_with_error_first() -> None:
    rec = record(
        "Serve tunnel error",
        logging.ERROR,
        fields={"ip": "127.0.0.2", "connIndex": 0, "error": "dial tcp: connection refused", "event": 0},
    )
    out = ConsoleFormatter().format(rec)
    assert out == (
        '2026-11-25T08:50:00Z ERR Serve tunnel error error="dial tcp: connection refused" connIndex=0 '
        "event=0 ip=127.0.0.2"
    )


def test_json_output_splits_trailing_fields() -> None:
    doc = json.loads(JSONFormatter().format(record(LINE)))
    assert doc == {
        "level": "info",
        "time": "2026-11-25T08:50:00Z",
        "message": "Registered tunnel connection",
        "connIndex": 0,
        "connection": "c0ffee00-1234-4abc-8def-0123456789ab",
        "event": 0,
        "ip": "127.0.0.1",
        "location": "LAB1",
        "protocol": "http2",
    }


def test_split_fields_quoted_and_lists() -> None:
    text, fields = split_fields(
        'Tunnel connection options connIndex=0 features=["a","b"] error="x y" ok=true'
    )
    assert text == "Tunnel connection options"
    assert fields == {"connIndex": 0, "features": ["a", "b"], "error": "x y", "ok": True}
    assert split_fields("Version 2026.8.2 (Checksum abc)") == ("Version 2026.8.2 (Checksum abc)", {})


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][A-Za-z]{0,8}", fullmatch=True),
        st.one_of(st.integers(-5, 10**6), st.text(max_size=20)),
        max_size=5,
    )
)
def test_fields_round_trip_through_console_then_json(fields: dict[str, object]) -> None:
    line = "Message " + " ".join(f"{k}={format_value(v)}" for k, v in fields.items())
    text, parsed = split_fields(line.rstrip())
    assert text.rstrip() == "Message"
    expected = {
        k: int(v) if isinstance(v, str) and re.fullmatch(r"-?[0-9]+", v) else v for k, v in fields.items()
    }
    expected = {k: (v == "true" if v in ("true", "false") else v) for k, v in expected.items()}
    assert parsed == expected


def test_setup_logging_levels_output_and_logfile(tmp_path: Path) -> None:
    stream = io.StringIO()
    logfile = tmp_path / "cf.log"
    notes = setup_logging("warn", output="json", logfile=str(logfile), stream=stream)
    assert notes == []
    log = logging.getLogger("tunnel_lab.connector.test")
    log.info("hidden")
    log.warning("Retrying connection in up to %ds connIndex=%d", 4, 0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == "Retrying connection in up to 4s"
    file_doc = json.loads(logfile.read_text().splitlines()[0])
    assert file_doc["level"] == "warn" and file_doc["connIndex"] == 0
    # setting up again replaces our handlers instead of duplicating them
    setup_logging("info", stream=stream)
    log.info("once")
    assert stream.getvalue().count("once") == 1


def test_unknown_level_falls_back_to_info_like_cloudflared() -> None:
    notes = setup_logging("chatty", stream=io.StringIO())
    assert notes == ['Failed to parse log level "chatty", using "info" instead']
    assert logging.getLogger().level == logging.INFO


def test_default_handler_follows_sys_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    logging.getLogger("tunnel_lab.connector.test").info("to stderr")
    assert "INF to stderr" in capsys.readouterr().err

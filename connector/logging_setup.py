"""cloudflared-style logging for the connector's processes.

The console format is zerolog's console writer as cloudflared configures it, so that tools reading
cloudflared's logs read ours::

    2026-11-25T08:50:00Z INF Registered tunnel connection connIndex=0 connection=... event=0 ip=127.0.0.1

Shells log with %-style arguments and put the identities into the message as trailing `key=value`
pairs (`"Registered tunnel connection connIndex=%d ..."`). Extra fields may also be passed as
`extra={"fields": {...}}`; they are appended sorted by name with `error` first, as zerolog does.
`--output json` gives one JSON object a line with `level`, `time`, `message` and every `key=value`
field found at the end of the message. `--logfile` appends JSON lines, as cloudflared's file writer does.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

LEVEL_ABBREV = {
    logging.DEBUG: "DBG",
    logging.INFO: "INF",
    logging.WARNING: "WRN",
    logging.ERROR: "ERR",
    logging.CRITICAL: "FTL",
}
LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}
# cloudflared's --loglevel values (zerolog.ParseLevel), plus Python's spellings.
PARSE_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}

_HANDLER_TAG = "_tunnel_lab_handler"
# A trailing field: key=value, key="quoted value", or key=[json list] / {json object}.
_FIELD_RE = re.compile(
    r"""\s([A-Za-z_][A-Za-z0-9_.\-]*)=("(?:[^"\\]|\\.)*"|\[[^\]]*\]|\{[^}]*\}|\S*)$"""
)


def parse_level(text: str) -> int | None:
    """The logging level for a cloudflared `--loglevel` value, or None when unknown."""
    return PARSE_LEVELS.get(text.strip().lower())


def format_value(value: Any) -> str:
    """A field value as zerolog's console writer prints it (quoted when it needs to be)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    text = str(value)
    if text == "" or any(c in text for c in ' \\"=\t\r\n') or not text.isprintable() or text[0] in "[{":
        return json.dumps(text)
    return text


def split_fields(message: str) -> tuple[str, dict[str, Any]]:
    """Split `text k=v k2="a b"` into the text and its trailing fields (for JSON output)."""
    fields: list[tuple[str, Any]] = []
    rest = message
    while True:
        m = _FIELD_RE.search(rest)
        if m is None:
            break
        key, raw = m.group(1), m.group(2)
        value: Any = raw
        if raw[:1] in ('"', "[", "{"):
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
        elif re.fullmatch(r"-?[0-9]+", raw):
            value = int(raw)
        elif raw in ("true", "false"):
            value = raw == "true"
        fields.append((key, value))
        rest = rest[: m.start()]
    fields.reverse()
    return rest, dict(fields)


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))


class ConsoleFormatter(logging.Formatter):
    """`2026-11-25T08:50:00Z INF message key=value ...` (zerolog console writer, no colour)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        extra = _record_fields(record)
        parts = [_timestamp(record), LEVEL_ABBREV.get(record.levelno, "???"), message]
        keys = sorted(extra, key=lambda k: (k != "error", k))
        parts += [f"{k}={format_value(extra[k])}" for k in keys]
        line = " ".join(p for p in parts if p != "")
        if record.exc_info and record.levelno >= logging.ERROR and logging.getLogger().isEnabledFor(
                logging.DEBUG):
            # Tracebacks only at debug level: users see messages, developers see stacks.
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object a line: `level`, `time`, `message`, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        text, fields = split_fields(record.getMessage())
        fields.update(_record_fields(record))
        obj: dict[str, Any] = {
            "level": LEVEL_NAMES.get(record.levelno, "info"),
            "time": _timestamp(record),
            "message": text,
        }
        for key, value in fields.items():
            obj.setdefault(key, value)
        return json.dumps(obj, separators=(",", ":"), default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (test captures replace it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def setup_logging(level: str = "info", *, output: str = "default", logfile: str | None = None,
                  stream: TextIO | None = None) -> list[str]:
    """Install the connector's handlers on the root logger; returns warnings to log once ready.

    Unknown levels fall back to info with an error line, as cloudflared does.
    """
    notes: list[str] = []
    levelno = parse_level(level)
    if levelno is None:
        notes.append(f'Failed to parse log level "{level}", using "info" instead')
        levelno = logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            root.removeHandler(handler)
            handler.close()
    console: logging.Handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    console.setFormatter(JSONFormatter() if output == "json" else ConsoleFormatter())
    setattr(console, _HANDLER_TAG, True)
    root.addHandler(console)
    if logfile:
        file_handler = logging.FileHandler(logfile, mode="a", encoding="utf-8")
        file_handler.setFormatter(JSONFormatter())
        setattr(file_handler, _HANDLER_TAG, True)
        root.addHandler(file_handler)
    root.setLevel(levelno)
    # Third-party chatter (h2's frame logs) stays out unless asked for at debug level.
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(max(levelno, logging.INFO))
    return notes

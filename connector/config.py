"""cloudflared's YAML configuration file, loaded with line numbers; Go durations.

Pure: no logging, no trio. `load_config(path)` gives a `ConfigFile` whose `data` is plain Python
values and whose `line(...)` names the line of any key or list item, so that every error about a
config file can say `FILE:LINE: what is wrong (what to do)`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunnel_lab.wire.errors import ConfigError

# cloudflared's search path for config.yml / config.yaml when --config is not given (Unix).
DEFAULT_CONFIG_DIRS = ("~/.cloudflared", "~/.cloudflare-warp", "~/cloudflare-warp", "/etc/cloudflared",
                       "/usr/local/etc/cloudflared")
DEFAULT_CONFIG_FILES = ("config.yml", "config.yaml")

PathKey = tuple[str | int, ...]


@dataclass
class ConfigFile:
    """A parsed config file: `data` (a dict, `{}` for an empty file) and the line of every node."""

    source: str
    data: dict[str, Any]
    lines: dict[PathKey, int] = field(default_factory=dict)
    empty: bool = False

    def line(self, *keys: str | int) -> int | None:
        """1-based line of the node at `keys` (e.g. `("ingress", 2, "service")`), or of its nearest parent."""
        path: PathKey = tuple(keys)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def find_default_config() -> str | None:
    """The first existing file of cloudflared's default search path, or None."""
    for directory in DEFAULT_CONFIG_DIRS:
        for name in DEFAULT_CONFIG_FILES:
            path = Path(os.path.expanduser(directory)) / name
            if path.is_file():
                return str(path)
    return None


def search_path_text() -> str:
    """The search path as cloudflared prints it in its log."""
    return f"[{' '.join(DEFAULT_CONFIG_FILES)}] in [{' '.join(DEFAULT_CONFIG_DIRS)}]"


def load_config(path: str) -> ConfigFile:
    """Read and parse a YAML config file; raises `ConfigError` naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", source=path,
                          hint="check the --config path, or omit --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file: {exc}", source=path) from None
    return parse_config_text(text, source=path)


def parse_config_text(text: str, *, source: str) -> ConfigFile:
    """Parse YAML text into a `ConfigFile` (top level must be a mapping)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"invalid YAML: {problem}", source=source, line=line,
                          hint="fix the YAML syntax (indentation, quotes, ':' after keys)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", source=source) from None
    if node is None:
        return ConfigFile(source=source, data={}, empty=True)
    lines: dict[PathKey, int] = {}
    data = _convert(node, (), lines, source)
    if data is None:
        return ConfigFile(source=source, data={}, lines=lines, empty=True)
    if not isinstance(data, dict):
        raise ConfigError("the top level of a config file must be a mapping of keys to values",
                          source=source, line=node.start_mark.line + 1,
                          hint="write `key: value` lines, e.g. `tunnel: <UUID>`")
    return ConfigFile(source=source, data=data, lines=lines)


_constructor = yaml.SafeLoader("")


def _convert(node: yaml.Node, path: PathKey, lines: dict[PathKey, int], source: str) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError("mapping keys must be plain names", source=source,
                                  line=key_node.start_mark.line + 1)
            key = str(_constructor.construct_object(key_node))
            if key in out:
                raise ConfigError(f"key {key!r} is defined twice", source=source,
                                  line=key_node.start_mark.line + 1, hint="keep only one of them")
            out[key] = _convert(value_node, (*path, key), lines, source)
            lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), lines, source) for i, item in enumerate(node.value)]
    try:
        return _constructor.construct_object(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid value: {exc}", source=source, line=node.start_mark.line + 1) from None


# --- Go durations -------------------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
          "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Go's `time.ParseDuration` ("5s", "1m30s", "300ms", "1h", "0") -> seconds; ValueError if bad."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


def format_go_duration(seconds: float) -> str:
    """Go's `time.Duration.String()` for a whole number of milliseconds or more ("1m30s", "24h0m0s")."""
    if seconds == 0:
        return "0s"
    neg = seconds < 0
    seconds = abs(seconds)
    if seconds < 1:
        ms = seconds * 1000
        text = f"{ms:g}ms" if ms >= 1 else f"{seconds * 1e6:g}\u00b5s"
        return ("-" if neg else "") + text
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    sec_text = f"{secs:.9f}".rstrip("0").rstrip(".") + "s"
    if hours:
        text = f"{int(hours)}h{int(minutes)}m{sec_text}"
    elif minutes:
        text = f"{int(minutes)}m{sec_text}"
    else:
        text = sec_text
    return ("-" if neg else "") + text

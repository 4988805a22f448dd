"""Loading the golden wire vectors (../shared/vectors); tests skip with a reason when they are absent."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VECTORS, VECTORS_GO126

FOLDERS = (VECTORS, VECTORS_GO126)


@dataclass(frozen=True)
class Vector:
    """One per-exchange vector file."""

    path: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def argv(self) -> list[str]:
        return list(self.data.get("cloudflared_argv") or [])

    @property
    def stream_id(self) -> int | None:
        return self.data.get("stream_id")

    def edge_headers(self) -> list[tuple[bytes, bytes]]:
        """`edge_request_headers` as bytes pairs (str values are UTF-8, as on the wire)."""
        return [(k.encode(), v.encode()) for k, v in self.data["edge_request_headers"]]

    def stream_frames(self, direction: str) -> list[dict[str, Any]]:
        """This exchange's frames on its stream in one direction (`edge->cloudflared` or back)."""
        return [f for f in self.data.get("frames", [])
                if f.get("stream_id") == self.stream_id and f.get("direction") == direction]

    def edge_end_stream_on_headers(self) -> bool:
        """Whether the edge's HEADERS carried END_STREAM."""
        for frame in self.stream_frames("edge->cloudflared"):
            if frame["type"] == "HEADERS":
                return "END_STREAM" in frame["flags"]
        raise AssertionError(f"{self.name}: no edge HEADERS frame")

    def edge_data_frames(self) -> list[bytes]:
        """Payloads of the edge's DATA frames on this stream, in order."""
        return [bytes.fromhex(f.get("data_hex", "")) for f in self.stream_frames("edge->cloudflared")
                if f["type"] == "DATA"]

    def response_header_list(self) -> list[tuple[bytes, bytes]]:
        """The response HEADERS fields as captured (header values are UTF-8 or Latin-1 text)."""
        return [(k.encode(), _value_bytes(v)) for k, v in self.data["response_headers"]]

    def deserialized(self) -> list[tuple[bytes, bytes]]:
        """`response_user_headers_deserialized` as bytes pairs (`value_hex` wins when present)."""
        out = []
        for item in self.data["response_user_headers_deserialized"]:
            value = bytes.fromhex(item["value_hex"]) if "value_hex" in item else item["value"].encode()
            out.append((item["name"].encode(), value))
        return out


def _value_bytes(value: str) -> bytes:
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def require_vectors() -> None:
    """Skip the calling test when the shared vectors are not beside the checkout."""
    missing = [str(p) for p in FOLDERS if not p.is_dir()]
    if missing:
        pytest.skip(f"golden vectors not found: {', '.join(missing)} (set TUNNEL_LAB_SHARED)")


def load_exchange_vectors() -> list[Vector]:
    """Every per-exchange vector file (those with `edge_request_headers`) of both folders, sorted."""
    out = []
    for folder in FOLDERS:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            if "transcript" in path.name:
                continue
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("edge_request_headers"):
                out.append(Vector(path, data))
    return out


def vector_params(predicate: Any = None) -> list[Any]:
    """pytest params (id = file stem) of the exchange vectors matching `predicate`; a single skipped
    param when the vectors are absent, so collection never fails."""
    vectors = [v for v in load_exchange_vectors() if predicate is None or predicate(v)]
    if not vectors:
        reason = "golden vectors not found (../shared/vectors; set TUNNEL_LAB_SHARED)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    return [pytest.param(v, id=v.name) for v in vectors]

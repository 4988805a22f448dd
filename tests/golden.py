"""The golden wire vectors in `tests/vectors/` (see its README.md): paths and a loader for the
per-exchange files. They are part of the repository, so golden tests always run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

VECTORS_ROOT = Path(__file__).resolve().parent / "vectors"
#: Captured from a go1.27.3 build of cloudflared 2026.8.2 (runs A, B, C).
VECTORS = VECTORS_ROOT / "cloudflared-2026.8.2"
#: Captured from the released go1.26.4 build (runs D, E, F, G).
VECTORS_GO126 = VECTORS_ROOT / "cloudflared-2026.8.2-go1.26"
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


def load_exchange_vectors() -> list[Vector]:
    """Every per-exchange vector file (those with `edge_request_headers`) of both folders, sorted."""
    out = []
    for folder in FOLDERS:
        for path in sorted(folder.glob("*.json")):
            if "transcript" in path.name:
                continue
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("edge_request_headers"):
                out.append(Vector(path, data))
    return out


def vector_params(predicate: Any = None) -> list[Any]:
    """pytest params (id = file stem) of the exchange vectors matching `predicate`."""
    vectors = [v for v in load_exchange_vectors() if predicate is None or predicate(v)]
    if not vectors:
        # An empty parameter set would only skip: a missing vectors folder must fail instead.
        raise FileNotFoundError(f"no golden exchange vectors under {VECTORS_ROOT}")
    return [pytest.param(v, id=v.name) for v in vectors]

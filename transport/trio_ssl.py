"""The one trio internal we read: the `ssl.SSLObject` under a `trio.SSLStream` (trio keeps it private).

The origin fixtures serve TLS with trio's `SSLStream` and need the object their SNI callback saw, to tell
which name a client asked for. Pinned by tests/unit/test_transport_trio_ssl.py.
"""

from __future__ import annotations

import ssl
from typing import Any

import trio


def ssl_object(stream: trio.SSLStream[Any]) -> ssl.SSLObject | None:
    """The `ssl.SSLObject` of `stream` (trio's `SSLStream._ssl_object`), or None if trio renamed it."""
    obj = getattr(stream, "_ssl_object", None)
    return obj if isinstance(obj, ssl.SSLObject) else None

"""transport.trio_ssl: trio still keeps the SSLObject where we read it."""

from __future__ import annotations

import ssl

import trio
import trio.testing

from tunnel_lab.transport.trio_ssl import ssl_object


def test_an_ssl_stream_keeps_its_ssl_object_where_we_read_it() -> None:
    ctx = ssl.create_default_context()
    stream = trio.SSLStream(trio.testing.memory_stream_pair()[0], ctx, server_hostname="origin.test")
    obj = ssl_object(stream)
    assert isinstance(obj, ssl.SSLObject)
    assert obj.server_hostname == "origin.test" and obj.context is ctx

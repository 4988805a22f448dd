"""The connector against a hostile or wedged edge (issue 11): a bad stream costs only that stream, and
`--grace-period` holds even when no byte can be sent any more."""

from __future__ import annotations

import pytest
import trio

from tests.component.connector_edge import (
    FakeEdge,
    RawOrigin,
    get,
    http_rule,
    make_ca,
    make_settings,
    start_connector,
    wait_ready,
)

pytestmark = [pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning")]



def big_response(_rec: object) -> bytes:
    body = b"b" * (4 * 1024 * 1024)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


async def test_grace_period_holds_when_the_edge_grants_no_window(tmp_path):
    """The edge stops returning window (a leaked stream's data never acknowledged): the connector can send
    nothing, not even its unregisterConnection, yet SIGTERM ends it after the grace period."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            raw = RawOrigin(big_response)
            port = await nursery.start(raw.serve)
            ca, ca_path = make_ca(tmp_path)
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            run = await start_connector(nursery, make_settings(ca_path, [addr], (http_rule(port),),
                                                               grace_period=1))
            await edge.wait_for(lambda: len(edge.registered) == 1)
            await wait_ready(run)
            side = edge.registered[0]
            es = await side.open(get("/big"), end_stream=True)
            es.auto_ack = False  # the connection window (64 KiB) is never given back
            await es.wait(lambda _r: side.h2.inbound_flow_control_window == 0)
            run.handle.shutdown()
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()

"""A malformed request stream from the edge costs that stream only (issue 11, defect 2): Go's HTTP/2 server
resets it with PROTOCOL_ERROR and keeps the connection; h2 on its own would drop the connection."""

from __future__ import annotations

import h2.errors
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



BAD = {
    "shorter-than-content-length": ([(b"content-length", b"6")], b""),
    "longer-than-content-length": ([(b"content-length", b"2")], b"abcdef"),
    "content-length-not-a-number": ([(b"content-length", b"six")], b"abcdef"),
    "conflicting-content-lengths": ([(b"content-length", b"6"), (b"content-length", b"7")], b"abcdef"),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_a_malformed_stream_is_reset_and_the_connection_keeps_serving(tmp_path, case, caplog):
    extra, body = BAD[case]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            raw = RawOrigin()
            port = await nursery.start(raw.serve)
            ca, ca_path = make_ca(tmp_path)
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            run = await start_connector(nursery, make_settings(ca_path, [addr], (http_rule(port),)))
            await edge.wait_for(lambda: len(edge.registered) == 1)
            await wait_ready(run)
            side = edge.registered[0]
            slow = await side.open(get("/in-flight", method="POST"), end_stream=False)  # a concurrent stream
            bad = await side.open(get("/bad", method="POST", extra=extra), end_stream=False)
            await bad.send(body, end_stream=True)
            resp = await bad.finished()
            assert resp.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
            await slow.send(b"x", end_stream=True)
            assert (await slow.finished()).status == 200
            assert (await side.request(get("/next"))).status == 200
            assert not side.closed.is_set() and side.goaway is None
            assert "Malformed request stream from the edge, resetting the stream" in caplog.text
            run.handle.shutdown()
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()

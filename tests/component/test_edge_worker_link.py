"""The worker's end of the multi-process edge's control channel (edge.worker.ControlLink)."""

from __future__ import annotations

import json
from typing import Any, cast

import trio
import trio.testing

from tunnel_lab.edge.worker import ControlLink


async def test_messages_go_out_as_json_lines_and_parent_messages_come_in():
    ours, parents = trio.testing.memory_stream_pair()
    link = ControlLink(cast(Any, ours))
    await link.send("routes", tunnels=["t1"])
    assert json.loads(await parents.receive_some()) == {"op": "routes", "tunnels": ["t1"]}
    await parents.send_all(b'{"op":"peers","routes":{}}\n{"op":"shutdown"}\n')
    assert await link.receive() == {"op": "peers", "routes": {}}
    assert await link.receive() == {"op": "shutdown"}
    await parents.aclose()
    assert await link.receive() is None  # the parent closed the channel


async def test_a_send_after_the_parent_went_away_is_not_raised_into_the_sender(caplog):
    # A request task asking the parent for routes, or the route reporter, must not fail with a traceback
    # because the parent died: the worker's serve loop sees the channel end and shuts down.
    ours, parents = trio.testing.memory_stream_pair()
    await parents.aclose()
    link = ControlLink(cast(Any, ours))
    await link.send("routes", tunnels=["t1"])
    await link.send("took", fault="f1")
    assert link.broken
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "'routes' and later messages not sent" in warnings[0], warnings

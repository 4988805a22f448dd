"""`--stdin-control`: `reconnect 0s` on a fake stdin drops one connection; it registers again after the
per-connIndex backoff only (docs/protocol.md §9.7)."""

from __future__ import annotations

import trio
import trio.testing

from tests.component.connector_edge import FakeEdge, make_ca, make_settings, status_rule
from tunnel_lab.connector.runtime import run_tunnel

# The supervisor's backoff would outlast the test's deadline: the reconnect must not wait for it.
SLOW_KNOBS = {"backoff_base": 0.01, "supervisor_backoff_base": 60.0}


async def _start(nursery: trio.Nursery, settings, stdin) -> tuple[object, list[int], trio.Event]:
    code: list[int] = []
    done = trio.Event()

    async def runner(task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            code.append(await run_tunnel(settings, task_status=task_status, handle_signals=False,
                                         stdin=stdin))
        finally:
            done.set()

    handle = await nursery.start(runner)
    return handle, code, done


async def test_reconnect_drops_one_connection_and_registers_again(tmp_path, caplog):
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    ca, ca_path = make_ca(tmp_path)
    send, receive = trio.testing.memory_stream_one_way_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            settings = make_settings(ca_path, [addr], (status_rule(404),), ha_connections=1,
                                     stdin_control=True, **SLOW_KNOBS)
            handle, code, done = await _start(nursery, settings, receive)
            await edge.wait_for(lambda: len(edge.registered) == 1)
            first = edge.registered[0]
            await send.send_all(b"bogus command\n\nhelp\nreconnect soon\nreconnect 0s\n")
            await edge.wait_for(lambda: len(edge.registered) == 2)
            second = edge.registered[1]
            assert second is not first
            assert second.params is not None and second.params.conn_index == 0
            # the per-connIndex backoff counted one attempt, as cloudflared's does (observed: 1)
            assert second.params.options.num_previous_attempts == 1
            supervisor = handle.supervisor  # type: ignore[attr-defined]
            assert supervisor._supervisor_backoff.attempts == 0  # no supervisor backoff was drawn
            assert supervisor._first_loop is False  # connIndex 0 went through the supervisor
            while handle.ready_connections != 1:  # type: ignore[attr-defined]
                await trio.sleep(0.005)
            resp = await second.request(
                [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]
            )
            assert resp.status == 404
            handle.shutdown()  # type: ignore[attr-defined]
            await done.wait()
            assert code == [0]
            nursery.cancel_scope.cancel()
    text = caplog.text
    # cloudflared's levels and words (cmd/cloudflared/tunnel stdinControl): help twice, after the unknown
    # command and for `help`; Go's parse error; the signal with no fields
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name.endswith("stdin_control")]
    assert ("INFO", 'Unknown command command="bogus command"') in lines
    assert [level for level, text in lines if text.startswith("Supported command")] == ["INFO", "INFO"]
    assert ("ERROR", 'time: invalid duration "soon"') in lines
    assert ("INFO", "Sending reconnect signal") in lines
    assert "Restarting connection due to reconnect signal in 0s connIndex=0 event=0 ip=127.0.0.1" in text
    assert "Retrying connection in up to 10ms connIndex=0" in text
    terminated = [r for r in caplog.records if r.getMessage().startswith("Connection terminated error=")]
    assert [(r.getMessage(), r.levelname) for r in terminated] == [
        ('Connection terminated error="reconnect signal" connIndex=0', "ERROR")  # no connection left
    ]


async def test_stdin_ignored_without_the_flag(tmp_path):
    ca, ca_path = make_ca(tmp_path)
    send, receive = trio.testing.memory_stream_one_way_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            settings = make_settings(ca_path, [addr], (status_rule(404),), ha_connections=1, **SLOW_KNOBS)
            handle, _code, done = await _start(nursery, settings, receive)
            await edge.wait_for(lambda: len(edge.registered) == 1)
            await send.send_all(b"reconnect 0s\n")
            await trio.sleep(0.3)
            assert len(edge.registered) == 1 and len(edge.attempts) == 1
            handle.shutdown()  # type: ignore[attr-defined]
            await done.wait()
            nursery.cancel_scope.cancel()

"""The supervisor backoff after a failure that never registered (docs/protocol.md §9.4): connIndex 0 serves,
connIndex 1 can only reach addresses that refuse the dial."""

from __future__ import annotations

import logging

import trio
import trio.testing

from tests.component.connector_edge import (
    FakeEdge,
    make_ca,
    make_settings,
    start_connector,
    status_rule,
    wait_until,
)

REFUSING = ["127.0.0.2:1", "127.0.0.3:1"]  # nothing listens on port 1: the dial is refused at once


def _conn1(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "connIndex=1" in r.getMessage()]


def _terminated(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.getMessage().startswith("Connection terminated error=")]


async def test_a_dial_error_on_conn_index_1_goes_through_the_supervisor_backoff(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="tunnel_lab.connector")
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            settings = make_settings(ca_path, [addr, *REFUSING], (status_rule(),), ha_connections=2,
                                     backoff_base=0.01, supervisor_backoff_base=0.02, retries=3)
            run = await start_connector(nursery, settings)
            await wait_until(lambda: len(_terminated(_conn1(caplog))) >= 4)
            backoff = run.handle.supervisor._supervisor_backoff  # type: ignore[attr-defined]
            assert backoff.attempts >= 2  # the supervisor's count doubled: it was not reset in between
            run.handle.shutdown()
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()
    records = _conn1(caplog)
    # every attempt: the dial error, the per-connIndex wait, then the supervisor's line and its wait
    kinds = []
    for r in records:
        text = r.getMessage()
        for prefix, kind in (("Unable to establish", "dial"), ("Retrying connection", "retry"),
                             ("Connection terminated error=", "terminated"), ("Supervisor backoff", "wait")):
            if text.startswith(prefix):
                kinds.append(kind)
    attempts = kinds.count("dial")
    assert attempts >= 4
    assert kinds[: 4 * 4] == ["dial", "retry", "terminated", "wait"] * 4
    # cloudflared's ConnAwareLogger: a warning while connIndex 0 is registered
    assert {r.levelno for r in _terminated(records)} == {logging.WARNING}
    assert 'error="DialContext error: dial tcp 127.0.0.' in _terminated(records)[0].getMessage()


async def test_the_supervisor_backoff_holds_conn_index_1_back(tmp_path, caplog):
    """With a supervisor base of an hour, connIndex 1 dials once and then waits (the old behaviour retried
    after the per-connIndex backoff of 10 ms); shutdown still ends the wait at once."""
    caplog.set_level("INFO", logger="tunnel_lab.connector")
    ca, ca_path = make_ca(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = FakeEdge(ca)
            addr = await nursery.start(edge.serve)
            settings = make_settings(ca_path, [addr, *REFUSING], (status_rule(),), ha_connections=2,
                                     backoff_base=0.01, supervisor_backoff_base=3600.0)
            run = await start_connector(nursery, settings)
            await wait_until(lambda: len(_terminated(_conn1(caplog))) == 1)
            backoff = run.handle.supervisor._supervisor_backoff  # type: ignore[attr-defined]
            assert backoff.waiting == {1} and backoff.attempts == 1
            assert 0 <= backoff.timer_at - trio.current_time() < 7200
            # let everything that can run, run: connIndex 1 stays parked in the supervisor's wait
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert 1 not in run.handle.supervisor.connections  # type: ignore[attr-defined]
            dials = [r for r in _conn1(caplog) if r.getMessage().startswith("Unable to establish")]
            assert len(dials) == 1
            run.handle.shutdown()
            assert await run.exit_code() == 0
            nursery.cancel_scope.cancel()
    # the graceful end of connIndex 0: an error once no connection is registered, as cloudflared logs it
    graceful = [r for r in caplog.records if r.getMessage() == "Connection terminated connIndex=0"]
    assert [r.levelno for r in graceful] == [logging.ERROR]
    last = [r for r in caplog.records if r.getMessage() == "no more connections active and exiting"]
    assert [r.levelno for r in last] == [logging.ERROR]  # as in cloudflared's logs (tests/vectors, A and B)

"""The supervisor's shared backoff (connector.supervisor.SupervisorBackoff), docs/protocol.md §9.4: pure, with
the caller's clock and a scripted random source."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.connector.supervisor import SupervisorBackoff


class Draws(random.Random):
    """Returns `fraction` of each requested range and remembers the upper bounds asked for."""

    def __init__(self, fraction: float = 0.5) -> None:
        super().__init__(0)
        self.fraction = fraction
        self.bounds: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        assert a == 0
        self.bounds.append(b)
        return b * self.fraction


def test_a_failure_that_never_registered_waits_and_doubles_up_to_the_cap():
    rng = Draws()
    b = SupervisorBackoff(10.0, 3, rng)
    b.started(1)
    now = 0.0
    for _ in range(5):  # connIndex 1's dial fails every time
        restart = b.terminated(1, now)
        assert restart == now + rng.bounds[-1] / 2
        now = restart
    assert rng.bounds == [20, 40, 80, 80, 80]  # [0, 2^k * 10 s), k capped at --retries


def test_connections_ending_while_the_timer_runs_join_it():
    rng = Draws()
    b = SupervisorBackoff(10.0, 5, rng)
    for index in (1, 2, 3):
        b.started(index)
    first = b.terminated(2, now=0.0)
    assert b.terminated(1, now=3.0) == first == 10.0  # no new draw: one timer for everyone waiting
    assert rng.bounds == [20]
    assert b.waiting == {1, 2}
    # the timer has fired: both are connecting again; the next failure draws a doubled bound
    assert b.terminated(3, now=11.0) == 11.0 + 20.0
    assert rng.bounds == [20, 40]
    assert b.connecting == {1, 2} and b.waiting == {3}


def test_retries_zero_keeps_the_base_bound():
    rng = Draws()
    b = SupervisorBackoff(10.0, 0, rng)
    b.terminated(1, 0.0)
    b.terminated(1, 100.0)
    assert rng.bounds == [10, 10]


def test_the_count_resets_only_after_everyone_is_back_and_a_grace_time_passed():
    rng = Draws()
    b = SupervisorBackoff(10.0, 5, rng)
    b.started(1)
    b.started(2)
    b.terminated(1, 0.0)  # k = 1: [0, 20 s), fires at 10
    b.terminated(1, 20.0)  # k = 2: [0, 40 s), fires at 40
    assert b.attempts == 2
    assert b.registered(2, 41.0) is None  # connIndex 1 is still connecting (the timer fired at 40)
    grace = b.registered(1, 42.0)
    assert grace == 42.0 + 160.0 / 2  # [0, 2^(k+2) * 10 s) with k = 2
    # a failure before the grace deadline keeps doubling ...
    assert b.terminated(2, 50.0) == 90.0
    assert rng.bounds[-1] == 80 and b.attempts == 3
    assert b.terminated(1, 63.0) == 90.0  # joins the pending timer: no draw
    # ... and the deadline stays: the first draw after it starts from k = 1 again, all back or not
    b.terminated(2, 130.0)
    assert rng.bounds[-1] == 20 and b.attempts == 1 and b.reset_at is None


def test_a_later_grace_replaces_the_earlier_one():
    rng = Draws()
    b = SupervisorBackoff(10.0, 5, rng)
    b.started(1)
    assert b.registered(1, 0.0) == 20.0  # k = 0: [0, 40 s)
    b.terminated(1, 5.0)  # before the deadline: k = 1, fires at 15
    assert b.registered(1, 16.0) == 16.0 + 40.0  # k = 1: [0, 80 s)
    b.terminated(1, 30.0)  # after the first deadline (20) but before the second (56): no reset
    assert b.attempts == 2


def test_connindex_0_in_its_first_loop_is_not_watched():
    b = SupervisorBackoff(10.0, 5, Draws())
    b.started(1)
    assert b.registered(0, 1.0) is None  # startFirstTunnel's registration: not the supervisor's
    assert b.registered(1, 2.0) is not None
    # once connIndex 0 went through the supervisor, it is watched like the others
    b.terminated(0, 3.0)
    assert b.registered(0, 100.0) is not None


@given(
    events=st.lists(
        st.tuples(st.sampled_from(["start", "end", "up"]), st.integers(0, 3), st.floats(0, 50)), max_size=40
    ),
    retries=st.integers(0, 6),
    seed=st.integers(0, 2**32),
)
def test_any_history_keeps_the_bounds_and_the_sets_apart(events, retries, seed):
    rng = random.Random(seed)
    b = SupervisorBackoff(10.0, retries, rng)
    now = 0.0
    for kind, index, step in events:
        now += step
        b.registered(-1, now)  # lets a due timer fire (an unwatched connIndex changes nothing else)
        if index in b.waiting:
            continue  # a connIndex waiting for the timer is not running: it can neither start nor end
        if kind == "start":
            b.started(index)
        elif kind == "end":
            restart = b.terminated(index, now)
            assert now <= restart < now + 10.0 * 2**retries
            assert index in b.waiting
        else:
            grace = b.registered(index, now)
            if grace is not None:
                assert not b.connecting and not b.waiting
        assert not (b.connecting & b.waiting)
        assert 0 <= b.attempts <= retries


@pytest.mark.parametrize("fraction", [0.0, 0.999])
def test_the_timer_fires_at_its_deadline_not_before(fraction):
    b = SupervisorBackoff(10.0, 5, Draws(fraction))
    at = b.terminated(1, 0.0)
    b.registered(1, at - 1e-9 if at > 0 else 0.0)
    assert (1 in b.waiting) == (at > 0)
    b.registered(1, at)
    assert 1 not in b.waiting

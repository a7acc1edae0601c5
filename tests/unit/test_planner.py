"""The pure decisions of ``ghostrunner._planner``: no I/O, no clock, plain values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghostrunner import Delivery, Outcome, RetryPolicy, Run, RunState, Task
from ghostrunner._planner import (
    Decision,
    decide,
    decide_recovery,
    plan_dispatches,
    recover,
    recovery_deadline,
)
from ghostrunner.errors import ExecutorError, NotDelivered, OutcomeUnknown, PermanentError

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def mkrun(
    node: str,
    *,
    task_id: str = "t1",
    queued: float = -10,
    available: float | None = None,
    expires: float | None = None,
    state: RunState = RunState.PENDING,
    attempts: int = 0,
    undelivered: int = 0,
) -> Run:
    return Run(
        task_id=task_id,
        node_id=node,
        state=state,
        attempts=attempts,
        undelivered=undelivered,
        queued_at=at(queued),
        available_at=at(queued if available is None else available),
        expires_at=None if expires is None else at(expires),
    )


def plan(
    candidates: list[Run],
    *,
    online: set[str] | None = None,
    busy: frozenset[str] | set[str] = frozenset(),
    slots: int = 10,
    now: datetime = NOW,
) -> list[Run]:
    if online is None:
        online = {r.node_id for r in candidates}
    return plan_dispatches(candidates, online=online, busy=busy, slots=slots, now=now)


# --------------------------------------------------------------------------- plan_dispatches


def test_plan_chooses_ready_run_on_online_idle_device() -> None:
    run = mkrun("a")
    assert plan([run]) == [run]


def test_plan_skips_offline_device() -> None:
    a, b = mkrun("a"), mkrun("b")
    assert plan([a, b], online={"b"}) == [b]
    assert plan([a, b], online=set()) == []


def test_plan_skips_busy_device() -> None:
    a, b = mkrun("a"), mkrun("b")
    assert plan([a, b], busy={"a"}) == [b]
    assert plan([a, b], busy={"a", "b"}) == []


def test_plan_one_run_per_device_first_candidate_wins() -> None:
    first = mkrun("a", task_id="t1", queued=-30)
    second = mkrun("a", task_id="t2", queued=-20)
    other = mkrun("b", task_id="t1", queued=-10)
    chosen = plan([first, second, other])
    assert chosen == [first, other]
    assert len({r.node_id for r in chosen}) == len(chosen)


def test_plan_respects_slot_cap_taking_oldest() -> None:
    runs = [mkrun(f"n{i}", queued=-i) for i in range(5)]  # n4 is the oldest
    chosen = plan(runs, slots=2)
    assert [r.node_id for r in chosen] == ["n4", "n3"]


def test_plan_orders_oldest_first() -> None:
    young = mkrun("a", queued=-1)
    old = mkrun("b", queued=-100)
    middle = mkrun("c", queued=-50)
    assert [r.node_id for r in plan([young, old, middle])] == ["b", "c", "a"]


def test_plan_ties_on_available_at_broken_by_queued_at() -> None:
    later = mkrun("a", queued=-5, available=-1)
    earlier = mkrun("b", queued=-50, available=-1)
    assert [r.node_id for r in plan([later, earlier])] == ["b", "a"]


def test_plan_skips_runs_not_yet_available() -> None:
    future = mkrun("a", available=1)
    exactly_now = mkrun("b", available=0)
    assert plan([future, exactly_now]) == [exactly_now]
    assert plan([future], now=at(1)) == [future]


def test_plan_skips_expired_runs() -> None:
    expired = mkrun("a", expires=-1)
    expiring_now = mkrun("b", expires=0)
    alive = mkrun("c", expires=1)
    assert plan([expired, expiring_now, alive]) == [alive]


def test_plan_skips_runs_not_pending() -> None:
    runs = [mkrun(f"n{i}", state=s) for i, s in enumerate(RunState) if s is not RunState.PENDING]
    assert plan(runs) == []


@pytest.mark.parametrize("slots", [0, -1, -100])
def test_plan_no_slots_chooses_nothing(slots: int) -> None:
    assert plan([mkrun("a"), mkrun("b")], slots=slots) == []


def test_plan_skipped_run_does_not_block_its_device_sibling() -> None:
    # a run that is not ready does not mark its device as taken
    waiting = mkrun("a", task_id="t1", available=60)
    ready = mkrun("a", task_id="t2")
    assert plan([waiting, ready]) == [ready]


_node = st.sampled_from(["a", "b", "c", "d", "e"])
_offset = st.integers(min_value=-100, max_value=100)


@st.composite
def _candidates(draw: st.DrawFn) -> list[Run]:
    runs = []
    for i in range(draw(st.integers(0, 12))):
        queued = draw(st.integers(-200, 0))
        runs.append(
            mkrun(
                draw(_node),
                task_id=f"t{i}",
                queued=queued,
                available=queued + draw(st.integers(0, 200)),
                expires=draw(st.none() | _offset),
                state=draw(st.sampled_from([RunState.PENDING, RunState.PENDING, RunState.LOST])),
            )
        )
    return runs


@given(
    candidates=_candidates(),
    online=st.sets(_node),
    busy=st.sets(_node),
    slots=st.integers(-2, 6),
)
def test_plan_properties(
    candidates: list[Run], online: set[str], busy: set[str], slots: int
) -> None:
    chosen = plan_dispatches(candidates, online=online, busy=busy, slots=slots, now=NOW)
    assert len(chosen) <= max(0, slots)
    assert len({r.node_id for r in chosen}) == len(chosen)
    for run in chosen:
        assert any(run is c for c in candidates)
        assert run.state is RunState.PENDING
        assert run.node_id in online
        assert run.node_id not in busy
        assert run.available_at <= NOW
        assert run.expires_at is None or run.expires_at > NOW
    keys = [(r.available_at, r.queued_at) for r in chosen]
    assert keys == sorted(keys)
    # nothing eligible is left out while a slot is free
    if len(chosen) < slots:
        taken = {r.node_id for r in chosen}
        for run in candidates:
            if (
                run.state is RunState.PENDING
                and run.node_id in online
                and run.node_id not in busy
                and run.available_at <= NOW
                and (run.expires_at is None or run.expires_at > NOW)
            ):
                assert run.node_id in taken


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    ("base", "cap", "n", "seconds"),
    [
        (1.0, 60.0, 1, 1),
        (1.0, 60.0, 2, 2),
        (1.0, 60.0, 3, 4),
        (1.0, 60.0, 6, 32),
        (1.0, 60.0, 7, 60),
        (1.0, 60.0, 50, 60),
        (1.0, 60.0, 0, 1),
        (0.5, 10.0, 3, 2),
        (5.0, 8.0, 2, 8),
    ],
)
def test_backoff_values(base: float, cap: float, n: int, seconds: float) -> None:
    assert RetryPolicy(base, cap).delay(n) == timedelta(seconds=seconds)


# --------------------------------------------------------------------------- decide


def mktask(delivery: Delivery, max_attempts: int = 3) -> Task:
    return Task(
        name="t", command="true", targets=["a"], delivery=delivery, max_attempts=max_attempts
    )


def dispatched(attempts: int = 1, undelivered: int = 0) -> Run:
    return mkrun("a", state=RunState.DISPATCHED, attempts=attempts, undelivered=undelivered)


BASE, CAP = 2.0, 30.0
BOTH = pytest.mark.parametrize("delivery", list(Delivery))


def d(run: Run, task: Task, result: Outcome | ExecutorError) -> Decision:
    return decide(run, task, result, now=NOW, retry=RetryPolicy(BASE, CAP))


@BOTH
@pytest.mark.parametrize("attempts", [1, 3])
@pytest.mark.parametrize(
    ("outcome", "state"),
    [
        (Outcome(exit_code=0, output="ok"), RunState.SUCCEEDED),
        (Outcome(exit_code=3, output="bad"), RunState.FAILED),
        (Outcome(exit_code=-1), RunState.FAILED),
        (Outcome(exit_code=None, timed_out=True), RunState.TIMED_OUT),
        (Outcome(exit_code=0, timed_out=True), RunState.TIMED_OUT),
    ],
)
def test_decide_outcome_finishes_as_it_says(
    delivery: Delivery, attempts: int, outcome: Outcome, state: RunState
) -> None:
    decision = d(dispatched(attempts), mktask(delivery), outcome)
    assert decision.state is state
    assert decision.state.terminal
    assert decision.outcome == outcome
    assert decision.error is None


@BOTH
@pytest.mark.parametrize("attempts", [1, 2, 3])
@pytest.mark.parametrize(
    ("undelivered", "wait"), [(0, 2.0), (1, 4.0), (2, 8.0), (3, 16.0), (4, 30.0), (20, 30.0)]
)
def test_decide_not_delivered_retries_without_using_an_attempt(
    delivery: Delivery, attempts: int, undelivered: int, wait: float
) -> None:
    run = dispatched(attempts, undelivered)
    decision = d(run, mktask(delivery, max_attempts=3), NotDelivered("agent busy"))
    assert decision.state is RunState.PENDING
    assert decision.delivered is False
    assert decision.available_at == NOW + timedelta(seconds=wait)
    assert decision.error is not None
    assert "not delivered" in decision.error
    assert "agent busy" in decision.error


@BOTH
@pytest.mark.parametrize("attempts", [1, 3])
def test_decide_permanent_error_fails(delivery: Delivery, attempts: int) -> None:
    decision = d(dispatched(attempts), mktask(delivery), PermanentError("access denied"))
    assert decision.state is RunState.FAILED
    assert decision.error == "access denied"
    assert decision.outcome is None


@pytest.mark.parametrize("attempts", [1, 2, 3])
@pytest.mark.parametrize("error", [OutcomeUnknown("no reply"), ExecutorError("weird")])
def test_decide_unknown_at_most_once_is_lost(attempts: int, error: ExecutorError) -> None:
    decision = d(dispatched(attempts), mktask(Delivery.AT_MOST_ONCE, 3), error)
    assert decision.state is RunState.LOST
    assert decision.error is not None
    assert "outcome unknown" in decision.error
    assert decision.available_at is None


@pytest.mark.parametrize(
    ("attempts", "max_attempts", "wait"),
    [(1, 2, 2.0), (1, 3, 2.0), (2, 3, 4.0), (4, 5, 16.0), (6, 10, 30.0)],
)
@pytest.mark.parametrize("error", [OutcomeUnknown("no reply"), ExecutorError("weird")])
def test_decide_unknown_at_least_once_retries_below_max(
    attempts: int, max_attempts: int, wait: float, error: ExecutorError
) -> None:
    task = mktask(Delivery.AT_LEAST_ONCE, max_attempts)
    decision = d(dispatched(attempts), task, error)
    assert decision.state is RunState.PENDING
    assert decision.delivered is True
    assert decision.available_at == NOW + timedelta(seconds=wait)
    assert decision.error is not None
    assert "at_least_once" in decision.error


@pytest.mark.parametrize(("attempts", "max_attempts"), [(1, 1), (3, 3), (4, 3)])
def test_decide_unknown_at_least_once_gives_up_at_max(attempts: int, max_attempts: int) -> None:
    task = mktask(Delivery.AT_LEAST_ONCE, max_attempts)
    decision = d(dispatched(attempts), task, OutcomeUnknown("no reply"))
    assert decision.state is RunState.LOST
    assert decision.error is not None
    assert f"gave up after {attempts} attempts" in decision.error


def test_decide_uses_default_backoff_settings() -> None:
    run = dispatched(1)
    decision = decide(run, mktask(Delivery.AT_LEAST_ONCE), OutcomeUnknown("x"), now=NOW)
    assert decision.available_at == NOW + timedelta(seconds=1)
    undelivered = attrs.evolve(run, undelivered=10)
    decision = decide(undelivered, mktask(Delivery.AT_MOST_ONCE), NotDelivered("x"), now=NOW)
    assert decision.available_at == NOW + timedelta(seconds=60)


# --------------------------------------------------------------------------- recover


@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_recover_at_most_once_is_lost(attempts: int) -> None:
    task = mktask(Delivery.AT_MOST_ONCE, 3)
    decision = recover(dispatched(attempts), task, now=NOW, retry=RetryPolicy(BASE, CAP))
    assert decision.state is RunState.LOST
    assert decision.error is not None
    assert "in flight" in decision.error


@pytest.mark.parametrize(("attempts", "wait"), [(1, 2.0), (2, 4.0)])
def test_recover_at_least_once_retries_below_max(attempts: int, wait: float) -> None:
    task = mktask(Delivery.AT_LEAST_ONCE, 3)
    decision = recover(dispatched(attempts), task, now=NOW, retry=RetryPolicy(BASE, CAP))
    assert decision.state is RunState.PENDING
    assert decision.delivered is True
    assert decision.available_at == NOW + timedelta(seconds=wait)


@pytest.mark.parametrize(("attempts", "max_attempts"), [(1, 1), (3, 3)])
def test_recover_at_least_once_at_max_is_lost(attempts: int, max_attempts: int) -> None:
    task = mktask(Delivery.AT_LEAST_ONCE, max_attempts)
    decision = recover(dispatched(attempts), task, now=NOW, retry=RetryPolicy(BASE, CAP))
    assert decision.state is RunState.LOST
    assert decision.error is not None
    assert f"gave up after {attempts} attempts" in decision.error


@given(
    delivery=st.sampled_from(list(Delivery)),
    max_attempts=st.integers(1, 100),
    attempts=st.integers(1, 100),
    undelivered=st.integers(0, 50),
    kind=st.sampled_from(["ok", "exit", "timeout", "not_delivered", "permanent", "unknown"]),
)
def test_decide_properties(
    delivery: Delivery, max_attempts: int, attempts: int, undelivered: int, kind: str
) -> None:
    results: dict[str, Outcome | ExecutorError] = {
        "ok": Outcome(exit_code=0),
        "exit": Outcome(exit_code=7),
        "timeout": Outcome(exit_code=None, timed_out=True),
        "not_delivered": NotDelivered("x"),
        "permanent": PermanentError("x"),
        "unknown": OutcomeUnknown("x"),
    }
    run = dispatched(min(attempts, max_attempts), undelivered)
    task = mktask(delivery, max_attempts)
    decision = d(run, task, results[kind])
    # a decision is either terminal or a release with a time in the future, never later
    # than the cap
    assert decision.state is RunState.PENDING or decision.state.terminal
    if decision.state is RunState.PENDING:
        assert decision.available_at is not None
        assert NOW < decision.available_at <= NOW + timedelta(seconds=CAP)
        # only a certain non-delivery or an at-least-once retry go back to pending
        assert (kind == "not_delivered") != decision.delivered
        if decision.delivered:
            assert delivery is Delivery.AT_LEAST_ONCE
            assert run.attempts < max_attempts
    # at most once: a command that may have run is never sent again
    if delivery is Delivery.AT_MOST_ONCE and kind != "not_delivered":
        assert decision.state.terminal


# --------------------------------------------------------------------------- outcome recovery


@BOTH
def test_a_recoverable_unknown_keeps_the_run_dispatched_and_asks_at_once(
    delivery: Delivery,
) -> None:
    decision = d(dispatched(1), mktask(delivery), OutcomeUnknown("no reply", recoverable=True))
    assert decision.state is RunState.DISPATCHED and decision.recovering
    assert decision.available_at == NOW


@BOTH
def test_recover_before_the_deadline_asks_the_device(delivery: Delivery) -> None:
    decision = recover(dispatched(1), mktask(delivery), now=NOW, deadline=at(1))
    assert decision.recovering and decision.available_at == NOW
    late = recover(dispatched(1), mktask(delivery), now=NOW, deadline=NOW)
    assert not late.recovering


def dr(result: Outcome | ExecutorError, delivery: Delivery = Delivery.AT_MOST_ONCE,
       *, deadline: float = 60, asked: int = 1) -> Decision:
    return decide_recovery(dispatched(1), mktask(delivery), result, now=NOW,
                           deadline=at(deadline), asked=asked, retry=RetryPolicy(BASE, CAP))


@BOTH
def test_a_recovered_outcome_finishes_the_run(delivery: Delivery) -> None:
    decision = dr(Outcome(exit_code=2, recovered=True), delivery)
    assert decision.state is RunState.FAILED
    assert decision.outcome is not None and decision.outcome.recovered


@pytest.mark.parametrize("answer", [NotDelivered("busy"),
                                    OutcomeUnknown("no reply", recoverable=True)])
@pytest.mark.parametrize(("asked", "wait"), [(1, 2.0), (2, 4.0), (9, 30.0)])
def test_no_answer_yet_asks_again_with_backoff(
    answer: ExecutorError, asked: int, wait: float
) -> None:
    decision = dr(answer, asked=asked)
    assert decision.recovering
    assert decision.available_at == NOW + timedelta(seconds=wait)


@pytest.mark.parametrize(("delivery", "state"), [(Delivery.AT_MOST_ONCE, RunState.LOST),
                                                 (Delivery.AT_LEAST_ONCE, RunState.PENDING)])
def test_no_answer_by_the_deadline_is_unknown(delivery: Delivery, state: RunState) -> None:
    decision = dr(NotDelivered("device away"), delivery, deadline=0)
    assert decision.state is state
    assert decision.error is not None and "did not tell the outcome" in decision.error


@pytest.mark.parametrize("answer", [OutcomeUnknown("journal gone"), PermanentError("no journal"),
                                    ExecutorError("odd")])
def test_a_device_that_cannot_tell_makes_the_outcome_unknown(answer: ExecutorError) -> None:
    assert dr(answer).state is RunState.LOST
    assert dr(answer, Delivery.AT_LEAST_ONCE).state is RunState.PENDING


def test_recovery_deadline() -> None:
    task = attrs.evolve(mktask(Delivery.AT_MOST_ONCE), timeout=300.0)
    run = attrs.evolve(dispatched(1), started_at=NOW)
    assert recovery_deadline(run, task, within=3600) == at(3600)
    # never before the command could have finished
    assert recovery_deadline(run, task, within=10) == at(300)
    # a run with an expiry is asked until then
    expiring = attrs.evolve(run, expires_at=at(7200))
    assert recovery_deadline(expiring, task, within=3600) == at(7200)
    assert recovery_deadline(attrs.evolve(run, expires_at=at(5)), task, within=3600) == at(300)

"""The Store contract for fleet rollouts, run against every store.

The verbs fleet tasks brought (``add_task(..., nodes=)``, ``add_runs``, ``pause``,
``abort``, ``retry``, ``attempts``, ``open_continuous``, ``recent_starts``,
``next_pending(skip_tasks=)``) and what ``TaskSummary`` says about them. Every test that
takes the ``store`` fixture runs on ``InMemoryStore`` (the reference), ``SQLiteStore``
and ``PostgresStore``; the Hypothesis test at the end drives the reference and each of
the others side by side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostrunner._memory import InMemoryStore, SharedInMemoryStore
from ghostrunner._types import (
    RETRYABLE_STATES,
    Attempt,
    Delivery,
    Device,
    Outcome,
    Rollout,
    Run,
    RunKey,
    RunState,
    Selector,
    TagsMode,
    Task,
    TaskQuery,
    TaskStatus,
    TaskSummary,
)
from ghostrunner.errors import IllegalTransition, NotFound, StoreError
from ghostrunner.postgres import PostgresStore
from ghostrunner.sqlite import SQLiteStore
from tests.contract.test_store_contract import NOW, at, claim, run_of
from tests.pg import PgServer

EVERYTHING = Selector(all=True)


def make_task(*targets: str, **kw: Any) -> Task:
    """A task on ``targets`` (default ``node//a``, unless it has a selector)."""
    kw.setdefault("name", "job")
    kw.setdefault("command", "echo hi")
    kw.setdefault("created_at", NOW)
    if not targets and kw.get("select") is None:
        targets = ("node//a",)
    return Task(targets=targets, **kw)


def fleet_task(**kw: Any) -> Task:
    """A continuous task on every device, with no explicit targets."""
    kw.setdefault("select", EVERYTHING)
    kw.setdefault("continuous", True)
    return make_task(**kw)


async def add(
    store: Any, *targets: str, now: datetime = NOW, nodes: list[str] | None = None, **kw: Any
) -> Task:
    task = make_task(*targets, **kw)
    await store.add_task(task, now, nodes=nodes)
    return task


async def dispatch(store: Any, task: Task, node: str, now: datetime = NOW) -> Run:
    run = await claim(store, RunKey(task.id, node), now)
    assert run is not None
    return run


async def finish(
    store: Any, task: Task, node: str, state: RunState, now: datetime, **kw: Any
) -> Run:
    return await store.finish(RunKey(task.id, node), state, now, **kw)


async def runs_by_node(store: Any, task: Task) -> dict[str, Run]:
    return {r.node_id: r for r in await store.get_runs(task.id)}


async def nodes_of(store: Any, task: Task) -> list[str]:
    return [r.node_id for r in await store.get_runs(task.id)]


def cleared(run: Run) -> bool:
    """True if the result fields of ``run`` were cleared (as by a retry)."""
    return (
        run.started_at, run.finished_at, run.exit_code, run.output, run.output_truncated,
        run.error,
    ) == (None, None, None, "", False, None)


# --------------------------------------------------------------------------- add_task(nodes=)


async def test_add_task_makes_runs_for_the_nodes_given(store: Any) -> None:
    task = fleet_task(continuous=False, not_before=at(5), expires_at=at(60))
    assert task.targets == ()
    await store.add_task(task, NOW, nodes=["node//b", "node//a"])
    runs = await store.get_runs(task.id)
    assert runs == task.first_runs(NOW, ["node//b", "node//a"])
    assert [(r.node_id, r.state, r.available_at, r.expires_at) for r in runs] == [
        ("node//b", RunState.PENDING, at(5), at(60)),
        ("node//a", RunState.PENDING, at(5), at(60)),
    ]
    summary = await store.get_task(task.id)
    assert summary.task == task
    assert dict(summary.counts) == {RunState.PENDING: 2}
    assert dict(await store.counts()) == {RunState.PENDING: 2}

    # explicit targets plus the devices a selector matched
    both = make_task("node//c", select=Selector(tags=("x",)))
    await store.add_task(both, NOW, nodes=["node//c", "node//d"])
    assert await nodes_of(store, both) == ["node//c", "node//d"]
    assert dict(await store.counts()) == {RunState.PENDING: 4}
    # the default is the targets
    plain = await add(store, "node//e", "node//f")
    assert await nodes_of(store, plain) == ["node//e", "node//f"]


async def test_add_task_with_no_nodes_has_no_runs_yet(store: Any) -> None:
    task = fleet_task()
    await store.add_task(task, NOW, nodes=[])
    assert list(await store.get_runs(task.id)) == []
    summary = await store.get_task(task.id)
    assert dict(summary.counts) == {}
    assert (summary.paused, summary.aborted, summary.closed) == (False, None, False)
    assert summary.status is TaskStatus.PENDING
    assert dict(await store.attempts(task.id)) == {}
    assert dict(await store.counts()) == {}
    assert [t.id for t in await store.open_continuous(NOW)] == [task.id]


# --------------------------------------------------------------------------- add_runs


async def test_add_runs_adds_pending_runs_after_the_others(store: Any) -> None:
    task = make_task(
        "node//a", "node//b", select=EVERYTHING, continuous=True, not_before=at(10),
        expires_at=at(100),
    )
    await store.add_task(task, NOW)
    await dispatch(store, task, "node//a", at(10))
    added = await store.add_runs(task.id, ["node//c", "node//a", "node//d"], at(5))
    assert [r.node_id for r in added] == ["node//c", "node//d"]
    for run in added:
        assert run.task_id == task.id
        assert run.state is RunState.PENDING
        assert (run.attempts, run.undelivered) == (0, 0)
        assert run.queued_at == at(5)
        assert run.available_at == at(10)  # not before not_before
        assert run.expires_at == at(100)
        assert cleared(run)
    runs = await store.get_runs(task.id)
    assert [r.node_id for r in runs] == ["node//a", "node//b", "node//c", "node//d"]
    assert list(runs[2:]) == list(added)
    assert runs[0].state is RunState.DISPATCHED  # the others are untouched
    summary = await store.get_task(task.id)
    assert dict(summary.counts) == {RunState.DISPATCHED: 1, RunState.PENDING: 3}
    assert dict(await store.counts()) == {RunState.DISPATCHED: 1, RunState.PENDING: 3}
    # after not_before, a new run is available at once
    late = await store.add_runs(task.id, ["node//e"], at(20))
    assert [(r.queued_at, r.available_at) for r in late] == [(at(20), at(10))]
    assert [r.node_id for r in await store.next_pending(["node//d", "node//e"], at(10))] == [
        "node//d", "node//e",
    ]
    pending = (await store.list_tasks(TaskQuery(state=RunState.PENDING, node_id="node//e")))
    assert [s.task.id for s in pending.items] == [task.id]
    assert dict(pending.items[0].counts) == {RunState.DISPATCHED: 1, RunState.PENDING: 4}


async def test_add_runs_without_not_before_is_available_when_added(store: Any) -> None:
    task = fleet_task()
    await store.add_task(task, NOW, nodes=[])
    (run,) = await store.add_runs(task.id, ["node//a"], at(7))
    assert (run.queued_at, run.available_at, run.expires_at) == (at(7), at(7), None)
    assert await store.next_pending(["node//a"], at(6)) == []
    assert list(await store.next_pending(["node//a"], at(7))) == [run]


async def test_add_runs_ignores_duplicate_node_ids_in_one_call(store: Any) -> None:
    task = fleet_task()
    await store.add_task(task, NOW, nodes=["node//a"])
    added = await store.add_runs(
        task.id, ["node//c", "node//c", "node//d", "node//a", "node//c", "node//d"], NOW
    )
    assert [r.node_id for r in added] == ["node//c", "node//d"]
    assert await nodes_of(store, task) == ["node//a", "node//c", "node//d"]
    assert dict((await store.get_task(task.id)).counts) == {RunState.PENDING: 3}
    assert dict(await store.counts()) == {RunState.PENDING: 3}


async def test_add_runs_never_gives_a_device_a_second_run(store: Any) -> None:
    task = fleet_task()
    await store.add_task(task, NOW, nodes=["node//a", "node//b", "node//c"])
    await dispatch(store, task, "node//a")
    await finish(store, task, "node//a", RunState.SUCCEEDED, at(1))
    await dispatch(store, task, "node//b")
    await store.cancel(task.id, ["node//c"], now=at(1))  # one device: the task stays open
    assert (await store.get_task(task.id)).closed is False
    before = list(await store.get_runs(task.id))
    assert await store.add_runs(task.id, ["node//a", "node//b", "node//c"], at(2)) == []
    assert list(await store.get_runs(task.id)) == before
    first = await store.add_runs(task.id, ["node//d"], at(3))
    assert [r.node_id for r in first] == ["node//d"]
    assert await store.add_runs(task.id, ["node//d"], at(4)) == []  # asked again later
    await dispatch(store, task, "node//d", at(5))
    await finish(store, task, "node//d", RunState.FAILED, at(6))
    assert await store.add_runs(task.id, ["node//d", "node//b"], at(7)) == []
    assert await nodes_of(store, task) == ["node//a", "node//b", "node//c", "node//d"]
    assert dict(await store.counts()) == {
        RunState.SUCCEEDED: 1, RunState.DISPATCHED: 1, RunState.CANCELLED: 1,
        RunState.FAILED: 1,
    }


async def test_add_runs_to_a_task_cancelled_as_a_whole_adds_nothing(store: Any) -> None:
    task = fleet_task()
    await store.add_task(task, NOW, nodes=["node//a", "node//b"])
    await dispatch(store, task, "node//a")
    cancelled = await store.cancel(task.id, now=at(1))
    assert [r.node_id for r in cancelled] == ["node//b"]
    summary = await store.get_task(task.id)
    assert summary.closed is True
    assert summary.aborted is None
    assert await store.add_runs(task.id, ["node//c", "node//d"], at(2)) == []
    assert await nodes_of(store, task) == ["node//a", "node//b"]
    assert dict(await store.counts()) == {RunState.DISPATCHED: 1, RunState.CANCELLED: 1}
    assert await store.open_continuous(at(2)) == []
    # the run in flight still finishes; the task stays closed
    await finish(store, task, "node//a", RunState.SUCCEEDED, at(3))
    assert (await store.get_task(task.id)).closed is True
    assert await store.add_runs(task.id, ["node//c"], at(4)) == []


async def test_add_runs_to_an_aborted_task_adds_nothing(store: Any) -> None:
    task = fleet_task()
    await store.add_task(task, NOW, nodes=["node//a"])
    await store.abort(task.id, "enough", at(1))
    assert await store.add_runs(task.id, ["node//b"], at(2)) == []
    assert await nodes_of(store, task) == ["node//a"]
    assert dict((await store.get_task(task.id)).counts) == {RunState.CANCELLED: 1}


async def test_add_runs_to_an_unknown_task_is_not_found(store: Any) -> None:
    with pytest.raises(NotFound):
        await store.add_runs("nope", ["node//a"], NOW)
    with pytest.raises(NotFound):
        await store.add_runs("nope", [], NOW)
    task = fleet_task()
    await store.add_task(task, NOW, nodes=[])
    assert await store.add_runs(task.id, [], NOW) == []
    assert dict(await store.counts()) == {}


async def test_added_runs_come_in_their_tasks_submission_order(store: Any) -> None:
    """A run added to an older task comes out of next_pending before the pending run
    of a newer task on the same device (submission order is the tasks' order)."""
    older = fleet_task(name="older")
    await store.add_task(older, NOW, nodes=[])
    newer = await add(store, "node//x", name="newer")
    (added,) = await store.add_runs(older.id, ["node//x"], at(1))
    assert list(await store.next_pending(["node//x"], at(1))) == [added]
    await dispatch(store, older, "node//x", at(1))
    await finish(store, older, "node//x", RunState.SUCCEEDED, at(2))
    (nxt,) = await store.next_pending(["node//x"], at(2))
    assert nxt.key == RunKey(newer.id, "node//x")
    listed = await store.list_tasks(TaskQuery(node_id="node//x"))
    assert [s.task.id for s in listed.items] == [newer.id, older.id]


# --------------------------------------------------------------------------- pause


async def test_pause_holds_a_task_and_resume_lets_it_go(store: Any) -> None:
    first = await add(store, "node//x", "node//y", name="first")
    second = await add(store, "node//x", name="second")
    summary = await store.pause(first.id, True)
    assert isinstance(summary, TaskSummary)
    assert summary.task == first
    assert (summary.paused, summary.aborted, summary.closed) == (True, None, False)
    assert summary.status is TaskStatus.PAUSED
    assert (await store.get_task(first.id)).paused is True
    # the device's next run of another task comes instead; node//y has nothing
    got = await store.next_pending(["node//x", "node//y"], NOW)
    assert [r.key for r in got] == [RunKey(second.id, "node//x")]
    paused = await store.list_tasks(TaskQuery(status=TaskStatus.PAUSED))
    assert [s.task.id for s in paused.items] == [first.id]
    assert await store.pause(first.id, True) == summary  # idempotent

    resumed = await store.pause(first.id, False)
    assert resumed.paused is False
    assert resumed.status is TaskStatus.PENDING
    got = await store.next_pending(["node//x", "node//y"], NOW)
    assert [r.key for r in got] == [RunKey(first.id, "node//x"), RunKey(first.id, "node//y")]
    assert await store.pause(first.id, False) == resumed
    with pytest.raises(NotFound):
        await store.pause("nope", True)


async def test_claim_many_leaves_the_runs_of_a_task_paused_meanwhile(store: Any) -> None:
    """The race: a run picked by next_pending whose task is paused before the claim."""
    held = await add(store, "node//a", "node//b", name="held")
    other = await add(store, "node//c", name="other")
    picked = await store.next_pending(["node//a", "node//b", "node//c"], NOW)
    assert len(picked) == 3
    await store.pause(held.id, True)
    claimed = await store.claim_many([r.key for r in picked], at(1))
    assert [(run.key, task) for run, task in claimed] == [(RunKey(other.id, "node//c"), other)]
    for run in (await store.get_runs(held.id)):
        assert run.state is RunState.PENDING
        assert (run.attempts, run.started_at) == (0, None)
    assert dict((await store.get_task(held.id)).counts) == {RunState.PENDING: 2}
    assert await store.recent_starts(NOW - timedelta(days=1)) == []  # no rollout here
    await store.pause(held.id, False)
    run = await dispatch(store, held, "node//a", at(2))
    assert (run.state, run.attempts, run.started_at) == (RunState.DISPATCHED, 1, at(2))


async def test_pause_lets_runs_in_flight_finish(store: Any) -> None:
    task = await add(store, "node//a", "node//b")
    await dispatch(store, task, "node//a")
    summary = await store.pause(task.id, True)
    assert summary.status is TaskStatus.PAUSED
    done = await finish(store, task, "node//a", RunState.SUCCEEDED, at(1))
    assert done.state is RunState.SUCCEEDED
    assert (await store.get_task(task.id)).status is TaskStatus.PAUSED  # b still pending
    await store.cancel(task.id, ["node//b"], now=at(2))
    summary = await store.get_task(task.id)
    assert summary.paused is True
    assert summary.status is TaskStatus.FAILED  # every run terminal: the counts decide
    assert dict(summary.counts) == {RunState.SUCCEEDED: 1, RunState.CANCELLED: 1}


# --------------------------------------------------------------------------- abort


async def test_abort_cancels_pending_runs_and_closes_the_task(store: Any) -> None:
    task = await add(store, "node//a", "node//b", "node//c", "node//d")
    await dispatch(store, task, "node//b")
    await dispatch(store, task, "node//d")
    await finish(store, task, "node//d", RunState.FAILED, at(1), outcome=Outcome(exit_code=1))
    reason = "aborted: 1 of 1 finished runs failed"
    cancelled = await store.abort(task.id, reason, at(3))
    assert [r.node_id for r in cancelled] == ["node//a", "node//c"]
    for run in cancelled:
        assert run.state is RunState.CANCELLED
        assert run.error == reason
        assert run.finished_at == at(3)
    runs = await runs_by_node(store, task)
    assert runs["node//a"] == cancelled[0]
    assert runs["node//b"].state is RunState.DISPATCHED  # in flight: untouched
    assert runs["node//b"].error is None
    assert runs["node//d"].state is RunState.FAILED
    summary = await store.get_task(task.id)
    assert (summary.aborted, summary.closed, summary.paused) == (reason, True, False)
    assert summary.status is TaskStatus.ABORTED
    assert dict(summary.counts) == {
        RunState.CANCELLED: 2, RunState.DISPATCHED: 1, RunState.FAILED: 1,
    }
    assert await store.next_pending(["node//a", "node//c"], at(4)) == []
    aborted = await store.list_tasks(TaskQuery(status=TaskStatus.ABORTED))
    assert [s.task.id for s in aborted.items] == [task.id]

    # the dispatched run still finishes, and its attempt is kept
    out = Outcome(exit_code=0, output="done", started_at=at(0.5), finished_at=at(5))
    done = await finish(store, task, "node//b", RunState.SUCCEEDED, at(6), outcome=out)
    assert (done.state, done.error, done.finished_at) == (RunState.SUCCEEDED, None, at(5))
    history = await store.attempts(task.id)
    assert [a.state for a in history["node//b"]] == [RunState.SUCCEEDED]
    assert "node//a" not in history  # never attempted
    summary = await store.get_task(task.id)
    assert summary.status is TaskStatus.ABORTED
    assert summary.aborted == reason
    # aborting again cancels nothing more and keeps the newest reason
    assert await store.abort(task.id, "again", at(7)) == []
    assert (await store.get_task(task.id)).aborted == "again"


async def test_abort_of_a_paused_task_reads_aborted(store: Any) -> None:
    task = await add(store, "node//a")
    await store.pause(task.id, True)
    await store.abort(task.id, "why", NOW)
    summary = await store.get_task(task.id)
    assert (summary.paused, summary.aborted, summary.closed) == (True, "why", True)
    assert summary.status is TaskStatus.ABORTED


async def test_abort_of_an_unknown_task_is_not_found(store: Any) -> None:
    with pytest.raises(NotFound):
        await store.abort("nope", "why", NOW)


# --------------------------------------------------------------------------- retry


async def test_retry_puts_runs_back_to_pending_for_a_new_attempt(store: Any) -> None:
    nodes = ("node//ok", "node//fail", "node//slow", "node//lost", "node//busy", "node//wait")
    task = await add(store, *nodes)
    for node in nodes[:5]:
        await dispatch(store, task, node, at(1))
    await finish(store, task, "node//ok", RunState.SUCCEEDED, at(2), outcome=Outcome(exit_code=0))
    await finish(
        store, task, "node//fail", RunState.FAILED, at(2),
        outcome=Outcome(exit_code=3, output="boom", output_truncated=True), error="bad",
    )
    await finish(
        store, task, "node//slow", RunState.TIMED_OUT, at(2),
        outcome=Outcome(exit_code=None, timed_out=True),
    )
    await finish(store, task, "node//lost", RunState.LOST, at(2), error="gone")
    before = await runs_by_node(store, task)

    retried = await store.retry(
        task.id, [RunState.LOST, RunState.FAILED, RunState.TIMED_OUT], at(10)
    )
    # in target order, whatever the order of states
    assert [r.node_id for r in retried] == ["node//fail", "node//slow", "node//lost"]
    for run in retried:
        assert run.state is RunState.PENDING
        assert run.available_at == at(10)
        assert run.attempts == 1  # kept
        assert run.undelivered == 0
        assert run.queued_at == NOW
        assert cleared(run)
    after = await runs_by_node(store, task)
    assert [after[r.node_id] for r in retried] == list(retried)
    for node in ("node//ok", "node//busy", "node//wait"):  # not in states: untouched
        assert after[node] == before[node]
    summary = await store.get_task(task.id)
    assert dict(summary.counts) == {
        RunState.PENDING: 4, RunState.DISPATCHED: 1, RunState.SUCCEEDED: 1,
    }
    assert summary.status is TaskStatus.RUNNING
    assert dict(await store.counts()) == dict(summary.counts)
    # a retried run is served again, from `now` on
    assert await store.next_pending(["node//fail"], at(9)) == []
    assert list(await store.next_pending(["node//fail"], at(10))) == [after["node//fail"]]
    run = await dispatch(store, task, "node//fail", at(11))
    assert (run.attempts, run.started_at) == (2, at(11))
    # the earlier attempts stay in the history
    history = await store.attempts(task.id)
    assert [(a.number, a.state, a.exit_code, a.output) for a in history["node//fail"]] == [
        (1, RunState.FAILED, 3, "boom"),
    ]


async def test_retry_of_expired_and_cancelled_runs(store: Any) -> None:
    task = await add(store, "node//a", "node//b", "node//c", expires_at=at(50))
    await store.cancel(task.id, ["node//a"], now=at(1))
    retried = await store.retry(task.id, [RunState.CANCELLED], at(2))
    assert [(r.node_id, r.state, r.attempts, r.available_at) for r in retried] == [
        ("node//a", RunState.PENDING, 0, at(2)),
    ]
    assert cleared(retried[0])
    assert list(await store.next_pending(["node//a"], at(2))) == list(retried)
    (run,) = await store.claim_many([RunKey(task.id, "node//a")], at(3))
    assert run[0].attempts == 1

    assert await store.expire_due(at(50)) == 2
    expired = await runs_by_node(store, task)
    assert expired["node//b"].state is RunState.EXPIRED
    assert expired["node//b"].error is not None
    retried = await store.retry(task.id, [RunState.EXPIRED], at(60))
    assert [(r.node_id, r.state, r.available_at, r.error, r.finished_at) for r in retried] == [
        ("node//b", RunState.PENDING, at(60), None, None),
        ("node//c", RunState.PENDING, at(60), None, None),
    ]
    assert dict((await store.get_task(task.id)).counts) == {
        RunState.PENDING: 2, RunState.DISPATCHED: 1,
    }


async def test_retry_refuses_states_that_cannot_be_retried(store: Any) -> None:
    task = await add(store, "node//a", "node//b", "node//c")
    await dispatch(store, task, "node//a")
    await finish(store, task, "node//a", RunState.SUCCEEDED, at(1))
    await dispatch(store, task, "node//b")
    await store.abort(task.id, "stop", at(2))
    before = (list(await store.get_runs(task.id)), await store.get_task(task.id))
    for states in (
        [RunState.SUCCEEDED],
        [RunState.PENDING],
        [RunState.DISPATCHED],
        [RunState.FAILED, RunState.SUCCEEDED],
        [RunState.CANCELLED, RunState.PENDING],
    ):
        with pytest.raises(IllegalTransition):
            await store.retry(task.id, states, at(3))
        # nothing changed: the task is still aborted
        assert (list(await store.get_runs(task.id)), await store.get_task(task.id)) == before
    assert RunState.SUCCEEDED not in RETRYABLE_STATES
    with pytest.raises(NotFound):
        await store.retry("nope", [RunState.FAILED], NOW)


async def test_retry_after_abort_reopens_the_task(store: Any) -> None:
    task = fleet_task(rollout=Rollout(abort_failed_pct=10))
    await store.add_task(task, NOW, nodes=["node//a", "node//b", "node//c"])
    await dispatch(store, task, "node//a")
    await finish(store, task, "node//a", RunState.FAILED, at(1), outcome=Outcome(exit_code=1))
    await store.abort(task.id, "too many failures", at(2))
    assert await store.open_continuous(at(2)) == []
    # a retry matching no run reopens the task all the same
    assert await store.retry(task.id, [RunState.TIMED_OUT], at(3)) == []
    summary = await store.get_task(task.id)
    assert (summary.aborted, summary.closed) == (None, False)
    assert summary.status is not TaskStatus.ABORTED
    assert [t.id for t in await store.open_continuous(at(3))] == [task.id]

    await store.abort(task.id, "too many failures", at(4))
    retried = await store.retry(task.id, [RunState.CANCELLED, RunState.FAILED], at(5))
    assert [r.node_id for r in retried] == ["node//a", "node//b", "node//c"]
    assert [r.error for r in retried] == [None, None, None]  # the abort reason is gone
    summary = await store.get_task(task.id)
    assert (summary.aborted, summary.closed) == (None, False)
    assert summary.status is TaskStatus.PENDING  # read from the counts alone
    assert dict(summary.counts) == {RunState.PENDING: 3}
    # it takes new devices again
    added = await store.add_runs(task.id, ["node//a", "node//d"], at(6))
    assert [r.node_id for r in added] == ["node//d"]
    got = await store.next_pending(["node//a", "node//b", "node//d"], at(6))
    assert [r.node_id for r in got] == ["node//a", "node//b", "node//d"]
    listed = await store.list_tasks(TaskQuery(status=TaskStatus.ABORTED))
    assert listed.items == ()


async def test_retry_after_cancel_all_reopens_the_task(store: Any) -> None:
    task = fleet_task()
    await store.add_task(task, NOW, nodes=["node//a"])
    await store.cancel(task.id, now=at(1))
    assert (await store.get_task(task.id)).closed is True
    (run,) = await store.retry(task.id, [RunState.CANCELLED], at(2))
    assert (run.node_id, run.state) == ("node//a", RunState.PENDING)
    assert (await store.get_task(task.id)).closed is False
    assert [r.node_id for r in await store.add_runs(task.id, ["node//b"], at(3))] == ["node//b"]


# --------------------------------------------------------------------------- attempts


async def test_finish_records_an_attempt(store: Any) -> None:
    task = await add(store, "node//a", "node//b", "node//c", "node//d")
    await dispatch(store, task, "node//a", at(1))
    out = Outcome(
        exit_code=2, output="boom ✓", output_truncated=True, started_at=at(1.5), finished_at=at(3)
    )
    await finish(store, task, "node//a", RunState.FAILED, at(4), outcome=out, error="exit 2")
    await dispatch(store, task, "node//b", at(1))
    await finish(store, task, "node//b", RunState.LOST, at(5), error="outcome unknown")
    await dispatch(store, task, "node//c", at(2))  # in flight: no attempt yet
    history = await store.attempts(task.id)
    assert dict(history) == {
        "node//a": [
            Attempt(
                number=1, state=RunState.FAILED, started_at=at(1.5), finished_at=at(3),
                exit_code=2, output="boom ✓", output_truncated=True, error="exit 2",
            )
        ],
        "node//b": [
            Attempt(
                number=1, state=RunState.LOST, started_at=at(1), finished_at=at(5),
                error="outcome unknown",
            )
        ],
    }
    assert list(history) == ["node//a", "node//b"]


async def test_attempt_history_across_at_least_once_releases_and_retries(store: Any) -> None:
    task = await add(store, "node//a", max_attempts=5)
    key = RunKey(task.id, "node//a")
    await dispatch(store, task, "node//a", at(1))
    # sent, outcome unknown, at_least_once: sent again, the attempt is kept as lost
    run = await store.release(key, at(2), available_at=at(3), error="dropped", delivered=True)
    assert (run.state, run.attempts, run.undelivered) == (RunState.PENDING, 1, 0)
    # certainly not delivered: the attempt is given back, nothing recorded
    await dispatch(store, task, "node//a", at(3))
    run = await store.release(key, at(4), available_at=at(4), error="offline", delivered=False)
    assert (run.attempts, run.undelivered) == (1, 1)
    assert [a.number for a in (await store.attempts(task.id))["node//a"]] == [1]
    run = await dispatch(store, task, "node//a", at(5))
    assert run.attempts == 2
    await finish(store, task, "node//a", RunState.FAILED, at(6), outcome=Outcome(exit_code=1))
    # an operator's retry: a new attempt, numbered on
    await store.retry(task.id, [RunState.FAILED], at(7))
    run = await dispatch(store, task, "node//a", at(8))
    assert run.attempts == 3
    await store.release(key, at(9), available_at=at(9), error="dropped again", delivered=True)
    await dispatch(store, task, "node//a", at(10))
    await finish(
        store, task, "node//a", RunState.SUCCEEDED, at(11),
        outcome=Outcome(exit_code=0, output="ok"),
    )
    history = (await store.attempts(task.id))["node//a"]
    assert [(a.number, a.state, a.started_at, a.finished_at, a.exit_code, a.error)
            for a in history] == [
        (1, RunState.LOST, at(1), at(2), None, "dropped"),
        (2, RunState.FAILED, at(5), at(6), 1, None),
        (3, RunState.LOST, at(8), at(9), None, "dropped again"),
        (4, RunState.SUCCEEDED, at(10), at(11), 0, None),
    ]
    assert history[-1].output == "ok"
    final = (await store.get_runs(task.id))[0]
    assert (final.attempts, final.undelivered, final.state) == (4, 1, RunState.SUCCEEDED)


async def test_attempts_of_unknown_and_deleted_tasks(store: Any) -> None:
    with pytest.raises(NotFound):
        await store.attempts("nope")
    task = await add(store, "node//a", "node//b")
    assert dict(await store.attempts(task.id)) == {}
    await dispatch(store, task, "node//a")
    await finish(store, task, "node//a", RunState.SUCCEEDED, at(1))
    await store.cancel(task.id, now=at(1))
    assert list(await store.attempts(task.id)) == ["node//a"]
    await store.delete_task(task.id)
    with pytest.raises(NotFound):
        await store.attempts(task.id)
    # a new task with the same id starts with no history
    again = make_task("node//a", id=task.id)
    await store.add_task(again, at(2))
    assert dict(await store.attempts(again.id)) == {}
    await dispatch(store, again, "node//a", at(3))
    await finish(store, again, "node//a", RunState.FAILED, at(4))
    assert [(a.number, a.state) for a in (await store.attempts(again.id))["node//a"]] == [
        (1, RunState.FAILED),
    ]


# --------------------------------------------------------------------------- open_continuous


async def test_open_continuous_lists_open_unexpired_continuous_tasks(store: Any) -> None:
    # created_at runs backwards: submission order is the store's, not created_at's
    def make(name: str, i: int, **kw: Any) -> Task:
        return fleet_task(name=name, created_at=NOW - timedelta(minutes=i), **kw)

    plain = make_task("node//a", name="plain", select=EVERYTHING)  # not continuous
    one = make("one", 1, rollout=Rollout(max_concurrent=2), success_exit_codes=(0, 3))
    expiring = make("expiring", 2, expires_at=at(10))
    cancelled = make("cancelled", 3)
    aborted = make("aborted", 4)
    partly = make("partly", 5)
    paused = make("paused", 6)
    for task in (plain, one, expiring, cancelled, aborted, partly, paused):
        await store.add_task(task, NOW, nodes=["node//a", "node//b"])
    await store.cancel(cancelled.id, now=NOW)
    await store.abort(aborted.id, "why", NOW)
    await store.cancel(partly.id, ["node//a", "node//b"], now=NOW)  # not as a whole
    await store.pause(paused.id, True)

    got = await store.open_continuous(at(5))
    assert list(got) == [one, expiring, partly, paused]  # equal: fleet fields included
    assert list(await store.open_continuous(at(10))) == [one, partly, paused]
    await store.retry(cancelled.id, [RunState.CANCELLED], at(11))
    assert [t.name for t in await store.open_continuous(at(11))] == [
        "one", "cancelled", "partly", "paused",
    ]
    await store.delete_task(partly.id)
    assert [t.name for t in await store.open_continuous(at(11))] == ["one", "cancelled", "paused"]


# --------------------------------------------------------------------------- recent_starts


async def test_recent_starts_counts_every_attempt_of_rate_limited_tasks(store: Any) -> None:
    """Every start of a rate-limited task after ``since``: the runs in flight and the
    attempts in the history (finished, or sent again), never twice, and none of a
    dispatch given back as undelivered."""
    limited = await add(
        store, "node//a", "node//b", "node//c", "node//d", "node//e", max_attempts=5,
        rollout=Rollout(per_minute=5), delivery=Delivery.AT_LEAST_ONCE,
    )
    other = await add(store, "node//a", "node//e", rollout=Rollout(max_concurrent=1))
    assert await store.recent_starts(NOW - timedelta(days=1)) == []
    await dispatch(store, limited, "node//a", at(1))
    await dispatch(store, other, "node//e", at(2))  # not rate-limited
    await dispatch(store, limited, "node//b", at(3))  # in flight
    await dispatch(store, limited, "node//c", at(4))
    await finish(store, limited, "node//a", RunState.SUCCEEDED, at(5))  # the history's
    # sent, outcome unknown: sent again later; the first send counts
    await store.release(
        RunKey(limited.id, "node//c"), at(5), available_at=at(6), error="x", delivered=True
    )
    # certainly not delivered: no start
    await dispatch(store, limited, "node//d", at(5))
    await store.release(
        RunKey(limited.id, "node//d"), at(6), available_at=at(6), error="y", delivered=False
    )

    def starts(got: Any) -> list[tuple[str, datetime]]:
        return sorted(got, key=lambda s: (s[1], s[0]))

    assert starts(await store.recent_starts(NOW)) == [
        (limited.id, at(1)), (limited.id, at(3)), (limited.id, at(4)),
    ]
    assert starts(await store.recent_starts(at(3))) == [(limited.id, at(4))]  # after `since`
    assert await store.recent_starts(at(4)) == []
    await dispatch(store, limited, "node//c", at(7))  # the second send of node//c
    await finish(store, limited, "node//c", RunState.FAILED, at(8))
    await store.retry(limited.id, [RunState.FAILED], at(9))  # the run forgets, not the history
    assert starts(await store.recent_starts(at(3))) == [(limited.id, at(4)), (limited.id, at(7))]
    await dispatch(store, limited, "node//c", at(10))
    assert starts(await store.recent_starts(at(6))) == [
        (limited.id, at(7)), (limited.id, at(10)),
    ]


# --------------------------------------------------------------------------- next_pending


async def test_next_pending_skips_the_tasks_asked(store: Any) -> None:
    one = await add(store, "node//x", "node//y", name="one")
    two = await add(store, "node//x", name="two")
    three = await add(store, "node//x", "node//y", name="three")
    nodes = ["node//x", "node//y"]

    async def keys(**kw: Any) -> list[RunKey]:
        return [r.key for r in await store.next_pending(nodes, NOW, **kw)]

    assert await keys() == [RunKey(one.id, "node//x"), RunKey(one.id, "node//y")]
    assert await keys(skip_tasks=[one.id]) == [
        RunKey(two.id, "node//x"), RunKey(three.id, "node//y"),
    ]
    assert await keys(skip_tasks={one.id, two.id}) == [
        RunKey(three.id, "node//x"), RunKey(three.id, "node//y"),
    ]
    assert await keys(skip_tasks=[one.id, two.id, three.id]) == []
    assert await keys(skip_tasks=["nope"]) == await keys()
    assert await keys(skip_tasks=[one.id], limit=1) == [RunKey(two.id, "node//x")]
    await store.pause(two.id, True)  # skipped and paused together
    assert await keys(skip_tasks=[one.id]) == [
        RunKey(three.id, "node//x"), RunKey(three.id, "node//y"),
    ]
    # skipping is not pausing: claim_many still claims a skipped task's run
    assert await claim(store, RunKey(one.id, "node//x"), NOW) is not None


# --------------------------------------------------------------------------- summaries


async def test_list_tasks_status_agrees_with_the_summaries(store: Any) -> None:
    async def task_in(name: str, *steps: Callable[[Task], Any], n: int = 2) -> Task:
        # its first device its own (the one the steps dispatch to: a device has one
        # dispatched run at most), the second one shared by every task of two runs
        task = await add(store, *[f"node//{name}", "node//shared"][:n], name=name)
        for step in steps:
            await step(task)
        return task

    async def start(task: Task) -> None:
        await dispatch(store, task, task.targets[0])

    async def succeed(task: Task) -> None:
        await finish(store, task, task.targets[0], RunState.SUCCEEDED, at(1))

    async def fail(task: Task) -> None:
        await finish(store, task, task.targets[0], RunState.FAILED, at(1))

    async def cancel(task: Task) -> None:
        await store.cancel(task.id, now=at(1))

    async def pause(task: Task) -> None:
        await store.pause(task.id, True)

    async def abort(task: Task) -> None:
        await store.abort(task.id, "why", at(1))

    async def retry(task: Task) -> None:
        await store.retry(task.id, [RunState.CANCELLED, RunState.FAILED], at(2))

    await task_in("pending")
    await task_in("partly cancelled", lambda t: store.cancel(t.id, t.targets[:1], now=NOW))
    await task_in("running", start)
    await task_in("paused", pause)
    await task_in("paused in flight", start, pause)
    await task_in("paused done", start, succeed, pause, n=1)
    await task_in("paused failed", start, fail, cancel, pause)
    await task_in("aborted", abort)
    await task_in("aborted in flight", start, abort)
    await task_in("aborted paused", pause, abort)
    await task_in("aborted then retried", start, fail, abort, retry)
    await task_in("succeeded", start, succeed, n=1)
    await task_in("cancelled", cancel)
    await task_in("failed", start, fail, cancel)
    empty = fleet_task(name="empty")
    await store.add_task(empty, NOW, nodes=[])
    paused_empty = fleet_task(name="paused empty")
    await store.add_task(paused_empty, NOW, nodes=[])
    await store.pause(paused_empty.id, True)

    everything = (await store.list_tasks(TaskQuery(limit=1000))).items
    status = {s.task.name: s.status for s in everything}
    assert status == {
        "pending": TaskStatus.PENDING,
        "partly cancelled": TaskStatus.PENDING,
        "running": TaskStatus.RUNNING,
        "paused": TaskStatus.PAUSED,
        "paused in flight": TaskStatus.PAUSED,
        "paused done": TaskStatus.SUCCEEDED,
        "paused failed": TaskStatus.FAILED,
        "aborted": TaskStatus.ABORTED,
        "aborted in flight": TaskStatus.ABORTED,
        "aborted paused": TaskStatus.ABORTED,
        "aborted then retried": TaskStatus.PENDING,
        "succeeded": TaskStatus.SUCCEEDED,
        "cancelled": TaskStatus.CANCELLED,
        "failed": TaskStatus.FAILED,
        "empty": TaskStatus.PENDING,
        "paused empty": TaskStatus.PAUSED,
    }
    for summary in everything:
        assert await store.get_task(summary.task.id) == summary
    for wanted in TaskStatus:
        expected = [s.task.id for s in everything if s.status is wanted]
        got = await store.list_tasks(TaskQuery(status=wanted))
        assert [s.task.id for s in got.items] == expected, wanted
        assert all(s.status is wanted for s in got.items)
        # the other listing paths (by device, by name) read status the same way
        by_node = await store.list_tasks(TaskQuery(status=wanted, node_id="node//shared"))
        assert [s.task.id for s in by_node.items] == [
            s.task.id for s in everything
            if s.status is wanted and len(s.task.targets) == 2
        ], wanted
        for summary in everything:
            if summary.task.targets:
                own = await store.list_tasks(
                    TaskQuery(status=wanted, node_id=summary.task.targets[0]))
                assert [s.task.id for s in own.items] == (
                    [summary.task.id] if summary.status is wanted else []
                )
            by_name = await store.list_tasks(TaskQuery(status=wanted, name=summary.task.name))
            assert [s.task.id for s in by_name.items] == (
                [summary.task.id] if summary.status is wanted else []
            )


# --------------------------------------------------------------------------- round trips


FLEET_TASKS = [
    make_task(
        name="fleet", select=Selector(
            group="Servers", tags=("web", "Prod"), tags_mode=TagsMode.ANY, os="linux",
            name="web-*",
        ),
        continuous=True, expires_at=at(3600),
        rollout=Rollout(
            max_concurrent=3, per_minute=10, abort_failed_pct=12.5, abort_min_finished=4
        ),
        success_exit_codes=(0, 3, -1, 2**32 - 1),
    ),
    make_task("node//a", name="group id", select=Selector(group="mesh//abc"),
              rollout=Rollout(abort_failed_pct=0)),
    make_task(name="all", select=EVERYTHING, success_exit_codes=(1,)),
    make_task("node//a", name="plain", rollout=Rollout(per_minute=1)),
]


async def test_fleet_fields_round_trip(store: Any) -> None:
    for i, task in enumerate(FLEET_TASKS):  # devices of its own: one dispatched run each
        await store.add_task(task, NOW, nodes=[f"node//a{i}", f"node//b{i}"])
    for task in FLEET_TASKS:
        got = (await store.get_task(task.id)).task
        assert got == task
        assert (got.select, got.continuous, got.rollout, got.success_exit_codes) == (
            task.select, task.continuous, task.rollout, task.success_exit_codes,
        )
    listed = (await store.list_tasks(TaskQuery())).items
    assert [s.task for s in listed] == FLEET_TASKS[::-1]
    keys = [RunKey(task.id, f"node//a{i}") for i, task in enumerate(FLEET_TASKS)]
    claimed = await store.claim_many(keys, at(1))
    assert [task for _, task in claimed] == FLEET_TASKS
    assert list(await store.open_continuous(NOW)) == [FLEET_TASKS[0]]
    # the selector still works after the round trip
    web = Device(node_id="node//w", name="WEB-1", group_name="servers", tags=("prod",),
                 os="Ubuntu Linux")
    assert (await store.get_task(FLEET_TASKS[0].id)).task.select.matches(web)


# --------------------------------------------------------------------------- SQLite only


async def test_sqlite_reopened_keeps_paused_aborted_closed_and_history(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    first = SQLiteStore(path)
    await first.open()
    paused = fleet_task(name="paused", rollout=Rollout(per_minute=3))
    aborted = make_task("node//a", "node//b", name="aborted")
    closed = fleet_task(name="closed")
    try:
        await first.add_task(paused, NOW, nodes=["node//a", "node//b"])
        await first.add_task(aborted, NOW)
        await first.add_task(closed, NOW, nodes=["node//c"])
        await dispatch(first, paused, "node//a", at(1))
        await first.release(
            RunKey(paused.id, "node//a"), at(2), available_at=at(2), error="x", delivered=True
        )
        await dispatch(first, paused, "node//a", at(3))
        await finish(first, paused, "node//a", RunState.FAILED, at(4),
                     outcome=Outcome(exit_code=1, output="no"))
        await dispatch(first, paused, "node//b", at(5))
        await first.pause(paused.id, True)
        await dispatch(first, aborted, "node//a", at(1))
        await first.abort(aborted.id, "by hand ✓", at(2))
        await first.cancel(closed.id, now=at(1))
        state = await fleet_snapshot(first, [paused, aborted, closed])
    finally:
        await first.close()

    second = SQLiteStore(path)
    await second.open()
    try:
        assert await fleet_snapshot(second, [paused, aborted, closed]) == state
        summaries = {s.task.name: s for s in state[0]}
        assert summaries["paused"].paused is True
        assert summaries["aborted"].aborted == "by hand ✓"
        assert summaries["aborted"].closed is True
        assert summaries["closed"].closed is True
        history = state[2][0]
        assert [(a.number, a.state) for a in history["node//a"]] == [
            (1, RunState.LOST), (2, RunState.FAILED),
        ]
        # and they still behave so
        assert await second.next_pending(["node//a", "node//b", "node//c"], at(10)) == []
        assert await second.add_runs(closed.id, ["node//d"], at(10)) == []
        assert await second.add_runs(aborted.id, ["node//d"], at(10)) == []
        assert [r.node_id for r in await second.add_runs(paused.id, ["node//d"], at(10))] == [
            "node//d",
        ]
        assert await second.claim_many([RunKey(paused.id, "node//d")], at(10)) == []
        await finish(second, aborted, "node//a", RunState.SUCCEEDED, at(11))
        assert (await second.get_task(aborted.id)).status is TaskStatus.ABORTED
    finally:
        await second.close()


async def fleet_snapshot(store: Any, tasks: list[Task]) -> Any:
    return (
        [await store.get_task(t.id) for t in tasks],
        [list(await store.get_runs(t.id)) for t in tasks],
        [dict(await store.attempts(t.id)) for t in tasks],
        list(await store.open_continuous(NOW)),
        sorted(await store.recent_starts(NOW)),
        [(await store.list_tasks(TaskQuery(status=s))).items for s in TaskStatus],
        dict(await store.counts()),
    )


# --------------------------------------------------------------------------- both agree


NODES = [f"node//{i}" for i in range(4)]
ALL_STATES = list(RunState)


def normal(method: str, value: Any) -> Any:
    """A store's answer in a form both stores' answers compare in."""
    if method == "recent_starts":  # in no particular order
        return sorted(value)
    if method == "dispatched":  # in no particular order
        return sorted(value, key=lambda r: r.key)
    if method == "list_tasks":  # cursors are opaque
        return value.items, value.next_cursor is None
    if isinstance(value, dict) or method in ("counts", "attempts"):
        return {k: list(v) if isinstance(v, list | tuple) else v for k, v in value.items()}
    if isinstance(value, list | tuple):
        return list(value)
    return value


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_stores_agree_on_the_fleet_verbs(
    runner: asyncio.Runner, data: st.DataObject, kind: str, request: pytest.FixtureRequest
) -> None:
    """A random sequence of the fleet verbs (and the loop's) gives the same answers and
    leaves the same state (runs, summaries, attempt histories) in both stores (the
    reference and SQLiteStore, or the reference and PostgresStore)."""
    # PostgresStore is shared by several runners: its reference is the shared one (it
    # also leaves out runs past their task's rollout limits, counted in the store)
    reference = SharedInMemoryStore() if kind == "postgres" else InMemoryStore()
    dsn = None
    if kind == "postgres":
        server: PgServer = request.getfixturevalue("postgres")
        dsn = server.database()
        other: Any = PostgresStore(dsn, max_size=2)
    else:
        other = SQLiteStore(":memory:")
    task_ids: list[str] = []
    clock = NOW

    async def both(method: str, *args: Any, **kwargs: Any) -> Any:
        answers = []
        for s in (reference, other):
            try:
                answers.append(("ok", normal(method, await getattr(s, method)(*args, **kwargs))))
            except StoreError as exc:
                answers.append(("error", type(exc).__name__))
        assert answers[1] == answers[0], (method, args, kwargs)
        return answers[0]

    def idle(nodes: list[str]) -> list[str]:
        busy = {r.node_id for r in reference.runs.values() if r.state is RunState.DISPATCHED}
        return [n for n in nodes if n not in busy]

    async def same_state() -> None:
        for tid in task_ids:
            await both("get_task", tid)
            await both("get_runs", tid)
            await both("attempts", tid)
        await both("counts")
        await both("list_tasks", TaskQuery(limit=1000))
        await both("open_continuous", clock)
        await both("recent_starts", NOW - timedelta(seconds=1))
        await both("next_pending", idle(NODES), clock)
        await both("dispatched")

    def rarely() -> bool:  # (Hypothesis favours the ends of a range: the rare one is inside)
        return data.draw(st.integers(0, 8)) == 4

    def a_task() -> str:  # now and then one that does not exist
        return data.draw(st.sampled_from(task_ids)) if task_ids and not rarely() else "nope"

    def a_key(*states: RunState, free: bool = False) -> RunKey:  # mostly one in `states`
        busy = {r.node_id for r in reference.runs.values() if r.state is RunState.DISPATCHED}
        keys = sorted(k for k, r in reference.runs.items() if (not states or r.state in states)
                      and not (free and k.node_id in busy))
        if keys and not rarely():
            return data.draw(st.sampled_from(keys))
        return RunKey(a_task(), data.draw(st.sampled_from(NODES)))

    def some_nodes(**kw: Any) -> list[str]:
        return data.draw(st.lists(st.sampled_from(NODES), **kw))

    async def add_task() -> None:
        continuous = data.draw(st.booleans())
        select = EVERYTHING if continuous or data.draw(st.booleans()) else None
        targets = some_nodes(unique=True, min_size=0 if select else 1, max_size=3)
        expires = data.draw(st.none() | st.integers(1, 40))
        later = data.draw(st.none() | st.integers(1, 10))
        task = Task(
            id=f"t{len(task_ids)}", name=data.draw(st.sampled_from("xy")), command="c",
            targets=targets, created_at=NOW, select=select, continuous=continuous,
            not_before=None if later is None else clock + timedelta(seconds=later),
            expires_at=None if expires is None else clock + timedelta(seconds=expires + 10),
            rollout=Rollout(per_minute=data.draw(st.sampled_from([None, 2]))),
        )
        nodes = None
        if select is not None and data.draw(st.booleans()):
            extra = some_nodes(unique=True, max_size=3)
            nodes = [*targets, *(n for n in extra if n not in targets)]
        task_ids.append(task.id)
        await both("add_task", task, clock, nodes=nodes)

    async def step() -> None:
        nonlocal clock
        clock += timedelta(seconds=data.draw(st.sampled_from([0, 1, 5])))
        op = data.draw(st.sampled_from([
            "add_task", "add_runs", "pause", "abort", "retry", "retry", "next_pending",
            "claim_many", "claim_many", "finish", "finish", "release", "cancel", "expire_due",
            "delete_task", "list_tasks",
        ]))
        if op == "add_task" or not task_ids:
            await add_task()
        elif op == "add_runs":
            await both("add_runs", a_task(), some_nodes(max_size=5), clock)
        elif op == "pause":
            await both("pause", a_task(), data.draw(st.booleans()))
        elif op == "abort":
            await both("abort", a_task(), data.draw(st.sampled_from(["why", "ratio"])), clock)
        elif op == "retry":
            pool = ALL_STATES if rarely() else sorted(RETRYABLE_STATES)
            states = data.draw(st.sets(st.sampled_from(pool), max_size=3))
            await both("retry", a_task(), states, clock)
        elif op == "next_pending":
            limit = data.draw(st.none() | st.integers(1, 3))
            skip = data.draw(st.lists(st.sampled_from(task_ids), max_size=2))
            # as the loop asks: devices without a run in flight (a store shared by
            # several processes leaves the others out; the in-process ones need not)
            await both("next_pending", idle(some_nodes(min_size=1, max_size=5)), clock,
                       limit=limit, skip_tasks=skip)
        elif op == "claim_many":
            # as the loop claims: a device at most once, and not while it has a run
            # dispatched (PostgresStore refuses that; the others do not check)
            keys = [a_key(RunState.PENDING, free=True)
                    for _ in range(data.draw(st.integers(1, 3)))]
            busy = {r.node_id for r in reference.runs.values()
                    if r.state is RunState.DISPATCHED}
            keys = list({k.node_id: k for k in reversed(keys)}.values())[::-1]
            keys = [k for k in keys if k.node_id not in busy]
            await both("claim_many", keys, clock)
        elif op == "finish":
            legal = [RunState.SUCCEEDED, RunState.FAILED, RunState.TIMED_OUT, RunState.LOST]
            pool = ALL_STATES if rarely() else legal
            state = data.draw(st.sampled_from(pool))
            outcome = data.draw(st.none() | st.builds(
                Outcome, exit_code=st.integers(0, 2), output=st.sampled_from(["", "out ✓"]),
                started_at=st.none() | st.just(clock - timedelta(seconds=1)),
            ))
            error = data.draw(st.none() | st.just("err"))
            key = a_key(RunState.DISPATCHED)
            await both("finish", key, state, clock, outcome=outcome, error=error)
        elif op == "release":
            key = a_key(RunState.DISPATCHED)
            await both("release", key, clock, available_at=clock + timedelta(seconds=2),
                       error="again", delivered=data.draw(st.booleans()))
        elif op == "cancel":
            which = data.draw(st.none() | st.lists(st.sampled_from(NODES), max_size=2))
            await both("cancel", a_task(), which, now=clock)
        elif op == "expire_due":
            await both("expire_due", clock)
        elif op == "delete_task":
            await both("delete_task", a_task())
        else:
            status = data.draw(st.none() | st.sampled_from(TaskStatus))
            await both("list_tasks", TaskQuery(status=status, limit=data.draw(st.integers(1, 3))))
        await same_state()

    async def body() -> None:
        await other.open()
        try:
            for _ in range(data.draw(st.integers(5, 40))):
                await step()
            for status in TaskStatus:
                await both("list_tasks", TaskQuery(status=status, limit=1000))
        finally:
            await other.close()

    try:
        runner.run(body())
    finally:
        if dsn is not None:
            server.drop(dsn)



async def test_a_retried_expired_run_waits_for_its_device(store: Any) -> None:
    """An operator's retry of an expired run gives it a real new chance: its deadline is
    dropped, so it is not expired again before its device can take it."""
    task = make_task("node//a", expires_at=at(10))
    await store.add_task(task, NOW)
    assert await store.expire_due(at(10)) == 1
    [run] = await store.retry(task.id, [RunState.EXPIRED], at(20))
    assert (run.state, run.expires_at) == (RunState.PENDING, None)
    assert await store.expire_due(at(30)) == 0
    assert [r.node_id for r in await store.next_pending(["node//a"], at(30))] == ["node//a"]


async def test_rollout_tasks_are_the_limited_tasks_with_active_runs(store: Any) -> None:
    plain = await add(store, "node//a")
    capped = await add(store, "node//a", "node//b", rollout=Rollout(max_concurrent=1))
    rated = await add(store, "node//c", rollout=Rollout(per_minute=5))
    only_abort = await add(store, "node//d", rollout=Rollout(abort_failed_pct=10))
    assert [t.id for t in await store.rollout_tasks()] == [capped.id, rated.id]
    assert all(t.rollout.max_concurrent or t.rollout.per_minute
               for t in await store.rollout_tasks())
    # in flight still counts; all runs ended: no more
    await dispatch(store, rated, "node//c")
    assert [t.id for t in await store.rollout_tasks()] == [capped.id, rated.id]
    await finish(store, rated, "node//c", RunState.SUCCEEDED, at(1))
    await store.cancel(capped.id, now=at(2))
    assert await store.rollout_tasks() == []
    # a retry makes it active again
    await store.retry(capped.id, [RunState.CANCELLED], at(3))
    assert [t.id for t in await store.rollout_tasks()] == [capped.id]
    assert {plain.id, only_abort.id}.isdisjoint(t.id for t in await store.rollout_tasks())


async def test_a_run_released_after_its_task_was_aborted_is_cancelled(store: Any) -> None:
    """The abort cancelled the pending runs while this one was out; when it comes back
    (not delivered, or an at_least_once resend) it must not start again."""
    task = await add(store, "node//a", "node//b")
    await dispatch(store, task, "node//a", at(1))
    await store.abort(task.id, "aborted: too many failures", at(2))
    for delivered in (False, True):
        if delivered:
            task = await add(store, "node//c")
            await dispatch(store, task, "node//c", at(3))
            await store.abort(task.id, "aborted: too many failures", at(4))
        node = "node//c" if delivered else "node//a"
        run = await store.release(RunKey(task.id, node), at(5), available_at=at(6),
                                  error="not delivered", delivered=delivered)
        assert (run.state, run.error) == (RunState.CANCELLED, "aborted: too many failures")
        assert await run_of(store, task, node) == run
        assert await store.next_pending([node], at(10), limit=5) == []


async def test_a_run_still_out_at_an_abort_is_not_cancelled_by_it(store: Any) -> None:
    """(The abort cancels pending runs only: a dispatched one finishes as it finishes.)"""
    task = await add(store, "node//a")
    await dispatch(store, task, "node//a", at(1))
    assert await store.abort(task.id, "stop", at(2)) == []
    run = await store.finish(RunKey(task.id, "node//a"), RunState.SUCCEEDED, at(3))
    assert run.state is RunState.SUCCEEDED

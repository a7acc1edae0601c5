"""The event log part of the Store contract (``events_after``, ``last_event_id``,
``prune_events``, and the event each verb writes), on every store: memory, SQLite and
PostgreSQL. The kinds and their data are ``ghostrunner.events``'."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ghostrunner import events as ev
from ghostrunner._memory import InMemoryStore
from ghostrunner._protocols import Store
from ghostrunner._types import Outcome, RunKey, RunState, Selector, Task
from ghostrunner.errors import Conflict, IllegalTransition, NotFound

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def make_task(*targets: str, **kw: Any) -> Task:
    kw.setdefault("name", "job")
    kw.setdefault("command", "echo hi")
    kw.setdefault("created_at", NOW)
    return Task(targets=targets or ("node//a",), **kw)


async def add(store: Store, *targets: str, now: datetime = NOW, **kw: Any) -> Task:
    task = make_task(*targets, **kw)
    await store.add_task(task, now)
    return task


async def new_events(store: Store, after: int) -> list[ev.Event]:
    return list(await store.events_after(after, 10_000))


def shape(events: list[ev.Event]) -> list[tuple[str, str | None, dict[str, Any]]]:
    """What an event says, without its id, time and task id."""
    return [(e.kind, e.node_id, dict(e.data)) for e in events]


async def test_an_empty_store_has_no_events(store: Any) -> None:
    assert await store.last_event_id() == 0
    assert list(await store.events_after(0, 100)) == []


async def test_add_task_writes_task_created(store: Any) -> None:
    task = await add(store, "node//a", "node//b", name="upgrade")
    events = await new_events(store, 0)
    assert len(events) == 1
    got = events[0]
    assert (got.kind, got.task_id, got.node_id, got.at) == (ev.TASK_CREATED, task.id, None, NOW)
    assert dict(got.data) == {"name": "upgrade", "runs": 2, "nodes": ["node//a", "node//b"]}
    assert got.id > 0 and await store.last_event_id() == got.id


async def test_a_large_task_lists_no_nodes(store: Any) -> None:
    nodes = [f"node//n{i:04d}" for i in range(ev.NODES_LISTED + 1)]
    task = make_task(*nodes)
    await store.add_task(task, NOW)
    (got,) = await new_events(store, 0)
    assert dict(got.data) == {"name": "job", "runs": len(nodes)}
    await store.cancel(task.id, now=at(1))
    (cancelled,) = await new_events(store, got.id)
    assert dict(cancelled.data) == {"count": len(nodes), "closed": True}


async def test_the_loops_verbs_write_one_event_per_run(store: Any) -> None:
    task = await add(store, "node//a", "node//b", "node//c")
    start = await store.last_event_id()
    keys = [RunKey(task.id, n) for n in ("node//a", "node//b", "node//c")]
    await store.claim_many(keys, at(1))
    await store.finish(keys[0], RunState.SUCCEEDED, at(2),
                       outcome=Outcome(exit_code=0, output="ok"))
    await store.finish(keys[1], RunState.FAILED, at(3),
                       outcome=Outcome(exit_code=3, output="no", recovered=True))
    await store.release(keys[2], at(4), available_at=at(10), error="not delivered",
                        delivered=False)
    events = await new_events(store, start)
    assert [(e.kind, e.task_id, e.at) for e in events] == [
        (ev.RUN_CLAIMED, task.id, at(1))] * 3 + [
        (ev.RUN_FINISHED, task.id, at(2)), (ev.RUN_FINISHED, task.id, at(3)),
        (ev.RUN_RELEASED, task.id, at(4))]
    assert shape(events) == [
        (ev.RUN_CLAIMED, "node//a", {"state": "dispatched", "attempts": 1}),
        (ev.RUN_CLAIMED, "node//b", {"state": "dispatched", "attempts": 1}),
        (ev.RUN_CLAIMED, "node//c", {"state": "dispatched", "attempts": 1}),
        (ev.RUN_FINISHED, "node//a", {"state": "succeeded", "attempts": 1, "exit_code": 0}),
        (ev.RUN_FINISHED, "node//b",
         {"state": "failed", "attempts": 1, "exit_code": 3, "recovered": True}),
        (ev.RUN_RELEASED, "node//c",
         {"state": "pending", "attempts": 0, "undelivered": 1, "delivered": False,
          "error": "not delivered"}),
    ]
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))


async def test_release_of_an_aborted_tasks_run_says_cancelled(store: Any) -> None:
    task = await add(store, "node//a")
    key = RunKey(task.id, "node//a")
    await store.claim_many([key], at(1))
    await store.abort(task.id, "too many failures", at(2))
    start = await store.last_event_id()
    await store.release(key, at(3), available_at=at(4), error="lost", delivered=True)
    assert shape(await new_events(store, start)) == [
        (ev.RUN_RELEASED, "node//a",
         {"state": "cancelled", "attempts": 1, "undelivered": 0, "delivered": True,
          "error": "too many failures"})]


async def test_lost_and_timed_out_runs_with_errors(store: Any) -> None:
    task = await add(store, "node//a", "node//b")
    keys = [RunKey(task.id, "node//a"), RunKey(task.id, "node//b")]
    await store.claim_many(keys, at(1))
    start = await store.last_event_id()
    await store.finish(keys[0], RunState.LOST, at(2), error="x" * 2000)
    await store.finish(keys[1], RunState.TIMED_OUT, at(3),
                       outcome=Outcome(exit_code=124, output=""))
    lost, timed_out = await new_events(store, start)
    assert lost.data["state"] == "lost" and lost.data["error"] == "x" * ev.TEXT_KEPT
    assert "exit_code" not in lost.data
    assert dict(timed_out.data) == {"state": "timed_out", "attempts": 1, "exit_code": 124}


async def test_operators_verbs_write_one_event_per_task(store: Any) -> None:
    task = await add(store, "node//a", "node//b", "node//c")
    start = await store.last_event_id()
    await store.cancel(task.id, ["node//b"], now=at(1))
    await store.pause(task.id, True)
    await store.pause(task.id, True)  # no change: no event
    await store.pause(task.id, False)
    await store.abort(task.id, "stop", at(2))
    await store.retry(task.id, [RunState.CANCELLED], at(3))
    events = await new_events(store, start)
    assert shape(events) == [
        (ev.RUNS_CANCELLED, None, {"count": 1, "nodes": ["node//b"], "closed": False}),
        (ev.TASK_PAUSED, None, {}),
        (ev.TASK_RESUMED, None, {}),
        (ev.TASK_ABORTED, None, {"count": 2, "nodes": ["node//a", "node//c"], "reason": "stop"}),
        (ev.RUNS_RETRIED, None,
         {"count": 3, "nodes": ["node//a", "node//b", "node//c"], "states": ["cancelled"]}),
    ]
    assert all(e.task_id == task.id for e in events)
    assert [e.at for e in events if e.kind not in (ev.TASK_PAUSED, ev.TASK_RESUMED)] == [
        at(1), at(2), at(3)]


async def test_verbs_that_change_nothing_write_nothing(store: Any) -> None:
    task = await add(store, "node//a")
    await store.cancel(task.id, now=at(1))  # cancels the run, closes the task
    start = await store.last_event_id()
    await store.cancel(task.id, now=at(2))
    await store.cancel(task.id, ["node//a"], now=at(2))
    await store.pause(task.id, False)
    await store.retry(task.id, [RunState.FAILED], at(3))  # none failed; the task was closed
    events = await new_events(store, start)
    # the retry re-opened the task closed by the cancel: that is a change
    assert shape(events) == [
        (ev.RUNS_RETRIED, None, {"count": 0, "nodes": [], "states": ["failed"]})]
    start = await store.last_event_id()
    await store.retry(task.id, [RunState.FAILED], at(4))
    assert await store.expire_due(at(5)) == 0
    assert await store.add_runs(task.id, ["node//a"], at(6)) == []
    assert await new_events(store, start) == []


async def test_a_whole_task_cancel_with_nothing_pending_tells_it_closed(store: Any) -> None:
    task = await add(store, "node//a")
    await store.claim_many([RunKey(task.id, "node//a")], at(1))
    start = await store.last_event_id()
    assert await store.cancel(task.id, now=at(2)) == []
    assert shape(await new_events(store, start)) == [
        (ev.RUNS_CANCELLED, None, {"count": 0, "nodes": [], "closed": True})]


async def test_expire_due_writes_one_event_per_task(store: Any) -> None:
    first = await add(store, "node//b", "node//a", "node//c", expires_at=at(10))
    second = await add(store, "node//a", expires_at=at(10))
    await add(store, "node//z", expires_at=at(100))
    await store.claim_many([RunKey(first.id, "node//a")], at(1))
    start = await store.last_event_id()
    assert await store.expire_due(at(10)) == 3
    events = await new_events(store, start)
    assert [(e.kind, e.task_id, e.at) for e in events] == [
        (ev.RUNS_EXPIRED, first.id, at(10)), (ev.RUNS_EXPIRED, second.id, at(10))]
    assert [dict(e.data) for e in events] == [
        {"count": 2, "nodes": ["node//b", "node//c"]}, {"count": 1, "nodes": ["node//a"]}]


async def test_add_runs_and_delete(store: Any) -> None:
    task = await add(store, "node//a", select=Selector(tags=("web",)), continuous=True)
    start = await store.last_event_id()
    await store.add_runs(task.id, ["node//b", "node//a", "node//c"], at(1))
    await store.cancel(task.id, now=at(2))
    await store.delete_task(task.id)
    events = await new_events(store, start)
    assert shape(events) == [
        (ev.RUNS_ADDED, None, {"count": 2, "nodes": ["node//b", "node//c"]}),
        (ev.RUNS_CANCELLED, None,
         {"count": 3, "nodes": ["node//a", "node//b", "node//c"], "closed": True}),
        (ev.TASK_DELETED, None, {"runs": 3}),
    ]
    assert events[-1].at.tzinfo is not None


async def test_a_verb_that_fails_writes_no_event(store: Any) -> None:
    task = await add(store, "node//a")
    start = await store.last_event_id()
    with pytest.raises(Conflict):
        await store.add_task(task, NOW)
    with pytest.raises(IllegalTransition):
        await store.finish(RunKey(task.id, "node//a"), RunState.SUCCEEDED, at(1))
    with pytest.raises(IllegalTransition):
        await store.release(RunKey(task.id, "node//a"), at(1), available_at=at(1),
                            error="x", delivered=False)
    with pytest.raises(NotFound):
        await store.claim_many([RunKey(task.id, "node//a"), RunKey(task.id, "node//zz")],
                               at(1))
    with pytest.raises(IllegalTransition):
        await store.delete_task(task.id)
    with pytest.raises(NotFound):
        await store.pause("nope", True)
    assert await new_events(store, start) == []
    assert (await store.get_runs(task.id))[0].state is RunState.PENDING


async def test_events_after_pages_by_cursor(store: Any) -> None:
    tasks = [await add(store, f"node//{i}") for i in range(7)]
    seen: list[str] = []
    cursor = 0
    while batch := await store.events_after(cursor, 3):
        assert len(batch) <= 3
        seen += [e.task_id for e in batch]
        cursor = batch[-1].id
    assert seen == [t.id for t in tasks]
    assert cursor == await store.last_event_id()
    assert list(await store.events_after(cursor, 3)) == []
    assert list(await store.events_after(cursor + 1000, 3)) == []
    assert list(await store.events_after(0, 0)) == []


async def test_prune_deletes_the_oldest_and_ids_are_never_reused(store: Any) -> None:
    old = [await add(store, f"node//{i}", now=at(i)) for i in range(3)]
    assert old
    assert await store.prune_events(at(1)) == 1
    left = await new_events(store, 0)
    assert [e.at for e in left] == [at(1), at(2)]
    last = await store.last_event_id()
    assert await store.prune_events(at(100)) == 2
    assert await new_events(store, 0) == []
    assert await store.prune_events(at(100)) == 0
    await add(store, "node//new", now=at(200))
    (fresh,) = await new_events(store, 0)
    assert fresh.id > last  # a reader's cursor stays valid
    assert await new_events(store, last) == [fresh]


async def scenario(store: Store) -> list[tuple[str, str, str | None, dict[str, Any]]]:
    """The same verbs on any store; its events (kind, task name, node, data)."""
    names: dict[str, str] = {}
    a = await add(store, "node//a", "node//b", name="a", id="task-a", expires_at=at(50))
    b = await add(store, "node//b", "node//c", name="b", id="task-b")
    names.update({a.id: "a", b.id: "b"})
    claimed = await store.claim_many(
        [RunKey(a.id, "node//a"), RunKey(b.id, "node//c")], at(1))
    assert len(claimed) == 2
    await store.finish(RunKey(a.id, "node//a"), RunState.FAILED, at(2),
                       outcome=Outcome(exit_code=1, output=""))
    await store.release(RunKey(b.id, "node//c"), at(3), available_at=at(4), error="busy",
                        delivered=True)
    await store.retry(a.id, [RunState.FAILED], at(5))
    await store.pause(b.id, True)
    await store.expire_due(at(60))
    await store.cancel(b.id, now=at(61))
    await store.delete_task(b.id)
    events = await new_events(store, 0)
    return [(e.kind, names[e.task_id], e.node_id, dict(e.data)) for e in events]


async def test_every_store_writes_what_the_reference_writes(store: Any) -> None:
    reference = InMemoryStore()
    assert await scenario(store) == await scenario(reference)


async def test_verbs_run_together_keep_their_own_events(store: Any) -> None:
    """Concurrent verbs (one SQLite batch, one transaction with a savepoint each): the
    one that fails leaves no event, the others keep theirs."""
    task = await add(store, "node//a", "node//b")
    keys = [RunKey(task.id, "node//a"), RunKey(task.id, "node//b")]
    await store.claim_many(keys[:1], at(1))
    start = await store.last_event_id()
    results = await asyncio.gather(
        store.finish(keys[0], RunState.SUCCEEDED, at(2), outcome=Outcome(exit_code=0)),
        store.finish(keys[1], RunState.SUCCEEDED, at(2), outcome=Outcome(exit_code=0)),
        store.cancel(task.id, ["node//b"], now=at(2)),
        return_exceptions=True,
    )
    assert isinstance(results[1], IllegalTransition)
    # concurrent verbs: in either order (PostgreSQL commits them on separate connections)
    assert sorted(shape(await new_events(store, start)), key=lambda e: e[0]) == [
        (ev.RUN_FINISHED, "node//a", {"state": "succeeded", "attempts": 1, "exit_code": 0}),
        (ev.RUNS_CANCELLED, None, {"count": 1, "nodes": ["node//b"], "closed": False}),
    ]

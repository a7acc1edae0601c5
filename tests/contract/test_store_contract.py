"""The Store contract (ghostrunner._protocols.Store), run against every store.

``InMemoryStore`` is the reference: every test that takes the ``store`` fixture runs on
it, on ``SQLiteStore`` (a file in tmp_path) and on ``PostgresStore`` (a fresh database
of the session's PostgreSQL, tests/pg.py). The tests at the end are SQLite only:
persistence across reopen, schema migrations, the batching machinery, query plans.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import random
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostrunner._memory import InMemoryStore
from ghostrunner._protocols import Store
from ghostrunner._sqlkit import STATUS_SQL
from ghostrunner._types import (
    TERMINAL_STATES,
    Delivery,
    Outcome,
    Rollout,
    Run,
    RunKey,
    RunState,
    Selector,
    Shell,
    Task,
    TaskQuery,
    TaskStatus,
    task_status,
)
from ghostrunner.errors import Conflict, IllegalTransition, NotFound, StoreError, ValidationError
from ghostrunner.sqlite import SQLiteStore, _queries, _schema, _store
from ghostrunner.tokens import Scope, Token
from ghostrunner_http._tokens import hash_secret, new_token

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


async def claim(store: Store, key: RunKey, now: datetime) -> Run | None:
    """Claim one run, as the loop claims them (``claim_many``); None if not pending."""
    claimed = await store.claim_many([key], now)
    return claimed[0][0] if claimed else None


async def dispatch(store: Store, task: Task, node: str, now: datetime = NOW) -> Run:
    run = await claim(store, RunKey(task.id, node), now)
    assert run is not None
    return run


async def run_of(store: Store, task: Task, node: str) -> Run:
    return next(r for r in await store.get_runs(task.id) if r.node_id == node)


# --------------------------------------------------------------------------- add / get


def test_implements_the_protocol(store: Any) -> None:
    assert isinstance(store, Store)


async def test_add_task_creates_one_pending_run_per_target(store: Any) -> None:
    task = make_task("node//c", "node//a", "node//b", not_before=at(5), expires_at=at(60))
    await store.add_task(task, NOW)
    runs = await store.get_runs(task.id)
    assert [r.node_id for r in runs] == ["node//c", "node//a", "node//b"]
    for run in runs:
        assert run.task_id == task.id
        assert run.state is RunState.PENDING
        assert (run.attempts, run.undelivered) == (0, 0)
        assert run.queued_at == NOW
        assert run.available_at == at(5)
        assert run.expires_at == at(60)
        assert run.started_at is None
        assert run.finished_at is None
        assert (run.exit_code, run.output, run.output_truncated, run.error) == (
            None,
            "",
            False,
            None,
        )
    assert list(await store.get_runs(task.id)) == list(runs)
    summary = await store.get_task(task.id)
    assert summary.task == task
    assert dict(summary.counts) == {RunState.PENDING: 3}
    assert summary.status is TaskStatus.PENDING
    assert dict(await store.counts()) == {RunState.PENDING: 3}


async def test_add_task_without_not_before_is_available_at_submission(store: Any) -> None:
    task = make_task("node//a")
    assert await store.add_task(task, at(3)) is None
    runs = await store.get_runs(task.id)
    assert runs[0].available_at == at(3) == runs[0].queued_at


async def test_add_task_duplicate_id_is_a_conflict_and_changes_nothing(store: Any) -> None:
    task = await add(store, "node//a", "node//b")
    await dispatch(store, task, "node//a")
    before = list(await store.get_runs(task.id))
    counts = dict(await store.counts())
    clash = make_task("node//b", "node//c", id=task.id, name="other")
    with pytest.raises(Conflict):
        await store.add_task(clash, NOW)
    assert list(await store.get_runs(task.id)) == before
    assert (await store.get_task(task.id)).task == task
    assert dict(await store.counts()) == counts
    assert [r.node_id for r in await store.next_pending(["node//b", "node//c"], NOW)] == ["node//b"]


async def test_unknown_task_is_not_found(store: Any) -> None:
    with pytest.raises(NotFound):
        await store.get_task("nope")
    with pytest.raises(NotFound):
        await store.get_runs("nope")
    with pytest.raises(NotFound):
        await store.delete_task("nope")
    with pytest.raises(NotFound):
        await store.cancel("nope", now=NOW)


async def test_unknown_run_is_not_found(store: Any) -> None:
    task = await add(store, "node//a")
    for key in (RunKey(task.id, "node//zz"), RunKey("nope", "node//a")):
        with pytest.raises(NotFound):
            await claim(store, key, NOW)
        with pytest.raises(NotFound):
            await store.finish(key, RunState.SUCCEEDED, NOW)
        with pytest.raises(NotFound):
            await store.release(key, NOW, available_at=NOW, error="x", delivered=True)


# --------------------------------------------------------------------------- next_pending


async def test_next_pending_follows_submission_order_per_device(store: Any) -> None:
    t1 = await add(store, "node//a", "node//b")
    t2 = await add(store, "node//a")
    t3 = await add(store, "node//c", "node//b")
    got = await store.next_pending(["node//a", "node//b", "node//c", "node//d"], NOW)
    assert {(r.node_id, r.task_id) for r in got} == {
        ("node//a", t1.id),
        ("node//b", t1.id),
        ("node//c", t3.id),
    }
    await dispatch(store, t1, "node//a")
    # (the loop never asks for a device with a run in flight: a store shared by several
    # processes leaves such a device out, see test_next_pending_leaves_out_busy_devices)
    await store.finish(RunKey(t1.id, "node//a"), RunState.SUCCEEDED, NOW)
    await store.cancel(t1.id, ["node//b"], now=NOW)
    got = await store.next_pending(["node//a", "node//b"], NOW)
    assert {(r.node_id, r.task_id) for r in got} == {("node//a", t2.id), ("node//b", t3.id)}
    assert all(r.state is RunState.PENDING for r in got)
    assert await store.next_pending([], NOW) == []
    assert await store.next_pending(["node//unknown"], NOW) == []


async def test_next_pending_returns_the_runs_as_stored(store: Any) -> None:
    task = await add(store, "node//a", expires_at=at(100))
    [run] = await store.next_pending({"node//a"}, NOW)
    assert run == (await store.get_runs(task.id))[0]


async def test_next_pending_respects_available_at(store: Any) -> None:
    later = await add(store, "node//a", not_before=at(10))
    sooner = await add(store, "node//a")
    [run] = await store.next_pending(["node//a"], NOW)
    assert run.task_id == sooner.id  # a later task does not wait behind a future one
    await store.cancel(sooner.id, now=NOW)
    assert await store.next_pending(["node//a"], at(9.999)) == []
    [run] = await store.next_pending(["node//a"], at(10))  # available_at <= now
    assert run.task_id == later.id


async def test_next_pending_skips_expired_runs(store: Any) -> None:
    short = await add(store, "node//a", expires_at=at(5))
    other = await add(store, "node//a")
    assert [r.task_id for r in await store.next_pending(["node//a"], at(4))] == [short.id]
    assert [r.task_id for r in await store.next_pending(["node//a"], at(5))] == [other.id]


async def test_next_pending_retry_backoff(store: Any) -> None:
    task = await add(store, "node//a")
    await dispatch(store, task, "node//a")
    await store.release(
        RunKey(task.id, "node//a"), NOW, available_at=at(30), error="busy", delivered=False
    )
    assert await store.next_pending(["node//a"], at(29)) == []
    assert len(await store.next_pending(["node//a"], at(30))) == 1


async def test_next_pending_one_run_per_device(store: Any) -> None:
    for _ in range(5):
        await add(store, "node//a", "node//b")
    got = await store.next_pending(["node//a", "node//b"], NOW)
    assert sorted(r.node_id for r in got) == ["node//a", "node//b"]


async def test_next_pending_with_thousands_of_devices(store: Any) -> None:
    nodes = [f"node//{i:05d}" for i in range(6000)]
    first = await add(store, *nodes[:3000])
    second = await add(store, *nodes[2000:5000])
    asked = [*nodes, *(f"node//gone{i}" for i in range(2000))]
    got = await store.next_pending(asked, NOW)
    assert len(got) == 5000
    by_node = {r.node_id: r.task_id for r in got}
    assert len(by_node) == 5000
    assert all(by_node[n] == first.id for n in nodes[:3000])
    assert all(by_node[n] == second.id for n in nodes[3000:5000])


# --------------------------------------------------------------------------- claim


async def test_claim_dispatches_a_pending_run(store: Any) -> None:
    task = await add(store, "node//a", "node//b")
    key = RunKey(task.id, "node//a")
    run = await claim(store, key, at(1))
    assert run is not None
    assert run.state is RunState.DISPATCHED
    assert run.attempts == 1
    assert run.started_at == at(1)
    assert await run_of(store, task, "node//a") == run
    assert await claim(store, key, at(2)) is None  # no longer pending
    assert (await run_of(store, task, "node//a")) == run
    assert dict((await store.get_task(task.id)).counts) == {
        RunState.DISPATCHED: 1,
        RunState.PENDING: 1,
    }


async def test_claim_of_a_cancelled_run_is_none(store: Any) -> None:
    task = await add(store, "node//a")
    await store.cancel(task.id, now=NOW)
    assert await claim(store, RunKey(task.id, "node//a"), NOW) is None
    assert (await run_of(store, task, "node//a")).state is RunState.CANCELLED


async def test_concurrent_claims_dispatch_once(store: Any) -> None:
    task = await add(store, "node//a")
    results = await asyncio.gather(
        *(claim(store, RunKey(task.id, "node//a"), NOW) for _ in range(10))
    )
    assert sum(r is not None for r in results) == 1
    assert (await run_of(store, task, "node//a")).attempts == 1


# --------------------------------------------------------------------------- finish


async def test_finish_records_the_outcome(store: Any) -> None:
    task = await add(store, "node//a")
    await dispatch(store, task, "node//a", at(1))
    output = "héllo wörld ✓ 漢字 🚀\n\ttabs\x00nul\r\n" * 3
    outcome = Outcome(
        exit_code=3, output=output, output_truncated=True, started_at=at(2), finished_at=at(7)
    )
    run = await store.finish(
        RunKey(task.id, "node//a"), RunState.FAILED, at(8), outcome=outcome, error="exit 3"
    )
    assert run.state is RunState.FAILED
    assert (run.exit_code, run.output, run.output_truncated, run.error) == (
        3,
        output,
        True,
        "exit 3",
    )
    assert (run.started_at, run.finished_at) == (at(2), at(7))
    assert run.attempts == 1
    assert await run_of(store, task, "node//a") == run
    assert (await store.get_task(task.id)).status is TaskStatus.FAILED


async def test_a_recovered_outcome_is_marked_on_the_run_and_its_attempt(store: Any) -> None:
    task = await add(store, "node//a")
    await dispatch(store, task, "node//a", at(1))
    key = RunKey(task.id, "node//a")
    run = await store.finish(key, RunState.FAILED, at(5),
                             outcome=Outcome(exit_code=2, output="x", recovered=True))
    assert run.recovered
    assert await run_of(store, task, "node//a") == run
    assert [a.recovered for a in (await store.attempts(task.id))["node//a"]] == [True]
    # an operator's retry starts afresh: the next attempt is not recovered
    await store.retry(task.id, [RunState.FAILED], at(6))
    assert not (await run_of(store, task, "node//a")).recovered
    again = await dispatch(store, task, "node//a", at(7))
    assert not again.recovered
    run = await store.finish(key, RunState.FAILED, at(8), outcome=Outcome(exit_code=1))
    assert not run.recovered
    assert [a.recovered for a in (await store.attempts(task.id))["node//a"]] == [True, False]


async def test_finish_without_outcome_times(store: Any) -> None:
    task = await add(store, "node//a")
    await dispatch(store, task, "node//a", at(1))
    run = await store.finish(
        RunKey(task.id, "node//a"), RunState.SUCCEEDED, at(9), outcome=Outcome(exit_code=0)
    )
    assert (run.started_at, run.finished_at, run.exit_code, run.output) == (at(1), at(9), 0, "")
    assert await run_of(store, task, "node//a") == run


async def test_finish_with_an_error_only(store: Any) -> None:
    task = await add(store, "node//a")
    await dispatch(store, task, "node//a")
    run = await store.finish(RunKey(task.id, "node//a"), RunState.LOST, at(4), error="gone")
    assert (run.state, run.error, run.exit_code, run.finished_at) == (
        RunState.LOST,
        "gone",
        None,
        at(4),
    )
    assert await run_of(store, task, "node//a") == run


async def test_finish_keeps_a_big_output(store: Any) -> None:
    task = await add(store, "node//a")
    await dispatch(store, task, "node//a")
    big = ("0123456789abcdé\n" * 350_000)[: 5 * 1024 * 1024]
    run = await store.finish(
        RunKey(task.id, "node//a"),
        RunState.SUCCEEDED,
        NOW,
        outcome=Outcome(exit_code=0, output=big),
    )
    assert run.output == big
    assert (await run_of(store, task, "node//a")).output == big


async def test_finish_of_a_run_not_dispatched_is_illegal(store: Any) -> None:
    task = await add(store, "node//a")
    key = RunKey(task.id, "node//a")
    with pytest.raises(IllegalTransition):
        await store.finish(key, RunState.SUCCEEDED, NOW, outcome=Outcome(exit_code=0))
    assert (await run_of(store, task, "node//a")).state is RunState.PENDING
    await dispatch(store, task, "node//a")
    done = await store.finish(key, RunState.SUCCEEDED, NOW, outcome=Outcome(exit_code=0))
    with pytest.raises(IllegalTransition):  # terminal states never change
        await store.finish(key, RunState.FAILED, at(1), error="again")
    assert await run_of(store, task, "node//a") == done


@pytest.mark.parametrize(
    "state", [RunState.PENDING, RunState.DISPATCHED, RunState.CANCELLED, RunState.EXPIRED]
)
async def test_finish_needs_a_terminal_state_reachable_from_dispatched(
    store: Any, state: RunState
) -> None:
    task = await add(store, "node//a")
    run = await dispatch(store, task, "node//a")
    with pytest.raises(IllegalTransition):
        await store.finish(RunKey(task.id, "node//a"), state, NOW)
    assert await run_of(store, task, "node//a") == run


# --------------------------------------------------------------------------- release


async def test_release_undelivered_gives_the_attempt_back(store: Any) -> None:
    task = await add(store, "node//a")
    key = RunKey(task.id, "node//a")
    await dispatch(store, task, "node//a")
    run = await store.release(key, at(1), available_at=at(20), error="offline", delivered=False)
    assert (run.state, run.attempts, run.undelivered) == (RunState.PENDING, 0, 1)
    assert (run.available_at, run.error, run.started_at) == (at(20), "offline", None)
    assert await run_of(store, task, "node//a") == run
    await dispatch(store, task, "node//a", at(20))
    run = await store.release(key, at(21), available_at=at(40), error="lost", delivered=True)
    assert (run.state, run.attempts, run.undelivered) == (RunState.PENDING, 1, 1)
    assert await run_of(store, task, "node//a") == run
    again = await dispatch(store, task, "node//a", at(40))
    assert (again.attempts, again.undelivered, again.started_at) == (2, 1, at(40))


async def test_release_of_a_run_not_dispatched_is_illegal(store: Any) -> None:
    task = await add(store, "node//a")
    with pytest.raises(IllegalTransition):
        await store.release(
            RunKey(task.id, "node//a"), NOW, available_at=NOW, error="x", delivered=True
        )
    assert (await run_of(store, task, "node//a")).state is RunState.PENDING


# --------------------------------------------------------------------------- cancel


async def test_cancel_only_touches_pending_runs(store: Any) -> None:
    task = await add(store, "node//a", "node//b", "node//c", "node//d")
    await dispatch(store, task, "node//b")
    await dispatch(store, task, "node//d")
    await store.finish(RunKey(task.id, "node//d"), RunState.SUCCEEDED, NOW)
    cancelled = await store.cancel(task.id, now=at(3))
    assert [r.node_id for r in cancelled] == ["node//a", "node//c"]
    assert all(r.state is RunState.CANCELLED and r.finished_at == at(3) for r in cancelled)
    states = {r.node_id: r.state for r in await store.get_runs(task.id)}
    assert states == {
        "node//a": RunState.CANCELLED,
        "node//b": RunState.DISPATCHED,
        "node//c": RunState.CANCELLED,
        "node//d": RunState.SUCCEEDED,
    }
    assert [r for r in await store.get_runs(task.id) if r.state is RunState.CANCELLED] == list(
        cancelled
    )
    assert await store.cancel(task.id, now=at(4)) == []


async def test_cancel_a_subset_of_devices(store: Any) -> None:
    task = await add(store, "node//a", "node//b", "node//c")
    other = await add(store, "node//b")
    cancelled = await store.cancel(task.id, ["node//c", "node//b", "node//zz"], now=NOW)
    assert [r.node_id for r in cancelled] == ["node//b", "node//c"]  # in target order
    assert (await run_of(store, task, "node//a")).state is RunState.PENDING
    assert (await run_of(store, other, "node//b")).state is RunState.PENDING
    assert await store.cancel(task.id, [], now=NOW) == []


# --------------------------------------------------------------------------- expiry, wakeup


async def test_expire_due(store: Any) -> None:
    soon = await add(store, "node//a", "node//b", expires_at=at(10))
    never = await add(store, "node//a")
    late = await add(store, "node//a", expires_at=at(20))
    await dispatch(store, soon, "node//b")
    assert await store.expire_due(at(9)) == 0
    assert await store.expire_due(at(10)) == 1  # expires_at <= now; dispatched untouched
    run = await run_of(store, soon, "node//a")
    assert (run.state, run.finished_at) == (RunState.EXPIRED, at(10))
    assert run.error
    assert (await run_of(store, soon, "node//b")).state is RunState.DISPATCHED
    assert await store.expire_due(at(10)) == 0
    assert await store.expire_due(at(1000)) == 1
    assert (await run_of(store, late, "node//a")).state is RunState.EXPIRED
    assert (await run_of(store, never, "node//a")).state is RunState.PENDING


async def test_dispatched_lists_every_dispatched_run(store: Any) -> None:
    t1 = await add(store, "node//a", "node//b", "node//c")
    t2 = await add(store, "node//d")  # (a device has one dispatched run at most)
    assert await store.dispatched() == []
    await dispatch(store, t2, "node//d")
    await dispatch(store, t1, "node//c")
    await dispatch(store, t1, "node//a")
    await dispatch(store, t1, "node//b")
    await store.finish(RunKey(t1.id, "node//b"), RunState.SUCCEEDED, NOW)
    got = await store.dispatched()
    assert [(r.task_id, r.node_id) for r in got] == [
        (t1.id, "node//a"),
        (t1.id, "node//c"),
        (t2.id, "node//d"),
    ]
    assert all(r.state is RunState.DISPATCHED for r in got)
    assert got[0] == await run_of(store, t1, "node//a")


async def test_next_wakeup(store: Any) -> None:
    assert await store.next_wakeup(NOW) is None
    await add(store, "node//a")  # available now: not a future moment
    assert await store.next_wakeup(NOW) is None
    await add(store, "node//a", not_before=at(30), expires_at=at(90))
    await add(store, "node//b", expires_at=at(50))
    done = await add(store, "node//c", not_before=at(5))
    assert await store.next_wakeup(NOW) == at(5)
    await store.cancel(done.id, now=NOW)  # only pending runs count
    assert await store.next_wakeup(NOW) == at(30)
    assert await store.next_wakeup(at(30)) == at(50)
    assert await store.next_wakeup(at(50)) == at(90)
    assert await store.next_wakeup(at(90)) is None


async def test_counts_over_all_tasks(store: Any) -> None:
    assert dict(await store.counts()) == {}
    t1 = await add(store, "node//a", "node//b", "node//c")
    t2 = await add(store, "node//a", "node//b")
    await dispatch(store, t1, "node//a")
    await dispatch(store, t1, "node//b")
    await store.finish(RunKey(t1.id, "node//b"), RunState.TIMED_OUT, NOW)
    await store.cancel(t2.id, ["node//a"], now=NOW)
    assert dict(await store.counts()) == {
        RunState.PENDING: 2,
        RunState.DISPATCHED: 1,
        RunState.TIMED_OUT: 1,
        RunState.CANCELLED: 1,
    }


# --------------------------------------------------------------------------- delete


async def test_delete_task_refuses_active_runs(store: Any) -> None:
    task = await add(store, "node//a", "node//b")
    keep = await add(store, "node//a")
    with pytest.raises(IllegalTransition):
        await store.delete_task(task.id)
    await dispatch(store, task, "node//a")
    await store.cancel(task.id, now=NOW)
    with pytest.raises(IllegalTransition):  # node//a is dispatched
        await store.delete_task(task.id)
    assert len(await store.get_runs(task.id)) == 2
    await store.finish(RunKey(task.id, "node//a"), RunState.SUCCEEDED, NOW)
    await store.delete_task(task.id)
    with pytest.raises(NotFound):
        await store.get_task(task.id)
    with pytest.raises(NotFound):
        await claim(store, RunKey(task.id, "node//b"), NOW)
    assert dict(await store.counts()) == {RunState.PENDING: 1}
    assert [r.task_id for r in await store.next_pending(["node//a"], NOW)] == [keep.id]
    page = await store.list_tasks(TaskQuery())
    assert [s.task.id for s in page.items] == [keep.id]
    again = await add(store, "node//z", id=task.id)  # the id is free again
    assert (await store.get_task(task.id)).task == again


# --------------------------------------------------------------------------- list_tasks


async def walk(store: Any, **filters: Any) -> list[str]:
    """Every page of a listing, checking the cursor contract on the way."""
    seen: list[str] = []
    cursor = None
    limit = filters.pop("limit", 3)
    for _ in range(1000):
        page = await store.list_tasks(TaskQuery(limit=limit, cursor=cursor, **filters))
        assert len(page.items) <= limit
        seen += [s.task.id for s in page.items]
        if page.next_cursor is None:
            break
        assert len(page.items) == limit
        cursor = page.next_cursor
    assert len(seen) == len(set(seen))
    return seen


async def test_list_tasks_pages_newest_first(store: Any) -> None:
    empty = await store.list_tasks(TaskQuery())
    assert empty.items == ()
    assert empty.next_cursor is None
    tasks = [await add(store, "node//a", name=f"t{i}") for i in range(10)]
    newest_first = [t.id for t in reversed(tasks)]
    assert await walk(store) == newest_first
    assert await walk(store, limit=5) == newest_first  # exact multiple: no empty last page
    assert await walk(store, limit=1000) == newest_first
    page = await store.list_tasks(TaskQuery(limit=4))
    assert [s.task for s in page.items] == list(reversed(tasks))[:4]
    assert all(dict(s.counts) == {RunState.PENDING: 1} for s in page.items)


async def test_list_tasks_ignores_created_at_for_order(store: Any) -> None:
    old = await add(store, "node//a", created_at=NOW + timedelta(days=1))
    new = await add(store, "node//a", created_at=NOW - timedelta(days=1))
    assert await walk(store) == [new.id, old.id]  # submission order, not created_at


async def test_list_tasks_unknown_cursor_ends_the_listing(store: Any) -> None:
    await add(store, "node//a")
    page = await store.list_tasks(TaskQuery(cursor="not-a-cursor"))
    assert page.items == ()
    assert page.next_cursor is None


async def test_list_tasks_filters(store: Any) -> None:
    a = await add(store, "node//a", "node//b", name="deploy")
    b = await add(store, "node//b", name="deploy")
    c = await add(store, "node//c", name="reboot")
    d = await add(store, "node//a", "node//c", name="deploy")
    e = await add(store, "node//e", name="deploy")
    await dispatch(store, a, "node//a")  # a: running
    await dispatch(store, c, "node//c")
    await store.finish(RunKey(c.id, "node//c"), RunState.SUCCEEDED, NOW)  # c: succeeded
    await dispatch(store, d, "node//c")  # (node//a is busy with a's run)
    await store.finish(RunKey(d.id, "node//c"), RunState.FAILED, NOW)
    await store.cancel(d.id, now=NOW)  # d: failed (failed + cancelled)
    await store.cancel(e.id, now=NOW)  # e: cancelled; b: pending
    assert await walk(store, name="deploy") == [e.id, d.id, b.id, a.id]
    assert await walk(store, name="nope") == []
    assert await walk(store, node_id="node//a") == [d.id, a.id]
    assert await walk(store, node_id="node//b", limit=1) == [b.id, a.id]
    assert await walk(store, node_id="node//zz") == []
    assert await walk(store, state=RunState.PENDING) == [b.id, a.id]
    assert await walk(store, state=RunState.DISPATCHED) == [a.id]
    assert await walk(store, state=RunState.CANCELLED) == [e.id, d.id]
    assert await walk(store, state=RunState.LOST) == []
    assert await walk(store, status=TaskStatus.PENDING) == [b.id]
    assert await walk(store, status=TaskStatus.RUNNING) == [a.id]
    assert await walk(store, status=TaskStatus.SUCCEEDED) == [c.id]
    assert await walk(store, status=TaskStatus.FAILED) == [d.id]
    assert await walk(store, status=TaskStatus.CANCELLED) == [e.id]
    # filters combine; state and status are about the task, not the node's run
    assert await walk(store, name="deploy", node_id="node//c", state=RunState.FAILED) == [d.id]
    assert await walk(store, name="reboot", state=RunState.FAILED) == []
    assert await walk(store, node_id="node//c", state=RunState.SUCCEEDED) == [c.id]
    assert await walk(store, name="deploy", status=TaskStatus.PENDING, node_id="node//b") == [b.id]
    page = await store.list_tasks(TaskQuery(status=TaskStatus.FAILED))
    assert dict(page.items[0].counts) == {RunState.FAILED: 1, RunState.CANCELLED: 1}


async def test_list_tasks_filter_pages_skip_non_matching_tasks(store: Any) -> None:
    wanted = []
    for i in range(20):
        task = await add(store, f"node//{i % 3}", name="x" if i % 4 == 0 else "y")
        if i % 4 == 0:
            wanted.append(task.id)
    assert await walk(store, name="x", limit=2) == list(reversed(wanted))


# --------------------------------------------------------------------------- tokens


async def test_tokens(store: Any) -> None:
    assert await store.list_tokens() == []
    admin, secret = new_token("admin", Scope.ADMIN, builtin=True, now=NOW)
    reader, _ = new_token("ci-reader ✓", Scope.READ, now=at(-60))
    await store.add_token(admin)
    await store.add_token(reader)
    assert await store.token_by_hash(hash_secret(secret)) == admin
    assert await store.token_by_hash(hash_secret("wrong")) is None
    assert await store.list_tokens() == [reader, admin]  # oldest first
    dup, _ = new_token("admin", Scope.READ)
    with pytest.raises(Conflict):
        await store.add_token(dup)
    assert await store.token_by_hash(admin.secret_hash) == admin
    await store.touch_token("admin", at(5))
    assert await store.token_by_hash(admin.secret_hash) == attrs.evolve(admin, last_used=at(5))
    await store.touch_token("nobody", at(5))  # silently nothing
    await store.delete_token("ci-reader ✓")
    with pytest.raises(NotFound):
        await store.delete_token("ci-reader ✓")
    assert [t.name for t in await store.list_tokens()] == ["admin"]
    again, _ = new_token("ci-reader ✓", Scope.WRITE, now=at(10))
    await store.add_token(again)  # the name is free again
    assert await store.list_tokens() == [attrs.evolve(admin, last_used=at(5)), again]


async def test_token_secret_hash_is_unique(store: Any) -> None:
    first, secret = new_token("one", secret="s3cret-s3cret")
    second, _ = new_token("two", secret="s3cret-s3cret")
    await store.add_token(first)
    with pytest.raises(Conflict):
        await store.add_token(second)
    assert await store.token_by_hash(hash_secret(secret)) == first


# --------------------------------------------------------------------------- properties

# Datetimes whose UTC value is inside years 1..9999, with offsets to the minute and
# beyond (Python allows sub-minute offsets).
offsets = st.one_of(
    st.just(UTC),
    st.integers(min_value=-86_399, max_value=86_399).map(lambda s: timezone(timedelta(seconds=s))),
    st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
        lambda m: timezone(timedelta(minutes=m))
    ),
)
aware = st.builds(
    lambda naive, tz: naive.replace(tzinfo=tz),
    st.datetimes(min_value=datetime(1, 1, 3), max_value=datetime(9999, 12, 29)),
    offsets,
)
text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
line = text.filter(lambda s: bool(s.strip()))
# node ids as a Task takes them: up to 256 characters, no control characters, no
# whitespace at either end
node_id = st.text(st.characters(exclude_categories=["Cs", "Cc"])).map(
    lambda s: s[:256].strip()).filter(bool)


@st.composite
def tasks(draw: st.DrawFn) -> Task:
    not_before = draw(st.none() | aware)
    expires_at = draw(st.none() | aware)
    if not_before is not None and expires_at is not None and expires_at <= not_before:
        expires_at = None
    return Task(
        id=uuid.uuid4().hex,
        name=draw(line.map(lambda s: s[:200])),
        command=draw(line),
        targets=draw(st.lists(node_id, min_size=1, max_size=8, unique=True)),
        created_at=draw(aware),
        shell=draw(st.sampled_from(Shell)),
        run_as_user=draw(st.booleans()),
        timeout=draw(
            st.floats(min_value=1e-6, max_value=7 * 24 * 3600.0) | st.integers(1, 604_800)
        ),
        not_before=not_before,
        expires_at=expires_at,
        max_attempts=draw(st.integers(1, 100)),
        delivery=draw(st.sampled_from(Delivery)),
    )


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_round_trip(store: Any, runner: asyncio.Runner, data: st.DataObject) -> None:
    """Tasks, runs, outcomes and tokens come back equal to what went in. (One store for
    all the examples: the fixture is set up once per test, hence the health check.)"""
    task = data.draw(tasks())
    now = data.draw(aware)
    outcome = Outcome(
        exit_code=data.draw(st.integers(-(2**31), 2**32)),
        output=data.draw(text),
        output_truncated=data.draw(st.booleans()),
        started_at=data.draw(st.none() | aware),
        finished_at=data.draw(st.none() | aware),
    )
    token = Token(
        name=data.draw(line.map(lambda s: s[:200])),
        secret_hash=uuid.uuid4().hex,
        scope=data.draw(st.sampled_from(Scope)),
        created_at=data.draw(aware),
        builtin=data.draw(st.booleans()),
    )

    async def body() -> None:
        await store.add_task(task, now)
        runs = task.first_runs(now)
        assert (await store.get_task(task.id)).task == task
        assert list(await store.get_runs(task.id)) == runs
        key = runs[0].key
        claimed = await claim(store, key, now)
        assert claimed is not None
        done = await store.finish(key, outcome.state, now, outcome=outcome, error="é")
        assert (await store.get_runs(task.id))[0] == done
        assert done.output == outcome.output
        assert done.exit_code == outcome.exit_code
        if token.name not in {t.name for t in await store.list_tokens()}:
            await store.add_token(token)
            assert await store.token_by_hash(token.secret_hash) == token

    runner.run(body())


@pytest.mark.parametrize("seed", range(3))
def test_sqlite_agrees_with_the_reference(
    runner: asyncio.Runner, tmp_path: Path, seed: int
) -> None:
    """Random sequences of operations give the same answers on both stores."""
    rng = random.Random(seed)
    reference = InMemoryStore()
    sqlite = SQLiteStore(tmp_path / f"diff{seed}.db")
    nodes = [f"node//{i}" for i in range(8)]
    task_ids: list[str] = []

    async def both(method: str, *args: Any, **kwargs: Any) -> Any:
        outcomes = []
        for s in (reference, sqlite):
            try:
                outcomes.append(("ok", await getattr(s, method)(*args, **kwargs)))
            except StoreError as exc:
                outcomes.append(("error", type(exc)))
        ref, got = outcomes
        if ref[0] == "ok" and isinstance(ref[1], Counter | dict):
            ref = ("ok", dict(ref[1]))
            got = ("ok", dict(got[1])) if got[0] == "ok" else got
        if ref[0] == "ok" and method in ("next_pending",):
            ref = ("ok", sorted(ref[1], key=lambda r: r.node_id))
            got = ("ok", sorted(got[1], key=lambda r: r.node_id)) if got[0] == "ok" else got
        if ref[0] == "ok" and method == "list_tasks":  # cursors are opaque
            ref = ("ok", (ref[1].items, ref[1].next_cursor is None))
            got = ("ok", (got[1].items, got[1].next_cursor is None)) if got[0] == "ok" else got
        if ref[0] == "ok" and isinstance(ref[1], list | tuple):
            ref = ("ok", list(ref[1]))
            got = ("ok", list(got[1])) if got[0] == "ok" else got
        assert got == ref, (method, args, kwargs)
        return ref[1]

    async def body() -> None:
        await sqlite.open()
        clock = NOW
        try:
            for _ in range(400):
                clock += timedelta(seconds=rng.choice([0, 0, 1, 5]))
                op = rng.random()
                if op < 0.15 or not task_ids:
                    targets = rng.sample(nodes, rng.randint(1, 4))
                    nb = rng.choice([None, None, clock + timedelta(seconds=rng.randint(1, 20))])
                    ex = rng.choice([None, clock + timedelta(seconds=rng.randint(30, 60))])
                    task = make_task(*targets, not_before=nb, expires_at=ex, name=rng.choice("xy"))
                    task_ids.append(task.id)
                    await both("add_task", task, clock)
                    continue
                tid = rng.choice(task_ids)
                node = rng.choice(nodes)
                key = RunKey(tid, node)
                if op < 0.35:
                    await both("next_pending", rng.sample(nodes, rng.randint(1, 8)), clock)
                elif op < 0.55:
                    await both("claim_many", [key], clock)
                elif op < 0.7:
                    state = rng.choice(sorted(TERMINAL_STATES | {RunState.PENDING}))
                    out = Outcome(exit_code=rng.randint(0, 2), output="out ✓")
                    await both("finish", key, state, clock, outcome=rng.choice([None, out]))
                elif op < 0.78:
                    await both(
                        "release",
                        key,
                        clock,
                        available_at=clock + timedelta(seconds=3),
                        error="again",
                        delivered=rng.random() < 0.5,
                    )
                elif op < 0.83:
                    await both("cancel", tid, rng.choice([None, [node]]), now=clock)
                elif op < 0.86:
                    await both("expire_due", clock)
                elif op < 0.88:
                    await both("delete_task", tid)
                elif op < 0.9:
                    await both("next_wakeup", clock)
                elif op < 0.92:
                    await both("dispatched")
                elif op < 0.94:
                    await both("counts")
                elif op < 0.97:
                    await both("get_runs", tid)
                    await both("get_task", tid)
                else:
                    query = TaskQuery(
                        limit=rng.randint(1, 4),
                        state=rng.choice([None, *RunState]),
                        status=rng.choice([None, *TaskStatus]),
                        node_id=rng.choice([None, node]),
                        name=rng.choice([None, "x", "y"]),
                    )
                    await both("list_tasks", query)
        finally:
            await sqlite.close()
        check_counts(sqlite.path)

    runner.run(body())


def check_counts(path: str) -> None:
    """The trigger-kept counts agree with the runs."""
    with sqlite3.connect(path) as conn:
        cols = ", ".join(s.value for s in RunState)
        kept = {
            row[0]: dict(zip(RunState, row[2:], strict=True))
            for row in conn.execute(f"SELECT task_seq, total, {cols} FROM task_counts")
        }
        totals = {row[0]: row[1] for row in conn.execute("SELECT task_seq, total FROM task_counts")}
        real: dict[int, dict[RunState, int]] = {seq: dict.fromkeys(RunState, 0) for seq in kept}
        for seq, state, n in conn.execute(
            "SELECT task_seq, state, count(*) FROM runs GROUP BY task_seq, state"
        ):
            real[seq][RunState(state)] = n
        assert kept == real
        assert all(totals[seq] == sum(real[seq].values()) for seq in kept)
        overall = dict(conn.execute("SELECT state, n FROM run_counts"))
        by_state = dict(conn.execute("SELECT state, count(*) FROM runs GROUP BY state"))
        assert {s: n for s, n in overall.items() if n} == by_state
    conn.close()


def status_cases() -> Iterator[tuple[int, Counter[RunState], bool, bool]]:
    """Every small task_counts row: (total, runs per state, paused, aborted), with up
    to three runs; each SQL store checks its STATUS_SQL against task_status on them."""
    for total in range(4):
        for combo in itertools.combinations_with_replacement(list(RunState), total):
            counts = Counter(combo)
            for paused, aborted in itertools.product((False, True), (False, True)):
                yield total, counts, paused, aborted


def test_status_sql_matches_task_status() -> None:
    """The SQL reading of TaskStatus agrees with task_status on every small case,
    paused and aborted tasks included."""
    conn = sqlite3.connect(":memory:")
    cols = [s.value for s in RunState]
    conn.execute(f"CREATE TABLE c (total, {', '.join(cols)}, paused, aborted)")
    for total, counts, paused, aborted in status_cases():
        conn.execute("DELETE FROM c")
        conn.execute(
            f"INSERT INTO c VALUES ({', '.join('?' * (len(cols) + 3))})",
            (total, *(counts.get(s, 0) for s in RunState), int(paused), int(aborted)),
        )
        matched = [
            status
            for status, sql in STATUS_SQL.items()
            if conn.execute(f"SELECT count(*) FROM c WHERE {sql}").fetchone()[0]
        ]
        expected = task_status(counts, paused=paused, aborted=aborted)
        assert matched == [expected], (counts, paused, aborted)
    conn.close()


# --------------------------------------------------------------------------- store life


async def test_open_is_idempotent_and_close_keeps_the_data(store: Any) -> None:
    await store.open()
    task = await add(store, "node//a")
    await store.close()
    await store.close()
    await store.open()
    assert (await store.get_task(task.id)).task == task


# --------------------------------------------------------------------------- SQLite only


async def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "persist.db"
    first = SQLiteStore(path)
    await first.open()
    t1 = await add(first, "node//a", "node//b", expires_at=at(100), name="one ✓")
    t2 = await add(first, "node//b", not_before=at(10))
    await dispatch(first, t1, "node//a")
    await dispatch(first, t1, "node//b")
    await store_finish(first, t1, "node//b")
    token, _ = new_token("admin", Scope.ADMIN, builtin=True, now=NOW)
    await first.add_token(token)
    state = await snapshot(first, [t1, t2])
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    try:
        assert await snapshot(second, [t1, t2]) == state
        assert (await second.get_task(t1.id)).task == t1
        t3 = await add(second, "node//c")
        assert [s.task.id for s in (await second.list_tasks(TaskQuery())).items] == [
            t3.id,
            t2.id,
            t1.id,
        ]
    finally:
        await second.close()


async def store_finish(store: Any, task: Task, node: str) -> None:
    await store.finish(
        RunKey(task.id, node), RunState.SUCCEEDED, at(2), outcome=Outcome(exit_code=0, output="ok")
    )


async def snapshot(store: Any, tasks: list[Task]) -> Any:
    return (
        [await store.get_task(t.id) for t in tasks],
        [list(await store.get_runs(t.id)) for t in tasks],
        await store.list_tasks(TaskQuery()),
        dict(await store.counts()),
        list(await store.list_tokens()),
        list(await store.dispatched()),
        list(await store.next_pending(["node//a", "node//b"], at(20))),
        await store.next_wakeup(NOW),
    )


async def test_sqlite_memory_database(runner: asyncio.Runner) -> None:
    store = SQLiteStore(":memory:")
    await store.open()
    try:
        task = await add(store, "node//a")
        assert (await store.get_task(task.id)).task == task
    finally:
        await store.close()


def user_version(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        return (
            conn.execute("PRAGMA user_version").fetchone()[0],
            conn.execute("PRAGMA application_id").fetchone()[0],
        )
    finally:
        conn.close()


async def test_sqlite_creates_the_schema_in_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.write_bytes(b"")  # a version-0 database: no schema at all
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    assert user_version(path) == (_schema.SCHEMA_VERSION, _schema.APPLICATION_ID)
    await store.open()  # already current: nothing to do
    await store.close()
    assert user_version(path)[0] == _schema.SCHEMA_VERSION


async def test_sqlite_migrates_an_older_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    await store.open()
    task = await add(store, "node//a")
    await store.close()

    def v2(db: Any) -> None:
        db.execute("ALTER TABLE tasks ADD COLUMN note TEXT")

    monkeypatch.setattr(_schema, "MIGRATIONS", (*_schema.MIGRATIONS, v2))
    monkeypatch.setattr(_schema, "SCHEMA_VERSION", len(_schema.MIGRATIONS))
    await store.open()
    try:
        assert (await store.get_task(task.id)).task == task
    finally:
        await store.close()
    assert user_version(path)[0] == len(_schema.MIGRATIONS)
    conn = sqlite3.connect(path)
    assert "note" in [row[1] for row in conn.execute("PRAGMA table_info(tasks)")]
    conn.close()


async def test_sqlite_v1_database_takes_fleet_tasks_after_migrating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database written before fleet targeting (schema v1) keeps its tasks and runs
    through the v2 migration, and takes selector, rollout and history afterwards."""
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for sql in _schema._V1:  # a v1 database, with a task as v1 wrote them
        conn.execute(sql)
    conn.executescript("""
        PRAGMA user_version = 1;
        INSERT INTO tasks(id, name, command, targets, created_at, shell, run_as_user,
                          timeout, max_attempts, delivery)
        VALUES ('old', 'n', 'c', '["node//a","node//b"]', 0, 'auto', 0, 300.0, 3,
                'at_most_once');
        INSERT INTO nodes(node_id) VALUES ('node//a'), ('node//b');
        INSERT INTO runs(task_seq, node, position, state, queued_at, available_at)
        VALUES (1, 1, 0, 'pending', 0, 0), (1, 2, 1, 'pending', 0, 0);
        INSERT INTO task_counts(task_seq, total, pending) VALUES (1, 2, 2);
        UPDATE run_counts SET n = 2 WHERE state = 'pending';
    """)
    conn.close()
    old = Task(id="old", name="n", command="c", targets=["node//a", "node//b"],
               created_at=datetime(1970, 1, 1, tzinfo=UTC))
    store = SQLiteStore(path)
    await store.open()
    try:
        assert user_version(path)[0] == _schema.SCHEMA_VERSION
        assert (await store.get_task(old.id)).task == old
        assert [r.node_id for r in await store.get_runs(old.id)] == ["node//a", "node//b"]
        fleet = Task(name="f", command="c", targets=[], select=Selector(tags=["arm"]),
                     continuous=True, rollout=Rollout(max_concurrent=2, per_minute=5),
                     success_exit_codes=(0, 3010))
        await store.add_task(fleet, NOW, nodes=["node//b"])
        assert (await store.get_task(fleet.id)).task == fleet
        [run] = await store.get_runs(fleet.id)
        assert run.node_id == "node//b"
    finally:
        await store.close()


async def test_sqlite_refuses_a_newer_database(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {_schema.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    with pytest.raises(StoreError, match="not open"):
        await store.get_task("x")
    assert user_version(path)[0] == _schema.SCHEMA_VERSION + 1  # left alone


async def test_sqlite_refuses_a_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE tasks (x)")
    conn.close()
    with pytest.raises(StoreError, match="not GhostRunner"):
        await SQLiteStore(path).open()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite database at all" * 200)
    with pytest.raises(StoreError):
        await SQLiteStore(garbage).open()


async def test_sqlite_refuses_datetimes_outside_utc_years_1_to_9999(
    sqlite_store: SQLiteStore,
) -> None:
    """datetime(1, 1, 1, +05:00) is aware, but year 0 in UTC: Task refuses it, and the
    store refuses a naive datetime from a caller that bypasses validation."""
    early = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))
    with pytest.raises(ValidationError, match="created_at"):
        make_task("node//a", created_at=early)
    with pytest.raises(StoreError):
        await sqlite_store.next_pending(["node//a"], datetime(2025, 1, 1))  # naive
    assert dict(await sqlite_store.counts()) == {}


def read_files(folder: Path, prefix: str) -> bytes:
    return b"".join(p.read_bytes() for p in folder.iterdir() if p.name.startswith(prefix))


async def test_sqlite_stores_undecodable_output(sqlite_store: SQLiteStore) -> None:
    """Output decoded with errors="surrogateescape" has lone surrogates, which UTF-8
    cannot encode: the outcome is kept, with U+FFFD in their place."""
    task = await add(sqlite_store, "node//a")
    await dispatch(sqlite_store, task, "node//a")
    raw = b"ok \xff\xfe end".decode("utf-8", "surrogateescape")
    run = await sqlite_store.finish(
        RunKey(task.id, "node//a"),
        RunState.SUCCEEDED,
        NOW,
        outcome=Outcome(exit_code=0, output=raw),
        error=raw,
    )
    assert run.output == "ok \ufffd\ufffd end"
    assert run.error == "ok \ufffd\ufffd end"
    assert await run_of(sqlite_store, task, "node//a") == run


async def test_sqlite_never_stores_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret.db"
    store = SQLiteStore(path)
    await store.open()
    token, secret = new_token("admin", Scope.ADMIN)
    await store.add_token(token)
    await store.touch_token("admin", NOW)
    data = read_files(tmp_path, "secret.db")  # db, -wal and -shm while open
    await store.close()
    data += read_files(tmp_path, "secret.db")
    assert secret.encode() not in data
    assert token.secret_hash.encode() in data


async def test_sqlite_closed_store_raises_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "closed.db")
    with pytest.raises(StoreError):
        await store.counts()
    await store.open()
    await store.close()
    with pytest.raises(StoreError):
        await add(store, "node//a")


async def test_sqlite_close_drains_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "drain.db"
    store = SQLiteStore(path)
    await store.open()
    pending = [asyncio.ensure_future(add(store, f"node//{i}")) for i in range(50)]
    await asyncio.sleep(0)  # every add is queued now
    await store.close()
    added = [await p for p in pending]
    await store.open()
    try:
        assert len(await walk(store, limit=1000)) == 50
        assert {s.task.id for s in (await store.list_tasks(TaskQuery(limit=100))).items} == {
            t.id for t in added
        }
    finally:
        await store.close()


async def test_sqlite_store_dropped_without_close_stops_its_thread(tmp_path: Path) -> None:
    path = tmp_path / "dropped.db"
    store = SQLiteStore(path)
    await store.open()
    task = await add(store, "node//a")
    assert store._worker is not None
    thread = store._worker.thread
    del store
    gc.collect()
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
    again = SQLiteStore(path)
    await again.open()
    try:
        assert (await again.get_task(task.id)).task == task
    finally:
        await again.close()


async def hold_worker(store: SQLiteStore) -> tuple[threading.Event, asyncio.Future[Any]]:
    """Block the worker thread until the returned event is set (jobs pile up)."""
    gate = threading.Event()
    started = threading.Event()

    def wait(db: Any) -> None:
        started.set()
        gate.wait(10)

    held = asyncio.ensure_future(store._call(wait, "exclusive"))
    await asyncio.sleep(0)
    assert await asyncio.to_thread(started.wait, 10)
    return gate, held


async def test_sqlite_batch_commits_once_and_isolates_failures(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    task = await add(store, *(f"node//{i}" for i in range(20)))
    worker = store._worker
    assert worker is not None
    gate, held = await hold_worker(store)
    commits = worker.commits
    clash = make_task("node//x", id=task.id)
    jobs = [
        *(claim(store, RunKey(task.id, f"node//{i}"), NOW) for i in range(20)),
        store.add_task(clash, NOW),  # Conflict
        store.finish(RunKey(task.id, "node//zz"), RunState.FAILED, NOW),  # NotFound
        claim(store, RunKey(task.id, "node//0"), NOW),  # already claimed in this batch
        store.add_task(make_task("node//y"), NOW),
    ]
    results = asyncio.gather(*jobs, return_exceptions=True)
    await asyncio.sleep(0.01)
    gate.set()
    await held
    out = await results
    assert worker.commits == commits + 1  # one transaction for the whole burst
    assert all(isinstance(r, Run) and r.attempts == 1 for r in out[:20])
    assert isinstance(out[20], Conflict)
    assert isinstance(out[21], NotFound)
    assert out[22] is None
    assert out[23] is None  # added: the pending run counted below
    assert dict(await store.counts()) == {RunState.DISPATCHED: 20, RunState.PENDING: 1}
    assert all(r.state is RunState.DISPATCHED for r in await store.get_runs(task.id))


async def test_sqlite_a_batch_of_adds_is_one_statement_that_commits_itself(
    sqlite_store: SQLiteStore,
) -> None:
    """Creates that meet in a batch reach SQLite as one statement in autocommit mode (no
    BEGIN/COMMIT around it: each call into SQLite costs the worker a fight for the
    GIL), and that statement's own transaction is durable: a new connection sees it."""
    store = sqlite_store
    worker = store._worker
    assert worker is not None
    statements: list[str] = []

    def trace(db: Any) -> None:
        db.conn.set_trace_callback(statements.append)

    await store._call(trace, "exclusive")
    gate, held = await hold_worker(store)
    commits = worker.commits
    tasks = [make_task(f"node//{i}", "node//shared") for i in range(10)]
    results = asyncio.gather(*(store.add_task(t, NOW) for t in tasks))
    await asyncio.sleep(0.01)
    statements.clear()
    gate.set()
    await held
    assert await results == [None] * 10
    # (the trace repeats a statement for each step of its trigger)
    assert len(set(statements)) == 1
    assert statements[0].startswith("INSERT INTO add_tasks")
    assert worker.commits == commits + 1
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 20
        assert conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 10
    await store.close()
    check_counts(store.path)


async def test_sqlite_concurrent_adds_are_written_in_one_bulk_call_exactly_as_one_by_one(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks added while the worker is busy are written by one call of the bulk insert;
    what is stored must be exactly what adding them one by one stores (the reference
    store gets them one by one)."""
    store = sqlite_store
    sizes: list[int] = []
    real = _store._add_tasks

    def spy(db: Any, rows: list[Any]) -> None:
        sizes.append(len(rows))
        real(db, rows)

    monkeypatch.setattr(_store, "_add_tasks", spy)
    reference = InMemoryStore()
    await reference.open()
    rng = random.Random(7)
    tasks = [
        make_task(
            *rng.sample([f"node//{n}" for n in range(12)], rng.randint(1, 5)),
            name=f"job {i} \u00e9\u2603",
            command=f"echo '{i}' \"$HOME\" \u00fc\n# {i}",
            shell=rng.choice(list(Shell)),
            delivery=rng.choice(list(Delivery)),
            run_as_user=rng.random() < 0.5,
            timeout=rng.choice([1, 2.5, 300, 86400]),
            max_attempts=rng.randint(1, 9),
            not_before=rng.choice([None, at(30)]),
            expires_at=rng.choice([None, at(3600)]),
        )
        for i in range(40)
    ]
    gate, held = await hold_worker(store)
    results = asyncio.gather(*(store.add_task(t, at(1)) for t in tasks))
    await asyncio.sleep(0.01)
    gate.set()
    await held
    out = await results
    assert sizes == [len(tasks)]
    assert out == [None] * len(tasks)
    for task in tasks:
        await reference.add_task(task, at(1))
        assert list(await store.get_runs(task.id)) == task.first_runs(at(1))
        assert await store.get_task(task.id) == await reference.get_task(task.id)
        assert list(await store.get_runs(task.id)) == list(await reference.get_runs(task.id))
    assert dict(await store.counts()) == dict(await reference.counts())
    await store.close()
    check_counts(store.path)


async def test_sqlite_failed_op_in_a_batch_leaves_nothing_half_written(
    sqlite_store: SQLiteStore,
) -> None:
    """A trigger that aborts the insert of one run: that add_task leaves no trace, the
    other operations of the batch commit."""
    store = sqlite_store
    path = store.path
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON runs WHEN NEW.node = "
        "(SELECT nid FROM nodes WHERE node_id = 'node//boom') "
        "BEGIN SELECT RAISE(ABORT, 'boom'); END"
    )
    conn.commit()
    conn.close()
    await store.open()
    gate, held = await hold_worker(store)
    good1 = make_task("node//a")
    bad = make_task("node//b", "node//boom", "node//c")
    good2 = make_task("node//c")
    results = asyncio.gather(
        store.add_task(good1, NOW),
        store.add_task(bad, NOW),
        store.add_task(good2, NOW),
        return_exceptions=True,
    )
    await asyncio.sleep(0.01)
    gate.set()
    await held
    out = await results
    assert isinstance(out[1], StoreError)
    assert not isinstance(out[1], Conflict | NotFound)
    assert out[0] is None
    assert out[2] is None
    with pytest.raises(NotFound):
        await store.get_task(bad.id)
    assert dict(await store.counts()) == {RunState.PENDING: 2}
    assert [s.task.id for s in (await store.list_tasks(TaskQuery())).items] == [good2.id, good1.id]
    alone = await asyncio.gather(store.add_task(bad, NOW), return_exceptions=True)
    assert isinstance(alone[0], StoreError)
    assert dict(await store.counts()) == {RunState.PENDING: 2}
    await store.close()
    check_counts(path)


async def test_sqlite_whole_transaction_rollback_fails_the_earlier_ops(
    sqlite_store: SQLiteStore,
) -> None:
    """RAISE(ROLLBACK) undoes the whole batch transaction: the ops before it in the batch
    must be reported failed, the ones after it still commit."""
    store = sqlite_store
    path = store.path
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TRIGGER doom BEFORE INSERT ON tasks WHEN NEW.name = 'doom' "
        "BEGIN SELECT RAISE(ROLLBACK, 'doom'); END"
    )
    conn.commit()
    conn.close()
    await store.open()
    gate, held = await hold_worker(store)
    before, doom, after = make_task(), make_task(name="doom"), make_task()
    results = asyncio.gather(
        *(store.add_task(t, NOW) for t in (before, doom, after)), return_exceptions=True
    )
    await asyncio.sleep(0.01)
    gate.set()
    await held
    out = await results
    assert isinstance(out[0], StoreError)
    assert isinstance(out[1], StoreError)
    assert out[2] is None
    assert [s.task.id for s in (await store.list_tasks(TaskQuery())).items] == [after.id]
    await store.close()
    check_counts(path)


async def test_sqlite_does_not_block_the_event_loop(sqlite_store: SQLiteStore) -> None:
    gate, held = await hold_worker(sqlite_store)
    query = asyncio.ensure_future(sqlite_store.counts())
    ticks = 0
    for _ in range(5):
        await asyncio.sleep(0.001)
        ticks += 1
    assert ticks == 5
    assert not query.done()
    gate.set()
    await held
    assert dict(await query) == {}


async def test_sqlite_bulk_add_tasks(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    first = await add(store, "node//a")
    tasks = [
        make_task(f"node//{i % 7}", f"node//x{i}", not_before=at(i % 3), expires_at=at(100))
        for i in range(300)
    ]
    added = await store.bulk_add_tasks(tasks, NOW, chunk_runs=100)
    assert added == 600
    assert (await store.get_task(tasks[5].id)).task == tasks[5]
    assert list(await store.get_runs(tasks[5].id)) == tasks[5].first_runs(NOW)
    assert dict(await store.counts()) == {RunState.PENDING: 601}
    ids = await walk(store, limit=1000)
    assert ids == [t.id for t in reversed(tasks)] + [first.id]
    [run] = await store.next_pending(["node//a"], NOW)
    assert run.task_id == first.id
    with pytest.raises(Conflict):
        await store.bulk_add_tasks([make_task("node//q"), tasks[0]], NOW)
    assert dict(await store.counts()) == {RunState.PENDING: 601}
    await store.close()
    check_counts(store.path)


async def test_sqlite_bulk_add_into_an_empty_store_is_all_or_nothing(
    sqlite_store: SQLiteStore,
) -> None:
    store = sqlite_store
    schema = await store._call(
        lambda db: db.execute("SELECT name, sql FROM sqlite_schema ORDER BY name").fetchall(),
        "read",
    )
    tasks = [make_task(f"node//{i}") for i in range(50)]
    with pytest.raises(Conflict):
        await store.bulk_add_tasks([*tasks, tasks[3]], NOW, chunk_runs=10)
    assert dict(await store.counts()) == {}
    assert (await store.list_tasks(TaskQuery())).items == ()
    after = await store._call(
        lambda db: db.execute("SELECT name, sql FROM sqlite_schema ORDER BY name").fetchall(),
        "read",
    )
    assert after == schema  # the indexes dropped for the load are back
    assert await store.bulk_add_tasks(tasks, NOW, chunk_runs=10) == 50
    assert (
        await store._call(
            lambda db: db.execute("SELECT name, sql FROM sqlite_schema ORDER BY name").fetchall(),
            "read",
        )
        == schema
    )
    assert len(await store.next_pending([f"node//{i}" for i in range(60)], NOW)) == 50
    await store.close()
    check_counts(store.path)


# --------------------------------------------------------------------------- query plans


def plan(conn: sqlite3.Connection, sql: str, params: Any) -> list[str]:
    return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


async def test_sqlite_query_plans_use_indexes(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    nodes = [f"node//{i}" for i in range(50)]
    tasks = [make_task(*random.Random(i).sample(nodes, 5)) for i in range(200)]
    await store.bulk_add_tasks(tasks, NOW)
    await store.close()
    await store.open()  # close ran PRAGMA optimize: the plans must hold with statistics too
    await store.close()
    conn = sqlite3.connect(store.path)
    try:
        params = {
            "nodes": '["node//1","node//2"]', "now": 0, "task_id": "x", "node_id": "y",
            "limit": 10, "skip": '["t1"]', "seq": 1, "since": 0,
        }
        checks = {
            "next_pending": _queries.NEXT_PENDING_SQL,
            "claim": _queries.CLAIM_SQL,
            "open_continuous": _queries.OPEN_CONTINUOUS_SQL,
            "recent_starts": _queries.RECENT_STARTS_SQL,
            "expire_due": _queries.EXPIRE_SQL,
            "next_wakeup": _queries.NEXT_WAKEUP_SQL,
            "dispatched": _queries.DISPATCHED_SQL,
        }
        for name, sql in checks.items():
            lines = plan(conn, sql, params)
            scans = [
                ln
                for ln in lines
                if ln.startswith("SCAN")
                and "VIRTUAL TABLE" not in ln  # json_each: the node ids asked for
                and "INDEX runs_dispatched" not in ln  # partial: only the dispatched runs
                # partial: only paused, open continuous or rate-limited tasks
                and "INDEX task_counts_paused" not in ln
                and "INDEX tasks_open_continuous" not in ln
                and "INDEX tasks_rate_limited" not in ln
                # the large tasks being written: empty but while one is (see _large)
                and ln != "SCAN staged_tasks"
            ]
            assert not scans, (name, lines)
            assert any("runs" in ln or " r " in ln or " p " in ln or "tasks" in ln
                       for ln in lines), (name, lines)
        pending = plan(conn, _queries.NEXT_PENDING_SQL, params)
        assert any("runs_pending_node" in ln for ln in pending), pending
        assert any("runs_pending_expiry" in ln for ln in plan(conn, _queries.EXPIRE_SQL, params))
        wake = plan(conn, _queries.NEXT_WAKEUP_SQL, params)
        assert any("runs_pending_available" in ln for ln in wake), wake
        assert any("runs_pending_expiry" in ln for ln in wake), wake
    finally:
        conn.close()


async def test_sqlite_listing_uses_indexes(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    await store.bulk_add_tasks(
        [make_task(f"node//{i % 5}", name=f"n{i % 3}") for i in range(50)], NOW
    )
    await store.close()
    conn = sqlite3.connect(store.path)
    try:
        for query, index in [
            (TaskQuery(node_id="node//1"), "runs_node"),
            (TaskQuery(node_id="node//1", status=TaskStatus.PENDING, cursor="30"), "runs_node"),
            (TaskQuery(name="n1"), "tasks_name"),
        ]:
            lines = plan(conn, *_queries.list_sql(query))
            assert any(index in ln for ln in lines), (query, lines)
            assert not [ln for ln in lines if ln.startswith("SCAN")], (query, lines)
        for query in [TaskQuery(), TaskQuery(state=RunState.LOST, cursor="9")]:
            lines = plan(conn, *_queries.list_sql(query))
            assert "TEMP B-TREE" not in " ".join(lines), (query, lines)  # no sort: seq order
    finally:
        conn.close()


async def test_next_pending_stops_at_limit_in_node_order(store: Any) -> None:
    nodes = [f"node//{i}" for i in range(6)]
    await add(store, *nodes)
    order = list(reversed(nodes))
    got = await store.next_pending(order, NOW, limit=3)
    assert [r.node_id for r in got] == order[:3]
    assert await store.next_pending(order, NOW, limit=0) == []
    assert len(await store.next_pending(order + order, NOW)) == 6


async def test_claim_many_claims_pending_runs_and_brings_their_tasks(store: Any) -> None:
    one = await add(store, "node//a", "node//b")
    two = await add(store, "node//c")
    await store.cancel(one.id, ["node//b"], now=NOW)
    keys = [RunKey(one.id, "node//a"), RunKey(one.id, "node//b"), RunKey(two.id, "node//c")]
    got = await store.claim_many(keys, NOW)
    assert [(run.key, task) for run, task in got] == [(keys[0], one), (keys[2], two)]
    assert all(run.state is RunState.DISPATCHED and run.attempts == 1 for run, _ in got)
    assert await store.claim_many(keys, NOW) == []  # nothing pending any more
    with pytest.raises(NotFound):
        await store.claim_many([RunKey("nope", "node//a")], NOW)


async def test_sqlite_one_store_per_database_file(tmp_path: Path) -> None:
    """A second store (in another process, or this one) on an open database is refused
    with a StoreError that names the holder; once the first closes, it opens."""
    path = tmp_path / "one.db"
    first = SQLiteStore(path)
    await first.open()
    second = SQLiteStore(path)
    with pytest.raises(StoreError, match=rf"in use by another GhostRunner \(pid {os.getpid()}"):
        await second.open()
    await first.close()
    await second.open()
    await second.close()


def test_sqlite_lock_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves no stale lock: a restart after a crash is never blocked."""
    path = tmp_path / "killed.db"

    async def try_open() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.close()

    # The holder keeps its store referenced: a store dropped without close() closes
    # itself (weakref.finalize -> its worker thread exits and releases the lock), so an
    # unreferenced one may let go of the lock before the check below.
    # ``with`` closes the stdout pipe (else it is reported unclosed at a later GC).
    with subprocess.Popen(
        [sys.executable, "-c",
         "import asyncio, sys\n"
         "from ghostrunner.sqlite import SQLiteStore\n"
         "async def main():\n"
         f"    store = SQLiteStore({str(path)!r})\n"
         "    await store.open()\n"
         "    print('open', flush=True)\n"
         "    await asyncio.sleep(60)\n"
         "    await store.close()\n"
         "asyncio.run(main())\n"],
        stdout=subprocess.PIPE, text=True,
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "open"
            with pytest.raises(StoreError, match=rf"pid {holder.pid}\b"):
                asyncio.run(try_open())
        finally:
            holder.kill()
            holder.wait()
    asyncio.run(try_open())

"""The ``AuditStore`` contract (``ghostrunner_http._audit``), on every store: entries
kept as given, newest first, the filters, cursors, pruning."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ghostrunner import Task
from ghostrunner.audit import AuditEntry, AuditQuery
from ghostrunner.errors import Conflict, ValidationError
from ghostrunner_http._audit import AuditStore

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def entry(i: int, **kw: Any) -> AuditEntry:
    fields: dict[str, Any] = {
        "at": T0 + timedelta(minutes=i), "method": "POST", "route": "/task/create",
        "status": 200, "token": "ops", "address": "10.0.0.1", "task_id": f"task-{i}",
        "counts": {"nodeids": i},
    }
    return AuditEntry(**{**fields, **kw})


async def test_every_store_keeps_an_audit_log(store: Any) -> None:
    assert isinstance(store, AuditStore)


async def test_entries_come_back_as_recorded_newest_first(store: Any) -> None:
    for i in range(3):
        await store.record_audit(entry(i))
    await store.record_audit(entry(3, token=None, address=None, task_id=None, counts={},
                                   status=401, method="DELETE", route="/tasks/{task_id}"))
    page = await store.query_audit(AuditQuery())
    assert page.next_cursor is None
    assert [e.task_id for e in page.items] == [None, "task-2", "task-1", "task-0"]
    ids = [e.id for e in page.items]
    assert ids == sorted(ids, reverse=True) and None not in ids
    got = page.items[1]
    assert (got.at, got.method, got.route, got.status, got.token, got.address,
            dict(got.counts)) == (T0 + timedelta(minutes=2), "POST", "/task/create", 200,
                                  "ops", "10.0.0.1", {"nodeids": 2})
    assert page.items[0].token is None and dict(page.items[0].counts) == {}


async def test_pages_follow_cursors_without_gaps_or_repeats(store: Any) -> None:
    for i in range(7):
        await store.record_audit(entry(i))
    seen: list[str | None] = []
    cursor = None
    while True:
        page = await store.query_audit(AuditQuery(limit=3, cursor=cursor))
        seen += [e.task_id for e in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [f"task-{i}" for i in reversed(range(7))]


async def test_filters(store: Any) -> None:
    await store.record_audit(entry(0, token="alice", status=200))
    await store.record_audit(entry(1, token="bob", status=403, route="/task/flush"))
    await store.record_audit(entry(2, token="alice", status=422, task_id="x"))
    await store.record_audit(entry(3, token=None, status=401))

    async def ids(**kw: Any) -> list[str | None]:
        return [e.task_id for e in (await store.query_audit(AuditQuery(**kw))).items]

    assert await ids(token="alice") == ["x", "task-0"]
    assert await ids(route="/task/flush") == ["task-1"]
    assert await ids(task_id="x") == ["x"]
    assert await ids(status_class=4) == ["task-3", "x", "task-1"]
    assert await ids(status_class=2) == ["task-0"]
    assert await ids(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)) == [
        "x", "task-1"]
    assert await ids(token="alice", status_class=4) == ["x"]
    assert await ids(token="nobody") == []


async def test_a_foreign_cursor_is_a_validation_error(store: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        await store.query_audit(AuditQuery(cursor="not-a-cursor"))
    assert caught.value.field == "cursor"


async def test_prune_removes_only_older_entries(store: Any) -> None:
    for i in range(5):
        await store.record_audit(entry(i))
    assert await store.prune_audit(T0 + timedelta(minutes=2)) == 2
    page = await store.query_audit(AuditQuery())
    assert [e.task_id for e in page.items] == ["task-4", "task-3", "task-2"]
    assert await store.prune_audit(T0) == 0


async def test_text_any_client_can_send_is_kept(store: Any) -> None:
    # path parameters come straight from URLs: NUL and lone surrogates included
    await store.record_audit(entry(0, task_id="a\x00b\ud800c", route="/x" * 2000))
    got = (await store.query_audit(AuditQuery())).items[0]
    assert got.task_id is not None and "\x00" not in got.task_id
    assert len(got.route) == 1024


async def test_entries_recorded_together_are_all_kept_in_their_order(store: Any) -> None:
    """Many at once (PostgreSQL writes them in one statement: a group commit), one
    with text no database column takes among them: every one kept, ids in call order."""
    import asyncio

    await asyncio.gather(*(store.record_audit(entry(i, address="a\x00b" if i == 7 else
                                                    "10.0.0.1")) for i in range(60)))
    page = await store.query_audit(AuditQuery(limit=100))
    assert [e.task_id for e in page.items] == [f"task-{i}" for i in reversed(range(60))]
    assert page.items[60 - 1 - 7].address not in (None, "a\x00b")


# ------------------------------------------------- an entry kept with the task (add_task)


def _task(i: int, *targets: str) -> Task:
    return Task(id=f"task-{i}", name="job", command="true", targets=targets or ("node//a",),
                created_at=T0)


async def _task_ids(store: Any) -> list[str | None]:
    return [e.task_id for e in (await store.query_audit(AuditQuery(limit=500))).items]


async def test_add_task_keeps_its_audit_entry_with_the_task(store: Any) -> None:
    await store.add_task(_task(1), T0, audit=entry(1))
    await store.add_task(_task(2), T0)  # no entry asked for: none written
    page = await store.query_audit(AuditQuery())
    assert [e.task_id for e in page.items] == ["task-1"]
    got = page.items[0]
    assert (got.at, got.method, got.route, got.status, got.token, got.address,
            dict(got.counts)) == (T0 + timedelta(minutes=1), "POST", "/task/create", 200,
                                  "ops", "10.0.0.1", {"nodeids": 1})
    assert (await store.get_task("task-1")).task.id == "task-1"


async def test_a_task_not_added_leaves_no_audit_entry(store: Any) -> None:
    await store.add_task(_task(1), T0, audit=entry(1))
    with pytest.raises(Conflict):
        await store.add_task(_task(1), T0, audit=entry(2, task_id="task-1-again"))
    assert await _task_ids(store) == ["task-1"]


async def test_tasks_added_together_each_keep_their_own_entry(store: Any) -> None:
    """Concurrent adds (PostgreSQL: one group statement; SQLite: one bulk job), one of
    them a duplicate id: every added task has its entry, the duplicate leaves none."""
    import asyncio

    await store.add_task(_task(0), T0)
    results = await asyncio.gather(*(
        store.add_task(_task(i), T0, audit=entry(i, address="a\x00b" if i == 5 else "x"))
        for i in range(40)), return_exceptions=True)
    assert isinstance(results[0], Conflict)
    assert all(r is None for r in results[1:])
    assert sorted(await _task_ids(store)) == sorted(f"task-{i}" for i in range(1, 40))

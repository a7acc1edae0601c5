"""PostgresStore only: the schema and its migrations, what the database enforces (one
dispatched run per device, claims that skip locked rows), the DSN's password, text
PostgreSQL cannot hold, large creates. (The contract suite runs on it as well.)"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

from ghostrunner._sqlkit import STATUS_SQL
from ghostrunner._types import Outcome, RunKey, RunState, TaskStatus, task_status
from ghostrunner.errors import StoreError
from ghostrunner.postgres import PostgresStore, _schema
from tests.contract.test_store_contract import (
    NOW,
    add,
    at,
    claim,
    dispatch,
    make_task,
    run_of,
    status_cases,
)
from tests.pg import PgServer


async def test_open_creates_the_schema_in_an_empty_database(postgres: PgServer) -> None:
    dsn = postgres.database(schema=False)
    store = PostgresStore(dsn)
    await store.open()
    try:
        task = await add(store, "node//a")
        assert (await store.get_task(task.id)).task == task
        async with store.connection() as conn:
            cur = await conn.execute("SELECT version FROM ghostrunner_schema")
            assert await cur.fetchone() == (_schema.SCHEMA_VERSION,)
    finally:
        await store.close()
        postgres.drop(dsn)


async def test_processes_starting_together_migrate_once(postgres: PgServer) -> None:
    dsn = postgres.database(schema=False)
    stores = [PostgresStore(dsn) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))  # the advisory lock serialises
        task = await add(stores[0], "node//a")
        assert (await stores[3].get_task(task.id)).task == task
    finally:
        for s in stores:
            await s.close()
        postgres.drop(dsn)


async def test_refuses_a_newer_database(pg_store: PostgresStore) -> None:
    async with pg_store.connection() as conn:
        await conn.execute("UPDATE ghostrunner_schema SET version = version + 1")
    again = PostgresStore(pg_store._dsn)
    with pytest.raises(StoreError, match="newer"):
        await again.open()


async def test_refuses_a_foreign_database(postgres: PgServer) -> None:
    dsn = postgres.database(schema=False)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE tasks (x int)")
        with pytest.raises(StoreError, match="not a GhostRunner database"):
            await PostgresStore(dsn).open()
    finally:
        postgres.drop(dsn)


async def test_the_password_never_shows(postgres: PgServer, caplog: Any) -> None:
    secret = "s3cret-Pa55"
    store = PostgresStore(
        f"postgresql://nobody:{secret}@127.0.0.1:1/nowhere?connect_timeout=1",
        connect_timeout=0.5,
    )
    assert secret not in repr(store) and secret not in store.dsn
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreError) as info:
        await store.open()
    assert secret not in str(info.value)
    assert secret not in caplog.text
    closed = PostgresStore(postgres.uri)
    with pytest.raises(StoreError, match="not open"):
        await closed.counts()


async def test_a_device_has_one_dispatched_run_at_most(pg_store: PostgresStore) -> None:
    one = await add(pg_store, "node//a", "node//b")
    two = await add(pg_store, "node//a")
    await dispatch(pg_store, one, "node//a")
    # another task's run on the same device waits: left out, left pending
    assert await claim(pg_store, RunKey(two.id, "node//a"), at(1)) is None
    assert (await run_of(pg_store, two, "node//a")).state is RunState.PENDING
    # both in one call: the first is claimed, the second left out
    three = await add(pg_store, "node//c")
    four = await add(pg_store, "node//c")
    got = await pg_store.claim_many(
        [RunKey(three.id, "node//c"), RunKey(four.id, "node//c"), RunKey(one.id, "node//b")],
        at(1),
    )
    assert [run.key for run, _ in got] == [RunKey(three.id, "node//c"), RunKey(one.id, "node//b")]
    # once it finishes, the device takes the next one
    await pg_store.finish(RunKey(one.id, "node//a"), RunState.SUCCEEDED, at(2))
    assert await claim(pg_store, RunKey(two.id, "node//a"), at(3)) is not None


async def test_two_stores_on_one_database_never_dispatch_a_device_twice(
    pg_store: PostgresStore,
) -> None:
    """Two processes' worth of stores claim the same devices at once: each run is
    claimed once, and each device has one dispatched run."""
    nodes = [f"node//{i}" for i in range(20)]
    tasks = [await add(pg_store, *nodes) for _ in range(3)]
    other = PostgresStore(pg_store._dsn, max_size=4)
    await other.open()
    try:
        keys = [RunKey(t.id, n) for t in tasks for n in nodes]
        results = await asyncio.gather(*(
            s.claim_many(keys[i::4], NOW) for i, s in zip(range(8), itertools.cycle(
                [pg_store, other]), strict=False)
        ))
        claimed = [run for result in results for run, _ in result]
        assert len({r.key for r in claimed}) == len(claimed)
        assert Counter(r.node_id for r in claimed) == Counter(nodes)
        assert len(await pg_store.dispatched()) == len(nodes)
    finally:
        await other.close()


async def test_output_keeps_nul_and_replaces_lone_surrogates(pg_store: PostgresStore) -> None:
    task = await add(pg_store, "node//a")
    await dispatch(pg_store, task, "node//a")
    raw = b"ok \xff\x00 end".decode("utf-8", "surrogateescape")
    run = await pg_store.finish(
        RunKey(task.id, "node//a"), RunState.FAILED, at(1),
        outcome=Outcome(exit_code=1, output=raw), error="bad \udcff\x00 error",
    )
    assert run.output == "ok \ufffd\x00 end"
    assert run.error == "bad \ufffd\ufffd error"
    assert await run_of(pg_store, task, "node//a") == run
    assert (await pg_store.attempts(task.id))["node//a"][0].output == "ok \ufffd\x00 end"


async def test_naive_datetimes_are_refused(pg_store: PostgresStore) -> None:
    from datetime import datetime

    with pytest.raises(StoreError, match="timezone"):
        await pg_store.next_pending(["node//a"], datetime(2025, 1, 1))


async def test_a_large_create_is_one_fast_statement(
    pg_store: PostgresStore, figures: Any
) -> None:
    nodes = [f"node//{i:064x}" for i in range(10_000)]
    task = make_task(*nodes)
    start = time.perf_counter()
    await pg_store.add_task(task, NOW)
    took = time.perf_counter() - start
    figures.add("PostgresStore: add_task of 10,000 devices", round(took * 1000, 1), "ms")
    assert took < 1.0  # (about 0.1-0.2 s here; generous for a loaded CI machine)
    assert dict(await pg_store.counts()) == {RunState.PENDING: 10_000}
    runs = await pg_store.get_runs(task.id)
    assert [r.node_id for r in runs] == nodes
    start = time.perf_counter()
    for i in range(50):
        await claim(pg_store, RunKey(task.id, nodes[i]), at(1))
    figures.add("PostgresStore: claim_many of one run", round((time.perf_counter() - start)
                                                             / 50 * 1000, 2), "ms")


async def test_trigger_kept_counts_agree_with_the_runs(pg_store: PostgresStore) -> None:
    task = await add(pg_store, "node//a", "node//b", "node//c")
    other = await add(pg_store, "node//b", "node//d", expires_at=at(5))
    await dispatch(pg_store, task, "node//a")
    await pg_store.finish(RunKey(task.id, "node//a"), RunState.FAILED, at(1))
    await pg_store.cancel(task.id, ["node//b"], now=at(1))
    await pg_store.expire_due(at(10))
    await pg_store.retry(task.id, [RunState.FAILED, RunState.CANCELLED], at(11))
    await pg_store.abort(other.id, "why", at(12))
    cols = ", ".join(s.value for s in RunState)
    async with pg_store.connection() as conn:
        kept = {row[0]: row[1:] for row in await (await conn.execute(
            f"SELECT task_seq, total, {cols} FROM task_counts")).fetchall()}
        real: dict[int, list[int]] = {seq: [0] * (len(RunState) + 1) for seq in kept}
        for seq, state, n in await (await conn.execute(
                "SELECT task_seq, state, count(*) FROM runs GROUP BY 1, 2")).fetchall():
            real[seq][0] += n
            real[seq][1 + list(RunState).index(RunState(state))] = n
    assert {seq: list(v) for seq, v in kept.items()} == real


def test_status_sql_matches_task_status(postgres: PgServer) -> None:
    """The SQL reading of TaskStatus agrees with task_status on every small case."""
    cols = [s.value for s in RunState]
    with psycopg.connect(postgres.uri, autocommit=True) as conn:
        conn.execute(
            f"CREATE TEMP TABLE c (total int, {', '.join(f'{c} int' for c in cols)}, "
            "paused boolean, aborted boolean)")
        for total, counts, paused, aborted in status_cases():
            conn.execute("DELETE FROM c")
            conn.execute(
                f"INSERT INTO c VALUES ({', '.join(['%s'] * (len(cols) + 3))})",
                (total, *(counts.get(s, 0) for s in RunState), paused, aborted),
            )
            matched = [
                status for status, sql in STATUS_SQL.items()
                if conn.execute(f"SELECT count(*) FROM c WHERE {sql}").fetchone() == (1,)
            ]
            assert matched == [task_status(counts, paused=paused, aborted=aborted)]
    assert set(STATUS_SQL) == set(TaskStatus)


# --------------------------------------------------------------------------- event log


async def _advisory_waiters(store: PostgresStore) -> int:
    async with store.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def _inbox(store: PostgresStore) -> int:
    async with store.connection() as conn:
        row = await (await conn.execute("SELECT count(*) FROM event_inbox")).fetchone()
        assert row is not None
        return int(row[0])


async def test_an_open_transaction_with_events_holds_back_no_writer_and_no_id(
    pg_store: PostgresStore,
) -> None:
    """A verb's transaction that wrote events and has not committed delays nobody (no
    lock across its commit: schema 6) and has no id yet: a reader sees the later
    writer's event now, and the slow one's after its commit, with a later id, past the
    reader's cursor (never behind it)."""
    from ghostrunner import events as ev
    from ghostrunner.postgres._store import _emit

    async with await psycopg.AsyncConnection.connect(pg_store._dsn) as slow:
        async with slow.transaction():
            await _emit(slow, NOW, [(ev.TASK_PAUSED, "slow-task", None, {})])
            task = await asyncio.wait_for(add(pg_store, "node//a"), 10)  # not held back
            (first,) = await pg_store.events_after(0, 10)
            assert first.task_id == task.id
        # committed now: the next read sequences it, after the cursor
        (second,) = await pg_store.events_after(first.id, 10)
    assert second.task_id == "slow-task" and second.id > first.id
    assert [e.id for e in await pg_store.events_after(0, 10)] == [first.id, second.id]


async def test_a_pass_in_progress_holds_back_no_verb(pg_store: PostgresStore) -> None:
    """Another process's sequencer pass holds the sequencer's lock: verbs (and their
    events) go on; the events wait in the inbox until the pass ends."""
    other = await psycopg.AsyncConnection.connect(pg_store._dsn)
    async with other, other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock(%s)", (_schema.EVENTS_LOCK,))
        task = await asyncio.wait_for(add(pg_store, "node//a"), 10)
        key = RunKey(task.id, "node//a")
        await asyncio.wait_for(claim(pg_store, key, NOW), 10)
        reader = asyncio.create_task(pg_store.events_after(0, 10))
        while await _advisory_waiters(pg_store) == 0:  # the reader's pass waits
            assert not reader.done()
            await asyncio.sleep(0.01)
        assert await _inbox(pg_store) == 2
    kinds = [e.kind for e in await asyncio.wait_for(reader, 10)]
    assert kinds == ["task.created", "run.claimed"]
    assert await _inbox(pg_store) == 0


async def test_events_leave_the_inbox_with_no_reader(pg_store: PostgresStore) -> None:
    """Shortly after a commit that wrote events, the writer's own pass moves them to the
    log, whether or not anyone reads it."""
    await add(pg_store, "node//a")
    drain = pg_store._drain
    assert drain is not None
    await asyncio.wait_for(drain, 10)
    assert await _inbox(pg_store) == 0
    async with pg_store.connection() as conn:
        row = await (await conn.execute("SELECT count(*) FROM events")).fetchone()
    assert row == (1,)


async def test_only_the_sequencer_may_write_the_log(pg_store: PostgresStore) -> None:
    """Why only passes take ids: an id taken outside a pass (a bare insert) can commit
    after a later one was read, behind the reader's cursor."""
    async with await psycopg.AsyncConnection.connect(pg_store._dsn) as rogue:
        async with rogue.transaction():
            await rogue.execute(
                "INSERT INTO events(at, kind, task_id) VALUES (now(), 'task.paused', 'x')")
            task = await add(pg_store, "node//a")
            (seen,) = await pg_store.events_after(0, 10)
            assert seen.task_id == task.id
        late = await pg_store.events_after(0, 10)
    assert [e.task_id for e in late] == ["x", task.id]
    assert late[0].id < seen.id  # behind a cursor at seen.id: it would never be read


async def test_concurrent_writers_and_a_following_reader_lose_nothing(
    pg_store: PostgresStore,
) -> None:
    """Four stores on one database (as four processes would be) write events as fast as
    they can; a reader following with its cursor sees every event once, in id order."""
    writers = [PostgresStore(pg_store._dsn, max_size=4) for _ in range(4)]
    for w in writers:
        await w.open()
    done = asyncio.Event()
    seen: list[int] = []

    async def write(store: PostgresStore, n: int) -> None:
        for i in range(40):
            task = await add(store, f"node//w{n}-{i}", "node//shared")
            key = RunKey(task.id, f"node//w{n}-{i}")
            await store.claim_many([key], at(i))
            await store.finish(key, RunState.SUCCEEDED, at(i), outcome=Outcome(exit_code=0))

    async def read() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            batch = await pg_store.events_after(cursor, 50)
            seen.extend(e.id for e in batch)
            if batch:
                cursor = batch[-1].id
            elif finished:
                return

    try:
        reader = asyncio.create_task(read())
        await asyncio.gather(*(write(w, n) for n, w in enumerate(writers)))
        done.set()
        await reader
    finally:
        for w in writers:
            await w.close()
    async with pg_store.connection() as conn:
        cur = await conn.execute("SELECT id FROM events ORDER BY id")
        stored = [row[0] for row in await cur.fetchall()]
    assert len(stored) == 4 * 40 * 3
    assert seen == stored  # every one, once, in order


def _count_groups(store: PostgresStore, method: str) -> list[int]:
    """The size of each group ``store.method`` (a group commit's statement) sends."""
    sizes: list[int] = []
    real = getattr(store, method)

    async def counted(conn: Any, *, batch: Any) -> Any:
        sizes.append(len(batch))
        return await real(conn, batch=batch)

    setattr(store, method, counted)
    return sizes


async def test_finishes_at_once_share_statements_and_keep_their_own_answers(
    pg_store: PostgresStore,
) -> None:
    """Group commit: finishes asked together go in few statements; each caller gets its
    own run or its own error (not dispatched, twice the same run, another's run)."""
    nodes = [f"node//g{i}" for i in range(40)]
    task = await add(pg_store, *nodes)
    keys = [RunKey(task.id, n) for n in nodes]
    await pg_store.claim_many(keys[:30], at(1), runner="me")
    groups = _count_groups(pg_store, "_finish_many")
    results = await asyncio.gather(
        *(pg_store.finish(k, RunState.SUCCEEDED, at(2), outcome=Outcome(exit_code=i),
                          runner="me") for i, k in enumerate(keys[:29])),
        pg_store.finish(keys[0], RunState.FAILED, at(2), runner="me"),  # the same again
        pg_store.finish(keys[29], RunState.FAILED, at(2), runner="other"),  # not its own
        pg_store.finish(keys[30], RunState.FAILED, at(2), runner="me"),  # still pending
        return_exceptions=True,
    )
    assert len(groups) < 10, groups
    for i, run in enumerate(results[:29]):
        assert not isinstance(run, BaseException), run
        assert (run.state, run.exit_code, run.node_id) == (RunState.SUCCEEDED, i, nodes[i])
    from ghostrunner.errors import IllegalTransition, NotOwner

    assert isinstance(results[29], IllegalTransition)
    assert isinstance(results[30], NotOwner)
    assert isinstance(results[31], IllegalTransition)
    counts = (await pg_store.get_task(task.id)).counts
    assert (counts[RunState.SUCCEEDED], counts[RunState.DISPATCHED]) == (29, 1)
    events = await pg_store.events_after(0, 1000)
    finished = [e for e in events if e.kind == "run.finished"]
    assert sorted(e.node_id or "" for e in finished) == sorted(nodes[:29])
    assert all(e.data["exit_code"] == nodes.index(e.node_id or "") for e in finished)


async def test_small_calls_plan_once_large_calls_plan_for_their_arrays(
    pg_store: PostgresStore,
) -> None:
    """A pooled session plans generically for calls of few devices (planned once) and
    as PostgreSQL's default for larger ones; it sends the setting only on a change."""
    from ghostrunner.postgres._store import _GENERIC, _SMALL, _plan

    async def mode(conn: Any) -> str:
        row = await (await conn.execute("SHOW plan_cache_mode")).fetchone()
        return str(row[0])

    async with pg_store.connection() as conn:
        assert _GENERIC[conn] is False  # a new session: the default
        await _plan(conn, 1)
        assert (await mode(conn), _GENERIC[conn]) == ("force_generic_plan", True)
        await conn.execute("SET plan_cache_mode = auto")  # behind its back:
        await _plan(conn, _SMALL)  # no change asked, nothing sent
        assert await mode(conn) == "auto"
        await _plan(conn, _SMALL + 1)
        assert (await mode(conn), _GENERIC[conn]) == ("auto", False)
        await _plan(conn, 1)
        assert await mode(conn) == "force_generic_plan"


async def test_tasks_submitted_together_share_statements_in_their_order(
    pg_store: PostgresStore,
) -> None:
    """Group commit of add_task: few statements; submission order kept (the listing's
    seq, the events); each caller its own answer (a taken id: Conflict, the same id
    twice in one burst: the second is a Conflict)."""
    from ghostrunner._types import TaskQuery
    from ghostrunner.errors import Conflict

    taken = await add(pg_store, "node//x")
    groups = _count_groups(pg_store, "_add_many")
    tasks = [make_task(f"node//t{i}", f"node//u{i}", name=f"job-{i}") for i in range(30)]
    twin = make_task("node//v", id=tasks[3].id)
    again = make_task("node//w", id=taken.id)
    results = await asyncio.gather(
        *(pg_store.add_task(t, NOW) for t in tasks), pg_store.add_task(twin, NOW),
        pg_store.add_task(again, NOW), return_exceptions=True)
    assert results[:30] == [None] * 30
    assert isinstance(results[30], Conflict) and isinstance(results[31], Conflict)
    assert len(groups) <= 3, groups
    page = await pg_store.list_tasks(TaskQuery(limit=100))
    listed = [s.task.id for s in page.items]
    submitted = [taken.id, *(t.id for t in tasks)]
    assert listed in (submitted, submitted[::-1])  # by seq: the order of submission
    for t in tasks[:3]:
        assert [r.node_id for r in await pg_store.get_runs(t.id)] == list(t.targets)
    created = [e.task_id for e in await pg_store.events_after(0, 1000)
               if e.kind == "task.created"]
    assert created == [taken.id, *(t.id for t in tasks)]


async def test_a_failed_group_statement_adds_each_task_alone(pg_store: PostgresStore) -> None:
    """If a group's statement fails, each of its tasks is added by itself: one task's
    error stays its own."""
    from ghostrunner.errors import StoreError

    real = pg_store._add_many
    lone = make_task("node//z")

    async def broken(conn: Any, *, batch: Any) -> Any:
        # a group's statement fails, and so does the lone task's own (a group of one)
        if len(batch) > 1 or batch[0].task.id == lone.id:
            raise StoreError("the group's statement failed")
        return await real(conn, batch=batch)

    pg_store._add_many = broken  # type: ignore[method-assign]
    tasks = [make_task(f"node//t{i}") for i in range(5)]
    assert await asyncio.gather(*(pg_store.add_task(t, NOW) for t in tasks)) == [None] * 5
    for t in tasks:
        assert (await pg_store.get_task(t.id)).task == t
    with pytest.raises(StoreError, match="group"):  # alone in its group: its own error
        await pg_store.add_task(lone, NOW)


async def test_close_sends_what_the_group_commits_hold(postgres: PgServer) -> None:
    """Finishes, tasks and audit entries asked just before close are written (their
    callers wait for them), not dropped."""
    from ghostrunner.audit import AuditEntry, AuditQuery

    dsn = postgres.database()
    try:
        store = PostgresStore(dsn)
        await store.open()
        nodes = [f"node//c{i}" for i in range(10)]
        task = await add(store, *nodes)
        keys = [RunKey(task.id, n) for n in nodes]
        await store.claim_many(keys, at(1))
        later = make_task("node//later")
        pending = [
            asyncio.create_task(store.finish(k, RunState.SUCCEEDED, at(2),
                                             outcome=Outcome(exit_code=0))) for k in keys]
        pending.append(asyncio.create_task(store.add_task(later, NOW)))
        pending.append(asyncio.create_task(store.record_audit(AuditEntry(
            at=NOW, method="POST", route="/task/create", status=200))))
        await asyncio.sleep(0)  # each has asked
        await store.close()
        assert all(t.done() and t.exception() is None for t in pending)
        again = PostgresStore(dsn)
        await again.open()
        try:
            counts = (await again.get_task(task.id)).counts
            assert counts[RunState.SUCCEEDED] == 10
            assert (await again.get_task(later.id)).task == later
            assert len((await again.query_audit(AuditQuery())).items) == 1
        finally:
            await again.close()
    finally:
        postgres.drop(dsn)


async def test_a_plan_mode_set_in_a_transaction_rolled_back_is_set_again(
    postgres: PgServer,
) -> None:
    """A claim's transaction sets the plan mode; if it rolls back, PostgreSQL undoes the
    SET: the store forgets what it knew of that session, and the next call sets it."""
    from ghostrunner.errors import NotFound
    from ghostrunner.postgres._store import _GENERIC

    dsn = postgres.database()
    pg_store = PostgresStore(dsn, max_size=1)  # one session: the one the claims used
    await pg_store.open()
    try:
        await _rolled_back_plan_mode(pg_store, _GENERIC, NotFound)
    finally:
        await pg_store.close()
        postgres.drop(dsn)


async def _rolled_back_plan_mode(pg_store: PostgresStore, generic: Any, missing: Any) -> None:
    with pytest.raises(missing):  # a claim of a run that does not exist: rolled back
        await pg_store.claim_many([RunKey("no-such-task", "node//a")], NOW)
    async with pg_store.connection() as conn:
        row = await (await conn.execute("SHOW plan_cache_mode")).fetchone()
        assert row == ("auto",)  # the SET went with the transaction
        assert generic.get(conn) is None  # and the store knows it does not know
    task = await add(pg_store, "node//a")
    await pg_store.claim_many([RunKey(task.id, "node//a")], NOW)
    async with pg_store.connection() as conn:
        row = await (await conn.execute("SHOW plan_cache_mode")).fetchone()
        assert row == ("force_generic_plan",) and generic[conn] is True

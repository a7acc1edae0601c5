"""Large tasks in the SQLite store (issue #12): written in steps the store's thread
interleaves with other jobs, visible only once complete, gone after a crash midway.

(The figures, a 10,000-device create and a small create's wait meanwhile, are in
``benchmarks/bench_store.py --large-only``; these tests check behaviour, not time.)
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ghostrunner._protocols import Store
from ghostrunner._types import RunKey, RunState, Task, TaskQuery
from ghostrunner.errors import Conflict, NotFound
from ghostrunner.sqlite import SQLiteStore, _large, _queries, _worker
from ghostrunner.sqlite._values import ts
from tests.contract.test_store_contract import NOW, at, check_counts, make_task

N = _large.STAGED_RUNS + 1_234  # written in steps: three chunks of runs and a bit
SMALL_WAIT = 10.0  # seconds: only a bound for a hang, never reached when it works


def big_task(n: int = N, **kw: Any) -> Task:
    return make_task(*(f"node//{i:05d}" for i in reversed(range(n))), **kw)


async def test_a_large_task_reads_back_like_a_small_one(store: Store) -> None:
    """Both stores (the in-memory one is the reference): target order, positions, times,
    counts, and the runs' devices are found by the loop."""
    task = big_task(not_before=at(5), expires_at=at(3600))
    await store.add_task(task, NOW)
    runs = await store.get_runs(task.id)
    assert [r.node_id for r in runs] == list(task.targets)
    assert {(r.state, r.available_at, r.expires_at, r.queued_at) for r in runs} == {
        (RunState.PENDING, at(5), at(3600), NOW)}
    assert (await store.get_task(task.id)).counts == {RunState.PENDING: N}
    assert (await store.counts()) == {RunState.PENDING: N}
    found = await store.next_pending(list(task.targets[:50]), at(5))
    assert {r.node_id for r in found} == set(task.targets[:50])
    with pytest.raises(Conflict):
        await store.add_task(task, NOW)
    with pytest.raises(Conflict):  # a small task cannot take its id either
        await store.add_task(make_task("node//x", id=task.id), NOW)


async def test_a_large_task_keeps_its_audit_entry(store: Any) -> None:
    """The entry goes in with the step that makes the task visible: there once it is,
    and none for an add that fails."""
    from ghostrunner.audit import AuditEntry, AuditQuery

    def entry(task_id: str) -> AuditEntry:
        return AuditEntry(at=NOW, method="POST", route="/task/create", status=200,
                          task_id=task_id, counts={"nodeids": N})

    task = big_task()
    await store.add_task(task, NOW, audit=entry(task.id))
    with pytest.raises(Conflict):
        await store.add_task(task, NOW, audit=entry("again"))
    page = await store.query_audit(AuditQuery())
    assert [(e.task_id, dict(e.counts)) for e in page.items] == [(task.id, {"nodeids": N})]


async def test_a_large_task_over_known_and_new_devices(sqlite_store: SQLiteStore) -> None:
    first = make_task(*(f"node//{i:05d}" for i in range(0, N, 2)))
    await sqlite_store.add_task(first, NOW)
    second = big_task()
    await sqlite_store.add_task(second, NOW)
    assert [r.node_id for r in await sqlite_store.get_runs(second.id)] == list(second.targets)
    await sqlite_store.close()
    check_counts(sqlite_store.path)


# --------------------------------------------------------------------------- not blocking


@pytest.fixture
def held_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """(entered, release): the store's thread stops before its next write batch, says
    so with ``entered`` and goes on when ``release`` is set."""
    entered, release = threading.Event(), threading.Event()
    armed = [True]
    run_batch = _worker.Worker._run_batch

    def held(self: _worker.Worker, db: Any, batch: list[_worker.Job]) -> None:
        if armed[0] and any(job.kind == "write" for job in batch):
            armed[0] = False
            entered.set()
            release.wait(SMALL_WAIT)
        run_batch(self, db, batch)

    monkeypatch.setattr(_worker.Worker, "_run_batch", held)
    yield entered, release
    release.set()


async def test_a_small_create_does_not_wait_for_a_large_one_to_commit(
    sqlite_store: SQLiteStore, held_batch: tuple[threading.Event, threading.Event]
) -> None:
    """A create submitted while a large one is being written is done before the large
    one is: the large one's steps are jobs of their own, and the small one's job,
    queued behind the step being written, runs before the next. (Before: the large
    task was one job, one transaction, and the small create waited for all of it.)"""
    entered, release = held_batch
    big = big_task()
    adding = asyncio.ensure_future(sqlite_store.add_task(big, NOW))
    assert await asyncio.to_thread(entered.wait, SMALL_WAIT)  # the thread is on it
    small = make_task("node//small")
    small_added = asyncio.ensure_future(sqlite_store.add_task(small, NOW))
    await asyncio.sleep(0)  # its job is queued
    release.set()
    await asyncio.wait_for(small_added, SMALL_WAIT)
    assert not adding.done()
    assert (await sqlite_store.get_task(small.id)).counts == {RunState.PENDING: 1}
    with pytest.raises(NotFound):
        await sqlite_store.get_task(big.id)  # not yet: still being written
    await asyncio.wait_for(adding, SMALL_WAIT)
    assert (await sqlite_store.get_task(big.id)).counts == {RunState.PENDING: N}


# --------------------------------------------------------------------------- invisible


async def stage_half(store: SQLiteStore, task: Task) -> int:
    """What the store has written of ``task`` between two of its steps: the task
    staged, every node interned, the first chunk of runs; its seq."""
    row = _queries.task_row(task, ts(NOW))
    seq: int = await store._write(lambda db: _large.stage(db, row))
    nids = await store._write(lambda db: _large.intern(db, list(task.targets)))
    runs = sorted(zip(nids, range(len(nids)), strict=True))[: _large.CHUNK_RUNS]
    await store._write(lambda db: _large.write_runs(db, seq, runs, ts(NOW)))
    return seq


async def test_a_half_written_task_is_invisible_to_every_verb(
    sqlite_store: SQLiteStore,
) -> None:
    store = sqlite_store
    visible = make_task("node//00001", "node//other", expires_at=at(10))
    await store.add_task(visible, NOW)
    half = big_task(expires_at=at(10), not_before=at(1))
    seq = await stage_half(store, half)
    assert await store._read(
        lambda db: db.execute("SELECT count(*) FROM runs WHERE task_seq = ?", (seq,)).fetchone()[0]
    ) == _large.CHUNK_RUNS  # there, in the tables

    for verb in (store.get_task, store.get_runs, store.attempts, store.delete_task):
        with pytest.raises(NotFound):
            await verb(half.id)
    with pytest.raises(NotFound):
        await store.cancel(half.id, now=NOW)
    with pytest.raises(NotFound):
        await store.pause(half.id, True)
    with pytest.raises(NotFound):
        await store.add_runs(half.id, ["node//new"], NOW)
    with pytest.raises(NotFound):
        await store.claim_many([RunKey(half.id, "node//00000")], at(2))
    assert [s.task.id for s in (await store.list_tasks(TaskQuery())).items] == [visible.id]
    listed = await store.list_tasks(TaskQuery(node_id="node//00001"))
    assert [s.task.id for s in listed.items] == [visible.id]
    assert await store.counts() == {RunState.PENDING: 2}
    nodes = [f"node//{i:05d}" for i in range(N)]
    assert [r.task_id for r in await store.next_pending(nodes, at(2))] == [visible.id]
    assert await store.next_wakeup(NOW) == at(10)  # not at(1): the half task's start
    assert await store.expire_due(at(11)) == 2  # the visible task's runs only
    assert await store.counts() == {RunState.EXPIRED: 2}
    assert await store.open_continuous(NOW) == []
    assert await store.rollout_tasks() == []


async def test_a_task_half_written_when_the_store_stops_is_gone_at_the_next_open(
    sqlite_store: SQLiteStore,
) -> None:
    store = sqlite_store
    kept = make_task("node//00001")
    await store.add_task(kept, NOW)
    half = big_task()
    await stage_half(store, half)
    await store.close()  # the files as a crash between two steps leaves them
    await store.open()
    with pytest.raises(NotFound):
        await store.get_task(half.id)
    await store.add_task(half, NOW)  # its id is free again
    assert len(await store.get_runs(half.id)) == N
    await store.close()
    check_counts(store.path)
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM staged_tasks").fetchone() == (0,)
    conn.close()


def test_a_task_half_written_when_the_process_is_killed_is_gone(tmp_path: Path) -> None:
    """SIGKILL midway through a large create (some chunks committed): after a restart
    the task is not there, and the counts agree with the runs."""
    path = tmp_path / "killed.db"
    script = (
        "import asyncio, threading\n"
        "from ghostrunner.sqlite import SQLiteStore, _large\n"
        "from tests.contract.test_sqlite_large import big_task, make_task\n"
        "from tests.contract.test_store_contract import NOW\n"
        "write_runs, calls = _large.write_runs, []\n"
        "def stopping(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:  # the first chunk of runs is committed\n"
        "        print('midway', flush=True)\n"
        "        threading.Event().wait(60)  # until killed\n"
        "    write_runs(*args, **kwargs)\n"
        "_large.write_runs = stopping\n"
        "async def main():\n"
        f"    store = SQLiteStore({str(path)!r})\n"
        "    await store.open()\n"
        "    await store.add_task(make_task('node//00001', id='kept'), NOW)\n"
        "    await store.add_task(big_task(id='half'), NOW)\n"
        "asyncio.run(main())\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          text=True, cwd=Path(__file__).resolve().parents[2]) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "midway"
            with sqlite3.connect(path) as conn:  # what the dead process leaves
                staged = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
            conn.close()
            assert staged == 1 + _large.CHUNK_RUNS
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    async def reopen() -> tuple[list[str], int]:
        store = SQLiteStore(path)
        await store.open()
        try:
            ids = [s.task.id for s in (await store.list_tasks(TaskQuery())).items]
            with pytest.raises(NotFound):
                await store.get_task("half")
            runs = await store._read(
                lambda db: db.execute("SELECT count(*) FROM runs").fetchone()[0])
            return ids, runs
        finally:
            await store.close()

    assert asyncio.run(reopen()) == (["kept"], 1)
    check_counts(str(path))


async def test_a_cancelled_large_create_leaves_nothing(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled midway (a client that went away): what was written is taken back."""
    store = sqlite_store
    second_chunk = asyncio.Event()
    loop = asyncio.get_running_loop()
    write_runs, calls = _large.write_runs, []

    def counting(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            loop.call_soon_threadsafe(second_chunk.set)
        write_runs(*args, **kwargs)

    monkeypatch.setattr(_large, "write_runs", counting)
    task = big_task()
    adding = asyncio.ensure_future(store.add_task(task, NOW))
    await asyncio.wait_for(second_chunk.wait(), SMALL_WAIT)
    adding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await adding
    await store.close()  # waits for the discard
    check_counts(store.path)
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM staged_tasks").fetchone() == (0,)
    conn.close()

"""``SQLiteStore``: the store's verbs, each a function run on the worker thread.

Each verb builds its parameters on the event loop, then hands the worker (:mod:`._worker`)
a small function of the database: ``_read`` for queries, ``_write`` for changes (a
transaction shared with the other jobs of its batch, in a savepoint of its own).
"""

# ruff: noqa: S608
# (SQL is assembled only from the constants of ._queries and enum-derived identifiers;
# every value is a bound parameter.)

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, Literal, TypeVar, cast

import sqlite_utils

from .. import events as ev
from .._sqlkit import DELIVERY_COLS, audit_sql, deliveries_sql
from .._types import (
    TERMINAL_STATES,
    TRANSITIONS,
    Attempt,
    Outcome,
    Page,
    Run,
    RunKey,
    RunState,
    Task,
    TaskQuery,
    TaskSummary,
    retryable,
    utcnow,
)
from ..audit import AuditEntry, AuditPage, AuditQuery
from ..errors import Conflict, IllegalTransition, NotFound, StoreError, ValidationError
from ..tokens import Token
from ..webhooks import (
    DeliveryPage,
    DeliveryQuery,
    DeliveryStatus,
    NewDelivery,
    WebhookDelivery,
    clip_error,
)
from . import _large
from . import _queries as q
from ._values import JSON, dt, dto, json_list, storable, ts, tso
from ._worker import Bulk, Job, Kind, Worker, emit

_T = TypeVar("_T")

#: The terminal states a dispatched run may move to (what finish() accepts).
_FINISHED_STATES: Final = TRANSITIONS[RunState.DISPATCHED] & TERMINAL_STATES


class SQLiteStore:
    """A :class:`~ghostrunner.Store` in an SQLite file (see :mod:`ghostrunner.sqlite`).

    Args:
        path: the database file, created if missing; ``":memory:"`` for a private
            in-memory database (for tests; its content is lost on :meth:`close`).
        synchronous: ``"FULL"`` (default; a commit survives a power loss) or
            ``"NORMAL"`` (faster; survives a crash of the process only).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        self.path = os.fspath(path)
        self.synchronous = synchronous
        self._worker: Worker | None = None
        self._discards: set[asyncio.Task[None]] = set()  # of large tasks that failed

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # ---------------------------------------------------------------- plumbing

    async def open(self) -> None:
        if self._worker is not None and not self._worker.closing:
            return
        worker = Worker(self.path, synchronous=self.synchronous)
        self._worker = worker
        # a store dropped without close(): its thread finishes the queue, then exits
        weakref.finalize(self, worker.abandon)
        try:
            await worker.start()
        except BaseException:
            if self._worker is worker:
                self._worker = None
            raise

    async def close(self) -> None:
        if self._discards:  # what is not discarded now is at the next open
            await asyncio.gather(*self._discards, return_exceptions=True)
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.stop()

    async def _call(
        self, fn: Callable[[sqlite_utils.Database], _T], kind: Kind, bulk: Bulk | None = None
    ) -> _T:
        worker = self._worker
        if worker is None:
            raise StoreError("the store is not open")
        job = Job(fn, kind, asyncio.get_running_loop(), bulk)
        worker.submit(job)
        return cast(_T, await job.future)

    async def _read(self, fn: Callable[[sqlite_utils.Database], _T]) -> _T:
        return await self._call(fn, "read")

    async def _write(self, fn: Callable[[sqlite_utils.Database], _T]) -> _T:
        return await self._call(fn, "write")

    # ---------------------------------------------------------------- tasks

    async def add_task(
        self, task: Task, now: datetime, *, nodes: Sequence[str] | None = None,
        audit: AuditEntry | None = None,
    ) -> None:
        row = q.task_row(task, ts(now), nodes)
        entry = None if audit is None else _audit_row(audit)
        if len(row[16]) > _large.STAGED_RUNS:
            await self._add_large(row, entry)
            return
        # tasks added concurrently are written with one statement (their jobs share the
        # bulk function): per-statement costs and the worker's hold on the GIL are paid
        # once per batch, not once per task
        item = (row, entry)
        await self._call(lambda db: _add_audited(db, [item]), "write",
                         bulk=(_add_audited, item))

    async def _add_large(self, row: tuple[Any, ...], entry: tuple[Any, ...] | None) -> None:
        """:meth:`add_task` of a task with many runs, in steps the store's thread
        interleaves with its other jobs; visible at the last one (see :mod:`._large`)."""
        seq = await self._write(lambda db: _large.stage(db, row))
        nodes: Sequence[str] = row[16]
        size = _large.CHUNK_RUNS
        try:
            # Each step writes a slice of the index keys (node ids for nodes, nids for
            # runs), not a bit of every page of the index: steps commit one by one,
            # and a page written by each of them would be written to the WAL each time.
            known = sorted(nodes)
            nids: dict[str, int] = {}
            for start in range(0, len(known), size):
                part = known[start : start + size]
                got = await self._write(functools.partial(_large.intern, nodes=part))
                nids.update(zip(part, got, strict=True))
            runs = sorted((nids[node], position) for position, node in enumerate(nodes))
            del nids, known
            for start in range(0, len(runs), size):
                await self._write(functools.partial(
                    _large.write_runs, seq=seq, runs=runs[start : start + size], queued=row[12]
                ))
            def publish(db: sqlite_utils.Database) -> None:
                _large.publish(db, seq, len(nodes), (row[12], row[18]))
                if entry is not None:  # in the transaction that makes the task visible
                    db.conn.execute(_AUDIT_INSERT, entry)

            await self._write(publish)
        except BaseException:  # failed or cancelled: take back what was written
            discard = asyncio.ensure_future(self._discard(seq))
            self._discards.add(discard)
            discard.add_done_callback(self._discards.discard)
            raise

    async def _discard(self, seq: int) -> None:
        """Delete the staged task ``seq`` in steps, like it was written."""
        with contextlib.suppress(StoreError):  # closed: discarded at the next open
            while not await self._write(
                lambda db: _large.discard(db, seq, _large.CHUNK_RUNS)
            ):
                pass

    async def bulk_add_tasks(
        self, tasks: Iterable[Task], now: datetime, *, chunk_runs: int = 50_000
    ) -> int:
        """Add many tasks fast (benchmarks, imports), as :meth:`add_task` would.

        ``tasks`` is consumed on the store's thread, and nothing else runs on the store
        meanwhile. The tasks of ``chunk_runs`` runs or so go in with one statement,
        :meth:`add_task`'s (bigger chunks were no faster, and a chunk's JSON is held
        several times over in memory). Into an empty store the whole load is one
        transaction and the indexes are built at the end; otherwise each chunk is one
        transaction, and a task id that exists raises ``Conflict`` and leaves the
        earlier chunks in. Returns how many runs were added.
        """
        queued = ts(now)
        return await self._call(lambda db: _bulk_load(db, tasks, queued, chunk_runs), "exclusive")

    async def get_task(self, task_id: str) -> TaskSummary:
        return await self._read(lambda db: _summary(db, task_id))

    async def get_runs(self, task_id: str) -> Sequence[Run]:
        def op(db: sqlite_utils.Database) -> list[Run]:
            seq = _task_seq(db, task_id)
            rows = db.execute(
                f"SELECT n.node_id, {q.R_RUN_COLS} FROM runs AS r "
                "JOIN nodes AS n ON n.nid = r.node WHERE r.task_seq = ? ORDER BY r.position",
                (seq,),
            ).fetchall()
            return [q.run(task_id, row[0], row[1:]) for row in rows]

        return await self._read(op)

    async def list_tasks(self, query: TaskQuery) -> Page:
        """Newest first; see :func:`._queries.list_sql` for how each filter is served."""
        sql, params = q.list_sql(query)

        def op(db: sqlite_utils.Database) -> Page:
            rows = db.execute(sql, params).fetchall()
            more = len(rows) > query.limit
            rows = rows[: query.limit]
            items = tuple(q.summary(row) for row in rows)
            return Page(items=items, next_cursor=str(rows[-1][0]) if more else None)

        return await self._read(op)

    async def delete_task(self, task_id: str) -> None:
        def op(db: sqlite_utils.Database) -> None:
            seq = _task_seq(db, task_id)
            active = db.execute(
                "SELECT pending + dispatched FROM task_counts WHERE task_seq = ?", (seq,)
            ).fetchone()
            if active is not None and active[0]:
                raise IllegalTransition(f"task {task_id} still has active runs")
            db.execute("DELETE FROM attempts WHERE task_seq = ?", (seq,))
            gone = db.execute("DELETE FROM runs WHERE task_seq = ?", (seq,)).rowcount
            db.execute("DELETE FROM task_counts WHERE task_seq = ?", (seq,))
            db.execute("DELETE FROM tasks WHERE seq = ?", (seq,))
            emit(stamp, ev.TASK_DELETED, task_id, None, {"runs": gone})

        stamp = ts(utcnow())
        await self._write(op)

    # ---------------------------------------------------------------- the loop's verbs

    async def next_pending(
        self,
        node_ids: Collection[str],
        now: datetime,
        *,
        limit: int | None = None,
        skip_tasks: Collection[str] = (),
    ) -> Sequence[Run]:
        if not node_ids or limit == 0:
            return []
        params = {
            "nodes": json_list(dict.fromkeys(node_ids)),
            "now": ts(now),
            "limit": -1 if limit is None else limit,
            "skip": json_list(skip_tasks),
        }

        def op(db: sqlite_utils.Database) -> list[Run]:
            rows = db.execute(q.NEXT_PENDING_SQL, params).fetchall()
            return [q.run(row[0], row[1], row[2:]) for row in rows]

        return await self._read(op)

    async def claim_many(
        self, keys: Sequence[RunKey], now: datetime
    ) -> Sequence[tuple[Run, Task]]:
        if not keys:
            return []
        stamp = ts(now)

        def op(db: sqlite_utils.Database) -> list[tuple[Run, Task]]:
            claimed: list[Run] = []
            for key in keys:
                rows = db.execute(q.CLAIM_SQL, {**_key_params(key), "now": stamp}).fetchall()
                if rows:
                    claimed.append(q.run(key.task_id, key.node_id, rows[0]))
                elif not _run_exists(db, key):
                    raise NotFound(f"no run {key}")
            ids = list(dict.fromkeys(run.task_id for run in claimed))
            tasks: dict[str, Task] = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                for row in db.execute(
                    f"SELECT {q.TASK_COLS} FROM tasks AS t WHERE t.id IN ({marks})", chunk
                ):
                    tasks[row[1]] = q.task(row)
            for run in claimed:
                emit(stamp, ev.RUN_CLAIMED, run.task_id, run.node_id, ev.run_data(run))
            return [(run, tasks[run.task_id]) for run in claimed]

        return await self._write(op)

    async def finish(
        self,
        key: RunKey,
        state: RunState,
        now: datetime,
        *,
        outcome: Outcome | None = None,
        error: str | None = None,
    ) -> Run:
        if state not in TERMINAL_STATES:
            raise IllegalTransition(f"finish needs a terminal state, not {state}")
        if state not in _FINISHED_STATES:  # e.g. cancelled: only a pending run can be

            def refuse(db: sqlite_utils.Database) -> Run:
                if not _run_exists(db, key):
                    raise NotFound(f"no run {key}")
                raise IllegalTransition(f"run {key}: dispatched -> {state} is not allowed")

            return await self._read(refuse)
        params: dict[str, Any] = {"state": RunState(state).value, "error": error}
        sets = ["state = :state", "finished_at = :finished", "error = :error"]
        finished = now
        if outcome is not None:
            sets += ["exit_code = :exit_code", "output = :output", "output_truncated = :trunc",
                     "recovered = :recovered"]
            params.update(
                exit_code=outcome.exit_code,
                output=outcome.output,
                trunc=int(outcome.output_truncated),
                recovered=int(outcome.recovered),
            )
            if outcome.finished_at is not None:
                finished = outcome.finished_at
            if outcome.started_at is not None:
                sets.append("started_at = :started")
                params["started"] = ts(outcome.started_at)
        params["finished"] = ts(finished)
        assignments = ", ".join(sets)
        stamp = ts(now)

        def op(db: sqlite_utils.Database) -> Run:
            run = _update_dispatched(db, key, assignments, params)
            db.execute(q.RECORD_ATTEMPT_SQL,
                       {**_key_params(key), "state": None, "finished": None, "error": None})
            emit(stamp, ev.RUN_FINISHED, key.task_id, key.node_id, ev.run_data(run))
            return run

        return await self._write(op)

    async def release(
        self,
        key: RunKey,
        now: datetime,
        *,
        available_at: datetime,
        error: str,
        delivered: bool,
    ) -> Run:
        assignments = (
            "state = 'pending', available_at = :available, error = :error, started_at = NULL"
        )
        if not delivered:
            assignments += ", attempts = attempts - 1, undelivered = undelivered + 1"
        params = {"available": ts(available_at), "error": error}
        lost = {**_key_params(key), "state": RunState.LOST.value, "finished": ts(now),
                "error": storable(error)}

        def op(db: sqlite_utils.Database) -> Run:
            if delivered:  # the attempt sent again goes to the history first
                db.execute(q.RECORD_ATTEMPT_SQL + " AND state = 'dispatched'", lost)
            run = _update_dispatched(db, key, assignments, params)
            # a run of a task aborted while it was out goes no further
            row = db.execute(
                f"UPDATE runs SET state = 'cancelled', finished_at = :now, "
                f"error = (SELECT aborted FROM tasks WHERE seq = task_seq) "
                f"WHERE {q.KEY_WHERE} AND state = 'pending' AND "
                f"(SELECT aborted FROM tasks WHERE seq = task_seq) IS NOT NULL "
                f"RETURNING {q.RUN_COLS}",
                {**_key_params(key), "now": ts(now)},
            ).fetchone()
            if row is not None:
                run = q.run(key.task_id, key.node_id, row)
            emit(lost["finished"], ev.RUN_RELEASED, key.task_id, key.node_id,
                  ev.released_data(run, delivered))
            return run

        return await self._write(op)

    async def cancel(
        self, task_id: str, node_ids: Collection[str] | None = None, *, now: datetime
    ) -> Sequence[Run]:
        params: dict[str, Any] = {"now": ts(now)}
        only = ""
        if node_ids is not None:
            params["nodes"] = json_list(dict.fromkeys(node_ids))
            only = (
                " AND node IN (SELECT nid FROM nodes"
                " WHERE node_id IN (SELECT value FROM json_each(:nodes)))"
            )

        def op(db: sqlite_utils.Database) -> list[Run]:
            params["seq"] = _task_seq(db, task_id)
            closed = 0
            if node_ids is None:  # the whole task: a continuous one takes no more runs
                closed = db.execute(
                    "UPDATE tasks SET closed = 1 WHERE seq = :seq AND NOT closed", params
                ).rowcount
            runs = _update_runs(
                db, task_id, "state = 'cancelled', finished_at = :now",
                f"state = 'pending'{only}", params,
            )
            if runs or closed:
                emit(params["now"], ev.RUNS_CANCELLED, task_id, None,
                      ev.nodes_data([r.node_id for r in runs], closed=node_ids is None))
            return runs

        return await self._write(op)

    async def add_runs(
        self, task_id: str, node_ids: Sequence[str], now: datetime
    ) -> Sequence[Run]:
        params: dict[str, Any] = {"nodes": json_list(dict.fromkeys(node_ids)), "now": ts(now)}

        def op(db: sqlite_utils.Database) -> list[Run]:
            row = db.execute(
                "SELECT seq, closed, (SELECT coalesce(max(position), -1) + 1 FROM runs "
                f"WHERE task_seq = seq) FROM tasks WHERE id = ? AND seq NOT IN {q.STAGED}",
                (task_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no task {task_id}")
            if row[1] or not node_ids:
                return []
            params.update(seq=row[0], start=row[2])
            db.execute(
                "INSERT OR IGNORE INTO nodes(node_id) SELECT value FROM json_each(:nodes)",
                params,
            )
            rows = db.execute(q.ADD_RUNS_SQL, params).fetchall()
            if rows:  # runs are inserted pending: the counts are ours to keep (see _schema)
                db.execute(
                    "UPDATE task_counts SET total = total + :n, pending = pending + :n "
                    "WHERE task_seq = :seq", {"n": len(rows), "seq": row[0]},
                )
                db.execute("UPDATE run_counts SET n = n + ? WHERE state = 'pending'",
                           (len(rows),))
            rows.sort(key=lambda r: cast(int, r[0]))
            runs = [q.run(task_id, r[1], r[2:]) for r in rows]
            if runs:
                emit(params["now"], ev.RUNS_ADDED, task_id, None,
                      ev.nodes_data([r.node_id for r in runs]))
            return runs

        return await self._write(op)

    async def pause(self, task_id: str, paused: bool) -> TaskSummary:
        def op(db: sqlite_utils.Database) -> TaskSummary:
            if db.execute("UPDATE task_counts SET paused = ? WHERE task_seq = ? AND paused != ?",
                          (int(paused), _task_seq(db, task_id), int(paused))).rowcount:
                emit(ts(utcnow()), ev.TASK_PAUSED if paused else ev.TASK_RESUMED,
                      task_id, None, {})
            return _summary(db, task_id)

        return await self._write(op)

    async def abort(self, task_id: str, reason: str, now: datetime) -> Sequence[Run]:
        params = {"now": ts(now), "reason": storable(reason)}

        def op(db: sqlite_utils.Database) -> list[Run]:
            params["seq"] = _task_seq(db, task_id)
            db.execute("UPDATE tasks SET aborted = :reason, closed = 1 WHERE seq = :seq",
                       params)
            db.execute("UPDATE task_counts SET aborted = 1 WHERE task_seq = :seq", params)
            runs = _update_runs(
                db, task_id, "state = 'cancelled', finished_at = :now, error = :reason",
                "state = 'pending'", params,
            )
            emit(params["now"], ev.TASK_ABORTED, task_id, None,
                  ev.nodes_data([r.node_id for r in runs], reason=ev.clip(reason)))
            return runs

        return await self._write(op)

    async def retry(
        self, task_id: str, states: Collection[RunState], now: datetime
    ) -> Sequence[Run]:
        wanted = retryable(states)
        params: dict[str, Any] = {"now": ts(now), "states": json_list(s.value for s in wanted)}

        def op(db: sqlite_utils.Database) -> list[Run]:
            params["seq"] = _task_seq(db, task_id)
            reopened = db.execute(
                "UPDATE tasks SET aborted = NULL, closed = 0 WHERE seq = :seq "
                "AND (aborted IS NOT NULL OR closed)", params).rowcount
            db.execute("UPDATE task_counts SET aborted = 0 WHERE task_seq = :seq", params)
            runs = _update_runs(
                db, task_id,
                "state = 'pending', available_at = :now, started_at = NULL, "
                "expires_at = NULL, finished_at = NULL, exit_code = NULL, output = '', "
                "output_truncated = 0, error = NULL, recovered = 0",
                "state IN (SELECT value FROM json_each(:states))", params,
            )
            if runs or reopened:
                emit(params["now"], ev.RUNS_RETRIED, task_id, None,
                      ev.retried_data(runs, wanted))
            return runs

        return await self._write(op)

    async def attempts(self, task_id: str) -> Mapping[str, Sequence[Attempt]]:
        def op(db: sqlite_utils.Database) -> dict[str, list[Attempt]]:
            out: dict[str, list[Attempt]] = {}
            rows = db.execute(q.ATTEMPTS_SQL, {"seq": _task_seq(db, task_id)}).fetchall()
            for row in rows:
                out.setdefault(row[0], []).append(q.attempt(row[1:]))
            return out

        return await self._read(op)

    async def open_continuous(self, now: datetime) -> Sequence[Task]:
        params = {"now": ts(now)}

        def op(db: sqlite_utils.Database) -> list[Task]:
            return [q.task(row) for row in db.execute(q.OPEN_CONTINUOUS_SQL, params)]

        return await self._read(op)

    async def rollout_tasks(self) -> Sequence[Task]:
        def op(db: sqlite_utils.Database) -> list[Task]:
            return [q.task(row) for row in db.execute(q.ROLLOUT_TASKS_SQL)]

        return await self._read(op)

    async def recent_starts(self, since: datetime) -> Sequence[tuple[str, datetime]]:
        params = {"since": ts(since)}

        def op(db: sqlite_utils.Database) -> list[tuple[str, datetime]]:
            rows = db.execute(q.RECENT_STARTS_SQL, params).fetchall()
            return [(task_id, dt(started)) for task_id, started in rows]

        return await self._read(op)

    async def expire_due(self, now: datetime) -> int:
        params = {"now": ts(now)}

        def op(db: sqlite_utils.Database) -> int:
            rows = db.execute(q.EXPIRE_SQL, params).fetchall()
            rows.sort()  # (task seq, position, task id, node id): submission, target order
            by_task: dict[str, list[str]] = {}
            for _, _, task_id, node_id in rows:
                by_task.setdefault(task_id, []).append(node_id)
            for task_id, nodes in by_task.items():
                emit(params["now"], ev.RUNS_EXPIRED, task_id, None, ev.nodes_data(nodes))
            return len(rows)

        return await self._write(op)

    async def dispatched(self) -> Sequence[Run]:
        def op(db: sqlite_utils.Database) -> list[Run]:
            return [q.run(r[0], r[1], r[2:]) for r in db.execute(q.DISPATCHED_SQL).fetchall()]

        return await self._read(op)

    async def next_wakeup(self, now: datetime) -> datetime | None:
        params = {"now": ts(now)}

        def op(db: sqlite_utils.Database) -> datetime | None:
            return dto(db.execute(q.NEXT_WAKEUP_SQL, params).fetchone()[0])

        return await self._read(op)

    async def counts(self) -> Mapping[RunState, int]:
        def op(db: sqlite_utils.Database) -> dict[RunState, int]:
            rows = db.execute("SELECT state, n FROM run_counts WHERE n > 0").fetchall()
            return {RunState(state): n for state, n in rows}

        return await self._read(op)

    # ---------------------------------------------------------------- the event log

    async def events_after(self, after: int, limit: int = 1000) -> Sequence[ev.Event]:
        params = (max(after, -1), max(limit, 0))

        def op(db: sqlite_utils.Database) -> list[ev.Event]:
            rows = db.conn.execute(
                "SELECT id, at, kind, task_id, node_id, data FROM events WHERE id > ? "
                "ORDER BY id LIMIT ?", params).fetchall()
            return [_event(row) for row in rows]

        # after the COMMIT of the batch it shares (see _worker): committed events only
        return await self._call(op, "committed")

    async def last_event_id(self) -> int:
        return await self._call(
            lambda db: db.conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0],
            "committed")

    async def prune_events(self, before: datetime) -> int:
        cutoff = ts(before)

        def step(db: sqlite_utils.Database) -> tuple[int, bool]:
            # from the oldest up, in steps of _PRUNE_STEP: the thread is never held long
            rows = db.conn.execute("SELECT id, at FROM events ORDER BY id LIMIT ?",
                                   (_PRUNE_STEP,)).fetchall()
            last = None
            for event_id, at in rows:
                if at >= cutoff:
                    break
                last = event_id
            if last is None:
                return 0, False
            gone = db.conn.execute("DELETE FROM events WHERE id <= ?", (last,)).rowcount
            return gone, last == rows[-1][0] and len(rows) == _PRUNE_STEP

        total = 0
        more = True
        while more:
            gone, more = await self._write(step)
            total += gone
        return total

    # ---------------------------------------------------------------- tokens

    async def add_token(self, token: Token) -> None:
        row = (
            token.name,
            token.secret_hash,
            token.scope.value,
            ts(token.created_at),
            tso(token.last_used),
            int(token.builtin),
        )

        def op(db: sqlite_utils.Database) -> None:
            try:
                db.execute(f"INSERT INTO tokens({q.TOKEN_COLS}) VALUES (?,?,?,?,?,?)", row)
            except sqlite3.IntegrityError as exc:
                if "tokens.name" in str(exc):
                    raise Conflict(f"a token named {token.name!r} exists") from exc
                raise Conflict("a token with this secret exists") from exc

        await self._write(op)

    async def token_by_hash(self, secret_hash: str) -> Token | None:
        def op(db: sqlite_utils.Database) -> Token | None:
            row = db.execute(
                f"SELECT {q.TOKEN_COLS} FROM tokens WHERE secret_hash = ?", (secret_hash,)
            ).fetchone()
            return None if row is None else q.token(row)

        return await self._read(op)

    async def list_tokens(self) -> Sequence[Token]:
        def op(db: sqlite_utils.Database) -> list[Token]:
            rows = db.execute(f"SELECT {q.TOKEN_COLS} FROM tokens ORDER BY created_at, id")
            return [q.token(row) for row in rows.fetchall()]

        return await self._read(op)

    async def delete_token(self, name: str) -> None:
        def op(db: sqlite_utils.Database) -> None:
            if db.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no token named {name!r}")

        await self._write(op)

    async def touch_token(self, name: str, now: datetime) -> None:
        params = (ts(now), name)
        await self._write(
            lambda db: db.execute("UPDATE tokens SET last_used = ? WHERE name = ?", params)
        )


    # ---------------------------------------------------------------- audit log

    async def record_audit(self, entry: AuditEntry) -> None:
        row = _audit_row(entry)
        # a write job like any other: it joins the batch (one commit) of the writes
        # queued with it
        await self._write(lambda db: db.execute(_AUDIT_INSERT, row))

    async def query_audit(self, query: AuditQuery) -> AuditPage:
        sql, params = audit_sql(query, "?", ts)

        def op(db: sqlite_utils.Database) -> AuditPage:
            rows = db.execute(sql, params).fetchall()
            items = [_audit_entry(r) for r in rows[:query.limit]]
            more = len(rows) > query.limit and items
            return AuditPage(items, str(items[-1].id) if more else None)

        return await self._read(op)

    async def prune_audit(self, before: datetime) -> int:
        cutoff = ts(before)
        return await self._write(
            lambda db: db.execute("DELETE FROM audit WHERE at < ?", (cutoff,)).rowcount)


    # ---------------------------------------------------------------- webhook outbox

    async def webhook_cursor(self, webhook: str, start: int) -> int:
        def op(db: sqlite_utils.Database) -> int:
            db.execute("INSERT OR IGNORE INTO webhook_cursors(webhook, event_id) "
                       "VALUES (?, ?)", (webhook, start))
            row = db.execute("SELECT event_id FROM webhook_cursors WHERE webhook = ?",
                             (webhook,)).fetchone()
            return cast(int, row[0])

        return await self._write(op)

    async def webhook_cursors(self) -> Mapping[str, int]:
        def op(db: sqlite_utils.Database) -> dict[str, int]:
            rows = db.execute("SELECT webhook, event_id FROM webhook_cursors").fetchall()
            return {webhook: event_id for webhook, event_id in rows}

        return await self._read(op)

    async def enqueue_deliveries(self, webhook: str, after: int, upto: int,
                                 deliveries: Sequence[NewDelivery], now: datetime) -> bool:
        stamp = ts(now)
        rows = [(webhook, d.event_id, d.kind, d.msg_id, storable(d.body), stamp, stamp,
                 stamp) for d in deliveries]

        def op(db: sqlite_utils.Database) -> bool:
            moved = db.execute(
                "UPDATE webhook_cursors SET event_id = ? WHERE webhook = ? AND event_id = ?",
                (upto, webhook, after)).rowcount
            if not moved:
                return False
            db.conn.executemany(
                "INSERT INTO webhook_deliveries(webhook, event_id, kind, msg_id, body, "
                "status, created_at, started_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?) "
                "ON CONFLICT (webhook, event_id) DO NOTHING", rows)
            return True

        return await self._write(op)

    async def claim_deliveries(self, webhook: str, now: datetime, lease_until: datetime,
                               limit: int) -> Sequence[WebhookDelivery]:
        if limit <= 0:
            return []
        params = {"webhook": webhook, "now": ts(now), "lease": ts(lease_until),
                  "limit": limit}
        due = (f"SELECT id FROM webhook_deliveries WHERE {_DUE} "
               "ORDER BY next_attempt_at, id LIMIT :limit")

        def look(db: sqlite_utils.Database) -> bool:
            return db.execute(due, params).fetchone() is not None

        # most looks find nothing due: a read, not a write transaction
        if not await self._read(look):
            return []

        def op(db: sqlite_utils.Database) -> list[WebhookDelivery]:
            rows = db.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, "
                "lease_until = :lease, last_attempt_at = :now "
                f"WHERE id IN ({due}) RETURNING {DELIVERY_COLS}", params).fetchall()
            return sorted((_delivery(r) for r in rows),
                          key=lambda d: (d.next_attempt_at, d.id))

        return await self._write(op)

    async def finish_delivery(self, delivery_id: int, attempt: int, now: datetime, *,
                              status: DeliveryStatus, next_attempt_at: datetime | None,
                              http_status: int | None, error: str | None) -> bool:
        status = DeliveryStatus(status)
        done = status is not DeliveryStatus.PENDING
        if not done and next_attempt_at is None:
            raise ValidationError("next_attempt_at", "is required to stay pending")
        params = {
            "id": delivery_id, "attempt": attempt, "status": status.value,
            "next": None if done else tso(next_attempt_at),
            "finished": ts(now) if done else None,
            "http_status": http_status, "error": clip_error(error),
            "delivered": int(status is DeliveryStatus.DELIVERED),
        }
        return bool(await self._write(lambda db: db.execute(
            "UPDATE webhook_deliveries SET status = :status, next_attempt_at = :next, "
            "lease_until = NULL, finished_at = :finished, last_status = :http_status, "
            "last_error = :error WHERE id = :id AND status = 'pending' "
            "AND (attempts = :attempt OR :delivered)", params).rowcount))

    async def query_deliveries(self, query: DeliveryQuery) -> DeliveryPage:
        sql, params = deliveries_sql(query, "?")

        def op(db: sqlite_utils.Database) -> DeliveryPage:
            rows = db.execute(sql, params).fetchall()
            items = [_delivery(r) for r in rows[:query.limit]]
            more = len(rows) > query.limit and items
            return DeliveryPage(items, str(items[-1].id) if more else None)

        return await self._read(op)

    async def retry_delivery(self, delivery_id: int, now: datetime) -> WebhookDelivery:
        params = {"id": delivery_id, "now": ts(now)}

        def op(db: sqlite_utils.Database) -> WebhookDelivery:
            row = db.execute(
                "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, "
                "started_at = :now, next_attempt_at = :now, lease_until = NULL, "
                "finished_at = NULL WHERE id = :id AND status = 'failed' "
                f"RETURNING {DELIVERY_COLS}", params).fetchone()
            if row is not None:
                return _delivery(row)
            found = db.execute("SELECT status FROM webhook_deliveries WHERE id = ?",
                               (delivery_id,)).fetchone()
            if found is None:
                raise NotFound(f"no delivery {delivery_id}")
            raise IllegalTransition(f"delivery {delivery_id} is {found[0]}, not failed")

        return await self._write(op)

    async def prune_deliveries(self, delivered_before: datetime,
                               failed_before: datetime) -> int:
        params = {"delivered": ts(delivered_before), "failed": ts(failed_before)}
        return await self._write(lambda db: db.execute(
            "DELETE FROM webhook_deliveries WHERE status != 'pending' AND ("
            "(status = 'delivered' AND finished_at < :delivered) OR "
            "(status = 'failed' AND finished_at < :failed))", params).rowcount)

    async def delivery_counts(self) -> Mapping[str, Mapping[DeliveryStatus, int]]:
        def op(db: sqlite_utils.Database) -> dict[str, dict[DeliveryStatus, int]]:
            out: dict[str, dict[DeliveryStatus, int]] = {}
            for webhook, status, n in db.execute(
                    "SELECT webhook, status, count(*) FROM webhook_deliveries "
                    "GROUP BY webhook, status"):
                out.setdefault(webhook, {})[DeliveryStatus(status)] = n
            return out

        return await self._read(op)


# --------------------------------------------------------------------------- on the thread

#: events prune_events deletes per job
_PRUNE_STEP: Final = 10_000




def _event(row: Sequence[Any]) -> ev.Event:
    return ev.Event(id=row[0], at=dt(row[1]), kind=row[2], task_id=row[3], node_id=row[4],
                    data=json.loads(row[5]))



def _add_tasks(db: sqlite_utils.Database, rows: list[tuple[Any, ...]]) -> None:
    """Insert tasks, their pending runs and counts: ``rows`` are
    :func:`._queries.task_row` tuples. The one way tasks are added.

    One statement however many tasks (an insert of their JSON document into the
    ``add_tasks`` view, whose trigger does the work): atomic (a failure undoes all of
    it), and one crossing into SQLite: every crossing releases the GIL and has to win it
    back from the busy event loop. A duplicate id raises Conflict (one task) or
    IntegrityError (several: the worker then adds them one by one)."""
    try:
        db.conn.execute(q.ADD_TASKS_SQL, (JSON.encode(rows),))
    except sqlite3.IntegrityError as exc:
        if len(rows) == 1 and "tasks.id" in str(exc):
            raise Conflict(f"task {rows[0][0]} exists") from exc
        raise


def _add_audited(
    db: sqlite_utils.Database, items: list[tuple[tuple[Any, ...], tuple[Any, ...] | None]]
) -> None:
    """:func:`_add_tasks` of tasks given with their audit entries (or None), the entries
    in the same transaction: all or nothing (a duplicate id adds neither). Outside a
    transaction (a batch of adds only, see ``_worker``) the savepoint is that
    transaction."""
    rows = [row for row, _ in items]
    entries = [entry for _, entry in items if entry is not None]
    if not entries:
        _add_tasks(db, rows)  # one statement: atomic by itself
        return
    db.execute("SAVEPOINT audited")
    try:
        _add_tasks(db, rows)
        db.conn.executemany(_AUDIT_INSERT, entries)
    except BaseException:
        if db.conn.in_transaction:  # (unless SQLite rolled it all back itself)
            db.execute("ROLLBACK TO audited")
            db.execute("RELEASE audited")
        raise
    db.execute("RELEASE audited")


_AUDIT_INSERT: Final = ("INSERT INTO audit(at, token, address, method, route, task_id, "
                        "status, counts) VALUES (?,?,?,?,?,?,?,?)")


def _audit_row(entry: AuditEntry) -> tuple[Any, ...]:
    return (ts(entry.at), entry.token, entry.address, entry.method, entry.route,
            entry.task_id, entry.status, json.dumps(dict(entry.counts)))


def _bulk_load(
    db: sqlite_utils.Database, tasks: Iterable[Task], queued: int, chunk_runs: int
) -> int:
    """The body of :meth:`SQLiteStore.bulk_add_tasks`: :func:`_add_tasks` in chunks.

    Into an empty store: one transaction, the secondary indexes dropped first and built
    again at the end (sorting once is cheaper than 1M random inserts). Foreign key
    checks are off: the trigger takes every key from the row it refers to, and the
    checks cost a third of the runs' insert."""
    empty = db.execute("SELECT NOT EXISTS (SELECT 1 FROM runs)").fetchone()[0]
    added = 0
    db.execute("PRAGMA foreign_keys = OFF")  # no-op inside a transaction: set it first
    try:
        with _immediate(db) if empty else contextlib.nullcontext():
            indexes = _drop_indexes(db) if empty else []
            for rows, runs in _chunks(tasks, queued, chunk_runs):
                _add_tasks(db, rows)  # outside a transaction, one chunk is one transaction
                added += runs
            for sql in indexes:
                db.execute(sql)
    finally:
        db.execute("PRAGMA foreign_keys = ON")
    return added


def _chunks(
    tasks: Iterable[Task], queued: int, runs: int
) -> Iterator[tuple[list[tuple[Any, ...]], int]]:
    """The rows of ``tasks`` in lists of about ``runs`` runs, each with its run count."""
    chunk: list[tuple[Any, ...]] = []
    size = 0
    for task in tasks:
        chunk.append(q.task_row(task, queued))
        size += len(task.targets)
        if size >= runs:
            yield chunk, size
            chunk, size = [], 0
    if chunk:
        yield chunk, size


def _drop_indexes(db: sqlite_utils.Database) -> list[str]:
    """Drop the secondary indexes of runs and tasks; return their CREATE statements.
    (Raw SQL: sqlite-utils' ``Table.indexes`` does not give the text of partial ones.)"""
    indexes = db.execute(
        "SELECT name, sql FROM sqlite_schema WHERE type = 'index' "
        "AND tbl_name IN ('runs', 'tasks') AND sql IS NOT NULL"
    ).fetchall()
    for name, _ in indexes:
        db.execute(f'DROP INDEX "{name}"')
    return [sql for _, sql in indexes]


@contextlib.contextmanager
def _immediate(db: sqlite_utils.Database) -> Iterator[None]:
    """A write transaction: committed at the end of the block, rolled back on error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.rollback()
        raise
    db.execute("COMMIT")


def _update_runs(
    db: sqlite_utils.Database, task_id: str, sets: str, where: str, params: dict[str, Any]
) -> list[Run]:
    """``UPDATE runs SET sets`` for the task's runs (``:seq``) matching ``where``; the
    runs changed, in target order."""
    rows = db.execute(
        f"UPDATE runs SET {sets} WHERE task_seq = :seq AND {where} "
        f"RETURNING position, (SELECT node_id FROM nodes WHERE nid = node), {q.RUN_COLS}",
        params,
    ).fetchall()
    rows.sort(key=lambda row: cast(int, row[0]))
    return [q.run(task_id, row[1], row[2:]) for row in rows]


def _summary(db: sqlite_utils.Database, task_id: str) -> TaskSummary:
    row = db.execute(f"{q.SUMMARY_SELECT} WHERE t.id = ?", (task_id,)).fetchone()
    if row is None:
        raise NotFound(f"no task {task_id}")
    return q.summary(row)


def _task_seq(db: sqlite_utils.Database, task_id: str) -> int:
    row = db.execute(
        f"SELECT seq FROM tasks WHERE id = ? AND seq NOT IN {q.STAGED}", (task_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"no task {task_id}")
    return cast(int, row[0])


def _key_params(key: RunKey) -> dict[str, Any]:
    return {"task_id": key.task_id, "node_id": key.node_id}


def _run_exists(db: sqlite_utils.Database, key: RunKey) -> bool:
    row = db.execute(f"SELECT 1 FROM runs WHERE {q.KEY_WHERE}", _key_params(key)).fetchone()
    return row is not None


def _update_dispatched(
    db: sqlite_utils.Database, key: RunKey, assignments: str, params: dict[str, Any]
) -> Run:
    """Apply ``assignments`` to the run ``key`` if it is dispatched, else raise.

    Output and error texts that UTF-8 cannot encode are stored with U+FFFD in place of
    their lone surrogates, rather than losing the outcome.
    """
    sql = (
        f"UPDATE runs SET {assignments} WHERE {q.KEY_WHERE} AND state = 'dispatched' "
        f"RETURNING {q.RUN_COLS}"
    )
    try:
        rows = db.execute(sql, {**params, **_key_params(key)}).fetchall()
    except UnicodeEncodeError:  # raised while binding: nothing was executed
        clean = {name: storable(value) for name, value in params.items()}
        rows = db.execute(sql, {**clean, **_key_params(key)}).fetchall()
    if not rows:
        if not _run_exists(db, key):
            raise NotFound(f"no run {key}")
        raise IllegalTransition(f"run {key} is not dispatched")
    return q.run(key.task_id, key.node_id, rows[0])


def _audit_entry(row: Sequence[Any]) -> AuditEntry:
    return AuditEntry(id=row[0], at=dt(row[1]), token=row[2], address=row[3], method=row[4],
                      route=row[5], task_id=row[6], status=row[7], counts=json.loads(row[8]))


#: a delivery that may be claimed now (parameters :webhook and :now)
_DUE: Final = ("webhook = :webhook AND status = 'pending' AND next_attempt_at <= :now "
               "AND (lease_until IS NULL OR lease_until <= :now)")


def _delivery(row: Sequence[Any]) -> WebhookDelivery:
    return WebhookDelivery(
        id=row[0], webhook=row[1], event_id=row[2], kind=row[3], msg_id=row[4], body=row[5],
        status=row[6], attempts=row[7], created_at=dt(row[8]), started_at=dt(row[9]),
        next_attempt_at=dto(row[10]), lease_until=dto(row[11]), last_attempt_at=dto(row[12]),
        last_status=row[13], last_error=row[14], finished_at=dto(row[15]))

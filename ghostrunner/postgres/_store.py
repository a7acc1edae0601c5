"""``PostgresStore``: the store's verbs, each one transaction on a pooled connection."""

# ruff: noqa: S608
# (SQL is assembled only from the constants of ._queries and enum-derived identifiers;
# every value is a bound parameter.)

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import secrets
import weakref
from collections import OrderedDict
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Hashable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final, Protocol, TypeVar

import attrs
import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .. import events as ev
from .._planner import RATE_WINDOW, rollout_budget
from .._sqlkit import DELIVERY_COLS, audit_sql, deliveries_sql, json_text
from .._types import (
    TERMINAL_STATES,
    TRANSITIONS,
    Attempt,
    Outcome,
    Page,
    Rollout,
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
from ..errors import (
    Conflict,
    GhostRunnerError,
    IllegalTransition,
    NotFound,
    NotOwner,
    StoreError,
    ValidationError,
)
from ..runners import (
    Adoption,
    LeaseState,
    Renewal,
    RunnerInfo,
    RunnerStatus,
    Signal,
)
from ..tokens import Token
from ..webhooks import (
    DeliveryPage,
    DeliveryQuery,
    DeliveryStatus,
    NewDelivery,
    WebhookDelivery,
    clip_error,
)
from . import _queries as q
from ._import import ImportReport, TaskRecord, import_into
from ._schema import EVENTS_LOCK, SCHEMA_VERSION, migrate

_T = TypeVar("_T")
log = logging.getLogger("ghostrunner.postgres")

Conn = psycopg.AsyncConnection[tuple[Any, ...]]

#: The terminal states a dispatched run may move to (what finish() accepts).
_FINISHED_STATES: Final = TRANSITIONS[RunState.DISPATCHED] & TERMINAL_STATES
#: A transaction that lost a race (a deadlock, a serialization failure, a device's
#: dispatched run committed by another process meanwhile) is run again, this often.
_TRIES: Final = 5
#: Tasks claim_many keeps (see PostgresStore._tasks).
_TASK_CACHE: Final = 1024
#: Tasks whose having rollout limits claim_many remembers (see _within_limits).
_LIMITED_CACHE: Final = 100_000
#: Seconds after a commit that wrote events before this process's sequencer pass moves
#: them from the inbox (a reader of the log runs a pass first: this only keeps the inbox
#: short when nobody reads; the commits meanwhile share the pass).
_DRAIN_DELAY: Final = 0.2
#: Whether the current transaction wrote events (set by _emit, read by _tx).
_EMITTED: contextvars.ContextVar[bool] = contextvars.ContextVar("_EMITTED", default=False)
#: Seconds the pool keeps one chain of reconnection attempts going (see open()).
_RECONNECT_CHAIN: Final = 2.0


def redact(dsn: str) -> str:
    """``dsn`` without its password (for reprs, logs and errors)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable DSN>"
    if "password" in params:
        params["password"] = "***"  # noqa: S105
    return make_conninfo("", **params)


class PostgresStore:
    """A :class:`~ghostrunner.Store` (and an HTTP ``TokenStore``) in PostgreSQL.

    psycopg 3, asynchronous, through a connection pool: every verb is one transaction
    on a connection of the pool, so several verbs run at once (no single writer), and
    several processes may share the database (see :mod:`ghostrunner.postgres`).

    Args:
        dsn: a libpq connection string or URI (``postgresql://user:pw@host/db``).
            Its password never appears in reprs, logs or errors.
        min_size: connections the pool keeps open.
        max_size: connections the pool may open under load.
        timeout: seconds a verb waits for a pooled connection before ``StoreError``.
        connect_timeout: seconds :meth:`open` waits for the first connections.
        listen_check: seconds between checks that the connection listening for other
            runners' signals still works (see :meth:`signals`).
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 30.0,
        connect_timeout: float = 30.0,
        listen_check: float = 5.0,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError("need 0 <= min_size <= max_size and max_size >= 1")
        self._dsn = dsn
        self.dsn = redact(dsn)
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.listen_check = listen_check
        self._pool: AsyncConnectionPool[Conn] | None = None
        # signals: this store's tag (its own NOTIFYs are not for it), and how many other
        # runners were alive at the last renewal (None: not known, so notify)
        self._tag = secrets.token_hex(6)
        self._peers: int | None = None
        self._limited: OrderedDict[str, bool] = OrderedDict()  # task id -> has limits
        # Task values by seq, for claim_many: a task's row never changes, and a seq is
        # never reused, so they never go stale (a task of 10,000 targets takes ~10 ms
        # to read and build)
        self._tasks: OrderedDict[int, Task] = OrderedDict()
        # the event log's sequencer (see _sequenced): passes started, one at a time
        self._passes = 0
        self._pass_lock = asyncio.Lock()
        self._drain: asyncio.Task[None] | None = None
        # finish's group commit (see _finish_queued)
        self._finishing: list[_Finishing] = []
        self._finisher: asyncio.Task[None] | None = None
        self.finish_statements = 0  # statements that finished runs (for benchmarks)
        # add_task's group commit (see _add_queued)
        self._adding: list[_Adding] = []
        self._adder: asyncio.Task[None] | None = None
        # the audit log's group commit (see _audit_queued)
        self._auditing: list[_Auditing] = []
        self._auditor: asyncio.Task[None] | None = None

    def _remember(self, seq: int, task: Task) -> Task:
        self._tasks[seq] = task
        while len(self._tasks) > _TASK_CACHE:
            self._tasks.popitem(last=False)
        return task

    def __repr__(self) -> str:
        return f"PostgresStore({self.dsn!r})"

    # ---------------------------------------------------------------- plumbing

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self._dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            timeout=self.timeout,
            open=False,
            configure=_configure,
            kwargs={"autocommit": True},
            name="ghostrunner",
            # while the server is away, give up a chain of reconnection attempts soon
            # (its delays double: 1, 2, 4 s...): the next request starts a new chain at
            # once, so the pool is back within a second or so of the server
            reconnect_timeout=_RECONNECT_CHAIN,
        )
        try:
            await pool.open(wait=True, timeout=self.connect_timeout)
            async with pool.connection() as conn:
                found = await migrate(conn)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, GhostRunnerError | psycopg.Error | PoolTimeout):
                raise _translate(exc, self.dsn) from None
            raise
        if found < SCHEMA_VERSION:
            log.info("schema of %s migrated from version %d to %d", self.dsn, found,
                     SCHEMA_VERSION)
        self._pool = pool

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        workers = [t for t in (self._finisher, self._auditor, self._adder, self._drain)
                   if t is not None and not t.done() and t.get_loop() is loop]
        # the group commits first send what they hold (its callers are waiting for it)
        held = [t for t in workers if t is not self._drain]
        if held:
            await asyncio.wait(held, timeout=self.timeout)
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._finisher = self._auditor = self._adder = self._drain = None
        closed = StoreError("the store is closed")
        _fail([*self._finishing, *self._auditing, *self._adding], closed)
        self._finishing, self._auditing, self._adding = [], [], []
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _tx(self, fn: Callable[[Conn], Awaitable[_T]], *, atomic: bool = True) -> _T:
        """``fn(conn)`` in one transaction, the backend's errors turned into
        GhostRunner's; run again if it lost a race with another transaction.
        ``atomic=False``: ``fn`` makes its own transactions (the pool's connections are
        in autocommit: a verb of one statement is one round trip, no BEGIN, no COMMIT)."""
        pool = self._pool
        if pool is None:
            raise StoreError("the store is not open")
        for attempt in range(_TRIES):
            try:
                _EMITTED.set(False)
                async with pool.connection() as conn:
                    try:
                        if atomic:
                            async with conn.transaction():
                                result = await fn(conn)
                        else:
                            result = await fn(conn)
                    except BaseException:
                        # a SET of the plan mode in a transaction rolled back is undone
                        _GENERIC.pop(conn, None)
                        raise
                if _EMITTED.get():
                    self._drain_soon()
                return result
            except (
                psycopg.errors.DeadlockDetected,
                psycopg.errors.SerializationFailure,
                _Retry,
            ) as exc:
                if attempt == _TRIES - 1:
                    raise _translate(exc, self.dsn) from exc
                log.debug("transaction retried after %s", type(exc).__name__)
            except GhostRunnerError:
                raise
            except (psycopg.Error, PoolTimeout, UnicodeError, OverflowError) as exc:
                raise _translate(exc, self.dsn) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # ---------------------------------------------------------------- tasks

    async def add_task(
        self, task: Task, now: datetime, *, nodes: Sequence[str] | None = None,
        audit: AuditEntry | None = None,
    ) -> None:
        item = _Adding(task=task, row=q.task_json(task, now, nodes),
                       audit=None if audit is None else _audit_row(audit),
                       future=asyncio.get_running_loop().create_future())
        if item.row["n"] > _ADD_ALONE:  # a large task: a statement of its own
            await self._add_alone(item)
            return
        self._adding.append(item)
        if _idle(self._adder):
            self._adder = asyncio.get_running_loop().create_task(self._add_queued())
        await item.future

    async def _add_alone(self, item: _Adding) -> None:
        """``item`` in a statement of its own (a group of one)."""
        added = await self._tx(functools.partial(self._add_many, batch=[item]), atomic=False)
        if item.task.id not in added:
            raise Conflict(f"task {item.task.id} exists")

    async def _add_queued(self) -> None:
        """Group commit of ``add_task``: the tasks submitted while a statement ran go in
        the next one (each id once per statement), in submission order. If that
        statement fails, each of its tasks is added alone: one task's error is its own."""
        while self._adding:
            batch, self._adding = _take_group(self._adding, lambda a: a.task.id, _ADD_BATCH)
            if not batch:
                continue
            try:
                added = await self._tx(functools.partial(self._add_many, batch=batch),
                                       atomic=False)
            except asyncio.CancelledError as exc:
                _fail(batch, exc)
                raise
            except Exception as exc:  # each caller gets its own answer
                if len(batch) == 1:
                    _fail(batch, exc)
                    continue
                await asyncio.gather(*(self._settle_alone(item) for item in batch))
                continue
            for item in batch:
                if not item.future.done():
                    if item.task.id in added:
                        item.future.set_result(None)
                    else:
                        item.future.set_exception(Conflict(f"task {item.task.id} exists"))

    async def _settle_alone(self, item: _Adding) -> None:
        try:
            await self._add_alone(item)
        except Exception as exc:  # handed to its caller
            if not item.future.done():
                item.future.set_exception(exc)
        else:
            if not item.future.done():
                item.future.set_result(None)

    async def _add_many(self, conn: Conn, *, batch: Sequence[_Adding]) -> set[str]:
        nodes = [n for item in batch for n in item.row["nodes"]]
        tasks = [{**item.row, "ord": i, "audit": item.audit} for i, item in enumerate(batch)]
        params = {
            "batch": json_text(tasks),
            "channel": q.CHANNEL, "payload": _payload(self._tag, "runs", nodes),
            "notify": bool(nodes) and self._peers != 0,
        }
        # (no _plan: one JSON parameter plans alike whatever the group's size)
        rows = await (await conn.execute(q.ADD_TASKS_SQL, params)).fetchall()
        if rows:
            _EMITTED.set(True)
        return {row[0] for row in rows}

    async def get_task(self, task_id: str) -> TaskSummary:
        return await self._tx(lambda conn: _summary(conn, task_id))

    async def get_runs(self, task_id: str) -> Sequence[Run]:
        async def op(conn: Conn) -> list[Run]:
            seq = await _task_seq(conn, task_id, lock=False)
            cur = await conn.execute(
                f"SELECT node, {q.RUN_COLS} FROM runs WHERE task_seq = %s ORDER BY position",
                (seq,),
            )
            return [q.run(task_id, row[0], row[1:]) for row in await cur.fetchall()]

        return await self._tx(op)

    async def list_tasks(self, query: TaskQuery) -> Page:
        sql, params = q.list_sql(query)

        async def op(conn: Conn) -> Page:
            rows = await (await conn.execute(sql, params)).fetchall()
            more = len(rows) > query.limit
            rows = rows[: query.limit]
            items = tuple(q.summary(row) for row in rows)
            return Page(items=items, next_cursor=str(rows[-1][0]) if more else None)

        return await self._tx(op)

    async def delete_task(self, task_id: str) -> None:
        async def op(conn: Conn) -> None:
            seq = await _task_seq(conn, task_id, lock=True)
            cur = await conn.execute(
                "SELECT pending + dispatched FROM task_counts WHERE task_seq = %s", (seq,)
            )
            active = await cur.fetchone()
            if active is not None and active[0]:
                raise IllegalTransition(f"task {task_id} still has active runs")
            await conn.execute("DELETE FROM attempts WHERE task_seq = %s", (seq,))
            gone = (await conn.execute("DELETE FROM runs WHERE task_seq = %s", (seq,))).rowcount
            await conn.execute("DELETE FROM task_counts WHERE task_seq = %s", (seq,))
            await conn.execute("DELETE FROM tasks WHERE seq = %s", (seq,))
            await _emit(conn, utcnow(), [(ev.TASK_DELETED, task_id, None, {"runs": gone})])

        await self._tx(op)

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
            "nodes": list(dict.fromkeys(node_ids)),
            "now": q.ts(now),
            "limit": limit,
            "skip": list(skip_tasks),
        }

        async def op(conn: Conn) -> list[Run]:
            await _plan(conn, len(node_ids))
            rows = await (await conn.execute(q.NEXT_PENDING_SQL, params)).fetchall()
            return [q.run(row[0], row[1], row[2:]) for row in rows]

        return await self._tx(op, atomic=False)

    async def claim_many(
        self, keys: Sequence[RunKey], now: datetime, *, runner: str | None = None
    ) -> Sequence[tuple[Run, Task]]:
        if not keys:
            return []
        stamp = q.ts(now)

        async def op(conn: Conn) -> list[tuple[Run, Task]]:
            await _plan(conn, len(keys))
            wanted = await _within_limits(conn, keys, stamp, self._limited)
            if len(wanted) < len(keys):  # held back by their limits: but do they exist?
                kept = {i for i, _ in wanted}
                dropped = [k for i, k in enumerate(keys) if i not in kept]
                cur = await conn.execute(q.MISSING_SQL, {
                    "task_ids": [k.task_id for k in dropped],
                    "node_ids": [k.node_id for k in dropped]})
                missing = await cur.fetchone()
                if missing is not None:
                    raise NotFound(f"no run {dropped[missing[0] - 1]}")
            # a device at most once per statement (the index allows it one dispatched
            # run): a later key of a device already named goes in a later round, which
            # finds the device busy if the earlier one was claimed
            rounds: list[list[tuple[int, RunKey]]] = []
            depth: dict[str, int] = {}
            for i, key in wanted:
                level = depth.get(key.node_id, 0)
                depth[key.node_id] = level + 1
                if level == len(rounds):
                    rounds.append([])
                rounds[level].append((i, key))
            claimed: list[tuple[int, int, Run]] = []
            for part in rounds:
                params = {
                    "task_ids": [k.task_id for _, k in part],
                    "node_ids": [k.node_id for _, k in part],
                    "now": stamp,
                    "runner": runner,
                }
                try:  # the run.claimed events are written by the same statement
                    rows = await (await conn.execute(q.CLAIM_SQL, params)).fetchall()
                except psycopg.errors.UniqueViolation as exc:
                    # another process dispatched to one of these devices meanwhile: the
                    # whole claim again, which now sees it
                    raise _Retry from exc
                claimed += [
                    (part[row[0] - 1][0], row[1], q.run(part[row[0] - 1][1].task_id, row[2],
                                                        row[3:]))
                    for row in rows
                ]
                if len(rows) < len(part):
                    cur = await conn.execute(q.MISSING_SQL, params)
                    missing = await cur.fetchone()
                    if missing is not None:
                        raise NotFound(f"no run {part[missing[0] - 1][1]}")
            if not claimed:
                return []
            tasks = {seq: self._tasks.get(seq) for _, seq, _ in claimed}
            unknown = [seq for seq, task in tasks.items() if task is None]
            if unknown:
                cur = await conn.execute(q.TASKS_BY_SEQ_SQL, {"seqs": unknown})
                for row in await cur.fetchall():
                    tasks[row[0]] = self._remember(row[0], q.task(row))
            claimed.sort(key=lambda c: c[0])
            _EMITTED.set(True)
            return [(run, _known(tasks[seq])) for _, seq, run in claimed]

        return await self._tx(op)

    async def finish(
        self,
        key: RunKey,
        state: RunState,
        now: datetime,
        *,
        outcome: Outcome | None = None,
        error: str | None = None,
        runner: str | None = None,
    ) -> Run:
        if state not in TERMINAL_STATES:
            raise IllegalTransition(f"finish needs a terminal state, not {state}")
        if state not in _FINISHED_STATES:  # e.g. cancelled: only a pending run can be

            async def refuse(conn: Conn) -> Run:
                await _must_exist(conn, key)
                raise IllegalTransition(f"run {key}: dispatched -> {state} is not allowed")

            return await self._tx(refuse)
        item = _Finishing(
            key=key, state=RunState(state).value, at=q.ts(now), error=q.text(error),
            clipped=ev.clip(error), outcome=outcome, runner=runner,
            finished=q.ts(now if outcome is None or outcome.finished_at is None
                          else outcome.finished_at),
            started=None if outcome is None else q.tso(outcome.started_at),
            future=asyncio.get_running_loop().create_future(),
        )
        self._finishing.append(item)
        if _idle(self._finisher):
            self._finisher = asyncio.get_running_loop().create_task(self._finish_queued())
        row = await item.future
        if row is None:  # not dispatched (by this runner): say why

            async def refuse(conn: Conn) -> Run:
                if runner is not None:
                    await _check_owner(conn, key, runner)
                await _must_exist(conn, key)
                raise IllegalTransition(f"run {key} is not dispatched")

            return await self._tx(refuse)
        return q.run(key.task_id, key.node_id, row)

    async def _finish_queued(self) -> None:
        """Group commit of ``finish``: the runs finished while a statement ran go in the
        next one (each key once per statement), until none is left."""
        while self._finishing:
            batch, self._finishing = _take_group(self._finishing, lambda f: f.key,
                                                 _FINISH_BATCH)
            if not batch:
                continue
            try:
                rows = await self._tx(functools.partial(self._finish_many, batch=batch),
                                      atomic=False)
            except BaseException as exc:
                _fail(batch, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for i, item in enumerate(batch, 1):
                if not item.future.done():
                    item.future.set_result(rows.get(i))

    async def _finish_many(
        self, conn: Conn, *, batch: Sequence[_Finishing]
    ) -> dict[int, Sequence[Any]]:
        nodes = [f.key.node_id for f in batch]
        outcomes = [f.outcome for f in batch]
        params = {
            "task_ids": [f.key.task_id for f in batch], "node_ids": nodes,
            "states": [f.state for f in batch], "ats": [f.at for f in batch],
            "finished": [f.finished for f in batch], "errors": [f.error for f in batch],
            "clipped": [f.clipped for f in batch],
            "has_outcome": [o is not None for o in outcomes],
            "exit_codes": [None if o is None else o.exit_code for o in outcomes],
            "outputs": [b"" if o is None else q.blob(o.output) for o in outcomes],
            "truncated": [o is not None and o.output_truncated for o in outcomes],
            "recovered": [o is not None and o.recovered for o in outcomes],
            "started": [f.started for f in batch], "owners": [f.runner for f in batch],
            "channel": q.CHANNEL, "payload": _payload(self._tag, "runs", nodes),
            "notify": self._peers != 0,
        }
        await _plan(conn, len(batch))
        rows = await (await conn.execute(q.FINISH_MANY_SQL, params)).fetchall()
        self.finish_statements += 1
        if rows:
            _EMITTED.set(True)
        return {row[0]: row[1:-1] for row in rows}

    async def release(
        self,
        key: RunKey,
        now: datetime,
        *,
        available_at: datetime,
        error: str,
        delivered: bool,
        runner: str | None = None,
    ) -> Run:
        assignments = (
            "state = 'pending', available_at = %(available)s, error = %(error)s, "
            "started_at = NULL"
        )
        if not delivered:
            assignments += ", attempts = attempts - 1, undelivered = undelivered + 1"
        params = {"available": q.ts(available_at), "error": q.text(error)}
        stamp = q.ts(now)
        lost = {**_key_params(key), "state": RunState.LOST.value, "finished": stamp,
                "error": q.text(error), "when": RunState.DISPATCHED.value}

        async def op(conn: Conn) -> Run:
            if runner is not None:
                await _check_owner(conn, key, runner)
            if delivered:  # the attempt sent again goes to the history first
                await conn.execute(q.RECORD_ATTEMPT_SQL, lost)
            run = await _update_dispatched(conn, key, assignments, params, runner)
            # a run of a task aborted while it was out goes no further
            cur = await conn.execute(
                "UPDATE runs AS r SET state = 'cancelled', finished_at = %(now)s, "
                "error = t.aborted FROM tasks AS t "
                "WHERE t.id = %(task_id)s AND r.task_seq = t.seq AND r.node = %(node_id)s "
                f"AND r.state = 'pending' AND t.aborted IS NOT NULL RETURNING {q.R_RUN_COLS}",
                {**_key_params(key), "now": stamp},
            )
            row = await cur.fetchone()
            if row is None:
                await self._notify(conn, "runs", [key.node_id], if_pending=True)
            else:
                run = q.run(key.task_id, key.node_id, row)
            await _emit(conn, stamp, [(ev.RUN_RELEASED, key.task_id, key.node_id,
                                       ev.released_data(run, delivered))])
            return run

        return await self._tx(op)

    async def cancel(
        self, task_id: str, node_ids: Collection[str] | None = None, *, now: datetime
    ) -> Sequence[Run]:
        params: dict[str, Any] = {"now": q.ts(now)}
        only = ""
        if node_ids is not None:
            params["nodes"] = list(dict.fromkeys(node_ids))
            only = " AND node = ANY(%(nodes)s::text[])"

        async def op(conn: Conn) -> list[Run]:
            params["seq"] = await _task_seq(conn, task_id, lock=True)
            closed = 0
            if node_ids is None:  # the whole task: a continuous one takes no more runs
                closed = (await conn.execute(
                    "UPDATE tasks SET closed = true WHERE seq = %(seq)s AND NOT closed", params
                )).rowcount
            runs = await _update_runs(
                conn, task_id, "state = 'cancelled', finished_at = %(now)s",
                f"state = 'pending'{only}", params,
            )
            if runs or closed:
                await _emit(conn, now, [(
                    ev.RUNS_CANCELLED, task_id, None,
                    ev.nodes_data([r.node_id for r in runs], closed=node_ids is None))])
            return runs

        return await self._tx(op)

    async def add_runs(
        self, task_id: str, node_ids: Sequence[str], now: datetime
    ) -> Sequence[Run]:
        params: dict[str, Any] = {"nodes": list(dict.fromkeys(node_ids)), "now": q.ts(now)}

        async def op(conn: Conn) -> list[Run]:
            cur = await conn.execute(
                "SELECT seq, closed, (SELECT coalesce(max(position), -1) + 1 FROM runs "
                "WHERE task_seq = seq) FROM tasks WHERE id = %s FOR NO KEY UPDATE",
                (task_id,),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no task {task_id}")
            if row[1] or not node_ids:
                return []
            params.update(seq=row[0], start=row[2])
            rows = await (await conn.execute(q.ADD_RUNS_SQL, params)).fetchall()
            if rows:  # runs are inserted pending: the counts are ours to keep (see _schema)
                await conn.execute(
                    "UPDATE task_counts SET total = total + %(n)s, pending = pending + %(n)s "
                    "WHERE task_seq = %(seq)s", {"n": len(rows), "seq": row[0]},
                )
                await self._notify(conn, "runs", [r[1] for r in rows])
            rows.sort(key=lambda r: int(r[0]))
            runs = [q.run(task_id, r[1], r[2:]) for r in rows]
            if runs:
                await _emit(conn, now, [(ev.RUNS_ADDED, task_id, None,
                                         ev.nodes_data([r.node_id for r in runs]))])
            return runs

        return await self._tx(op)

    async def pause(self, task_id: str, paused: bool) -> TaskSummary:
        async def op(conn: Conn) -> TaskSummary:
            seq = await _task_seq(conn, task_id, lock=True)
            cur = await conn.execute(
                "UPDATE task_counts SET paused = %s WHERE task_seq = %s AND paused <> %s",
                (paused, seq, paused))
            summary = await _summary(conn, task_id)
            if not paused:
                await self._notify(conn, "runs", None)
            if cur.rowcount:
                await _emit(conn, utcnow(), [
                    (ev.TASK_PAUSED if paused else ev.TASK_RESUMED, task_id, None, {})])
            return summary

        return await self._tx(op)

    async def abort(self, task_id: str, reason: str, now: datetime) -> Sequence[Run]:
        params: dict[str, Any] = {"now": q.ts(now), "reason": q.text(reason)}

        async def op(conn: Conn) -> list[Run]:
            params["seq"] = await _task_seq(conn, task_id, lock=True)
            await conn.execute(
                "UPDATE tasks SET aborted = %(reason)s, closed = true WHERE seq = %(seq)s",
                params)
            await conn.execute(
                "UPDATE task_counts SET aborted = true WHERE task_seq = %(seq)s", params)
            runs = await _update_runs(
                conn, task_id,
                "state = 'cancelled', finished_at = %(now)s, error = %(reason)s",
                "state = 'pending'", params,
            )
            await _emit(conn, now, [(
                ev.TASK_ABORTED, task_id, None,
                ev.nodes_data([r.node_id for r in runs], reason=ev.clip(reason)))])
            return runs

        return await self._tx(op)

    async def retry(
        self, task_id: str, states: Collection[RunState], now: datetime
    ) -> Sequence[Run]:
        wanted = retryable(states)
        params: dict[str, Any] = {"now": q.ts(now), "states": sorted(s.value for s in wanted)}

        async def op(conn: Conn) -> list[Run]:
            params["seq"] = await _task_seq(conn, task_id, lock=True)
            reopened = (await conn.execute(
                "UPDATE tasks SET aborted = NULL, closed = false WHERE seq = %(seq)s "
                "AND (aborted IS NOT NULL OR closed)", params)).rowcount
            await conn.execute(
                "UPDATE task_counts SET aborted = false WHERE task_seq = %(seq)s", params)
            runs = await _update_runs(
                conn, task_id,
                "state = 'pending', available_at = %(now)s, started_at = NULL, "
                "expires_at = NULL, finished_at = NULL, exit_code = NULL, output = '', "
                "output_truncated = false, error = NULL, recovered = false",
                "state = ANY(%(states)s::text[])", params,
            )
            if runs:
                await self._notify(conn, "runs", [r.node_id for r in runs])
            if runs or reopened:
                await _emit(conn, now, [(ev.RUNS_RETRIED, task_id, None,
                                         ev.retried_data(runs, wanted))])
            return runs

        return await self._tx(op)

    async def attempts(self, task_id: str) -> Mapping[str, Sequence[Attempt]]:
        async def op(conn: Conn) -> dict[str, list[Attempt]]:
            seq = await _task_seq(conn, task_id, lock=False)
            out: dict[str, list[Attempt]] = {}
            for row in await (await conn.execute(q.ATTEMPTS_SQL, {"seq": seq})).fetchall():
                out.setdefault(row[0], []).append(q.attempt(row[1:]))
            return out

        return await self._tx(op)

    async def open_continuous(self, now: datetime) -> Sequence[Task]:
        params = {"now": q.ts(now)}

        async def op(conn: Conn) -> list[Task]:
            rows = await (await conn.execute(q.OPEN_CONTINUOUS_SQL, params)).fetchall()
            return [q.task(row) for row in rows]

        return await self._tx(op)

    async def rollout_tasks(self) -> Sequence[Task]:
        async def op(conn: Conn) -> list[Task]:
            rows = await (await conn.execute(q.ROLLOUT_TASKS_SQL)).fetchall()
            return [q.task(row) for row in rows]

        return await self._tx(op)

    async def recent_starts(self, since: datetime) -> Sequence[tuple[str, datetime]]:
        params = {"since": q.ts(since)}

        async def op(conn: Conn) -> list[tuple[str, datetime]]:
            rows = await (await conn.execute(q.RECENT_STARTS_SQL, params)).fetchall()
            return [(task_id, started) for task_id, started in rows]

        return await self._tx(op)

    async def expire_due(self, now: datetime) -> int:
        params = {"now": q.ts(now)}

        async def op(conn: Conn) -> int:
            rows = await (await conn.execute(q.EXPIRE_SQL, params)).fetchall()
            rows.sort()  # (task seq, position, task id, node id): submission, target order
            by_task: dict[str, list[str]] = {}
            for _, _, task_id, node_id in rows:
                by_task.setdefault(task_id, []).append(node_id)
            await _emit(conn, now, [(ev.RUNS_EXPIRED, task_id, None, ev.nodes_data(nodes))
                                    for task_id, nodes in by_task.items()])
            return len(rows)

        return await self._tx(op)

    async def dispatched(self) -> Sequence[Run]:
        async def op(conn: Conn) -> list[Run]:
            rows = await (await conn.execute(q.DISPATCHED_SQL)).fetchall()
            return [q.run(r[0], r[1], r[2:]) for r in rows]

        return await self._tx(op)

    async def next_wakeup(self, now: datetime) -> datetime | None:
        params = {"now": q.ts(now)}

        async def op(conn: Conn) -> datetime | None:
            row = await (await conn.execute(q.NEXT_WAKEUP_SQL, params)).fetchone()
            return None if row is None else row[0]

        return await self._tx(op)

    async def counts(self) -> Mapping[RunState, int]:
        async def op(conn: Conn) -> dict[RunState, int]:
            row = await (await conn.execute(q.COUNTS_SQL)).fetchone()
            assert row is not None
            return {s: int(n) for s, n in zip(q.STATES, row, strict=True) if n}

        return await self._tx(op, atomic=False)

    # ---------------------------------------------------------------- the event log

    async def _sequenced(self) -> None:
        """Return once a sequencer pass that started after the call has ended: every
        event committed before the call then has its id (see ``_schema``'s version 6).
        One pass at a time in this process; callers waiting together share one."""
        ticket = self._passes
        async with self._pass_lock:
            if self._passes > ticket:  # a pass started after the call, and has ended
                return
            self._passes += 1
            await self._tx(_sequence_pass, atomic=False)

    def _drain_soon(self) -> None:
        if _idle(self._drain):
            self._drain = asyncio.get_running_loop().create_task(self._drain_later())

    async def _drain_later(self) -> None:
        await asyncio.sleep(_DRAIN_DELAY)
        try:
            await self._sequenced()
        except GhostRunnerError as exc:  # the next reader's or writer's pass does it
            log.debug("sequencing the event log: %s", exc)

    async def events_after(self, after: int, limit: int = 1000) -> Sequence[ev.Event]:
        params = (min(max(after, -1), (1 << 63) - 1), max(limit, 0))
        await self._sequenced()

        async def op(conn: Conn) -> list[ev.Event]:
            rows = await (await conn.execute(q.EVENTS_AFTER_SQL, params)).fetchall()
            return [ev.Event(id=r[0], at=r[1], kind=r[2], task_id=r[3], node_id=r[4],
                             data=r[5]) for r in rows]

        return await self._tx(op, atomic=False)

    async def last_event_id(self) -> int:
        await self._sequenced()

        async def op(conn: Conn) -> int:
            row = await (await conn.execute("SELECT coalesce(max(id), 0) FROM events")).fetchone()
            assert row is not None
            return int(row[0])

        return await self._tx(op, atomic=False)

    async def prune_events(self, before: datetime) -> int:
        params = {"before": q.ts(before)}
        await self._sequenced()

        async def op(conn: Conn) -> int:
            return (await conn.execute(q.PRUNE_EVENTS_SQL, params)).rowcount

        return await self._tx(op, atomic=False)


    # ---------------------------------------------------------------- runners (Leases)

    async def register(self, runner: RunnerInfo, lease: float) -> None:
        params = {"id": runner.id, "name": q.text(runner.name), "version": runner.version,
                  "started_at": q.ts(runner.started_at), "lease": float(lease)}

        async def op(conn: Conn) -> None:
            await conn.execute(q.REGISTER_SQL, params)
            await self._notify(conn, "runners", None, always=True)

        await self._tx(op)

    async def renew(self, runner_id: str, lease: float) -> Renewal:
        params = {"id": runner_id, "lease": float(lease)}

        async def op(conn: Conn) -> Renewal:
            row = await (await conn.execute(q.RENEW_SQL, params)).fetchone()
            assert row is not None
            return Renewal(held=bool(row[0]), peers=int(row[1]))

        renewal = await self._tx(op, atomic=False)
        self._peers = renewal.peers
        return renewal

    async def adopt(self, runner_id: str, grace: float) -> Adoption:
        params = {"id": runner_id, "grace": max(0.0, float(grace))}

        async def op(conn: Conn) -> Adoption:
            dead = [row[0] for row in await (await conn.execute(q.BURY_SQL, params)).fetchall()]
            rows = await (await conn.execute(q.ADOPT_SQL, params)).fetchall()
            row = await (await conn.execute(q.NEXT_EXPIRY_SQL, params)).fetchone()
            assert row is not None
            if dead:
                await conn.execute(q.PRUNE_RUNNERS_SQL)
            runs = sorted((q.run(r[0], r[1], r[2:]) for r in rows),
                          key=lambda run: (run.started_at or run.queued_at, run.node_id))
            return Adoption(
                runs=runs, runners=dead,
                next_in=None if row[0] is None else max(0.0, float(row[0])),
                peers=int(row[1]),
            )

        adoption = await self._tx(op)
        self._peers = adoption.peers
        return adoption

    async def retire(self, runner_id: str) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(q.RETIRE_SQL, {"id": runner_id})
            await self._notify(conn, "runners", None, always=True)

        await self._tx(op)

    async def runners(self) -> Sequence[RunnerStatus]:
        async def op(conn: Conn) -> list[RunnerStatus]:
            rows = await (await conn.execute(q.RUNNERS_SQL)).fetchall()
            return [_runner_status(row) for row in rows]

        return await self._tx(op)

    # ---------------------------------------------------------------- signals (Signals)

    async def signal(self, kind: str, nodes: Collection[str] | None = None) -> None:
        async def op(conn: Conn) -> None:
            await self._notify(conn, kind, nodes, always=True)

        await self._tx(op)

    async def _notify(
        self, conn: Conn, kind: str, nodes: Collection[str] | None, *,
        if_pending: bool = False, always: bool = False,
    ) -> None:
        """NOTIFY the other processes, in the caller's transaction (delivered at its
        commit, not at all if it rolls back). Skipped while this store's last renewal or
        adoption saw no other live runner (a new one announces itself: ``runners``),
        unless ``always``. ``if_pending``: only if one of ``nodes`` has a pending run
        (a device freed with nothing more to do wakes nobody)."""
        if self._peers == 0 and not always:
            return
        payload = _payload(self._tag, kind, nodes)
        if if_pending and nodes:
            await conn.execute(
                "SELECT pg_notify(%s, %s) WHERE EXISTS (SELECT 1 FROM runs WHERE node = "
                "ANY(%s::text[]) AND state = 'pending')", (q.CHANNEL, payload, list(nodes)))
        else:
            await conn.execute("SELECT pg_notify(%s, %s)", (q.CHANNEL, payload))

    async def signals(self) -> AsyncGenerator[Signal, None]:
        """The other processes' signals (see :class:`~ghostrunner.runners.Signals`):
        one connection of its own (not the pool's) that LISTENs, checked every
        ``listen_check`` seconds and opened again with backoff when it breaks (a
        database restart); each (re)connection first yields ``Signal("runs")``."""
        delay = 0.5
        while self._pool is not None:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True,
                    connect_timeout=max(1, int(min(self.connect_timeout, 10))),
                    keepalives=1, keepalives_idle=5, keepalives_interval=2,
                    keepalives_count=3,
                )
            except psycopg.Error as exc:
                log.warning("listening for other runners: cannot connect to %s (%s); "
                            "retrying in %.1fs", self.dsn, _first_line(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            try:
                await conn.execute(f"LISTEN {q.CHANNEL}")
                if delay > 0.5:
                    log.info("listening for other runners again on %s", self.dsn)
                delay = 0.5
                self._peers = None  # who is there now is not known
                yield Signal(kind="runs")  # anything may have been missed meanwhile
                while self._pool is not None:
                    async for note in conn.notifies(timeout=self.listen_check):
                        signal = _parse_payload(note.payload, self._tag)
                        if signal is not None:
                            if signal.kind == "runners":
                                self._peers = None
                            yield signal
                    async with asyncio.timeout(self.listen_check):
                        await conn.execute("SELECT 1")  # still connected?
            except (psycopg.Error, TimeoutError) as exc:
                log.warning("listening for other runners: connection to %s lost (%s); "
                            "reconnecting", self.dsn, _first_line(exc) or "no answer")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    # ---------------------------------------------------------------- tokens

    async def add_token(self, token: Token) -> None:
        params = {
            "name": token.name, "secret_hash": token.secret_hash, "scope": token.scope.value,
            "created_at": q.ts(token.created_at), "last_used": q.tso(token.last_used),
            "builtin": token.builtin,
        }

        async def op(conn: Conn) -> None:
            try:
                async with conn.transaction():
                    await conn.execute(
                        f"INSERT INTO tokens({q.TOKEN_COLS}) VALUES (%(name)s, "
                        "%(secret_hash)s, %(scope)s, %(created_at)s, %(last_used)s, %(builtin)s)",
                        params,
                    )
            except psycopg.errors.UniqueViolation as exc:
                constraint = exc.diag.constraint_name or ""
                if "name" in constraint:
                    raise Conflict(f"a token named {token.name!r} exists") from None
                raise Conflict("a token with this secret exists") from None

        await self._tx(op)

    async def token_by_hash(self, secret_hash: str) -> Token | None:
        async def op(conn: Conn) -> Token | None:
            cur = await conn.execute(
                f"SELECT {q.TOKEN_COLS} FROM tokens WHERE secret_hash = %s", (secret_hash,)
            )
            row = await cur.fetchone()
            return None if row is None else q.token(row)

        return await self._tx(op, atomic=False)

    async def list_tokens(self) -> Sequence[Token]:
        async def op(conn: Conn) -> list[Token]:
            cur = await conn.execute(f"SELECT {q.TOKEN_COLS} FROM tokens ORDER BY created_at, id")
            return [q.token(row) for row in await cur.fetchall()]

        return await self._tx(op)

    async def delete_token(self, name: str) -> None:
        async def op(conn: Conn) -> None:
            cur = await conn.execute("DELETE FROM tokens WHERE name = %s", (name,))
            if cur.rowcount == 0:
                raise NotFound(f"no token named {name!r}")

        await self._tx(op)

    async def touch_token(self, name: str, now: datetime) -> None:
        params = (q.ts(now), name)

        async def op(conn: Conn) -> None:
            await conn.execute("UPDATE tokens SET last_used = %s WHERE name = %s", params)

        await self._tx(op, atomic=False)

    # ---------------------------------------------------------------- bulk import

    async def import_all(
        self,
        records: AsyncIterable[TaskRecord],
        tokens: Sequence[Token],
        *,
        audit: Sequence[AuditEntry] = (),
        events: Sequence[ev.Event] = (),
        webhooks: Mapping[str, int] | None = None,
        deliveries: Sequence[WebhookDelivery] = (),
        dry_run: bool = False,
    ) -> ImportReport:
        """Copy another store's contents into this **empty** database (``ghostrunner db
        migrate``): tasks with their flags (paused, aborted, closed), runs with every
        field and state (``dispatched`` ones stay dispatched: the next start recovers
        their outcome), attempt histories, tokens with their hashes and scopes, the audit
        log, the event log and the webhook outbox (``webhooks``: cursor by webhook; their
        ``deliveries``), events and deliveries keeping their ids.

        ``records`` in submission order (oldest first). One transaction on a
        connection of its own (the store need not be open): the schema is created if
        missing, the database checked empty, the rows written and counted back per task
        and per state; any difference or error rolls it all back. ``dry_run``: the
        same, always rolled back. Not part of the :class:`~ghostrunner.Store` protocol.

        Raises:
            Conflict: the database has tasks or tokens already.
            StoreError: the database failed, or the rows read back differ.
        """
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, connect_timeout=max(1, int(self.connect_timeout)))
        except psycopg.Error as exc:
            raise _translate(exc, self.dsn) from None
        try:
            return await import_into(conn, records, tokens, audit=audit, events=events,
                                     webhooks=webhooks, deliveries=deliveries,
                                     dry_run=dry_run)
        except GhostRunnerError:
            raise
        except (psycopg.Error, UnicodeError, OverflowError) as exc:
            raise _translate(exc, self.dsn) from None
        finally:
            await conn.close()

    # ---------------------------------------------------------------- audit log

    async def record_audit(self, entry: AuditEntry) -> None:
        row = _audit_row(entry)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._auditing.append(_Auditing(row=row, future=future))
        if _idle(self._auditor):
            self._auditor = asyncio.get_running_loop().create_task(self._audit_queued())
        await future

    async def _audit_queued(self) -> None:
        """Group commit of audit entries: those recorded while a statement ran go in the
        next one."""
        while self._auditing:
            batch, self._auditing = _take_group(self._auditing, id, _AUDIT_BATCH)
            rows = {"batch": json_text([{**a.row, "i": i} for i, a in enumerate(batch)])}

            async def op(conn: Conn, rows: dict[str, str] = rows) -> None:
                await conn.execute(q.AUDIT_MANY_SQL, rows)

            try:
                await self._tx(op, atomic=False)
            except BaseException as exc:
                _fail(batch, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for item in batch:
                if not item.future.done():
                    item.future.set_result(None)

    async def query_audit(self, query: AuditQuery) -> AuditPage:
        sql, params = audit_sql(query, "%s", q.ts)

        async def op(conn: Conn) -> AuditPage:
            cur = await conn.execute(sql, params)
            rows = await cur.fetchall()
            items = [AuditEntry(id=r[0], at=r[1], token=r[2], address=r[3], method=r[4],
                                route=r[5], task_id=r[6], status=r[7], counts=r[8])
                     for r in rows[:query.limit]]
            more = len(rows) > query.limit and items
            return AuditPage(items, str(items[-1].id) if more else None)

        return await self._tx(op)

    async def prune_audit(self, before: datetime) -> int:
        cutoff = q.ts(before)

        async def op(conn: Conn) -> int:
            cur = await conn.execute("DELETE FROM audit WHERE at < %s", (cutoff,))
            return cur.rowcount

        return await self._tx(op)

    # ---------------------------------------------------------------- webhook outbox

    async def webhook_cursor(self, webhook: str, start: int) -> int:
        async def op(conn: Conn) -> int:
            await conn.execute("INSERT INTO webhook_cursors(webhook, event_id) VALUES (%s, %s) "
                               "ON CONFLICT (webhook) DO NOTHING", (webhook, start))
            cur = await conn.execute(
                "SELECT event_id FROM webhook_cursors WHERE webhook = %s", (webhook,))
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        return await self._tx(op)

    async def webhook_cursors(self) -> Mapping[str, int]:
        async def op(conn: Conn) -> dict[str, int]:
            cur = await conn.execute("SELECT webhook, event_id FROM webhook_cursors")
            return {webhook: event_id for webhook, event_id in await cur.fetchall()}

        return await self._tx(op)

    async def enqueue_deliveries(self, webhook: str, after: int, upto: int,
                                 deliveries: Sequence[NewDelivery], now: datetime) -> bool:
        stamp = q.ts(now)
        params = {
            "webhook": webhook, "now": stamp,
            "events": [d.event_id for d in deliveries], "kinds": [d.kind for d in deliveries],
            "msgs": [d.msg_id for d in deliveries],
            "bodies": [_storable(d.body) for d in deliveries],
        }

        async def op(conn: Conn) -> bool:
            # compare-and-set: of two processes taking the same events, the second
            # waits for the first's row lock, then finds the cursor moved
            cur = await conn.execute(
                "UPDATE webhook_cursors SET event_id = %s WHERE webhook = %s AND event_id = %s",
                (upto, webhook, after))
            if cur.rowcount == 0:
                return False
            if deliveries:
                await conn.execute(
                    "INSERT INTO webhook_deliveries(webhook, event_id, kind, msg_id, body, "
                    "status, created_at, started_at, next_attempt_at) "
                    "SELECT %(webhook)s, e, k, m, b, 'pending', %(now)s, %(now)s, %(now)s "
                    "FROM unnest(%(events)s::bigint[], %(kinds)s::text[], %(msgs)s::text[], "
                    "%(bodies)s::text[]) AS t(e, k, m, b) "
                    "ON CONFLICT (webhook, event_id) DO NOTHING", params)
            return True

        return await self._tx(op)

    async def claim_deliveries(self, webhook: str, now: datetime, lease_until: datetime,
                               limit: int) -> Sequence[WebhookDelivery]:
        if limit <= 0:
            return []
        params = {"webhook": webhook, "now": q.ts(now), "lease": q.ts(lease_until),
                  "limit": limit}

        async def op(conn: Conn) -> list[WebhookDelivery]:
            # SKIP LOCKED: a delivery another process is claiming right now is left to
            # it; once claimed, its lease keeps it out of every other claim
            cur = await conn.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, "
                "lease_until = %(lease)s, last_attempt_at = %(now)s WHERE id IN ("
                "SELECT id FROM webhook_deliveries WHERE webhook = %(webhook)s "
                "AND status = 'pending' AND next_attempt_at <= %(now)s "
                "AND (lease_until IS NULL OR lease_until <= %(now)s) "
                "ORDER BY next_attempt_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
                f"RETURNING {DELIVERY_COLS}", params)
            rows = await cur.fetchall()
            return sorted((_delivery(r) for r in rows),
                          key=lambda d: (d.next_attempt_at, d.id))

        return await self._tx(op)

    async def finish_delivery(self, delivery_id: int, attempt: int, now: datetime, *,
                              status: DeliveryStatus, next_attempt_at: datetime | None,
                              http_status: int | None, error: str | None) -> bool:
        status = DeliveryStatus(status)
        done = status is not DeliveryStatus.PENDING
        if not done and next_attempt_at is None:
            raise ValidationError("next_attempt_at", "is required to stay pending")
        params = {
            "id": min(delivery_id, (1 << 63) - 1), "attempt": attempt,
            "status": status.value,
            "next": None if done or next_attempt_at is None else q.ts(next_attempt_at),
            "finished": q.ts(now) if done else None,
            "http_status": http_status, "error": _storable(clip_error(error)),
            "delivered": status is DeliveryStatus.DELIVERED,
        }

        async def op(conn: Conn) -> bool:
            cur = await conn.execute(
                "UPDATE webhook_deliveries SET status = %(status)s, "
                "next_attempt_at = %(next)s, lease_until = NULL, finished_at = %(finished)s, "
                "last_status = %(http_status)s, last_error = %(error)s "
                "WHERE id = %(id)s AND status = 'pending' "
                "AND (attempts = %(attempt)s OR %(delivered)s)", params)
            return cur.rowcount > 0

        return await self._tx(op)

    async def query_deliveries(self, query: DeliveryQuery) -> DeliveryPage:
        sql, params = deliveries_sql(query, "%s")

        async def op(conn: Conn) -> DeliveryPage:
            cur = await conn.execute(sql, params)
            rows = await cur.fetchall()
            items = [_delivery(r) for r in rows[:query.limit]]
            more = len(rows) > query.limit and items
            return DeliveryPage(items, str(items[-1].id) if more else None)

        return await self._tx(op)

    async def retry_delivery(self, delivery_id: int, now: datetime) -> WebhookDelivery:
        params = {"id": min(delivery_id, (1 << 63) - 1), "now": q.ts(now)}

        async def op(conn: Conn) -> WebhookDelivery:
            cur = await conn.execute(
                "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, "
                "started_at = %(now)s, next_attempt_at = %(now)s, lease_until = NULL, "
                "finished_at = NULL WHERE id = %(id)s AND status = 'failed' "
                f"RETURNING {DELIVERY_COLS}", params)
            row = await cur.fetchone()
            if row is not None:
                return _delivery(row)
            cur = await conn.execute("SELECT status FROM webhook_deliveries WHERE id = %(id)s",
                                     params)
            found = await cur.fetchone()
            if found is None:
                raise NotFound(f"no delivery {delivery_id}")
            raise IllegalTransition(f"delivery {delivery_id} is {found[0]}, not failed")

        return await self._tx(op)

    async def prune_deliveries(self, delivered_before: datetime,
                               failed_before: datetime) -> int:
        params = {"delivered": q.ts(delivered_before), "failed": q.ts(failed_before)}

        async def op(conn: Conn) -> int:
            cur = await conn.execute(
                "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND ("
                "(status = 'delivered' AND finished_at < %(delivered)s) OR "
                "(status = 'failed' AND finished_at < %(failed)s))", params)
            return cur.rowcount

        return await self._tx(op)

    async def delivery_counts(self) -> Mapping[str, Mapping[DeliveryStatus, int]]:
        async def op(conn: Conn) -> dict[str, dict[DeliveryStatus, int]]:
            cur = await conn.execute("SELECT webhook, status, count(*) FROM webhook_deliveries "
                                     "GROUP BY webhook, status")
            out: dict[str, dict[DeliveryStatus, int]] = {}
            for webhook, status, n in await cur.fetchall():
                out.setdefault(webhook, {})[DeliveryStatus(status)] = int(n)
            return out

        return await self._tx(op)

    # ---------------------------------------------------------------- for tests and tools

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """A pooled connection, for tests and tools that read the tables themselves."""
        if self._pool is None:
            raise StoreError("the store is not open")
        async with self._pool.connection() as conn:
            yield conn


# --------------------------------------------------------------------------- helpers

#: Nodes named in a signal; more, and it says "all" (NOTIFY payloads stay small).
_SIGNAL_NODES: Final = 32


def _payload(tag: str, kind: str, nodes: Collection[str] | None) -> str:
    listed = None if nodes is None or len(nodes) > _SIGNAL_NODES else list(nodes)
    text = json.dumps({"from": tag, "kind": kind, "nodes": listed}, separators=(",", ":"))
    if len(text) > 4000:  # long node ids: NOTIFY takes up to 8000 bytes
        text = json.dumps({"from": tag, "kind": kind, "nodes": None}, separators=(",", ":"))
    return text


def _parse_payload(payload: str, own: str) -> Signal | None:
    """The signal in ``payload`` (None: this process's own, or not one of ours)."""
    try:
        data = json.loads(payload)
        sender, kind, nodes = data["from"], data["kind"], data["nodes"]
    except (ValueError, TypeError, KeyError):
        return None
    if sender == own or not isinstance(kind, str):
        return None
    if nodes is not None:
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            return None
        nodes = tuple(nodes)
    return Signal(kind=kind, nodes=nodes)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _runner_status(row: Sequence[Any]) -> RunnerStatus:
    (rid, name, version, started, heartbeat, expires, stopped, adopted_by, age, alive,
     runs) = row
    if stopped:
        state = LeaseState.STOPPED
    elif adopted_by is not None:
        state = LeaseState.ADOPTED
    else:
        state = LeaseState.ALIVE if alive else LeaseState.EXPIRED
    return RunnerStatus(
        info=RunnerInfo(id=rid, name=name, version=version, started_at=started),
        state=state, heartbeat_at=heartbeat, heartbeat_age=max(0.0, float(age)),
        expires_at=expires, runs=int(runs), adopted_by=adopted_by,
    )

#: Runs finished in one statement at most (see PostgresStore._finish_queued).
_FINISH_BATCH: Final = 256
#: Tasks added in one statement at most, and the targets above which a task is added
#: by a statement of its own (see PostgresStore._add_queued).
_ADD_BATCH: Final = 128
_ADD_ALONE: Final = 1000


@attrs.define(kw_only=True)
class _Adding:
    """An ``add_task`` waiting for its statement: its task as a JSON object of
    ``ADD_TASKS_SQL``'s batch, and its audit entry's (or None)."""

    task: Task
    row: dict[str, Any]
    audit: dict[str, Any] | None
    future: asyncio.Future[None]


class _Waiting(Protocol):
    """A call waiting in a group commit: its answer comes through ``future``."""

    @property
    def future(self) -> asyncio.Future[Any]: ...


_W = TypeVar("_W", bound=_Waiting)


def _audit_row(entry: AuditEntry) -> dict[str, Any]:
    """An audit entry as a JSON object of :data:`._queries.AUDIT_MANY_SQL`'s batch (and
    of ``ADD_TASKS_SQL``'s ``audit``), its text made storable first: one entry's bad
    text must not fail its group."""
    # (route, token, address and task_id are storable: AuditEntry clips them)
    return {"at": q.ts(entry.at).isoformat(), "token": entry.token,
            "address": entry.address, "method": q.text(entry.method),
            "route": entry.route, "task_id": entry.task_id,
            "status": entry.status, "counts": dict(entry.counts)}


def _take_group(
    queue: Sequence[_W], key: Callable[[_W], Hashable], limit: int
) -> tuple[list[_W], list[_W]]:
    """The next statement's group of ``queue`` (each key once, ``limit`` at most; calls
    whose caller left are dropped), and what waits for a later one."""
    group: list[_W] = []
    later: list[_W] = []
    keys: set[Hashable] = set()
    for item in queue:
        if item.future.done():  # its caller left before it was sent
            continue
        k = key(item)
        if k in keys or len(group) >= limit:
            later.append(item)
        else:
            keys.add(k)
            group.append(item)
    return group, later


def _fail(group: Sequence[_Waiting], exc: BaseException) -> None:
    """Hand ``exc`` to every caller of ``group`` still waiting (a cancelled group's
    callers get ``StoreError``: the store closed under them)."""
    if isinstance(exc, asyncio.CancelledError):
        exc = StoreError("the store is closed")
    for item in group:
        if not item.future.done():
            item.future.set_exception(exc)


def _idle(worker: asyncio.Task[Any] | None) -> bool:
    """Whether a background worker must be started: none, ended, or one of an event
    loop other than the running one (a loop closed under it never ends it)."""
    return (worker is None or worker.done()
            or worker.get_loop() is not asyncio.get_running_loop())


@attrs.define(kw_only=True)
class _Auditing:
    """An audit entry waiting for its statement."""

    row: dict[str, Any]
    future: asyncio.Future[None]


#: Audit entries written in one statement at most (see PostgresStore._audit_queued).
_AUDIT_BATCH: Final = 256


@attrs.define(kw_only=True)
class _Finishing:
    """A ``finish`` waiting for its statement."""

    key: RunKey
    state: str
    at: datetime
    finished: datetime
    started: datetime | None
    error: str | None
    clipped: str | None
    outcome: Outcome | None
    runner: str | None
    future: asyncio.Future[Sequence[Any] | None]


class _Retry(Exception):
    """The transaction lost a race: run it again."""


async def _emit(
    conn: Conn, at: datetime,
    events: Sequence[tuple[str, str, str | None, Mapping[str, Any]]],
) -> None:
    """Write ``events`` (kind, task id, node id, data), all at ``at``, into the inbox, in
    the verb's transaction; a sequencer pass gives them their ids once it committed."""
    if not events:
        return
    await conn.execute(q.EMIT_SQL, {
        "at": q.ts(at),
        "kinds": [e[0] for e in events], "task_ids": [e[1] for e in events],
        "node_ids": [e[2] for e in events],
        "data": [json.dumps(e[3], ensure_ascii=False) for e in events],
    })
    _EMITTED.set(True)


async def _sequence_pass(conn: Conn) -> None:
    """One sequencer pass: nothing to do without committed rows in the inbox; else, in
    a transaction, take the sequencer's lock, then move them (a statement of its own,
    so that its snapshot comes after the lock: it sees what passes before it did)."""
    row = await (await conn.execute(q.INBOX_SQL)).fetchone()
    if row is None or not row[0]:
        return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (EVENTS_LOCK,))
        await conn.execute(q.SEQUENCE_SQL)


async def _configure(conn: Conn) -> None:
    """Every pooled connection: timestamps come back in UTC."""
    await conn.execute("SET TIME ZONE 'UTC'")
    await conn.commit()
    _GENERIC[conn] = False


#: Pooled connections by whether their session plans prepared statements generically.
_GENERIC: weakref.WeakKeyDictionary[Conn, bool] = weakref.WeakKeyDictionary()
#: Devices (or runs) in a call up to which its statement is planned once, generically.
_SMALL: Final = 16


async def _plan(conn: Conn, size: int) -> None:
    """Plan the next statements for ``size`` devices or runs: generically (once per
    prepared statement) when few, as PostgreSQL's default does otherwise. The default
    plans a small call's statement again on every execution (~1 ms of a one-device
    find + claim's ~3 ms over a large backlog), while a generic plan made for unknown
    array sizes costs large calls far more (the reconnect storm's PostgreSQL CPU went up
    by two thirds). The setting belongs to the session: set only when it changes."""
    generic = size <= _SMALL
    if _GENERIC.get(conn) is not generic:
        mode = "force_generic_plan" if generic else "auto"
        await conn.execute(f"SET plan_cache_mode = {mode}")
        _GENERIC[conn] = generic


def _translate(exc: BaseException, dsn: str) -> GhostRunnerError:
    """A GhostRunner error for the backend's ``exc`` (messages never carry the
    password: libpq's do not, and the DSN is shown redacted)."""
    if isinstance(exc, GhostRunnerError):
        return exc
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return Conflict(f"already exists ({exc.diag.message_primary})")
    if isinstance(exc, PoolTimeout):
        return StoreError(f"PostgreSQL at {dsn}: no connection available ({exc})")
    if isinstance(exc, psycopg.OperationalError):
        return StoreError(f"PostgreSQL at {dsn}: {exc}")
    if isinstance(exc, psycopg.Error):
        return StoreError(f"PostgreSQL error: {exc}")
    if isinstance(exc, UnicodeError | OverflowError):
        return StoreError(f"value cannot be stored: {exc}")
    return StoreError(f"PostgreSQL error: {type(exc).__name__}")


def _known(task: Task | None) -> Task:
    assert task is not None  # a claimed run's task exists (same transaction)
    return task


def _key_params(key: RunKey) -> dict[str, Any]:
    return {"task_id": key.task_id, "node_id": key.node_id}


async def _within_limits(
    conn: Conn, keys: Sequence[RunKey], now: datetime, limited: OrderedDict[str, bool],
) -> list[tuple[int, RunKey]]:
    """``keys`` (with their index) but those beyond their task's rollout limits, counted
    over every runner sharing the database: runs dispatched now (``max_concurrent``),
    starts in the last minute (``per_minute``). The limited tasks' counts stay locked
    until the claim commits: two runners claiming runs of one task count one after the
    other. (A runner holds its own claims to the limits too; this makes them hold for
    all runners together.) ``limited``: task id -> whether it has limits, as learnt (a
    task's limits never change): a claim of tasks known to have none costs nothing."""
    indexed = list(enumerate(keys))
    ids = [i for i in dict.fromkeys(k.task_id for k in keys) if limited.get(i, True)]
    if not ids:
        return indexed
    limits = await (await conn.execute(q.LIMITS_SQL, {"ids": ids})).fetchall()
    found = {row[0] for row in limits}
    for task_id in ids:
        limited[task_id] = task_id in found
        limited.move_to_end(task_id)
    while len(limited) > _LIMITED_CACHE:
        limited.popitem(last=False)
    if not limits:
        return indexed
    rated = [row[0] for row in limits if row[2] is not None]
    starts: dict[str, list[datetime]] = {}
    if rated:
        cur = await conn.execute(q.TASK_STARTS_SQL, {"ids": rated, "since": now - RATE_WINDOW})
        for task_id, started in await cur.fetchall():
            starts.setdefault(task_id, []).append(started)
    room: dict[str, int] = {}
    for task_id, max_concurrent, per_minute, dispatched in limits:
        budget, _ = rollout_budget(
            Rollout(max_concurrent=max_concurrent, per_minute=per_minute),
            in_flight=dispatched, starts=starts.get(task_id, ()), now=now)
        room[task_id] = budget if budget is not None else len(keys)
    out = []
    for i, key in indexed:
        left = room.get(key.task_id)
        if left is None:
            out.append((i, key))
        elif left > 0:
            room[key.task_id] = left - 1
            out.append((i, key))
    return out


async def _task_seq(conn: Conn, task_id: str, *, lock: bool) -> int:
    """The task's seq; ``lock``: its row is held until the transaction ends (the verbs
    that change a task as a whole, one at a time)."""
    sql = "SELECT seq FROM tasks WHERE id = %s" + (" FOR NO KEY UPDATE" if lock else "")
    row = await (await conn.execute(sql, (task_id,))).fetchone()
    if row is None:
        raise NotFound(f"no task {task_id}")
    return int(row[0])


async def _summary(conn: Conn, task_id: str) -> TaskSummary:
    row = await (await conn.execute(f"{q.SUMMARY_SELECT} WHERE t.id = %s", (task_id,))).fetchone()
    if row is None:
        raise NotFound(f"no task {task_id}")
    return q.summary(row)


async def _must_exist(conn: Conn, key: RunKey) -> None:
    cur = await conn.execute(f"SELECT 1 FROM runs WHERE {q.KEY_WHERE}", _key_params(key))
    if await cur.fetchone() is None:
        raise NotFound(f"no run {key}")


async def _update_runs(
    conn: Conn, task_id: str, sets: str, where: str, params: dict[str, Any]
) -> list[Run]:
    """``UPDATE runs SET sets`` for the task's runs (``seq``) matching ``where``; the
    runs changed, in target order."""
    cur = await conn.execute(
        f"UPDATE runs SET {sets} WHERE task_seq = %(seq)s AND {where} "
        f"RETURNING position, node, {q.RUN_COLS}",
        params,
    )
    rows = await cur.fetchall()
    rows.sort(key=lambda row: int(row[0]))
    return [q.run(task_id, row[1], row[2:]) for row in rows]


async def _update_dispatched(
    conn: Conn, key: RunKey, assignments: str, params: dict[str, Any],
    runner: str | None = None,
) -> Run:
    """Apply ``assignments`` to the run ``key`` if it is dispatched (by ``runner``, if
    given), else raise."""
    owned = "" if runner is None else " AND runner = %(owner)s"
    cur = await conn.execute(
        f"UPDATE runs SET {assignments} WHERE {q.KEY_WHERE} AND state = 'dispatched'"
        f"{owned} RETURNING {q.RUN_COLS}",
        {**params, **_key_params(key), "owner": runner},
    )
    row = await cur.fetchone()
    if row is None:
        if runner is not None:
            await _check_owner(conn, key, runner)
        await _must_exist(conn, key)
        raise IllegalTransition(f"run {key} is not dispatched")
    return q.run(key.task_id, key.node_id, row)




def _delivery(row: Sequence[Any]) -> WebhookDelivery:
    return WebhookDelivery(
        id=row[0], webhook=row[1], event_id=row[2], kind=row[3], msg_id=row[4], body=row[5],
        status=row[6], attempts=row[7], created_at=row[8], started_at=row[9],
        next_attempt_at=row[10], lease_until=row[11], last_attempt_at=row[12],
        last_status=row[13], last_error=row[14], finished_at=row[15])


def _storable(text: str | None) -> str | None:
    """PostgreSQL text holds no NUL, and UTF-8 no lone surrogate."""
    if text is None:
        return None
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


async def _check_owner(conn: Conn, key: RunKey, runner: str) -> None:
    """Raise NotOwner if the run ``key`` is dispatched by another runner than
    ``runner`` (locking it until the transaction ends)."""
    cur = await conn.execute(
        f"SELECT state, runner FROM runs WHERE {q.KEY_WHERE} FOR NO KEY UPDATE",
        _key_params(key))
    row = await cur.fetchone()
    if row is not None and row[0] == RunState.DISPATCHED.value and row[1] != runner:
        owner = "no runner" if row[1] is None else f"runner {row[1]}"
        raise NotOwner(f"run {key} is dispatched by {owner}, not by {runner}")

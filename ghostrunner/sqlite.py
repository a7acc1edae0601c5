"""A durable :class:`~ghostrunner.Store` on SQLite, through sqlite-utils.

Design
======

**One thread owns the connection.** :meth:`SQLiteStore.open` starts a worker thread
that creates the ``sqlite3`` connection (wrapped in a :class:`sqlite_utils.Database`),
migrates the schema and then serves a queue. Every async method puts a small function
on that queue and awaits an :class:`asyncio.Future` that the worker resolves through
``loop.call_soon_threadsafe``: the event loop never waits on SQLite, and SQLite never
sees a second thread (the model is datasette's single write thread).

**Group commit.** The worker takes every job already queued (up to
``_MAX_BATCH``) and runs the batch in *one* transaction, committed once: the jobs that
arrive while a batch runs and commits make the next batch, so a burst batches itself
and a lone write is committed at once. Each write runs inside its own ``SAVEPOINT``, so
an operation that fails (a ``Conflict``, an ``IllegalTransition``...) is rolled back
alone and the others still commit. Results are handed back only after the ``COMMIT``
succeeded. Read-only batches run without an explicit transaction.

**Adding tasks.** Tasks added concurrently share one *bulk* function: a batch of them is
written by one SQL statement (an insert of their JSON into a per-connection TEMP view
whose trigger writes the tasks, runs and counts). When a batch is nothing else, that
statement runs in autocommit mode, its own transaction: the worker enters SQLite once
for the batch. Every call into SQLite releases the GIL, and winning it back from a busy
event loop is what the worker mostly waited for (measured: with five calls per batch,
a batch took twice as long as its SQL).

**Durability.** WAL journal, ``synchronous=FULL`` by default: a commit is on disk
(WAL fsync'd) before its caller hears about it, so a power cut right after
:meth:`~SQLiteStore.claim` returns cannot "un-claim" a run and have an
``at_most_once`` command sent twice. It costs one fsync per *batch* (about 0.6 ms on the
development VM). ``synchronous="NORMAL"`` skips that fsync: still safe against a crash
of the process, and the database never corrupts, but a power loss or kernel crash can
roll back the last commits (WAL mode + NORMAL only fsyncs at checkpoints).

Schema (version 1)
==================

* ``tasks``: ``seq INTEGER PRIMARY KEY AUTOINCREMENT`` is the submission order (and the
  listing cursor; never reused), ``id`` is unique, ``targets`` a JSON array.
* ``nodes``: node ids are long strings (``node//`` + 64 characters) repeated in every run
  and in two indexes; they are interned as small integers (``nid``): the database
  with 1M runs went from 729 MB to 239 MB, and bulk loads got faster.
* ``runs``: one row per (task, device), ``PRIMARY KEY (task_seq, node)``, with
  ``position`` (target order) and every :class:`~ghostrunner.Run` field.
* ``task_counts`` (runs per state, per task) and ``run_counts`` (runs per state,
  overall) are kept by triggers on ``runs`` updates and deletes, so :meth:`counts`,
  :meth:`get_task` and :meth:`list_tasks` never count runs. Runs are only ever *inserted*
  ``pending``, by :meth:`add_task` and :meth:`bulk_add_tasks`, which add to the counts
  themselves (an insert trigger doubled the bulk load time).
* ``tokens``: ``name`` and ``secret_hash`` unique. Secrets are never stored.

Timestamps are INTEGER microseconds since 1970-01-01 UTC: they order correctly, are
8 bytes in the indexes (a fixed-width ISO string is 27), and come back as aware UTC
datetimes equal to what went in. Read them with
``datetime(x / 1e6, 'unixepoch', 'subsec')`` in the sqlite3 shell.

Indexes: ``runs_pending_node (node, task_seq, available_at, expires_at) WHERE
state='pending'`` serves :meth:`next_pending` (first pending run per device in
submission order, without touching other runs); ``runs_pending_available`` and
``runs_pending_expiry`` (partial, pending only) serve :meth:`next_wakeup` and
:meth:`expire_due`; ``runs_dispatched`` (partial) serves :meth:`dispatched`;
``runs_node (node, task_seq)`` the listing by device; ``tasks_name`` the listing by name.

``PRAGMA user_version`` holds the schema version; :data:`_MIGRATIONS` lists the
functions that bring a database from version *n* to *n + 1* (one transaction for the
whole upgrade). A database newer than this code is refused with a ``StoreError``, and
so is a database that has tables but is not a GhostRunner database
(``PRAGMA application_id``).
"""

# ruff: noqa: S608
# (SQL is assembled only from this module's constants and enum-derived identifiers;
# every value is a bound parameter.)

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import queue
import re
import sqlite3
import threading

try:
    import fcntl
except ImportError:  # Windows: no advisory lock (one process per database is on you)
    fcntl = None  # type: ignore[assignment]
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, TypeVar, cast

import sqlite_utils

from ._types import (
    TERMINAL_STATES,
    TRANSITIONS,
    Delivery,
    Outcome,
    Page,
    Run,
    RunKey,
    RunState,
    Shell,
    Task,
    TaskQuery,
    TaskStatus,
    TaskSummary,
    trusted,
)
from .errors import Conflict, GhostRunnerError, IllegalTransition, NotFound, StoreError
from .tokens import Scope, Token

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")

APPLICATION_ID: Final = 0x47527374  # "GRst"; PRAGMA application_id of our databases
BUSY_TIMEOUT_MS: Final = 5000
_MAX_BATCH: Final = 256
_MAX_SEQ: Final = (1 << 63) - 1

# --------------------------------------------------------------------------- values

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
_MIN_US: Final = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _US
_MAX_US: Final = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _US


def _ts(value: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (UTC)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise StoreError(f"datetime {value!r} is not timezone-aware")
    us = (value - _EPOCH) // _US
    if not _MIN_US <= us <= _MAX_US:
        raise StoreError(f"datetime {value!r} is outside the years 1-9999 in UTC")
    return us


def _tso(value: datetime | None) -> int | None:
    return None if value is None else _ts(value)


@functools.lru_cache(maxsize=4096)  # runs share timestamps (queued_at, not_before...)
def _dt(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _dto(value: int | None) -> datetime | None:
    return None if value is None else _dt(value)


_JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _json(values: Iterable[str]) -> str:
    # one encoder: json.dumps with options builds a new one per call
    return _JSON.encode(list(values))


# --------------------------------------------------------------------------- schema

_STATES: Final = tuple(RunState)
#: The terminal states a dispatched run may move to (what finish() accepts).
_FINISHED_STATES: Final = TRANSITIONS[RunState.DISPATCHED] & TERMINAL_STATES
for _s in _STATES:  # the state names double as task_counts column names
    assert _s.value.isidentifier(), _s

# How each TaskStatus reads on a task_counts row; mirrors ghostrunner._types.task_status.
_NOT_PENDING = "c.pending <> c.total"
_IDLE = "c.pending + c.dispatched = 0"
_STATUS_SQL: Final[Mapping[TaskStatus, str]] = {
    TaskStatus.PENDING: "c.pending = c.total",
    TaskStatus.RUNNING: f"{_NOT_PENDING} AND c.pending + c.dispatched > 0",
    TaskStatus.SUCCEEDED: f"{_NOT_PENDING} AND {_IDLE} AND c.succeeded = c.total",
    TaskStatus.CANCELLED: (
        f"{_NOT_PENDING} AND {_IDLE} AND c.succeeded <> c.total AND c.cancelled = c.total"
    ),
    TaskStatus.FAILED: (
        f"{_NOT_PENDING} AND {_IDLE} AND c.succeeded <> c.total AND c.cancelled <> c.total"
    ),
}


def _v1(db: sqlite_utils.Database) -> None:
    """The initial schema."""
    states = ", ".join(f"'{s.value}'" for s in _STATES)
    count_cols = ",\n".join(f"    {s.value} INTEGER NOT NULL DEFAULT 0" for s in _STATES)
    moved = ",\n        ".join(
        f"{s.value} = {s.value} + (NEW.state = '{s.value}') - (OLD.state = '{s.value}')"
        for s in _STATES
    )
    removed = ",\n        ".join(
        f"{s.value} = {s.value} - (OLD.state = '{s.value}')" for s in _STATES
    )
    statements = [
        f"PRAGMA application_id = {APPLICATION_ID}",
        """
        CREATE TABLE tasks (
            seq          INTEGER PRIMARY KEY AUTOINCREMENT,
            id           TEXT    NOT NULL UNIQUE,
            name         TEXT    NOT NULL,
            command      TEXT    NOT NULL,
            targets      TEXT    NOT NULL,  -- JSON array of node ids, in target order
            created_at   INTEGER NOT NULL,  -- timestamps: microseconds since epoch, UTC
            shell        TEXT    NOT NULL,
            run_as_user  INTEGER NOT NULL,
            timeout      REAL    NOT NULL,
            not_before   INTEGER,
            expires_at   INTEGER,
            max_attempts INTEGER NOT NULL,
            delivery     TEXT    NOT NULL
        )""",
        # (name, seq): a rowid table appends the rowid to every index entry
        "CREATE INDEX tasks_name ON tasks(name)",
        """
        CREATE TABLE nodes (
            nid     INTEGER PRIMARY KEY,
            node_id TEXT NOT NULL UNIQUE
        )""",
        f"""
        CREATE TABLE runs (
            task_seq         INTEGER NOT NULL REFERENCES tasks(seq) ON DELETE CASCADE,
            node             INTEGER NOT NULL REFERENCES nodes(nid),
            position         INTEGER NOT NULL,  -- index in the task's targets
            state            TEXT    NOT NULL CHECK (state IN ({states})),
            attempts         INTEGER NOT NULL DEFAULT 0,
            undelivered      INTEGER NOT NULL DEFAULT 0,
            queued_at        INTEGER NOT NULL,
            available_at     INTEGER NOT NULL,
            expires_at       INTEGER,
            started_at       INTEGER,
            finished_at      INTEGER,
            exit_code        INTEGER,
            output           TEXT    NOT NULL DEFAULT '',
            output_truncated INTEGER NOT NULL DEFAULT 0,
            error            TEXT,
            PRIMARY KEY (task_seq, node)
        )""",
        """CREATE INDEX runs_pending_node ON runs(node, task_seq, available_at, expires_at)
           WHERE state = 'pending'""",
        "CREATE INDEX runs_pending_available ON runs(available_at) WHERE state = 'pending'",
        """CREATE INDEX runs_pending_expiry ON runs(expires_at)
           WHERE state = 'pending' AND expires_at IS NOT NULL""",
        "CREATE INDEX runs_dispatched ON runs(task_seq, position) WHERE state = 'dispatched'",
        "CREATE INDEX runs_node ON runs(node, task_seq)",
        f"""
        CREATE TABLE task_counts (
            task_seq INTEGER PRIMARY KEY REFERENCES tasks(seq) ON DELETE CASCADE,
            total    INTEGER NOT NULL,
        {count_cols}
        )""",
        """
        CREATE TABLE run_counts (
            state TEXT PRIMARY KEY,
            n     INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        "INSERT INTO run_counts(state) VALUES " + ", ".join(f"({s})" for s in states.split(", ")),
        f"""
        CREATE TRIGGER runs_state_changed AFTER UPDATE OF state ON runs
        WHEN OLD.state IS NOT NEW.state BEGIN
            UPDATE task_counts SET
                {moved}
            WHERE task_seq = NEW.task_seq;
            UPDATE run_counts SET n = n - 1 WHERE state = OLD.state;
            UPDATE run_counts SET n = n + 1 WHERE state = NEW.state;
        END""",
        f"""
        CREATE TRIGGER runs_deleted AFTER DELETE ON runs BEGIN
            UPDATE task_counts SET
                total = total - 1,
                {removed}
            WHERE task_seq = OLD.task_seq;
            UPDATE run_counts SET n = n - 1 WHERE state = OLD.state;
        END""",
        """
        CREATE TABLE tokens (
            id          INTEGER PRIMARY KEY,
            name        TEXT    NOT NULL UNIQUE,
            secret_hash TEXT    NOT NULL UNIQUE,
            scope       TEXT    NOT NULL,
            created_at  INTEGER NOT NULL,
            last_used   INTEGER,
            builtin     INTEGER NOT NULL DEFAULT 0
        )""",
    ]
    for sql in statements:
        db.execute(sql)


#: ``_MIGRATIONS[n]`` brings a database from schema version n to n + 1. Append only.
_MIGRATIONS: Final[tuple[Callable[[sqlite_utils.Database], None], ...]] = (_v1,)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


def _migrate(db: sqlite_utils.Database) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
        app_id: int = db.execute("PRAGMA application_id").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the database schema is version {version}, newer than this GhostRunner "
                f"understands ({SCHEMA_VERSION}): upgrade GhostRunner"
            )
        if app_id not in (0, APPLICATION_ID) or (
            version == 0 and db.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0] != 0
        ):
            raise StoreError("the file is an SQLite database, but not GhostRunner's")
        for step in range(version, SCHEMA_VERSION):
            _MIGRATIONS[step](db)
            db.execute(f"PRAGMA user_version = {step + 1}")
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise


# --------------------------------------------------------------------------- SQL

_RUN_COLS = (
    "state, attempts, undelivered, queued_at, available_at, expires_at, started_at, "
    "finished_at, exit_code, output, output_truncated, error"
)
_R_RUN_COLS = ", ".join(f"r.{c}" for c in _RUN_COLS.split(", "))
_RUN_SELECT = f"SELECT t.id, n.node_id, {_R_RUN_COLS} FROM runs AS r"
_RUN_JOINS = "JOIN tasks AS t ON t.seq = r.task_seq JOIN nodes AS n ON n.nid = r.node"
_KEY_WHERE = (
    "task_seq = (SELECT seq FROM tasks WHERE id = :task_id) "
    "AND node = (SELECT nid FROM nodes WHERE node_id = :node_id)"
)
_TASK_COLS = (
    "t.seq, t.id, t.name, t.command, t.targets, t.created_at, t.shell, t.run_as_user, "
    "t.timeout, t.not_before, t.expires_at, t.max_attempts, t.delivery"
)
_SUMMARY_COLS = f"{_TASK_COLS}, {', '.join(f'c.{s.value}' for s in _STATES)}"
_SUMMARY_SELECT = (
    f"SELECT {_SUMMARY_COLS} FROM tasks AS t JOIN task_counts AS c ON c.task_seq = t.seq"
)

#: For each device in the JSON array :nodes, its first pending run in submission order
#: that is available and not expired; only index searches (see the contract tests).
NEXT_PENDING_SQL: Final = f"""
SELECT t.id, j.value, {_R_RUN_COLS}
FROM json_each(:nodes) AS j
JOIN nodes AS n ON n.node_id = j.value
JOIN runs AS r ON r.rowid = (
    SELECT p.rowid FROM runs AS p INDEXED BY runs_pending_node
    WHERE p.node = n.nid AND p.state = 'pending' AND p.available_at <= :now
      AND (p.expires_at IS NULL OR p.expires_at > :now)
    ORDER BY p.task_seq LIMIT 1)
JOIN tasks AS t ON t.seq = r.task_seq
ORDER BY j.key
LIMIT :limit
"""

CLAIM_SQL: Final = f"""
UPDATE runs SET state = 'dispatched', attempts = attempts + 1, started_at = :now
WHERE {_KEY_WHERE} AND state = 'pending'
RETURNING {_RUN_COLS}
"""

EXPIRE_SQL: Final = """
UPDATE runs SET state = 'expired', finished_at = :now,
    error = 'expired before it could start'
WHERE state = 'pending' AND expires_at <= :now
"""

NEXT_WAKEUP_SQL: Final = """
SELECT min(x) FROM (
    SELECT min(available_at) AS x FROM runs WHERE state = 'pending' AND available_at > :now
    UNION ALL
    SELECT min(expires_at) FROM runs WHERE state = 'pending' AND expires_at > :now
)
"""

DISPATCHED_SQL: Final = f"""
{_RUN_SELECT} INDEXED BY runs_dispatched {_RUN_JOINS}
WHERE r.state = 'dispatched' ORDER BY r.task_seq, r.position
"""


def _run(task_id: str, node_id: str, row: Sequence[Any]) -> Run:
    """A Run from ``row``: the columns of :data:`_RUN_COLS`."""
    return trusted(
        Run,
        task_id=task_id,
        node_id=node_id,
        state=RunState(row[0]),
        attempts=row[1],
        undelivered=row[2],
        queued_at=_dt(row[3]),
        available_at=_dt(row[4]),
        expires_at=_dto(row[5]),
        started_at=_dto(row[6]),
        finished_at=_dto(row[7]),
        exit_code=row[8],
        output=row[9],
        output_truncated=bool(row[10]),
        error=row[11],
    )


def _task(row: Sequence[Any]) -> Task:
    """A Task from ``row``: the columns of :data:`_TASK_COLS` (seq first)."""
    return trusted(
        Task,
        id=row[1],
        name=row[2],
        command=row[3],
        targets=tuple(json.loads(row[4])),
        created_at=_dt(row[5]),
        shell=Shell(row[6]),
        run_as_user=bool(row[7]),
        timeout=row[8],
        not_before=_dto(row[9]),
        expires_at=_dto(row[10]),
        max_attempts=row[11],
        delivery=Delivery(row[12]),
    )


def _summary(row: Sequence[Any]) -> TaskSummary:
    """A TaskSummary from a :data:`_SUMMARY_SELECT` row."""
    counts = {s: n for s, n in zip(_STATES, row[13:], strict=True) if n}
    return TaskSummary(task=_task(row), counts=counts)


def _list_sql(query: TaskQuery) -> tuple[str, dict[str, Any]]:
    """The statement listing ``query``'s page (plus one row, to know if more follow).

    Every filter is SQL, and the walk goes newest first along an index, stopping when
    the page is full: with ``node_id`` along ``runs_node``, with ``name`` along
    ``tasks_name``, else along ``task_counts`` (narrow rows: the per-state counts kept
    by triggers, which ``state`` and ``status`` read; the wide ``tasks`` row is only
    read for tasks that match). So a rare state or status can walk every task (about
    0.5 µs a task). The cursor is the ``seq`` of the page's last task.
    """
    start = _MAX_SEQ
    if query.cursor is not None:
        try:
            start = min(max(int(query.cursor), 0), _MAX_SEQ)
        except ValueError:
            start = 0  # like the reference store: an unknown cursor ends the listing
    params: dict[str, Any] = {"start": start, "limit": query.limit + 1}
    where = []
    if query.node_id is not None:
        # CROSS JOIN: SQLite keeps the tables in this order (runs drives)
        source = (
            "runs AS r INDEXED BY runs_node CROSS JOIN tasks AS t ON t.seq = r.task_seq"
            " CROSS JOIN task_counts AS c ON c.task_seq = r.task_seq"
        )
        where += ["r.node = (SELECT nid FROM nodes WHERE node_id = :node_id)"]
        order = "r.task_seq"
        params["node_id"] = query.node_id
    elif query.name is not None:
        source = (
            "tasks AS t INDEXED BY tasks_name CROSS JOIN task_counts AS c ON c.task_seq = t.seq"
        )
        order = "t.seq"
    else:
        source = "task_counts AS c CROSS JOIN tasks AS t ON t.seq = c.task_seq"
        order = "c.task_seq"
    where.append(f"{order} < :start")
    if query.name is not None:
        where.append("t.name = :name")
        params["name"] = query.name
    if query.state is not None:
        where.append(f"c.{RunState(query.state).value} > 0")
    if query.status is not None:
        where.append(f"({_STATUS_SQL[TaskStatus(query.status)]})")
    sql = (
        f"SELECT {_SUMMARY_COLS} FROM {source} WHERE {' AND '.join(where)} "
        f"ORDER BY {order} DESC LIMIT :limit"
    )
    return sql, params


def _task_row(task: Task, targets: Any) -> tuple[Any, ...]:
    """The ``tasks`` columns after ``seq``, with ``targets`` as given: JSON text for an
    INSERT ... VALUES, the list itself inside a JSON document (:func:`_add_tasks`)."""
    return (
        task.id,
        task.name,
        task.command,
        targets,
        _ts(task.created_at),
        task.shell.value,
        int(task.run_as_user),
        float(task.timeout),
        _tso(task.not_before),
        _tso(task.expires_at),
        task.max_attempts,
        task.delivery.value,
    )


def _add_tasks(db: sqlite_utils.Database, rows: list[tuple[Any, ...]]) -> None:
    """Insert tasks and their pending runs: ``rows`` are :func:`_task_row` tuples (the
    targets a list) plus the time the runs are queued at.

    One statement however many tasks: an insert of their JSON document into the
    connection's ``temp.add_tasks`` view, whose trigger (:data:`_ADD_TASKS`) writes the
    tasks, their runs and the counts. One statement is atomic (a failure undoes all of
    it) and crosses into SQLite once: every crossing releases the GIL and has to win it
    back from the busy event loop. A duplicate id raises Conflict (one task) or
    IntegrityError (several: the worker then adds them one by one)."""
    try:
        db.conn.execute("INSERT INTO add_tasks(doc) VALUES (?)", (_JSON.encode(rows),))
    except sqlite3.IntegrityError as exc:
        if len(rows) == 1 and "tasks.id" in str(exc):
            raise Conflict(f"task {rows[0][0]} exists") from exc
        raise


#: Per connection (TEMP): the view :func:`_add_tasks` inserts a JSON document of task
#: rows into, and the trigger that does the work. Not part of the database file.
_ADD_TASKS: Final = (
    "CREATE TEMP VIEW add_tasks(doc) AS SELECT NULL",
    """
    CREATE TEMP TRIGGER add_tasks_insert INSTEAD OF INSERT ON add_tasks BEGIN
        INSERT INTO tasks(id, name, command, targets, created_at, shell, run_as_user,
                          timeout, not_before, expires_at, max_attempts, delivery)
        SELECT value ->> 0, value ->> 1, value ->> 2, value -> 3, """
    + ", ".join(f"value ->> {i}" for i in range(4, 12)) + """
        FROM json_each(NEW.doc) ORDER BY key;
        INSERT INTO task_counts(task_seq, total, pending)
        SELECT t.seq, json_array_length(j.value, '$[3]'), json_array_length(j.value, '$[3]')
        FROM json_each(NEW.doc) AS j CROSS JOIN tasks AS t ON t.id = j.value ->> 0;
        UPDATE run_counts
        SET n = n + (SELECT sum(json_array_length(value, '$[3]')) FROM json_each(NEW.doc))
        WHERE state = 'pending';
        INSERT OR IGNORE INTO nodes(node_id)
        SELECT g.value FROM json_each(NEW.doc) AS j, json_each(j.value, '$[3]') AS g;
        -- available at submission, or at not_before
        INSERT INTO runs(task_seq, node, position, state, queued_at, available_at,
                         expires_at)
        SELECT t.seq, n.nid, g.key, 'pending', j.value ->> 12,
               coalesce(j.value ->> 8, j.value ->> 12), j.value ->> 9
        FROM json_each(NEW.doc) AS j CROSS JOIN tasks AS t ON t.id = j.value ->> 0
        CROSS JOIN json_each(j.value, '$[3]') AS g
        CROSS JOIN nodes AS n ON n.node_id = g.value;
    END""",
)


_BULK_INSERT_RUNS = """
INSERT INTO runs(task_seq, node, position, state, queued_at, available_at, expires_at)
SELECT json_extract(t.value, '$[0]'), n.value, n.key, 'pending', :queued,
       json_extract(t.value, '$[1]'), json_extract(t.value, '$[2]')
FROM json_each(:tasks) AS t, json_each(t.value, '$[3]') AS n
"""


def _bulk_insert(
    db: sqlite_utils.Database, tasks: list[Task], queued: int, nodes: dict[str, int]
) -> int:
    """Insert ``tasks`` and their runs, inside the caller's transaction. ``nodes`` maps
    the node ids known so far to their ``nid`` and is extended."""
    conn = db.conn
    seq: int = conn.execute(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'tasks'), 0),"
        " coalesce((SELECT max(seq) FROM tasks), 0))"
    ).fetchone()[0]
    next_nid: int = conn.execute("SELECT coalesce(max(nid), 0) FROM nodes").fetchone()[0]
    task_rows: list[tuple[Any, ...]] = []
    count_rows: list[tuple[int, int]] = []
    new_nodes: list[tuple[int, str]] = []
    run_specs: list[tuple[int, int, int | None, list[int]]] = []
    runs = 0
    for task in tasks:
        seq += 1
        task_rows.append((seq, *_task_row(task, _json(task.targets))))
        count_rows.append((seq, len(task.targets)))
        nids = []
        for node_id in task.targets:
            nid = nodes.get(node_id)
            if nid is None:
                next_nid += 1
                nid = nodes[node_id] = next_nid
                new_nodes.append((nid, node_id))
            nids.append(nid)
        available = queued if task.not_before is None else _ts(task.not_before)
        run_specs.append((seq, available, _tso(task.expires_at), nids))
        runs += len(nids)
    try:
        conn.executemany(
            "INSERT INTO tasks(seq, id, name, command, targets, created_at, shell, "
            "run_as_user, timeout, not_before, expires_at, max_attempts, delivery) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            task_rows,
        )
    except sqlite3.IntegrityError as exc:
        raise Conflict(f"a task of this batch exists ({exc})") from exc
    conn.executemany(
        "INSERT INTO task_counts(task_seq, total, pending) VALUES (?1, ?2, ?2)", count_rows
    )
    conn.execute("UPDATE run_counts SET n = n + ? WHERE state = 'pending'", (runs,))
    conn.executemany("INSERT INTO nodes(nid, node_id) VALUES (?, ?)", new_nodes)
    conn.execute(
        _BULK_INSERT_RUNS,
        {"queued": queued, "tasks": json.dumps(run_specs, separators=(",", ":"))},
    )
    return runs


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


def _chunks(tasks: Iterable[Task], runs: int) -> Iterator[list[Task]]:
    """``tasks`` in lists of about ``runs`` runs."""
    chunk: list[Task] = []
    size = 0
    for task in tasks:
        chunk.append(task)
        size += len(task.targets)
        if size >= runs:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _bulk_load(
    db: sqlite_utils.Database, tasks: Iterable[Task], queued: int, chunk_runs: int
) -> int:
    """The body of :meth:`SQLiteStore.bulk_add_tasks`, on the worker thread."""
    nodes: dict[str, int] = dict(db.execute("SELECT node_id, nid FROM nodes").fetchall())
    empty = db.execute("SELECT NOT EXISTS (SELECT 1 FROM runs)").fetchone()[0]
    added = 0
    db.execute("PRAGMA foreign_keys = OFF")  # no-op inside a transaction: set it first
    try:
        if not empty:
            for chunk in _chunks(tasks, chunk_runs):
                with _immediate(db):
                    added += _bulk_insert(db, chunk, queued, nodes)
            return added
        # Into an empty store: one transaction, the secondary indexes dropped first and
        # built again at the end (sorting once is cheaper than 1M random inserts).
        with _immediate(db):
            indexes = db.execute(
                "SELECT name, sql FROM sqlite_schema WHERE type = 'index' "
                "AND tbl_name IN ('runs', 'tasks') AND sql IS NOT NULL"
            ).fetchall()
            for name, _ in indexes:
                db.execute(f'DROP INDEX "{name}"')
            for chunk in _chunks(tasks, chunk_runs):
                added += _bulk_insert(db, chunk, queued, nodes)
            for _, sql in indexes:
                db.execute(sql)
        return added
    finally:
        db.execute("PRAGMA foreign_keys = ON")


def _token(row: Sequence[Any]) -> Token:
    return Token(
        name=row[0],
        secret_hash=row[1],
        scope=Scope(row[2]),
        created_at=_dt(row[3]),
        last_used=_dto(row[4]),
        builtin=bool(row[5]),
    )


_TOKEN_COLS = "name, secret_hash, scope, created_at, last_used, builtin"  # noqa: S105


def _task_seq(db: sqlite_utils.Database, task_id: str) -> int:
    row = db.execute("SELECT seq FROM tasks WHERE id = ?", (task_id,)).fetchone()
    if row is None:
        raise NotFound(f"no task {task_id}")
    return cast(int, row[0])


def _key_params(key: RunKey) -> dict[str, Any]:
    return {"task_id": key.task_id, "node_id": key.node_id}


def _run_exists(db: sqlite_utils.Database, key: RunKey) -> bool:
    row = db.execute(f"SELECT 1 FROM runs WHERE {_KEY_WHERE}", _key_params(key)).fetchone()
    return row is not None


_SURROGATES: Final = re.compile("[\ud800-\udfff]")


def _storable(value: Any) -> Any:
    """``value``, with lone surrogates (undecodable bytes kept by
    ``errors="surrogateescape"``, which UTF-8 cannot encode) replaced by U+FFFD."""
    return _SURROGATES.sub("\ufffd", value) if isinstance(value, str) else value


def _update_dispatched(
    db: sqlite_utils.Database, key: RunKey, assignments: str, params: dict[str, Any]
) -> Run:
    """Apply ``assignments`` to the run ``key`` if it is dispatched, else raise.

    Output and error texts that UTF-8 cannot encode are stored with U+FFFD in place of
    their lone surrogates, rather than losing the outcome.
    """
    sql = (
        f"UPDATE runs SET {assignments} WHERE {_KEY_WHERE} AND state = 'dispatched' "
        f"RETURNING {_RUN_COLS}"
    )
    try:
        rows = db.execute(sql, {**params, **_key_params(key)}).fetchall()
    except UnicodeEncodeError:  # raised while binding: nothing was executed
        clean = {name: _storable(value) for name, value in params.items()}
        rows = db.execute(sql, {**clean, **_key_params(key)}).fetchall()
    if not rows:
        if not _run_exists(db, key):
            raise NotFound(f"no run {key}")
        raise IllegalTransition(f"run {key} is not dispatched")
    return _run(key.task_id, key.node_id, rows[0])


# --------------------------------------------------------------------------- the worker

_Kind = Literal["read", "write", "exclusive"]


class _Job:
    """One function for the worker, and where its result goes."""

    __slots__ = ("bulk", "done", "error", "fn", "future", "kind", "loop", "result")

    def __init__(
        self,
        fn: Callable[[sqlite_utils.Database], Any],
        kind: _Kind,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        bulk: _Bulk | None = None,
    ) -> None:
        self.fn = fn
        self.kind = kind
        self.loop = loop
        self.future = future
        # jobs of a batch with the same bulk function may run as one call of it:
        # bulk[0](db, [their bulk[1]...]); alone (or if that fails), each runs fn
        self.bulk = bulk
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False

    def run(self, db: sqlite_utils.Database) -> None:
        try:
            self.result = _translated(lambda: self.fn(db))
        except Exception as exc:  # handed to the caller, whatever it is
            self.error = exc
        self.done = True

    def fail(self, exc: BaseException) -> None:
        self.result, self.error, self.done = None, exc, True


def _lock_database(path: str) -> int | None:
    """Take the exclusive lock of the database ``path`` (``<path>.lock``, flock) for as
    long as the store is open, and return its file descriptor.

    Two GhostRunner processes on one database would both recover and dispatch the same
    runs: an at_most_once command could run twice. The kernel drops the lock when the
    process dies, however it dies, so a restart after a crash is never blocked.
    """
    if path == ":memory:" or path.startswith("file:") or fcntl is None:
        return None
    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise StoreError(
            f"the database {path} is in use by another GhostRunner (pid {holder}, lock "
            f"{lock_path}); run one process per database"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


#: (function, payload): ``function(db, payloads)`` writes the payloads of several jobs
#: with *one* SQL statement (atomic: see ``_Worker._run_bulk``)
_Bulk = tuple[Callable[[sqlite_utils.Database, list[Any]], None], Any]


def _bulk_group(jobs: list[_Job], start: int) -> list[_Job]:
    """``jobs[start]`` and the jobs right after it that share its bulk function."""
    first = jobs[start]
    if first.bulk is None:
        return [first]
    end = start + 1
    while end < len(jobs) and (b := jobs[end].bulk) is not None and b[0] is first.bulk[0]:
        end += 1
    return jobs[start:end]


def _translated(call: Callable[[], _T]) -> _T:
    """``call()``, with the backend's exceptions turned into GhostRunner's."""
    try:
        return call()
    except GhostRunnerError:
        raise
    except sqlite3.IntegrityError as exc:
        if "UNIQUE" in str(exc) or getattr(exc, "sqlite_errorname", "").endswith(
            ("_UNIQUE", "_PRIMARYKEY")
        ):
            raise Conflict(f"already exists ({exc})") from exc
        raise StoreError(f"integrity error: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"SQLite error: {exc}") from exc
    except (UnicodeError, OverflowError) as exc:  # unencodable text, int beyond 64 bits
        raise StoreError(f"value cannot be stored: {exc}") from exc


def _fail_all(jobs: Iterable[_Job], message: str, cause: BaseException) -> None:
    """Fail every job of ``jobs`` that has not failed already (its work was undone)."""
    for job in jobs:
        if job.error is None:
            failure = StoreError(f"{message}: {cause}")
            failure.__cause__ = cause
            job.fail(failure)


def _deliver(jobs: list[_Job]) -> None:
    """On the event loop: hand the results over."""
    for job in jobs:
        if job.future.done():  # cancelled by its caller meanwhile
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)


class _Worker:
    """The thread that owns the connection, and its queue."""

    def __init__(self, path: str, *, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self.queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.closing = False
        self.ready: _Job | None = None
        self.finished = False  # the thread is done: the connection is closed
        self.waiters: list[_Job] = []  # close() calls waiting for that
        self._carry: _Job | None = None
        self._lock_fd: int | None = None
        self.commits = 0  # transactions committed by batches (for tests and benchmarks)
        self.thread = threading.Thread(target=self._main, name=f"ghostrunner-sqlite:{path}")
        self.thread.daemon = True

    # -------------------------------------------------------------- event loop side

    def submit(self, job: _Job) -> None:
        with self.lock:
            if self.closing:
                raise StoreError("the store is closed")
            self.queue.put(job)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.ready = _Job(lambda db: None, "exclusive", loop, loop.create_future())
        self.thread.start()
        await self.ready.future

    async def stop(self) -> None:
        """Let the thread finish the jobs queued so far, close the connection, exit."""
        loop = asyncio.get_running_loop()
        waiter = _Job(lambda db: None, "exclusive", loop, loop.create_future())
        with self.lock:
            if self.finished:
                return
            self.waiters.append(waiter)
            if not self.closing:
                self.closing = True
                self.queue.put(None)
        await waiter.future

    def abandon(self) -> None:
        """Stop after the jobs queued so far, without waiting (from any thread)."""
        with self.lock:
            if not self.closing:
                self.closing = True
                self.queue.put(None)

    # -------------------------------------------------------------- worker side

    def _connect(self) -> sqlite_utils.Database:
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # we BEGIN and COMMIT ourselves
            check_same_thread=True,
        )
        try:
            self._lock_fd = _lock_database(self.path)
            db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA foreign_keys = ON")
            if self.path != ":memory:":
                db.enable_wal()
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
            db.execute("PRAGMA cache_size = -65536")  # KiB: 64 MiB
            db.execute("PRAGMA temp_store = MEMORY")
            _migrate(db)
            for sql in _ADD_TASKS:
                db.execute(sql)
        except BaseException:
            conn.close()
            raise
        return db

    def _main(self) -> None:
        assert self.ready is not None
        try:
            db = _translated(self._connect)
        except Exception as exc:
            self._unlock()
            self.ready.fail(exc)
            self._resolve([self.ready])
            self._finish(f"the store could not be opened: {exc}")
            return
        self.ready.done = True
        self._resolve([self.ready])
        try:
            self._serve(db)
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA analysis_limit = 400")
                db.execute("PRAGMA optimize")  # refresh the planner's statistics
            with contextlib.suppress(sqlite3.Error):
                db.close()
            self._unlock()
            self._finish("the store is closed")

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _finish(self, message: str) -> None:
        """The thread's last act: fail what is left in the queue, wake close()."""
        with self.lock:
            self.closing = True
        self._fail_queued(message)
        with self.lock:
            self.finished = True
            waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.done = True
        self._resolve(waiters)

    def _next(self, block: bool, timeout: float | None = None) -> _Job | Literal[False] | None:
        """The next job; None is the stop sentinel; False: nothing (non-blocking)."""
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            return self.queue.get(block, timeout)
        except queue.Empty:
            return False

    def _serve(self, db: sqlite_utils.Database) -> None:
        while True:
            first = self._next(True)
            if first is None:
                return
            assert first is not False
            if first.kind == "exclusive":
                self._run_exclusive(db, first)
                continue
            batch = [first]
            stop = self._gather(batch)
            self._run_batch(db, batch)
            if stop:
                return

    def _gather(self, batch: list[_Job]) -> bool:
        """Add the jobs already queued to ``batch``. True if the stop sentinel was met.

        No waiting for more: the jobs that arrive while a batch runs (its fsync
        included) make the next batch, so a burst batches itself and a lone write is
        committed at once. Measured on ``POST /task/create`` under load, waiting a
        window of 1-2 ms for stragglers only lengthened the time the event loop sat
        idle waiting on the store (about a tenth less throughput)."""
        while len(batch) < _MAX_BATCH:
            job = self._next(False)
            if job is False:
                return False
            if job is None:
                return True
            if job.kind == "exclusive":
                self._carry = job
                return False
            batch.append(job)
        return False

    def _run_exclusive(self, db: sqlite_utils.Database, job: _Job) -> None:
        """A job that runs alone and manages its own transactions (bulk loads)."""
        if not job.future.cancelled():
            job.run(db)
            if db.conn.in_transaction:  # it left a transaction open: undo it
                self._rollback(db)
        self._resolve([job])

    def _run_batch(self, db: sqlite_utils.Database, batch: list[_Job]) -> None:
        jobs = [j for j in batch if not j.future.cancelled()]
        try:
            if self._autocommit(db, jobs):
                pass  # written and committed by its one statement
            elif any(j.kind == "write" for j in jobs):
                self._transaction(db, jobs)
            else:  # reads see committed data only: no transaction needed
                for job in jobs:
                    job.run(db)
        except Exception as exc:  # BEGIN, SAVEPOINT or COMMIT itself failed
            self._rollback(db)
            _fail_all(jobs, "the transaction failed", exc)
        self._resolve(jobs)

    def _transaction(self, db: sqlite_utils.Database, jobs: list[_Job]) -> None:
        """Run ``jobs`` in one transaction, each write in its own savepoint, and commit.

        A job that fails is rolled back alone. If SQLite itself rolled the whole
        transaction back (disk full, I/O error...), the jobs before it are failed too
        and the rest carry on in a new transaction.
        """
        savepoints = len(jobs) > 1
        db.execute("BEGIN IMMEDIATE")
        started = 0  # the first job of the current transaction
        i = 0
        while i < len(jobs):
            job = jobs[i]
            group = _bulk_group(jobs, i)
            if len(group) > 1 and self._run_bulk(db, group):
                i += len(group)
                continue
            if not db.conn.in_transaction:  # the failed bulk call lost the transaction
                _fail_all(jobs[started:i], "rolled back by a failure in the same batch",
                          StoreError("the transaction was rolled back"))
                started = i
                db.execute("BEGIN IMMEDIATE")
            for job in group:  # one by one, each in its own savepoint
                if savepoints and job.kind == "write":
                    db.execute("SAVEPOINT op")
                    job.run(db)
                    if job.error is None:
                        db.execute("RELEASE op")
                    elif db.conn.in_transaction:
                        db.execute("ROLLBACK TO op")
                        db.execute("RELEASE op")
                else:
                    job.run(db)
                i += 1
                if job.error is not None and not db.conn.in_transaction:
                    _fail_all(jobs[started:i - 1], "rolled back by a failure in the same batch",
                              job.error)
                    started = i
                    db.execute("BEGIN IMMEDIATE")
        if not savepoints and jobs[0].error is not None:
            db.rollback()
            return
        try:
            db.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            self._rollback(db)
            _fail_all(jobs[started:], "commit failed", exc)

    def _autocommit(self, db: sqlite_utils.Database, jobs: list[_Job]) -> bool:
        """Run a batch that is one bulk group (a burst of ``add_task``) as its single
        statement in autocommit mode: SQLite wraps it in a transaction of its own and
        commits it (fsync included) inside that one call, so the worker crosses into
        SQLite, and gives up the GIL, once for the whole batch. False if the batch is
        anything else, or if that failed (nothing was written): the caller then runs
        the jobs in a transaction of its own."""
        if not jobs or jobs[0].bulk is None or len(_bulk_group(jobs, 0)) < len(jobs):
            return False
        if not self._run_bulk(db, jobs):
            return False
        self.commits += 1
        return True

    @staticmethod
    def _run_bulk(db: sqlite_utils.Database, group: list[_Job]) -> bool:
        """Run ``group`` (jobs with the same bulk function) as one call of it. False if
        that failed: the caller runs the jobs one by one (so only the faulty one fails).

        A bulk function is one SQL statement, so a failure leaves nothing of it behind
        (SQLite undoes the statement) and no savepoint is needed around it."""
        assert group[0].bulk is not None
        try:
            group[0].bulk[0](db, [job.bulk[1] for job in group if job.bulk is not None])
        except Exception:
            return False
        for job in group:
            job.done = True
        return True

    @staticmethod
    def _rollback(db: sqlite_utils.Database) -> None:
        with contextlib.suppress(sqlite3.Error):
            db.rollback()

    def _resolve(self, jobs: Iterable[_Job]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in jobs:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
                loop.call_soon_threadsafe(_deliver, items)

    def _fail_queued(self, message: str) -> None:
        leftovers: list[_Job] = []
        if self._carry is not None:
            leftovers.append(self._carry)
            self._carry = None
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                leftovers.append(job)
        for job in leftovers:
            job.fail(StoreError(message))
        self._resolve(leftovers)


# --------------------------------------------------------------------------- the store


class SQLiteStore:
    """A :class:`~ghostrunner.Store` in an SQLite file (see the module docstring).

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
        self._worker: _Worker | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # ---------------------------------------------------------------- plumbing

    async def open(self) -> None:
        if self._worker is not None and not self._worker.closing:
            return
        worker = _Worker(self.path, synchronous=self.synchronous)
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
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.stop()

    async def _call(
        self, fn: Callable[[sqlite_utils.Database], _T], kind: _Kind, bulk: _Bulk | None = None
    ) -> _T:
        worker = self._worker
        if worker is None:
            raise StoreError("the store is not open")
        loop = asyncio.get_running_loop()
        job = _Job(fn, kind, loop, loop.create_future(), bulk)
        worker.submit(job)
        return cast(_T, await job.future)

    async def _read(self, fn: Callable[[sqlite_utils.Database], _T]) -> _T:
        return await self._call(fn, "read")

    async def _write(self, fn: Callable[[sqlite_utils.Database], _T]) -> _T:
        return await self._call(fn, "write")

    # ---------------------------------------------------------------- tasks

    async def add_task(self, task: Task, now: datetime) -> None:
        row = (*_task_row(task, task.targets), _ts(now))
        # tasks added concurrently are written with one set of statements (their jobs
        # share the bulk function): per-statement costs and the worker's hold on the
        # GIL are paid once per batch, not once per task
        await self._call(lambda db: _add_tasks(db, [row]), "write", bulk=(_add_tasks, row))

    async def bulk_add_tasks(
        self, tasks: Iterable[Task], now: datetime, *, chunk_runs: int = 250_000
    ) -> int:
        """Add many tasks fast (benchmarks, imports), as :meth:`add_task` would.

        ``tasks`` is consumed on the store's thread, and nothing else runs on the store
        meanwhile. The runs of ``chunk_runs`` runs or so go in with one ``INSERT ...
        SELECT`` over a JSON document (no per-row Python binding), with foreign key
        checks off (this method numbers the tasks and nodes itself). Into an empty
        store the whole load is one transaction and the indexes are built at the end;
        otherwise each chunk is one transaction, and a task id that exists raises
        ``Conflict`` and leaves the earlier chunks in. Returns how many runs were added.
        """
        queued = _ts(now)
        return await self._call(lambda db: _bulk_load(db, tasks, queued, chunk_runs), "exclusive")

    async def get_task(self, task_id: str) -> TaskSummary:
        def op(db: sqlite_utils.Database) -> TaskSummary:
            row = db.execute(f"{_SUMMARY_SELECT} WHERE t.id = ?", (task_id,)).fetchone()
            if row is None:
                raise NotFound(f"no task {task_id}")
            return _summary(row)

        return await self._read(op)

    async def get_runs(self, task_id: str) -> Sequence[Run]:
        def op(db: sqlite_utils.Database) -> list[Run]:
            seq = _task_seq(db, task_id)
            rows = db.execute(
                f"SELECT n.node_id, {_R_RUN_COLS} FROM runs AS r "
                "JOIN nodes AS n ON n.nid = r.node WHERE r.task_seq = ? ORDER BY r.position",
                (seq,),
            ).fetchall()
            return [_run(task_id, row[0], row[1:]) for row in rows]

        return await self._read(op)

    async def list_tasks(self, query: TaskQuery) -> Page:
        """Newest first; see :func:`_list_sql` for how each filter is served."""
        sql, params = _list_sql(query)

        def op(db: sqlite_utils.Database) -> Page:
            rows = db.execute(sql, params).fetchall()
            more = len(rows) > query.limit
            rows = rows[: query.limit]
            items = tuple(_summary(row) for row in rows)
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
            db.execute("DELETE FROM runs WHERE task_seq = ?", (seq,))
            db.execute("DELETE FROM task_counts WHERE task_seq = ?", (seq,))
            db.execute("DELETE FROM tasks WHERE seq = ?", (seq,))

        await self._write(op)

    # ---------------------------------------------------------------- the loop's verbs

    async def next_pending(
        self, node_ids: Collection[str], now: datetime, *, limit: int | None = None
    ) -> Sequence[Run]:
        if not node_ids or limit == 0:
            return []
        params = {
            "nodes": _json(dict.fromkeys(node_ids)),
            "now": _ts(now),
            "limit": -1 if limit is None else limit,
        }

        def op(db: sqlite_utils.Database) -> list[Run]:
            rows = db.execute(NEXT_PENDING_SQL, params).fetchall()
            return [_run(row[0], row[1], row[2:]) for row in rows]

        return await self._read(op)

    async def claim(self, key: RunKey, now: datetime) -> Run | None:
        params = {**_key_params(key), "now": _ts(now)}

        def op(db: sqlite_utils.Database) -> Run | None:
            rows = db.execute(CLAIM_SQL, params).fetchall()
            if rows:
                return _run(key.task_id, key.node_id, rows[0])
            if not _run_exists(db, key):
                raise NotFound(f"no run {key}")
            return None

        return await self._write(op)

    async def claim_many(
        self, keys: Sequence[RunKey], now: datetime
    ) -> Sequence[tuple[Run, Task]]:
        if not keys:
            return []
        stamp = _ts(now)

        def op(db: sqlite_utils.Database) -> list[tuple[Run, Task]]:
            claimed: list[Run] = []
            for key in keys:
                rows = db.execute(CLAIM_SQL, {**_key_params(key), "now": stamp}).fetchall()
                if rows:
                    claimed.append(_run(key.task_id, key.node_id, rows[0]))
                elif not _run_exists(db, key):
                    raise NotFound(f"no run {key}")
            ids = list(dict.fromkeys(run.task_id for run in claimed))
            tasks: dict[str, Task] = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                for row in db.execute(
                    f"SELECT {_TASK_COLS} FROM tasks AS t WHERE t.id IN ({marks})", chunk
                ):
                    tasks[row[1]] = _task(row)
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
            sets += ["exit_code = :exit_code", "output = :output", "output_truncated = :trunc"]
            params.update(
                exit_code=outcome.exit_code,
                output=outcome.output,
                trunc=int(outcome.output_truncated),
            )
            if outcome.finished_at is not None:
                finished = outcome.finished_at
            if outcome.started_at is not None:
                sets.append("started_at = :started")
                params["started"] = _ts(outcome.started_at)
        params["finished"] = _ts(finished)
        assignments = ", ".join(sets)
        return await self._write(lambda db: _update_dispatched(db, key, assignments, params))

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
        params = {"available": _ts(available_at), "error": error}
        return await self._write(lambda db: _update_dispatched(db, key, assignments, params))

    async def cancel(
        self, task_id: str, node_ids: Collection[str] | None = None, *, now: datetime
    ) -> Sequence[Run]:
        params: dict[str, Any] = {"now": _ts(now)}
        only = ""
        if node_ids is not None:
            params["nodes"] = _json(dict.fromkeys(node_ids))
            only = (
                " AND node IN (SELECT nid FROM nodes"
                " WHERE node_id IN (SELECT value FROM json_each(:nodes)))"
            )

        def op(db: sqlite_utils.Database) -> list[Run]:
            params["seq"] = _task_seq(db, task_id)
            rows = db.execute(
                "UPDATE runs SET state = 'cancelled', finished_at = :now "
                f"WHERE task_seq = :seq AND state = 'pending'{only} "
                f"RETURNING position, (SELECT node_id FROM nodes WHERE nid = node), {_RUN_COLS}",
                params,
            ).fetchall()
            rows.sort(key=lambda row: cast(int, row[0]))
            return [_run(task_id, row[1], row[2:]) for row in rows]

        return await self._write(op)

    async def expire_due(self, now: datetime) -> int:
        params = {"now": _ts(now)}
        return await self._write(lambda db: db.execute(EXPIRE_SQL, params).rowcount)

    async def dispatched(self) -> Sequence[Run]:
        def op(db: sqlite_utils.Database) -> list[Run]:
            return [_run(r[0], r[1], r[2:]) for r in db.execute(DISPATCHED_SQL).fetchall()]

        return await self._read(op)

    async def next_wakeup(self, now: datetime) -> datetime | None:
        params = {"now": _ts(now)}

        def op(db: sqlite_utils.Database) -> datetime | None:
            return _dto(db.execute(NEXT_WAKEUP_SQL, params).fetchone()[0])

        return await self._read(op)

    async def counts(self) -> Mapping[RunState, int]:
        def op(db: sqlite_utils.Database) -> dict[RunState, int]:
            rows = db.execute("SELECT state, n FROM run_counts WHERE n > 0").fetchall()
            return {RunState(state): n for state, n in rows}

        return await self._read(op)

    # ---------------------------------------------------------------- tokens

    async def add_token(self, token: Token) -> None:
        row = (
            token.name,
            token.secret_hash,
            token.scope.value,
            _ts(token.created_at),
            _tso(token.last_used),
            int(token.builtin),
        )

        def op(db: sqlite_utils.Database) -> None:
            try:
                db.execute(f"INSERT INTO tokens({_TOKEN_COLS}) VALUES (?,?,?,?,?,?)", row)
            except sqlite3.IntegrityError as exc:
                if "tokens.name" in str(exc):
                    raise Conflict(f"a token named {token.name!r} exists") from exc
                raise Conflict("a token with this secret exists") from exc

        await self._write(op)

    async def token_by_hash(self, secret_hash: str) -> Token | None:
        def op(db: sqlite_utils.Database) -> Token | None:
            row = db.execute(
                f"SELECT {_TOKEN_COLS} FROM tokens WHERE secret_hash = ?", (secret_hash,)
            ).fetchone()
            return None if row is None else _token(row)

        return await self._read(op)

    async def list_tokens(self) -> Sequence[Token]:
        def op(db: sqlite_utils.Database) -> list[Token]:
            rows = db.execute(f"SELECT {_TOKEN_COLS} FROM tokens ORDER BY created_at, id")
            return [_token(row) for row in rows.fetchall()]

        return await self._read(op)

    async def delete_token(self, name: str) -> None:
        def op(db: sqlite_utils.Database) -> None:
            if db.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no token named {name!r}")

        await self._write(op)

    async def touch_token(self, name: str, now: datetime) -> None:
        params = (_ts(now), name)
        await self._write(
            lambda db: db.execute("UPDATE tokens SET last_used = ? WHERE name = ?", params)
        )

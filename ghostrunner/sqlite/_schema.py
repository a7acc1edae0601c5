"""The schema, its version, and the migrations that bring a database up to it.

Version 1:

* ``tasks``: ``seq INTEGER PRIMARY KEY AUTOINCREMENT`` is the submission order (and the
  listing cursor; never reused), ``id`` is unique, ``targets`` a JSON array.
* ``nodes``: node ids are long strings (``node//`` + 64 characters) repeated in every run
  and in two indexes; they are interned as small integers (``nid``): the database
  with 1M runs went from 729 MB to 239 MB, and bulk loads got faster.
* ``runs``: one row per (task, device), ``PRIMARY KEY (task_seq, node)``, with
  ``position`` (target order) and every :class:`~ghostrunner.Run` field.
* ``task_counts`` (runs per state, per task) and ``run_counts`` (runs per state,
  overall) are kept by triggers on ``runs`` updates and deletes, so ``counts()``,
  ``get_task()`` and ``list_tasks()`` never count runs. Runs are only ever *inserted*
  ``pending``, by the ``add_tasks`` trigger (:mod:`._queries`), which adds to the counts
  itself (an insert trigger doubled the bulk load time).
* ``tokens``: ``name`` and ``secret_hash`` unique. Secrets are never stored.

Indexes: ``runs_pending_node (node, task_seq, available_at, expires_at) WHERE
state='pending'`` serves ``next_pending`` (first pending run per device in submission
order, without touching other runs); ``runs_pending_available`` and
``runs_pending_expiry`` (partial, pending only) serve ``next_wakeup`` and
``expire_due``; ``runs_dispatched`` (partial) serves ``dispatched``; ``runs_node (node,
task_seq)`` the listing by device; ``tasks_name`` the listing by name.

``PRAGMA user_version`` holds the schema version; :data:`MIGRATIONS` lists the
functions that bring a database from version *n* to *n + 1* (one transaction for the
whole upgrade). A database newer than this code is refused with a ``StoreError``, and
so is a database that has tables but is not a GhostRunner database
(``PRAGMA application_id``).

Raw SQL rather than sqlite-utils' ``create_table``: the tables need CHECK constraints,
partial indexes, triggers, ``WITHOUT ROWID`` and ``AUTOINCREMENT``, and SQLite keeps the
text of every CREATE statement in the file (``sqlite_schema``): the v1 text below is what
every v1 database holds, byte for byte, uneven indentation included. Never edit it: add a
migration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import sqlite_utils

from .._types import RunState
from ..errors import StoreError

APPLICATION_ID: Final = 0x47527374  # "GRst"; PRAGMA application_id of our databases

#: The run states of schema v1: the CHECK on runs.state, the task_counts columns.
V1_STATES: Final = (
    "pending", "dispatched", "succeeded", "failed", "timed_out", "expired", "cancelled", "lost"
)
assert tuple(s.value for s in RunState) == V1_STATES, "a new run state needs a migration"

_V1: Final = (
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
    """
        CREATE TABLE runs (
            task_seq         INTEGER NOT NULL REFERENCES tasks(seq) ON DELETE CASCADE,
            node             INTEGER NOT NULL REFERENCES nodes(nid),
            position         INTEGER NOT NULL,  -- index in the task's targets
            state            TEXT    NOT NULL CHECK (state IN ("""
    + ", ".join(f"'{s}'" for s in V1_STATES)
    + """)),
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
    """
        CREATE TABLE task_counts (
            task_seq INTEGER PRIMARY KEY REFERENCES tasks(seq) ON DELETE CASCADE,
            total    INTEGER NOT NULL,
            pending INTEGER NOT NULL DEFAULT 0,
    dispatched INTEGER NOT NULL DEFAULT 0,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    timed_out INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0
        )""",
    """
        CREATE TABLE run_counts (
            state TEXT PRIMARY KEY,
            n     INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
    "INSERT INTO run_counts(state) VALUES " + ", ".join(f"('{s}')" for s in V1_STATES),  # noqa: S608
    # task_counts and run_counts follow every change of state, and every delete
    """
        CREATE TRIGGER runs_state_changed AFTER UPDATE OF state ON runs
        WHEN OLD.state IS NOT NEW.state BEGIN
            UPDATE task_counts SET
                pending = pending + (NEW.state = 'pending') - (OLD.state = 'pending'),
        dispatched = dispatched + (NEW.state = 'dispatched') - (OLD.state = 'dispatched'),
        succeeded = succeeded + (NEW.state = 'succeeded') - (OLD.state = 'succeeded'),
        failed = failed + (NEW.state = 'failed') - (OLD.state = 'failed'),
        timed_out = timed_out + (NEW.state = 'timed_out') - (OLD.state = 'timed_out'),
        expired = expired + (NEW.state = 'expired') - (OLD.state = 'expired'),
        cancelled = cancelled + (NEW.state = 'cancelled') - (OLD.state = 'cancelled'),
        lost = lost + (NEW.state = 'lost') - (OLD.state = 'lost')
            WHERE task_seq = NEW.task_seq;
            UPDATE run_counts SET n = n - 1 WHERE state = OLD.state;
            UPDATE run_counts SET n = n + 1 WHERE state = NEW.state;
        END""",
    """
        CREATE TRIGGER runs_deleted AFTER DELETE ON runs BEGIN
            UPDATE task_counts SET
                total = total - 1,
                pending = pending - (OLD.state = 'pending'),
        dispatched = dispatched - (OLD.state = 'dispatched'),
        succeeded = succeeded - (OLD.state = 'succeeded'),
        failed = failed - (OLD.state = 'failed'),
        timed_out = timed_out - (OLD.state = 'timed_out'),
        expired = expired - (OLD.state = 'expired'),
        cancelled = cancelled - (OLD.state = 'cancelled'),
        lost = lost - (OLD.state = 'lost')
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
)


def _v1(db: sqlite_utils.Database) -> None:
    """The initial schema."""
    for sql in _V1:
        db.execute(sql)


#: Version 2: fleet targeting and rollouts. ``tasks.fleet`` holds a task's selector,
#: rollout and success exit codes as JSON (NULL for a plain task); ``continuous``,
#: ``per_minute`` and ``max_concurrent`` repeat what the loop looks tasks up by;
#: ``aborted`` (the reason) and ``closed`` (takes no more runs) are what operators and
#: the abort rule did; the flags
#: ``task_counts.paused`` and ``.aborted`` sit in the narrow per-task row the status
#: filters of the listing read (reading ``tasks`` there doubled a filtered walk)
#: ``attempts`` keeps every attempt of every run (the run row holds the latest).
_V2: Final = (
    "ALTER TABLE tasks ADD COLUMN fleet TEXT",
    "ALTER TABLE tasks ADD COLUMN continuous INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE tasks ADD COLUMN per_minute INTEGER",
    "ALTER TABLE tasks ADD COLUMN max_concurrent INTEGER",
    "ALTER TABLE tasks ADD COLUMN aborted TEXT",
    "ALTER TABLE tasks ADD COLUMN closed INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE task_counts ADD COLUMN paused INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE task_counts ADD COLUMN aborted INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX task_counts_paused ON task_counts(task_seq) WHERE paused",
    "CREATE INDEX tasks_open_continuous ON tasks(seq) WHERE continuous AND NOT closed",
    "CREATE INDEX tasks_rate_limited ON tasks(seq) WHERE per_minute IS NOT NULL",
    """CREATE INDEX tasks_limited ON tasks(seq)
        WHERE per_minute IS NOT NULL OR max_concurrent IS NOT NULL""",
    """CREATE TABLE attempts (
        task_seq         INTEGER NOT NULL REFERENCES tasks(seq) ON DELETE CASCADE,
        node             INTEGER NOT NULL REFERENCES nodes(nid),
        number           INTEGER NOT NULL,
        state            TEXT    NOT NULL,
        started_at       INTEGER,
        finished_at      INTEGER,
        exit_code        INTEGER,
        output           TEXT    NOT NULL DEFAULT '',
        output_truncated INTEGER NOT NULL DEFAULT 0,
        error            TEXT,
        PRIMARY KEY (task_seq, node, number)
    )""",
)


def _v2(db: sqlite_utils.Database) -> None:
    """Fleet targeting, rollouts and run history."""
    for sql in _V2:
        db.execute(sql)


#: Version 3: ``staged_tasks`` lists the large tasks being written in several
#: transactions (:mod:`._large`): their runs are in ``runs`` already, but every verb
#: leaves them out, and a store that opens the database removes what is left of them.
_V3: Final = (
    "CREATE TABLE staged_tasks (task_seq INTEGER PRIMARY KEY REFERENCES tasks(seq))",
)


def _v3(db: sqlite_utils.Database) -> None:
    """Large tasks written in chunks."""
    for sql in _V3:
        db.execute(sql)


#: Version 4: outcome recovery. ``recovered`` marks a run (and an attempt) whose
#: outcome came from the device's journal after GhostRunner had lost the reply.
_V4: Final = (
    "ALTER TABLE runs ADD COLUMN recovered INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE attempts ADD COLUMN recovered INTEGER NOT NULL DEFAULT 0",
)


def _v4(db: sqlite_utils.Database) -> None:
    """Outcomes recovered from the device's journal."""
    for sql in _V4:
        db.execute(sql)


#: Version 5: the HTTP server's audit log (``ghostrunner_http``'s ``AuditStore``): one
#: row per write it answered. ``id`` orders the log (newest first) and is its cursor;
#: ``at`` (microseconds, UTC) is what retention prunes by.
_V5: Final = (
    """CREATE TABLE audit (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        at       INTEGER NOT NULL,
        token    TEXT,
        address  TEXT,
        method   TEXT    NOT NULL,
        route    TEXT    NOT NULL,
        task_id  TEXT,
        status   INTEGER NOT NULL,
        counts   TEXT    NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX audit_at ON audit(at)",
    "CREATE INDEX audit_token ON audit(token, id)",
    "CREATE INDEX audit_task ON audit(task_id, id) WHERE task_id IS NOT NULL",
)


def _v5(db: sqlite_utils.Database) -> None:
    """The audit log."""
    for sql in _V5:
        db.execute(sql)


#: Version 6: the event log (:mod:`ghostrunner.events`): one row per change, written by
#: the verb that made it, in its transaction. ``AUTOINCREMENT``: an id is never used
#: twice, even once every event was pruned (a reader's cursor stays valid). One writer
#: (the store's thread) commits them in id order. No index on ``at``: retention deletes
#: from the oldest id up, and an index would cost every event an insert more.
_V6: Final = (
    """CREATE TABLE events (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        at       INTEGER NOT NULL,
        kind     TEXT    NOT NULL,
        task_id  TEXT    NOT NULL,
        node_id  TEXT,
        data     TEXT    NOT NULL DEFAULT '{}'
    )""",
)


#: Version 7: the HTTP server's webhook outbox (``ghostrunner_http``'s
#: ``WebhookStore``). ``webhook_cursors``: per webhook (by name), the id of the last
#: event taken into its outbox. ``webhook_deliveries``: one row per (webhook, event),
#: with the body sent on every attempt and its message id; ``webhook_deliveries_due``
#: (pending only) serves the claims, ``webhook_deliveries_finished`` the pruning.
_V7: Final = (
    """CREATE TABLE webhook_cursors (
        webhook  TEXT    PRIMARY KEY,
        event_id INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE webhook_deliveries (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        webhook         TEXT    NOT NULL,
        event_id        INTEGER NOT NULL,
        kind            TEXT    NOT NULL,
        msg_id          TEXT    NOT NULL,
        body            TEXT    NOT NULL,
        status          TEXT    NOT NULL
                        CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        created_at      INTEGER NOT NULL,
        started_at      INTEGER NOT NULL,
        next_attempt_at INTEGER,
        lease_until     INTEGER,
        last_attempt_at INTEGER,
        last_status     INTEGER,
        last_error      TEXT,
        finished_at     INTEGER,
        UNIQUE (webhook, event_id)
    )""",
    """CREATE INDEX webhook_deliveries_due ON webhook_deliveries(webhook, next_attempt_at)
        WHERE status = 'pending'""",
    """CREATE INDEX webhook_deliveries_finished ON webhook_deliveries(finished_at)
        WHERE status != 'pending'""",
    "CREATE INDEX webhook_deliveries_status ON webhook_deliveries(status, id)",
    "CREATE INDEX webhook_deliveries_event ON webhook_deliveries(event_id)",
)


def _v6(db: sqlite_utils.Database) -> None:
    """The event log."""
    for sql in _V6:
        db.execute(sql)


def _v7(db: sqlite_utils.Database) -> None:
    """The webhook outbox."""
    for sql in _V7:
        db.execute(sql)


#: ``MIGRATIONS[n]`` brings a database from schema version n to n + 1. Append only.
MIGRATIONS: Final[tuple[Callable[[sqlite_utils.Database], None], ...]] = (
    _v1, _v2, _v3, _v4, _v5, _v6, _v7,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def migrate(db: sqlite_utils.Database) -> None:
    """Bring the database up to :data:`SCHEMA_VERSION`, in one transaction."""
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
            MIGRATIONS[step](db)
            db.execute(f"PRAGMA user_version = {step + 1}")
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise

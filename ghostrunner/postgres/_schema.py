"""The schema, its version, and the migrations that bring a database up to it.

Version 1 (what SQLite's versions 1 to 4 built, in one step):

* ``tasks``: ``seq`` (an identity column) is the submission order and the listing
  cursor; ``id`` is unique; ``targets`` a ``text[]``; ``fleet`` the selector, rollout and
  success exit codes as JSON text (NULL for a plain task); ``aborted`` (the reason) and
  ``closed`` (takes no more runs) are what operators and the abort rule did.
* ``runs``: one row per (task, device), ``PRIMARY KEY (task_seq, node)``, with
  ``position`` (target order) and every :class:`~ghostrunner.Run` field. ``output`` is
  ``bytea`` (UTF-8): PostgreSQL's ``text`` cannot hold NUL characters, and command
  output may have them.
* ``attempts``: every attempt of every run (the run row holds the latest).
* ``task_counts``: runs per state, per task, and the ``paused``/``aborted`` flags the
  listing's status filters read. Kept by statement-level triggers on ``runs`` updates
  and deletes (transition tables: one UPDATE per statement, rows locked in ``task_seq``
  order so that concurrent statements cannot deadlock on them); runs are only ever
  *inserted* pending, by the store, which adds them to the counts itself.
* ``tokens``: ``name`` and ``secret_hash`` unique. Secrets are never stored.

Indexes: ``runs_pending_node (node, task_seq) INCLUDE (available_at, expires_at) WHERE
state = 'pending'`` serves ``next_pending`` (the first pending run of a device in
submission order, from the index alone); ``runs_one_dispatched UNIQUE (node) WHERE state
= 'dispatched'``: **at most one dispatched run per device**, enforced by the database
for every process sharing it (``claim_many`` skips a device that has one); it also
serves ``dispatched()``. ``runs_pending_available`` and ``runs_pending_expiry``
(partial) serve ``next_wakeup`` and ``expire_due``; ``runs_node`` the listing by
device; ``tasks_name`` the listing by name.

``ghostrunner_schema`` holds the schema version (one row). :func:`migrate` runs in one
transaction under an advisory lock, so that processes starting together do not race:
the first migrates, the others wait and find the schema current. A database newer than
this code is refused with a ``StoreError``, and so is one that has GhostRunner's table
names but no version row (not GhostRunner's). Never edit a migration: add one.
"""

# ruff: noqa: S608
# (SQL built from this module's constants only; every value is a bound parameter.)

from __future__ import annotations

from typing import Final

import psycopg

from .._types import RunState
from ..errors import StoreError

#: The advisory lock the migrations run under ("GRst").
MIGRATION_LOCK: Final = 0x47527374
#: The advisory lock of the event log's sequencer ("GRev"; schema 3 to 5: of every event
#: writer, from its insert to its commit).
EVENTS_LOCK: Final = 0x47526576

V1_STATES: Final = (
    "pending", "dispatched", "succeeded", "failed", "timed_out", "expired", "cancelled", "lost"
)
assert tuple(s.value for s in RunState) == V1_STATES, "a new run state needs a migration"

_STATE_LIST: Final = ", ".join(f"'{s}'" for s in V1_STATES)


def _delta(new: str, old: str | None) -> str:
    """The task_counts assignments for a change from ``old`` rows to ``new`` rows."""
    parts = []
    for s in V1_STATES:
        minus = f" - count(*) FILTER (WHERE {old}.state = '{s}')" if old else ""
        plus = f"count(*) FILTER (WHERE {new}.state = '{s}')" if new else "0"
        parts.append(f"{plus}{minus} AS {s}")
    return ", ".join(parts)


_V1: Final = (
    """
    CREATE TABLE ghostrunner_schema (
        one     boolean PRIMARY KEY DEFAULT true CHECK (one),
        version integer NOT NULL
    )""",
    """
    CREATE TABLE tasks (
        seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id             text NOT NULL UNIQUE,
        name           text NOT NULL,
        command        text NOT NULL,
        targets        text[] NOT NULL,
        created_at     timestamptz NOT NULL,
        shell          text NOT NULL,
        run_as_user    boolean NOT NULL,
        timeout        double precision NOT NULL,
        not_before     timestamptz,
        expires_at     timestamptz,
        max_attempts   integer NOT NULL,
        delivery       text NOT NULL,
        fleet          text,
        continuous     boolean NOT NULL DEFAULT false,
        per_minute     integer,
        max_concurrent integer,
        aborted        text,
        closed         boolean NOT NULL DEFAULT false
    )""",
    "CREATE INDEX tasks_name ON tasks(name, seq)",
    "CREATE INDEX tasks_open_continuous ON tasks(seq) WHERE continuous AND NOT closed",
    "CREATE INDEX tasks_rate_limited ON tasks(seq) WHERE per_minute IS NOT NULL",
    """CREATE INDEX tasks_limited ON tasks(seq)
        WHERE per_minute IS NOT NULL OR max_concurrent IS NOT NULL""",
    f"""
    CREATE TABLE runs (
        task_seq         bigint NOT NULL REFERENCES tasks(seq) ON DELETE CASCADE,
        node             text NOT NULL,
        position         integer NOT NULL,
        state            text NOT NULL CHECK (state IN ({_STATE_LIST})),
        attempts         integer NOT NULL DEFAULT 0,
        undelivered      integer NOT NULL DEFAULT 0,
        queued_at        timestamptz NOT NULL,
        available_at     timestamptz NOT NULL,
        expires_at       timestamptz,
        started_at       timestamptz,
        finished_at      timestamptz,
        exit_code        bigint,
        output           bytea NOT NULL DEFAULT '',
        output_truncated boolean NOT NULL DEFAULT false,
        error            text,
        recovered        boolean NOT NULL DEFAULT false,
        PRIMARY KEY (task_seq, node)
    )""",
    """CREATE INDEX runs_pending_node ON runs(node, task_seq)
        INCLUDE (available_at, expires_at) WHERE state = 'pending'""",
    "CREATE UNIQUE INDEX runs_one_dispatched ON runs(node) WHERE state = 'dispatched'",
    "CREATE INDEX runs_pending_available ON runs(available_at) WHERE state = 'pending'",
    """CREATE INDEX runs_pending_expiry ON runs(expires_at)
        WHERE state = 'pending' AND expires_at IS NOT NULL""",
    "CREATE INDEX runs_node ON runs(node, task_seq)",
    """
    CREATE TABLE attempts (
        task_seq         bigint NOT NULL,
        node             text NOT NULL,
        number           integer NOT NULL,
        state            text NOT NULL,
        started_at       timestamptz,
        finished_at      timestamptz,
        exit_code        bigint,
        output           bytea NOT NULL DEFAULT '',
        output_truncated boolean NOT NULL DEFAULT false,
        error            text,
        recovered        boolean NOT NULL DEFAULT false,
        PRIMARY KEY (task_seq, node, number),
        FOREIGN KEY (task_seq, node) REFERENCES runs ON DELETE CASCADE
    )""",
    "CREATE INDEX attempts_started ON attempts(started_at)",
    """
    CREATE TABLE task_counts (
        task_seq bigint PRIMARY KEY REFERENCES tasks(seq) ON DELETE CASCADE,
        total    integer NOT NULL DEFAULT 0,
        paused   boolean NOT NULL DEFAULT false,
        aborted  boolean NOT NULL DEFAULT false,
        """ + ",\n        ".join(f"{s} integer NOT NULL DEFAULT 0" for s in V1_STATES) + """
    )""",
    "CREATE INDEX task_counts_paused ON task_counts(task_seq) WHERE paused",
    # task_counts follows every change of state and every delete of runs: one UPDATE
    # per statement, its rows locked in task_seq order first (no deadlock between two
    # statements that change runs of the same tasks)
    f"""
    CREATE FUNCTION ghostrunner_runs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM 1 FROM task_counts WHERE task_seq IN (
            SELECT n.task_seq FROM new_runs AS n JOIN old_runs AS o USING (task_seq, node)
            WHERE n.state <> o.state)
        ORDER BY task_seq FOR NO KEY UPDATE;
        UPDATE task_counts AS c SET
            {", ".join(f"{s} = c.{s} + d.{s}" for s in V1_STATES)}
        FROM (SELECT n.task_seq, {_delta("n", "o")}
              FROM new_runs AS n JOIN old_runs AS o USING (task_seq, node)
              WHERE n.state <> o.state GROUP BY n.task_seq) AS d
        WHERE c.task_seq = d.task_seq;
        RETURN NULL;
    END $$""",
    """
    CREATE TRIGGER runs_updated AFTER UPDATE ON runs
        REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs
        FOR EACH STATEMENT EXECUTE FUNCTION ghostrunner_runs_updated()""",
    f"""
    CREATE FUNCTION ghostrunner_runs_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM 1 FROM task_counts WHERE task_seq IN (SELECT task_seq FROM old_runs)
        ORDER BY task_seq FOR NO KEY UPDATE;
        UPDATE task_counts AS c SET total = c.total - d.total,
            {", ".join(f"{s} = c.{s} + d.{s}" for s in V1_STATES)}
        FROM (SELECT o.task_seq, count(*) AS total, {_delta("", "o")}
              FROM old_runs AS o GROUP BY o.task_seq) AS d
        WHERE c.task_seq = d.task_seq;
        RETURN NULL;
    END $$""",
    """
    CREATE TRIGGER runs_deleted AFTER DELETE ON runs
        REFERENCING OLD TABLE AS old_runs
        FOR EACH STATEMENT EXECUTE FUNCTION ghostrunner_runs_deleted()""",
    """
    CREATE TABLE tokens (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name        text NOT NULL UNIQUE,
        secret_hash text NOT NULL UNIQUE,
        scope       text NOT NULL,
        created_at  timestamptz NOT NULL,
        last_used   timestamptz,
        builtin     boolean NOT NULL DEFAULT false
    )""",
)

#: Version 2: the HTTP server's audit log (``ghostrunner_http``'s ``AuditStore``): one
#: row per write it answered; ``id`` orders it (newest first) and is its cursor.
_V2: Final = (
    """
    CREATE TABLE audit (
        id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at       timestamptz NOT NULL,
        token    text,
        address  text,
        method   text NOT NULL,
        route    text NOT NULL,
        task_id  text,
        status   integer NOT NULL,
        counts   jsonb NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX audit_at ON audit(at)",
    "CREATE INDEX audit_token ON audit(token, id)",
    "CREATE INDEX audit_task ON audit(task_id, id) WHERE task_id IS NOT NULL",
)

#: Version 3: the event log (:mod:`ghostrunner.events`): one row per change, written by
#: the verb that made it, in its transaction. Ids must become visible in increasing
#: order (a reader's cursor is the last id it saw), which a sequence alone does not
#: give: two transactions take ids 9 and 10, the second commits first, a reader sees 10
#: and misses 9. So every transaction that writes events takes the advisory lock
#: :data:`EVENTS_LOCK` just before its insert (its last statement) and holds it until
#: it commits: event writers take their ids and commit one at a time, in id order.
#: No index on ``at``: retention deletes from the oldest id up.
_V3: Final = (
    """
    CREATE TABLE events (
        id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at       timestamptz NOT NULL,
        kind     text NOT NULL,
        task_id  text NOT NULL,
        node_id  text,
        data     jsonb NOT NULL DEFAULT '{}'
    )""",
)

#: Version 4: the HTTP server's webhook outbox (``ghostrunner_http``'s
#: ``WebhookStore``). ``webhook_cursors``: per webhook (by name), the id of the last
#: event taken into its outbox (moved by compare-and-set, so that of several processes
#: only one takes a batch of events). ``webhook_deliveries``: one row per (webhook,
#: event), with the body sent on every attempt and its message id; claims lock their
#: rows ``FOR UPDATE SKIP LOCKED`` and set a lease (``lease_until``).
_V4: Final = (
    """
    CREATE TABLE webhook_cursors (
        webhook  text   PRIMARY KEY,
        event_id bigint NOT NULL
    )""",
    """
    CREATE TABLE webhook_deliveries (
        id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        webhook         text    NOT NULL,
        event_id        bigint  NOT NULL,
        kind            text    NOT NULL,
        msg_id          text    NOT NULL,
        body            text    NOT NULL,
        status          text    NOT NULL
                        CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts        integer NOT NULL DEFAULT 0,
        created_at      timestamptz NOT NULL,
        started_at      timestamptz NOT NULL,
        next_attempt_at timestamptz,
        lease_until     timestamptz,
        last_attempt_at timestamptz,
        last_status     integer,
        last_error      text,
        finished_at     timestamptz,
        UNIQUE (webhook, event_id)
    )""",
    """CREATE INDEX webhook_deliveries_due ON webhook_deliveries(webhook, next_attempt_at)
        WHERE status = 'pending'""",
    """CREATE INDEX webhook_deliveries_finished ON webhook_deliveries(finished_at)
        WHERE status <> 'pending'""",
    "CREATE INDEX webhook_deliveries_status ON webhook_deliveries(status, id)",
    "CREATE INDEX webhook_deliveries_event ON webhook_deliveries(event_id)",
)

#: Version 5: several runners on one database (:mod:`ghostrunner.runners`). ``runners``:
#: one row per runner start, its lease (``expires_at``, by the database's clock) renewed
#: by heartbeats; ``ended_at`` and ``adopted_by`` once a survivor took over its runs,
#: ``stopped`` if it stopped gracefully. ``runs.runner``: the runner that dispatched
#: the run last (finish and release are conditional on it while it is dispatched);
#: NULL for runs dispatched before this version (adopted by the first runner to start).
_V5: Final = (
    """
    CREATE TABLE runners (
        id           text PRIMARY KEY,
        name         text NOT NULL,
        version      text NOT NULL,
        started_at   timestamptz NOT NULL,
        heartbeat_at timestamptz NOT NULL,
        expires_at   timestamptz NOT NULL,
        stopped      boolean NOT NULL DEFAULT false,
        ended_at     timestamptz,
        adopted_by   text
    )""",
    "CREATE INDEX runners_live ON runners(expires_at) WHERE ended_at IS NULL",
    "ALTER TABLE runs ADD COLUMN runner text",
    "CREATE INDEX runs_dispatched_runner ON runs(runner) WHERE state = 'dispatched'",
)


def _net(rows: str, state: str) -> str:
    """The net change of ``state`` in ``rows`` (``state``, ``k``: +1 new, -1 old)."""
    return f"coalesce(sum({rows}.k) FILTER (WHERE {rows}.state = '{state}'), 0)"


#: The runs' net change of state per task in an UPDATE statement: the new rows counted
#: in, the old rows counted out, no join (a row whose state did not change cancels out).
_NET_CHANGE: Final = f"""
    SELECT x.task_seq, {", ".join(f"{_net('x', s)} AS {s}" for s in V1_STATES)}
    FROM (SELECT task_seq, state, 1 AS k FROM new_runs
          UNION ALL SELECT task_seq, state, -1 FROM old_runs) AS x
    GROUP BY x.task_seq
    HAVING {" OR ".join(f"{_net('x', s)} <> 0" for s in V1_STATES)}"""

#: Version 6: event ids handed out by a sequencer, no lock across any verb's commit.
#:
#: * ``event_inbox``: a verb writes its events here, in its own transaction, taking no
#:   lock (version 3 had every event writer hold ``EVENTS_LOCK`` from its insert to its
#:   commit: every claim, finish and create of every runner committed one at a time).
#: * A *sequencer pass* (``PostgresStore``: before every read of the log, and shortly
#:   after a commit that wrote events) takes ``EVENTS_LOCK``, moves every committed row
#:   of the inbox into ``events`` (ids from ``events``' identity, in inbox order) and
#:   commits: only passes take ids, one pass at a time, each committing before the next
#:   takes any, so ids still become visible in increasing order, and a cursor never
#:   skips one. A verb's events keep their order (inbox order is insert order, and a
#:   change that depends on another's commit is inserted after it).
#: * The counts trigger on ``runs`` updates computes the net change without joining
#:   the transition tables: its cached plan was a nested loop over both (quadratic in
#:   the rows of a statement; 37 % of PostgreSQL's CPU in the reconnect storm).
_V6: Final = (
    """
    CREATE TABLE event_inbox (
        seq      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at       timestamptz NOT NULL,
        kind     text NOT NULL,
        task_id  text NOT NULL,
        node_id  text,
        data     jsonb NOT NULL DEFAULT '{}'
    )""",
    f"""
    CREATE OR REPLACE FUNCTION ghostrunner_runs_updated() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM 1 FROM task_counts WHERE task_seq IN (SELECT d.task_seq FROM ({_NET_CHANGE}) AS d)
        ORDER BY task_seq FOR NO KEY UPDATE;
        UPDATE task_counts AS c SET
            {", ".join(f"{s} = c.{s} + d.{s}" for s in V1_STATES)}
        FROM ({_NET_CHANGE}) AS d
        WHERE c.task_seq = d.task_seq;
        RETURN NULL;
    END $$""",
)

#: ``MIGRATIONS[n]`` brings a database from schema version n to n + 1. Append only.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (_V1, _V2, _V3, _V4, _V5, _V6)
SCHEMA_VERSION: Final = len(MIGRATIONS)

#: GhostRunner's tables: a database that has one of them but no version is not ours.
_TABLES: Final = ("tasks", "runs", "attempts", "task_counts", "tokens", "audit", "events",
                  "webhook_cursors", "webhook_deliveries", "runners", "event_inbox")


async def schema_version(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
    """The database's schema version (0: none yet). Refuses a foreign database."""
    cur = await conn.execute("SELECT to_regclass('ghostrunner_schema') IS NOT NULL")
    row = await cur.fetchone()
    if row is not None and row[0]:
        cur = await conn.execute("SELECT version FROM ghostrunner_schema")
        found = await cur.fetchone()
        if found is None:
            raise StoreError("the database has a ghostrunner_schema table without a version")
        version = found[0]
        assert isinstance(version, int)
        return version
    cur = await conn.execute(
        "SELECT count(*) FROM unnest(%s::text[]) AS t(name) WHERE to_regclass(t.name) IS NOT NULL",
        (list(_TABLES),),
    )
    row = await cur.fetchone()
    if row is not None and row[0]:
        raise StoreError(
            "the database has tables named like GhostRunner's but is not a GhostRunner "
            "database (no ghostrunner_schema table): use another database or schema"
        )
    return 0


async def migrate(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
    """Bring the database up to :data:`SCHEMA_VERSION`, in one transaction under an
    advisory lock. Returns the version found before."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        version = await schema_version(conn)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the database schema is version {version}, newer than this GhostRunner "
                f"understands ({SCHEMA_VERSION}): upgrade GhostRunner"
            )
        for step in range(version, SCHEMA_VERSION):
            for sql in MIGRATIONS[step]:
                await conn.execute(sql)
        if version == 0:
            await conn.execute("INSERT INTO ghostrunner_schema(version) VALUES (%s)",
                               (SCHEMA_VERSION,))
        elif version < SCHEMA_VERSION:
            await conn.execute("UPDATE ghostrunner_schema SET version = %s", (SCHEMA_VERSION,))
    return version

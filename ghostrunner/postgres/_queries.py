"""The SQL text of the store's verbs, values <-> PostgreSQL values, and row -> value
builders.

Parameters are psycopg's ``%(name)s`` placeholders; lists go in as arrays and are
``unnest``-ed (``WITH ORDINALITY`` where order matters), so a verb on 10,000 devices is
one statement with one parameter, not 10,000.
"""

# ruff: noqa: S608
# (SQL is assembled only from this module's constants and enum-derived identifiers;
# every value is a bound parameter.)

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from .._sqlkit import STATUS_SQL, fleet_fields, fleet_json
from .._types import (
    Attempt,
    Delivery,
    Run,
    RunState,
    Shell,
    Task,
    TaskQuery,
    TaskStatus,
    TaskSummary,
    trusted,
)
from ..errors import StoreError
from ..events import created_data
from ..tokens import Scope, Token

STATES: Final = tuple(RunState)  # the state names double as task_counts column names
_MAX_SEQ: Final = (1 << 63) - 1

# --------------------------------------------------------------------------- values


def ts(value: datetime) -> datetime:
    """An aware datetime, as stored (``timestamptz``, microseconds: like SQLiteStore)."""
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise StoreError(f"datetime {value!r} is not timezone-aware")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise StoreError(f"datetime {value!r} is outside the years 1-9999 in UTC") from None


def tso(value: datetime | None) -> datetime | None:
    return None if value is None else ts(value)


_SURROGATES: Final = re.compile("[\ud800-\udfff]")


def text(value: str | None) -> str | None:
    """Text as a ``text`` column takes it: lone surrogates (undecodable bytes kept by
    ``errors="surrogateescape"``) become U+FFFD, as in SQLiteStore, and so do NUL
    characters, which PostgreSQL's text cannot hold (error messages only: output is
    stored as bytes, NULs and all)."""
    if value is None:
        return None
    return _SURROGATES.sub("\ufffd", value).replace("\x00", "\ufffd")


def blob(value: str) -> bytes:
    """Output as stored: UTF-8, lone surrogates as U+FFFD (like SQLiteStore)."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", value).encode("utf-8")


def unblob(value: bytes) -> str:
    return bytes(value).decode("utf-8")


# --------------------------------------------------------------------------- columns

RUN_COLS: Final = (
    "state, attempts, undelivered, queued_at, available_at, expires_at, started_at, "
    "finished_at, exit_code, output, output_truncated, error, recovered"
)
R_RUN_COLS: Final = ", ".join(f"r.{c}" for c in RUN_COLS.split(", "))
TASK_COLS: Final = (
    "t.seq, t.id, t.name, t.command, t.targets, t.created_at, t.shell, t.run_as_user, "
    "t.timeout, t.not_before, t.expires_at, t.max_attempts, t.delivery, t.fleet"
)
_COUNTS_AT: Final = 17  # in a summary row, the per-state counts follow the task's columns
TOKEN_COLS: Final = "name, secret_hash, scope, created_at, last_used, builtin"  # noqa: S105
#: The seq of the task :task_id.
TASK_SEQ: Final = "(SELECT seq FROM tasks WHERE id = %(task_id)s)"
#: The run of a RunKey (parameters task_id and node_id).
KEY_WHERE: Final = f"task_seq = {TASK_SEQ} AND node = %(node_id)s"
_SUMMARY_COLS: Final = (
    f"{TASK_COLS}, c.paused, t.aborted, t.closed, {', '.join(f'c.{s.value}' for s in STATES)}"
)
SUMMARY_SELECT: Final = (
    f"SELECT {_SUMMARY_COLS} FROM tasks AS t JOIN task_counts AS c ON c.task_seq = t.seq"
)

# --------------------------------------------------------------------------- tasks

ADD_TASK_SQL: Final = """
INSERT INTO tasks(id, name, command, targets, created_at, shell, run_as_user, timeout,
                  not_before, expires_at, max_attempts, delivery, fleet, continuous,
                  per_minute, max_concurrent)
VALUES (%(id)s, %(name)s, %(command)s, %(targets)s, %(created_at)s, %(shell)s,
        %(run_as_user)s, %(timeout)s, %(not_before)s, %(expires_at)s, %(max_attempts)s,
        %(delivery)s, %(fleet)s, %(continuous)s, %(per_minute)s, %(max_concurrent)s)
ON CONFLICT (id) DO NOTHING
RETURNING seq
"""

#: ``add_task`` of several tasks in one statement (a group commit), from one JSON array
#: (``batch``: one object per task, their ids distinct, ``ord`` their submission order,
#: which seqs follow; one JSON text is far cheaper to send than twenty arrays; ``audit``
#: an audit entry to store with the task, or null). Returns the id of each task added
#: (a task whose id exists returns no row, and leaves no audit entry).
ADD_TASKS_SQL: Final = """
WITH k AS (
    SELECT * FROM jsonb_to_recordset(%(batch)s::jsonb) AS k(
        id text, name text, command text, targets jsonb, created_at timestamptz,
        shell text, run_as_user boolean, timeout double precision, not_before timestamptz,
        expires_at timestamptz, max_attempts integer, delivery text, fleet text,
        continuous boolean, per_minute integer, max_concurrent integer, nodes jsonb,
        n integer, data jsonb, now timestamptz, ord integer, audit jsonb)
), t AS (
    INSERT INTO tasks(id, name, command, targets, created_at, shell, run_as_user, timeout,
                      not_before, expires_at, max_attempts, delivery, fleet, continuous,
                      per_minute, max_concurrent)
    SELECT id, name, command, ARRAY(SELECT jsonb_array_elements_text(targets)),
           created_at, shell, run_as_user, timeout, not_before, expires_at, max_attempts,
           delivery, fleet, continuous, per_minute, max_concurrent
    FROM k ORDER BY ord
    ON CONFLICT (id) DO NOTHING
    RETURNING seq, id
), added AS (
    SELECT k.*, t.seq FROM k JOIN t ON t.id = k.id
), counted AS (
    INSERT INTO task_counts(task_seq, total, pending) SELECT seq, n, n FROM added
), queued AS (
    INSERT INTO runs(task_seq, node, position, state, queued_at, available_at, expires_at)
    SELECT a.seq, u.node, u.i - 1, 'pending', a.now, coalesce(a.not_before, a.now),
           a.expires_at
    FROM added AS a, jsonb_array_elements_text(a.nodes) WITH ORDINALITY AS u(node, i)
), logged AS (
    INSERT INTO event_inbox(at, kind, task_id, data)
    SELECT now, 'task.created', id, data FROM added ORDER BY ord
), audited AS (
    INSERT INTO audit(at, token, address, method, route, task_id, status, counts)
    SELECT u.at, u.token, u.address, u.method, u.route, u.task_id, u.status, u.counts
    FROM added AS a CROSS JOIN LATERAL jsonb_to_record(a.audit) AS u(
        at timestamptz, token text, address text, method text, route text, task_id text,
        status integer, counts jsonb)
    WHERE jsonb_typeof(a.audit) = 'object'
    ORDER BY a.ord
), signal AS (
    SELECT pg_notify(%(channel)s, %(payload)s)
    WHERE %(notify)s AND EXISTS (SELECT 1 FROM added WHERE n > 0)
)
SELECT id, (SELECT count(*) FROM signal) FROM t
"""

#: New runs of a task (seq) for the nodes of the array nodes that have none, after its
#: other runs.
ADD_RUNS_SQL: Final = f"""
INSERT INTO runs(task_seq, node, position, state, queued_at, available_at, expires_at)
SELECT t.seq, u.node, %(start)s + u.ord - 1, 'pending', %(now)s,
       coalesce(t.not_before, %(now)s), t.expires_at
FROM unnest(%(nodes)s::text[]) WITH ORDINALITY AS u(node, ord)
JOIN tasks AS t ON t.seq = %(seq)s
WHERE NOT EXISTS (SELECT 1 FROM runs AS r WHERE r.task_seq = t.seq AND r.node = u.node)
ORDER BY u.ord
RETURNING position, node, {RUN_COLS}
"""

# --------------------------------------------------------------------------- the loop's

#: For each device of the array nodes, its first pending run in submission order that
#: is available, not expired, and whose task is neither paused nor one of skip: one
#: index search per device (runs_pending_node), then the run by its primary key. A
#: device with a dispatched run (another runner's: this one does not ask for its own
#: busy devices) is left out, by one probe of runs_one_dispatched.
NEXT_PENDING_SQL: Final = f"""
WITH held AS MATERIALIZED (
    SELECT coalesce(array_agg(seq), '{{}}') AS seqs FROM (
        SELECT task_seq AS seq FROM task_counts WHERE paused
        UNION ALL
        SELECT seq FROM tasks WHERE id = ANY(%(skip)s::text[])) AS h
)
SELECT t.id, r.node, {R_RUN_COLS}
FROM unnest(%(nodes)s::text[]) WITH ORDINALITY AS j(node, ord)
CROSS JOIN held
CROSS JOIN LATERAL (
    SELECT p.task_seq FROM runs AS p
    WHERE p.node = j.node AND p.state = 'pending' AND p.available_at <= %(now)s
      AND (p.expires_at IS NULL OR p.expires_at > %(now)s)
      AND p.task_seq <> ALL(held.seqs)
    ORDER BY p.task_seq LIMIT 1) AS f
JOIN runs AS r ON r.task_seq = f.task_seq AND r.node = j.node
JOIN tasks AS t ON t.seq = r.task_seq
WHERE NOT EXISTS (SELECT 1 FROM runs AS d WHERE d.node = j.node AND d.state = 'dispatched')
ORDER BY j.ord
LIMIT %(limit)s
"""

#: Claim the runs of the arrays task_ids/node_ids (no device twice): pending, task not
#: paused, device without a dispatched run; runner (NULL: none given) becomes their
#: owner. Rows another transaction holds are skipped (SKIP LOCKED), not waited for.
CLAIM_SQL: Final = f"""
WITH wanted AS (
    SELECT r.task_seq, r.node, k.ord, k.task_id
    FROM unnest(%(task_ids)s::text[], %(node_ids)s::text[]) WITH ORDINALITY
         AS k(task_id, node, ord)
    JOIN tasks AS t ON t.id = k.task_id
    JOIN runs AS r ON r.task_seq = t.seq AND r.node = k.node
    WHERE r.state = 'pending'
      AND NOT EXISTS (SELECT 1 FROM task_counts AS c WHERE c.task_seq = r.task_seq AND c.paused)
      AND NOT EXISTS (SELECT 1 FROM runs AS d WHERE d.node = r.node AND d.state = 'dispatched')
    ORDER BY r.task_seq, r.node
    FOR NO KEY UPDATE OF r SKIP LOCKED
), up AS (
    UPDATE runs AS r SET state = 'dispatched', attempts = r.attempts + 1,
                         started_at = %(now)s, recovered = false, runner = %(runner)s
    FROM wanted AS w
    WHERE r.task_seq = w.task_seq AND r.node = w.node
    RETURNING w.ord, w.task_id, r.task_seq, r.node, {R_RUN_COLS}
), logged AS (
    INSERT INTO event_inbox(at, kind, task_id, node_id, data)
    SELECT %(now)s, 'run.claimed', up.task_id, up.node, jsonb_strip_nulls(jsonb_build_object(
        'state', up.state, 'attempts', up.attempts, 'exit_code', up.exit_code,
        'recovered', CASE WHEN up.recovered THEN true END))
    FROM up ORDER BY up.ord
)
SELECT ord, task_seq, node, {RUN_COLS} FROM up
"""

#: The rollout limits of the tasks named in the array ids that have some, with their
#: runs dispatched now; their task_counts rows are locked until the claim commits, so
#: that claims of one limited task, by any runner, count one after the other.
LIMITS_SQL: Final = """
SELECT t.id, t.max_concurrent, t.per_minute, c.dispatched
FROM tasks AS t JOIN task_counts AS c ON c.task_seq = t.seq
WHERE t.id = ANY(%(ids)s::text[])
  AND (t.max_concurrent IS NOT NULL OR t.per_minute IS NOT NULL)
ORDER BY t.seq
FOR NO KEY UPDATE OF c
"""

#: The starts after since of the runs of the tasks of the array ids (in flight, and
#: in the attempt history): their rate windows.
TASK_STARTS_SQL: Final = """
SELECT t.id, r.started_at FROM tasks AS t JOIN runs AS r ON r.task_seq = t.seq
WHERE t.id = ANY(%(ids)s::text[]) AND r.state = 'dispatched' AND r.started_at > %(since)s
UNION ALL
SELECT t.id, a.started_at FROM tasks AS t JOIN attempts AS a ON a.task_seq = t.seq
WHERE t.id = ANY(%(ids)s::text[]) AND a.started_at > %(since)s
"""

#: The keys of the arrays task_ids/node_ids that name no run (their ordinal).
MISSING_SQL: Final = """
SELECT k.ord FROM unnest(%(task_ids)s::text[], %(node_ids)s::text[]) WITH ORDINALITY
    AS k(task_id, node, ord)
WHERE NOT EXISTS (SELECT 1 FROM tasks AS t JOIN runs AS r ON r.task_seq = t.seq
                  WHERE t.id = k.task_id AND r.node = k.node)
ORDER BY k.ord LIMIT 1
"""

TASKS_BY_SEQ_SQL: Final = f"SELECT {TASK_COLS} FROM tasks AS t WHERE t.seq = ANY(%(seqs)s)"

#: The attempt a dispatched run just finished (after the UPDATE that finished it), or,
#: with state 'lost', the one a release sends again (before the UPDATE).
RECORD_ATTEMPT_SQL: Final = f"""
INSERT INTO attempts(task_seq, node, number, state, started_at, finished_at, exit_code,
                     output, output_truncated, error, recovered)
SELECT task_seq, node, attempts, coalesce(%(state)s, state), started_at,
       coalesce(%(finished)s, finished_at), exit_code, output, output_truncated,
       coalesce(%(error)s, error), recovered
FROM runs WHERE {KEY_WHERE} AND state = %(when)s
ON CONFLICT (task_seq, node, number) DO UPDATE SET
    state = excluded.state, started_at = excluded.started_at,
    finished_at = excluded.finished_at, exit_code = excluded.exit_code,
    output = excluded.output, output_truncated = excluded.output_truncated,
    error = excluded.error, recovered = excluded.recovered
"""

_ATTEMPT_COLS: Final = (
    "task_seq, node, number, state, started_at, finished_at, exit_code, output, "
    "output_truncated, error, recovered"
)


#: ``finish`` of several runs in one statement (a group commit: the runs finished while
#: the previous statement ran), each as :func:`finish_sql` would, from arrays (one entry
#: per run; the keys distinct). ``has_outcome`` false: exit code, output and recovered
#: stay; ``started`` NULL: started_at stays. One NOTIFY for all (``payload``), if one of
#: the devices has a pending run. Returns ``ord`` (1-based) and the run of each run
#: finished; a run not dispatched (by its ``owner``, when given) returns no row.
FINISH_MANY_SQL: Final = f"""
WITH u AS (
    SELECT k.*, t.seq
    FROM unnest(%(task_ids)s::text[], %(node_ids)s::text[], %(states)s::text[],
                %(ats)s::timestamptz[], %(finished)s::timestamptz[], %(errors)s::text[],
                %(clipped)s::text[], %(has_outcome)s::boolean[], %(exit_codes)s::bigint[],
                %(outputs)s::bytea[], %(truncated)s::boolean[], %(recovered)s::boolean[],
                %(started)s::timestamptz[], %(owners)s::text[]) WITH ORDINALITY
         AS k(task_id, node, state, at, finished, error, clipped, has_outcome, exit_code,
              output, truncated, recovered, started, owner, ord)
    JOIN tasks AS t ON t.id = k.task_id
), up AS (
    UPDATE runs AS r SET
        state = u.state, finished_at = u.finished, error = u.error,
        exit_code = CASE WHEN u.has_outcome THEN u.exit_code ELSE r.exit_code END,
        output = CASE WHEN u.has_outcome THEN u.output ELSE r.output END,
        output_truncated = CASE WHEN u.has_outcome THEN u.truncated
                                ELSE r.output_truncated END,
        recovered = CASE WHEN u.has_outcome THEN u.recovered ELSE r.recovered END,
        started_at = coalesce(u.started, r.started_at)
    FROM u
    WHERE r.task_seq = u.seq AND r.node = u.node AND r.state = 'dispatched'
      AND (u.owner IS NULL OR r.runner = u.owner)
    RETURNING u.ord, u.task_id, u.at, u.clipped, r.task_seq, r.node, {R_RUN_COLS}
), history AS (
    INSERT INTO attempts({_ATTEMPT_COLS})
    SELECT task_seq, node, attempts, state, started_at, finished_at, exit_code, output,
           output_truncated, error, recovered
    FROM up
    ON CONFLICT (task_seq, node, number) DO UPDATE SET
        state = excluded.state, started_at = excluded.started_at,
        finished_at = excluded.finished_at, exit_code = excluded.exit_code,
        output = excluded.output, output_truncated = excluded.output_truncated,
        error = excluded.error, recovered = excluded.recovered
), logged AS (
    INSERT INTO event_inbox(at, kind, task_id, node_id, data)
    SELECT up.at, 'run.finished', up.task_id, up.node, jsonb_strip_nulls(jsonb_build_object(
        'state', up.state, 'attempts', up.attempts, 'exit_code', up.exit_code,
        'recovered', CASE WHEN up.recovered THEN true END, 'error', up.clipped))
    FROM up ORDER BY up.ord
), signal AS (
    SELECT pg_notify(%(channel)s, %(payload)s)
    WHERE %(notify)s AND EXISTS (SELECT 1 FROM up) AND EXISTS (
        SELECT 1 FROM runs AS p WHERE p.node = ANY(%(node_ids)s::text[]) AND p.state = 'pending')
)
SELECT ord, {RUN_COLS}, (SELECT count(*) FROM signal) FROM up
"""


ATTEMPTS_SQL: Final = """
SELECT a.node, a.number, a.state, a.started_at, a.finished_at, a.exit_code, a.output,
       a.output_truncated, a.error, a.recovered
FROM attempts AS a
JOIN runs AS r ON r.task_seq = a.task_seq AND r.node = a.node
WHERE a.task_seq = %(seq)s ORDER BY r.position, a.number
"""

OPEN_CONTINUOUS_SQL: Final = f"""
SELECT {TASK_COLS} FROM tasks AS t
WHERE t.continuous AND NOT t.closed AND (t.expires_at IS NULL OR t.expires_at > %(now)s)
ORDER BY t.seq
"""

ROLLOUT_TASKS_SQL: Final = f"""
SELECT {TASK_COLS} FROM tasks AS t JOIN task_counts AS c ON c.task_seq = t.seq
WHERE (t.per_minute IS NOT NULL OR t.max_concurrent IS NOT NULL)
  AND c.pending + c.dispatched > 0
ORDER BY t.seq
"""

RECENT_STARTS_SQL: Final = """
SELECT t.id, r.started_at FROM tasks AS t JOIN runs AS r ON r.task_seq = t.seq
WHERE t.per_minute IS NOT NULL AND r.state = 'dispatched' AND r.started_at > %(since)s
UNION ALL
SELECT t.id, a.started_at FROM tasks AS t JOIN attempts AS a ON a.task_seq = t.seq
WHERE t.per_minute IS NOT NULL AND a.started_at > %(since)s
"""

EXPIRE_SQL: Final = """
UPDATE runs SET state = 'expired', finished_at = %(now)s,
    error = 'expired before it could start'
WHERE state = 'pending' AND expires_at <= %(now)s
RETURNING task_seq, position, (SELECT id FROM tasks WHERE seq = task_seq), node
"""

#: Write events into the inbox (no lock: the sequencer gives them their ids; see
#: _schema's version 6), in the order given.
EMIT_SQL: Final = """
INSERT INTO event_inbox(at, kind, task_id, node_id, data)
SELECT %(at)s, u.kind, u.task_id, u.node_id, u.data::jsonb
FROM unnest(%(kinds)s::text[], %(task_ids)s::text[], %(node_ids)s::text[],
            %(data)s::text[]) WITH ORDINALITY AS u(kind, task_id, node_id, data, i)
ORDER BY u.i
"""

#: Whether the inbox holds committed events (rows a pass in progress is moving still
#: count: its delete is not committed).
INBOX_SQL: Final = "SELECT EXISTS (SELECT 1 FROM event_inbox)"

#: A sequencer pass, under EVENTS_LOCK (taken by the statement before, so that this
#: statement's snapshot sees every pass before it committed): the inbox's committed
#: rows move to the log, taking their ids in inbox order.
SEQUENCE_SQL: Final = """
WITH moved AS (DELETE FROM event_inbox RETURNING seq, at, kind, task_id, node_id, data)
INSERT INTO events(at, kind, task_id, node_id, data)
SELECT at, kind, task_id, node_id, data FROM moved ORDER BY seq
"""

EVENTS_AFTER_SQL: Final = """
SELECT id, at, kind, task_id, node_id, data FROM events WHERE id > %s ORDER BY id LIMIT %s
"""

PRUNE_EVENTS_SQL: Final = """
DELETE FROM events WHERE id < coalesce(
    (SELECT id FROM events WHERE at >= %(before)s ORDER BY id LIMIT 1),
    (SELECT max(id) + 1 FROM events))
"""

NEXT_WAKEUP_SQL: Final = """
SELECT least(
    (SELECT min(available_at) FROM runs WHERE state = 'pending' AND available_at > %(now)s),
    (SELECT min(expires_at) FROM runs WHERE state = 'pending' AND expires_at > %(now)s))
"""

DISPATCHED_SQL: Final = f"""
SELECT t.id, r.node, {R_RUN_COLS} FROM runs AS r JOIN tasks AS t ON t.seq = r.task_seq
WHERE r.state = 'dispatched' ORDER BY r.task_seq, r.position
"""

COUNTS_SQL: Final = (
    f"SELECT {', '.join(f'coalesce(sum({s.value}), 0)' for s in STATES)} FROM task_counts"
)


def _columns(task: Task) -> dict[str, Any]:
    """The ``tasks`` columns of ``task`` but its times."""
    return {
        "id": task.id,
        "name": task.name,
        "command": task.command,
        "targets": list(task.targets),
        "shell": task.shell.value,
        "run_as_user": task.run_as_user,
        "timeout": float(task.timeout),
        "max_attempts": task.max_attempts,
        "delivery": task.delivery.value,
        "fleet": fleet_json(task),
        "continuous": task.continuous,
        "per_minute": task.rollout.per_minute,
        "max_concurrent": task.rollout.max_concurrent,
    }


def task_params(task: Task, now: datetime) -> dict[str, Any]:
    """The ``tasks`` columns of ``task``, and the time its runs are queued at."""
    return {**_columns(task), "created_at": ts(task.created_at),
            "not_before": tso(task.not_before), "expires_at": tso(task.expires_at),
            "now": ts(now)}


def task_json(task: Task, now: datetime, nodes: Sequence[str] | None) -> dict[str, Any]:
    """``task`` as an object of :data:`ADD_TASKS_SQL`'s batch (but ``ord`` and
    ``audit``): its ``tasks`` columns, the time its runs are queued at, the nodes they
    are for (default: its targets), and its ``task.created`` event's ``data``."""
    listed = list(task.targets if nodes is None else nodes)
    return {
        **_columns(task),
        "created_at": ts(task.created_at).isoformat(),
        "not_before": None if task.not_before is None else ts(task.not_before).isoformat(),
        "expires_at": None if task.expires_at is None else ts(task.expires_at).isoformat(),
        "nodes": listed,
        "n": len(listed),
        "data": created_data(task.name, listed),
        "now": ts(now).isoformat(),
    }


# --------------------------------------------------------------------------- listing

def list_sql(query: TaskQuery) -> tuple[str, dict[str, Any]]:
    """The statement listing ``query``'s page (plus one row, to know if more follow),
    newest first: by device along ``runs_node``, by name along ``tasks_name``, else
    along ``task_counts``' primary key. The cursor is the page's last task's ``seq``."""
    start = _MAX_SEQ
    if query.cursor is not None:
        try:
            start = min(max(int(query.cursor), 0), _MAX_SEQ)
        except ValueError:
            start = 0  # like the reference store: an unknown cursor ends the listing
    params: dict[str, Any] = {"start": start, "limit": query.limit + 1}
    where = []
    if query.node_id is not None:
        source = (
            "runs AS r JOIN tasks AS t ON t.seq = r.task_seq"
            " JOIN task_counts AS c ON c.task_seq = r.task_seq"
        )
        where.append("r.node = %(node_id)s")
        order = "r.task_seq"
        params["node_id"] = query.node_id
    else:
        source = "task_counts AS c JOIN tasks AS t ON t.seq = c.task_seq"
        order = "t.seq" if query.name is not None else "c.task_seq"
    where.append(f"{order} < %(start)s")
    if query.name is not None:
        where.append("t.name = %(name)s")
        params["name"] = query.name
    if query.state is not None:
        where.append(f"c.{RunState(query.state).value} > 0")
    if query.status is not None:
        where.append(f"({STATUS_SQL[TaskStatus(query.status)]})")
    sql = (
        f"SELECT {_SUMMARY_COLS} FROM {source} WHERE {' AND '.join(where)} "
        f"ORDER BY {order} DESC LIMIT %(limit)s"
    )
    return sql, params


# --------------------------------------------------------------------------- rows -> values


def run(task_id: str, node_id: str, row: Sequence[Any]) -> Run:
    """A Run from ``row``: the columns of :data:`RUN_COLS`."""
    return trusted(
        Run,
        task_id=task_id,
        node_id=node_id,
        state=RunState(row[0]),
        attempts=row[1],
        undelivered=row[2],
        queued_at=row[3],
        available_at=row[4],
        expires_at=row[5],
        started_at=row[6],
        finished_at=row[7],
        exit_code=row[8],
        output=unblob(row[9]),
        output_truncated=row[10],
        error=row[11],
        recovered=row[12],
    )


def task(row: Sequence[Any]) -> Task:
    """A Task from ``row``: the columns of :data:`TASK_COLS` (seq first)."""
    return trusted(
        Task,
        id=row[1],
        name=row[2],
        command=row[3],
        targets=tuple(row[4]),
        created_at=row[5],
        shell=Shell(row[6]),
        run_as_user=row[7],
        timeout=row[8],
        not_before=row[9],
        expires_at=row[10],
        max_attempts=row[11],
        delivery=Delivery(row[12]),
        **fleet_fields(row[13]),
    )


def summary(row: Sequence[Any]) -> TaskSummary:
    """A TaskSummary from a :data:`SUMMARY_SELECT` row."""
    counts = {s: n for s, n in zip(STATES, row[_COUNTS_AT:], strict=True) if n}
    return TaskSummary(
        task=task(row), counts=counts, paused=row[14], aborted=row[15], closed=row[16],
    )


def attempt(row: Sequence[Any]) -> Attempt:
    """An Attempt from an :data:`ATTEMPTS_SQL` row (after the node id)."""
    return trusted(
        Attempt, number=row[0], state=RunState(row[1]), started_at=row[2],
        finished_at=row[3], exit_code=row[4], output=unblob(row[5]),
        output_truncated=row[6], error=row[7], recovered=row[8],
    )


def token(row: Sequence[Any]) -> Token:
    """A Token from ``row``: the columns of :data:`TOKEN_COLS`."""
    return Token(
        name=row[0],
        secret_hash=row[1],
        scope=Scope(row[2]),
        created_at=row[3],
        last_used=row[4],
        builtin=row[5],
    )


# --------------------------------------------------------------------------- runners
# Times are the database server's (clock_timestamp()): runners on several hosts agree
# on who is dead whatever their own clocks say.

#: The channel of NOTIFY/LISTEN (see PostgresStore.signal).
CHANNEL: Final = "ghostrunner"

REGISTER_SQL: Final = """
INSERT INTO runners(id, name, version, started_at, heartbeat_at, expires_at)
VALUES (%(id)s, %(name)s, %(version)s, %(started_at)s, clock_timestamp(),
        clock_timestamp() + make_interval(secs => %(lease)s))
"""

#: Renew the lease of runner id (not adopted, not stopped); the other live runners.
RENEW_SQL: Final = """
WITH renewed AS (
    UPDATE runners SET heartbeat_at = clock_timestamp(),
                       expires_at = clock_timestamp() + make_interval(secs => %(lease)s)
    WHERE id = %(id)s AND ended_at IS NULL AND NOT stopped
    RETURNING id
)
SELECT (SELECT count(*) FROM renewed),
       (SELECT count(*) FROM runners WHERE ended_at IS NULL AND NOT stopped
            AND expires_at > clock_timestamp() AND id <> %(id)s)
"""

#: Declare dead the runners whose lease ended more than grace seconds ago, and those
#: stopped. A row locked by a concurrent adoption (or renewal) is waited for and checked
#: again (READ COMMITTED), so each runner is declared dead once, by one adopter.
BURY_SQL: Final = """
UPDATE runners SET ended_at = clock_timestamp(), adopted_by = %(id)s
WHERE ended_at IS NULL AND id <> %(id)s
  AND (stopped OR expires_at < clock_timestamp() - make_interval(secs => %(grace)s))
RETURNING id
"""

#: Make runner id the owner of every dispatched run whose owner ended (the ones just
#: buried, and any a dead runner claimed too late) or that has none (dispatched before
#: runners were recorded). Row locks and the re-check make each run adopted once.
ADOPT_SQL: Final = f"""
UPDATE runs AS r SET runner = %(id)s
FROM tasks AS t
WHERE t.seq = r.task_seq AND r.state = 'dispatched'
  AND (r.runner IS NULL
       OR r.runner IN (SELECT x.id FROM runners AS x WHERE x.ended_at IS NOT NULL))
RETURNING t.id, r.node, {R_RUN_COLS}
"""

#: When to look for dead runners again: seconds until the first other live lease ends
#: (plus the grace), and how many other runners are alive.
NEXT_EXPIRY_SQL: Final = """
SELECT extract(epoch FROM min(expires_at) - clock_timestamp()) + %(grace)s,
       count(*) FILTER (WHERE expires_at > clock_timestamp())
FROM runners WHERE ended_at IS NULL AND NOT stopped AND id <> %(id)s
"""

RETIRE_SQL: Final = """
UPDATE runners SET stopped = true, expires_at = clock_timestamp() WHERE id = %(id)s
"""

#: Runners that ended (adopted, or stopped with nothing left to adopt) long ago.
PRUNE_RUNNERS_SQL: Final = """
DELETE FROM runners WHERE ended_at < clock_timestamp() - interval '7 days'
"""

RUNNERS_SQL: Final = """
SELECT x.id, x.name, x.version, x.started_at, x.heartbeat_at, x.expires_at, x.stopped,
       x.adopted_by, extract(epoch FROM clock_timestamp() - x.heartbeat_at),
       x.expires_at > clock_timestamp(), coalesce(d.n, 0)
FROM runners AS x
LEFT JOIN (SELECT runner, count(*) AS n FROM runs WHERE state = 'dispatched'
           GROUP BY runner) AS d ON d.runner = x.id
WHERE x.ended_at IS NULL OR x.ended_at > clock_timestamp() - interval '1 hour'
   OR d.n > 0
ORDER BY x.started_at, x.id
"""


#: Audit entries, one per object of the JSON array ``batch`` (``i``: the order ids follow).
AUDIT_MANY_SQL: Final = """
INSERT INTO audit(at, token, address, method, route, task_id, status, counts)
SELECT at, token, address, method, route, task_id, status, counts
FROM jsonb_to_recordset(%(batch)s::jsonb) AS u(
    at timestamptz, token text, address text, method text, route text, task_id text,
    status integer, counts jsonb, i integer)
ORDER BY i
"""

"""The SQL text of the store's verbs, and the row -> value builders.

Raw SQL rather than sqlite-utils' table methods: the hot paths need exact control of
each statement (partial indexes named with ``INDEXED BY``, ``RETURNING``, ``json_each``
over a JSON parameter, one statement where sqlite-utils would issue several), and the
query-plan tests (tests/contract) check these very strings.
"""

# ruff: noqa: S608
# (SQL is assembled only from this module's constants and enum-derived identifiers;
# every value is a bound parameter.)

from __future__ import annotations

import json
from collections.abc import Sequence
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
from ..events import created_data
from ..tokens import Scope, Token
from ._values import dt, dto, ts, tso

STATES: Final = tuple(RunState)  # the state names double as task_counts column names
_MAX_SEQ: Final = (1 << 63) - 1

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
#: The tasks being written in several transactions (:mod:`._large`): every verb that
#: reads ``tasks`` or ``runs`` other than through ``task_counts`` leaves them out.
#: Uncorrelated, over a table that is empty but while a large task is being added.
STAGED: Final = "(SELECT task_seq FROM staged_tasks)"
#: The run of a RunKey (named parameters :task_id and :node_id).
KEY_WHERE: Final = (
    f"task_seq = (SELECT seq FROM tasks WHERE id = :task_id AND seq NOT IN {STAGED}) "
    "AND node = (SELECT nid FROM nodes WHERE node_id = :node_id)"
)
_SUMMARY_COLS: Final = (
    f"{TASK_COLS}, c.paused, t.aborted, t.closed, {', '.join(f'c.{s.value}' for s in STATES)}"
)
SUMMARY_SELECT: Final = (
    f"SELECT {_SUMMARY_COLS} FROM tasks AS t JOIN task_counts AS c ON c.task_seq = t.seq"
)

# --------------------------------------------------------------------------- the loop's

#: The tasks whose runs must not start: paused ones, those of the JSON array :skip
#: (at their rollout limits), and staged ones. Uncorrelated: SQLite evaluates it once
#: per statement.
_HELD: Final = (
    "(SELECT task_seq FROM task_counts WHERE paused UNION ALL "
    "SELECT seq FROM tasks WHERE id IN (SELECT value FROM json_each(:skip)) UNION ALL "
    "SELECT task_seq FROM staged_tasks)"
)

#: For each device in the JSON array :nodes, its first pending run in submission order
#: that is available, not expired, and not held; only index searches (see the contract
#: tests).
NEXT_PENDING_SQL: Final = f"""
SELECT t.id, j.value, {R_RUN_COLS}
FROM json_each(:nodes) AS j
JOIN nodes AS n ON n.node_id = j.value
JOIN runs AS r ON r.rowid = (
    SELECT p.rowid FROM runs AS p INDEXED BY runs_pending_node
    WHERE p.node = n.nid AND p.state = 'pending' AND p.available_at <= :now
      AND (p.expires_at IS NULL OR p.expires_at > :now)
      AND p.task_seq NOT IN {_HELD}
    ORDER BY p.task_seq LIMIT 1)
JOIN tasks AS t ON t.seq = r.task_seq
ORDER BY j.key
LIMIT :limit
"""

CLAIM_SQL: Final = f"""
UPDATE runs SET state = 'dispatched', attempts = attempts + 1, started_at = :now,
                recovered = 0
WHERE {KEY_WHERE} AND state = 'pending'
  AND task_seq NOT IN (SELECT task_seq FROM task_counts WHERE paused)
RETURNING {RUN_COLS}
"""

#: The attempt a dispatched run just finished (after the UPDATE that finished it), or,
#: with :state 'lost', the one a release sends again (before the UPDATE).
RECORD_ATTEMPT_SQL: Final = f"""
INSERT OR REPLACE INTO attempts(task_seq, node, number, state, started_at, finished_at,
                                exit_code, output, output_truncated, error, recovered)
SELECT task_seq, node, attempts, coalesce(:state, state), started_at,
       coalesce(:finished, finished_at), exit_code, output, output_truncated,
       coalesce(:error, error), recovered
FROM runs WHERE {KEY_WHERE}
"""

ATTEMPTS_SQL: Final = """
SELECT n.node_id, a.number, a.state, a.started_at, a.finished_at, a.exit_code, a.output,
       a.output_truncated, a.error, a.recovered
FROM attempts AS a
JOIN runs AS r ON r.task_seq = a.task_seq AND r.node = a.node
JOIN nodes AS n ON n.nid = a.node
WHERE a.task_seq = :seq ORDER BY r.position, a.number
"""

#: New runs of a task (:seq) for the nodes of the JSON array :nodes that have none.
ADD_RUNS_SQL: Final = f"""
INSERT INTO runs(task_seq, node, position, state, queued_at, available_at, expires_at)
SELECT :seq, n.nid, :start + j.key, 'pending', :now, coalesce(t.not_before, :now),
       t.expires_at
FROM json_each(:nodes) AS j
JOIN nodes AS n ON n.node_id = j.value
JOIN tasks AS t ON t.seq = :seq
WHERE NOT EXISTS (SELECT 1 FROM runs WHERE task_seq = :seq AND node = n.nid)
ORDER BY j.key
RETURNING position, (SELECT node_id FROM nodes WHERE nid = node), {RUN_COLS}
"""

OPEN_CONTINUOUS_SQL: Final = f"""
SELECT {TASK_COLS} FROM tasks AS t INDEXED BY tasks_open_continuous
WHERE t.continuous AND NOT t.closed AND (t.expires_at IS NULL OR t.expires_at > :now)
  AND t.seq NOT IN {STAGED}
ORDER BY t.seq
"""

ROLLOUT_TASKS_SQL: Final = f"""
SELECT {TASK_COLS} FROM tasks AS t INDEXED BY tasks_limited
CROSS JOIN task_counts AS c ON c.task_seq = t.seq
WHERE (t.per_minute IS NOT NULL OR t.max_concurrent IS NOT NULL)
  AND c.pending + c.dispatched > 0
ORDER BY t.seq
"""

RECENT_STARTS_SQL: Final = """
SELECT t.id, r.started_at FROM tasks AS t INDEXED BY tasks_rate_limited
CROSS JOIN runs AS r ON r.task_seq = t.seq
WHERE t.per_minute IS NOT NULL AND r.state = 'dispatched' AND r.started_at > :since
UNION ALL
SELECT t.id, a.started_at FROM tasks AS t INDEXED BY tasks_rate_limited
CROSS JOIN attempts AS a ON a.task_seq = t.seq
WHERE t.per_minute IS NOT NULL AND a.started_at > :since
"""

EXPIRE_SQL: Final = f"""
UPDATE runs SET state = 'expired', finished_at = :now,
    error = 'expired before it could start'
WHERE state = 'pending' AND expires_at <= :now AND task_seq NOT IN {STAGED}
RETURNING task_seq, position, (SELECT id FROM tasks WHERE seq = task_seq),
          (SELECT node_id FROM nodes WHERE nid = node)
"""

NEXT_WAKEUP_SQL: Final = f"""
SELECT min(x) FROM (
    SELECT min(available_at) AS x FROM runs WHERE state = 'pending' AND available_at > :now
      AND task_seq NOT IN {STAGED}
    UNION ALL
    SELECT min(expires_at) FROM runs WHERE state = 'pending' AND expires_at > :now
      AND task_seq NOT IN {STAGED}
)
"""

DISPATCHED_SQL: Final = f"""
SELECT t.id, n.node_id, {R_RUN_COLS} FROM runs AS r INDEXED BY runs_dispatched
JOIN tasks AS t ON t.seq = r.task_seq JOIN nodes AS n ON n.nid = r.node
WHERE r.state = 'dispatched' ORDER BY r.task_seq, r.position
"""

# --------------------------------------------------------------------------- adding tasks

#: Per connection (TEMP, not in the database file): the view tasks are added through,
#: one JSON document of :func:`task_row` arrays per INSERT (:data:`ADD_TASKS_SQL`), and
#: the trigger that writes the tasks, their pending runs and the counts.
ADD_TASKS_VIEW: Final = (
    "CREATE TEMP VIEW add_tasks(doc) AS SELECT NULL",
    """
    CREATE TEMP TRIGGER add_tasks_insert INSTEAD OF INSERT ON add_tasks BEGIN
        INSERT INTO tasks(id, name, command, targets, created_at, shell, run_as_user,
                          timeout, not_before, expires_at, max_attempts, delivery, fleet,
                          continuous, per_minute, max_concurrent)
        SELECT value ->> 0, value ->> 1, value ->> 2, value -> 3, """
    + ", ".join(f"value ->> {i}" for i in (*range(4, 12), 13, 14, 15, 17)) + """
        FROM json_each(NEW.doc) ORDER BY key;
        INSERT INTO task_counts(task_seq, total, pending)
        SELECT t.seq, json_array_length(j.value, '$[16]'), json_array_length(j.value, '$[16]')
        FROM json_each(NEW.doc) AS j CROSS JOIN tasks AS t ON t.id = j.value ->> 0;
        INSERT OR IGNORE INTO nodes(node_id)
        SELECT g.value FROM json_each(NEW.doc) AS j, json_each(j.value, '$[16]') AS g;
        -- available at submission, or at not_before. The task's values are read once
        -- per task (LIMIT -1 keeps the subquery apart): read from the JSON once per
        -- run, they made this insert twice as slow (bulk load of 1M runs).
        INSERT INTO runs(task_seq, node, position, state, queued_at, available_at,
                         expires_at)
        SELECT x.seq, n.nid, g.key, 'pending', x.queued, coalesce(x.not_before, x.queued),
               x.expires_at
        FROM (SELECT t.seq, j.value -> 16 AS nodes, t.not_before, t.expires_at,
                     j.value ->> 12 AS queued
              FROM json_each(NEW.doc) AS j CROSS JOIN tasks AS t ON t.id = j.value ->> 0
              LIMIT -1) AS x
        CROSS JOIN json_each(x.nodes) AS g
        CROSS JOIN nodes AS n ON n.node_id = g.value;
        UPDATE run_counts SET n = n + changes() WHERE state = 'pending';  -- the runs above
        -- the event log: task.created, its data made by task_row (ghostrunner.events)
        INSERT INTO events(at, kind, task_id, data)
        SELECT value ->> 12, 'task.created', value ->> 0, value ->> 18
        FROM json_each(NEW.doc) ORDER BY key;
    END""",
)

ADD_TASKS_SQL: Final = "INSERT INTO add_tasks(doc) VALUES (?)"


def task_row(task: Task, queued: int, nodes: Sequence[str] | None = None) -> tuple[Any, ...]:
    """One task in an :data:`ADD_TASKS_SQL` document: the ``tasks`` columns after
    ``seq`` (``targets`` a list), the time its runs are queued at, its fleet columns,
    the nodes it gets a run for (default: its targets), and the ``data`` of its
    ``task.created`` event."""
    return (
        task.id,
        task.name,
        task.command,
        task.targets,
        ts(task.created_at),
        task.shell.value,
        int(task.run_as_user),
        float(task.timeout),
        tso(task.not_before),
        tso(task.expires_at),
        task.max_attempts,
        task.delivery.value,
        queued,
        fleet_json(task),
        int(task.continuous),
        task.rollout.per_minute,
        task.targets if nodes is None else nodes,
        task.rollout.max_concurrent,
        created_data(task.name, task.targets if nodes is None else nodes),
    )


# --------------------------------------------------------------------------- listing

def list_sql(query: TaskQuery) -> tuple[str, dict[str, Any]]:
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
        where.append(f"({STATUS_SQL[TaskStatus(query.status)]})")
    sql = (
        f"SELECT {_SUMMARY_COLS} FROM {source} WHERE {' AND '.join(where)} "
        f"ORDER BY {order} DESC LIMIT :limit"
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
        queued_at=dt(row[3]),
        available_at=dt(row[4]),
        expires_at=dto(row[5]),
        started_at=dto(row[6]),
        finished_at=dto(row[7]),
        exit_code=row[8],
        output=row[9],
        output_truncated=bool(row[10]),
        error=row[11],
        recovered=bool(row[12]),
    )


def task(row: Sequence[Any]) -> Task:
    """A Task from ``row``: the columns of :data:`TASK_COLS` (seq first)."""
    return trusted(
        Task,
        id=row[1],
        name=row[2],
        command=row[3],
        targets=tuple(json.loads(row[4])),
        created_at=dt(row[5]),
        shell=Shell(row[6]),
        run_as_user=bool(row[7]),
        timeout=row[8],
        not_before=dto(row[9]),
        expires_at=dto(row[10]),
        max_attempts=row[11],
        delivery=Delivery(row[12]),
        **fleet_fields(row[13]),
    )


def summary(row: Sequence[Any]) -> TaskSummary:
    """A TaskSummary from a :data:`SUMMARY_SELECT` row."""
    counts = {s: n for s, n in zip(STATES, row[_COUNTS_AT:], strict=True) if n}
    return TaskSummary(
        task=task(row), counts=counts, paused=bool(row[14]), aborted=row[15],
        closed=bool(row[16]),
    )


def attempt(row: Sequence[Any]) -> Attempt:
    """An Attempt from an :data:`ATTEMPTS_SQL` row (after the node id)."""
    return trusted(
        Attempt, number=row[0], state=RunState(row[1]), started_at=dto(row[2]),
        finished_at=dto(row[3]), exit_code=row[4], output=row[5],
        output_truncated=bool(row[6]), error=row[7], recovered=bool(row[8]),
    )


def token(row: Sequence[Any]) -> Token:
    """A Token from ``row``: the columns of :data:`TOKEN_COLS`."""
    return Token(
        name=row[0],
        secret_hash=row[1],
        scope=Scope(row[2]),
        created_at=dt(row[3]),
        last_used=dto(row[4]),
        builtin=bool(row[5]),
    )

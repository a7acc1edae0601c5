"""Large tasks: written in several transactions, visible only once complete.

One transaction for a task of 10,000 devices holds the store's thread for about 0.1 s
(mostly the runs' index entries, then the commit of a few MB of WAL), and every other
job waits that long: a small task submitted meanwhile, a claim, a finish. So a task
with more than :data:`STAGED_RUNS` runs is written in steps, each a job of its own
that the thread interleaves with the others (:meth:`SQLiteStore.add_task`):

1. :func:`stage`: the ``tasks`` row, and its ``seq`` in ``staged_tasks``;
2. :func:`intern`, once per :data:`CHUNK_RUNS` node ids in key order: their ``nid``
   (new ones added to ``nodes``, harmless: no verb lists nodes);
3. :func:`write_runs`, once per :data:`CHUNK_RUNS` runs in ``nid`` order: the pending
   runs;
4. :func:`publish`: the ``staged_tasks`` row goes, the ``task_counts`` row comes, the
   pending runs are counted in ``run_counts``, its ``task.created`` event is written:
   from this commit on, the task exists.

Key order: each step commits, and a page of an index is written to the WAL by every
commit that changed it; in key order a step changes its own slice of the ``node_id``
index, ``runs_node`` and ``runs_pending_node``, where target order (random) changed a
bit of every page at every step (the large create was 50 % slower for it).

Until then nothing shows it: a task without its ``task_counts`` row is not found by
``get_task`` nor listed (both join ``task_counts``), and the verbs that read ``tasks``
or ``runs`` otherwise leave out the tasks of ``staged_tasks`` (:data:`STAGED` in
:mod:`._queries`): a staged run is never found, claimed, expired or counted. A failure
or a cancellation between the steps :func:`discard`\\ s what was written; what a crash
leaves is discarded when the store opens (:func:`discard_all`): a task is complete or
it is not there.
"""

# ruff: noqa: S608
# (SQL built from this module's constants only; every value is a bound parameter.)

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Final

import sqlite_utils

from ..errors import Conflict
from ._values import JSON

#: Tasks with more runs than this are written in steps; the others in one statement.
STAGED_RUNS: Final = 2_000
#: Devices per :func:`write_runs` step (about 10 ms of the thread's time each).
CHUNK_RUNS: Final = 1_000

_STAGE_TASK_SQL: Final = """
INSERT INTO tasks(id, name, command, targets, created_at, shell, run_as_user, timeout,
                  not_before, expires_at, max_attempts, delivery, fleet, continuous,
                  per_minute, max_concurrent)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
RETURNING seq
"""

_INTERN_SQL: Final = "INSERT OR IGNORE INTO nodes(node_id) SELECT value FROM json_each(:nodes)"
_NIDS_SQL: Final = """
SELECT n.nid FROM json_each(:nodes) AS j CROSS JOIN nodes AS n ON n.node_id = j.value
ORDER BY j.key
"""

#: The runs of the JSON array :runs of [nid, position] pairs.
_RUNS_SQL: Final = """
INSERT INTO runs(task_seq, node, position, state, queued_at, available_at, expires_at)
SELECT t.seq, j.value ->> 0, j.value ->> 1, 'pending', :queued,
       coalesce(t.not_before, :queued), t.expires_at
FROM tasks AS t CROSS JOIN json_each(:runs) AS j
WHERE t.seq = :seq
ORDER BY j.key
"""


def stage(db: sqlite_utils.Database, row: Sequence[Any]) -> int:
    """Insert the task of ``row`` (a :func:`._queries.task_row`), staged; its seq."""
    values = (*row[:3], JSON.encode(list(row[3])), *row[4:12], *row[13:16], row[17])
    try:
        seq: int = db.conn.execute(_STAGE_TASK_SQL, values).fetchone()[0]
    except sqlite3.IntegrityError as exc:
        if "tasks.id" in str(exc):
            raise Conflict(f"task {row[0]} exists") from exc
        raise
    db.execute("INSERT INTO staged_tasks(task_seq) VALUES (?)", (seq,))
    return seq


def intern(db: sqlite_utils.Database, nodes: Sequence[str]) -> list[int]:
    """The ``nid`` of each node id of ``nodes``, given one if it had none."""
    params = {"nodes": JSON.encode(list(nodes))}
    db.conn.execute(_INTERN_SQL, params)
    return [row[0] for row in db.conn.execute(_NIDS_SQL, params)]


def write_runs(
    db: sqlite_utils.Database, seq: int, runs: Sequence[tuple[int, int]], queued: int
) -> None:
    """The pending runs of the staged task ``seq``: ``runs`` are (nid, position) pairs."""
    db.conn.execute(_RUNS_SQL, {"seq": seq, "runs": JSON.encode(runs), "queued": queued})


def publish(db: sqlite_utils.Database, seq: int, total: int, event: Sequence[Any]) -> None:
    """Make the staged task ``seq`` and its ``total`` runs (all pending) visible, and
    write its ``task.created`` event: ``event`` is (at, data) as the row has them."""
    if db.execute("DELETE FROM staged_tasks WHERE task_seq = ?", (seq,)).rowcount != 1:
        raise RuntimeError(f"task seq {seq} is not staged")  # discarded meanwhile: a bug
    db.execute("INSERT INTO task_counts(task_seq, total, pending) VALUES (?, ?, ?)",
               (seq, total, total))
    db.execute("UPDATE run_counts SET n = n + ? WHERE state = 'pending'", (total,))
    db.execute("INSERT INTO events(at, kind, task_id, data) "
               "SELECT ?, 'task.created', id, ? FROM tasks WHERE seq = ?",
               (event[0], JSON.encode(event[1]), seq))


def discard(db: sqlite_utils.Database, seq: int, limit: int = -1) -> bool:
    """Delete up to ``limit`` (-1: all) runs of the staged task ``seq``, and the task
    once it has none left; True when it is gone. Nothing if it is not staged."""
    if db.execute("SELECT 1 FROM staged_tasks WHERE task_seq = ?", (seq,)).fetchone() is None:
        return True
    doomed = "SELECT rowid FROM runs WHERE task_seq = :seq LIMIT :limit"
    params = {"seq": seq, "limit": limit}
    # the runs_deleted trigger takes each deleted run off run_counts, which never
    # counted staged runs (all pending): add them first
    db.execute(
        f"UPDATE run_counts SET n = n + (SELECT count(*) FROM ({doomed})) "
        "WHERE state = 'pending'", params,
    )
    db.execute(f"DELETE FROM runs WHERE rowid IN ({doomed})", params)
    if db.execute("SELECT 1 FROM runs WHERE task_seq = ?", (seq,)).fetchone() is not None:
        return False
    db.execute("DELETE FROM staged_tasks WHERE task_seq = ?", (seq,))
    db.execute("DELETE FROM tasks WHERE seq = ?", (seq,))
    return True


def discard_all(db: sqlite_utils.Database) -> int:
    """Discard every staged task (what a crash left); how many there were."""
    seqs = [row[0] for row in db.execute("SELECT task_seq FROM staged_tasks").fetchall()]
    for seq in seqs:
        discard(db, seq)
    return len(seqs)

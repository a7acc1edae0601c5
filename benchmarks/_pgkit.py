"""A PostgreSQL for the benchmarks, started by them: the ``pgserver`` wheel (PostgreSQL
16 inside a Python package, as in tests/pg.py) in a temporary directory, with
PostgreSQL's durable defaults (``fsync``, ``synchronous_commit``: a commit is on disk
before a verb returns, as in production; the tests turn them off, the benchmarks do
not). And a fast loader that writes a backlog of tasks and runs with a few
``INSERT ... SELECT`` over ``generate_series`` instead of one ``add_task`` per task.
"""

# (SQL assembled from this module's constants and integers; values are bound parameters)

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg


class BenchPostgres:
    """A running PostgreSQL 16 (pgserver), stopped and deleted by :meth:`stop`."""

    def __init__(self) -> None:
        # not under a private temp dir: as root, pgserver runs PostgreSQL as the user
        # "pgserver", which must reach the data directory
        self.root = Path(tempfile.mkdtemp(prefix="ghostrunner-bench-pg-"))
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # platformdirs warns without XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            import pgserver

            self._server: Any = pgserver.get_server(self.root / "data", cleanup_mode="delete")
        self.started_in = time.perf_counter() - t0
        self.pid: int | None = self._server.get_pid()
        with self.admin() as conn:
            row = conn.execute(
                "SELECT current_setting('server_version'), current_setting('fsync'), "
                "current_setting('synchronous_commit'), current_setting('shared_buffers')"
            ).fetchone()
        assert row is not None
        self.version, fsync, sync, buffers = row
        self.settings = f"fsync={fsync}, synchronous_commit={sync}, shared_buffers={buffers}"

    def dsn(self, database: str) -> str:
        dsn: str = self._server.get_uri(database)
        return dsn

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._server.get_uri(), autocommit=True)

    def create(self, name: str, template: str | None = None) -> str:
        """A new database (a copy of ``template``, or with GhostRunner's schema); its
        DSN. An existing one of that name is dropped first."""
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            suffix = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{suffix}')
        dsn = self.dsn(name)
        if template is None:
            migrate(dsn)
        return dsn

    def stop(self) -> None:
        try:
            self._server.cleanup()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> BenchPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def migrate(dsn: str) -> None:
    """GhostRunner's schema, as ``PostgresStore.open`` makes it."""
    from ghostrunner.postgres import PostgresStore

    async def go() -> None:
        store = PostgresStore(dsn, max_size=1)
        await store.open()
        await store.close()

    asyncio.run(go())


def node_sql(kind: str, devices: int) -> str:
    """A SQL expression of ``i`` (0 <= i < devices): the node id of device i.

    ``storm``: ``node//storm-00042`` (as bench_loop names them); ``mesh``: MeshCentral's
    shape, ``node//`` and 64 base64 characters (a hash of i, ``@$`` for ``+/``)."""
    if kind == "storm":
        return "'node//storm-' || lpad(i::text, 5, '0')"
    assert kind == "mesh"
    return "'node//' || translate(encode(sha384(int8send(i)), 'base64'), '+/', '@$')"


def load_backlog(
    dsn: str, *, tasks: int, per_task: int, devices: int, now: datetime,
    nodes: str = "mesh", expire_every: int = 0, expires_at: datetime | None = None,
) -> float:
    """Write ``tasks`` pending tasks of ``per_task`` runs each, spread over ``devices``
    devices (task g, run k: device ``((g * per_task + k) * 7919) % devices``: every
    device gets the same number of runs, and a task never names a device twice while
    ``per_task <= devices``), into an empty GhostRunner database, as ``add_task`` would
    have: the task rows, their ``task_counts``, the runs in target order. Every
    ``expire_every``-th task expires at ``expires_at``. The runs' secondary indexes are
    dropped during the load and built again at the end, then the tables are analysed.
    Returns the seconds it took."""
    assert per_task <= devices and devices % 7919 != 0
    node = node_sql(nodes, devices)
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        # runs are inserted with their keys taken from the rows they refer to: the
        # foreign key checks (a trigger per row) would only repeat that
        conn.execute("SET session_replication_role = replica")
        conn.execute("SET maintenance_work_mem = '256MB'")
        found = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'runs' AND "
            "indexname NOT IN (SELECT conname FROM pg_constraint "
            "WHERE conrelid = 'runs'::regclass)").fetchall()
        names = [row[0] for row in found]
        indexes = [row[1] for row in found]
        with conn.transaction():
            for name in names:
                conn.execute(f'DROP INDEX "{name}"')
            conn.execute(
                f"""
                INSERT INTO tasks(id, name, command, targets, created_at, shell, run_as_user,
                                  timeout, expires_at, max_attempts, delivery)
                SELECT md5('bench-task-' || g), 'job ' || (g %% 500), 'echo ' || g,
                       ARRAY(SELECT {node} FROM (
                             SELECT ((g::bigint * %(per)s + k) * 7919) %% %(devices)s AS i
                             FROM generate_series(0, %(per)s - 1) AS k ORDER BY k) AS d),
                       %(now)s, 'auto', false, 300,
                       CASE WHEN %(every)s > 0 AND g %% %(every)s = 0 THEN %(expires)s::timestamptz
                       END, 3, 'at_most_once'
                FROM generate_series(0, %(tasks)s - 1) AS g ORDER BY g
                """,
                {"per": per_task, "devices": devices, "now": now, "every": expire_every,
                 "expires": expires_at, "tasks": tasks},
            )
            conn.execute(
                "INSERT INTO task_counts(task_seq, total, pending) "
                "SELECT seq, cardinality(targets), cardinality(targets) FROM tasks")
            conn.execute(
                """
                INSERT INTO runs(task_seq, node, position, state, queued_at, available_at,
                                 expires_at)
                SELECT t.seq, u.node, u.ord - 1, 'pending', %(now)s, %(now)s, t.expires_at
                FROM tasks AS t, unnest(t.targets) WITH ORDINALITY AS u(node, ord)
                ORDER BY t.seq, u.node
                """,
                {"now": now},
            )
            for sql in indexes:
                conn.execute(sql)
        conn.execute("VACUUM (ANALYZE) tasks, task_counts, runs")
    return time.perf_counter() - t0


def size(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))"
                           ).fetchone()
    assert row is not None
    return str(row[0])

"""A durable :class:`~ghostrunner.Store` on PostgreSQL, through psycopg 3 (asynchronous)
and a connection pool (``pip install 'ghostrunner[postgres]'``).

**Every verb is one transaction** on a connection of the pool; verbs run concurrently
(no single writer), and several processes may share one database: the database itself
keeps the queue's promises. Claims lock the runs they take with ``FOR UPDATE SKIP
LOCKED`` (a run another transaction is claiming is skipped, not waited for), and a
partial unique index allows **at most one dispatched run per device**: ``claim_many``
leaves out a run whose device has one.

**Durability** is PostgreSQL's: a commit is on disk (WAL flushed, ``synchronous_commit``
on, the default) before the verb returns.

The parts, each in its module (the shape of :mod:`ghostrunner.sqlite`):

* :mod:`._schema`: the tables, indexes and triggers, the schema version and the
  migrations (one transaction, under an advisory lock);
* :mod:`._queries`: the SQL of the verbs, values <-> PostgreSQL values, and the
  row -> value builders;
* :mod:`._store`: :class:`PostgresStore`, the store's verbs;
* :mod:`._import`: the bulk import into an empty database (``ghostrunner db migrate``:
  :meth:`PostgresStore.import_all`, :class:`TaskRecord`, :class:`ImportReport`).

Importing :mod:`ghostrunner` never imports psycopg: only this package does.
"""

try:
    from ._import import ImportReport, TaskRecord
    from ._store import PostgresStore
except ModuleNotFoundError as exc:  # pragma: no cover - without the extra
    if exc.name not in ("psycopg", "psycopg_pool"):
        raise
    raise ModuleNotFoundError(
        "PostgresStore needs psycopg and psycopg-pool: pip install 'ghostrunner[postgres]'",
        name=exc.name,
    ) from exc

__all__ = ["ImportReport", "PostgresStore", "TaskRecord"]

"""A durable :class:`~ghostrunner.Store` on SQLite, through sqlite-utils.

**One thread owns the connection.** :meth:`SQLiteStore.open` starts a worker thread
that opens the database, migrates the schema, then runs the store's jobs from a queue;
the event loop never waits on SQLite (the model is datasette's single write thread).
Jobs already queued run as one batch, in one transaction committed once (*group
commit*), each write in a savepoint of its own; tasks added concurrently are written by
one statement. A large task is written in steps, jobs of their own, so that no job
holds the thread for long; it is invisible until the last step (:mod:`._large`).

**Durability.** WAL journal, ``synchronous=FULL`` by default: a commit is on disk
(WAL fsync'd) before its caller hears about it, so a power cut right after
:meth:`~SQLiteStore.claim_many` returns cannot "un-claim" a run and have an
``at_most_once`` command sent twice. It costs one fsync per *batch* (about 0.6 ms on the
development VM). ``synchronous="NORMAL"`` skips that fsync: still safe against a crash
of the process, and the database never corrupts, but a power loss or kernel crash can
roll back the last commits (WAL mode + NORMAL only fsyncs at checkpoints). One process
per database file: an advisory lock beside it refuses a second one.

The parts, each in its module (a store on another database copies this shape):

* :mod:`._schema`: the tables, indexes and triggers, the schema version and the
  migrations;
* :mod:`._queries`: the SQL of the verbs, and the row -> value builders;
* :mod:`._values`: timestamps (integer microseconds, UTC) and JSON text;
* :mod:`._worker`: the thread that owns the connection, batching and group commit
  (:mod:`._lock`: the lock file; :mod:`._files`: the files private to the user, 0600,
  and the directories the store creates 0700);
* :mod:`._large`: large tasks, written in steps;
* :mod:`._store`: :class:`SQLiteStore`, the store's verbs.
"""

from ._store import SQLiteStore

__all__ = ["SQLiteStore"]

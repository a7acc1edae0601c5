"""The thread that owns the SQLite connection, and how it runs the store's jobs.

**One thread owns the connection** (datasette's single write thread). The store puts
*jobs* (a function of the database) on a queue and awaits their futures; the thread
runs them and hands the results back through ``loop.call_soon_threadsafe``: the event
loop never waits on SQLite, and SQLite never sees a second thread.

**Group commit.** The thread takes every job already queued (up to :data:`MAX_BATCH`)
and runs the batch in *one* transaction, committed once: the jobs that arrive while a
batch runs and commits make the next batch, so a burst batches itself and a lone write
is committed at once. Each write of a batch runs in its own ``SAVEPOINT``: one that
fails (a ``Conflict``, an ``IllegalTransition``...) is undone alone, the others still
commit. Results are handed back only after the ``COMMIT``. Reads need no transaction.

**Bulk jobs.** Jobs may carry a *bulk* part (``add_task`` does): consecutive jobs of a
batch with the same bulk function run as one call of it, one SQL statement. A batch
that is nothing else runs that statement in autocommit mode, its own transaction: the
thread enters SQLite once for the batch. Every call into SQLite releases the GIL, and
winning it back from a busy event loop is what the thread mostly waited for (measured:
with five calls per batch, a batch took twice as long as its SQL).

**Exclusive jobs** (bulk loads) run alone and manage their own transactions.

**Events** (:mod:`ghostrunner.events`) a write job makes are held in the thread's
buffer (:func:`emit`) and written with *one* statement for the whole batch, just before
its ``COMMIT``, in the order the jobs made them: in the same transaction as the changes
they tell of, and without one more crossing into SQLite per change (each crossing
releases the GIL and has to win it back). The events of a job that fails are dropped
with its savepoint.

**Committed reads** (the event log's) run after the batch's ``COMMIT``: a read of the
batch would see the writes of the batch before they are committed, and a reader of the
event log must never see an event that a failed commit then takes back (its id would be
given again).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal, TypeVar

import sqlite_utils

from ..errors import Conflict, GhostRunnerError, StoreError
from ._files import make_private
from ._large import discard_all
from ._lock import lock_database, unlock
from ._queries import ADD_TASKS_VIEW
from ._schema import migrate
from ._values import JSON

_T = TypeVar("_T")
log = logging.getLogger("ghostrunner.sqlite")

BUSY_TIMEOUT_MS: Final = 5000
MAX_BATCH: Final = 256

Kind = Literal["read", "write", "exclusive", "committed"]
#: (function, payload): ``function(db, payloads)`` writes the payloads of several jobs
#: with *one* SQL statement, so a failure leaves nothing of it behind.
Bulk = tuple[Callable[[sqlite_utils.Database, list[Any]], None], Any]


#: One event, as :func:`emit` holds it: (at, kind, task id, node id, data).
Pending = tuple[int, str, str, str | None, Any]

_THREAD = threading.local()  # .events: the buffer of the worker thread running here

_EMIT_SQL: Final = """
INSERT INTO events(at, kind, task_id, node_id, data)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4
FROM json_each(?) ORDER BY key
"""


def emit(at: int, kind: str, task_id: str, node_id: str | None, data: Any) -> None:
    """Write an event with the changes of the write job running now (on the store's
    thread, from a job's function): it is committed with them, or not at all."""
    _THREAD.events.append((at, kind, task_id, node_id, data))


def _write_events(db: sqlite_utils.Database, events: list[Pending]) -> None:
    if events:
        db.conn.execute(_EMIT_SQL, (JSON.encode(events),))
        events.clear()


class Job:
    """One function for the thread, and where its result goes."""

    __slots__ = ("bulk", "error", "fn", "future", "kind", "loop", "result")

    def __init__(
        self,
        fn: Callable[[sqlite_utils.Database], Any],
        kind: Kind,
        loop: asyncio.AbstractEventLoop,
        bulk: Bulk | None = None,
    ) -> None:
        self.fn = fn
        self.kind = kind
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.bulk = bulk
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self, db: sqlite_utils.Database) -> None:
        try:
            self.result = translated(lambda: self.fn(db))
        except Exception as exc:  # handed to the caller, whatever it is
            self.error = exc

    def fail(self, exc: BaseException) -> None:
        self.result, self.error = None, exc


def translated(call: Callable[[], _T]) -> _T:
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


class Worker:
    """The thread that owns the connection, and its queue."""

    def __init__(self, path: str, *, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self.queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()  # None: stop
        self.lock = threading.Lock()  # no job is queued after the stop sentinel
        self.closing = False
        self.commits = 0  # transactions committed by batches (for tests and benchmarks)
        # RUNNING: a caller that stops waiting cannot cancel them for the others
        self.opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.closed: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.opened.set_running_or_notify_cancel()
        self.closed.set_running_or_notify_cancel()
        self._carry: Job | None = None  # an exclusive job met while gathering a batch
        self._lock_fd: int | None = None
        self.thread = threading.Thread(
            target=self._main, name=f"ghostrunner-sqlite:{path}", daemon=True
        )

    # -------------------------------------------------------------- event loop side

    async def start(self) -> None:
        self.thread.start()
        await asyncio.wrap_future(self.opened)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.closing:
                raise StoreError("the store is closed")
            self.queue.put(job)

    async def stop(self) -> None:
        """Let the thread finish the jobs queued so far, close the connection, exit."""
        self.abandon()
        await asyncio.wrap_future(self.closed)

    def abandon(self) -> None:
        """Stop after the jobs queued so far, without waiting (from any thread)."""
        with self.lock:
            if not self.closing:
                self.closing = True
                self.queue.put(None)

    # -------------------------------------------------------------- the thread

    def _open(self) -> sqlite_utils.Database:
        """Connect, take the file lock, set the connection up, migrate the schema."""
        make_private(self.path)  # before SQLite creates anything with the umask's mode
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # we BEGIN and COMMIT ourselves
            check_same_thread=True,
        )
        try:
            self._lock_fd = lock_database(self.path)
            db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA foreign_keys = ON")
            if self.path != ":memory:":
                db.enable_wal()
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
            db.execute("PRAGMA cache_size = -65536")  # KiB: 64 MiB
            db.execute("PRAGMA temp_store = MEMORY")
            migrate(db)
            _discard_staged(db)
            for sql in ADD_TASKS_VIEW:
                db.execute(sql)
        except BaseException:
            conn.close()
            raise
        return db

    def _main(self) -> None:
        _THREAD.events = []
        try:
            db = translated(self._open)
        except Exception as exc:
            unlock(self._lock_fd)
            self.opened.set_exception(exc)
            self._finish(f"the store could not be opened: {exc}")
            return
        self.opened.set_result(None)
        try:
            self._serve(db)
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA analysis_limit = 400")
                db.execute("PRAGMA optimize")  # refresh the planner's statistics
            with contextlib.suppress(sqlite3.Error):
                db.close()
            unlock(self._lock_fd)
            self._finish("the store is closed")

    def _finish(self, message: str) -> None:
        """The thread's last act: fail what is left in the queue, wake stop()."""
        with self.lock:
            self.closing = True
        leftovers = [self._carry] if self._carry is not None else []
        self._carry = None
        with contextlib.suppress(queue.Empty):
            while True:
                if (job := self.queue.get_nowait()) is not None:
                    leftovers.append(job)
        for job in leftovers:
            job.fail(StoreError(message))
        self._resolve(leftovers)
        self.closed.set_result(None)

    def _take(self, block: bool) -> Job | Literal[False] | None:
        """The next job; None is the stop sentinel; False: none yet (``block=False``)."""
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            return self.queue.get(block)
        except queue.Empty:
            return False

    def _serve(self, db: sqlite_utils.Database) -> None:
        while (first := self._take(block=True)) is not None:
            assert first is not False
            if first.kind == "exclusive":
                self._run_alone(db, first)
                continue
            # No waiting for more: the jobs that arrive while this batch runs (its fsync
            # included) make the next batch. Measured on POST /task/create under load,
            # waiting 1-2 ms for stragglers cost about a tenth of the throughput.
            batch = [first]
            while len(batch) < MAX_BATCH and (job := self._take(block=False)) is not False:
                if job is None:  # stop, once this batch is done
                    self._run_batch(db, batch)
                    return
                if job.kind == "exclusive":
                    self._carry = job
                    break
                batch.append(job)
            self._run_batch(db, batch)

    def _run_alone(self, db: sqlite_utils.Database, job: Job) -> None:
        if not job.future.cancelled():
            job.run(db)
            _THREAD.events.clear()  # exclusive jobs write their events themselves
            if db.conn.in_transaction:  # it left a transaction open: undo it
                _rollback(db)
        self._resolve([job])

    def _run_batch(self, db: sqlite_utils.Database, batch: list[Job]) -> None:
        jobs = [j for j in batch if not j.future.cancelled()]
        late = [j for j in jobs if j.kind == "committed"]
        if late:
            jobs = [j for j in jobs if j.kind != "committed"]
        try:
            if jobs and _is_one_bulk(jobs) and _run_bulk(db, jobs):
                self.commits += 1  # autocommit: the statement committed itself
            elif any(j.kind == "write" for j in jobs):
                self._transaction(db, jobs)
            else:  # reads see committed data only: no transaction needed
                for job in jobs:
                    job.run(db)
        except Exception as exc:  # BEGIN, SAVEPOINT or COMMIT itself failed
            _rollback(db)
            _fail_all(jobs, "the transaction failed", exc)
        for job in late:  # after the COMMIT: they see committed data only
            job.run(db)
        self._resolve(jobs + late)

    def _transaction(self, db: sqlite_utils.Database, jobs: list[Job]) -> None:
        """Run ``jobs`` in one transaction, each write in its own savepoint, and commit.

        A job that fails is rolled back alone. If SQLite itself rolled the whole
        transaction back (disk full, I/O error...), the jobs it held are failed too
        and the rest carry on in a new transaction.
        """
        savepoints = len(jobs) > 1  # alone, a job that fails rolls the transaction back
        held: list[Job] = []  # the jobs whose work the open transaction holds
        events: list[Pending] = _THREAD.events  # theirs, written before the COMMIT
        events.clear()

        def check(cause: BaseException) -> None:
            nonlocal held
            if not db.conn.in_transaction:  # SQLite rolled it back
                _fail_all(held, "rolled back by a failure in the same batch", cause)
                held = []
                events.clear()
                db.execute("BEGIN IMMEDIATE")

        db.execute("BEGIN IMMEDIATE")
        i = 0
        while i < len(jobs):
            group = _bulk_group(jobs, i)
            i += len(group)
            if len(group) > 1:
                if _run_bulk(db, group):
                    held += group
                    continue
                check(StoreError("the transaction was rolled back"))
            for job in group:  # one by one (a failed bulk group too: only the culprit fails)
                mark = len(events)
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
                if job.error is not None:
                    del events[mark:]  # undone with the job
                    check(job.error)
                held.append(job)
        if not savepoints and jobs[0].error is not None:
            events.clear()
            db.rollback()
            return
        try:
            _write_events(db, events)
            db.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            events.clear()
            _rollback(db)
            _fail_all(held, "commit failed", exc)

    @staticmethod
    def _resolve(jobs: Iterable[Job]) -> None:
        """Hand the results over, one callback per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Job]] = {}
        for job in jobs:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
                loop.call_soon_threadsafe(_deliver, items)


def _discard_staged(db: sqlite_utils.Database) -> None:
    """Remove the large tasks a crash left half-written (see :mod:`._large`)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        found = discard_all(db)
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    if found:
        log.warning("discarded %d task(s) left half-written by a crash (never "
                    "acknowledged to their submitters)", found)


def _bulk_group(jobs: list[Job], start: int) -> list[Job]:
    """``jobs[start]`` and the jobs right after it that share its bulk function."""
    first = jobs[start]
    if first.bulk is None:
        return [first]
    end = start + 1
    while end < len(jobs) and (b := jobs[end].bulk) is not None and b[0] is first.bulk[0]:
        end += 1
    return jobs[start:end]


def _is_one_bulk(jobs: list[Job]) -> bool:
    return jobs[0].bulk is not None and len(_bulk_group(jobs, 0)) == len(jobs)


def _run_bulk(db: sqlite_utils.Database, group: list[Job]) -> bool:
    """Run ``group`` (jobs with the same bulk function) as one call of it. False if
    that failed (nothing was written): the caller runs the jobs one by one, so that
    only the faulty one fails."""
    assert group[0].bulk is not None
    try:
        group[0].bulk[0](db, [job.bulk[1] for job in group if job.bulk is not None])
    except Exception:
        return False
    return True


def _fail_all(jobs: Iterable[Job], message: str, cause: BaseException) -> None:
    """Fail every job of ``jobs`` that has not failed already (its work was undone)."""
    for job in jobs:
        if job.error is None:
            failure = StoreError(f"{message}: {cause}")
            failure.__cause__ = cause
            job.fail(failure)


def _rollback(db: sqlite_utils.Database) -> None:
    with contextlib.suppress(sqlite3.Error):
        db.rollback()


def _deliver(jobs: list[Job]) -> None:
    """On the event loop: hand the results over."""
    for job in jobs:
        if job.future.done():  # cancelled by its caller meanwhile
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)

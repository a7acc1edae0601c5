"""The facade: :class:`GhostRunner`, what applications use."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Mapping,
    Sequence,
)
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import attrs

from ._feed import EventFeed
from ._loop import LoopSettings, Reconciler
from ._protocols import Executor, Store
from ._types import (
    RETRYABLE_STATES,
    VERSION,
    Attempt,
    Device,
    Page,
    Run,
    RunState,
    Task,
    TaskQuery,
    TaskSummary,
    utcnow,
)
from .audit import AuditEntry
from .errors import GhostRunnerError, IllegalTransition, NotFound, ValidationError
from .events import Event
from .runners import Leases, LeaseState, RunnerInfo, RunnerStatus, Signal, Signals

__all__ = ["FlushResult", "GhostRunner"]

log = logging.getLogger("ghostrunner")

#: With a store shared by several runners, :meth:`GhostRunner.wait` looks at least this
#: often (seconds): another runner may be the one recording the runs waited for.
_SHARED_RECHECK = 1.0


@attrs.frozen(kw_only=True)
class FlushResult:
    """What :meth:`GhostRunner.flush` did."""

    cancelled: int
    """Pending runs cancelled."""
    deleted: int
    """Tasks removed (all their runs were terminal)."""
    kept: int
    """Tasks kept because a run is still in flight; flush again later."""


class GhostRunner:
    """Queue commands for devices; run them when the devices come online.

    An async context manager: entering it opens the store and the executor and starts
    the reconcile loop in the background; leaving it stops the loop gracefully
    (waiting up to ``settings.shutdown_grace`` for commands in flight) and closes both.

    Args:
        store: where tasks and runs live, e.g. ``SQLiteStore("ghostrunner.db")``.
        executor: what runs commands, e.g. ``MeshCentralExecutor(...)``.
        settings: loop tuning (:class:`LoopSettings`).
        clock: returns the current aware datetime; tests pass a fake one.
        background: run the loop in the background (default). With False nothing runs
            by itself: tests call :meth:`run_until_idle`.
        name: what this runner is called among several sharing one store (default
            ``host:pid``; see :mod:`ghostrunner.runners`).
    """

    def __init__(
        self,
        *,
        store: Store,
        executor: Executor,
        settings: LoopSettings | None = None,
        clock: Callable[[], datetime] = utcnow,
        background: bool = True,
        name: str | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.settings = settings or LoopSettings()
        self.clock = clock
        self.background = background
        self._changed = asyncio.Event()
        self._feed = EventFeed(store, poll_interval=self.settings.events_poll)
        info = RunnerInfo(version=VERSION, started_at=clock(),
                          **({} if name is None else {"name": name}))
        self.loop = Reconciler(
            store, executor, self.settings, clock=clock, on_change=self._notify, runner=info
        )
        self._stop = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        await self.store.open()
        try:
            await self.executor.open()
        except BaseException:
            await self.store.close()
            raise
        if self.background:
            self._loop_task = asyncio.create_task(
                self.loop.run_forever(self._stop), name="ghostrunner-loop"
            )
        else:
            await self.loop.recover()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        try:
            if self._loop_task is not None:
                await self._loop_task
            else:
                await self.loop.drain()
                await self.loop.retire()
        finally:
            try:
                await self.executor.close()
            finally:
                await self.store.close()

    async def run_until_idle(self) -> None:
        """Pass until nothing is in flight and nothing can start (see Reconciler)."""
        await self.loop.run_until_idle()

    # ---------------------------------------------------------------- operations

    async def submit(self, task: Task | None = None, /, *, audit: AuditEntry | None = None,
                     **fields: Any) -> Task:
        """Queue a task: ``submit(Task(...))`` or ``submit(name=..., command=...,
        targets=[...])``. Its runs start as their devices come online.

        ``audit``: an audit log entry the store keeps with the task, in the same
        transaction (a store with an audit log; see ``Store.add_task``).

        Raises:
            ValidationError: naming the invalid field.
            Conflict: a task with this id exists.
        """
        if task is None:
            fields.setdefault("name", fields.get("command", "task")[:60] or "task")
            fields.setdefault("targets", ())
            task = Task(**fields)
        elif fields:
            raise TypeError("pass a Task or keyword fields, not both")
        nodes = self.targets_of(task)
        if task.select is not None and not nodes and not task.continuous:
            raise ValidationError("select", f"matches no device ({task.select})")
        if audit is None:
            await self.store.add_task(task, self.clock(), nodes=nodes)
        else:  # (a store that keeps no audit log takes no audit argument)
            await self.store.add_task(task, self.clock(), nodes=nodes, audit=audit)
        self.loop.follow(task, nodes)
        self.loop.wake(nodes, due=task.not_before, expires=task.expires_at)
        self._notify()
        return task

    def targets_of(self, task: Task) -> list[str]:
        """The devices ``task`` gets a run on if submitted now: its targets, then the
        devices its selector matches in the executor's view (online or not), by name."""
        nodes = list(task.targets)
        if task.select is not None:
            explicit = set(nodes)
            matched = [
                device for device in self.executor.devices().values()
                if device.node_id not in explicit and task.select.matches(device)
            ]
            matched.sort(key=lambda d: (d.name.casefold(), d.node_id))
            nodes += [d.node_id for d in matched]
        return nodes

    async def pause(self, task_id: str) -> TaskSummary:
        """Hold the task: none of its runs starts until :meth:`resume`; runs in flight
        finish. Raises NotFound."""
        summary = await self.store.pause(task_id, True)
        self._notify()
        return summary

    async def resume(self, task_id: str) -> TaskSummary:
        """Let a paused task go on. Raises NotFound."""
        summary = await self.store.pause(task_id, False)
        self.loop.hold(summary.task)
        self.loop.wake(due=self.clock())  # devices passed over while it was paused
        self._notify()
        return summary

    async def abort(self, task_id: str, reason: str = "aborted by an operator") -> list[Run]:
        """Stop the task as its abort rule would: cancel every run not yet started
        (``reason`` recorded), take no new devices; runs in flight finish. Returns the
        runs cancelled. Raises NotFound."""
        runs = list(await self.store.abort(task_id, reason, self.clock()))
        self._notify()
        return runs

    async def retry(
        self,
        task_id: str,
        states: Collection[RunState | str] = (RunState.FAILED, RunState.TIMED_OUT),
    ) -> list[Run]:
        """Send the task's runs that ended in ``states`` again, each as a new attempt
        (their earlier attempts stay in :meth:`attempts`); an aborted task goes on.
        ``states``: any of failed, timed_out, lost, expired, cancelled. Returns the runs
        put back to pending.

        Raises:
            NotFound: no such task.
            ValidationError: a state that cannot be retried.
        """
        wanted = []
        for i, state in enumerate(states):
            try:
                value = RunState(state)
            except ValueError:
                value = None
            if value not in RETRYABLE_STATES:
                allowed = ", ".join(sorted(s.value for s in RETRYABLE_STATES))
                raise ValidationError(f"states[{i}]", f"must be one of: {allowed}")
            wanted.append(value)
        if not wanted:
            raise ValidationError("states", "must name at least one state")
        runs = list(await self.store.retry(task_id, wanted, self.clock()))
        summary = await self.store.get_task(task_id)
        if summary.task.continuous and not summary.closed:
            # a retry re-opens a cancelled or aborted continuous task: devices that came
            # to match it meanwhile get their run too
            nodes = [r.node_id for r in await self.store.get_runs(task_id)]
            self.loop.follow(summary.task, nodes)
        else:
            self.loop.hold(summary.task)
        self.loop.wake([r.node_id for r in runs])
        self._notify()
        return runs

    async def attempts(self, task_id: str) -> Mapping[str, Sequence[Attempt]]:
        """Every attempt of each of the task's runs (node id -> oldest first)."""
        return await self.store.attempts(task_id)

    async def cancel(self, task_id: str, node_ids: Collection[str] | None = None) -> list[Run]:
        """Cancel the task's pending runs (or those of ``node_ids``). Runs already
        dispatched cannot be recalled and finish normally. Returns the cancelled runs.

        Raises:
            NotFound: no such task.
        """
        runs = list(await self.store.cancel(task_id, node_ids, now=self.clock()))
        self._notify()
        return runs

    async def get(self, task_id: str) -> TaskSummary:
        """The task and how many of its runs are in each state. Raises NotFound."""
        return await self.store.get_task(task_id)

    async def runs(self, task_id: str) -> Sequence[Run]:
        """The task's runs, in target order. Raises NotFound."""
        return await self.store.get_runs(task_id)

    async def list(self, query: TaskQuery | None = None, **filters: Any) -> Page:
        """A page of tasks, newest first: ``list(TaskQuery(...))`` or ``list(limit=...,
        state=..., node_id=..., name=..., cursor=...)``."""
        return await self.store.list_tasks(query or TaskQuery(**filters))

    async def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        *,
        node_ids: Collection[str] | None = None,
    ) -> Sequence[Run]:
        """Wait until every run of the task (or those of ``node_ids``) is terminal;
        return the task's runs.

        Raises:
            NotFound: no such task.
            TimeoutError: ``timeout`` seconds passed first.
        """
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                runs = await self.store.get_runs(task_id)
                if all(r.terminal for r in runs if node_ids is None or r.node_id in node_ids):
                    return runs
                # a change notification wakes us; the periodic re-check is a safety net
                # (and, with a shared store, how another runner's results are seen)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self._recheck)

    async def wait_until(
        self, check: Callable[[], Awaitable[bool]], timeout: float | None = None
    ) -> None:
        """Wait until ``await check()`` is true, re-checking after every change GhostRunner
        makes (a run claimed, finished, released, cancelled...).

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                if await check():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self._recheck)

    async def delete(self, task_id: str) -> bool:
        """Cancel the task's pending runs and remove it. Returns False (and keeps it)
        if a run is still in flight; its result is recorded when it comes.

        Raises:
            NotFound: no such task.
        """
        await self.cancel(task_id)
        try:
            await self.store.delete_task(task_id)
        except IllegalTransition:
            return False
        self.loop.forget(task_id)
        self._notify()
        return True

    async def flush(self) -> FlushResult:
        """Cancel every pending run and remove every task whose runs are all terminal."""
        cancelled = deleted = kept = 0
        cursor: str | None = None
        while True:
            page = await self.store.list_tasks(TaskQuery(limit=500, cursor=cursor))
            for summary in page.items:
                task_id = summary.task.id
                try:
                    cancelled += len(await self.store.cancel(task_id, now=self.clock()))
                    await self.store.delete_task(task_id)
                    deleted += 1
                except IllegalTransition:
                    kept += 1
                except NotFound:
                    continue
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        self._notify()
        return FlushResult(cancelled=cancelled, deleted=deleted, kept=kept)

    # ---------------------------------------------------------------- events

    def events(
        self,
        after: int | None = None,
        *,
        task_id: str | None = None,
        kinds: Collection[str] | None = None,
    ) -> AsyncIterator[Event]:
        """Follow the event log (:mod:`ghostrunner.events`): every event stored after
        the id ``after`` (None: only those to come), oldest first, then each new one
        as it is written, for as long as you iterate. Nothing is lost or repeated
        between two events read: to resume later (another process, after a restart),
        pass the id of the last one you handled. A cursor older than the store's
        retention misses what was pruned; one beyond the newest event (the database was
        replaced) starts from the oldest event kept.

        ``task_id`` and ``kinds`` keep only the events of that task, of those kinds.

        Followers share one window of recent events (one store query per change,
        however many follow); they are woken at once by this process's writes, and
        look at the store every ``settings.events_poll`` seconds for the writes of other
        processes (or call :meth:`wake_events` when you learn of those).
        """
        wanted = None if kinds is None else frozenset(kinds)

        def accept(event: Event) -> bool:
            return ((task_id is None or event.task_id == task_id)
                    and (wanted is None or event.kind in wanted))

        plain = task_id is None and wanted is None
        return self._feed.follow(after, None if plain else accept)

    def event_batches(self, after: int | None = None
                      ) -> AsyncGenerator[Sequence[Event], None]:
        """:meth:`events` (unfiltered) a list at a time: each list is what one read of
        the shared window (or of the store) gave, never empty, in id order. For code
        that fans events out to many consumers (``GET /events``), which then steps
        once per read instead of once per event."""
        return self._feed.batches(after)

    def wake_events(self) -> None:
        """Tell the :meth:`events` followers that new events may be in the store: they
        read them now instead of at their next poll. This process's own writes call it;
        call it when you learn that another process wrote some (a PostgreSQL
        ``NOTIFY``, for instance). Cheap, and harmless when nothing is new."""
        self._feed.wake()

    def devices(self) -> Mapping[str, Device]:
        """The executor's current view of the devices."""
        return self.executor.devices()

    @property
    def runner(self) -> RunnerInfo:
        """This runner: its id (new at every start, and after a lost lease), name,
        version and start."""
        return self.loop.runner

    async def runners(self) -> Sequence[RunnerStatus]:
        """Every runner sharing the store, as the store sees them (alive, expired, and
        those that ended in the last hour; see :mod:`ghostrunner.runners`). A store
        kept by one runner (SQLite, memory) has just this one."""
        if isinstance(self.store, Leases):
            return await self.store.runners()
        now = self.clock()
        info = self.loop.runner
        return [RunnerStatus(
            info=info, state=LeaseState.ALIVE, heartbeat_at=now, heartbeat_age=0.0,
            expires_at=now, runs=len(self.loop.in_flight | self.loop.recovering),
        )]

    async def signal(self, kind: str, nodes: Collection[str] | None = None) -> None:
        """Send a signal of ``kind`` to the other processes sharing the store (stores
        with :class:`~ghostrunner.runners.Signals`; else nothing): they call what they
        registered with :meth:`on_signal`. Best effort: a signal that cannot be sent is
        lost (logged), as one can be anyway."""
        if isinstance(self.store, Signals):
            try:
                await self.store.signal(kind, nodes)
            except GhostRunnerError as exc:
                log.warning("could not send a %s signal: %s", kind, exc)

    def on_signal(self, kind: str, callback: Callable[[Signal], None]) -> None:
        """Call ``callback(signal)`` whenever another process sharing the store sends a
        signal of ``kind`` (stores with :class:`~ghostrunner.runners.Signals`, i.e.
        PostgreSQL; ``runs`` and ``runners`` are the loop's own)."""
        self.loop.on_signal(kind, callback)

    async def counts(self) -> Mapping[RunState, int]:
        """How many runs are in each state, over all tasks."""
        return await self.store.counts()

    # ---------------------------------------------------------------- internals

    @property
    def _recheck(self) -> float:
        """Seconds between re-checks of :meth:`wait` with no change seen here: another
        runner sharing the store records runs this process hears nothing of."""
        if self.loop.shared:
            return min(self.settings.resync_interval, _SHARED_RECHECK)
        return self.settings.resync_interval

    def _notify(self) -> None:
        # wake every waiter, then arm a fresh event for the next change
        self._changed.set()
        self._changed = asyncio.Event()
        self._feed.wake()  # its writes came with events

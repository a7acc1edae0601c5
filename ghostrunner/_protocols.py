"""The two backends GhostRunner is built on: a :class:`Store` and an :class:`Executor`.

Both are small protocols with domain verbs, and all the loop needs. Implementations ship
in ``ghostrunner.sqlite`` (:class:`~ghostrunner.SQLiteStore`), ``ghostrunner.meshcentral``
(:class:`~ghostrunner.MeshCentralExecutor`) and ``ghostrunner.testing`` (in-memory
fakes). One contract test suite (``tests/contract``) runs against every store.

Every store also keeps the **event log** (:mod:`ghostrunner.events`): each verb that
changes a task or a run writes its :class:`~ghostrunner.events.Event` in the same
transaction, and :meth:`Store.events_after` reads them back in order.

API tokens are not the queue's business: the HTTP package keeps them behind its own
``TokenStore`` protocol, which a store may implement as well (both shipped stores do).

A store shared by several runners offers two more capabilities, defined in
:mod:`ghostrunner.runners`: ``Leases`` (runner identity, leases, adoption, claims and
ends conditional on the owner) and ``Signals`` (wake-ups between processes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

from ._types import (
    Attempt,
    Device,
    DeviceEvent,
    Outcome,
    Page,
    Run,
    RunKey,
    RunRequest,
    RunState,
    Task,
    TaskQuery,
    TaskSummary,
)
from .audit import AuditEntry
from .events import Event

__all__ = ["Executor", "Store"]


@runtime_checkable
class Store(Protocol):
    """Durable state: tasks and their runs.

    Contract, for every implementation:

    * Every method is atomic: it fully happens or not at all, and a crash right after
      it returns loses nothing (durable for persistent stores).
    * Run state changes follow :data:`~ghostrunner.TRANSITIONS`; a change from a state
      other than the one the method expects raises ``IllegalTransition`` (or, for
      :meth:`claim_many` and :meth:`cancel`, is silently skipped, as documented there).
    * Runs of one device come out of :meth:`next_pending` in submission order.
    * Methods never block the event loop for long (SQLite work runs on its own thread).
    * Raises only ``NotFound``, ``Conflict``, ``IllegalTransition`` or other
      ``StoreError``\\ s, never the backend library's own exceptions.
    * Every change is written with its :class:`~ghostrunner.events.Event` (the kinds and
      their ``data`` are in :mod:`ghostrunner.events`), in the same transaction: the
      verbs that change runs or tasks write one event per run for the loop's verbs
      (``claim_many``: ``run.claimed`` per run claimed; ``finish``: ``run.finished``;
      ``release``: ``run.released``), and one task-level event per call and task for the
      others (``add_task``: ``task.created``; ``cancel``: ``runs.cancelled``; ``abort``:
      ``task.aborted``; ``pause``: ``task.paused`` / ``task.resumed``; ``retry``:
      ``runs.retried``; ``expire_due``: ``runs.expired`` per task; ``add_runs``:
      ``runs.added``; ``delete_task``: ``task.deleted``), only when something changed.
    """

    async def open(self) -> None:
        """Make the store ready (create or migrate the schema). Idempotent."""

    async def close(self) -> None:
        """Release resources. The data stays; :meth:`open` may be called again."""

    # ---------------------------------------------------------------- tasks

    async def add_task(
        self, task: Task, now: datetime, *, nodes: Sequence[str] | None = None,
        audit: AuditEntry | None = None,
    ) -> None:
        """Store ``task`` and one pending run per node of ``nodes`` (default: its
        targets; the facade passes the targets and the devices its selector matched),
        as :meth:`Task.first_runs` makes them at ``now``, atomically: no verb sees the
        task or any of its runs before all of them are stored, and a crash leaves all
        or nothing (one transaction; SQLiteStore writes a large task in several, each
        invisible until the last). Read them back with :meth:`get_runs`.

        ``audit``: an audit log entry stored with the task, in the same transaction
        (a task not added leaves no entry). Only given to a store that keeps an audit
        log (``record_audit``); the HTTP server's entry of ``POST /task/create``.

        Raises ``Conflict`` if a task with this id exists.
        """

    async def get_task(self, task_id: str) -> TaskSummary:
        """The task with run counts. Raises ``NotFound``."""

    async def get_runs(self, task_id: str) -> Sequence[Run]:
        """The task's runs, in target order. Raises ``NotFound`` for an unknown task."""

    async def list_tasks(self, query: TaskQuery) -> Page:
        """Tasks matching ``query``, newest first, one page at a time."""

    async def delete_task(self, task_id: str) -> None:
        """Remove a task whose runs are all terminal.

        Raises ``NotFound``, or ``IllegalTransition`` if a run is still active.
        """

    # ---------------------------------------------------------------- operators' verbs

    async def cancel(self, task_id: str, node_ids: Collection[str] | None = None,
                     *, now: datetime) -> Sequence[Run]:
        """Cancel the task's pending runs (all, or those of ``node_ids``). Runs in any
        other state are left alone. Cancelling the whole task (``node_ids`` None) also
        closes it: a continuous task takes no more runs. Returns the runs cancelled.
        Raises ``NotFound``."""

    async def pause(self, task_id: str, paused: bool) -> TaskSummary:
        """Hold the task (``paused``) or let it go on: :meth:`next_pending` and
        :meth:`claim_many` skip the runs of a paused task; runs in flight go on.
        Raises ``NotFound``."""

    async def abort(self, task_id: str, reason: str, now: datetime) -> Sequence[Run]:
        """Cancel the task's pending runs with ``reason`` as their error, and mark the
        task aborted (with ``reason``) and closed. Returns the runs cancelled. Raises
        ``NotFound``."""

    async def retry(
        self, task_id: str, states: Collection[RunState], now: datetime
    ) -> Sequence[Run]:
        """Put the task's runs that are in ``states`` (each one of
        :data:`~ghostrunner._types.RETRYABLE_STATES`, else ``IllegalTransition``) back
        to pending, available at ``now``, for a new attempt: ``attempts`` stays, the
        result fields are cleared (the attempt history keeps them), and so is the run's
        ``expires_at`` (a retried run waits for its device however long it takes, or
        until cancelled). The task is no longer aborted or closed. Returns the runs, in
        target order. Raises ``NotFound``."""

    async def attempts(self, task_id: str) -> Mapping[str, Sequence[Attempt]]:
        """The attempt history of each of the task's runs (node id -> attempts, oldest
        first; runs never attempted are absent). :meth:`finish` records an attempt, and
        so does :meth:`release` of a delivered one (``lost``: sent again). Raises
        ``NotFound``."""

    # ---------------------------------------------------------------- the loop's verbs

    async def next_pending(
        self,
        node_ids: Collection[str],
        now: datetime,
        *,
        limit: int | None = None,
        skip_tasks: Collection[str] = (),
    ) -> Sequence[Run]:
        """For each of ``node_ids``, its first pending run (in submission order) whose
        ``available_at`` is not after ``now``, that has not expired, and whose task is
        neither paused nor one of ``skip_tasks`` (tasks at their rollout limits). At most
        one run per device; devices with nothing ready are absent; results follow the
        order of ``node_ids`` (duplicates ignored) and stop after ``limit`` runs. Must
        not scan all runs. The loop never asks for a device that has a run dispatched
        by it; a store shared by several processes (PostgresStore) leaves out a device
        that has one dispatched by anyone (cheaply: it is busy elsewhere, and its run's
        end wakes this process through the store's signals), the in-process stores
        need not check."""

    async def claim_many(
        self, keys: Sequence[RunKey], now: datetime
    ) -> Sequence[tuple[Run, Task]]:
        """Atomically move each of ``keys`` from pending to ``dispatched``
        (``attempts`` + 1, ``started_at`` = now), in one store operation; return every
        run that was claimed, with its task. Runs no longer pending (cancelled in the
        meantime...) or whose task is paused are left out and left alone; an unknown run
        raises ``NotFound``. A device has one command at a time: the loop never asks for
        a run of a device that has one dispatched, and a store shared by several
        processes (PostgresStore) leaves such a run out too, whoever dispatched the
        other one (the in-process stores need not check). Likewise rollout limits: the
        loop holds its own claims to them; a shared store also leaves out runs beyond
        their task's ``max_concurrent`` (runs dispatched now) or ``per_minute`` (starts
        in the last minute: runs dispatched, and the attempt history), counted over
        every runner."""

    async def finish(
        self,
        key: RunKey,
        state: RunState,
        now: datetime,
        *,
        outcome: Outcome | None = None,
        error: str | None = None,
    ) -> Run:
        """Record the final ``state`` of a dispatched run (succeeded, failed,
        timed_out or lost), with its outcome (exit code, output, times) or an error,
        and add the attempt to its history.
        Raises ``IllegalTransition`` if it is not dispatched or ``state`` is not one of
        those four; ``NotFound`` for an unknown run."""

    async def release(
        self,
        key: RunKey,
        now: datetime,
        *,
        available_at: datetime,
        error: str,
        delivered: bool,
    ) -> Run:
        """Put a dispatched run back to pending, eligible again at ``available_at``.

        ``delivered=False``: the command certainly did not reach the device, so the
        attempt is given back (``attempts`` - 1, ``undelivered`` + 1).
        ``delivered=True``: an at-least-once retry; ``attempts`` stays, and the
        attempt goes to the history as ``lost`` with ``error``.
        A run of a task aborted meanwhile is cancelled instead (the abort reason as
        its error): it was out when the abort cancelled the task's pending runs.
        """

    async def expire_due(self, now: datetime) -> int:
        """Move every pending run whose ``expires_at`` is not after ``now`` to expired.
        Returns how many."""

    async def dispatched(self) -> Sequence[Run]:
        """Every run in ``dispatched`` state (for recovery after a crash)."""

    async def next_wakeup(self, now: datetime) -> datetime | None:
        """The earliest future moment a pending run becomes available or expires."""

    async def counts(self) -> Mapping[RunState, int]:
        """How many runs are in each state, over all tasks."""

    # ---------------------------------------------------------------- the event log

    async def events_after(self, after: int, limit: int = 1000) -> Sequence[Event]:
        """The events whose id is above ``after``, oldest first, at most ``limit``.

        Ids become visible in increasing order (a store shared by several processes
        makes sure of it): once an event is returned, no event with a lower id shows up
        later. So the id of the last event read is a complete cursor: pass it again to
        get what came next, nothing lost, nothing twice (``after=0``: from the oldest
        event kept). Only committed events are returned."""

    async def last_event_id(self) -> int:
        """The id of the newest event stored, 0 if there is none: where a reader that
        wants only what comes from now on starts."""

    async def prune_events(self, before: datetime) -> int:
        """Delete the oldest events, those written before ``before``, up to the first
        one that is not (retention); return how many were deleted. Ids are never
        reused."""

    # ---------------------------------------------------------------- the loop's verbs for fleets

    async def add_runs(
        self, task_id: str, node_ids: Sequence[str], now: datetime
    ) -> Sequence[Run]:
        """Add a pending run of the task for each of ``node_ids`` that has none yet (a
        device never gets two runs of one task), after its other runs; return the runs
        added. A closed task (cancelled as a whole, or aborted) gets none. For
        continuous tasks. Raises ``NotFound``."""

    async def open_continuous(self, now: datetime) -> Sequence[Task]:
        """The continuous tasks still taking runs at ``now``: not closed, not expired."""

    async def rollout_tasks(self) -> Sequence[Task]:
        """The tasks with rollout limits (``max_concurrent`` or ``per_minute``) that have
        runs pending or in flight: what the loop must hold back (it learns new ones as
        they are submitted, and reloads these every ``resync_interval``)."""

    async def recent_starts(self, since: datetime) -> Sequence[tuple[str, datetime]]:
        """(task id, start) of every attempt of a rate-limited task (a
        ``rollout.per_minute``) that started after ``since``: those in flight
        (``dispatched`` runs) and those in the attempt history. The loop's rate windows,
        after a restart."""


@runtime_checkable
class Executor(Protocol):
    """Runs commands on devices and knows which devices are online.

    Contract:

    * :meth:`devices` is the executor's current view, cheap and without I/O.
    * :meth:`events` yields a :class:`DeviceEvent` whenever the view may have changed.
      Events only wake the loop: losing one costs latency, never correctness.
    * :meth:`run` sends one command to one device and returns its :class:`Outcome`,
      or raises one of the ``ExecutorError`` kinds below. Every call ends, by
      ``request.timeout`` plus a grace at the latest: no call waits forever.

      - ``NotDelivered``: the command certainly did not reach the device.
      - ``OutcomeUnknown``: it may have run, the result is not known; ``recoverable``
        if the device keeps a record of the attempt that a later request with
        ``recover=True`` can read back.
      - ``PermanentError``: it can never run as asked.
    * A request with ``recover`` is an attempt that may have reached the device
      before: return its recorded outcome (``recovered``), or run it if the device
      proves it never started; never run it twice. ``NotDelivered``: ask again later.
    * The loop never calls :meth:`run` twice at once for the same device, and sends a
      device its next request only once the result of the previous one is stored (so
      an executor may then drop what the device keeps of earlier attempts).
    """

    async def open(self) -> None:
        """Connect. Must not fail because the remote end is down: keep trying."""

    async def close(self) -> None:
        """Disconnect and stop every background task."""

    def devices(self) -> Mapping[str, Device]:
        """The current view: node id -> Device."""

    def events(self) -> AsyncIterator[DeviceEvent]:
        """Changes of the view, for as long as the executor is open."""

    async def run(self, request: RunRequest) -> Outcome:
        """Run ``request.command`` on ``request.node_id``; see the class docstring."""

    def recoverable(self, node_id: str) -> bool:
        """Whether the device may keep a record of its attempts, so that an outcome
        lost on the way back can be asked for later (True for an unknown device that
        might). Cheap, without I/O."""

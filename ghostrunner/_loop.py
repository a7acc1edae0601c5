"""The reconcile loop: observe, plan, apply, record.

Level-based, not edge-based (as kopf's reconciliation): an executor event, a submitted
task or a finished dispatch only *wakes* the loop; each pass recomputes from the store
and the executor's current view of who is online. A missed event therefore costs
latency (until the next periodic pass), never correctness.

Concurrency notes (the subtle part):

* Only this loop dispatches. ``_in_flight`` (node id -> asyncio task) is the single
  source of truth for "this device's command slot is taken" within the process; the
  planner never picks a device that is in it, so a device never has two commands.
* A run is ``claim``\\ ed (pending -> dispatched, durably) *before* the command is sent.
  If the process dies after the claim, recovery at the next start finds it dispatched
  and treats it as possibly executed: that is what makes at_most_once hold.
* The result is written under ``asyncio.shield`` so that a graceful stop cancelling the
  dispatch task cannot interrupt the write halfway. :meth:`Reconciler.abort` simulates a
  crash: it sets ``_aborted`` first, so no result is written after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime

import attrs

from ._errors import ExecutorError, GhostRunnerError, OutcomeUnknown
from ._output import DEFAULT_OUTPUT_LIMIT, cap_output
from ._planner import Decision, decide, plan_dispatches, recover
from ._protocols import Executor, Store
from ._types import Outcome, Run, RunRequest, RunState, Task, utcnow

__all__ = ["LoopSettings", "Reconciler"]

log = logging.getLogger("ghostrunner.loop")

_NEVER = datetime.max.replace(tzinfo=UTC)


@attrs.frozen(kw_only=True)
class LoopSettings:
    """Tuning of the reconcile loop. Every field has a sensible default.

    Args:
        max_in_flight: the most commands in flight at once, over all devices.
        resync_interval: seconds between passes when nothing wakes the loop; bounds the
            latency a lost event can cost.
        retry_base: first retry backoff in seconds (doubles each time).
        retry_cap: the longest retry backoff in seconds.
        dispatch_grace: seconds past a task's timeout after which the loop stops
            waiting for the executor and records the outcome as unknown.
        shutdown_grace: on a graceful stop, seconds to wait for commands in flight.
        output_limit: characters of output kept per run (head and tail).
        coalesce: seconds a woken loop waits before its pass, so that a burst of
            events (devices coming online, commands finishing) is handled by one pass
            whose claims and results a batching store commits together.
    """

    max_in_flight: int = attrs.field(default=256)
    resync_interval: float = 5.0
    retry_base: float = 1.0
    retry_cap: float = 60.0
    dispatch_grace: float = 30.0
    shutdown_grace: float = 10.0
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    coalesce: float = 0.005

    @max_in_flight.validator
    def _positive(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < 1:
            raise ValueError("max_in_flight must be at least 1")

    def __attrs_post_init__(self) -> None:
        for name in ("resync_interval", "retry_base", "retry_cap", "dispatch_grace"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"{name} must be a positive number of seconds")
        if not (self.shutdown_grace >= 0 and self.coalesce >= 0):
            raise ValueError("shutdown_grace and coalesce must not be negative")
        if self.output_limit < 2:
            raise ValueError("output_limit must be at least 2 characters")


class Reconciler:
    """Matches pending runs to online devices and records what happens.

    Use through :class:`~ghostrunner.GhostRunner`; tests may drive it directly with
    :meth:`step` and :meth:`run_until_idle`.
    """

    def __init__(
        self,
        store: Store,
        executor: Executor,
        settings: LoopSettings | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.settings = settings or LoopSettings()
        self.clock = clock
        self._on_change = on_change or (lambda: None)
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._step_lock = asyncio.Lock()  # passes never interleave (one planner at a time)
        # Devices known to have no ready run, so passes skip them: a hint, never the
        # truth. Valid until the store's next due time (a backoff ends, a not_before
        # comes), a submit or release names the device, or resync_interval passes.
        self._idle: set[str] = set()
        self._idle_until: datetime | None = None
        self._idle_reset_at = 0.0
        self._aborted = False
        self._stopping = False
        self.passes = 0
        self._rng = random.Random()  # never the global one: it may be the user's

    # ---------------------------------------------------------------- public

    def wake(self, node_ids: Collection[str] = (), due: datetime | None = None) -> None:
        """Ask for a pass soon (a task was submitted, a device came online...).
        ``node_ids``: devices that may have new work (a submitted task's targets);
        ``due``: when that work becomes ready, if later (its ``not_before``)."""
        self._idle.difference_update(node_ids)
        if due is not None and self._idle_until is not None and due < self._idle_until:
            self._idle_until = due
        self._wake.set()

    @property
    def in_flight(self) -> frozenset[str]:
        """Node ids with a command in flight right now."""
        return frozenset(self._in_flight)

    async def recover(self) -> int:
        """Settle runs left ``dispatched`` by a process that died. Returns how many."""
        stale = await self.store.dispatched()
        now = self.clock()
        for run in stale:
            if run.node_id in self._in_flight:  # ours, not stale
                continue
            task = await self._task(run.task_id)
            decision = recover(
                run, task, now=now,
                retry_base=self.settings.retry_base, retry_cap=self.settings.retry_cap,
            )
            await self._apply(run, decision, now)
            log.warning("recovered run %s left dispatched: %s", run.key, decision.state)
        return len(stale)

    async def step(self) -> int:
        """One pass: expire what is due, then start what can start. Returns how many
        dispatches it started."""
        async with self._step_lock:
            return await self._step()

    async def _step(self) -> int:
        self.passes += 1
        now = self.clock()
        if await self.store.expire_due(now):
            self._on_change()
        if self._stopping:
            return 0
        online = {node for node, dev in self.executor.devices().items() if dev.online}
        await self._refresh_idle(now)
        free = online.difference(self._in_flight, self._idle)
        slots = self.settings.max_in_flight - len(self._in_flight)
        if not free or slots <= 0:
            return 0
        # Ask only for as many runs as there are slots; starting the device order at a
        # random place keeps that fair when more devices have work than there are slots.
        order = list(free)
        cut = self._rng.randrange(len(order))
        order = order[cut:] + order[:cut]
        # in chunks: a query's cost grows with the devices it names, and most online
        # devices usually have nothing to do (those found so are skipped next time)
        candidates: list[Run] = []
        chunk = max(256, 2 * slots)
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            want = slots - len(candidates)
            found = await self.store.next_pending(part, now, limit=want)
            self._note_idle(part, found, want)
            candidates.extend(found)
            if len(candidates) >= slots:
                break
        chosen = plan_dispatches(
            candidates, online=online, busy=self._in_flight.keys(), slots=slots, now=now
        )
        if not chosen:
            return 0
        # one store operation claims them all (one transaction) and brings their tasks
        claimed = await self.store.claim_many([r.key for r in chosen], now)
        started = 0
        for run, task in claimed:
            self._tasks[task.id] = task
            self._in_flight[run.node_id] = asyncio.create_task(
                self._dispatch(run, task), name=f"ghostrunner-dispatch-{run.key}"
            )
            started += 1
        if started:
            self._on_change()
        if len(self._tasks) > 10_000:
            for _ in range(len(self._tasks) - 10_000):
                self._tasks.popitem(last=False)
        return started

    async def run_until_idle(self, max_passes: int = 100_000) -> None:
        """Pass until nothing is in flight and a pass starts nothing. For tests: time
        does not move by itself here, so runs waiting on a backoff or ``not_before``
        stay pending until the test's clock moves."""
        for _ in range(max_passes):
            started = await self.step()
            if self._in_flight:
                await asyncio.wait(
                    list(self._in_flight.values()), return_when=asyncio.FIRST_COMPLETED
                )
                continue
            if not started:
                return
        raise RuntimeError(f"not idle after {max_passes} passes")

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Recover, then pass whenever woken, at a due time, or every
        ``resync_interval``, until ``stop`` is set; then stop gracefully."""
        watcher = asyncio.create_task(self._watch_events(), name="ghostrunner-events")
        try:
            # runs left dispatched must be settled before anything else: retry until done
            while not stop.is_set() and not await self._retrying(self.recover):
                pass
            while not stop.is_set():
                self._wake.clear()
                await self._retrying(self.step)
                delay = await self._idle_delay()
                waker = asyncio.create_task(self._wake.wait())
                stopper = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait(
                        {waker, stopper}, timeout=delay, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waker.cancel()
                    stopper.cancel()
                if self._wake.is_set() and self.settings.coalesce > 0:
                    await asyncio.sleep(self.settings.coalesce)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self.drain()

    async def drain(self) -> None:
        """Stop starting commands; wait up to ``shutdown_grace`` for those in flight
        (recording their results), then abandon the rest: they stay ``dispatched`` and
        the next start recovers them by their delivery policy."""
        self._stopping = True
        pending = list(self._in_flight.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.settings.shutdown_grace)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)

    async def abort(self) -> None:
        """Stop dead, as a crash would: nothing more is written to the store."""
        self._aborted = True
        self._stopping = True
        tasks = list(self._in_flight.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # ---------------------------------------------------------------- internals

    async def _task(self, task_id: str) -> Task:
        task = self._tasks.get(task_id)
        if task is None:
            task = (await self.store.get_task(task_id)).task
            self._tasks[task_id] = task
            if len(self._tasks) > 10_000:
                self._tasks.popitem(last=False)
        else:
            self._tasks.move_to_end(task_id)
        return task

    async def _retrying(self, step: Callable[[], object]) -> bool:
        """Run ``step``; on failure log, pause ``retry_base`` and return False."""
        try:
            result = step()
            if asyncio.iscoroutine(result):
                await result
        except Exception:  # the loop must outlive a failing store or executor
            log.exception("pass failed; retrying after %.1fs", self.settings.retry_base)
            await asyncio.sleep(self.settings.retry_base)
            return False
        return True

    async def _refresh_idle(self, now: datetime) -> None:
        if (
            self._idle_until is None
            or now >= self._idle_until
            or time.monotonic() >= self._idle_reset_at
        ):
            self._idle.clear()
            due = await self.store.next_wakeup(now)
            self._idle_until = due or _NEVER
            self._idle_reset_at = time.monotonic() + self.settings.resync_interval

    def _note_idle(self, order: list[str], candidates: Sequence[Run], limit: int) -> None:
        """Remember the devices the store looked at and found nothing ready for (it
        answers in ``order`` and stops at ``limit``)."""
        examined: Sequence[str] = order
        if len(candidates) >= limit:
            examined = order[: order.index(candidates[-1].node_id) + 1]
        returned = {run.node_id for run in candidates}
        self._idle.update(node for node in examined if node not in returned)

    async def _idle_delay(self) -> float:
        # _idle_until is the store's next due time as of the last refresh, lowered by
        # every release and submit since: the next moment time alone can make work
        delay = self.settings.resync_interval
        due = self._idle_until
        if due is not None and due != _NEVER:
            delay = min(delay, max(0.0, (due - self.clock()).total_seconds()))
        return delay

    async def _watch_events(self) -> None:
        while True:
            try:
                async for _event in self.executor.events():
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("executor event stream failed; resubscribing")
            # the stream ended (executor reconnecting or closed): resubscribe after a pause
            self._wake.set()
            await asyncio.sleep(self.settings.retry_base)

    async def _dispatch(self, run: Run, task: Task) -> None:
        request = RunRequest(
            task_id=task.id,
            node_id=run.node_id,
            command=task.command,
            shell=task.shell,
            run_as_user=task.run_as_user,
            timeout=task.timeout,
            attempt=run.attempts,
            delivery=task.delivery,
        )
        try:
            result: Outcome | ExecutorError
            try:
                async with asyncio.timeout(task.timeout + self.settings.dispatch_grace):
                    result = await self.executor.run(request)
            except ExecutorError as exc:
                result = exc
            except TimeoutError:
                result = OutcomeUnknown(
                    f"no reply within {task.timeout + self.settings.dispatch_grace:.0f}s"
                )
            except Exception as exc:  # a bug in an executor must not kill the loop
                log.exception("executor failed on %s", run.key)
                result = OutcomeUnknown(f"executor error: {exc!r}")
            if self._aborted:
                return
            now = self.clock()
            if isinstance(result, Outcome):
                result = self._normalise(result, run, now)
            decision = decide(
                run, task, result, now=now,
                retry_base=self.settings.retry_base, retry_cap=self.settings.retry_cap,
            )
            try:
                await asyncio.shield(self._apply(run, decision, now))
            except GhostRunnerError:
                # the run stays dispatched; the next start's recovery settles it
                log.exception("could not record the result of %s", run.key)
        finally:
            if self._in_flight.get(run.node_id) is asyncio.current_task():
                del self._in_flight[run.node_id]
            self._wake.set()

    def _normalise(self, outcome: Outcome, run: Run, now: datetime) -> Outcome:
        output, cut = cap_output(outcome.output, self.settings.output_limit)
        return attrs.evolve(
            outcome,
            output=output,
            output_truncated=outcome.output_truncated or cut,
            started_at=outcome.started_at or run.started_at,
            finished_at=outcome.finished_at or now,
        )

    async def _apply(self, run: Run, decision: Decision, now: datetime) -> None:
        if decision.state is RunState.PENDING:
            assert decision.available_at is not None
            self._idle.discard(run.node_id)
            if self._idle_until is not None and decision.available_at < self._idle_until:
                self._idle_until = decision.available_at
            await self.store.release(
                run.key,
                now,
                available_at=decision.available_at,
                error=decision.error or "",
                delivered=decision.delivered,
            )
        else:
            await self.store.finish(
                run.key, decision.state, now, outcome=decision.outcome, error=decision.error
            )
        self._on_change()

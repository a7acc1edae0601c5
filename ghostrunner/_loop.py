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
* Outcome recovery: a run whose outcome is unknown but whose device keeps a record of
  the attempt (a recoverable ``OutcomeUnknown``, or any run found dispatched at start)
  stays ``dispatched`` and sits in ``_recovering`` (node id -> its run). Its device is
  held: nothing else is sent to it until its device answers a recovery request (the
  same attempt, ``recover=True``) or the run's recovery deadline passes. So a device
  gets its next command only once the previous attempt's result is stored, which is
  what lets an executor drop the device's records of earlier attempts.

Several runners on one store (a store with :class:`~ghostrunner.runners.Leases`): the
store's unique index, not this loop, keeps one command per device across processes.
This loop registers its runner, renews its lease every ``heartbeat`` seconds (a task of
its own, never behind a pass), and is *fenced* while its lease may be about to end
(``fenced``): no claim, no command and no recovery request leaves it then. It records
a run's end only as the run's owner (``NotOwner``: the run was taken over; the result
is dropped, the device's journal tells the new owner). Each heartbeat, and when a
lease of another runner ends, it adopts what dead runners left dispatched and puts it
through outcome recovery, like a run found dispatched at start. With
:class:`~ghostrunner.runners.Signals`, another process's "these devices have work"
wakes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime

import attrs

from ._output import DEFAULT_OUTPUT_LIMIT, cap_output
from ._planner import (
    RATE_WINDOW,
    Decision,
    abort_reason,
    decide,
    decide_recovery,
    plan_dispatches,
    recover,
    recovery_deadline,
    rollout_budget,
)
from ._protocols import Executor, Store
from ._types import (
    Device,
    Outcome,
    RetryPolicy,
    Rollout,
    Run,
    RunRequest,
    RunState,
    TagsMode,
    Task,
    new_id,
    utcnow,
)
from .errors import (
    ExecutorError,
    GhostRunnerError,
    IllegalTransition,
    NotDelivered,
    NotFound,
    NotOwner,
    OutcomeUnknown,
)
from .runners import Leases, RunnerInfo, Signal, Signals

__all__ = ["LoopSettings", "Reconciler"]

log = logging.getLogger("ghostrunner.loop")

_NEVER = datetime.max.replace(tzinfo=UTC)
_UNSENT = "not sent: this runner's lease was not renewed in time"


@attrs.frozen(kw_only=True)
class LoopSettings:
    """Tuning of the reconcile loop. Every field has a sensible default.

    Args:
        max_in_flight: the most commands in flight at once, over all devices.
        resync_interval: seconds between passes when nothing wakes the loop; bounds the
            latency a lost event can cost.
        retry: the backoff before a run is sent again (and before a failed pass is
            tried again).
        dispatch_grace: seconds past a task's timeout after which the loop stops
            waiting for the executor and records the outcome as unknown.
        shutdown_grace: on a graceful stop, seconds to wait for commands in flight.
        output_limit: characters of output kept per run (head and tail).
        coalesce: seconds a loop woken by a submit or device events waits before its
            pass, so that a burst of them (devices coming online) is handled by one pass
            whose claims a batching store commits together. A pass woken only by
            finished dispatches starts at once: their devices wait for their next run.
        recover_within: seconds after a run was sent during which its device is asked
            for an outcome GhostRunner lost (a run with ``expires_at`` is asked until
            then instead); after that the outcome counts as unknown.
        events_poll: seconds between two looks at the store by ``GhostRunner.events()``
            followers waiting for an event (one query, however many wait). This
            process's own writes wake them at once; the poll is what shows events
            written by other processes sharing the database.
        lease: with a store shared by several runners (PostgreSQL): seconds a runner's
            lease lasts from each renewal. A runner dead or cut off from the database
            for this long (plus ``adopt_grace``) has its dispatched runs taken over.
        heartbeat: seconds between renewals (default a third of ``lease``, at most half
            of it). A runner that could not renew for ``lease - heartbeat`` seconds
            stops sending commands until it can (it is *fenced*).
        adopt_grace: seconds past the end of another runner's lease before its runs
            are taken over.
    """

    max_in_flight: int = attrs.field(default=256)
    resync_interval: float = 5.0
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    dispatch_grace: float = 30.0
    shutdown_grace: float = 10.0
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    coalesce: float = 0.005
    recover_within: float = 7 * 24 * 3600.0
    events_poll: float = 2.0
    lease: float = 15.0
    heartbeat: float = attrs.field(
        default=attrs.Factory(lambda self: self.lease / 3, takes_self=True))
    adopt_grace: float = 0.5

    @max_in_flight.validator
    def _positive(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < 1:
            raise ValueError("max_in_flight must be at least 1")

    def __attrs_post_init__(self) -> None:
        for name in ("resync_interval", "dispatch_grace", "recover_within", "events_poll",
                     "lease", "heartbeat"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"{name} must be a positive number of seconds")
        if not (self.shutdown_grace >= 0 and self.coalesce >= 0 and self.adopt_grace >= 0):
            raise ValueError("shutdown_grace, coalesce and adopt_grace must not be negative")
        if not self.heartbeat <= self.lease / 2:
            raise ValueError("heartbeat must be at most half of lease (a renewal may fail "
                             "once without fencing the runner)")
        if self.output_limit < 2:
            raise ValueError("output_limit must be at least 2 characters")


class _IdleHint:
    """Devices known to have no ready run, so that passes skip them: a hint, never the
    truth. It holds until the store's next due time (a backoff ends, a ``not_before``
    comes), until a submit or release names the device, and for ``ttl`` seconds at most.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.devices: set[str] = set()
        self.until: datetime | None = None  # None: never refreshed
        self._expires = 0.0  # time.monotonic() deadline
        self.epoch = 0  # counts work_for(): a pass notes nothing if it moved meanwhile

    def stale(self, now: datetime) -> bool:
        return self.until is None or now >= self.until or time.monotonic() >= self._expires

    def refresh(self, due: datetime | None) -> None:
        """Start afresh; ``due`` is the store's next due time (None: nothing is due)."""
        self.devices.clear()
        self.until = due or _NEVER
        self._expires = time.monotonic() + self.ttl

    def work_for(self, node_ids: Collection[str], due: datetime | None = None) -> None:
        """``node_ids`` may have work now, or at ``due`` (a submit, a release)."""
        self.epoch += 1
        self.devices.difference_update(node_ids)
        if due is not None and self.until is not None and due < self.until:
            self.until = due

    def forget(self) -> None:
        """Any device may have work now (another process said so, or may have)."""
        self.epoch += 1
        self.devices.clear()

    def note(self, asked: Sequence[str], found: Sequence[Run], limit: int) -> None:
        """The store was asked for ``asked`` (and answers in that order, stopping at
        ``limit``): the devices it looked at and found nothing for are idle."""
        examined = asked
        if len(found) >= limit:
            examined = asked[: list(asked).index(found[-1].node_id) + 1]
        returned = {run.node_id for run in found}
        self.devices.update(node for node in examined if node not in returned)

    def delay(self, now: datetime, longest: float) -> float:
        """Seconds until time alone can make work (at most ``longest``)."""
        if self.until is None or self.until == _NEVER:
            return longest
        return min(longest, max(0.0, (self.until - now).total_seconds()))


class _Rollouts:
    """What the rollout limits need: each task's runs in flight, and the recent starts
    of each rate-limited task (pruned as the window slides)."""

    def __init__(self) -> None:
        self.flying: Counter[str] = Counter()
        self.starts: dict[str, deque[datetime]] = {}
        self.limits: dict[str, Rollout] = {}  # tasks with a limit, known to the loop

    def seed(self, tasks: Mapping[str, Task], starts: Sequence[tuple[str, datetime]]) -> None:
        """After a restart: the starts of the last minute, as the store recorded them."""
        for task_id, started in sorted(starts, key=lambda s: s[1]):
            task = tasks.get(task_id)
            if task is not None:
                self.limits[task_id] = task.rollout
                self.starts.setdefault(task_id, deque()).append(started)

    def know(self, task: Task) -> None:
        """Take ``task``'s limits into account from now on (if it has any)."""
        if task.rollout.max_concurrent is not None or task.rollout.per_minute is not None:
            self.limits[task.id] = task.rollout

    def holding(self, task: Task) -> None:
        """A run of the task is in flight (or held in recovery) without a new start."""
        self.flying[task.id] += 1
        self.know(task)

    def started(self, task: Task, now: datetime) -> None:
        self.holding(task)
        if task.rollout.per_minute is not None:
            self.starts.setdefault(task.id, deque()).append(now)

    def ended(self, task_id: str) -> bool:
        """A run of the task ended; True if that may let another start."""
        self.flying[task_id] -= 1
        if self.flying[task_id] <= 0:
            del self.flying[task_id]
        return task_id in self.limits

    def reload(self, tasks: Sequence[Task]) -> None:
        """The store's limited tasks with active runs: the limits to hold from now on
        (those of tasks with runs in flight or recent starts are kept too)."""
        keep = set(self.flying).union(t for t, window in self.starts.items() if window)
        self.limits = {t: r for t, r in self.limits.items() if t in keep}
        for task in tasks:
            self.know(task)
        for task_id in set(self.starts) - keep:
            del self.starts[task_id]

    def budgets(self, now: datetime) -> tuple[dict[str, int], datetime | None]:
        """Room per limited task, and the next moment a rate window frees a start."""
        room: dict[str, int] = {}
        wake: datetime | None = None
        for task_id, rollout in self.limits.items():
            window = self.starts.get(task_id)
            while window and window[0] <= now - RATE_WINDOW:
                window.popleft()
            budget, free_at = rollout_budget(
                rollout, in_flight=self.flying[task_id], starts=window or (), now=now
            )
            if budget is not None:
                room[task_id] = budget
            if free_at is not None and (wake is None or free_at < wake):
                wake = free_at
        return room, wake


class _SelectorIndex:
    """Continuous tasks by one thing a device must have to match them (a tag their
    selector requires, or their device group), so a changed device is tested against
    the few tasks it could match rather than all of them."""

    def __init__(self, tasks: Collection[Task]) -> None:
        self._by: dict[tuple[str, str | None], list[Task]] = {}
        for task in tasks:
            self._by.setdefault(self._key(task), []).append(task)

    @staticmethod
    def _key(task: Task) -> tuple[str, str | None]:
        select = task.select
        assert select is not None
        if select.tags and select.tags_mode is TagsMode.ALL:
            return ("tag", min(t.casefold() for t in select.tags))
        if select.group is not None:
            if select.group.startswith("mesh//"):
                return ("group", select.group)
            return ("group name", select.group.casefold())
        return ("any", None)

    def candidates(self, device: Device) -> list[Task]:
        """The tasks ``device`` might match (a superset of those it does)."""
        by = self._by
        found = list(by.get(("any", None), ()))
        for tag in device.folded_tags:
            found += by.get(("tag", tag), ())
        found += by.get(("group", device.group_id), ())
        found += by.get(("group name", (device.group_name or "").casefold()), ())
        return found


@attrs.define
class _Recovery:
    """A run whose outcome its device is asked for (see the module docstring)."""

    run: Run
    task: Task
    due: datetime  # when to ask next
    deadline: datetime  # after it, the outcome counts as unknown
    asked: int = 0  # recovery requests answered so far
    unsent: bool = False  # never sent (fenced before it left): release it, ask nobody


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
        runner: RunnerInfo | None = None,
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
        self._idle = _IdleHint(self.settings.resync_interval)
        self._rollouts = _Rollouts()
        self._again = False  # a pass left work that another pass can start at once
        self._burst = False  # woken by a submit or device events (not only finishes)
        self._flying_task: dict[str, str] = {}  # node id -> the task of its run in flight
        self._recovering: dict[str, _Recovery] = {}  # node id -> its run held in recovery
        # continuous tasks, and the device view they were last matched against
        self._continuous: dict[str, Task] = {}
        self._matched: dict[str, set[str]] = {}  # task id -> nodes known to have a run
        self._seen: dict[str, Device] = {}
        self._index: _SelectorIndex | None = None  # of _continuous, rebuilt when it changes
        self._rematch: set[str] = set()  # tasks to match against every device
        self._continuous_at = 0.0  # time.monotonic() of the last reload from the store
        self.matching_seconds = 0.0  # spent matching devices to continuous tasks (stats)
        self._aborted = False
        self._stopping = False
        self.passes = 0
        self._rng = random.Random()  # never the global one: it may be the user's
        # several runners on one store (see the module docstring)
        self.runner = runner or RunnerInfo(started_at=clock())
        self._leases: Leases | None = store if isinstance(store, Leases) else None
        self._signals: Signals | None = store if isinstance(store, Signals) else None
        # the lease is judged by a monotonic clock (a fake clock's time in tests)
        self._mono: Callable[[], float] = (
            time.monotonic if clock is utcnow else (lambda: clock().timestamp()))
        self._registered = False
        self._lease_until = float("-inf")  # _mono() before which the lease surely holds
        self._contact_since: float | None = None  # renewals succeed since (None: failing)
        self._fenced_logged = False
        self._adopt_at: float | None = None  # _mono() when another runner's lease ends
        self._adopt_now = asyncio.Event()  # a runner stopped or joined: look now
        self._takeup: dict[str, Run] = {}  # node id -> adopted run not yet taken up
        self._elsewhere: dict[str, float] = {}  # limited task -> skip until (monotonic)
        self._hooks: dict[str, list[Callable[[Signal], None]]] = {}
        self.adopted = 0  # runs taken over from dead runners (stats)
        self.signals_seen = 0  # signals from other processes (stats)

    # ---------------------------------------------------------------- public

    def wake(self, node_ids: Collection[str] = (), due: datetime | None = None,
             expires: datetime | None = None) -> None:
        """Ask for a pass soon (a task was submitted, a device came online...).
        ``node_ids``: devices that may have new work (a submitted task's targets);
        ``due``: when that work becomes ready, if later (its ``not_before``);
        ``expires``: when it expires (a pass then moves what is left to expired)."""
        self._idle.work_for(node_ids, due)
        if expires is not None:
            self._idle.work_for((), expires)
        self._burst = True
        self._wake.set()

    def hold(self, task: Task) -> None:
        """Hold ``task`` (submitted, retried or resumed) to its rollout limits."""
        self._rollouts.know(task)

    def follow(self, task: Task, nodes: Collection[str]) -> None:
        """A task was just submitted with runs for ``nodes``: hold it to its rollout
        limits and, if it is continuous, give devices that come to match it a run."""
        self.hold(task)
        if task.continuous:
            self._continuous[task.id] = task
            self._index = None
            self._matched[task.id] = set(nodes)
            self._rematch.add(task.id)  # a device may have changed while it was stored
            self._wake.set()

    def forget(self, task_id: str) -> None:
        """Stop following a task (it was deleted)."""
        self._continuous.pop(task_id, None)
        self._matched.pop(task_id, None)
        self._rematch.discard(task_id)
        self._index = None

    @property
    def in_flight(self) -> frozenset[str]:
        """Node ids with a command in flight right now."""
        return frozenset(self._in_flight)

    @property
    def recovering(self) -> frozenset[str]:
        """Node ids held until their device tells the outcome of a run GhostRunner lost
        (their runs stay ``dispatched``)."""
        return frozenset(self._recovering) | frozenset(self._takeup)

    @property
    def shared(self) -> bool:
        """Whether the store is shared by several runners (it keeps leases)."""
        return self._leases is not None

    @property
    def fenced(self) -> bool:
        """With a shared store: whether this runner's lease may end within a heartbeat
        (it could not renew it in time), so it sends nothing (no claim, no command, no
        recovery request) until a renewal succeeds."""
        if self._leases is None:
            return False
        return self._mono() >= self._lease_until - self.settings.heartbeat

    @property
    def lease_left(self) -> float | None:
        """Seconds this runner's lease surely holds (None: the store keeps no leases)."""
        if self._leases is None:
            return None
        return max(0.0, self._lease_until - self._mono())

    def on_signal(self, kind: str, callback: Callable[[Signal], None]) -> None:
        """Call ``callback(signal)`` for every signal of ``kind`` another process sends
        through the store (stores with :class:`~ghostrunner.runners.Signals`)."""
        self._hooks.setdefault(kind, []).append(callback)

    async def heartbeat(self) -> None:
        """Renew this runner's lease, then adopt what dead runners left dispatched
        (stores with :class:`~ghostrunner.runners.Leases`; else nothing). The
        background loop does both every ``heartbeat`` seconds; tests call it."""
        await self.renew()
        await self.adopt()

    async def renew(self) -> None:
        """Renew this runner's lease (registering it first if it is not), or, if the
        store says it was declared dead, start again as a new runner."""
        leases = self._leases
        if leases is None:
            return
        if not self._registered:
            await self._register(leases)
        else:
            sent = self._mono()
            try:
                renewal = await leases.renew(self.runner.id, self.settings.lease)
            except BaseException:
                self._contact_since = None
                raise
            if renewal.held:
                if self._contact_since is None:
                    self._contact_since = sent
                self._held_since(sent)
            else:
                await self._lost(leases)

    async def adopt(self) -> int:
        """Take over the dispatched runs of runners whose lease ended (plus
        ``adopt_grace``) and put them through outcome recovery; returns how many runs
        (stores with :class:`~ghostrunner.runners.Leases`; else 0)."""
        leases = self._leases
        if leases is None or not self._registered or self.fenced:
            return 0
        if self._contact_since is None or (
                self._mono() - self._contact_since < self.settings.heartbeat):
            # back in touch with the store only just now (a start, a database outage):
            # the others may have been cut off as long, give them a heartbeat to renew
            # before declaring them dead
            self._adopt_at = (None if self._contact_since is None
                              else self._contact_since + self.settings.heartbeat)
            return 0
        async with self._step_lock:
            adoption = await leases.adopt(self.runner.id, self.settings.adopt_grace)
            self._adopt_at = (None if adoption.next_in is None
                              else self._mono() + adoption.next_in)
            if adoption.runners:
                log.warning("runner(s) %s stopped renewing their lease: %d dispatched "
                            "run(s) taken over", ", ".join(adoption.runners),
                            len(adoption.runs))
            for run in adoption.runs:
                self._takeup[run.node_id] = run
            self.adopted += len(adoption.runs)
            await self._take_up()
        return len(adoption.runs)

    async def recover(self) -> int:
        """Settle runs left ``dispatched`` by a process that died, and pick up the
        rollout windows and continuous tasks the store knows. Returns how many runs."""
        now = self.clock()
        recent = await self.store.recent_starts(now - RATE_WINDOW)
        tasks = {task_id: await self._task(task_id) for task_id, _ in recent}
        self._rollouts.seed(tasks, recent)
        await self._load_continuous(now)  # and the limited tasks
        leases = self._leases
        if leases is not None:
            # a shared store: only what dead runners left is stale, not what live ones
            # have in flight; a restarted process is a new runner, its predecessor's
            # runs are adopted once its lease has ended
            if not self._registered:
                await self._register(leases)
            return await self.adopt()
        stale = await self.store.dispatched()
        for run in stale:
            if run.node_id in self._in_flight or run.node_id in self._recovering:
                continue  # ours, not stale
            task = await self._task(run.task_id)
            deadline = recovery_deadline(run, task, within=self.settings.recover_within)
            if not self.executor.recoverable(run.node_id):
                deadline = now  # nothing to ask: settle it now
            decision = recover(run, task, now=now, retry=self.settings.retry, deadline=deadline)
            if decision.recovering:
                self._rollouts.holding(task)
            await self._apply(run, task, decision, now, deadline=deadline)
            log.warning("run %s was left dispatched: %s", run.key,
                        "asking its device" if decision.recovering else decision.state)
        return len(stale)

    async def step(self) -> int:
        """One pass: expire what is due, then start what can start. Returns how many
        dispatches it started."""
        async with self._step_lock:
            return await self._step()

    async def _step(self) -> int:
        self.passes += 1
        self._again = False
        now = self.clock()
        # something is due (a backoff ends, a run expires) only once the idle hint's
        # time has come, or its ttl has run out: a pass woken by a finished dispatch
        # alone saves the store a write (the planner skips expired runs anyway)
        if self._idle.stale(now) and await self.store.expire_due(now):
            self._on_change()
        if self._stopping:
            return 0
        if self.fenced:
            if not self._fenced_logged:
                self._fenced_logged = True
                log.error("runner %s could not renew its lease in time: sending nothing "
                          "until it can", self.runner.id)
            return 0
        if self._takeup:
            await self._take_up()
        devices = self.executor.devices()
        if time.monotonic() >= self._continuous_at + self.settings.resync_interval:
            await self._load_continuous(now)
        if self._continuous:
            await self._match_continuous(devices, now)
        online = {node for node, dev in devices.items() if dev.online}
        if self._idle.stale(now):
            self._idle.refresh(await self.store.next_wakeup(now))
        if self._recovering:
            await self._recover_due(online, now)
        budgets, _ = self._rollouts.budgets(now)
        full = [task_id for task_id, room in budgets.items() if room <= 0]
        if self._elsewhere:
            mono = self._mono()
            for task_id, until in list(self._elsewhere.items()):
                if until <= mono:
                    del self._elsewhere[task_id]
                else:
                    full.append(task_id)  # (next_pending skips its runs)
        free = online.difference(self._in_flight, self._idle.devices, self._recovering,
                                 self._takeup)
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
        epoch = self._idle.epoch
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            want = slots - len(candidates)
            found = await self.store.next_pending(part, now, limit=want, skip_tasks=full)
            if self._idle.epoch == epoch:
                self._idle.note(part, found, want)
            else:
                # work appeared while the store answered (a submit, a release, a limit
                # freed): what it found may be out of date, so note nothing and pass again
                self._again = True
            candidates.extend(found)
            if len(candidates) >= slots:
                break
        # the tasks of the runs found may have limits the loop has not seen yet
        budgets, rate_wake = self._rollouts.budgets(now)
        if rate_wake is not None:
            self._idle.work_for((), rate_wake)  # be back when a rate window frees a start
        chosen = plan_dispatches(
            candidates, online=online,
            busy=self._in_flight.keys() | self._recovering.keys() | self._takeup.keys(),
            slots=slots, now=now, budgets=budgets,
        )
        offered = Counter(run.task_id for run in candidates)
        taken = Counter(run.task_id for run in chosen)
        # runs passed over because their task reached its limit: their devices may have
        # other work, which the next pass finds with that task skipped
        again = {t for t in offered if t in budgets and offered[t] > taken[t] == budgets[t]}
        self._again = bool(again)
        if not chosen:
            return 0
        # one store operation claims them all (one transaction) and brings their tasks
        keys = [r.key for r in chosen]
        owner = self.runner.id
        if self._leases is not None:
            claimed = await self._leases.claim_many(keys, now, runner=owner)
            got = Counter(run.task_id for run, _ in claimed)
            for task_id, n in taken.items():
                if got[task_id] < n and task_id in self._rollouts.limits:
                    # the store held the task back: its limit is reached counting the
                    # other runners' runs; they go on with it, this runner skips it a
                    # while (else it would offer the same runs pass after pass)
                    self._elsewhere[task_id] = self._mono() + self.settings.resync_interval
                    again.discard(task_id)
            self._again = bool(again)
        else:
            claimed = await self.store.claim_many(keys, now)
        started = 0
        for run, task in claimed:
            self._remember(task)
            self._rollouts.started(task, now)
            self._flying_task[run.node_id] = task.id
            self._in_flight[run.node_id] = asyncio.create_task(
                self._dispatch(run, task, owner=owner), name=f"ghostrunner-dispatch-{run.key}"
            )
            started += 1
        if started:
            self._on_change()
        return started

    async def run_until_idle(self, max_passes: int = 100_000) -> None:
        """Pass until nothing is in flight and a pass starts nothing. For tests: time
        does not move by itself here, so runs waiting on a backoff or ``not_before``
        stay pending until the test's clock moves."""
        for _ in range(max_passes):
            started = await self.step()
            if self._again:
                continue
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
        keeper: asyncio.Task[None] | None = None
        listener: asyncio.Task[None] | None = None
        if self._signals is not None:
            listener = asyncio.create_task(self._watch_signals(self._signals),
                                           name="ghostrunner-signals")
        try:
            # runs left dispatched must be settled before anything else: retry until done
            while not stop.is_set() and not await self._retrying(self.recover):
                pass
            if self._leases is not None:
                keeper = asyncio.create_task(self._keep_lease(), name="ghostrunner-lease")
            while not stop.is_set():
                self._wake.clear()
                self._burst = False
                await self._retrying(self.step)
                if self._again:
                    continue
                delay = self._idle.delay(self.clock(), self.settings.resync_interval)
                waker = asyncio.create_task(self._wake.wait())
                stopper = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait(
                        {waker, stopper}, timeout=delay, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waker.cancel()
                    stopper.cancel()
                if self._wake.is_set() and self._burst and self.settings.coalesce > 0:
                    # a submit or device events: let the rest of a burst come first; a
                    # finished dispatch alone goes on at once (its device is waiting)
                    await asyncio.sleep(self.settings.coalesce)
        finally:
            for task in (watcher, listener):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self.drain()  # the lease is still renewed meanwhile
            if keeper is not None:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
            await self.retire()

    async def retire(self) -> None:
        """A graceful stop's last step, after :meth:`drain`: end this runner's lease
        (stores with :class:`~ghostrunner.runners.Leases`), so that another runner
        adopts at once whatever it left dispatched. Never fails."""
        leases = self._leases
        if leases is None or not self._registered or self._aborted:
            return
        self._registered = False
        try:
            async with asyncio.timeout(self.settings.heartbeat):
                await leases.retire(self.runner.id)
        except Exception as exc:  # the lease then ends by itself
            log.warning("runner %s could not end its lease (%s): its runs are taken over "
                        "when it expires", self.runner.id, exc)
        else:
            log.info("runner %s stopped; its lease ended", self.runner.id)

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
        self._remember(task)
        return task

    def _remember(self, task: Task) -> None:
        """Keep the 10,000 tasks used last (recovery and dispatch read them)."""
        self._tasks[task.id] = task
        self._tasks.move_to_end(task.id)
        if len(self._tasks) > 10_000:
            self._tasks.popitem(last=False)

    async def _retrying(self, step: Callable[[], object]) -> bool:
        """Run ``step``; on failure log, pause ``retry.base`` seconds and return False."""
        try:
            result = step()
            if asyncio.iscoroutine(result):
                await result
        except Exception:  # the loop must outlive a failing store or executor
            log.exception("pass failed; retrying after %.1fs", self.settings.retry.base)
            await asyncio.sleep(self.settings.retry.base)
            return False
        return True

    async def _register(self, leases: Leases) -> None:
        sent = self._mono()
        await leases.register(self.runner, self.settings.lease)
        self._registered = True
        self._contact_since = sent
        self._held_since(sent)
        log.info("runner %s (%s) registered: lease %gs, heartbeat %gs", self.runner.id,
                 self.runner.name, self.settings.lease, self.settings.heartbeat)

    def _held_since(self, sent: float) -> None:
        """A renewal sent at ``sent`` succeeded: the store's lease ends no earlier than
        ``lease`` seconds after that moment."""
        was_fenced = self.fenced
        self._lease_until = max(self._lease_until, sent + self.settings.lease)
        if was_fenced and not self.fenced:
            if self._fenced_logged:
                log.warning("runner %s renewed its lease: sending again", self.runner.id)
            self._fenced_logged = False
            self._idle.forget()
            self._wake.set()

    async def _lost(self, leases: Leases) -> None:
        """This runner was declared dead (its lease ended and another runner adopted its
        runs) or retired: forget the runs it held, and start again as a new runner."""
        log.error("runner %s lost its lease: another runner took over its dispatched runs; "
                  "registering again as a new runner", self.runner.id)
        for held in self._recovering.values():
            self._rollouts.ended(held.task.id)
        self._recovering.clear()
        self._takeup.clear()
        # commands still in flight finish; recording their results is refused (NotOwner)
        self.runner = attrs.evolve(self.runner, id=new_id(), started_at=self.clock())
        self._registered = False
        self._lease_until = float("-inf")
        await self._register(leases)

    async def _take_up(self) -> None:
        """Hold the adopted runs in outcome recovery, as runs found dispatched at start:
        their devices are asked (or, if they keep no record, the runs settled by their
        delivery policy) at the next pass. One whose task cannot be read now stays for
        the next try."""
        now = self.clock()
        for node, run in list(self._takeup.items()):
            task = await self._task(run.task_id)
            del self._takeup[node]
            deadline = recovery_deadline(run, task, within=self.settings.recover_within)
            if not self.executor.recoverable(node):
                deadline = now  # nothing to ask: settled by its delivery policy
            self._rollouts.holding(task)
            self._recovering[node] = _Recovery(run=run, task=task, due=now, deadline=deadline)
            log.warning("run %s was left dispatched: %s", run.key,
                        "asking its device" if deadline > now else "settling it")
        self._idle.work_for((), now)
        self._wake.set()

    async def _keep_lease(self) -> None:
        """Renew the lease every ``heartbeat`` seconds (sooner after a failure), and
        adopt as soon as another runner's lease ends or a runner stops."""
        beat = self.settings.heartbeat
        while True:
            delay = beat
            if self._adopt_at is not None:
                delay = min(delay, max(0.0, self._adopt_at - self._mono()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._adopt_now.wait()
            self._adopt_now.clear()
            for step, failed in ((self.renew, "lease renewal failed"),
                                 (self.adopt, "looking for dead runners failed")):
                try:
                    async with asyncio.timeout(beat):
                        await step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database is away: try again soon
                    log.warning("runner %s: %s (%s); %.1fs of lease left", self.runner.id,
                                failed, exc or type(exc).__name__, self.lease_left or 0)
                    await asyncio.sleep(min(1.0, beat / 5))
                    self._adopt_now.set()
                    break

    async def _watch_signals(self, signals: Signals) -> None:
        while True:
            try:
                async with contextlib.aclosing(signals.signals()) as stream:
                    async for signal in stream:
                        self._signalled(signal)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("listening for other runners failed; listening again")
            await asyncio.sleep(self.settings.retry.base)

    def _signalled(self, signal: Signal) -> None:
        self.signals_seen += 1
        if signal.kind == "runs":
            if signal.nodes is None:
                self._idle.forget()
                self._continuous_at = 0.0  # tasks may have been added: reload them
            self.wake(signal.nodes or ())
            self._on_change()  # runs changed elsewhere: waiters look again
        elif signal.kind == "runners":
            self._adopt_now.set()
        for hook in self._hooks.get(signal.kind, ()):
            try:
                hook(signal)
            except Exception:
                log.exception("a %s signal's callback failed", signal.kind)

    async def _watch_events(self) -> None:
        while True:
            try:
                async for _event in self.executor.events():
                    self._burst = True
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("executor event stream failed; resubscribing")
            # the stream ended (executor reconnecting or closed): resubscribe after a pause
            self._wake.set()
            await asyncio.sleep(self.settings.retry.base)

    async def _recover_due(self, online: Collection[str], now: datetime) -> None:
        """Ask the devices of runs held in recovery whose turn has come (within the
        cap on commands in flight); settle those whose deadline has passed."""
        wake: datetime | None = None
        for node, held in list(self._recovering.items()):
            if node in self._in_flight:
                continue
            keeps = self.executor.recoverable(node)
            if held.unsent:  # it never left: back to pending, the attempt given back
                del self._recovering[node]
                decision = decide(held.run, held.task, NotDelivered(_UNSENT), now=now,
                                  retry=self.settings.retry)
                self._rollouts.ended(held.task.id)
                await self._settle(held, decision, now)
                continue
            if now >= held.deadline or not keeps:
                del self._recovering[node]
                answer: ExecutorError = (
                    NotDelivered("the device was not reachable") if keeps
                    else OutcomeUnknown("the device keeps no record of what ran")
                )
                decision = decide_recovery(
                    held.run, held.task, answer, now=now, deadline=held.deadline,
                    asked=held.asked, retry=self.settings.retry,
                )
                self._rollouts.ended(held.task.id)
                await self._settle(held, decision, now)
                continue
            if held.due <= now and node in online and (
                len(self._in_flight) < self.settings.max_in_flight
            ):
                self._flying_task[node] = held.task.id
                self._in_flight[node] = asyncio.create_task(
                    self._dispatch(held.run, held.task, recovery=held, owner=self.runner.id),
                    name=f"ghostrunner-recover-{held.run.key}",
                )
                continue
            when = min(held.due, held.deadline) if held.due > now else held.deadline
            wake = when if wake is None or when < wake else wake
        if wake is not None:
            self._idle.work_for((), wake)

    async def _settle(self, held: _Recovery, decision: Decision, now: datetime) -> None:
        """Record the end of a run held in recovery; if the store fails, hold it again
        (it is tried again at a later pass, never forgotten)."""
        try:
            await self._apply(held.run, held.task, decision, now, owner=self.runner.id)
        except GhostRunnerError:
            log.exception("could not record the end of %s; trying again later", held.run.key)
            self._rollouts.holding(held.task)
            self._recovering[held.run.node_id] = attrs.evolve(
                held, due=now + self.settings.retry.delay(1))

    async def _dispatch(self, run: Run, task: Task, recovery: _Recovery | None = None, *,
                        owner: str | None = None) -> None:
        request = RunRequest(
            task_id=task.id,
            node_id=run.node_id,
            command=task.command,
            shell=task.shell,
            run_as_user=task.run_as_user,
            timeout=task.timeout,
            attempt=run.attempts,
            delivery=task.delivery,
            output_limit=self.settings.output_limit,
            recover=recovery is not None,
        )
        held = False  # the run stays dispatched, held in recovery
        unsent = False
        try:
            result: Outcome | ExecutorError
            try:
                if self._leases is not None and (self.fenced or owner != self.runner.id):
                    # the lease may end before the command arrives (or ended: the run
                    # is another runner's now): it does not leave
                    unsent = True
                    raise NotDelivered(_UNSENT)
                async with asyncio.timeout(task.timeout + self.settings.dispatch_grace):
                    result = await self.executor.run(request)
            except ExecutorError as exc:
                result = exc
            except TimeoutError:
                result = OutcomeUnknown(
                    f"no reply within {task.timeout + self.settings.dispatch_grace:.0f}s",
                    recoverable=self.executor.recoverable(run.node_id),
                )
            except Exception as exc:  # a bug in an executor must not kill the loop
                log.exception("executor failed on %s", run.key)
                result = OutcomeUnknown(f"executor error: {exc!r}")
            if self._aborted:
                return
            now = self.clock()
            if isinstance(result, Outcome):
                result = self._normalise(result, run, now)
            if recovery is None:
                deadline = recovery_deadline(run, task, within=self.settings.recover_within)
                decision = decide(run, task, result, now=now, retry=self.settings.retry)
                asked = 0
            else:
                deadline, asked = recovery.deadline, recovery.asked + 1
                decision = decide_recovery(run, task, result, now=now, deadline=deadline,
                                           asked=asked, retry=self.settings.retry)
            held = decision.recovering
            try:
                await asyncio.shield(self._apply(run, task, decision, now, deadline=deadline,
                                                 asked=asked, owner=owner))
            except GhostRunnerError:
                # the run stays dispatched: ask its device again later (it is held), or,
                # if it never left, release it later
                log.exception("could not record the result of %s", run.key)
                if owner == self.runner.id:
                    held = True
                    self._recovering[run.node_id] = _Recovery(
                        run=run, task=task, due=now + self.settings.retry.delay(1),
                        deadline=deadline, asked=asked, unsent=unsent and recovery is None,
                    )
        finally:
            if self._in_flight.get(run.node_id) is asyncio.current_task():
                del self._in_flight[run.node_id]
                del self._flying_task[run.node_id]
                if not held and self._rollouts.ended(task.id):
                    self._idle.work_for((), self.clock())  # its held devices may go on
            self._wake.set()

    def _normalise(self, outcome: Outcome, run: Run, now: datetime) -> Outcome:
        # the one place output is capped, whatever the executor sent
        output, cut = cap_output(outcome.output, self.settings.output_limit)
        return attrs.evolve(
            outcome,
            output=output,
            output_truncated=outcome.output_truncated or cut,
            started_at=outcome.started_at or run.started_at,
            finished_at=outcome.finished_at or now,
        )

    async def _apply(
        self, run: Run, task: Task, decision: Decision, now: datetime, *,
        deadline: datetime | None = None, asked: int = 0, owner: str | None = None,
    ) -> None:
        """Record ``decision`` for ``run`` (as its ``owner``, with a shared store). A
        run another runner took over, or that is no longer dispatched, is dropped."""
        if owner is not None and owner != self.runner.id:
            # sent before this runner lost its lease: the run was adopted (by another
            # runner, or by this one under its new id, which holds it in recovery now:
            # that entry is not this dispatch's to touch); its owner asks the device
            log.warning("the result of %s is dropped: it was sent by runner %s, which "
                        "lost its lease (the run's new owner asks the device)", run.key, owner)
            self._on_change()
            return
        self._recovering.pop(run.node_id, None)
        try:
            await self._record(run, task, decision, now, deadline=deadline, asked=asked,
                               owner=owner)
        except NotOwner as exc:
            log.warning("the result of %s is dropped: %s (its new owner asks the device)",
                        run.key, exc)
            self._on_change()
        except IllegalTransition as exc:
            log.warning("the result of %s is dropped: %s", run.key, exc)
            self._on_change()

    async def _record(
        self, run: Run, task: Task, decision: Decision, now: datetime, *,
        deadline: datetime | None, asked: int, owner: str | None,
    ) -> None:
        leases = self._leases if owner is not None else None
        if decision.recovering:
            assert decision.available_at is not None and deadline is not None
            self._recovering[run.node_id] = _Recovery(
                run=run, task=task, due=decision.available_at, deadline=deadline, asked=asked
            )
            self._idle.work_for((), min(decision.available_at, deadline))
            self._on_change()
            return
        if decision.state is RunState.PENDING:
            assert decision.available_at is not None
            self._idle.work_for((run.node_id,), decision.available_at)
            if leases is not None:
                await leases.release(
                    run.key, now, available_at=decision.available_at,
                    error=decision.error or "", delivered=decision.delivered, runner=owner,
                )
            else:
                await self.store.release(
                    run.key, now, available_at=decision.available_at,
                    error=decision.error or "", delivered=decision.delivered,
                )
        else:
            if leases is not None:
                await leases.finish(run.key, decision.state, now, outcome=decision.outcome,
                                    error=decision.error, runner=owner)
            else:
                await self.store.finish(run.key, decision.state, now,
                                        outcome=decision.outcome, error=decision.error)
            if task.rollout.abort_failed_pct is not None:
                await self._check_abort(task, now)
        self._on_change()

    async def _check_abort(self, task: Task, now: datetime) -> None:
        summary = await self.store.get_task(task.id)
        reason = None if summary.aborted else abort_reason(task, summary.counts)
        if reason is not None:
            cancelled = await self.store.abort(task.id, reason, now)
            log.warning("task %s %s; %d runs cancelled", task.id, reason, len(cancelled))

    async def _load_continuous(self, now: datetime) -> None:
        """Reload what the store knows of fleets (at start-up, then every
        ``resync_interval``): the tasks with rollout limits, and the open continuous
        tasks (closed and expired ones drop out, and a task this loop has not seen yet is
        matched against every device)."""
        self._rollouts.reload(await self.store.rollout_tasks())
        tasks = {task.id: task for task in await self.store.open_continuous(now)}
        for task_id in set(self._continuous) - set(tasks):
            self._matched.pop(task_id, None)
        self._rematch.update(set(tasks) - set(self._continuous))
        self._rematch.intersection_update(tasks)
        if tasks.keys() != self._continuous.keys():
            self._index = None
        self._continuous = tasks
        self._continuous_at = time.monotonic()

    async def _match_continuous(self, devices: Mapping[str, Device], now: datetime) -> None:
        """Give every continuous task a run on each device that has come to match it
        (newly enrolled, tagged, moved into the group...). Level-based like the rest of
        the loop: the devices matched are those whose view differs from the last pass's
        (an executor keeps a device's value until it changes, so that is an identity
        check per device), and every device for a task not matched yet. The store never
        adds a second run of a task to a device, so matching twice is harmless."""
        started = time.perf_counter()
        seen = self._seen
        changed = [n for n, d in devices.items() if (p := seen.get(n)) is not d and p != d]
        for node in changed:
            seen[node] = devices[node]
        if len(seen) > len(devices):
            for node in set(seen).difference(devices):
                del seen[node]
        rematch, self._rematch = self._rematch, set()
        for task in list(self._continuous.values()):
            if task.expires_at is not None and task.expires_at <= now:
                self.forget(task.id)
        found: dict[str, list[str]] = {}
        for task_id in rematch.intersection(self._continuous):  # new: every device
            select = self._continuous[task_id].select
            assert select is not None
            known = self._matched.setdefault(task_id, set())
            found[task_id] = [n for n, d in devices.items()
                              if n not in known and select.matches(d)]
        if changed:
            if self._index is None:
                self._index = _SelectorIndex(self._continuous.values())
            for node in changed:
                device = devices[node]
                for task in self._index.candidates(device):
                    assert task.select is not None
                    if (task.id not in rematch
                            and node not in self._matched.setdefault(task.id, set())
                            and task.select.matches(device)):
                        found.setdefault(task.id, []).append(node)
        wanted = [(self._continuous[t], nodes) for t, nodes in found.items() if nodes]
        self.matching_seconds += time.perf_counter() - started
        if not wanted:
            return
        # concurrently: a batching store writes them in one transaction
        results = await asyncio.gather(
            *(self.store.add_runs(task.id, new, now) for task, new in wanted),
            return_exceptions=True,
        )
        for (task, new), added in zip(wanted, results, strict=True):
            if isinstance(added, NotFound):  # deleted meanwhile
                self.forget(task.id)
                continue
            if isinstance(added, BaseException):
                raise added
            self._matched[task.id].update(new)
            if added:
                self._idle.work_for([r.node_id for r in added], task.not_before)
                if task.expires_at is not None:
                    self._idle.work_for((), task.expires_at)
                self._on_change()
                log.info("continuous task %s: %d new devices matched", task.id, len(added))

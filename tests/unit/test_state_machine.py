"""A Hypothesis state machine over the reconcile loop with the fakes.

Random operators submit and cancel tasks (plain ones, and fleet ones with a tag
selector, continuous or not, with rollout limits and an abort rule), pause, resume and
retry them, tag devices, devices come and go, commands succeed, fail, are refused,
vanish or hang, replies are lost (the device keeps the outcome in its journal), device
journals are wiped, time moves, and GhostRunner crashes and restarts over the same store.
After every step the guarantees must hold: never a command to an offline or busy
device, never an at_most_once attempt twice, no run invented or lost (a device gets a
run of a task only if named or matched, and never two), terminal runs frozen until
retried, attempts within bounds, no task over its max_concurrent or its per_minute
rate, no run started while its task is paused or after it was aborted, no run executed
again while its device holds the finished record of an earlier attempt (whatever the
delivery policy) unless an operator retried it, every dispatched run in flight or held
in recovery, and the event log tells the same story as the runs (replayed, its events
give every run's state and attempts, in increasing ids); and at the end,
with every device online and healthy, every run reaches a terminal state and every
device matching a live continuous task has its run.

It runs over two stores: ``InMemoryStore`` (:class:`TestGhostRunnerMachine`, 100
examples) and ``PostgresStore`` on a real PostgreSQL (:func:`test_machine_postgres`,
15 examples: each step is real round trips; one database for the test, emptied with
one ``TRUNCATE`` before each example). The checks read the store through the ``Store``
protocol only (``list_tasks``, ``get_runs``, ``counts``...: :class:`View`), never a
store's internals, so both stores are held to exactly the same rules; the per-task and
overall counts (kept by triggers in PostgreSQL) must agree with the runs, and so must
the event log (``events_after``). PostgresStore keeps runner leases by the database's
clock: a crashed runner's lease is ended at once (as if that much time had passed),
so the next runner adopts its runs at start as a lone process recovers its own.

``TwoRunnersMachine`` runs the same with a second runner sharing the store
(``SharedInMemoryStore``: leases, owners, rollout limits over both), as two servers
share a PostgreSQL database: each runner passes, renews its lease, crashes or stops
when a rule says so; time moving without renewals is a runner cut off from the
database (fenced; the other adopts its runs after the lease and the grace). See its
docstring for the guarantees it checks over both runners (runs, tasks, counts and
events through the protocol; run owners and runner rows from the store itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import Coroutine, Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import psycopg
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from ghostrunner import (
    Delivery,
    Device,
    GhostRunner,
    LoopSettings,
    Outcome,
    RetryPolicy,
    Run,
    RunKey,
    RunRequest,
    RunState,
    Task,
    TaskQuery,
    TaskSummary,
)
from ghostrunner import events as ev
from ghostrunner._protocols import Store
from ghostrunner._types import RETRYABLE_STATES
from ghostrunner.errors import (
    NotDelivered,
    NotFound,
    OutcomeUnknown,
    PermanentError,
    ValidationError,
)
from ghostrunner.postgres import PostgresStore
from ghostrunner.postgres._schema import _TABLES
from ghostrunner.testing import (
    FakeClock,
    FakeExecutor,
    InMemoryStore,
    ReplyLost,
    SharedInMemoryStore,
    crash,
)

if TYPE_CHECKING:
    from tests.pg import PgServer

T = TypeVar("T")

NODES = ("n1", "n2", "n3", "n4")
TAGS = ("a", "b")
MAX_IN_FLIGHT = 2
BEHAVIOURS = st.sampled_from(
    ["ok", "ok", "exit", "timed_out", "not_delivered", "unknown", "permanent", "hang", "hang",
     "reply_lost"]
)


# what an operator may submit
SUBMIT: dict[str, st.SearchStrategy[Any]] = {
    "nodes": st.lists(st.sampled_from(NODES), min_size=1, max_size=len(NODES), unique=True),
    "delivery": st.sampled_from(list(Delivery)),
    "max_attempts": st.integers(1, 3),
    "not_before_in": st.none() | st.integers(0, 30),
    "expires_in": st.none() | st.integers(1, 60),
}
# a fleet task: a tag to select (or none: plain), continuous, and its rollout
FLEET: dict[str, st.SearchStrategy[Any]] = {
    "tag": st.none() | st.sampled_from(TAGS),
    "continuous": st.booleans(),
    "max_concurrent": st.none() | st.integers(1, 2),
    "per_minute": st.none() | st.integers(1, 3),
    "abort_failed_pct": st.none() | st.sampled_from([0, 50]),
    "abort_min_finished": st.integers(1, 2),
}


class Watched:
    """A store that checks, at each claim, that no run of a paused or aborted task
    starts (the loop must not even ask; the store refuses paused ones anyway). Mixed
    into each store class; it asks the store itself (``get_task``), nothing else."""

    violations: list[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.violations = []
        super().__init__(*args, **kwargs)

    async def claim_many(self, keys: Any, now: Any, **kwargs: Any) -> Any:
        claimed = await super().claim_many(keys, now, **kwargs)  # type: ignore[misc]
        for run, _ in claimed:
            summary = await self.get_task(run.task_id)  # type: ignore[attr-defined]
            if summary.paused:
                self.violations.append(f"{run.key} started while paused")
            if summary.aborted is not None:
                self.violations.append(f"{run.key} started after an abort")
        return claimed


class WatchedMemory(Watched, InMemoryStore):
    pass


class WatchedPostgres(Watched, PostgresStore):
    pass


class WatchedShared(Watched, SharedInMemoryStore):
    """The shared reference store (leases, owners, one dispatched run per device,
    rollout limits over every runner), watched likewise."""


@attrs.frozen
class View:
    """What a store holds, read through the Store protocol: every task (``list_tasks``,
    all pages) and its runs (``get_runs``, target order), and the overall counts."""

    tasks: Mapping[str, TaskSummary]
    runs: Mapping[RunKey, Run]
    nodes: Mapping[str, list[str]]  # task id -> its runs' nodes, in target order
    counts: Mapping[RunState, int]

    @property
    def paused(self) -> set[str]:
        return {t for t, s in self.tasks.items() if s.paused}

    @property
    def aborted(self) -> set[str]:
        return {t for t, s in self.tasks.items() if s.aborted is not None}

    @property
    def closed(self) -> set[str]:
        return {t for t, s in self.tasks.items() if s.closed}


async def read_view(store: Store) -> View:
    summaries: list[TaskSummary] = []
    cursor = None
    while True:
        page = await store.list_tasks(TaskQuery(limit=1000, cursor=cursor))
        summaries += page.items
        cursor = page.next_cursor
        if cursor is None:
            break
    tasks = {s.task.id: s for s in summaries}
    assert len(tasks) == len(summaries), "a task listed twice"
    runs: dict[RunKey, Run] = {}
    nodes: dict[str, list[str]] = {}
    for task_id in tasks:
        of_task = await store.get_runs(task_id)
        nodes[task_id] = [r.node_id for r in of_task]
        runs.update((r.key, r) for r in of_task)
    return View(tasks=tasks, runs=runs, nodes=nodes, counts=await store.counts())


class GhostRunnerMachine(RuleBasedStateMachine):
    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        # one event loop for the machine's lifetime: commands held in flight by a
        # hanging handler stay suspended in it between steps
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.store = self.make_store()
        self.progress = asyncio.Event()  # set when a handler starts hanging
        self.behaviour: dict[str, str] = dict.fromkeys(NODES, "ok")
        self.exit_code = 1
        self.release = asyncio.Event()
        self.hanging: set[str] = set()
        self.executor = FakeExecutor(self.handle, devices=NODES, journal=True)
        self.tags: dict[str, set[str]] = {node: set() for node in NODES}
        self.allowed: dict[str, set[str]] = {}  # task id -> nodes it may have a run on
        self.retried: Counter[RunKey] = Counter()  # operator retries of each run
        self.starts: dict[str, list[Any]] = {}  # task id -> times its runs were claimed
        self.calls_seen = 0
        self.settings = LoopSettings(
            max_in_flight=MAX_IN_FLIGHT, retry=RetryPolicy(1.0, 8.0), shutdown_grace=0.001
        )
        self.submitted: dict[str, Task] = {}
        self.frozen: dict[RunKey, Run] = {}  # terminal runs as first seen
        self.broken = False
        self.peak_busy = 0  # the most commands ever in flight at once
        self.restarts = 0
        self.gr: GhostRunner | None = None
        # the runs as the event log tells them: key -> (state, attempts or None)
        self.replayed: dict[RunKey, tuple[RunState, int | None]] = {}
        self.events_seen = 0  # the last event id replayed

    # ---------------------------------------------------------------- plumbing

    def make_store(self) -> Any:
        """The store of this example, empty (a :class:`Watched` one)."""
        return WatchedMemory()

    def tick(self, seconds: float) -> None:
        """Time moves on (the fake clock: also the loop's, leases included)."""
        self.clock.advance(seconds)

    def crashed(self, gr: GhostRunner) -> None:
        """``gr`` just crashed, and its successor starts next: nothing to do with a
        store of one process (the successor recovers every dispatched run)."""

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Remember a failure, so teardown only cleans up after one."""
        try:
            yield
        except BaseException:
            self.broken = True
            raise

    async def handle(self, request: RunRequest, device: Device) -> Outcome:
        # yield once, so that commands started in the same pass are in flight together
        self.peak_busy = max(self.peak_busy, len(self.executor.busy))
        await asyncio.sleep(0)
        self.peak_busy = max(self.peak_busy, len(self.executor.busy))
        behaviour = self.behaviour[request.node_id]
        if behaviour == "hang":
            release = self.release
            self.hanging.add(request.node_id)
            self.progress.set()
            try:
                await release.wait()
            finally:
                self.hanging.discard(request.node_id)
            return Outcome(exit_code=0, output="released")
        if behaviour == "exit":
            return Outcome(exit_code=self.exit_code, output="failed")
        if behaviour == "timed_out":
            return Outcome(exit_code=None, timed_out=True)
        if behaviour == "not_delivered":
            raise NotDelivered("agent busy")
        if behaviour == "unknown":  # the device restarted mid-run: no record of the end
            raise OutcomeUnknown("no reply")
        if behaviour == "reply_lost":  # it ran; its device knows how it ended
            raise ReplyLost(Outcome(exit_code=0, output="ran, reply lost"))
        if behaviour == "permanent":
            raise PermanentError("access denied")
        return Outcome(exit_code=0, output=request.command)

    def start(self) -> GhostRunner:
        gr = GhostRunner(
            store=self.store,
            executor=self.executor,
            settings=self.settings,
            clock=self.clock,
            background=False,
        )
        self.run(gr.__aenter__())  # recovery happens here
        return gr

    @property
    def runner(self) -> GhostRunner:
        assert self.gr is not None
        return self.gr

    async def settle(self) -> None:
        """Pass until nothing more can start, leaving hanging commands in flight."""
        while True:
            started = await self.runner.loop.step()
            await self.quiet()
            if not started:
                return

    async def quiet(self) -> None:
        """Wait until every command in flight has ended (its result stored) or hangs:
        woken by each dispatch that ends and each handler that starts hanging (a store
        on a real database takes real time to record a result)."""
        loop = self.runner.loop
        while True:
            busy = [t for node, t in loop._in_flight.items() if node not in self.hanging]
            if not busy:
                return
            self.progress.clear()
            hangs = asyncio.ensure_future(self.progress.wait())
            done, _ = await asyncio.wait(
                [*busy, hangs], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            hangs.cancel()
            if not done:
                raise AssertionError("commands in flight never settled")

    def fresh_release(self) -> None:
        if not self.hanging:
            self.release = asyncio.Event()

    # ---------------------------------------------------------------- rules

    @initialize(
        target=tasks,
        online=st.sets(st.sampled_from(NODES)),
        behaviours=st.lists(BEHAVIOURS, min_size=len(NODES), max_size=len(NODES)),
        task=st.fixed_dictionaries(SUBMIT),
    )
    def boot(self, online: set[str], behaviours: list[str], task: dict[str, Any]) -> str:
        for node in online:
            self.executor.set_online(node)
        self.behaviour = dict(zip(NODES, behaviours, strict=True))
        self.gr = self.start()
        return self.queue(**task)

    @rule(
        target=tasks,
        nodes=st.lists(st.sampled_from(NODES), max_size=len(NODES), unique=True),
        delivery=SUBMIT["delivery"],
        max_attempts=SUBMIT["max_attempts"],
        not_before_in=SUBMIT["not_before_in"],
        expires_in=SUBMIT["expires_in"],
        fleet=st.fixed_dictionaries(FLEET),
    )
    def submit(
        self,
        nodes: list[str],
        delivery: Delivery,
        max_attempts: int,
        not_before_in: int | None,
        expires_in: int | None,
        fleet: dict[str, Any],
    ) -> str:
        return self.queue(nodes, delivery, max_attempts, not_before_in, expires_in, **fleet)

    def matching(self, tag: str) -> list[str]:
        return [node for node in NODES if tag in self.tags[node]]

    def queue(
        self,
        nodes: list[str],
        delivery: Delivery,
        max_attempts: int,
        not_before_in: int | None,
        expires_in: int | None,
        *,
        tag: str | None = None,
        continuous: bool = False,
        max_concurrent: int | None = None,
        per_minute: int | None = None,
        abort_failed_pct: float | None = None,
        abort_min_finished: int = 1,
    ) -> str:
        """Submit a task through GhostRunner; ``*_in`` are seconds from now. With a
        ``tag``, it also selects the devices having it (``continuous``: later ones too).
        A submit that must be refused returns a task id that was never stored."""
        now = self.clock.now
        not_before = None if not_before_in is None else now + timedelta(seconds=not_before_in)
        expires_at = None
        if expires_in is not None:
            expires_at = (not_before or now) + timedelta(seconds=expires_in)
        fields: dict[str, Any] = {}
        if tag is not None:
            fields = {"select": {"tags": [tag]}, "continuous": continuous}
        elif not nodes:
            nodes = [NODES[0]]
        task = Task(
            name="t",
            command=f"cmd-{len(self.submitted)}",
            targets=nodes,
            delivery=delivery,
            max_attempts=max_attempts,
            not_before=not_before,
            expires_at=expires_at,
            rollout={"max_concurrent": max_concurrent, "per_minute": per_minute,
                     "abort_failed_pct": abort_failed_pct,
                     "abort_min_finished": abort_min_finished},
            **fields,
        )
        matched = [n for n in self.matching(tag) if n not in nodes] if tag else []
        with self.guard():
            if tag is not None and not nodes and not matched and not continuous:
                with pytest.raises(ValidationError):
                    self.run(self.runner.submit(task))
                event("a snapshot selector matched nothing: refused")
                return task.id
            self.run(self.runner.submit(task))
            self.submitted[task.id] = task
            self.allowed[task.id] = set(nodes) | set(matched)
            runs = self.run(self.runner.runs(task.id))
            assert [r.node_id for r in runs] == nodes + sorted(matched)
            assert all(r.state is RunState.PENDING for r in runs)
        return task.id

    @rule(node=st.sampled_from(NODES), tags=st.sets(st.sampled_from(TAGS)))
    def retag(self, node: str, tags: set[str]) -> None:
        """An operator tags a device in MeshCentral."""
        self.tags[node] = set(tags)
        self.executor.update_device(node, tags=tuple(sorted(tags)))

    @rule(task_id=tasks, paused=st.booleans())
    def pause(self, task_id: str, paused: bool) -> None:
        with self.guard():
            if task_id not in self.submitted:
                with pytest.raises(NotFound):
                    self.run(self.runner.pause(task_id))
                return
            action = self.runner.pause if paused else self.runner.resume
            assert self.run(action(task_id)).paused is paused

    @rule(task_id=tasks, states=st.sets(st.sampled_from(sorted(RETRYABLE_STATES)), min_size=1))
    def retry(self, task_id: str, states: set[RunState]) -> None:
        with self.guard():
            if task_id not in self.submitted:
                with pytest.raises(NotFound):
                    self.run(self.runner.retry(task_id, states))
                return
            before = {r.node_id: r for r in self.run(self.runner.runs(task_id))}
            retried = self.run(self.runner.retry(task_id, states))
            assert {r.node_id for r in retried} == {
                n for n, r in before.items() if r.state in states}
            for run in retried:
                assert run.state is RunState.PENDING
                assert run.attempts == before[run.node_id].attempts
                self.frozen.pop(run.key, None)
                self.retried[run.key] += 1
            if retried:
                event("runs retried")

    @rule(
        target=tasks,
        node=st.sampled_from(NODES),
        delivery=st.sampled_from(list(Delivery)),
        max_attempts=st.integers(1, 3),
    )
    def hold_a_command(self, node: str, delivery: Delivery, max_attempts: int) -> str:
        """A shortcut to the interesting states: a device online, a command for it, and
        its handler hanging in flight."""
        self.behaviour[node] = "hang"
        self.executor.set_online(node)
        task_id = self.queue([node], delivery, max_attempts, None, None)
        with self.guard():
            self.run(self.settle())
        return task_id

    @rule(task_id=tasks, which=st.none() | st.sets(st.sampled_from(NODES)))
    def cancel(self, task_id: str, which: set[str] | None) -> None:
        with self.guard():
            if task_id not in self.submitted:
                with pytest.raises(NotFound):
                    self.run(self.runner.cancel(task_id, which))
                return
            before = {r.node_id: r for r in self.run(self.runner.runs(task_id))}
            cancelled = self.run(self.runner.cancel(task_id, which))
            after = {r.node_id: r for r in self.run(self.runner.runs(task_id))}
            expected = {
                node
                for node, r in before.items()
                if r.state is RunState.PENDING and (which is None or node in which)
            }
            assert {r.node_id for r in cancelled} == expected
            for node, r in after.items():
                if node in expected:
                    assert r.state is RunState.CANCELLED
                else:
                    assert r == before[node]  # anything not pending is left alone

    @rule(task_id=tasks)
    def delete(self, task_id: str) -> None:
        with self.guard():
            if task_id not in self.submitted:
                with pytest.raises(NotFound):
                    self.run(self.runner.delete(task_id))
                return
            before = self.run(self.runner.runs(task_id))
            in_flight = any(r.state is RunState.DISPATCHED for r in before)
            deleted = self.run(self.runner.delete(task_id))
            assert deleted is not in_flight
            if deleted:
                self.submitted.pop(task_id)
                for node in self.allowed.pop(task_id):
                    self.frozen.pop(RunKey(task_id, node), None)

    @rule(node=st.sampled_from(NODES), online=st.booleans())
    def set_online(self, node: str, online: bool) -> None:
        self.executor.set_online(node, online)

    @rule(node=st.sampled_from(NODES))
    def wipe_journal(self, node: str) -> None:
        """The device reboots and its journal is gone (or an operator deleted it)."""
        self.executor.wipe_journal(node)

    @rule(seconds=st.sampled_from([0.5, 1, 2, 5, 10, 30, 61]))
    def advance(self, seconds: float) -> None:
        self.tick(seconds)

    @rule(node=st.sampled_from(NODES), behaviour=BEHAVIOURS, exit_code=st.integers(1, 255))
    def set_behaviour(self, node: str, behaviour: str, exit_code: int) -> None:
        self.behaviour[node] = behaviour
        self.exit_code = exit_code

    @rule(release=st.booleans(), advance=st.sampled_from([0, 0, 1, 5, 30]))
    def run_loop(self, release: bool, advance: int) -> None:
        self.tick(advance)
        with self.guard():
            if release:
                self.release.set()
                self.run(self.runner.run_until_idle())
                assert not self.runner.loop.in_flight
                self.fresh_release()
            else:
                self.run(self.settle())
            for state in sorted({r.state for r in self.view().runs.values()}):
                event(f"after a pass: some run {state}")
            if self.runner.loop.in_flight:
                event("after a pass: commands held in flight")

    @rule(pass_first=st.booleans(), graceful=st.booleans())
    def restart(self, pass_first: bool, graceful: bool) -> None:
        """Stop GhostRunner and start a new one over the same store (recovery runs on
        enter). A crash writes nothing more; a graceful stop waits ``shutdown_grace`` for
        commands in flight and abandons those still hanging."""
        with self.guard():
            if pass_first:  # start what can start, then stop with commands hanging
                self.run(self.settle())
            held = len(self.runner.loop.in_flight)
            event(f"{'stop' if graceful else 'crash'} with {held} in flight")
            if graceful:
                self.run(self.runner.__aexit__(None, None, None))
                assert not self.executor.opened
            else:
                self.run(crash(self.runner))
                self.crashed(self.runner)
            self.restarts += 1
            self.gr = self.start()
            assert not self.runner.loop.in_flight
            self.fresh_release()

    # ---------------------------------------------------------------- invariants

    @invariant()
    def guarantees(self) -> None:
        with self.guard():
            self.check()

    def view(self) -> View:
        return self.run(read_view(self.store))

    def check(self) -> View:
        """Every guarantee, on what the store holds now; returns that."""
        ex = self.executor
        store = self.view()
        # never to an offline device, never two at once on one device
        assert ex.offline_calls == []
        self.check_overlaps()
        # at most once: an attempt that may have run is never sent again (an operator's
        # retry is a new attempt)
        once = Counter(
            (r.key, r.attempt) for r in ex.executions if r.delivery is Delivery.AT_MOST_ONCE
        )
        assert [k for k, n in once.items() if n > 1] == []
        # no run of a paused task started, none after its task was aborted
        assert self.store.violations == []
        # nothing lost, nothing invented: a device gets a run of a task only if the task
        # names it or its selector matched it while the task was open, and never two;
        # a snapshot selector's runs are exactly what it matched at submit time
        for task_id, task in self.submitted.items():
            if task.continuous and task_id not in store.closed:
                assert task.select is not None
                self.allowed[task_id].update(self.matching(task.select.tags[0]))
            nodes = store.nodes[task_id]
            assert len(nodes) == len(set(nodes))
            if task_id in store.aborted:
                event("a task was aborted by its rule")
            if task_id in store.paused:
                event("a task is paused")
            if task.continuous and nodes:
                event("a continuous task has runs")
            if task.continuous:
                assert set(nodes) <= self.allowed[task_id], task_id
            else:
                assert set(nodes) == self.allowed[task_id], task_id
        assert set(store.tasks) == set(self.submitted)  # no task lost or invented
        for task_id, summary in store.tasks.items():
            assert summary.task == self.submitted[task_id]  # stored as submitted
        expected = {RunKey(t, n) for t in self.submitted for n in store.nodes[t]}
        assert set(store.runs) == expected
        # the counts (per task, overall) agree with the runs
        for task_id, summary in store.tasks.items():
            states = Counter(store.runs[RunKey(task_id, n)].state for n in store.nodes[task_id])
            assert dict(summary.counts) == dict(states), task_id
        assert {s: n for s, n in store.counts.items() if n} == dict(
            Counter(r.state for r in store.runs.values()))
        # rollout limits: runs in flight and starts per minute, per task
        for request in ex.executions[self.calls_seen:]:  # what reached a device
            self.starts.setdefault(request.task_id, []).append(self.clock.now)
        self.calls_seen = len(ex.executions)
        in_flight = Counter(
            r.task_id for r in store.runs.values() if r.state is RunState.DISPATCHED
        )
        for task_id, task in self.submitted.items():
            cap = task.rollout.max_concurrent
            assert cap is None or in_flight[task_id] <= cap
            rate = task.rollout.per_minute
            times = sorted(self.starts.get(task_id, ()))
            for i, start in enumerate(times):
                window = [t for t in times[: i + 1] if t > start - timedelta(minutes=1)]
                assert rate is None or len(window) <= rate, (task_id, times)
        executions = Counter(r.key for r in ex.executions)
        dispatched: list[str] = []
        for key, run in store.runs.items():
            task = self.submitted[key.task_id]
            assert isinstance(run.state, RunState)
            assert 0 <= run.attempts <= task.max_attempts + self.retried[key]
            assert run.undelivered >= 0
            assert executions[key] <= run.attempts
            if run.state is RunState.DISPATCHED:
                dispatched.append(run.node_id)
            if run.state is RunState.PENDING:
                assert run.started_at is None
            if run.state is RunState.EXPIRED:
                assert task.expires_at is not None
                assert task.expires_at <= self.clock.now
            if run.terminal:
                # terminal runs never change afterwards
                assert self.frozen.setdefault(key, run) == run
                assert run.finished_at is not None
        # one command in flight per device, within the global cap, and every dispatched
        # run is really in flight or held until its device tells its outcome (a dead
        # process's runs are recovered); devices held run nothing else
        assert len(dispatched) == len(set(dispatched))
        assert ex.busy <= set(dispatched)
        self.check_loops(set(dispatched), store)
        # an attempt whose device holds its finished record is never run again (under
        # at_least_once too): only an operator's retry runs a finished run again
        reruns = Counter(RunKey(r.task_id, r.node_id) for r in ex.reruns)
        assert all(n <= self.retried[key] for key, n in reruns.items()), reruns
        for key in self.frozen:
            assert key in store.runs
        self.check_events(store)
        return store

    def check_events(self, store: View) -> None:
        """Replay the new events: ids increase, and the log agrees with the runs (as
        read through the Store protocol: ``store``)."""
        events = self.run(self.store.events_after(self.events_seen, 100_000))
        for entry in events:
            assert entry.id > self.events_seen
            self.events_seen = entry.id
            data = entry.data
            task_id = entry.task_id
            if entry.node_id is not None:  # run.claimed, run.finished, run.released
                key = RunKey(task_id, entry.node_id)
                assert key in self.replayed, entry
                self.replayed[key] = (RunState(data["state"]), data["attempts"])
                continue
            states = {ev.TASK_CREATED: RunState.PENDING, ev.RUNS_ADDED: RunState.PENDING,
                      ev.RUNS_RETRIED: RunState.PENDING, ev.RUNS_CANCELLED: RunState.CANCELLED,
                      ev.TASK_ABORTED: RunState.CANCELLED, ev.RUNS_EXPIRED: RunState.EXPIRED}
            if entry.kind in states:
                for node in data["nodes"]:  # few nodes here: always listed
                    key = RunKey(task_id, node)
                    before = self.replayed.get(key, (RunState.PENDING, None))[1]
                    self.replayed[key] = (states[entry.kind], before)
            elif entry.kind == ev.TASK_DELETED:
                gone = [k for k in self.replayed if k.task_id == task_id]
                assert len(gone) == data["runs"]
                for key in gone:
                    del self.replayed[key]
            else:
                assert entry.kind in (ev.TASK_PAUSED, ev.TASK_RESUMED), entry
        assert set(self.replayed) == set(store.runs)
        for key, (state, attempts) in self.replayed.items():
            run = store.runs[key]
            assert state is run.state, (key, state, run)
            assert attempts in (None, run.attempts), (key, attempts, run)

    def check_overlaps(self) -> None:
        assert self.executor.overlaps == []

    def check_loops(self, dispatched: set[str], store: View) -> None:
        """Every dispatched run is in flight in this process or held in recovery (the
        runs a dead process left are recovered at start), within the cap."""
        loop = self.runner.loop
        assert dispatched == set(loop.in_flight | loop.recovering)
        assert len(loop.in_flight) <= MAX_IN_FLIGHT
        assert self.peak_busy <= MAX_IN_FLIGHT
        if loop.recovering:
            event("a run is held in recovery")

    # ---------------------------------------------------------------- the end

    def finish(self) -> None:
        """Every device online and healthy, time far past every wait: all runs end."""
        self.release.set()
        for node in NODES:
            self.behaviour[node] = "ok"
            self.executor.set_online(node)
        for task_id in sorted(self.view().paused):
            self.run(self.runner.resume(task_id))
        for _ in range(60):  # a rate-limited task starts a few runs per minute
            self.tick(10_000)
            self.run(self.runner.run_until_idle())
            store = self.check()
            if all(r.terminal for r in store.runs.values()):
                break
        runs = store.runs.values()
        assert [r for r in runs if not r.terminal] == []
        # every device matching a continuous task still open has its run
        for task in self.run(self.store.open_continuous(self.clock.now)):
            assert task.select is not None
            assert set(self.matching(task.select.tags[0])) <= set(store.nodes[task.id])
        for state in sorted({r.state for r in runs}):
            event(f"a run ended {state}")
        for key, run in store.runs.items():
            if run.state is RunState.SUCCEEDED:
                assert key in {r.key for r in self.executor.executions}
            if run.recovered:
                event("a run's outcome was recovered from its device's journal")
        self.run(self.runner.__aexit__(None, None, None))
        self.gr = None

    def teardown(self) -> None:
        try:
            if not self.broken and self.gr is not None:
                self.finish()
        finally:
            try:
                if self.gr is not None:
                    self.run(crash(self.gr))
                self.run(self.store.close())  # a crash leaves it open
            finally:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()


GhostRunnerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGhostRunnerMachine = GhostRunnerMachine.TestCase


# --------------------------------------------------------------------------- two runners


class TwoRunnersMachine(GhostRunnerMachine):
    """The machine above with a second runner (``other``) sharing the store, as two
    ``ghostrunner serve`` processes share a PostgreSQL database. The operators' rules go
    through the first runner; both pass, either may crash or stop and start again, and
    each renews its lease only when a rule says so: time moving without renewals is a
    runner cut off from the database (it fences itself; the other adopts its runs once
    the lease and the grace are over, and settles them through outcome recovery).

    The guarantees are the same, over both runners: never two commands at once on a
    device (a recovery request may find a device still busy with the command of a
    runner that lost its lease: refused, asked again later), never an at_most_once
    attempt twice, rollout limits over both, nothing lost or invented; and: a runner
    not fenced holds in recovery only runs it owns; a runner holds (in flight or in
    recovery) every run it owns; a dispatched run no current runner owns belongs to a
    runner that died or lost its lease, not yet adopted; at the end every run ends."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = attrs.evolve(self.settings, lease=15.0, heartbeat=5.0,
                                     adopt_grace=0.5)
        self.other_gr: GhostRunner | None = None

    def make_store(self) -> Any:
        return WatchedShared(self.clock)

    @property
    def other(self) -> GhostRunner:
        assert self.other_gr is not None
        return self.other_gr

    def loops(self) -> list[GhostRunner]:
        return [gr for gr in (self.gr, self.other_gr) if gr is not None]

    @initialize()
    def boot_other(self) -> None:
        self.other_gr = self.start()

    async def settle_other(self) -> None:
        main, self.gr = self.gr, self.other_gr
        try:
            await self.settle()
        finally:
            self.gr = main

    @rule(release=st.booleans())
    def other_pass(self, release: bool) -> None:
        with self.guard():
            if release:
                self.release.set()
                self.run(self.other.run_until_idle())
                self.fresh_release()
            else:
                self.run(self.settle_other())

    @rule(first=st.booleans())
    def heartbeat(self, first: bool) -> None:
        """A runner renews its lease and adopts what dead runners left."""
        gr = self.runner if first else self.other
        with self.guard():
            before, adopted = gr.runner.id, gr.loop.adopted
            self.run(gr.loop.heartbeat())
            if gr.runner.id != before:
                event("a runner found its lease lost and registered again")
            if gr.loop.adopted > adopted:
                event("a runner adopted runs of a dead one")
            if not gr.loop.fenced:
                event("a runner renewed its lease")

    @rule(pass_first=st.booleans(), graceful=st.booleans())
    def restart_other(self, pass_first: bool, graceful: bool) -> None:
        with self.guard():
            if pass_first:
                self.run(self.settle_other())
            if graceful:
                self.run(self.other.__aexit__(None, None, None))
            else:
                self.run(crash(self.other))
            self.other_gr = self.start()
            self.fresh_release()

    def check_overlaps(self) -> None:
        assert [r for r in self.executor.overlaps if not r.recover] == []
        if self.executor.overlaps:
            event("a recovery request found its device still busy")

    def check_loops(self, dispatched: set[str], store: View) -> None:
        shared = self.store
        assert isinstance(shared, WatchedShared)
        loops = self.loops()
        owned: dict[str, set[str]] = {}  # runner -> its dispatched runs' nodes
        for key, run in store.runs.items():
            if run.state is RunState.DISPATCHED:
                owned.setdefault(shared.owner.get(key) or "", set()).add(key.node_id)
        current = {gr.runner.id for gr in loops}
        for gr in loops:
            loop = gr.loop
            mine = owned.get(gr.runner.id, set())
            assert len(loop.in_flight) <= MAX_IN_FLIGHT
            assert mine <= loop.in_flight | loop.recovering, (mine, loop.in_flight)
            if loop.fenced:
                event("a runner is fenced")
            else:
                assert loop.recovering <= mine, (loop.recovering, mine)
        for owner, nodes in owned.items():
            if owner not in current:  # a dead runner's, or one that lost its lease
                row = shared.runner_rows.get(owner)
                assert row is not None and row.ended_at is None, (owner, nodes)
                event("a run waits for its dead runner's lease to end")
        assert self.peak_busy <= MAX_IN_FLIGHT * len(loops)

    def finish(self) -> None:
        """Every device online and healthy, both runners back in touch: all runs end."""
        self.release.set()
        for node in NODES:
            self.behaviour[node] = "ok"
            self.executor.set_online(node)
        for task_id in sorted(self.view().paused):
            self.run(self.runner.resume(task_id))
        for _ in range(60):  # a rate-limited task starts a few runs per minute
            self.clock.advance(10_000)
            for gr in self.loops() * 2:
                self.run(gr.loop.heartbeat())  # renew, adopt, learn of a lost lease
            for gr in self.loops() * 2:
                self.run(gr.run_until_idle())
            store = self.check()
            if all(r.terminal for r in store.runs.values()):
                break
        runs = store.runs.values()
        assert [r for r in runs if not r.terminal] == []
        for state in sorted({r.state for r in runs}):
            event(f"a run ended {state}")
        for gr in self.loops():
            self.run(gr.loop.drain())
        self.gr = self.other_gr = None

    def teardown(self) -> None:
        try:
            if not self.broken and self.gr is not None:
                self.finish()
        finally:
            try:
                for gr in (self.gr, self.other_gr):
                    if gr is not None:
                        self.run(crash(gr))
                self.gr = self.other_gr = None
                self.run(self.store.close())
            finally:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()


TwoRunnersMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestTwoRunnersMachine = TwoRunnersMachine.TestCase


# --------------------------------------------------------------------------- PostgreSQL

#: Examples of the PostgreSQL machine in a normal run (each step is real round trips:
#: 0.7-4 s an example on 2 cores shared with other suites, against 0.05 s in memory);
#: set GHOSTRUNNER_PG_MACHINE_EXAMPLES for a longer hunt.
PG_EXAMPLES = int(os.environ.get("GHOSTRUNNER_PG_MACHINE_EXAMPLES", "15"))

#: Every table a GhostRunner database holds data in (not the schema version): the
#: schema's own list, so that a table added by a migration is emptied too.
PG_TABLES = ", ".join(_TABLES)


class PostgresMachine(GhostRunnerMachine):
    """The same machine over PostgresStore on a real PostgreSQL: one database for the
    whole test, emptied before each example."""

    dsn = ""  # set by the test

    def __init__(self) -> None:
        super().__init__()
        # the database keeps leases by its own clock, the loop by the fake one: a lease
        # long enough for both (renewed each time the fake clock moves: ``tick``)
        self.settings = attrs.evolve(self.settings, lease=3600.0, heartbeat=1.0)

    def make_store(self) -> Any:
        # every table, identities restarted: event ids start again from 1 (the replay
        # starts from 0 in each example), and only increase within it
        # one connection of the test's own for the example (closed by teardown)
        self.db = psycopg.connect(self.dsn, autocommit=True)
        self.db.execute(f"TRUNCATE {PG_TABLES} RESTART IDENTITY")
        return WatchedPostgres(self.dsn, max_size=4)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self.db.close()

    def tick(self, seconds: float) -> None:
        """Time moves on, and the runner's lease keeper renews its lease as it would in
        that time (a background task, not run here): one lone runner is never fenced."""
        super().tick(seconds)
        if self.gr is not None:
            with self.guard():
                self.run(self.runner.loop.heartbeat())
                assert not self.runner.loop.fenced

    def crashed(self, gr: GhostRunner) -> None:
        """The dead runner's lease ends now, as if its ``lease`` had passed (the
        database's clock does not follow the fake one): its successor adopts its
        dispatched runs a heartbeat after its start (its first ``tick`` of a second or
        more) and puts them through outcome recovery."""
        cur = self.db.execute(
            "UPDATE runners SET expires_at = clock_timestamp() - interval '1 hour'"
            " WHERE id = %s AND ended_at IS NULL", (gr.runner.id,))
        assert cur.rowcount == 1, gr.runner.id

    def check_loops(self, dispatched: set[str], store: View) -> None:
        """Every run dispatched by this runner is in flight or held in recovery, and
        it holds nothing else; a dispatched run of another runner is one a crashed or
        stopped runner left, not adopted yet (its row not ended: adopted runs are the
        adopter's). Owners are read from the database (not in the Store protocol)."""
        owners = dict(self.db.execute(
            "SELECT node, runner FROM runs WHERE state = 'dispatched'").fetchall())
        ended = {row[0] for row in self.db.execute(
            "SELECT id FROM runners WHERE ended_at IS NOT NULL").fetchall()}
        assert set(owners) == dispatched
        loop = self.runner.loop
        me = self.runner.runner.id
        mine = {node for node, owner in owners.items() if owner == me}
        assert mine == set(loop.in_flight | loop.recovering), (mine, owners)
        for node, owner in owners.items():
            if owner != me:
                assert owner is not None and owner not in ended, (node, owner)
                event("a run waits for its dead runner's successor to adopt it")
        assert len(loop.in_flight) <= MAX_IN_FLIGHT
        assert self.peak_busy <= MAX_IN_FLIGHT
        if loop.recovering:
            event("a run is held in recovery")


def test_machine_postgres(postgres: PgServer) -> None:
    dsn = postgres.database()
    try:
        machine = type("Machine", (PostgresMachine,), {"dsn": dsn})
        run_state_machine_as_test(machine, settings=settings(
            max_examples=PG_EXAMPLES,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ))
    finally:
        postgres.drop(dsn)

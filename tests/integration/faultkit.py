"""What the fault tests share: a ledger of what really ran, its invariants, and a bench.

Every run of a fault test has a unique label (its task's name; one target per task).
Its command appends the label to one executions log on the device side (the lab's
agents are local processes, so they all write the same file) and prints it. After the
faults, :meth:`Ledger.check` matches the log against the runs GhostRunner recorded and
fails loudly, with the seed and the offending runs, if one of these breaks:

* every run is terminal (nothing left ``pending`` or ``dispatched``);
* every line of the log is the label of a recorded run, and every planned run was
  recorded once, as planned (command, delivery, max_attempts);
* an ``at_most_once`` run executed at most once (and its attempts are at most 1);
* any run executed at most ``attempts`` times, and ``attempts <= max_attempts``;
* a ``succeeded`` or ``failed`` run executed, with the planned exit code and its own
  output (its label: a reply credited to the wrong run would show);
* ``lost`` only as the delivery policy allows (at_least_once: all attempts used);
  ``timed_out``, ``expired`` and ``cancelled`` never happen here;
* with ``reachable`` (the devices stayed up: only GhostRunner or MeshCentral failed),
  the device's journal answers for every run: no ``lost`` run at all, and no
  at_least_once run executed more than once.

The seed is printed and recorded; ``GHOSTRUNNER_FAULT_SEED=<seed>`` replays the same
plan and fault schedule (the timing of real processes still varies).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ghostrunner import (
    Delivery,
    GhostRunner,
    LoopSettings,
    RetryPolicy,
    Run,
    RunState,
    Store,
    Task,
    TaskQuery,
)
from ghostrunner.lab import Agent, MeshLab
from ghostrunner.meshcentral import MeshCentralExecutor
from ghostrunner.sqlite import SQLiteStore

SEED_ENV = "GHOSTRUNNER_FAULT_SEED"
TIMEOUT = 30.0  # each command's timeout: they take at most half a second
FAST = LoopSettings(resync_interval=1.0, retry=RetryPolicy(0.5, 2.0), shutdown_grace=2.0)
_T = TypeVar("_T")


class Figures(Protocol):
    def add(self, name: str, value: float | int | str, unit: str = "") -> None: ...


@dataclass(frozen=True)
class Planned:
    """One run as the test planned it."""

    label: str
    node_id: str
    delivery: Delivery
    max_attempts: int
    exit_code: int
    command: str

    def task(self) -> Task:
        return Task(name=self.label, command=self.command, targets=[self.node_id],
                    timeout=TIMEOUT, delivery=self.delivery, max_attempts=self.max_attempts)

    def details(self) -> dict[str, Any]:
        """The ``details`` of ``POST /task/create``."""
        return {"name": self.label, "command": self.command, "nodeids": [self.node_id],
                "timeout": TIMEOUT, "delivery": self.delivery.value,
                "max_attempts": self.max_attempts}


@dataclass
class Tally:
    """What the check counted (reported as figures)."""

    runs: int = 0
    states: Counter[str] = field(default_factory=Counter)
    executions: int = 0
    at_least_once: int = 0
    repeated: int = 0  # at_least_once runs that executed more than once
    lost_executed: int = 0
    lost_not_executed: int = 0
    at_most_once_twice: int = 0
    recovered: int = 0  # runs whose outcome was read back from the device's journal
    undelivered: int = 0  # dispatches known not to have reached the device (retried)
    longest: float = 0.0  # seconds of the longest (last) dispatch: claimed -> settled

    def record(self, figures: Figures, prefix: str) -> None:
        figures.add(f"{prefix}: runs", self.runs)
        for state in RunState:
            if self.states[state.value]:
                figures.add(f"{prefix}: {state.value}", self.states[state.value])
        figures.add(f"{prefix}: executions on the devices", self.executions)
        figures.add(f"{prefix}: lost that had executed", self.lost_executed)
        figures.add(f"{prefix}: lost that had not executed", self.lost_not_executed)
        figures.add(f"{prefix}: at_least_once runs", self.at_least_once)
        figures.add(f"{prefix}: at_least_once runs executed more than once", self.repeated)
        figures.add(f"{prefix}: at_most_once runs executed twice", self.at_most_once_twice)
        figures.add(f"{prefix}: outcomes recovered from the device journal", self.recovered)
        figures.add(f"{prefix}: not-delivered dispatches (retried)", self.undelivered)
        figures.add(f"{prefix}: longest dispatch, claimed -> settled", self.longest, "s")


class Ledger:
    """Plans labelled runs, and checks what was recorded against what ran.

    Args:
        name: short lowercase prefix of the labels (``crash``), also used in messages.
        log: the executions log the commands append to.
        node_ids: the devices to spread the runs over.
        at_least_once: share of runs with that delivery (the rest: at_most_once).
    """

    def __init__(self, name: str, log: Path, node_ids: Sequence[str], *,
                 at_least_once: float = 0.2) -> None:
        env = os.environ.get(SEED_ENV)
        self.seed = int(env) if env else random.SystemRandom().randrange(2**32)
        print(f"{name}: seed {self.seed} (replay: {SEED_ENV}={self.seed})")
        self.rng = random.Random(self.seed)
        self.name = name
        self.log = log
        self.node_ids = list(node_ids)
        self.at_least_once = at_least_once
        self.planned: dict[str, Planned] = {}

    def plan(self, count: int) -> list[Planned]:
        """``count`` more runs: random device, delivery, exit status and duration.

        Shapes: most commands are instant; some sleep before writing their line (a
        fault then often hits before they ran), some after (a fault then often hits
        after they ran, before their outcome came back)."""
        out = []
        for _ in range(count):
            label = f"{self.name}-{len(self.planned):05d}"
            rng = self.rng
            least = rng.random() < self.at_least_once
            exit_code = 3 if rng.random() < 0.1 else 0
            body = f"echo {label} >> {self.log}; echo {label}"
            shape = rng.random()
            pause = rng.choice((0.1, 0.2, 0.3, 0.5))
            if shape < 0.15:
                body = f"sleep {pause}; {body}"
            elif shape < 0.35:
                body = f"{body}; sleep {pause}"
            if exit_code:
                body += f"; exit {exit_code}"
            planned = Planned(
                label=label, node_id=rng.choice(self.node_ids),
                delivery=Delivery.AT_LEAST_ONCE if least else Delivery.AT_MOST_ONCE,
                max_attempts=rng.choice((2, 3, 4)) if least else 3,
                exit_code=exit_code, command=body,
            )
            self.planned[label] = planned
            out.append(planned)
        return out

    def executions(self) -> tuple[Counter[str], list[str]]:
        """Executions per label, and the lines that are no planned label."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        counts = Counter(lines)
        strays = [line for line in counts if line not in self.planned]
        return counts, strays

    def check(self, recorded: Iterable[tuple[Task, Run]], *, reachable: bool = False,
              **context: object) -> Tally:
        """Check every invariant (module docstring; ``reachable``: the devices stayed
        up); raise AssertionError listing every violation, with the seed, the counts and
        ``context`` (what the faults were)."""
        ran, strays = self.executions()
        problems = [f"line {line!r} in the log is no planned run" for line in strays]
        runs: dict[str, Run] = {}
        for task, run in recorded:
            planned = self.planned.get(task.name)
            if planned is None:
                problems.append(f"task {task.name!r} ({task.id}) was never planned")
                continue
            if task.name in runs:
                problems.append(f"{task.name}: recorded twice (a second task {task.id})")
            runs[task.name] = run
            if (task.command, task.delivery, task.max_attempts, run.node_id) != (
                planned.command, planned.delivery, planned.max_attempts, planned.node_id
            ):
                problems.append(f"{task.name}: recorded as {task!r}, planned {planned!r}")
        problems += [f"{label}: planned but never recorded"
                     for label in self.planned if label not in runs]
        tally = Tally(runs=len(runs), executions=sum(ran.values()))
        for label, run in sorted(runs.items()):
            planned = self.planned[label]
            problems += [f"{label}: {p} ({_describe(run, ran[label])})"
                         for p in _violations(planned, run, ran[label], reachable)]
            _count(tally, planned, run, ran[label])
        if problems:
            shown = "\n  ".join(problems[:60])
            more = f"\n  ... and {len(problems) - 60} more" if len(problems) > 60 else ""
            raise AssertionError(
                f"{self.name}: {len(problems)} invariant violation(s); seed {self.seed} "
                f"(replay: {SEED_ENV}={self.seed})\n"
                f"states: {dict(tally.states)}; executions: {tally.executions}; "
                f"{', '.join(f'{k}: {v}' for k, v in context.items())}\n  {shown}{more}"
            )
        return tally


def _violations(planned: Planned, run: Run, ran: int, reachable: bool) -> list[str]:
    out = []
    state = run.state
    if reachable and state is RunState.LOST:
        out.append("lost although its device stayed reachable (its journal had the answer)")
    if reachable and ran > 1:
        out.append("executed more than once although its device stayed reachable")
    if not state.terminal:
        out.append(f"not terminal: {state.value}")
    if planned.delivery is Delivery.AT_MOST_ONCE and (ran > 1 or run.attempts > 1):
        out.append("at_most_once run executed (or was sent) more than once")
    if ran > run.attempts:
        out.append("executed more times than it was sent")
    if run.attempts > planned.max_attempts:
        out.append("sent more than max_attempts times")
    if state in (RunState.SUCCEEDED, RunState.FAILED):
        if ran == 0:
            out.append(f"{state.value} but never executed")
        wanted = RunState.SUCCEEDED if planned.exit_code == 0 else RunState.FAILED
        if state is not wanted or run.exit_code != planned.exit_code:
            out.append(f"wrong outcome: planned exit {planned.exit_code}")
        if run.output != f"{planned.label}\n":
            out.append(f"output {run.output[:80]!r} is not its own")
    elif state is RunState.LOST:
        if planned.delivery is Delivery.AT_LEAST_ONCE and run.attempts < planned.max_attempts:
            out.append("at_least_once run lost before using its attempts")
    elif state.terminal:
        out.append(f"unexpected state {state.value}")
    return out


def _count(tally: Tally, planned: Planned, run: Run, ran: int) -> None:
    tally.states[run.state.value] += 1
    tally.recovered += run.recovered
    tally.undelivered += run.undelivered
    if run.started_at is not None and run.finished_at is not None:
        tally.longest = max(tally.longest, (run.finished_at - run.started_at).total_seconds())
    if planned.delivery is Delivery.AT_LEAST_ONCE:
        tally.at_least_once += 1
        tally.repeated += ran > 1
    elif ran > 1:
        tally.at_most_once_twice += 1
    if run.state is RunState.LOST:
        if ran:
            tally.lost_executed += 1
        else:
            tally.lost_not_executed += 1


def _describe(run: Run, ran: int) -> str:
    return (f"state={run.state.value} executed={ran} attempts={run.attempts} "
            f"undelivered={run.undelivered} node={run.node_id[-8:]} error={run.error!r}")


async def recorded_runs(store: Store) -> list[tuple[Task, Run]]:
    """Every task of ``store`` with its (single) run."""
    out: list[tuple[Task, Run]] = []
    cursor: str | None = None
    while True:
        page = await store.list_tasks(TaskQuery(limit=1000, cursor=cursor))
        for summary in page.items:
            out.extend((summary.task, run) for run in await store.get_runs(summary.task.id))
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def read_store(db: Path, read: Callable[[Store], Awaitable[_T]]) -> _T:
    """``await read(store)`` on the SQLite database ``db`` (no server using it)."""
    async def run() -> _T:
        store = SQLiteStore(db)
        await store.open()
        try:
            return await read(store)
        finally:
            await store.close()

    return asyncio.run(run())


# --------------------------------------------------------------------------- waiting


def wait_for(check: Callable[[], bool], timeout: float, what: str,
             describe: Callable[[], str] | None = None) -> float:
    """Poll ``check`` until true; return the seconds it took. AssertionError naming
    ``what`` (and ``describe()``) after ``timeout``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            detail = describe() if describe is not None else ""
            raise AssertionError(f"{what}: not within {timeout:.0f}s {detail}")
        time.sleep(0.05)
    return time.monotonic() - started


async def until(check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str,
                describe: Callable[[], Awaitable[str]] | None = None) -> float:
    """Async :func:`wait_for`; ``check`` may be a coroutine function."""
    started = time.monotonic()
    while not await _holds(check):
        if time.monotonic() - started > timeout:
            detail = await describe() if describe is not None else ""
            raise AssertionError(f"{what}: not within {timeout:.0f}s {detail}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _holds(check: Callable[[], Awaitable[bool] | bool]) -> bool:
    result = check()
    return result if isinstance(result, bool) else await result


def start_agents(agent_factory: Callable[..., Agent], names: Sequence[str]) -> list[Agent]:
    """The named agents of the lab, enrolled and online."""
    return [agent_factory(name, start=True) for name in names]


# --------------------------------------------------------------------------- the bench


class Bench:
    """GhostRunner (SQLiteStore + MeshCentralExecutor, in this process) on the lab, with
    a ledger of its runs. Made by :func:`bench`."""

    def __init__(self, gr: GhostRunner, executor: MeshCentralExecutor, ledger: Ledger,
                 agents: Sequence[Agent]) -> None:
        self.gr = gr
        self.executor = executor
        self.ledger = ledger
        self.agents = list(agents)
        self.submitted = 0
        self.faults = 0
        self.dispatched_at_faults = 0
        self._finished = 0  # terminal runs at the last wait_dispatching

    async def counts(self) -> Counter[RunState]:
        return Counter(await self.gr.counts())

    async def describe(self) -> str:
        online = sorted(a.name for a in self.agents if self.online(a))
        return (f"(counts {dict(await self.counts())}; executor connected "
                f"{self.executor.connected}; online {online}; seed {self.ledger.seed})")

    def online(self, agent: Agent) -> bool:
        device = self.executor.devices().get(agent.node_id)
        return device is not None and device.online

    async def submit(self, count: int) -> list[Task]:
        tasks = [await self.gr.submit(planned.task()) for planned in self.ledger.plan(count)]
        self.submitted += count
        return tasks

    async def top_up(self, backlog: int) -> None:
        """Submit runs until at least ``backlog`` are pending."""
        pending = (await self.counts())[RunState.PENDING]
        if pending < backlog:
            await self.submit(backlog - pending)

    async def wait_online(self, timeout: float = 120.0) -> float:
        """Until the executor is connected and sees every agent online."""
        return await until(
            lambda: self.executor.connected and all(self.online(a) for a in self.agents),
            timeout, "agents online again", self.describe)

    async def wait_dispatching(self, timeout: float = 60.0) -> int:
        """Until runs are in flight and at least one finished since the last call;
        returns how many are dispatched."""
        async def busy() -> bool:
            counts = await self.counts()
            done = sum(n for state, n in counts.items() if state.terminal)
            return counts[RunState.DISPATCHED] > 0 and done > self._finished

        await until(busy, timeout, "runs being dispatched", self.describe)
        counts = await self.counts()
        self._finished = sum(n for state, n in counts.items() if state.terminal)
        return counts[RunState.DISPATCHED]

    async def fault(self, inject: Callable[[], Awaitable[object]]) -> float:
        """Wait until runs are dispatched, pause a random moment, then
        :meth:`meshcentral_fault`; returns what that returns."""
        await self.wait_dispatching()
        await asyncio.sleep(self.ledger.rng.uniform(0.0, 1.0))
        return await self.meshcentral_fault(inject)

    async def meshcentral_fault(self, inject: Callable[[], Awaitable[object]]) -> float:
        """Inject a fault that takes MeshCentral away (a restart, an outage), then wait
        until the executor has logged in again and sees every agent online; returns
        that wait, in seconds."""
        self.dispatched_at_faults += (await self.counts())[RunState.DISPATCHED]
        self.faults += 1
        sessions = self.executor.sessions_started
        await inject()
        back = await until(lambda: self.executor.sessions_started > sessions, 180,
                           "a new MeshCentral session", self.describe)
        return back + await self.wait_online()

    async def drain(self, timeout: float) -> float:
        """Until no run is pending or dispatched; returns the seconds it took."""
        async def drained() -> bool:
            counts = await self.counts()
            return counts[RunState.PENDING] + counts[RunState.DISPATCHED] == 0

        return await until(drained, timeout, "the queue drained", self.describe)

    async def check(self, **context: object) -> Tally:
        return self.ledger.check(await recorded_runs(self.gr.store), **context)


@contextlib.asynccontextmanager
async def bench(lab: MeshLab, agents: Sequence[Agent], workdir: Path, name: str,
                at_least_once: float = 0.2) -> AsyncIterator[Bench]:
    """A started :class:`Bench` whose executor sees every agent online."""
    ledger = Ledger(name, workdir / "executions.log", [a.node_id for a in agents],
                    at_least_once=at_least_once)
    executor = MeshCentralExecutor(lab.url, user=lab.admin_user, password=lab.admin_password,
                                   ignore_ssl=True, group_id=lab.group_id)
    async with GhostRunner(store=SQLiteStore(workdir / "gr.db"), executor=executor,
                           settings=FAST) as gr:
        b = Bench(gr, executor, ledger, agents)
        await b.wait_online()
        yield b

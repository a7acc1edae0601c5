"""Two runners (GhostRunners, each on its own PostgresStore: its own connection pool and
listening connection, as two processes have) on one real PostgreSQL, over one
FakeExecutor (the devices both see). Real time, short leases: what is measured here is
how soon one runner learns what the other did (LISTEN/NOTIFY) and how soon a dead
runner's runs are taken over; the resync interval is long, so nothing is found by a
periodic pass. A database restart (pg_ctl stop, start) mid-dispatch on a server of the
test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from ghostrunner import (
    Delivery,
    Device,
    GhostRunner,
    LoopSettings,
    Outcome,
    RetryPolicy,
    RunKey,
    RunRequest,
    RunState,
    Task,
)
from ghostrunner.postgres import PostgresStore
from ghostrunner.testing import FakeExecutor, crash
from tests.pg import PgServer

LEASE = 2.0
FAST = LoopSettings(resync_interval=60.0, retry=RetryPolicy(0.2, 1.0), lease=LEASE,
                    heartbeat=0.5, adopt_grace=0.2, shutdown_grace=0.5)


class Hold:
    """Holds the commands of the devices in ``held`` until released."""

    def __init__(self, *held: str) -> None:
        self.held = set(held)
        self.release = asyncio.Event()
        self.came = asyncio.Event()

    async def __call__(self, request: RunRequest, device: Device) -> Outcome:
        if request.node_id in self.held:
            self.came.set()
            await self.release.wait()
        return Outcome(exit_code=0, output=f"{request.command}\n")


class Counting(PostgresStore):
    """Counts the runs each claim asked for, by device."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: Counter[str] = Counter()

    async def claim_many(self, keys: Any, now: Any, *, runner: str | None = None) -> Any:
        self.asked.update(k.node_id for k in keys)
        return await super().claim_many(keys, now, runner=runner)


@contextlib.asynccontextmanager
async def runner(dsn: str, executor: FakeExecutor, name: str, *, background: bool = True,
                 settings: LoopSettings = FAST) -> AsyncIterator[GhostRunner]:
    store = Counting(dsn, max_size=4, listen_check=0.5, timeout=5.0)
    async with GhostRunner(store=store, executor=executor, settings=settings,
                           background=background, name=name) as gr:
        yield gr


@contextlib.asynccontextmanager
async def beating(gr: GhostRunner) -> AsyncIterator[None]:
    """Renew a foreground runner's lease (its loop does not run by itself)."""
    async def beat() -> None:
        while True:
            await asyncio.sleep(FAST.heartbeat)
            await gr.loop.heartbeat()

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def listening(gr: GhostRunner) -> None:
    """Until the runner's listening connection is up (its first signal came)."""
    async with asyncio.timeout(10):
        while not gr.loop.signals_seen:  # noqa: ASYNC110 - the loop's own counter
            await asyncio.sleep(0.01)


async def owner(store: Any, key: RunKey) -> str | None:
    async with store.connection() as conn:
        cur = await conn.execute(
            "SELECT r.runner FROM runs AS r JOIN tasks AS t ON t.seq = r.task_seq "
            "WHERE t.id = %s AND r.node = %s", (key.task_id, key.node_id))
        row = await cur.fetchone()
        return None if row is None else row[0]


async def test_a_task_submitted_through_one_runner_wakes_the_other(
    postgres: PgServer, figures: Any
) -> None:
    dsn = postgres.database()
    executor = FakeExecutor(devices=["n1"])
    executor.set_online("n1")
    # a never passes (background=False): whatever runs was dispatched by b
    async with (runner(dsn, executor, "a", background=False) as a, beating(a),
                runner(dsn, executor, "b") as b):
        await listening(b)
        woken = []
        for i in range(5):
            start = time.monotonic()
            task = await a.submit(command=f"c{i}", targets=["n1"])
            await b.wait(task.id, timeout=10)
            woken.append(time.monotonic() - start)
            assert await owner(a.store, RunKey(task.id, "n1")) == b.runner.id
        # (the resync interval is 60 s: only the signal can have woken b)
        assert max(woken) < 1.0, woken
        figures.add("two runners: submit on one -> run done by the other (max of 5)",
                    round(max(woken) * 1000, 1), "ms")


async def test_a_device_busy_elsewhere_is_skipped_then_taken_when_freed(
    postgres: PgServer, figures: Any
) -> None:
    dsn = postgres.database()
    hold = Hold("n1")
    executor = FakeExecutor(hold, devices=["n1"])
    executor.set_online("n1")
    async with runner(dsn, executor, "a", background=False) as a, beating(a):
        first = await a.submit(command="first", targets=["n1"])
        await a.loop.step()  # a dispatches it: held on the device
        await asyncio.wait_for(hold.came.wait(), 5)
        async with runner(dsn, executor, "b") as b:
            await listening(b)
            second = await a.submit(command="second", targets=["n1"])  # wakes b: busy
            passes = b.loop.passes
            await asyncio.sleep(1.0)  # b has nothing to do: does it spin?
            assert b.loop.passes - passes <= 3, "b keeps passing over a device busy elsewhere"
            assert isinstance(b.store, Counting)
            assert b.store.asked["n1"] == 0  # (not even tried: it is left out at once)
            assert [r.state for r in await b.runs(second.id)] == [RunState.PENDING]
            hold.held.clear()
            start = time.monotonic()
            hold.release.set()  # a's command ends; a records it: b is woken for n1
            await b.wait(second.id, timeout=10)
            took = time.monotonic() - start
            assert [r.state for r in await a.runs(first.id)] == [RunState.SUCCEEDED]
            assert await owner(a.store, RunKey(first.id, "n1")) == a.runner.id
            assert await owner(a.store, RunKey(second.id, "n1")) == b.runner.id
            assert took < 1.0  # (b's wait looks again every second by itself)
            assert executor.overlaps == []
            figures.add("two runners: device freed by one -> next run done by the other",
                        round(took * 1000, 1), "ms")


async def test_a_killed_runners_run_is_taken_over_within_its_lease(
    postgres: PgServer, figures: Any
) -> None:
    dsn = postgres.database()
    hold = Hold("n1")
    executor = FakeExecutor(hold, devices=["n1", "n2"], journal=True)
    for node in ("n1", "n2"):
        executor.set_online(node)
    a = GhostRunner(store=PostgresStore(dsn, max_size=4), executor=executor, settings=FAST,
                    name="a")
    await a.__aenter__()  # (it is killed, not left)
    try:
        task = await a.submit(command="held", targets=["n1"], delivery=Delivery.AT_MOST_ONCE)
        await asyncio.wait_for(hold.came.wait(), 5)  # a dispatched it
        key = RunKey(task.id, "n1")
        assert await owner(a.store, key) == a.runner.id
        async with runner(dsn, executor, "b") as b:
            await listening(b)
            killed_at = time.monotonic()
            await crash(a)  # no more heartbeats; its command goes on and is journalled
            hold.held.clear()
            hold.release.set()
            done = await b.wait(task.id, timeout=LEASE * 4)
            took = time.monotonic() - killed_at
            [run] = done
            assert (run.state, run.recovered) == (RunState.SUCCEEDED, True)
            assert Counter(r.key for r in executor.executions)[key] == 1
            assert await owner(b.store, key) == b.runner.id
            # the lease (and the grace, and one recovery request), not much later
            assert took <= LEASE + FAST.adopt_grace + 1.0, took
            figures.add(f"two runners: kill -> its run settled by the survivor (lease "
                        f"{LEASE:g}s)", round(took, 2), "s")
    finally:
        await crash(a)
        await a.store.close()


async def test_both_runners_survive_a_database_restart(
    own_postgres: PgServer, figures: Any
) -> None:
    """The database stops for longer than a lease while both runners dispatch, then
    starts again: both reconnect (pool and listener), renew, and drain the queue;
    nothing is left dispatched, no at_most_once run executed twice."""
    dsn = own_postgres.database()
    executor = FakeExecutor(devices=[f"n{i}" for i in range(6)], latency=0.05, journal=True)
    for node in executor.devices():
        executor.set_online(node)
    async with runner(dsn, executor, "a") as a, runner(dsn, executor, "b") as b:
        await listening(a)
        await listening(b)
        tasks = [Task(name=f"t{i}", command=f"c{i}", targets=[f"n{i % 6}"],
                      delivery=Delivery.AT_MOST_ONCE if i % 5 else Delivery.AT_LEAST_ONCE)
                 for i in range(120)]
        for i, task in enumerate(tasks):
            await (a if i % 2 else b).submit(task)
        await asyncio.sleep(0.3)  # dispatching
        before = await a.counts()
        assert before.get(RunState.PENDING, 0) > 0 and before.get(RunState.SUCCEEDED, 0) > 0
        own_postgres.stop_server()
        await asyncio.sleep(LEASE + 4.0)  # past every lease
        assert a.loop.fenced and b.loop.fenced
        own_postgres.start_server()
        back = time.monotonic()
        async with asyncio.timeout(30):
            while a.loop.fenced or b.loop.fenced:  # noqa: ASYNC110 - the loops' own state
                await asyncio.sleep(0.02)
        figures.add("two runners: database back -> both leases renewed",
                    round(time.monotonic() - back, 2), "s")
        try:
            for task in tasks:
                await a.wait(task.id, timeout=30)
            figures.add("two runners: database back -> queue drained (120 runs, 6 devices)",
                        round(time.monotonic() - back, 2), "s")
        except TimeoutError:
            stuck = [r for r in await a.store.dispatched()]
            owners = {r.key: await owner(a.store, r.key) for r in stuck}
            raise AssertionError(
                f"not drained: counts {dict(await a.counts())}; dispatched {owners}; "
                f"runners {await a.runners()}; a {a.runner.id} in flight "
                f"{a.loop.in_flight} recovering {a.loop.recovering} fenced {a.loop.fenced}; "
                f"b {b.runner.id} in flight {b.loop.in_flight} recovering "
                f"{b.loop.recovering} fenced {b.loop.fenced}") from None
        runs = [r for task in tasks for r in await a.runs(task.id)]
        assert {r.state for r in runs} == {RunState.SUCCEEDED}
        once = Counter(r.key for r in executor.executions if r.delivery is Delivery.AT_MOST_ONCE)
        assert [k for k, n in once.items() if n > 1] == []
        assert executor.overlaps == []
        assert not a.loop.fenced and not b.loop.fenced
        assert await a.store.dispatched() == []

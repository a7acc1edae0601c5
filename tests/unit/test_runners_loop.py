"""Several runners on one store, over the fakes: ``SharedInMemoryStore`` (leases, owners,
one dispatched run per device), one ``FakeExecutor`` with journals (the devices every
runner sees), one ``FakeClock`` (the store's and the runners' time). Two GhostRunners
with ``background=False``: the tests drive passes (``run_until_idle``, ``loop.step``)
and heartbeats (``loop.heartbeat``) themselves, and move time; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest

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
)
from ghostrunner.errors import StoreError
from ghostrunner.runners import LeaseState
from ghostrunner.testing import FakeClock, FakeExecutor, SharedInMemoryStore, crash

T = TypeVar("T")
LIMIT = 5.0
SETTINGS = LoopSettings(retry=RetryPolicy(1.0, 8.0), lease=15.0, heartbeat=5.0,
                        adopt_grace=0.5, shutdown_grace=0.001)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


class Hold:
    """A handler holding the commands of the devices in ``held`` until released."""

    def __init__(self, *held: str) -> None:
        self.held = set(held)
        self.release = asyncio.Event()
        self.arrived: list[RunRequest] = []
        self._came = asyncio.Event()

    async def __call__(self, request: RunRequest, device: Device) -> Outcome:
        if request.node_id in self.held:
            self.arrived.append(request)
            self._came.set()
            await self.release.wait()
        return Outcome(exit_code=0, output=f"{request.command} on {request.node_id}\n")

    async def wait(self) -> None:
        """Until a command is held."""
        await asyncio.wait_for(self._came.wait(), LIMIT)


class Pair:
    """Two runners on one shared store."""

    def __init__(self, *devices: str, handler: Any = None) -> None:
        self.clock = FakeClock()
        self.store = SharedInMemoryStore(self.clock)
        self.executor = FakeExecutor(handler, devices=devices, journal=True)
        for node in devices:
            self.executor.set_online(node)

    def runner(self, name: str) -> GhostRunner:
        return GhostRunner(store=self.store, executor=self.executor, settings=SETTINGS,
                           clock=self.clock, background=False, name=name)

    def owner(self, key: RunKey) -> str | None:
        return self.store.owner.get(key)

    def executions(self) -> Counter[RunKey]:
        return Counter(r.key for r in self.executor.executions)


@contextlib.asynccontextmanager
async def two(pair: Pair) -> AsyncIterator[tuple[GhostRunner, GhostRunner]]:
    async with pair.runner("a") as a, pair.runner("b") as b:
        yield a, b


def test_each_runner_registers_with_a_lease() -> None:
    pair = Pair("n1")

    async def main() -> None:
        async with two(pair) as (a, b):
            assert a.runner.id != b.runner.id
            assert (a.runner.name, b.runner.name) == ("a", "b")
            assert a.loop.shared and not a.loop.fenced
            assert a.loop.lease_left == SETTINGS.lease
            found = {s.info.id: s for s in await a.runners()}
            assert {s.state for s in found.values()} == {LeaseState.ALIVE}
            assert found[a.runner.id].info == a.runner
        # a graceful stop ends the lease
        assert {s.state for s in await pair.store.runners()} == {LeaseState.STOPPED}

    run(main())


def test_two_runners_share_the_work_one_command_per_device() -> None:
    pair = Pair(*(f"n{i}" for i in range(6)))

    async def main() -> None:
        async with two(pair) as (a, b):
            tasks = [await a.submit(command=f"c{i}", targets=[f"n{j}" for j in range(6)])
                     for i in range(4)]
            tasks += [await b.submit(command=f"d{i}", targets=["n0", "n3"]) for i in range(3)]
            await asyncio.gather(a.run_until_idle(), b.run_until_idle())
            for _ in range(3):  # each may have left work when the other freed a device
                await asyncio.gather(a.run_until_idle(), b.run_until_idle())
            runs = [r for t in tasks for r in await a.runs(t.id)]
            assert {r.state for r in runs} == {RunState.SUCCEEDED}
            assert set(pair.executions().values()) == {1}
            assert pair.executor.overlaps == []
            owners = Counter(pair.owner(r.key) for r in runs)
            assert set(owners) <= {a.runner.id, b.runner.id}

    run(main())


def test_a_restart_leaves_alone_what_a_live_runner_has_in_flight() -> None:
    hold = Hold("n1")
    pair = Pair("n1", handler=hold)

    async def main() -> None:
        async with pair.runner("a") as a:
            task = await a.submit(command="slow", targets=["n1"])
            await a.loop.step()
            await hold.wait()
            # another runner starts meanwhile: the run is a's, alive, not stale
            async with pair.runner("b") as b:
                assert await b.loop.adopt() == 0
                await b.run_until_idle()
                assert b.loop.recovering == frozenset()
                assert [r.state for r in await b.runs(task.id)] == [RunState.DISPATCHED]
                hold.release.set()
                await a.run_until_idle()
                [done] = await a.runs(task.id)
                assert (done.state, done.recovered) == (RunState.SUCCEEDED, False)
            assert pair.executions()[RunKey(task.id, "n1")] == 1

    run(main())


@pytest.mark.parametrize("delivery", list(Delivery))
def test_a_dead_runners_run_is_adopted_and_its_outcome_read_back(delivery: Delivery) -> None:
    hold = Hold("n1")
    pair = Pair("n1", "n2", handler=hold)

    async def main() -> None:
        async with pair.runner("b") as b:
            a = pair.runner("a")
            await a.__aenter__()
            task = await a.submit(command="work", targets=["n1"], delivery=delivery)
            await a.loop.step()
            await hold.wait()
            await crash(a)  # the command goes on on the device; its end is journalled
            key = RunKey(task.id, "n1")
            assert pair.owner(key) == a.runner.id
            # a's lease runs: nothing is taken before it ends, plus the grace
            pair.clock.advance(SETTINGS.lease)
            await b.loop.heartbeat()
            assert pair.owner(key) == a.runner.id
            pair.clock.advance(SETTINGS.adopt_grace + 0.1)
            await b.loop.heartbeat()
            assert pair.owner(key) == b.runner.id
            assert b.loop.recovering == {"n1"}
            assert b.loop.adopted == 1
            await b.run_until_idle()
            [done] = await b.runs(task.id)
            assert (done.state, done.recovered, done.attempts) == (RunState.SUCCEEDED, True, 1)
            assert pair.executions()[key] == 1
            status = {s.info.id: s for s in await b.runners()}
            assert (status[a.runner.id].state, status[a.runner.id].adopted_by) == (
                LeaseState.ADOPTED, b.runner.id)
            # and b serves the device
            more = await b.submit(command="next", targets=["n1"])
            hold.held.clear()
            await b.run_until_idle()
            assert [r.state for r in await b.runs(more.id)] == [RunState.SUCCEEDED]

    run(main())


def test_a_runner_that_cannot_renew_fences_itself() -> None:
    pair = Pair("n1")

    async def main() -> None:
        async with pair.runner("a") as a:
            pair.clock.advance(SETTINGS.lease - SETTINGS.heartbeat - 0.1)
            assert not a.loop.fenced
            pair.clock.advance(0.2)  # less than a heartbeat of lease is left
            assert a.loop.fenced
            task = await a.submit(command="x", targets=["n1"])
            await a.run_until_idle()
            assert pair.executor.calls == []
            assert [r.state for r in await a.runs(task.id)] == [RunState.PENDING]
            await a.loop.heartbeat()  # the store answers again: still its lease
            assert not a.loop.fenced
            await a.run_until_idle()
            assert [r.state for r in await a.runs(task.id)] == [RunState.SUCCEEDED]

    run(main())


def test_a_command_claimed_just_before_the_fence_is_not_sent() -> None:
    pair = Pair("n1")

    async def main() -> None:
        async with pair.runner("a") as a:
            task = await a.submit(command="x", targets=["n1"])
            assert await a.loop.step() == 1  # claimed; its dispatch has not run yet
            pair.clock.advance(SETTINGS.lease)
            await a.run_until_idle()  # fenced: it starts nothing, and waits for the dispatch
            assert not a.loop.in_flight
            [back] = await a.runs(task.id)
            assert (back.state, back.attempts, back.undelivered) == (RunState.PENDING, 0, 1)
            assert "lease" in (back.error or "")
            assert pair.executor.calls == []

    run(main())


def test_a_cut_off_runners_late_result_is_dropped(caplog: Any) -> None:
    """a sends a command, then cannot reach the store for longer than its lease; b
    adopts the run. a's command ends and a tries to record it: refused (NotOwner), and
    dropped; b reads the outcome from the device's journal. a then finds its lease lost
    and starts again as a new runner."""
    hold = Hold("n1")
    pair = Pair("n1", "n2", handler=hold)
    caplog.set_level(logging.WARNING, "ghostrunner.loop")

    async def main() -> None:
        async with two(pair) as (a, b):
            old_id = a.runner.id
            task = await a.submit(command="once", targets=["n1"],
                                  delivery=Delivery.AT_MOST_ONCE)
            await a.loop.step()
            await hold.wait()
            key = RunKey(task.id, "n1")
            # a is cut off: no renewal for a whole lease; b renews
            for _ in range(4):
                pair.clock.advance(SETTINGS.heartbeat - 1)
                await b.loop.heartbeat()
            assert a.loop.fenced
            assert pair.owner(key) == b.runner.id
            hold.release.set()  # a's command ends; a records it (the store is back)
            await a.run_until_idle()  # fenced: starts nothing, waits for that dispatch
            assert "is dropped" in caplog.text
            [run_] = await b.runs(task.id)
            assert run_.state is RunState.DISPATCHED  # a's result did not count
            hold.held.clear()
            await b.run_until_idle()
            [done] = await b.runs(task.id)
            assert (done.state, done.recovered) == (RunState.SUCCEEDED, True)
            assert pair.executions()[key] == 1
            # a learns it lost its lease: a new runner, dispatching again
            await a.loop.heartbeat()
            assert a.runner.id != old_id and not a.loop.fenced
            other = await a.submit(command="later", targets=["n2"])
            await a.run_until_idle()
            assert [r.state for r in await a.runs(other.id)] == [RunState.SUCCEEDED]
            assert pair.owner(RunKey(other.id, "n2")) == a.runner.id

    run(main())


def test_a_graceful_stop_hands_what_it_left_over_at_once() -> None:
    hold = Hold("n1")
    pair = Pair("n1", handler=hold)

    async def main() -> None:
        async with pair.runner("b") as b:
            async with pair.runner("a") as a:
                task = await a.submit(command="long", targets=["n1"])
                await a.loop.step()
                await hold.wait()
            # a stopped: shutdown_grace passed, the command was abandoned, the lease ended
            key = RunKey(task.id, "n1")
            pair.clock.advance(SETTINGS.heartbeat)  # (b has been up for a while)
            await b.loop.heartbeat()  # no waiting for a's lease to run out
            assert pair.owner(key) == b.runner.id
            hold.held.clear()
            hold.release.set()
            await b.run_until_idle()
            [done] = await b.runs(task.id)
            assert (done.state, done.recovered) == (RunState.SUCCEEDED, True)

    run(main())


class Outage(SharedInMemoryStore):
    """The shared store, which can be made unreachable for renewals."""

    down = False

    async def renew(self, runner_id: str, lease: float) -> Any:
        if self.down:
            raise StoreError("the database is restarting")
        return await super().renew(runner_id, lease)


def test_after_an_outage_the_others_get_a_heartbeat_to_come_back() -> None:
    """Both runners lose the store for longer than a lease. The first back in touch
    does not declare the other dead at once: it waits a heartbeat, by which time the
    other has renewed too; nobody's runs change hands."""
    pair = Pair("n1")
    pair.store = Outage(pair.clock)

    async def main() -> None:
        async with two(pair) as (a, b):
            pair.clock.advance(SETTINGS.heartbeat)
            pair.store.down = True  # type: ignore[attr-defined]
            for gr in (a, b):
                with pytest.raises(StoreError):
                    await gr.loop.heartbeat()
            pair.clock.advance(SETTINGS.lease + 10)
            assert a.loop.fenced and b.loop.fenced
            pair.store.down = False  # type: ignore[attr-defined]
            await a.loop.heartbeat()  # a is back first: renewed, adopts nobody yet
            assert not a.loop.fenced
            status = {s.info.id: s.state for s in await a.runners()}
            assert status == {a.runner.id: LeaseState.ALIVE, b.runner.id: LeaseState.EXPIRED}
            pair.clock.advance(1)
            await b.loop.heartbeat()  # b renews within the heartbeat a gives it
            pair.clock.advance(SETTINGS.heartbeat)
            await a.loop.heartbeat()
            await b.loop.heartbeat()
            status = {s.info.id: s.state for s in await a.runners()}
            assert set(status.values()) == {LeaseState.ALIVE}
            assert a.loop.adopted == b.loop.adopted == 0

    run(main())


def test_a_tasks_rollout_limit_holds_over_both_runners() -> None:
    nodes = [f"n{i}" for i in range(1, 7)]
    hold = Hold(*nodes)
    pair = Pair(*nodes, handler=hold)

    async def main() -> None:
        async with two(pair) as (a, b):
            task = await a.submit(command="roll", targets=nodes,
                                  rollout={"max_concurrent": 2})
            await a.loop.step()
            await b.loop.step()  # b does not know the task's limit yet: the store does
            await hold.wait()
            for _ in range(3):
                await asyncio.sleep(0)
            assert len(pair.executor.busy) == 2
            assert sum(r.state is RunState.DISPATCHED for r in await a.runs(task.id)) == 2
            # b knows the limit now: the store holds the task back, and b does not offer
            # its runs again pass after pass (it goes idle; a goes on with the task)
            b.loop.hold((await b.get(task.id)).task)
            passes = b.loop.passes
            await b.run_until_idle()
            assert b.loop.passes - passes <= 3
            hold.release.set()
            hold.held.clear()
            await asyncio.gather(a.run_until_idle(), b.run_until_idle())
            await asyncio.gather(a.run_until_idle(), b.run_until_idle())
            assert {r.state for r in await a.runs(task.id)} == {RunState.SUCCEEDED}
            assert pair.executor.overlaps == []

    run(main())


def test_a_runner_adopting_back_its_own_old_run_while_that_command_still_runs() -> None:
    """Found by the state machine: a loses its lease while its command runs, registers
    again under a new id, and later adopts that very run back (from b, which took it
    over and died in turn). When the old command ends, its result (the old id's) must
    not disturb the run now held in recovery under the new id: the device is asked and
    the run ends with its real outcome."""
    hold = Hold("n1")
    pair = Pair("n1", handler=hold)

    async def main() -> None:
        async with two(pair) as (a, b):
            task = await a.submit(command="long", targets=["n1"])
            await a.loop.step()
            await hold.wait()
            pair.clock.advance(SETTINGS.lease + SETTINGS.adopt_grace + 1)  # nobody renews
            await b.loop.heartbeat()  # b renews first: buries a, takes the run
            await a.loop.heartbeat()  # a: lost; a new runner
            pair.clock.advance(SETTINGS.lease + SETTINGS.adopt_grace + 1)
            await a.loop.heartbeat()  # a renews first now: buries b, takes the run back
            key = RunKey(task.id, "n1")
            assert pair.owner(key) == a.runner.id
            assert a.loop.recovering == {"n1"} and a.loop.in_flight == {"n1"}
            hold.held.clear()
            hold.release.set()  # the old command ends: its result is the old id's
            await a.run_until_idle()
            [done] = await a.runs(task.id)
            assert (done.state, done.recovered) == (RunState.SUCCEEDED, True)
            assert pair.executions()[key] == 1

    run(main())

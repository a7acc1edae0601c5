"""Fleet targeting and rollouts through the facade and the loop, on both stores, with
the fake executor and a fake clock: selectors, continuous tasks, max_concurrent,
per_minute, the abort rule, pause/resume, retry and the attempt history."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ghostrunner import (
    Device,
    GhostRunner,
    LoopSettings,
    Outcome,
    RetryPolicy,
    RunRequest,
    RunState,
    SQLiteStore,
    Store,
    TaskStatus,
)
from ghostrunner.errors import ValidationError
from ghostrunner.testing import FakeClock, FakeExecutor, InMemoryStore

LIMIT = 10.0


def fleet() -> FakeExecutor:
    return FakeExecutor(devices=[
        Device(node_id="pi1", name="pi-1", group_name="pis", group_id="mesh//p",
               tags=("arm",), os="Raspbian", online=True),
        Device(node_id="pi2", name="pi-2", group_name="pis", group_id="mesh//p",
               tags=("arm",), os="Raspbian", online=False),
        Device(node_id="srv", name="srv-1", group_name="servers", group_id="mesh//s",
               tags=("x86",), os="Ubuntu", online=True),
    ])


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    path = tmp_path / "gr.db"

    def make() -> Store:
        return InMemoryStore() if request.param == "memory" else SQLiteStore(path)

    return make


class World:
    def __init__(self, store: Store, executor: FakeExecutor, clock: FakeClock) -> None:
        self.store, self.executor, self.clock = store, executor, clock

    @asynccontextmanager
    async def runner(self) -> AsyncIterator[GhostRunner]:
        settings = LoopSettings(retry=RetryPolicy(10.0, 80.0))
        async with GhostRunner(store=self.store, executor=self.executor, settings=settings,
                               clock=self.clock, background=False) as gr:
            yield gr


@pytest.fixture
def world(make_store: Callable[[], Store]) -> World:
    return World(make_store(), fleet(), FakeClock())


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, LIMIT))


def by_node(runs: Any) -> dict[str, RunState]:
    return {r.node_id: r.state for r in runs}


def test_a_selector_targets_matching_devices_online_or_not(world: World) -> None:
    async def main() -> None:
        async with world.runner() as gr:
            task = await gr.submit(command="upgrade", select={"group": "pis", "tags": ["ARM"]})
            assert task.targets == ()
            await gr.run_until_idle()
            assert by_node(await gr.runs(task.id)) == {
                "pi1": RunState.SUCCEEDED, "pi2": RunState.PENDING}
            world.executor.set_online("pi2")
            await gr.run_until_idle()
            assert by_node(await gr.runs(task.id)) == {
                "pi1": RunState.SUCCEEDED, "pi2": RunState.SUCCEEDED}
            # explicit targets and a selector together: targets first, no duplicate
            both = await gr.submit(command="x", targets=["pi2", "other"], select={"os": "rasp"})
            assert [r.node_id for r in await gr.runs(both.id)] == ["pi2", "other", "pi1"]

    run(main())


def test_a_snapshot_selector_matching_nothing_is_refused(world: World) -> None:
    async def main() -> None:
        async with world.runner() as gr:
            with pytest.raises(ValidationError) as err:
                await gr.submit(command="x", select={"tags": ["mips"]})
            assert err.value.field == "select"
            assert (await gr.list()).items == ()

    run(main())


def test_a_continuous_task_picks_up_devices_that_come_to_match(world: World) -> None:
    async def main() -> None:
        async with world.runner() as gr:
            task = await gr.submit(command="enroll", select={"tags": ["new"]}, continuous=True)
            await gr.run_until_idle()
            assert await gr.runs(task.id) == []  # accepted, waiting
            world.executor.update_device("srv", tags=("x86", "new"))  # tagged later
            world.executor.add_device(
                Device(node_id="d", name="d", tags=("new",), online=True))  # enrolled later
            await gr.run_until_idle()
            assert by_node(await gr.runs(task.id)) == {
                "srv": RunState.SUCCEEDED, "d": RunState.SUCCEEDED}
            # leaves the selection and comes back: never a second run
            world.executor.update_device("srv", tags=("x86",))
            await gr.run_until_idle()
            world.executor.update_device("srv", tags=("new",))
            await gr.run_until_idle()
            runs = await gr.runs(task.id)
            assert len(runs) == 2
            assert [r.attempts for r in runs] == [1, 1]
            assert len([c for c in world.executor.executions if c.node_id == "srv"]) == 1
            # cancelled: no more devices
            await gr.cancel(task.id)
            world.executor.update_device("pi1", tags=("new",))
            await gr.run_until_idle()
            assert len(await gr.runs(task.id)) == 2

    run(main())


def test_a_continuous_task_is_followed_after_a_restart(world: World) -> None:
    async def main() -> None:
        async with world.runner() as gr:
            task = await gr.submit(command="x", select={"tags": ["new"]}, continuous=True)
        world.executor.update_device("pi1", tags=("new",))  # while GhostRunner is down
        async with world.runner() as gr:
            await gr.run_until_idle()
            assert by_node(await gr.runs(task.id)) == {"pi1": RunState.SUCCEEDED}

    run(main())


def many(n: int, **fields: Any) -> FakeExecutor:
    return FakeExecutor(devices=[
        Device(node_id=f"n{i:02}", name=f"n{i:02}", tags=("all",), online=True, **fields)
        for i in range(n)
    ])


class Gate:
    """Holds commands until released, counting how many are held at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held: Counter[str] = Counter()  # by command
        self.most: Counter[str] = Counter()
        self._arrived = asyncio.Event()

    async def until(self, check: Callable[[], bool]) -> None:
        """Wait for commands to arrive until ``check()`` holds."""
        while not check():
            self._arrived.clear()
            await self._arrived.wait()

    async def __call__(self, request: RunRequest, device: Device) -> Outcome:
        self.held[request.command] += 1
        self._arrived.set()
        self.most[request.command] = max(self.most[request.command],
                                         self.held[request.command])
        try:
            await self.release.wait()
        finally:
            self.held[request.command] -= 1
        return Outcome(exit_code=0)


def test_max_concurrent_caps_the_runs_in_flight(make_store: Callable[[], Store]) -> None:
    gate = Gate()
    world = World(make_store(), many(8), FakeClock())
    world.executor.handler = gate

    async def main() -> None:
        async with world.runner() as gr:
            task = await gr.submit(command="x", select={"all": True},
                                   rollout={"max_concurrent": 3})
            other = await gr.submit(command="y", targets=["n00", "n01", "n02", "n03"])
            idle = asyncio.create_task(gr.run_until_idle())
            await gate.until(lambda: gate.held["x"] == 3)
            gate.release.set()
            await idle
            assert gate.most["x"] == 3
            assert set(by_node(await gr.runs(task.id)).values()) == {RunState.SUCCEEDED}
            assert set(by_node(await gr.runs(other.id)).values()) == {RunState.SUCCEEDED}

    run(main())


def test_max_concurrent_lets_other_tasks_use_held_devices(
    make_store: Callable[[], Store],
) -> None:
    """A device whose first run is held by its task's limit runs another task's run."""
    gate = Gate()
    world = World(make_store(), many(4), FakeClock())
    world.executor.handler = gate

    async def main() -> None:
        async with world.runner() as gr:
            await gr.submit(command="x", select={"all": True}, rollout={"max_concurrent": 1})
            later = await gr.submit(command="y", targets=["n00", "n01", "n02", "n03"])
            idle = asyncio.create_task(gr.run_until_idle())
            await gate.until(lambda: gate.held.total() == 4)  # 1 limited + 3 later
            assert gate.held["x"] == 1
            runs = await gr.runs(later.id)
            assert sum(r.state is RunState.DISPATCHED for r in runs) == 3
            gate.release.set()
            await idle

    run(main())


def test_per_minute_holds_the_rate(make_store: Callable[[], Store]) -> None:
    world = World(make_store(), many(10), FakeClock())

    async def main() -> None:
        async with world.runner() as gr:
            task = await gr.submit(command="x", select={"all": True},
                                   rollout={"per_minute": 3})
            await gr.run_until_idle()

            async def done() -> int:
                return sum(r.state is RunState.SUCCEEDED for r in await gr.runs(task.id))

            assert await done() == 3
            world.clock.advance(59)
            await gr.run_until_idle()
            assert await done() == 3
            world.clock.advance(1)
            await gr.run_until_idle()
            assert await done() == 6
        # a restart remembers the window
        world.clock.advance(30)
        async with world.runner() as gr:
            await gr.run_until_idle()
            assert await done() == 6
            world.clock.advance(30)
            await gr.run_until_idle()
            assert await done() == 9

    run(main())


def test_the_abort_rule_cancels_what_has_not_started(make_store: Callable[[], Store]) -> None:
    world = World(make_store(), many(10), FakeClock())
    world.executor.handler = lambda request, device: Outcome(exit_code=2)  # all fail

    async def main() -> None:
        async with world.runner() as gr:
            task = await gr.submit(
                command="x", select={"all": True},
                rollout={"max_concurrent": 1, "abort_failed_pct": 50, "abort_min_finished": 3},
            )
            await gr.run_until_idle()
            summary = await gr.get(task.id)
            assert summary.status is TaskStatus.ABORTED
            assert summary.aborted is not None and "3 of 3" in summary.aborted
            runs = await gr.runs(task.id)
            assert sum(r.state is RunState.FAILED for r in runs) == 3
            cancelled = [r for r in runs if r.state is RunState.CANCELLED]
            assert len(cancelled) == 7
            assert all(r.error == summary.aborted for r in cancelled)
            assert len(world.executor.executions) == 3  # nothing started after the abort
            # retry the cancelled ones: the task goes on (and aborts again)
            assert len(await gr.retry(task.id, ["cancelled"])) == 7
            assert (await gr.get(task.id)).aborted is None

    run(main())


def test_pause_and_resume(world: World) -> None:
    async def main() -> None:
        async with world.runner() as gr:
            task = await gr.submit(command="x", select={"tags": ["arm"]})
            later = await gr.submit(command="y", targets=["pi1"])
            await gr.pause(task.id)
            await gr.run_until_idle()
            assert (await gr.get(task.id)).status is TaskStatus.PAUSED
            assert by_node(await gr.runs(task.id)) == {
                "pi1": RunState.PENDING, "pi2": RunState.PENDING}
            # the device went on with the next task's run meanwhile
            assert by_node(await gr.runs(later.id)) == {"pi1": RunState.SUCCEEDED}
            await gr.resume(task.id)
            await gr.run_until_idle()
            assert by_node(await gr.runs(task.id))["pi1"] is RunState.SUCCEEDED

    run(main())


def test_retry_keeps_every_attempt(world: World) -> None:
    outcomes = iter([Outcome(exit_code=1, output="first"), Outcome(exit_code=0, output="ok")])
    world.executor.handler = lambda request, device: next(outcomes)

    async def main() -> None:
        async with world.runner() as gr:
            task = await gr.submit(command="x", targets=["pi1"])
            await gr.run_until_idle()
            assert by_node(await gr.runs(task.id)) == {"pi1": RunState.FAILED}
            with pytest.raises(ValidationError) as err:
                await gr.retry(task.id, ["succeeded"])
            assert err.value.field == "states[0]"
            assert [r.node_id for r in await gr.retry(task.id, ["failed"])] == ["pi1"]
            await gr.run_until_idle()
            [run_] = await gr.runs(task.id)
            assert (run_.state, run_.attempts, run_.output) == (RunState.SUCCEEDED, 2, "ok")
            history = (await gr.attempts(task.id))["pi1"]
            assert [(a.number, a.state, a.output) for a in history] == [
                (1, RunState.FAILED, "first"), (2, RunState.SUCCEEDED, "ok")]

    run(main())


def test_success_exit_codes(world: World) -> None:
    world.executor.handler = lambda request, device: Outcome(exit_code=3010)

    async def main() -> None:
        async with world.runner() as gr:
            ok = await gr.submit(command="x", targets=["pi1"], success_exit_codes=[0, 3010])
            plain = await gr.submit(command="x", targets=["srv"])
            await gr.run_until_idle()
            assert by_node(await gr.runs(ok.id)) == {"pi1": RunState.SUCCEEDED}
            assert by_node(await gr.runs(plain.id)) == {"srv": RunState.FAILED}

    run(main())

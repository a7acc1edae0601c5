"""``GhostRunner.events()`` and the feed behind it (``ghostrunner._feed``): stored events
then live ones, woken by this process's writes (no polling), a slow poll and a hook for
other processes' writes, one store query per change however many follow, filters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from ghostrunner import GhostRunner, LoopSettings, RunKey, RunState, Task, events
from ghostrunner._feed import EventFeed
from ghostrunner.events import Event
from ghostrunner.testing import FakeClock, FakeExecutor, InMemoryStore

T = TypeVar("T")
LIMIT = 5.0  # seconds: a safety net on every wait, never reached when things work
NEVER = 3600.0  # an events_poll that never comes within a test


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class CountingStore(InMemoryStore):
    """Counts the event log reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def events_after(self, after: int, limit: int = 1000) -> Any:
        self.reads += 1
        return await super().events_after(after, limit)


def runner(store: InMemoryStore, *, poll: float = NEVER, devices: tuple[str, ...] = ("a", "b"),
           ) -> tuple[GhostRunner, FakeExecutor]:
    executor = FakeExecutor(devices=devices)
    for node in devices:
        executor.set_online(node, False)
    gr = GhostRunner(store=store, executor=executor, clock=FakeClock(), background=False,
                     settings=LoopSettings(events_poll=poll))
    return gr, executor


async def take(stream: AsyncIterator[Event], n: int) -> list[Event]:
    async with asyncio.timeout(LIMIT):
        return [await anext(stream) for _ in range(n)]


def test_stored_events_then_live_ones_in_order() -> None:
    async def go() -> None:
        store = InMemoryStore()
        gr, executor = runner(store)
        async with gr:
            task = await gr.submit(Task(name="t", command="true", targets=["a"]))
            stream = gr.events(after=0)
            (created,) = await take(stream, 1)
            assert (created.kind, created.task_id) == (events.TASK_CREATED, task.id)
            executor.set_online("a")
            await gr.run_until_idle()
            claimed, finished = await take(stream, 2)
            assert [claimed.kind, finished.kind] == [events.RUN_CLAIMED, events.RUN_FINISHED]
            assert finished.node_id == "a" and finished.data["state"] == "succeeded"
            assert created.id < claimed.id < finished.id

    run(go())


def test_a_follower_from_now_is_woken_by_this_processs_writes_without_polling() -> None:
    async def go() -> None:
        store = CountingStore()
        gr, executor = runner(store)  # the poll never comes: only wake-ups can deliver
        async with gr:
            old = await gr.submit(Task(name="old", command="true", targets=["b"]))
            stream = gr.events()  # from now on: "old" is not in it
            pending = asyncio.ensure_future(take(stream, 3))
            await asyncio.sleep(0)  # the follower starts and waits
            task = await gr.submit(Task(name="t", command="true", targets=["a"]))
            executor.set_online("a")
            await gr.run_until_idle()
            got = await pending
            assert [(e.kind, e.task_id) for e in got] == [
                (events.TASK_CREATED, task.id), (events.RUN_CLAIMED, task.id),
                (events.RUN_FINISHED, task.id)]
            assert old.id not in {e.task_id for e in got}
            reads = store.reads
            await asyncio.sleep(0.05)  # nothing happens: nobody reads the store
            assert store.reads == reads

    run(go())


def test_many_followers_cost_one_query_per_change() -> None:
    async def go() -> None:
        store = CountingStore()
        gr, _ = runner(store)
        async with gr:
            streams = [gr.events() for _ in range(50)]
            waiting = [asyncio.ensure_future(take(s, 1)) for s in streams]
            await asyncio.sleep(0)
            before = store.reads
            task = await gr.submit(Task(name="t", command="true", targets=["a"]))
            got = await asyncio.gather(*waiting)
            assert {(e[0].kind, e[0].task_id) for e in got} == {(events.TASK_CREATED, task.id)}
            assert store.reads - before <= 2  # one refresh (and at most one more), not 50

    run(go())


def test_event_batches_hand_on_each_read_whole() -> None:
    async def go() -> None:
        store = CountingStore()
        gr, executor = runner(store)
        async with gr:
            batches = gr.event_batches(after=0)
            for i in range(3):  # written before the first read: one batch
                await gr.submit(Task(name=f"t{i}", command="true", targets=["b"]))
            async with asyncio.timeout(LIMIT):
                first = await anext(batches)
                assert [e.data["name"] for e in first] == ["t0", "t1", "t2"]
                waiting = asyncio.ensure_future(anext(batches))
                await asyncio.sleep(0)
                reads = store.reads
                task = await gr.submit(Task(name="t", command="true", targets=["a"]))
                executor.set_online("a")
                await gr.run_until_idle()
                got = [*await waiting]
                while len(got) < 3:
                    got += await anext(batches)
            assert [e.kind for e in got] == [
                events.TASK_CREATED, events.RUN_CLAIMED, events.RUN_FINISHED]
            assert {e.task_id for e in got} == {task.id}
            assert store.reads - reads <= 3  # one read per batch handed on
            await batches.aclose()

    run(go())


def test_other_processes_events_come_by_the_poll_or_the_wake_hook() -> None:
    async def go() -> None:
        store = InMemoryStore()
        gr, _ = runner(store, poll=0.05)
        async with gr:
            stream = gr.events()
            pending = asyncio.ensure_future(take(stream, 1))
            await asyncio.sleep(0)
            # written behind the facade's back, as another process sharing the database
            await store.add_task(Task(name="elsewhere", command="true", targets=["a"]),
                                 gr.clock())
            (event,) = await pending  # found by the slow poll
            assert event.data["name"] == "elsewhere"

        store2 = InMemoryStore()
        gr2, _ = runner(store2)  # no poll within the test: the hook must do it
        async with gr2:
            stream = gr2.events()
            pending = asyncio.ensure_future(take(stream, 1))
            await asyncio.sleep(0)
            await store2.add_task(Task(name="notified", command="true", targets=["a"]),
                                  gr2.clock())
            await asyncio.sleep(0.02)
            assert not pending.done()
            gr2.wake_events()  # what a LISTEN/NOTIFY handler would call
            (event,) = await pending
            assert event.data["name"] == "notified"

    run(go())


def test_filters_by_task_and_kind() -> None:
    async def go() -> None:
        store = InMemoryStore()
        gr, executor = runner(store)
        async with gr:
            one = await gr.submit(Task(name="one", command="true", targets=["a"]))
            two = await gr.submit(Task(name="two", command="true", targets=["b"]))
            executor.set_online("a")
            executor.set_online("b")
            await gr.run_until_idle()
            mine = await take(gr.events(0, task_id=two.id), 3)
            assert {e.task_id for e in mine} == {two.id}
            assert [e.kind for e in mine] == [
                events.TASK_CREATED, events.RUN_CLAIMED, events.RUN_FINISHED]
            done = await take(gr.events(0, kinds=[events.RUN_FINISHED]), 2)
            assert {e.task_id for e in done} == {one.id, two.id}
            assert {e.kind for e in done} == {events.RUN_FINISHED}

    run(go())


def test_a_cursor_beyond_the_newest_event_starts_from_the_oldest() -> None:
    async def go() -> None:
        store = InMemoryStore()
        gr, _ = runner(store)
        async with gr:
            task = await gr.submit(Task(name="t", command="true", targets=["a"]))
            (event,) = await take(gr.events(after=10_000), 1)  # the database was replaced
            assert (event.kind, event.task_id) == (events.TASK_CREATED, task.id)

    run(go())


def test_a_follower_far_behind_the_window_reads_the_store_in_order() -> None:
    async def go() -> None:
        store = CountingStore()
        clock = FakeClock()
        feed = EventFeed(store, poll_interval=NEVER, keep=10, batch=5)
        assert await feed.read(0) == []  # the window starts: at the newest event (none)
        for i in range(40):
            await store.add_task(Task(name=f"t{i}", command="true", targets=["a"]), clock())
        feed.wake()
        assert await feed.read(0) == list(await store.events_after(0, 5))  # from the store
        assert len(feed._window) == 10  # bounded, though 40 were read
        got = await take(feed.follow(after=0), 40)
        assert [e.data["name"] for e in got] == [f"t{i}" for i in range(40)]
        # the newest are served from the window: no store read for them
        reads = store.reads
        assert [e.data["name"] for e in await feed.read(35)] == [f"t{i}" for i in range(35, 40)]
        assert store.reads == reads

    run(go())


def test_runs_of_a_task_and_the_event_stream_agree() -> None:
    """The stream tells the same story as the store: each run's last run-level event
    carries its state."""
    async def go() -> None:
        store = InMemoryStore()
        gr, executor = runner(store, devices=("a", "b", "c"))
        async with gr:
            task = await gr.submit(Task(name="t", command="true", targets=["a", "b", "c"]))
            executor.set_online("a")
            await gr.run_until_idle()
            await gr.cancel(task.id, ["b"])
            got = list(await store.events_after(0, 100))
            last: dict[str, str] = {}
            for event in got:
                if event.node_id is not None:
                    last[event.node_id] = event.data["state"]
                if event.kind == events.RUNS_CANCELLED:
                    last.update(dict.fromkeys(event.data["nodes"], "cancelled"))
            runs = {r.node_id: r.state.value for r in await gr.runs(task.id)}
            assert last == {n: s for n, s in runs.items() if s != RunState.PENDING.value}
            assert RunKey(task.id, "c") in store.runs

    run(go())

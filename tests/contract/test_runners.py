"""The Leases and Signals capabilities (ghostrunner.runners), store by store.

Every test taking ``shared`` runs on the reference (``SharedInMemoryStore``, its clock a
FakeClock) and on ``PostgresStore`` (a fresh database of the session's PostgreSQL).
Leases are counted by the store's clock; ``shared.advance(seconds)`` moves it: the
FakeClock, or, on PostgreSQL, every lease time in the ``runners`` table back by that
much (the database's own clock cannot be moved; nothing is slept). The tests at the
end are PostgreSQL only: concurrent adoptions on separate connection pools, and the
LISTEN/NOTIFY signals (a connection killed with pg_terminate_backend, and restored).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from ghostrunner._types import Outcome, RunKey, RunState
from ghostrunner.errors import IllegalTransition, NotOwner
from ghostrunner.postgres import PostgresStore
from ghostrunner.runners import Leases, LeaseState, RunnerInfo, Signal, Signals
from ghostrunner.testing import FakeClock, SharedInMemoryStore
from tests.contract.test_store_contract import NOW, add, at
from tests.pg import PgServer

LEASE = 15.0
GRACE = 0.5


class Shared:
    """A store with leases, and how to move its clock."""

    def __init__(self, store: Any, clock: FakeClock | None) -> None:
        self.store = store
        self.clock = clock
        self.started = 0

    async def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
            return
        async with self.store.connection() as conn:
            await conn.execute(
                "UPDATE runners SET expires_at = expires_at - make_interval(secs => %(s)s), "
                "heartbeat_at = heartbeat_at - make_interval(secs => %(s)s), "
                "ended_at = ended_at - make_interval(secs => %(s)s)", {"s": seconds})

    async def register(self, name: str) -> RunnerInfo:
        self.started += 1
        info = RunnerInfo(name=name, version="test", started_at=at(self.started))
        await self.store.register(info, LEASE)
        return info


@pytest.fixture(params=["memory", "postgres"])
def shared(request: pytest.FixtureRequest, runner: asyncio.Runner) -> Iterator[Shared]:
    if request.param == "memory":
        clock = FakeClock(NOW)
        yield Shared(SharedInMemoryStore(clock), clock)
        return
    server: PgServer = request.getfixturevalue("postgres")
    dsn = server.database()
    store = PostgresStore(dsn, max_size=4)
    runner.run(store.open())
    yield Shared(store, None)
    runner.run(store.close())
    server.drop(dsn)


async def owned_by(shared: Shared, runner_id: str) -> int:
    return next(s.runs for s in await shared.store.runners() if s.info.id == runner_id)


# --------------------------------------------------------------------------- leases


async def test_a_registered_runner_is_alive_and_renews(shared: Shared) -> None:
    store = shared.store
    assert isinstance(store, Leases)
    a = await shared.register("host-a:1")
    [status] = await store.runners()
    assert status.info == a
    assert (status.state, status.runs, status.adopted_by) == (LeaseState.ALIVE, 0, None)
    assert 0 <= status.heartbeat_age < 1
    b = await shared.register("host-b:2")
    renewal = await store.renew(a.id, LEASE)
    assert (renewal.held, renewal.peers) == (True, 1)
    await shared.advance(LEASE + 1)  # b missed its renewals; a renews now
    assert (await store.renew(a.id, LEASE)).peers == 0
    states = {s.info.id: s.state for s in await store.runners()}
    assert states == {a.id: LeaseState.ALIVE, b.id: LeaseState.EXPIRED}
    assert [s.info.id for s in await store.runners()] == [a.id, b.id]  # by start


async def test_a_lease_past_its_end_is_renewed_until_someone_adopts(shared: Shared) -> None:
    store = shared.store
    a = await shared.register("a")
    b = await shared.register("b")
    task = await add(store, "node//x")
    await store.claim_many([RunKey(task.id, "node//x")], NOW, runner=a.id)
    await shared.advance(LEASE + GRACE / 2)
    await store.renew(b.id, LEASE)
    # a's lease ended, but the grace has not: nobody takes its run yet
    assert (await store.adopt(b.id, GRACE)).runs == []
    renewal = await store.renew(a.id, LEASE)  # a comes back in time
    assert renewal.held
    await shared.advance(LEASE / 2)
    assert (await store.adopt(b.id, GRACE)).runs == []
    assert await owned_by(shared, a.id) == 1


async def test_a_survivor_adopts_the_runs_of_a_dead_runner(shared: Shared) -> None:
    store = shared.store
    a = await shared.register("a")
    b = await shared.register("b")
    one = await add(store, "node//1", "node//2")
    two = await add(store, "node//3")
    claimed = await store.claim_many(
        [RunKey(one.id, "node//1"), RunKey(one.id, "node//2"), RunKey(two.id, "node//3")],
        NOW, runner=a.id)
    await store.finish(RunKey(one.id, "node//2"), RunState.SUCCEEDED, at(1), runner=a.id)
    await store.claim_many([], NOW, runner=b.id)
    adoption = await store.adopt(b.id, GRACE)
    assert (adoption.runs, adoption.runners, adoption.peers) == ([], [], 1)
    assert adoption.next_in is not None and LEASE - 1 < adoption.next_in <= LEASE + GRACE
    await shared.advance(LEASE + GRACE + 0.1)
    await store.renew(b.id, LEASE)
    adoption = await store.adopt(b.id, GRACE)
    assert adoption.runners == [a.id]
    # the runs still dispatched, as stored (the finished one is not a's business now)
    assert {r.key for r in adoption.runs} == {RunKey(one.id, "node//1"), RunKey(two.id, "node//3")}
    assert {r.key: r for r in adoption.runs} == {
        r.key: r for r, _ in claimed if r.node_id != "node//2"}
    assert (adoption.next_in, adoption.peers) == (None, 0)
    status = {s.info.id: s for s in await store.runners()}
    assert (status[a.id].state, status[a.id].adopted_by, status[a.id].runs) == (
        LeaseState.ADOPTED, b.id, 0)
    assert status[b.id].runs == 2
    # taken once: the next adoption finds nothing, and a is dead for good
    assert (await store.adopt(b.id, GRACE)).runs == []
    assert not (await store.renew(a.id, LEASE)).held


async def test_only_the_owner_records_a_runs_end(shared: Shared) -> None:
    store = shared.store
    a = await shared.register("a")
    b = await shared.register("b")
    task = await add(store, "node//1", "node//2", "node//3")
    keys = [RunKey(task.id, n) for n in ("node//1", "node//2", "node//3")]
    await store.claim_many(keys, NOW, runner=a.id)
    await shared.advance(LEASE + GRACE + 1)
    await store.renew(b.id, LEASE)
    assert len((await store.adopt(b.id, GRACE)).runs) == 3
    before = {r.key: r for r in await store.get_runs(task.id)}
    # a's late results: refused, nothing changed, no attempt recorded
    with pytest.raises(NotOwner):
        await store.finish(keys[0], RunState.SUCCEEDED, at(2), runner=a.id,
                           outcome=Outcome(exit_code=0, output="late"))
    with pytest.raises(NotOwner):
        await store.release(keys[1], at(2), available_at=at(2), error="x", delivered=True,
                            runner=a.id)
    with pytest.raises(NotOwner):
        await store.release(keys[2], at(2), available_at=at(2), error="x", delivered=False,
                            runner=a.id)
    assert {r.key: r for r in await store.get_runs(task.id)} == before
    assert await store.attempts(task.id) == {}
    # the owner's are recorded
    done = await store.finish(keys[0], RunState.FAILED, at(3), runner=b.id,
                              outcome=Outcome(exit_code=3, output="real", recovered=True))
    assert (done.state, done.exit_code, done.recovered) == (RunState.FAILED, 3, True)
    back = await store.release(keys[1], at(3), available_at=at(9), error="again",
                               delivered=True, runner=b.id)
    assert back.state is RunState.PENDING
    # a run no longer dispatched: the usual refusal, whoever asks
    with pytest.raises(IllegalTransition) as info:
        await store.finish(keys[0], RunState.SUCCEEDED, at(4), runner=b.id)
    assert not isinstance(info.value, NotOwner)
    # without runner (tools, tests): unconditional, as Store says
    await store.finish(keys[2], RunState.SUCCEEDED, at(5))


async def test_a_runner_that_stopped_is_adopted_at_once(shared: Shared) -> None:
    store = shared.store
    a = await shared.register("a")
    b = await shared.register("b")
    task = await add(store, "node//1")
    await store.claim_many([RunKey(task.id, "node//1")], NOW, runner=a.id)
    await store.retire(a.id)
    assert not (await store.renew(a.id, LEASE)).held
    adoption = await store.adopt(b.id, GRACE)  # no waiting for a lease or a grace
    assert ([r.key for r in adoption.runs], adoption.runners) == (
        [RunKey(task.id, "node//1")], [a.id])
    status = {s.info.id: s for s in await store.runners()}
    assert status[a.id].state is LeaseState.STOPPED


async def test_runs_dispatched_without_a_runner_are_adopted_at_once(shared: Shared) -> None:
    """Runs claimed before runners were recorded (an older version, db migrate)."""
    store = shared.store
    task = await add(store, "node//1", "node//2")
    await store.claim_many([RunKey(task.id, "node//1")], NOW)
    b = await shared.register("b")
    adoption = await store.adopt(b.id, GRACE)
    assert [r.key for r in adoption.runs] == [RunKey(task.id, "node//1")]
    assert adoption.runners == []
    assert await owned_by(shared, b.id) == 1


async def test_a_claim_a_dead_runner_made_too_late_is_adopted(shared: Shared) -> None:
    """A runner that kept claiming after it was declared dead (its clock far off): the
    next adoption takes those runs too, whoever declared it dead."""
    store = shared.store
    a = await shared.register("a")
    b = await shared.register("b")
    await shared.advance(LEASE + GRACE + 1)
    await store.renew(b.id, LEASE)
    assert (await store.adopt(b.id, GRACE)).runners == [a.id]
    task = await add(store, "node//1")
    await store.claim_many([RunKey(task.id, "node//1")], NOW, runner=a.id)
    adoption = await store.adopt(b.id, GRACE)
    assert ([r.key for r in adoption.runs], adoption.runners) == (
        [RunKey(task.id, "node//1")], [])


async def test_next_pending_leaves_out_busy_devices(shared: Shared) -> None:
    """A shared store: a device with a run dispatched (by anyone) is busy elsewhere."""
    store = shared.store
    a = await shared.register("a")
    first = await add(store, "node//1", "node//2")
    second = await add(store, "node//1")
    await store.claim_many([RunKey(first.id, "node//1")], NOW, runner=a.id)
    got = await store.next_pending(["node//1", "node//2"], NOW)
    assert [(r.task_id, r.node_id) for r in got] == [(first.id, "node//2")]
    # and a claim of it is left out
    assert await store.claim_many([RunKey(second.id, "node//1")], NOW) == []
    await store.finish(RunKey(first.id, "node//1"), RunState.SUCCEEDED, at(1), runner=a.id)
    got = await store.next_pending(["node//1"], at(1))
    assert [(r.task_id, r.node_id) for r in got] == [(second.id, "node//1")]


async def test_rollout_limits_hold_over_every_runner(shared: Shared) -> None:
    """Each runner holds its own claims to a task's limits; a shared store holds them
    all together: max_concurrent counts the runs dispatched by anyone, per_minute the
    starts by anyone."""
    store = shared.store
    a = await shared.register("a")
    b = await shared.register("b")
    nodes = [f"node//{i}" for i in range(6)]
    capped = await add(store, *nodes, rollout={"max_concurrent": 2})
    keys = [RunKey(capped.id, n) for n in nodes]
    assert len(await store.claim_many(keys[:1], NOW, runner=a.id)) == 1
    got = await store.claim_many(keys[1:4], NOW, runner=b.id)
    assert [r.key for r, _ in got] == [keys[1]]  # the first, in key order
    assert await store.claim_many(keys[4:], NOW, runner=a.id) == []
    await store.finish(keys[0], RunState.SUCCEEDED, at(1), runner=a.id)
    assert [r.key for r, _ in await store.claim_many(keys[2:], at(1), runner=a.id)] == [
        keys[2]]
    # a task without limits beside it is not held back
    free = await add(store, "node//x", "node//y")
    got = await store.claim_many([RunKey(free.id, "node//x"), keys[3],
                                  RunKey(free.id, "node//y")], at(1), runner=b.id)
    assert {r.key.task_id for r, _ in got} == {free.id}
    rated = await add(store, *(f"rate//{i}" for i in range(4)), rollout={"per_minute": 2})
    rkeys = [RunKey(rated.id, f"rate//{i}") for i in range(4)]
    assert len(await store.claim_many(rkeys[:1], at(10), runner=a.id)) == 1
    assert len(await store.claim_many(rkeys[1:], at(20), runner=b.id)) == 1
    for key in rkeys[:2]:
        await store.finish(key, RunState.SUCCEEDED, at(25))
    assert await store.claim_many(rkeys[2:], at(69), runner=a.id) == []  # both count
    got = await store.claim_many(rkeys[2:], at(70.5), runner=a.id)  # the first freed
    assert [r.key for r, _ in got] == [rkeys[2]]


# --------------------------------------------------------------------------- PostgreSQL only


@contextlib.asynccontextmanager
async def stores(dsn: str, n: int) -> AsyncIterator[list[PostgresStore]]:
    """``n`` stores on the database ``dsn``, as ``n`` processes would have."""
    opened = [PostgresStore(dsn, max_size=4, listen_check=0.5) for _ in range(n)]
    try:
        for s in opened:
            await s.open()
        yield opened
    finally:
        for s in opened:
            await s.close()


async def test_concurrent_adoptions_never_both_get_a_run(pg_store: PostgresStore) -> None:
    """Three survivors, each with its own connection pool, adopt at once the runs of
    four dead runners (and runs without a runner), again and again: every run is
    adopted exactly once, every dead runner declared dead once."""
    shared = Shared(pg_store, None)
    async with stores(pg_store._dsn, 3) as survivors:
        for round_ in range(5):
            dead = [await shared.register(f"dead-{round_}-{i}") for i in range(4)]
            nodes = [f"node//{round_}-{i}" for i in range(40)]
            task = await add(pg_store, *nodes)
            keys = [RunKey(task.id, n) for n in nodes]
            for i, runner in enumerate([*dead, None]):
                await pg_store.claim_many(keys[i::5], NOW,
                                          runner=None if runner is None else runner.id)
            alive = [await shared.register(f"alive-{round_}-{i}") for i in range(3)]
            await shared.advance(LEASE + GRACE + 1)
            for info in alive:
                await pg_store.renew(info.id, LEASE)
            adoptions = await asyncio.gather(*(
                s.adopt(info.id, GRACE) for s, info in zip(survivors, alive, strict=True)))
            taken = Counter(r.key for a in adoptions for r in a.runs)
            assert set(taken) == set(keys) and set(taken.values()) == {1}, round_
            buried = Counter(rid for a in adoptions for rid in a.runners)
            # (and the last round's survivors, stopped)
            assert {d.id for d in dead} <= set(buried) and set(buried.values()) == {1}
            owners = {s.info.id: s.runs for s in await pg_store.runners()}
            assert sum(owners[info.id] for info in alive) == len(keys)
            for info in alive:  # the next round's survivors are new runners
                await pg_store.retire(info.id)
            await pg_store.adopt(alive[0].id, GRACE)
            for key in keys:
                await pg_store.finish(key, RunState.SUCCEEDED, at(1))


async def test_a_late_finish_races_an_adoption(pg_store: PostgresStore) -> None:
    """A runner finishing runs while a survivor adopts them: each run ends up either
    finished by its first owner or adopted (still dispatched), never both, never
    neither."""
    shared = Shared(pg_store, None)
    async with stores(pg_store._dsn, 1) as (other,):
        a = await shared.register("late")
        b = await shared.register("survivor")
        nodes = [f"node//{i}" for i in range(60)]
        task = await add(pg_store, *nodes)
        keys = [RunKey(task.id, n) for n in nodes]
        await pg_store.claim_many(keys, NOW, runner=a.id)
        await shared.advance(LEASE + GRACE + 1)
        await other.renew(b.id, LEASE)

        async def finish(key: RunKey) -> bool:
            try:
                await pg_store.finish(key, RunState.SUCCEEDED, at(1), runner=a.id)
            except NotOwner:
                return False
            return True

        results = await asyncio.gather(other.adopt(b.id, GRACE), *(finish(k) for k in keys))
        adoption, finished = results[0], results[1:]
        adopted = {r.key for r in adoption.runs}
        for key, done in zip(keys, finished, strict=True):
            assert done != (key in adopted), key
        runs = {r.key: r for r in await pg_store.get_runs(task.id)}
        assert {k for k, r in runs.items() if r.state is RunState.DISPATCHED} == adopted
        assert {k for k, r in runs.items() if r.state is RunState.SUCCEEDED} == {
            k for k, done in zip(keys, finished, strict=True) if done}


async def next_signal(stream: AsyncIterator[Signal], kind: str = "runs",
                      timeout: float = 10.0) -> Signal:
    async with asyncio.timeout(timeout):
        async for signal in stream:
            if signal.kind == kind:
                return signal
    raise AssertionError("the stream ended")


async def test_signals_reach_the_other_processes(pg_store: PostgresStore) -> None:
    async with stores(pg_store._dsn, 1) as (other,):
        assert isinstance(other, Signals)
        async with contextlib.aclosing(other.signals()) as stream:
            assert await next_signal(stream) == Signal(kind="runs")  # connected: resync
            task = await add(pg_store, "node//a", "node//b")
            assert await next_signal(stream) == Signal(kind="runs",
                                                       nodes=("node//a", "node//b"))
            many = await add(pg_store, *(f"node//{i}" for i in range(100)))
            assert await next_signal(stream) == Signal(kind="runs", nodes=None)
            await pg_store.signal("events", ["x"])
            assert await next_signal(stream, "events") == Signal(kind="events", nodes=("x",))
            # its own signals do not come back to it
            await other.signal("mine")
            await pg_store.signal("theirs")
            assert await next_signal(stream, "theirs") == Signal(kind="theirs")
            # a device freed wakes the others only if it has more work
            a = await Shared(pg_store, None).register("a")
            await pg_store.claim_many([RunKey(task.id, "node//a")], NOW, runner=a.id)
            await pg_store.finish(RunKey(task.id, "node//a"), RunState.SUCCEEDED, at(1),
                                  runner=a.id)
            await pg_store.claim_many([RunKey(many.id, "node//0")], NOW, runner=a.id)
            second = await add(pg_store, "node//0")
            assert await next_signal(stream) == Signal(kind="runs", nodes=("node//0",))
            await pg_store.finish(RunKey(many.id, "node//0"), RunState.SUCCEEDED, at(1),
                                  runner=a.id)
            assert await next_signal(stream) == Signal(kind="runs", nodes=("node//0",))
            assert second.id  # (the run that made the finish worth a signal)
            await pg_store.signal("end")
            assert await next_signal(stream, "end") == Signal(kind="end")


async def test_the_listener_reconnects(pg_store: PostgresStore, caplog: Any) -> None:
    async with (stores(pg_store._dsn, 1) as (other,),
                contextlib.aclosing(other.signals()) as stream):
        assert await next_signal(stream) == Signal(kind="runs")
        async with pg_store.connection() as conn:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN %%' AND pid <> pg_backend_pid()")
        # back, and says it may have missed something
        assert await next_signal(stream) == Signal(kind="runs")
        await pg_store.signal("after")
        assert await next_signal(stream, "after") == Signal(kind="after")
    assert "reconnecting" in caplog.text

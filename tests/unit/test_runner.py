"""The GhostRunner facade over the fakes: InMemoryStore, FakeExecutor, FakeClock.

Most tests use ``background=False`` and drive the loop with ``run_until_idle()``;
time only moves when a test advances the FakeClock. Nothing synchronises by sleeping:
commands held in flight wait on an ``asyncio.Event`` the test controls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine, Sequence
from datetime import datetime, timedelta
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
    Task,
    TaskQuery,
    TaskStatus,
)
from ghostrunner._types import utcnow
from ghostrunner.errors import (
    Conflict,
    NotDelivered,
    NotFound,
    OutcomeUnknown,
    PermanentError,
    StoreError,
    ValidationError,
)
from ghostrunner.testing import FakeClock, FakeExecutor, InMemoryStore, ReplyLost, crash

T = TypeVar("T")
LIMIT = 5.0  # seconds: a safety net on every wait, never reached when things work


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Env:
    """One GhostRunner over the fakes, with handles on all of them."""

    def __init__(
        self,
        *,
        devices: tuple[str, ...] = ("a", "b", "c"),
        handler: Any = None,
        store: InMemoryStore | None = None,
        executor: FakeExecutor | None = None,
        clock: FakeClock | None = None,
        real_clock: bool = False,
        settings: LoopSettings | None = None,
        background: bool = False,
    ) -> None:
        self.store = store or InMemoryStore()
        self.executor = executor or FakeExecutor(handler, devices=devices)
        self.clock = clock or FakeClock()
        self.settings = settings or LoopSettings(retry=RetryPolicy(10.0, 80.0))
        self.gr = GhostRunner(
            store=self.store,
            executor=self.executor,
            settings=self.settings,
            clock=utcnow if real_clock else self.clock,
            background=background,
        )

    def restart(self, **changes: Any) -> Env:
        """A new GhostRunner over the same store, executor and clock."""
        kwargs: dict[str, Any] = {
            "store": self.store,
            "executor": self.executor,
            "clock": self.clock,
            "settings": self.settings,
        }
        kwargs.update(changes)
        return Env(**kwargs)


@contextlib.asynccontextmanager
async def started(env: Env) -> AsyncIterator[GhostRunner]:
    async with env.gr as gr:
        yield gr


class Gate:
    """A handler that holds every command until released; tells when they arrive."""

    def __init__(self, outcome: Outcome | None = None, *, only: str | None = None) -> None:
        self.release = asyncio.Event()
        self.arrived: list[RunRequest] = []
        self._arrival = asyncio.Event()
        self.outcome = outcome or Outcome(exit_code=0, output="done")
        self.only = only  # hold only this command; let the others run at once

    async def __call__(self, request: RunRequest, device: Device) -> Outcome:
        if self.only is not None and request.command != self.only:
            return self.outcome
        self.arrived.append(request)
        self._arrival.set()
        await self.release.wait()
        return self.outcome

    async def wait_for(self, n: int) -> None:
        """Until ``n`` commands arrived in total."""

        async def until() -> None:
            while len(self.arrived) < n:
                self._arrival.clear()
                await self._arrival.wait()

        await asyncio.wait_for(until(), LIMIT)


def states(runs: Any) -> list[RunState]:
    return [r.state for r in runs]


# --------------------------------------------------------------------------- basics


async def crash_mid_flight(gr: GhostRunner, gate: Gate) -> None:
    """Run the loop until the gate holds one command in flight, then crash it."""
    idle = asyncio.create_task(gr.run_until_idle())
    await gate.wait_for(1)
    await crash(gr)
    await asyncio.wait_for(idle, LIMIT)

def test_offline_device_stays_pending() -> None:
    env = Env()

    async def main() -> None:
        async with started(env) as gr:
            task = await gr.submit(command="uptime", targets=["a"])
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.state is RunState.PENDING
            assert r.attempts == 0
            assert env.executor.calls == []
            assert (await gr.get(task.id)).status is TaskStatus.PENDING

    run(main())


def test_device_coming_online_runs_the_command() -> None:
    env = Env()

    async def main() -> None:
        async with started(env) as gr:
            task = await gr.submit(command="uptime", targets=["a"])
            await gr.run_until_idle()
            env.clock.advance(5)
            env.executor.set_online("a")
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.state is RunState.SUCCEEDED
            assert r.exit_code == 0
            assert r.output == "uptime\n"
            assert not r.output_truncated
            assert r.attempts == 1
            assert r.undelivered == 0
            assert r.started_at == env.clock.now
            assert r.finished_at == env.clock.now
            assert r.queued_at == env.clock.now - timedelta(seconds=5)
            assert r.error is None
            assert [c.command for c in env.executor.calls] == ["uptime"]
            summary = await gr.get(task.id)
            assert summary.status is TaskStatus.SUCCEEDED
            assert summary.counts == {RunState.SUCCEEDED: 1}

    run(main())


def test_submit_forms() -> None:
    env = Env()

    async def main() -> None:
        async with started(env) as gr:
            made = await gr.submit(command="echo hi", targets=["a", "b"])
            assert made.name == "echo hi"
            assert made.targets == ("a", "b")
            given = Task(name="n", command="c", targets=["a"])
            assert await gr.submit(given) is given
            with pytest.raises(TypeError):
                await gr.submit(given, command="x")
            with pytest.raises(Conflict):
                await gr.submit(given)
            with pytest.raises(ValidationError) as info:
                await gr.submit(command="x", targets="a")
            assert info.value.field == "targets"
            assert len(env.store.runs) == 3
            assert set(env.store.tasks) == {made.id, given.id}

    run(main())


def test_lifecycle_opens_and_closes_backends() -> None:
    env = Env()

    async def main() -> None:
        async with started(env):
            assert env.store.opened == 1
            assert env.executor.opened
            assert env.store.closed == 0
        assert env.store.closed == 1
        assert not env.executor.opened

    run(main())


def test_devices_and_counts() -> None:
    env = Env()

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("b")
            assert gr.devices()["b"].online
            assert not gr.devices()["a"].online
            await gr.submit(command="x", targets=["a", "b"])
            await gr.run_until_idle()
            assert await gr.counts() == {RunState.PENDING: 1, RunState.SUCCEEDED: 1}

    run(main())


# --------------------------------------------------------------------------- outcomes


@pytest.mark.parametrize(
    ("outcome", "state", "exit_code"),
    [
        (Outcome(exit_code=3, output="boom"), RunState.FAILED, 3),
        (Outcome(exit_code=None, output="partial", timed_out=True), RunState.TIMED_OUT, None),
        (Outcome(exit_code=0, output="fine"), RunState.SUCCEEDED, 0),
    ],
)
def test_outcome_is_recorded(outcome: Outcome, state: RunState, exit_code: int | None) -> None:
    env = Env(handler=lambda req, dev: outcome)

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(command="x", targets=["a"])
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.state is state
            assert r.exit_code == exit_code
            assert r.output == outcome.output
            assert r.attempts == 1
            # the outcome is final: nothing more happens, whatever the clock says
            env.clock.advance(3600)
            await gr.run_until_idle()
            assert await gr.runs(task.id) == [r]
            assert len(env.executor.calls) == 1

    run(main())


def test_permanent_error_fails_the_run() -> None:
    def handler(req: RunRequest, dev: Device) -> Outcome:
        raise PermanentError("access denied")

    env = Env(handler=handler)

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(command="x", targets=["a"], delivery="at_least_once")
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.state is RunState.FAILED
            assert r.error == "access denied"
            assert r.exit_code is None
            env.clock.advance(3600)
            await gr.run_until_idle()
            assert len(env.executor.calls) == 1

    run(main())


def test_executor_bug_counts_as_unknown_outcome() -> None:
    def handler(req: RunRequest, dev: Device) -> Outcome:
        raise RuntimeError("bug in the executor")

    env = Env(handler=handler)

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            env.executor.set_online("b")
            t1 = await gr.submit(command="x", targets=["a"])
            t2 = await gr.submit(command="y", targets=["a", "b"])
            await gr.run_until_idle()
            # the loop survived and went on with the next runs
            assert states(await gr.runs(t1.id)) == [RunState.LOST]
            assert states(await gr.runs(t2.id)) == [RunState.LOST, RunState.LOST]
            (r,) = await gr.runs(t1.id)
            assert r.error is not None
            assert "bug in the executor" in r.error

    run(main())


def test_output_over_the_cap_keeps_head_and_tail() -> None:
    head, tail = "H" * 500, "T" * 500
    env = Env(
        handler=lambda req, dev: Outcome(exit_code=0, output=head + "middle" + tail),
        settings=LoopSettings(output_limit=100),
    )

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(command="x", targets=["a"])
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.output_truncated
            assert r.output.startswith("H" * 50)
            assert r.output.endswith("T" * 50)
            assert "middle" not in r.output
            assert "906 characters cut" in r.output
            assert len(r.output) < 200

    run(main())


def test_output_at_the_cap_is_kept_whole() -> None:
    text = "x" * 100
    env = Env(
        handler=lambda req, dev: Outcome(exit_code=0, output=text),
        settings=LoopSettings(output_limit=100),
    )

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(command="x", targets=["a"])
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.output == text
            assert not r.output_truncated

    run(main())


# --------------------------------------------------------------------------- ordering & caps


def test_runs_of_one_device_go_in_submission_order() -> None:
    env = Env()

    async def main() -> None:
        async with started(env) as gr:
            first = await gr.submit(command="first", targets=["a", "b"])
            second = await gr.submit(command="second", targets=["b", "a"])
            third = await gr.submit(command="third", targets=["a"])
            await gr.run_until_idle()
            env.executor.set_online("a")
            env.executor.set_online("b")
            await gr.run_until_idle()
            by_node: dict[str, list[str]] = {}
            for call in env.executor.calls:
                by_node.setdefault(call.node_id, []).append(call.command)
            assert by_node == {"a": ["first", "second", "third"], "b": ["first", "second"]}
            for t in (first, second, third):
                assert (await gr.get(t.id)).status is TaskStatus.SUCCEEDED
            assert env.executor.overlaps == []
            assert env.executor.offline_calls == []

    run(main())


def test_max_in_flight_is_respected() -> None:
    nodes = tuple(f"n{i}" for i in range(5))
    gate = Gate()
    most_busy = 0

    async def handler(req: RunRequest, dev: Device) -> Outcome:
        nonlocal most_busy
        most_busy = max(most_busy, len(env.executor.busy))
        return await gate(req, dev)

    env = Env(devices=nodes, handler=handler, settings=LoopSettings(max_in_flight=2))

    async def main() -> None:
        async with started(env) as gr:
            for node in nodes:
                env.executor.set_online(node)
            task = await gr.submit(command="x", targets=list(nodes))
            idle = asyncio.create_task(gr.run_until_idle())
            await gate.wait_for(2)
            # let everything that could run, run: the loop is waiting on the two
            for _ in range(20):
                await asyncio.sleep(0)
            assert len(env.executor.busy) == 2
            assert len(gr.loop.in_flight) == 2
            assert len(gate.arrived) == 2
            assert sorted(states(await gr.runs(task.id))).count(RunState.DISPATCHED) == 2
            gate.release.set()
            await asyncio.wait_for(idle, LIMIT)
            assert states(await gr.runs(task.id)) == [RunState.SUCCEEDED] * 5
            assert most_busy == 2
            assert env.executor.overlaps == []

    run(main())


def test_one_command_in_flight_per_device() -> None:
    gate = Gate()
    env = Env(handler=gate)

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            t1 = await gr.submit(command="one", targets=["a"])
            t2 = await gr.submit(command="two", targets=["a"])
            idle = asyncio.create_task(gr.run_until_idle())
            await gate.wait_for(1)
            for _ in range(20):
                await asyncio.sleep(0)
            assert [r.command for r in gate.arrived] == ["one"]
            assert states(await gr.runs(t2.id)) == [RunState.PENDING]
            gate.release.set()
            await asyncio.wait_for(idle, LIMIT)
            assert [r.command for r in gate.arrived] == ["one", "two"]
            assert states(await gr.runs(t1.id)) == [RunState.SUCCEEDED]
            assert states(await gr.runs(t2.id)) == [RunState.SUCCEEDED]
            assert env.executor.overlaps == []

    run(main())


# --------------------------------------------------------------------------- retries


def test_not_delivered_goes_back_to_pending_with_backoff() -> None:
    replies: list[Outcome | Exception] = [NotDelivered("agent busy"), Outcome(exit_code=0)]

    def handler(req: RunRequest, dev: Device) -> Outcome:
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    env = Env(handler=handler)  # retry_base 10 s

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(command="x", targets=["a"], max_attempts=1)
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.state is RunState.PENDING
            assert r.attempts == 0
            assert r.undelivered == 1
            assert r.available_at == env.clock.now + timedelta(seconds=10)
            assert r.error is not None
            assert "agent busy" in r.error
            assert env.executor.executions == []
            # not before the backoff is over
            env.clock.advance(9.9)
            await gr.run_until_idle()
            assert states(await gr.runs(task.id)) == [RunState.PENDING]
            assert len(env.executor.calls) == 1
            env.clock.advance(0.1)
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.state is RunState.SUCCEEDED
            assert r.attempts == 1
            assert r.undelivered == 1
            assert len(env.executor.calls) == 2
            assert len(env.executor.executions) == 1

    run(main())


def test_not_delivered_backoff_grows_and_caps() -> None:
    def handler(req: RunRequest, dev: Device) -> Outcome:
        raise NotDelivered("device not connected")

    env = Env(handler=handler)  # base 10, cap 80

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(command="x", targets=["a"])
            waits = []
            for _ in range(6):
                await gr.run_until_idle()
                (r,) = await gr.runs(task.id)
                waits.append((r.available_at - env.clock.now).total_seconds())
                env.clock.advance(waits[-1])
            assert waits == [10, 20, 40, 80, 80, 80]
            assert r.undelivered == 6
            assert r.attempts == 0
            assert r.state is RunState.PENDING

    run(main())


def unknown(req: RunRequest, dev: Device) -> Outcome:
    raise OutcomeUnknown("session dropped")


def test_outcome_unknown_at_most_once_is_lost_and_never_resent() -> None:
    env = Env(handler=unknown)

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(command="x", targets=["a"], max_attempts=3)
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.state is RunState.LOST
            assert r.attempts == 1
            assert r.error is not None
            assert "session dropped" in r.error
            env.clock.advance(3600)
            await gr.run_until_idle()
            assert len(env.executor.executions) == 1

    run(main())


def test_outcome_unknown_at_least_once_resends_then_gives_up() -> None:
    env = Env(handler=unknown)  # base 10

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(
                command="x", targets=["a"], max_attempts=3, delivery=Delivery.AT_LEAST_ONCE
            )
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert (r.state, r.attempts) == (RunState.PENDING, 1)
            assert r.available_at == env.clock.now + timedelta(seconds=10)
            env.clock.advance(10)
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert (r.state, r.attempts) == (RunState.PENDING, 2)
            assert r.available_at == env.clock.now + timedelta(seconds=20)
            env.clock.advance(20)
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert (r.state, r.attempts) == (RunState.LOST, 3)
            assert r.error is not None
            assert "gave up after 3 attempts" in r.error
            assert [c.attempt for c in env.executor.executions] == [1, 2, 3]

    run(main())


def test_outcome_unknown_at_least_once_then_success() -> None:
    replies: list[Outcome | Exception] = [OutcomeUnknown("lost reply"), Outcome(exit_code=0)]

    def handler(req: RunRequest, dev: Device) -> Outcome:
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    env = Env(handler=handler)

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(command="x", targets=["a"], delivery="at_least_once")
            await gr.run_until_idle()
            env.clock.advance(10)
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.state is RunState.SUCCEEDED
            assert r.attempts == 2
            assert r.undelivered == 0

    run(main())


def test_command_that_never_returns_is_bounded() -> None:
    async def hang(req: RunRequest, dev: Device) -> Outcome:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    env = Env(handler=hang, settings=LoopSettings(dispatch_grace=0.05))

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            env.executor.set_online("b")
            t1 = await gr.submit(command="x", targets=["a"], timeout=0.05)
            t2 = await gr.submit(
                command="x",
                targets=["b"],
                timeout=0.05,
                delivery="at_least_once",
                max_attempts=1,
            )
            await asyncio.wait_for(gr.run_until_idle(), LIMIT)
            for t in (t1, t2):
                (r,) = await gr.runs(t.id)
                assert r.state is RunState.LOST
                assert r.error is not None
                assert "no reply" in r.error
            assert env.executor.busy == set()

    run(main())


# --------------------------------------------------------------------------- crash & recovery


@pytest.mark.parametrize(
    ("delivery", "after_restart"),
    [(Delivery.AT_MOST_ONCE, RunState.LOST), (Delivery.AT_LEAST_ONCE, RunState.PENDING)],
)
def test_crash_while_in_flight_then_recovery(delivery: Delivery, after_restart: RunState) -> None:
    gate = Gate()
    env = Env(handler=gate)

    async def main() -> None:
        gr = await env.gr.__aenter__()
        env.executor.set_online("a")
        task = await gr.submit(command="x", targets=["a"], delivery=delivery)
        await crash_mid_flight(gr, gate)
        (r,) = await gr.runs(task.id)
        assert r.state is RunState.DISPATCHED  # nothing was written after the crash
        assert env.store.closed == 0
        assert env.executor.busy == set()

        # a new process over the same store: recovery runs on enter
        gate.release.set()
        env2 = env.restart()
        async with started(env2) as gr2:
            (r,) = await gr2.runs(task.id)
            assert r.state is after_restart
            assert r.error is not None
            assert "in flight" in r.error
            env2.clock.advance(3600)
            await gr2.run_until_idle()
            (r,) = await gr2.runs(task.id)
            if delivery is Delivery.AT_MOST_ONCE:
                assert r.state is RunState.LOST
                assert len(env.executor.executions) == 1
            else:
                assert r.state is RunState.SUCCEEDED
                assert r.attempts == 2
                assert len(env.executor.executions) == 2

    run(main())


def test_crash_does_not_disturb_other_devices_runs() -> None:
    gate = Gate()
    env = Env(handler=gate)

    async def main() -> None:
        gr = await env.gr.__aenter__()
        env.executor.set_online("a")
        held = await gr.submit(command="x", targets=["a"])
        waiting = await gr.submit(command="y", targets=["b"])
        await crash_mid_flight(gr, gate)
        gate.release.set()
        env2 = env.restart()
        async with started(env2) as gr2:
            assert await gr2.loop.recover() == 0  # already settled on enter
            env.executor.set_online("b")
            await gr2.run_until_idle()
            assert states(await gr2.runs(held.id)) == [RunState.LOST]
            assert states(await gr2.runs(waiting.id)) == [RunState.SUCCEEDED]

    run(main())


def test_graceful_stop_waits_for_commands_in_flight() -> None:
    gate = Gate()
    env = Env(handler=gate, settings=LoopSettings(shutdown_grace=LIMIT))

    async def main() -> None:
        env.executor.set_online("a")
        async with started(env) as gr:
            task = await gr.submit(command="x", targets=["a"])
            idle = asyncio.create_task(gr.run_until_idle())
            await gate.wait_for(1)
            asyncio.get_running_loop().call_soon(gate.release.set)
        await asyncio.wait_for(idle, LIMIT)
        assert states(await env.store.get_runs(task.id)) == [RunState.SUCCEEDED]

    run(main())


def test_graceful_stop_abandons_commands_past_the_grace() -> None:
    gate = Gate()
    env = Env(handler=gate, settings=LoopSettings(shutdown_grace=0.01))

    async def main() -> None:
        env.executor.set_online("a")
        async with started(env) as gr:
            task = await gr.submit(command="x", targets=["a"])
            idle = asyncio.create_task(gr.run_until_idle())
            await gate.wait_for(1)
        await asyncio.wait_for(idle, LIMIT)
        # left dispatched: the next start settles it
        assert states(await env.store.get_runs(task.id)) == [RunState.DISPATCHED]
        async with started(env.restart()) as gr2:
            assert states(await gr2.runs(task.id)) == [RunState.LOST]

    run(main())


# --------------------------------------------------------------------------- time


def test_not_before_is_honoured() -> None:
    env = Env()

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            start = env.clock.now
            task = await gr.submit(
                command="x", targets=["a"], not_before=start + timedelta(seconds=60)
            )
            await gr.run_until_idle()
            env.clock.advance(59)
            await gr.run_until_idle()
            assert states(await gr.runs(task.id)) == [RunState.PENDING]
            assert env.executor.calls == []
            env.clock.advance(1)
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.state is RunState.SUCCEEDED
            assert r.started_at == start + timedelta(seconds=60)

    run(main())


def test_expires_at_is_honoured() -> None:
    env = Env()

    async def main() -> None:
        async with started(env) as gr:
            start = env.clock.now
            task = await gr.submit(
                command="x", targets=["a", "b"], expires_at=start + timedelta(seconds=30)
            )
            env.executor.set_online("b")
            await gr.run_until_idle()
            env.clock.advance(29)
            await gr.run_until_idle()
            assert states(await gr.runs(task.id)) == [RunState.PENDING, RunState.SUCCEEDED]
            env.clock.advance(1)
            await gr.run_until_idle()
            env.executor.set_online("a")
            await gr.run_until_idle()
            ra, rb = await gr.runs(task.id)
            assert ra.state is RunState.EXPIRED
            assert ra.finished_at == start + timedelta(seconds=30)
            assert ra.attempts == 0
            assert rb.state is RunState.SUCCEEDED
            assert [c.node_id for c in env.executor.calls] == ["b"]
            assert (await gr.get(task.id)).status is TaskStatus.FAILED

    run(main())


def test_retry_backoff_past_expiry_expires() -> None:
    def handler(req: RunRequest, dev: Device) -> Outcome:
        raise NotDelivered("agent busy")

    env = Env(handler=handler)  # base 10

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(
                command="x", targets=["a"], expires_at=env.clock.now + timedelta(seconds=5)
            )
            await gr.run_until_idle()
            env.clock.advance(10)
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert r.state is RunState.EXPIRED
            assert len(env.executor.calls) == 1

    run(main())


# --------------------------------------------------------------------------- cancel, delete, flush


def test_cancel_pending_runs() -> None:
    env = Env()

    async def main() -> None:
        async with started(env) as gr:
            task = await gr.submit(command="x", targets=["a", "b", "c"])
            cancelled = await gr.cancel(task.id, ["b"])
            assert [r.node_id for r in cancelled] == ["b"]
            assert cancelled[0].state is RunState.CANCELLED
            assert cancelled[0].finished_at == env.clock.now
            assert states(await gr.runs(task.id)) == [
                RunState.PENDING,
                RunState.CANCELLED,
                RunState.PENDING,
            ]
            cancelled = await gr.cancel(task.id)
            assert sorted(r.node_id for r in cancelled) == ["a", "c"]
            assert (await gr.get(task.id)).status is TaskStatus.CANCELLED
            for node in ("a", "b", "c"):
                env.executor.set_online(node)
            await gr.run_until_idle()
            assert env.executor.calls == []
            assert await gr.cancel(task.id) == []
            with pytest.raises(NotFound):
                await gr.cancel("no-such-task")

    run(main())


def test_cancel_leaves_dispatched_runs_alone() -> None:
    gate = Gate()
    env = Env(handler=gate)

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(command="x", targets=["a", "b"])
            idle = asyncio.create_task(gr.run_until_idle())
            await gate.wait_for(1)
            cancelled = await gr.cancel(task.id)
            assert [r.node_id for r in cancelled] == ["b"]
            assert states(await gr.runs(task.id)) == [RunState.DISPATCHED, RunState.CANCELLED]
            gate.release.set()
            await asyncio.wait_for(idle, LIMIT)
            assert states(await gr.runs(task.id)) == [RunState.SUCCEEDED, RunState.CANCELLED]

    run(main())


def test_delete() -> None:
    gate = Gate()
    env = Env(handler=gate)

    async def main() -> None:
        async with started(env) as gr:
            pending = await gr.submit(command="x", targets=["b"])
            assert await gr.delete(pending.id) is True
            with pytest.raises(NotFound):
                await gr.get(pending.id)
            with pytest.raises(NotFound):
                await gr.runs(pending.id)
            with pytest.raises(NotFound):
                await gr.delete(pending.id)

            env.executor.set_online("a")
            busy = await gr.submit(command="x", targets=["a", "c"])
            idle = asyncio.create_task(gr.run_until_idle())
            await gate.wait_for(1)
            assert await gr.delete(busy.id) is False  # a run is in flight: kept
            assert states(await gr.runs(busy.id)) == [RunState.DISPATCHED, RunState.CANCELLED]
            gate.release.set()
            await asyncio.wait_for(idle, LIMIT)
            assert states(await gr.runs(busy.id)) == [RunState.SUCCEEDED, RunState.CANCELLED]
            assert await gr.delete(busy.id) is True
            assert env.store.runs == {}
            assert env.store.tasks == {}

    run(main())


def test_flush() -> None:
    gate = Gate(only="held")
    env = Env(handler=gate)

    async def main() -> None:
        async with started(env) as gr:
            done = await gr.submit(command="x", targets=["b"])
            env.executor.set_online("b")
            await gr.run_until_idle()
            env.executor.set_online("b", False)
            waiting = await gr.submit(command="x", targets=["b", "c"])
            env.executor.set_online("a")
            busy = await gr.submit(command="held", targets=["a"])
            idle = asyncio.create_task(gr.run_until_idle())
            await gate.wait_for(1)
            assert states(await gr.runs(done.id)) == [RunState.SUCCEEDED]
            result = await gr.flush()
            assert (result.cancelled, result.deleted, result.kept) == (2, 2, 1)
            assert set(env.store.tasks) == {busy.id}
            for t in (done, waiting):
                with pytest.raises(NotFound):
                    await gr.get(t.id)
            gate.release.set()
            await asyncio.wait_for(idle, LIMIT)
            result = await gr.flush()
            assert (result.cancelled, result.deleted, result.kept) == (0, 1, 0)
            assert env.store.tasks == {}

    run(main())


# --------------------------------------------------------------------------- listing


def test_list_pagination_newest_first() -> None:
    env = Env()

    async def main() -> None:
        async with started(env) as gr:
            ids = [(await gr.submit(command=f"c{i}", targets=["a"])).id for i in range(7)]
            seen: list[str] = []
            cursor = None
            pages = 0
            while True:
                page = await gr.list(limit=3, cursor=cursor)
                assert len(page.items) <= 3
                seen.extend(s.task.id for s in page.items)
                pages += 1
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert seen == ids[::-1]
            assert pages == 3
            page = await gr.list(TaskQuery(limit=7))
            assert page.next_cursor is None
            assert [s.task.id for s in page.items] == ids[::-1]

    run(main())


def test_list_filters() -> None:
    env = Env(handler=lambda req, dev: Outcome(exit_code=0 if req.command == "ok" else 1))

    async def main() -> None:
        async with started(env) as gr:
            ok = await gr.submit(name="good", command="ok", targets=["a"])
            bad = await gr.submit(name="bad", command="no", targets=["a", "b"])
            later = await gr.submit(name="good", command="ok", targets=["c"])
            env.executor.set_online("a")
            await gr.run_until_idle()

            async def ids(**filters: Any) -> list[str]:
                return [s.task.id for s in (await gr.list(**filters)).items]

            assert await ids(name="good") == [later.id, ok.id]
            assert await ids(node_id="b") == [bad.id]
            assert await ids(node_id="zzz") == []
            assert await ids(state=RunState.PENDING) == [later.id, bad.id]
            assert await ids(state=RunState.FAILED) == [bad.id]
            assert await ids(status=TaskStatus.SUCCEEDED) == [ok.id]
            assert await ids(status=TaskStatus.RUNNING) == [bad.id]
            assert await ids(status=TaskStatus.PENDING) == [later.id]
            page = await gr.list(name="good", limit=1)
            assert [s.task.id for s in page.items] == [later.id]
            page = await gr.list(name="good", limit=1, cursor=page.next_cursor)
            assert [s.task.id for s in page.items] == [ok.id]
            summary = (await gr.list(node_id="b")).items[0]
            assert summary.counts == {RunState.FAILED: 1, RunState.PENDING: 1}

    run(main())


def test_get_unknown_task() -> None:
    env = Env()

    async def main() -> None:
        async with started(env) as gr:
            with pytest.raises(NotFound):
                await gr.get("nope")
            with pytest.raises(NotFound):
                await gr.runs("nope")
            with pytest.raises(NotFound):
                await gr.wait("nope", timeout=LIMIT)

    run(main())


# --------------------------------------------------------------------------- background mode


def test_wait_returns_when_terminal_background() -> None:
    env = Env(background=True)

    async def main() -> None:
        async with started(env) as gr:
            task = await gr.submit(command="x", targets=["a", "b"])
            waiter = asyncio.create_task(gr.wait(task.id))
            env.executor.set_online("a")
            env.executor.set_online("b")
            runs = await asyncio.wait_for(waiter, LIMIT)
            assert states(runs) == [RunState.SUCCEEDED, RunState.SUCCEEDED]
            assert all(r.output == "x\n" for r in runs)

    run(main())


def test_wait_returns_when_a_held_command_finishes_background() -> None:
    gate = Gate(Outcome(exit_code=4, output="late"))
    env = Env(background=True, handler=gate)

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(command="x", targets=["a"])
            waiter = asyncio.create_task(gr.wait(task.id))
            await gate.wait_for(1)
            assert not waiter.done()
            assert states(await gr.runs(task.id)) == [RunState.DISPATCHED]
            gate.release.set()
            runs = await asyncio.wait_for(waiter, LIMIT)
            assert states(runs) == [RunState.FAILED]
            assert runs[0].exit_code == 4
            assert runs[0].output == "late"

    run(main())


def test_wait_times_out() -> None:
    env = Env(background=True)

    async def main() -> None:
        async with started(env) as gr:
            task = await gr.submit(command="x", targets=["a"])
            with pytest.raises(TimeoutError):
                await gr.wait(task.id, timeout=0.05)
            assert states(await gr.runs(task.id)) == [RunState.PENDING]

    run(main())


class IdleSignallingStore(InMemoryStore):
    """Tells when the loop has finished a pass and is about to sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.idle = asyncio.Event()

    async def next_wakeup(self, now: datetime) -> datetime | None:
        self.idle.set()
        return await super().next_wakeup(now)


def test_background_loop_wakes_on_executor_events() -> None:
    store = IdleSignallingStore()
    env = Env(
        background=True,
        store=store,
        settings=LoopSettings(resync_interval=60.0),
    )

    async def main() -> None:
        async with started(env) as gr:
            task = await gr.submit(command="x", targets=["a"])
            await asyncio.wait_for(store.idle.wait(), LIMIT)
            # the loop has looked, found the device offline, and gone to sleep for 60 s
            assert states(await gr.runs(task.id)) == [RunState.PENDING]
            assert env.executor.calls == []
            loop = asyncio.get_running_loop()
            started_at = loop.time()
            env.executor.set_online("a")
            runs = await asyncio.wait_for(gr.wait(task.id), 10)
            assert states(runs) == [RunState.SUCCEEDED]
            assert loop.time() - started_at < 10  # far below the 60 s resync

    run(main())


def test_background_submit_wakes_the_loop() -> None:
    store = IdleSignallingStore()
    env = Env(background=True, store=store, settings=LoopSettings(resync_interval=60.0))

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            await asyncio.wait_for(store.idle.wait(), LIMIT)  # idle, nothing to do
            task = await gr.submit(command="x", targets=["a"])
            runs = await asyncio.wait_for(gr.wait(task.id), 10)
            assert states(runs) == [RunState.SUCCEEDED]

    run(main())


def test_background_recovers_on_start_and_stops_cleanly() -> None:
    env = Env()

    async def main() -> None:
        gate = Gate()
        env.executor.handler = gate
        gr = await env.gr.__aenter__()
        env.executor.set_online("a")
        task = await gr.submit(command="x", targets=["a"], delivery="at_least_once")
        await crash_mid_flight(gr, gate)
        gate.release.set()

        # a real clock this time: the retry backoff (10 ms) must pass by itself
        env2 = env.restart(
            background=True, real_clock=True, settings=LoopSettings(retry=RetryPolicy(0.01))
        )
        async with started(env2) as gr2:
            runs = await asyncio.wait_for(gr2.wait(task.id), LIMIT)
            assert states(runs) == [RunState.SUCCEEDED]
            assert runs[0].attempts == 2
        assert gr2._loop_task is not None
        assert gr2._loop_task.done()

    run(main())


# --------------------------------------------------------------------------- store faults


class FlakyClaimStore(InMemoryStore):
    """Fails to claim one chosen run, as a store might on a transient error."""

    def __init__(self, fail_node: str) -> None:
        super().__init__()
        self.fail_node = fail_node
        self.failures = 0

    async def claim_many(self, keys: Sequence[RunKey], now: datetime) -> Any:
        # all or nothing, like the reference store's claim_many when one claim fails
        if any(key.node_id == self.fail_node for key in keys) and self.failures == 0:
            self.failures += 1
            raise StoreError("database is locked")
        return await super().claim_many(keys, now)


def test_failed_claim_does_not_strand_other_claims() -> None:
    store = FlakyClaimStore("a")
    env = Env(store=store)

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            env.executor.set_online("b")
            task = await gr.submit(command="x", targets=["a", "b"])
            with pytest.raises(StoreError):
                await gr.run_until_idle()  # the failing pass is reported...
            assert store.failures == 1
            runs = await gr.runs(task.id)
            dispatched = {r.node_id for r in runs if r.state is RunState.DISPATCHED}
            assert dispatched <= gr.loop.in_flight
            await gr.run_until_idle()  # ...and the next one carries on
            # b was chosen in the same pass as a's failed claim: it must not be left
            # dispatched with nothing in flight (claimed and sent, or not claimed at all)
            assert states(await gr.runs(task.id)) == [RunState.SUCCEEDED, RunState.SUCCEEDED]
            assert sorted(c.node_id for c in env.executor.executions) == ["a", "b"]

    run(main())


def test_background_recovery_is_retried_until_it_succeeds() -> None:
    gate = Gate()
    env = Env(handler=gate)

    async def main() -> None:
        gr = await env.gr.__aenter__()
        env.executor.set_online("a")
        task = await gr.submit(command="x", targets=["a"])
        await crash_mid_flight(gr, gate)
        gate.release.set()

        # the store fails the first time the restarted loop asks for stale runs
        real = env.store.dispatched
        failures = 0

        async def flaky() -> Any:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise StoreError("database is locked")
            return await real()

        env.store.dispatched = flaky  # type: ignore[method-assign]
        env2 = env.restart(background=True, settings=LoopSettings(retry=RetryPolicy(0.01)))
        async with started(env2) as gr2:
            runs = await asyncio.wait_for(gr2.wait(task.id), LIMIT)
            assert states(runs) == [RunState.LOST]
            assert failures == 1

    run(main())


def test_gate_helper_really_blocks() -> None:
    # the Gate holds a command until released: what the in-flight tests rely on
    gate = Gate()

    async def main() -> None:
        dev = Device(node_id="a", online=True)
        req = RunRequest(task_id="t", node_id="a", command="x")
        pending = asyncio.create_task(gate(req, dev))
        await gate.wait_for(1)
        assert not pending.done()
        gate.release.set()
        assert (await asyncio.wait_for(pending, LIMIT)).exit_code == 0

    run(main())


# --------------------------------------------------------------------------- outcome recovery


def journaled(handler: Any = None, devices: tuple[str, ...] = ("a", "b", "c")) -> FakeExecutor:
    return FakeExecutor(handler, devices=devices, journal=True)


async def crashed_in_flight(env: Env, gate: Gate, **fields: Any) -> Task:
    """Start ``env``'s GhostRunner, submit a command for device "a" (online), and crash
    while the gate holds it in flight; returns the task."""
    gr = await env.gr.__aenter__()
    env.executor.set_online("a")
    task = await gr.submit(command="x", targets=["a"], **fields)
    await crash_mid_flight(gr, gate)
    return task


@pytest.mark.parametrize("delivery", list(Delivery))
def test_an_outcome_lost_in_a_crash_is_read_back_from_the_device(delivery: Delivery) -> None:
    """The device finished the command after GhostRunner died: the next start asks it
    and records the real outcome, marked recovered; nothing runs twice."""
    gate = Gate()
    env = Env(executor=journaled(gate))

    async def main() -> None:
        # the fake device finishes the command on its own after the crash
        task = await crashed_in_flight(env, gate, delivery=delivery)
        env2 = env.restart()
        async with started(env2) as gr2:
            (r,) = await gr2.runs(task.id)
            assert r.state is RunState.DISPATCHED  # held: its device is asked first
            assert gr2.loop.recovering == {"a"}
            await gr2.run_until_idle()
            (r,) = await gr2.runs(task.id)
            # what the fake device records for a command its caller stopped waiting for
            assert (r.state, r.output, r.recovered, r.attempts) == (
                RunState.SUCCEEDED, "finished after the caller left", True, 1)
            assert len(env.executor.executions) == 1
            history = (await gr2.attempts(task.id))["a"]
            assert [a.recovered for a in history] == [True]

    run(main())


def test_a_held_device_runs_nothing_else_until_its_device_answers() -> None:
    """After the crash the device is offline: its run stays dispatched (the outcome is
    not known), the device's next run waits, and both go on once it is back."""
    gate = Gate()
    env = Env(executor=journaled(gate))

    async def main() -> None:
        first = await crashed_in_flight(env, gate)
        env.executor.set_online("a", False)
        env2 = env.restart()
        async with started(env2) as gr2:
            second = await gr2.submit(command="y", targets=["a"])
            env.clock.advance(3600)
            await gr2.run_until_idle()
            assert states(await gr2.runs(first.id)) == [RunState.DISPATCHED]
            assert states(await gr2.runs(second.id)) == [RunState.PENDING]
            assert env.executor.offline_calls == []
            env.executor.set_online("a")
            gate.release.set()
            await gr2.run_until_idle()
            (r1,) = await gr2.runs(first.id)
            assert (r1.state, r1.recovered) == (RunState.SUCCEEDED, True)
            assert states(await gr2.runs(second.id)) == [RunState.SUCCEEDED]
            assert [r.command for r in env.executor.executions] == ["x", "y"]

    run(main())


@pytest.mark.parametrize(
    ("delivery", "final"), [(Delivery.AT_MOST_ONCE, RunState.LOST),
                            (Delivery.AT_LEAST_ONCE, RunState.SUCCEEDED)],
)
def test_a_device_that_never_answers_before_the_deadline_is_unknown(
    delivery: Delivery, final: RunState
) -> None:
    gate = Gate()
    env = Env(executor=journaled(gate), settings=LoopSettings(
        retry=RetryPolicy(10.0, 80.0), recover_within=600.0))

    async def main() -> None:
        task = await crashed_in_flight(env, gate, delivery=delivery, timeout=60)
        env.executor.set_online("a", False)
        gate.release.set()
        env2 = env.restart()
        async with started(env2) as gr2:
            env.clock.advance(599)
            await gr2.run_until_idle()
            assert states(await gr2.runs(task.id)) == [RunState.DISPATCHED]
            env.clock.advance(2)
            await gr2.run_until_idle()
            (r,) = await gr2.runs(task.id)
            assert r.error is not None and "did not tell the outcome" in r.error
            env.executor.set_online("a")
            env.clock.advance(3600)
            await gr2.run_until_idle()
            (r,) = await gr2.runs(task.id)
            assert r.state is final
            assert not r.recovered

    run(main())


def test_a_wiped_journal_is_unknown_never_a_second_run() -> None:
    gate = Gate()
    env = Env(executor=journaled(gate))

    async def main() -> None:
        task = await crashed_in_flight(env, gate)
        env.executor.wipe_journal("a")
        env2 = env.restart()
        async with started(env2) as gr2:
            await gr2.run_until_idle()
            (r,) = await gr2.runs(task.id)
            assert r.state is RunState.LOST
            assert r.error is not None and "journal is gone" in r.error
            assert len(env.executor.executions) == 1

    run(main())


def test_a_reply_lost_in_flight_is_asked_for_again() -> None:
    """No crash: the reply itself is lost (the device went away, the session dropped).
    The run stays dispatched and the device's record settles it."""
    sent = []

    def handler(request: RunRequest, device: Device) -> Outcome:
        sent.append(request)
        raise ReplyLost(Outcome(exit_code=0, output="it ran"))

    env = Env(executor=journaled(handler))

    async def main() -> None:
        async with started(env) as gr:
            env.executor.set_online("a")
            task = await gr.submit(command="x", targets=["a"])
            await gr.run_until_idle()
            (r,) = await gr.runs(task.id)
            assert (r.state, r.output, r.recovered) == (RunState.SUCCEEDED, "it ran", True)
            assert len(sent) == 1
            assert [c.recover for c in env.executor.calls] == [False, True]

    run(main())


def test_an_executor_without_records_settles_at_once() -> None:
    """Nothing to ask (here: no journal): a run left dispatched is settled on start, by
    its delivery policy, without waiting for its device."""
    gate = Gate()
    env = Env(handler=gate)

    async def main() -> None:
        task = await crashed_in_flight(env, gate)
        env.executor.set_online("a", False)
        env2 = env.restart()
        async with started(env2) as gr2:
            assert states(await gr2.runs(task.id)) == [RunState.LOST]
            assert not gr2.loop.recovering

    run(main())


def test_a_continuous_task_reopened_by_a_retry_follows_devices_again() -> None:
    """Cancelled, it took no runs; a device was tagged meanwhile; the retry that re-opens
    it gives that device its run (found by the state machine, ~1 in 3,000 examples)."""
    env = Env()

    async def main() -> None:
        async with started(env) as gr:
            task = await gr.submit(command="x", targets=[], select={"tags": ["edge"]},
                                   continuous=True)
            await gr.cancel(task.id)
            env.executor.update_device("a", tags=("edge",))
            await gr.run_until_idle()
            assert await gr.runs(task.id) == []  # closed: no run for newcomers
            await gr.retry(task.id, [RunState.CANCELLED])
            env.executor.set_online("a")
            await gr.run_until_idle()
            assert [(r.node_id, r.state) for r in await gr.runs(task.id)] == [
                ("a", RunState.SUCCEEDED)]

    run(main())

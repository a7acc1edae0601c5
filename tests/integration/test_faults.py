"""MeshCentral restarts and outages, and flapping devices, while runs are dispatched.

GhostRunner runs in this process (SQLiteStore + MeshCentralExecutor, default executor
settings) against the real lab with real agents and a backlog of labelled runs; the
faults are injected at random moments while commands are in flight. Afterwards the
executions log on the device side is matched against the store
(``faultkit.Ledger.check``): nothing stuck in ``dispatched``, no at_most_once command
executed twice, every execution accounted for, the queue finished.

- MeshCentral restarted twice and stopped twice (2-8 s outages), 3 agents;
- 3 agents stopped (SIGTERM or SIGKILL) and started in a tight loop for 30 s, with
  MeshCentral's anti-flapping guard off (the default lab);
- the same with the guard on (``guarded_lab``): 2 agents flapped past the guard, whose
  dispatches then vanish, then a MeshCentral restart resets it;
- a stalled agent (SIGSTOP, its connection up) past the executor's start_timeout: the
  dispatch is taken as not delivered and sent again, and the agent, once resumed, gets
  both copies; the wrapper's once-only guard runs the command once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

from ghostrunner import RunState
from ghostrunner.lab import Agent, MeshLab
from tests.integration.faultkit import Bench, Figures, bench, recorded_runs, start_agents, until

AGENTS = [f"fault-{i}" for i in range(1, 4)]
BACKLOG = 150  # pending runs topped up before each fault


def test_meshcentral_restarts_and_outages_mid_dispatch(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path, figures: Figures
) -> None:
    agents = start_agents(agent_factory, AGENTS)
    lab = mesh_lab

    async def restart() -> None:
        await asyncio.to_thread(lab.restart)

    downs: list[float] = []

    async def outage(b: Bench) -> None:
        await asyncio.to_thread(lab.stop)
        downs.append(b.ledger.rng.uniform(2.0, 8.0))
        await asyncio.sleep(downs[-1])  # the outage itself
        await asyncio.to_thread(lab.start)

    async def scenario() -> None:
        began = time.monotonic()
        async with bench(lab, agents, tmp_path, "outage") as b:
            back: list[float] = []
            for i in range(4):
                await b.top_up(BACKLOG)
                back.append(await b.fault(restart if i % 2 == 0 else (lambda: outage(b))))
            drained = await b.drain(300)
            # the agents stay up: their journals answer for every run caught in flight
            tally = await b.check(reachable=True, faults=b.faults,
                                  sessions=b.executor.sessions_started)
        assert b.dispatched_at_faults > 0, "no fault hit a run in flight"
        tally.record(figures, "outage")
        figures.add("outage: seed", str(b.ledger.seed))
        figures.add("outage: MeshCentral restarts + outages", "2 + 2")
        figures.add("outage: outage lengths", " ".join(f"{d:.1f}" for d in downs), "s")
        figures.add("outage: runs dispatched at a fault (total)", b.dispatched_at_faults)
        figures.add("outage: MeshCentral back -> GhostRunner sees the agents (max)", max(back), "s")
        figures.add("outage: drain after the last fault", drained, "s")
        figures.add("outage: wall time", time.monotonic() - began, "s")

    asyncio.run(scenario())


async def flap(agent: Agent, rng: random.Random, until: float) -> int:
    """Stop and start ``agent`` until ``until``; returns how many times it stopped."""
    flaps = 0
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(0.2, 2.5))  # up: starting, ready, running
        await asyncio.to_thread(agent.stop, rng.random() < 0.5)  # SIGKILL or SIGTERM
        flaps += 1
        await asyncio.sleep(rng.uniform(0.0, 0.5))  # down
        await asyncio.to_thread(agent.start, wait=False)
    return flaps


async def flapping(b: Bench, seconds: float) -> int:
    """Flap every agent of the bench for ``seconds`` while keeping a backlog; returns
    the number of agent stops."""
    await b.top_up(BACKLOG)
    await b.wait_dispatching()
    until = time.monotonic() + seconds
    rngs = [random.Random(b.ledger.rng.random()) for _ in b.agents]

    async def keep_busy() -> None:
        while time.monotonic() < until:
            await b.top_up(BACKLOG)
            await asyncio.sleep(1.0)

    flaps, _ = await asyncio.gather(
        asyncio.gather(*(flap(a, r, until) for a, r in zip(b.agents, rngs, strict=True))),
        keep_busy(),
    )
    return sum(flaps)


def record_flapping(figures: Figures, prefix: str, b: Bench, flaps: str, drained: float,
                    began: float) -> None:
    figures.add(f"{prefix}: seed", str(b.ledger.seed))
    figures.add(f"{prefix}: agents", len(b.agents))
    figures.add(f"{prefix}: agent stops", flaps)
    figures.add(f"{prefix}: drain after the flapping", drained, "s")
    figures.add(f"{prefix}: wall time", time.monotonic() - began, "s")


def test_flapping_agents_mid_dispatch(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path, figures: Figures
) -> None:
    """MeshCentral's anti-flapping guard is off in this lab: every reconnection is a
    healthy agent."""
    agents = start_agents(agent_factory, AGENTS)
    seconds = 30.0

    async def scenario() -> None:
        began = time.monotonic()
        async with bench(mesh_lab, agents, tmp_path, "flap") as b:
            flaps = await flapping(b, seconds)
            await b.wait_online()
            drained = await b.drain(300)
            tally = await b.check(flaps=flaps)
        assert tally.states["lost"] + tally.undelivered > 0, "no flap hit a dispatch"
        tally.record(figures, "flap")
        record_flapping(figures, "flap", b, f"{flaps} in {seconds:.0f} s (SIGTERM or SIGKILL)",
                        drained, began)

    asyncio.run(scenario())


FLAPS = 7  # > 6 disconnections: MeshCentral leaves the agent's handshake unfinished


def test_flapping_agents_with_the_anti_flapping_guard_on(
    guarded_lab: MeshLab, tmp_path: Path, figures: Figures
) -> None:
    """Production behaviour: an agent that reconnected more than 6 times within
    MeshCentral's 120 s window shows online but never finishes its handshake, so the
    commands sent to it vanish. Those dispatches must come back pending (never run
    twice), runs caught by a stop must wait for their device's answer, and all of them
    settle once the guard is reset, here by a MeshCentral restart (in production: the
    window passing)."""
    lab = guarded_lab
    known = {a.name: a for a in lab.agents}
    agents = [known.get(name) or lab.add_agent(name) for name in ("guard-1", "guard-2")]
    lab.restart()  # a fresh 120 s window: the flaps below all count
    try:
        lab.start_agents(agents)
        lab.wait_connected(agents, timeout=60)

        async def flap_times(b: Bench, agent: Agent, times: int) -> None:
            for _ in range(times):
                await asyncio.to_thread(agent.stop)
                await until(lambda: not b.online(agent), 30, f"{agent.name} offline")
                await asyncio.to_thread(agent.start, wait=False)
                await until(lambda: b.online(agent), 30, f"{agent.name} online")

        async def scenario() -> None:
            began = time.monotonic()
            async with bench(lab, agents, tmp_path, "guard") as b:
                await b.top_up(60)
                await b.wait_dispatching()
                await asyncio.gather(*(flap_times(b, a, FLAPS) for a in agents))
                flapped = time.monotonic()

                async def dropped() -> bool:
                    # a dispatch the guard swallowed came back pending; or a run whose
                    # agent was stopped under it is held until its device answers (the
                    # guard swallows those requests too, and the run stays dispatched)
                    return bool(b.gr.loop.recovering) or any(
                        r.undelivered for _, r in await recorded_runs(b.gr.store))

                await b.gr.wait_until(dropped, 60)
                silent = time.monotonic() - flapped
                # reset the guard while dispatches are out to agents that drop them
                await b.meshcentral_fault(lambda: asyncio.to_thread(lab.restart))
                drained = await b.drain(300)
                tally = await b.check(flaps=FLAPS * len(agents))
            tally.record(figures, "guard")
            record_flapping(figures, "guard", b, f"{FLAPS} each, then a MeshCentral restart",
                            drained, began)
            figures.add("guard: flapping done -> a dispatch back pending or a run held",
                        silent, "s")

        asyncio.run(scenario())
    finally:
        for agent in agents:
            agent.stop()


STALL_MAX = 17.0  # below the lab's agent idle timeout (20 s): MeshCentral keeps it online


def test_stalled_agent_runs_an_at_most_once_command_once(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    """A device that stops answering without disconnecting (SIGSTOP: its TCP connection
    stays up, so MeshCentral keeps it online) for longer than the executor's
    start_timeout (10 s), then resumes and runs every copy it was sent: the command
    must run once (the resent copy finds the first one's record in the journal and
    answers with it: the run ends with its real outcome, recovered)."""
    agent = agent_factory("fault-stall", start=True)

    async def scenario() -> None:
        async with bench(mesh_lab, [agent], tmp_path, "stall", at_least_once=0.0) as b:
            await b.submit(1)  # this session sees a command's console output
            await b.drain(60)
            assert agent.pid is not None
            os.killpg(agent.pid, signal.SIGSTOP)
            try:
                (task,) = await b.submit(1)

                async def resent_or_settled() -> bool:
                    (run,) = await b.gr.runs(task.id)
                    return run.terminal or (
                        run.undelivered > 0 and run.state is RunState.DISPATCHED)

                with contextlib.suppress(TimeoutError):  # then resume it anyway
                    await b.gr.wait_until(resent_or_settled, STALL_MAX)
            finally:
                os.killpg(agent.pid, signal.SIGCONT)
            await b.submit(1)  # queued behind whatever the agent still has to run
            await b.drain(120)
            await b.check()
            (run,) = await b.gr.runs(task.id)
            # the stall was long enough for a resend: the journal, not luck, kept it once
            assert run.undelivered >= 1, run
            # the agent runs its queue in order: the late first copy ran, and the resend
            # answered with its record (had the first copy been dropped, the resend would
            # have run it: then not recovered); b.check() saw one execution and the
            # planned outcome either way
            assert run.state in {RunState.SUCCEEDED, RunState.FAILED}, run

    asyncio.run(scenario())

"""MeshCentral's anti-flapping guard, on: an agent that reconnects too often shows online
but has its core cleared, so commands sent to it are silently dropped. GhostRunner must
notice that the command never started, keep the run pending (not lost, not failed),
and run it exactly once when the agent is healthy again."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ghostrunner import GhostRunner, LoopSettings, RetryPolicy, RunState, Task
from ghostrunner.lab import MeshLab
from ghostrunner.meshcentral import MeshCentralExecutor
from ghostrunner.testing import InMemoryStore


def test_dropped_dispatches_are_retried_and_run_exactly_once(
    guarded_lab: MeshLab, tmp_path: Path
) -> None:
    lab = guarded_lab
    agent = lab.add_agent("flappy")
    agent.start(wait=True)
    lab.wait_connected([agent])
    log = tmp_path / "executions"

    async def scenario() -> None:
        executor = MeshCentralExecutor(
            lab.url, user=lab.admin_user, password=lab.admin_password, ignore_ssl=True,
            group_id=lab.group_id, start_timeout=3.0,
        )
        settings = LoopSettings(resync_interval=1.0, retry=RetryPolicy(0.5, 2.0))
        async with GhostRunner(store=InMemoryStore(), executor=executor,
                               settings=settings) as gr:
            await executor.wait_connected(timeout=60)
            warmup = await gr.submit(Task(name="warmup", command="echo ok",
                                          targets=[agent.node_id], timeout=20))
            (run,) = await gr.wait(warmup.id, timeout=60)
            assert run.state is RunState.SUCCEEDED

            # flap: more than 6 disconnections inside the server's 120 s window, after
            # which the server accepts the agent's connection (it shows online) but
            # never finishes its handshake, so commands sent to it vanish
            for _ in range(7):
                await asyncio.to_thread(agent.stop)
                await asyncio.to_thread(lab.wait_connected, [agent], False)
                await asyncio.to_thread(agent.start)
                await asyncio.to_thread(lab.wait_connected, [agent])

            task = await gr.submit(Task(name="victim", command=f"echo ran >> {log}",
                                        targets=[agent.node_id], timeout=20))

            async def dropped_twice() -> bool:
                return (await gr.runs(task.id))[0].undelivered >= 2

            try:
                await gr.wait_until(dropped_twice, timeout=60)
            except TimeoutError:
                raise AssertionError(f"{await gr.runs(task.id)} log={log.exists()}") from None
            (run,) = await gr.runs(task.id)
            assert run.state in {RunState.PENDING, RunState.DISPATCHED}
            assert run.attempts <= 1  # only the dispatch in flight, if any, counts
            assert "did not start" in (run.error or "")
            assert not log.exists(), "a dropped command ran after all"

            # a server restart forgets the disconnection counts: the agent is healthy
            await asyncio.to_thread(lab.restart)
            (run,) = await gr.wait(task.id, timeout=120)
            assert run.state is RunState.SUCCEEDED, run
            assert run.attempts == 1
            assert run.undelivered >= 2
            assert log.read_text() == "ran\n"

    asyncio.run(scenario())

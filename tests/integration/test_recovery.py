"""Outcome recovery from the device's journal, on the real lab (issue #12).

GhostRunner (SQLite store, MeshCentral executor, in this process) dispatches a command
and dies (``testing.crash``: nothing more is written) while the command runs on a real
agent. The command finishes on the device meanwhile. A new GhostRunner over the same
database asks the device: its journal gives the real outcome (``recovered``), and the
command ran once. If the journal was wiped in between (a reboot that clears it), the
outcome is unknown: ``lost``, and still not a second execution.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

from ghostrunner import Delivery, GhostRunner, LoopSettings, RetryPolicy, Run, RunState
from ghostrunner.lab import Agent, MeshLab
from ghostrunner.meshcentral import MeshCentralExecutor
from ghostrunner.sqlite import SQLiteStore
from ghostrunner.testing import crash
from tests.integration.faultkit import until

SETTINGS = LoopSettings(resync_interval=1.0, retry=RetryPolicy(0.2, 1.0))


def runner(lab: MeshLab, db: Path) -> tuple[GhostRunner, MeshCentralExecutor]:
    executor = MeshCentralExecutor(lab.url, user=lab.admin_user, password=lab.admin_password,
                                   ignore_ssl=True, group_id=lab.group_id)
    return GhostRunner(store=SQLiteStore(db), executor=executor, settings=SETTINGS), executor


async def crash_mid_run(lab: MeshLab, agent: Agent, db: Path, log: Path,
                        delivery: Delivery) -> str:
    """Dispatch a 2 s command to ``agent`` and crash while it runs; return the task id
    once the device's journal shows the command finished."""
    gr, executor = runner(lab, db)
    await gr.__aenter__()
    try:
        await executor.wait_connected(60)
        await until(lambda: executor.devices()[agent.node_id].online, 60, "agent online")
        task = await gr.submit(
            name="recover-me", command=f"echo ran >> {log}; sleep 2; echo done; exit 3",
            targets=[agent.node_id], delivery=delivery, timeout=60,
        )
        await until(lambda: log.exists(), 30, "the command started on the device")
    finally:
        await crash(gr)
        # what the death of its process would release too: its session, its lock
        await executor.close()
        await gr.store.close()
    # the device finishes the command on its own; its record says so
    def finished() -> bool:
        return any(p.read_text().startswith("s ") and "\ne " in p.read_text()
                   for p in agent.journal_path.iterdir() if len(p.name) == 32)
    await until(finished, 30, "the device recorded the outcome")
    return task.id


async def settle(lab: MeshLab, db: Path, task_id: str) -> Run:
    gr, _ = runner(lab, db)
    async with gr:
        async def done() -> bool:
            (run,) = await gr.runs(task_id)
            return run.terminal
        await until(done, 60, "the run settled after the restart")
        (run,) = await gr.runs(task_id)
        return run


def test_an_outcome_lost_in_a_crash_is_read_back_from_the_device(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = agent_factory("recover-1", start=True)
    log = tmp_path / "ran.log"

    async def scenario() -> None:
        for delivery in (Delivery.AT_MOST_ONCE, Delivery.AT_LEAST_ONCE):
            log.unlink(missing_ok=True)
            db = tmp_path / f"{delivery.value}.db"
            task_id = await crash_mid_run(mesh_lab, agent, db, log, delivery)
            run = await settle(mesh_lab, db, task_id)
            assert (run.state, run.exit_code, run.output) == (RunState.FAILED, 3, "done\n")
            assert run.recovered
            assert run.attempts == 1
            assert log.read_text() == "ran\n", delivery  # ran once, never again

    asyncio.run(scenario())


def test_a_wiped_journal_reads_as_unknown_never_as_not_started(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = agent_factory("recover-2", start=True)
    log = tmp_path / "ran.log"
    db = tmp_path / "gr.db"

    async def scenario() -> None:
        task_id = await crash_mid_run(mesh_lab, agent, db, log, Delivery.AT_MOST_ONCE)
        shutil.rmtree(agent.journal_path)  # a reboot that clears it
        run = await settle(mesh_lab, db, task_id)
        assert run.state is RunState.LOST
        assert run.error is not None and "journal is gone" in run.error
        assert not run.recovered
        assert log.read_text() == "ran\n"  # not run a second time
        assert not agent.journal_path.exists()  # the recovery request created nothing

    asyncio.run(scenario())

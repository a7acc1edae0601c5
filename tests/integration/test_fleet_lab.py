"""Fleet rollouts against the real lab: devices tagged through MeshCentral (libmeshctrl's
``edit_device``), tasks that select them by tag, offline ones included, a continuous
task that picks up a device tagged after it was submitted, and an abort that leaves the
rest cancelled and never executed. Executions are counted on the devices' side: every
command appends a line to a file."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path

from meshctrl.session import Session

from ghostrunner import RunState, TaskStatus
from ghostrunner.lab import Agent, MeshLab
from tests.integration.test_executor import lines, mesh_runner, start, until

LIMIT = 90.0


def test_rollouts_by_tag_on_real_devices(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    a = agent_factory("fleet-a", start=True)
    b = agent_factory("fleet-b")  # offline when the task is submitted
    c = agent_factory("fleet-c", start=True)
    tag, late, abort_tag = (f"{name}-{secrets.token_hex(3)}" for name in ("pis", "late", "bad"))

    async def scenario() -> None:
        async with Session(mesh_lab.url, user=mesh_lab.admin_user,
                           password=mesh_lab.admin_password, ignore_ssl=True) as admin:
            for agent in (a, b):
                await admin.edit_device(agent.node_id, tags=[tag], timeout=10)
            async with mesh_runner(mesh_lab) as (gr, executor):
                def tagged() -> bool:
                    devices = executor.devices()
                    return all(tag in devices[x.node_id].tags for x in (a, b))

                await until(tagged)
                # by tag, one device offline: both get a run, each runs once
                ran = tmp_path / "by-tag"
                task = await gr.submit(command=f"echo ran >> {ran}", select={"tags": [tag]},
                                       timeout=30)
                assert {r.node_id for r in await gr.runs(task.id)} == {a.node_id, b.node_id}
                await gr.wait(task.id, timeout=LIMIT, node_ids=[a.node_id])
                await start(b)
                runs = await gr.wait(task.id, timeout=LIMIT)
                assert [(r.state, r.attempts) for r in runs] == [(RunState.SUCCEEDED, 1)] * 2
                assert lines(ran) == ["ran", "ran"]

                # continuous: a device tagged after the submit gets its run
                picked = tmp_path / "late"
                follow = await gr.submit(command=f"echo late >> {picked}",
                                         select={"tags": [late]}, continuous=True, timeout=30)
                assert await gr.runs(follow.id) == []
                await admin.edit_device(c.node_id, tags=[late], timeout=10)
                await gr.wait_until(lambda: _has_runs(gr, follow.id, 1), timeout=LIMIT)
                [run] = await gr.wait(follow.id, timeout=LIMIT)
                assert (run.node_id, run.state) == (c.node_id, RunState.SUCCEEDED)
                assert lines(picked) == ["late"]

                # abort after the first failure: the rest cancelled, never executed
                for agent in (a, b, c):
                    await admin.edit_device(agent.node_id, tags=[abort_tag], timeout=10)
                await until(lambda: all(abort_tag in d.tags for n, d in executor.devices()
                                        .items() if n in {a.node_id, b.node_id, c.node_id}))
                failed = tmp_path / "bad"
                bad = await gr.submit(
                    command=f"echo bad >> {failed}; exit 1", select={"tags": [abort_tag]},
                    rollout={"max_concurrent": 1, "abort_failed_pct": 0}, timeout=30,
                )
                runs = await gr.wait(bad.id, timeout=LIMIT)
                states = sorted(r.state for r in runs)
                assert states == [RunState.CANCELLED, RunState.CANCELLED, RunState.FAILED]
                summary = await gr.get(bad.id)
                assert summary.status is TaskStatus.ABORTED
                assert lines(failed) == ["bad"]  # one execution on one device, no more

    asyncio.run(scenario())


async def _has_runs(gr: object, task_id: str, n: int) -> bool:
    return len(await gr.runs(task_id)) >= n  # type: ignore[attr-defined]

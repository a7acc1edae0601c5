"""Deleting tasks by id, by name, and for some of their devices only.

The library's verbs are ``cancel`` (pending runs, all or some devices) and ``delete``
(cancel, then remove the task if no run is in flight). ``DELETE /task/delete`` names
tasks the seed's way (by ``name``, with ``nodeids``); this module turns that into those
two verbs and reports, per task, what happened.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ghostrunner import GhostRunner, RunState, Task, TaskQuery
from ghostrunner.errors import NotFound

from ._parse import DeleteSelector

__all__ = ["delete_matching", "delete_task"]


async def _delete_one(
    runner: GhostRunner, task: Task, nodeids: Collection[str] | None
) -> dict[str, Any]:
    # its devices: the runs it has (targets, and what its selector matched)
    targets = {r.node_id for r in await runner.runs(task.id)}
    if nodeids is None or targets <= set(nodeids):
        # every device of the task: the task itself goes (unless a run is in flight)
        cancelled = await runner.cancel(task.id)
        deleted = await runner.delete(task.id)
        wanted = targets
    else:
        # some of its devices: their pending runs are cancelled, the task stays
        wanted = targets.intersection(nodeids)
        cancelled = await runner.cancel(task.id, wanted)
        deleted = False
    running: list[str] = []
    if not deleted:
        running = [
            r.node_id
            for r in await runner.runs(task.id)
            if r.state is RunState.DISPATCHED and r.node_id in wanted
        ]
    return {
        "id": task.id,
        "name": task.name,
        "deleted": deleted,
        "cancelled": [r.node_id for r in cancelled],
        "running": running,
    }


def _result(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"deleted": sum(1 for o in outcomes if o["deleted"]), "tasks": outcomes}


async def delete_task(
    runner: GhostRunner, task_id: str, nodeids: Collection[str] | None = None
) -> dict[str, Any]:
    """Delete one task (or cancel it for ``nodeids``). Raises NotFound."""
    task = (await runner.get(task_id)).task
    return _result([await _delete_one(runner, task, nodeids)])


async def delete_matching(runner: GhostRunner, selector: DeleteSelector) -> dict[str, Any]:
    """Delete the tasks ``selector`` names. Raises NotFound when it names none."""
    if selector.id is not None:
        task = (await runner.get(selector.id)).task
        if selector.name is not None and task.name != selector.name:
            raise NotFound(f"no task {selector.id} named {selector.name!r}")
        tasks = [task]
    else:
        tasks = []
        cursor: str | None = None
        while True:  # collect first: deleting while paging could skip tasks
            page = await runner.list(TaskQuery(name=selector.name, limit=1000, cursor=cursor))
            tasks.extend(s.task for s in page.items)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        if not tasks:
            raise NotFound(f"no task named {selector.name!r}")
    if selector.nodeids is not None:
        wanted = set(selector.nodeids)
        tasks = [
            t for t in tasks
            if wanted.intersection(r.node_id for r in await runner.runs(t.id))
        ]
        if not tasks:
            raise NotFound("no such task targets any of these nodeids")
    outcomes = []
    for task in tasks:
        try:
            outcomes.append(await _delete_one(runner, task, selector.nodeids))
        except NotFound:  # deleted meanwhile by someone else: nothing left to do
            continue
    return _result(outcomes)

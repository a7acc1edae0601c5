"""What the SQL stores (``sqlite``, ``postgres``) share: how a task's fleet fields are
kept as one JSON document, and how each task status reads on a ``task_counts`` row.

One module, so that a database moved from one backend to the other (``ghostrunner db
migrate``) reads alike, and a status means the same SQL in both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

from ._types import Rollout, Selector, Task, TaskStatus

__all__ = ["STATUS_SQL", "fleet_fields", "fleet_json"]

_PLAIN_ROLLOUT: Final = Rollout()


def fleet_json(task: Task) -> str | None:
    """A task's selector, rollout and success exit codes as JSON; None for a plain task
    (most tasks: nothing to write, nothing to parse back)."""
    if (
        task.select is None and not task.continuous and task.rollout == _PLAIN_ROLLOUT
        and task.success_exit_codes == (0,)
    ):
        return None
    select = None if task.select is None else {
        "group": task.select.group, "tags": list(task.select.tags),
        "tags_mode": task.select.tags_mode.value, "os": task.select.os,
        "name": task.select.name, "all": task.select.all,
    }
    return json.dumps({
        "select": select,
        "continuous": task.continuous,
        "rollout": attrs.asdict(task.rollout),
        "success_exit_codes": list(task.success_exit_codes),
    }, separators=(",", ":"))


def fleet_fields(text: str | None) -> dict[str, Any]:
    """The Task fields a :func:`fleet_json` document holds (the defaults for None)."""
    if text is None:
        return {"select": None, "continuous": False, "rollout": _PLAIN_ROLLOUT,
                "success_exit_codes": (0,)}
    doc = json.loads(text)
    return {
        "select": None if doc["select"] is None else Selector(**doc["select"]),
        "continuous": doc["continuous"],
        "rollout": Rollout(**doc["rollout"]),
        "success_exit_codes": tuple(doc["success_exit_codes"]),
    }


# How each TaskStatus reads on a task_counts row (alias c); mirrors
# ghostrunner._types.task_status, in the same order of tests (tests/contract checks it on
# every store).
_ACTIVE = "c.pending + c.dispatched > 0"
_LIVE = "NOT c.aborted"
_NOT_PAUSED = f"NOT (c.paused AND ({_ACTIVE} OR c.total = 0))"
_WAITING = "(c.total = 0 OR (c.pending > 0 AND c.pending + c.cancelled = c.total))"
_SETTLED = f"{_LIVE} AND {_NOT_PAUSED} AND NOT {_WAITING} AND NOT ({_ACTIVE})"
STATUS_SQL: Final[Mapping[TaskStatus, str]] = {
    TaskStatus.ABORTED: "c.aborted",
    TaskStatus.PAUSED: f"{_LIVE} AND NOT {_NOT_PAUSED}",
    TaskStatus.PENDING: f"{_LIVE} AND {_NOT_PAUSED} AND {_WAITING}",
    TaskStatus.RUNNING: f"{_LIVE} AND {_NOT_PAUSED} AND NOT {_WAITING} AND {_ACTIVE}",
    TaskStatus.SUCCEEDED: f"{_SETTLED} AND c.succeeded = c.total",
    TaskStatus.CANCELLED: f"{_SETTLED} AND c.succeeded <> c.total AND c.cancelled = c.total",
    TaskStatus.FAILED: f"{_SETTLED} AND c.succeeded <> c.total AND c.cancelled <> c.total",
}

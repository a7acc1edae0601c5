"""GhostRunner: queue shell commands for MeshCentral devices that are offline, and run
them the moment each device comes online, recording every outcome.

An application builds one :class:`GhostRunner` from a :class:`Store` (where tasks and
runs live: :class:`SQLiteStore`) and an :class:`Executor` (what runs commands and knows
who is online: :class:`MeshCentralExecutor`), then submits :class:`Task`\\ s and reads
their :class:`Run`\\ s::

    async with GhostRunner(store=SQLiteStore("gr.db"), executor=executor) as gr:
        task = await gr.submit(command="uptime", targets=["node//..."])
        runs = await gr.wait(task.id)

What else there is:

* ``ghostrunner.errors``: the exceptions (``ValidationError``, ``NotFound``...).
* ``ghostrunner.events``: the event log's :class:`Event` and its kinds; follow it with
  ``GhostRunner.events()``.
* ``ghostrunner.testing``: an in-memory store, a fake executor and a fake clock, for
  your tests and to try GhostRunner without MeshCentral.
* Backend authors implement :class:`Store` or :class:`Executor` (``_protocols.py``
  states their contracts) and run ``tests/contract`` against a new store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from ._loop import LoopSettings
from ._protocols import Executor, Store
from ._runner import FlushResult, GhostRunner
from ._types import (
    TRANSITIONS,
    VERSION,
    AgentKind,
    Attempt,
    Delivery,
    Device,
    DeviceEvent,
    EventKind,
    Outcome,
    Page,
    RetryPolicy,
    Rollout,
    Run,
    RunKey,
    RunRequest,
    RunState,
    Selector,
    Shell,
    Task,
    TaskQuery,
    TaskStatus,
    TaskSummary,
)
from .events import Event
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from .meshcentral import MeshCentralExecutor

__all__ = [
    # the backend author's side
    "TRANSITIONS",
    "AgentKind",
    "Attempt",
    # the application's side
    "Delivery",
    "Device",
    "DeviceEvent",
    "Event",
    "EventKind",
    "Executor",
    "FlushResult",
    "GhostRunner",
    "LoopSettings",
    "MeshCentralExecutor",
    "Outcome",
    "Page",
    "RetryPolicy",
    "Rollout",
    "Run",
    "RunKey",
    "RunRequest",
    "RunState",
    "SQLiteStore",
    "Selector",
    "Shell",
    "Store",
    "Task",
    "TaskQuery",
    "TaskStatus",
    "TaskSummary",
    "errors",
]

__version__ = VERSION


def __getattr__(name: str) -> Any:
    # libmeshctrl is heavy and only needed with MeshCentral: import it on first use
    if name == "MeshCentralExecutor":
        from .meshcentral import MeshCentralExecutor

        return MeshCentralExecutor
    raise AttributeError(f"module 'ghostrunner' has no attribute {name!r}")

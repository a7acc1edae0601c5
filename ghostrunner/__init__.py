"""GhostRunner: queue shell commands for MeshCentral devices that are offline, and run
them the moment each device comes online, recording every outcome.

The main entry point is :class:`GhostRunner`, built from a :class:`Store` (default
:class:`SQLiteStore`) and an :class:`Executor` (:class:`MeshCentralExecutor`, or
``ghostrunner.testing.FakeExecutor`` in tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._convert import make_converter, structure, task_from_seed, task_to_seed
from ._errors import (
    Conflict,
    ExecutorError,
    GhostRunnerError,
    IllegalTransition,
    NotDelivered,
    NotFound,
    OutcomeUnknown,
    PermanentError,
    StoreError,
    ValidationError,
)
from ._fanout import EventFanout
from ._loop import LoopSettings, Reconciler
from ._output import cap_output
from ._protocols import Executor, Store
from ._runner import FlushResult, GhostRunner
from ._tokens import hash_secret, new_token, verify_secret
from ._types import (
    AgentKind,
    Delivery,
    Device,
    DeviceEvent,
    EventKind,
    Outcome,
    Page,
    Run,
    RunKey,
    RunRequest,
    RunState,
    Scope,
    Shell,
    Task,
    TaskQuery,
    TaskStatus,
    TaskSummary,
    Token,
    utcnow,
)
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from .meshcentral import MeshCentralExecutor

__all__ = [
    "AgentKind",
    "Conflict",
    "Delivery",
    "Device",
    "DeviceEvent",
    "EventFanout",
    "EventKind",
    "Executor",
    "ExecutorError",
    "FlushResult",
    "GhostRunner",
    "GhostRunnerError",
    "IllegalTransition",
    "LoopSettings",
    "MeshCentralExecutor",
    "NotDelivered",
    "NotFound",
    "Outcome",
    "OutcomeUnknown",
    "Page",
    "PermanentError",
    "Reconciler",
    "Run",
    "RunKey",
    "RunRequest",
    "RunState",
    "SQLiteStore",
    "Scope",
    "Shell",
    "Store",
    "StoreError",
    "Task",
    "TaskQuery",
    "TaskStatus",
    "TaskSummary",
    "Token",
    "ValidationError",
    "cap_output",
    "hash_secret",
    "make_converter",
    "new_token",
    "structure",
    "task_from_seed",
    "task_to_seed",
    "utcnow",
    "verify_secret",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # libmeshctrl is heavy and only needed with MeshCentral: import it on first use
    if name == "MeshCentralExecutor":
        from .meshcentral import MeshCentralExecutor

        return MeshCentralExecutor
    raise AttributeError(f"module 'ghostrunner' has no attribute {name!r}")

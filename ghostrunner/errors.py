"""GhostRunner's exception hierarchy.

Every backend translates its own library's exceptions (sqlite3, libmeshctrl's
``ExceptionGroup``\\ s, timeouts) into these at its boundary, with ``raise ... from exc``,
so the loop and the HTTP layer only ever reason about this tree::

    GhostRunnerError
    ├── ValidationError          bad input: names the offending field
    ├── StoreError
    │   ├── NotFound             no such task / token
    │   ├── Conflict             a unique name or id is taken
    │   └── IllegalTransition    a run state change the state machine refuses
    │       └── NotOwner         the run is another runner's now (a lease was lost)
    └── ExecutorError
        ├── NotDelivered         the command certainly did not reach the device:
        │                        retry later, it is not an execution
        ├── OutcomeUnknown       the command may have run, its result can't be learned
        └── PermanentError       the command can never run as asked (access denied...)
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "ExecutorError",
    "GhostRunnerError",
    "IllegalTransition",
    "NotDelivered",
    "NotFound",
    "NotOwner",
    "OutcomeUnknown",
    "PermanentError",
    "StoreError",
    "ValidationError",
]


class GhostRunnerError(Exception):
    """Base class of every error GhostRunner raises on purpose."""


class ValidationError(GhostRunnerError, ValueError):
    """Input that cannot be accepted. ``field`` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class StoreError(GhostRunnerError):
    """A store operation failed."""


class NotFound(StoreError, LookupError):
    """The task, run or token does not exist."""


class Conflict(StoreError):
    """A value that must be unique (task id, token name) is already taken."""


class IllegalTransition(StoreError):
    """A run state change that the run state machine does not allow."""


class NotOwner(IllegalTransition):
    """The run is dispatched by another runner: this runner's lease ended and a survivor
    took the run over (see :mod:`ghostrunner.runners`). Nothing was changed; the new
    owner learns the outcome from the device's journal."""


class ExecutorError(GhostRunnerError):
    """A dispatch through an executor failed."""


class NotDelivered(ExecutorError):
    """The command did not reach the device (not connected, agent busy, session down).

    Temporary: the loop puts the run back to pending with a backoff. It is not an
    execution, so it is retried under every delivery policy.
    """


class OutcomeUnknown(ExecutorError):
    """The command may have reached the device, but its outcome can never be learned.

    Under ``at_most_once`` the run becomes ``lost``; under ``at_least_once`` it is sent
    again (up to ``max_attempts``). With ``recoverable``, the device keeps a record of
    the attempt: the loop keeps the run ``dispatched`` and asks the device again (a
    :class:`~ghostrunner.RunRequest` with ``recover``) until it answers or the run's
    recovery deadline passes.
    """

    def __init__(self, message: str = "", *, recoverable: bool = False) -> None:
        super().__init__(message)
        self.recoverable = recoverable


class PermanentError(ExecutorError):
    """The command can never run as asked (access denied, unknown device, bad shell)."""

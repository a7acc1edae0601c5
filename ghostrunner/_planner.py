"""Pure decisions: which runs start now, and what a dispatch's result does to its run.

Nothing here does I/O or reads a clock: the loop passes everything in, so each rule is
tested on its own with plain values (``tests/unit/test_planner.py``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

import attrs

from ._types import Delivery, Outcome, RetryPolicy, Run, RunState, Task
from .errors import ExecutorError, NotDelivered, OutcomeUnknown, PermanentError

__all__ = ["Decision", "decide", "plan_dispatches", "recover"]

_DEFAULT_RETRY = RetryPolicy()


def plan_dispatches(
    candidates: Sequence[Run],
    *,
    online: Collection[str],
    busy: Collection[str],
    slots: int,
    now: datetime,
) -> list[Run]:
    """Choose the runs to dispatch now.

    ``candidates`` come from the store's ``next_pending`` (for each device, its first
    ready run in submission order). A run is chosen only if it is pending, available and
    unexpired at ``now``, its device is online and has nothing in flight (agents have a
    single command slot), and at most one per device; then those available longest first
    (ties: oldest queued), up to ``slots`` (the global cap on commands in flight minus
    those already in flight).
    """
    if slots <= 0:
        return []
    seen: set[str] = set()
    chosen: list[Run] = []
    for run in candidates:
        if (
            run.state is not RunState.PENDING
            or run.node_id in seen
            or run.node_id not in online
            or run.node_id in busy
            or run.available_at > now
            or (run.expires_at is not None and run.expires_at <= now)
        ):
            continue
        seen.add(run.node_id)
        chosen.append(run)
    chosen.sort(key=lambda r: (r.available_at, r.queued_at))
    return chosen[:slots]


@attrs.frozen(kw_only=True)
class Decision:
    """What to record for a dispatched run.

    Either ``state`` is terminal (finish the run) or it is ``pending`` (release it,
    eligible again at ``available_at``; ``delivered`` says whether the attempt counts).
    """

    state: RunState
    outcome: Outcome | None = None
    error: str | None = None
    available_at: datetime | None = None
    delivered: bool = True


def _unknown(run: Run, task: Task, reason: str, now: datetime, retry: RetryPolicy) -> Decision:
    if task.delivery is Delivery.AT_LEAST_ONCE and run.attempts < task.max_attempts:
        return Decision(
            state=RunState.PENDING,
            error=f"{reason}; sending again (at_least_once)",
            available_at=now + retry.delay(run.attempts),
            delivered=True,
        )
    if task.delivery is Delivery.AT_LEAST_ONCE:
        reason = f"{reason}; gave up after {run.attempts} attempts"
    return Decision(state=RunState.LOST, error=reason)


def decide(
    run: Run,
    task: Task,
    result: Outcome | ExecutorError,
    *,
    now: datetime,
    retry: RetryPolicy = _DEFAULT_RETRY,
) -> Decision:
    """What the result of dispatching ``run`` (an :class:`Outcome` or an executor error)
    means for it, under ``task``'s delivery policy.

    * an outcome: timed_out if it says so, else succeeded when its exit code is one
      of the task's ``success_exit_codes``, failed otherwise;
    * ``NotDelivered``: back to pending with exponential backoff; not an attempt;
    * ``PermanentError``: failed, with the reason;
    * ``OutcomeUnknown``: ``lost`` under at_most_once; under at_least_once pending again
      with backoff while ``attempts < max_attempts``, else ``lost``.
    """
    if isinstance(result, Outcome):
        if result.timed_out:
            return Decision(state=RunState.TIMED_OUT, outcome=result)
        ok = task.succeeded(result.exit_code)
        return Decision(state=RunState.SUCCEEDED if ok else RunState.FAILED, outcome=result)
    if isinstance(result, NotDelivered):
        return Decision(
            state=RunState.PENDING,
            error=f"not delivered: {result}",
            available_at=now + retry.delay(run.undelivered + 1),
            delivered=False,
        )
    if isinstance(result, PermanentError):
        return Decision(state=RunState.FAILED, error=str(result))
    if isinstance(result, OutcomeUnknown):
        return _unknown(run, task, f"outcome unknown: {result}", now, retry)
    # any other ExecutorError: we cannot tell whether it ran, so assume it may have
    return _unknown(run, task, f"outcome unknown: {result!r}", now, retry)


def recover(
    run: Run, task: Task, *, now: datetime, retry: RetryPolicy = _DEFAULT_RETRY
) -> Decision:
    """What to do with a run found ``dispatched`` at start-up: the process that sent it
    died, so the command may have run and its outcome is gone."""
    return _unknown(
        run,
        task,
        "GhostRunner stopped while the command was in flight",
        now,
        retry,
    )

"""Pure decisions: which runs start now, and what a dispatch's result does to its run.

Nothing here does I/O or reads a clock: the loop passes everything in, so each rule is
tested on its own with plain values (``tests/unit/test_planner.py``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta

import attrs

from ._types import Delivery, Outcome, RetryPolicy, Rollout, Run, RunState, Task
from .errors import ExecutorError, NotDelivered, OutcomeUnknown, PermanentError

__all__ = [
    "Decision",
    "abort_reason",
    "decide",
    "decide_recovery",
    "plan_dispatches",
    "recover",
    "recovery_deadline",
    "rollout_budget",
]

RATE_WINDOW = timedelta(minutes=1)
"""``Rollout.per_minute`` counts the starts of any window this long."""

_DEFAULT_RETRY = RetryPolicy()


def rollout_budget(
    rollout: Rollout, *, in_flight: int, starts: Sequence[datetime], now: datetime
) -> tuple[int | None, datetime | None]:
    """How many more runs of a task may start at ``now`` under ``rollout`` (None: no
    limit), given its runs ``in_flight`` and the ``starts`` of its runs (any order),
    and, when the rate is what holds it back, the moment a start becomes possible.

    ``max_concurrent``: at most that many in flight. ``per_minute``: at most that many
    starts in any :data:`RATE_WINDOW`; a start at ``t`` frees its place at ``t`` + 1 min.
    """
    budget: int | None = None
    if rollout.max_concurrent is not None:
        budget = max(0, rollout.max_concurrent - in_flight)
    free_at = None
    if rollout.per_minute is not None:
        recent = sorted(t for t in starts if t > now - RATE_WINDOW)
        room = max(0, rollout.per_minute - len(recent))
        if room == 0:
            free_at = recent[len(recent) - rollout.per_minute] + RATE_WINDOW
        budget = room if budget is None else min(budget, room)
    return budget, free_at


def abort_reason(task: Task, counts: Mapping[RunState, int]) -> str | None:
    """Why the task must be aborted now, by its rollout's abort rule, if it must: over
    the runs finished with a known outcome, too many failed or timed out."""
    failed = counts.get(RunState.FAILED, 0) + counts.get(RunState.TIMED_OUT, 0)
    finished = failed + counts.get(RunState.SUCCEEDED, 0)
    return task.rollout.should_abort(finished, failed)


def plan_dispatches(
    candidates: Sequence[Run],
    *,
    online: Collection[str],
    busy: Collection[str],
    slots: int,
    now: datetime,
    budgets: Mapping[str, int] | None = None,
) -> list[Run]:
    """Choose the runs to dispatch now.

    ``candidates`` come from the store's ``next_pending`` (for each device, its first
    ready run in submission order). A run is chosen only if it is pending, available and
    unexpired at ``now``, its device is online and has nothing in flight (agents have a
    single command slot), and at most one per device; then those available longest first
    (ties: oldest queued), up to ``slots`` (the global cap on commands in flight minus
    those already in flight). ``budgets`` caps the runs chosen per task (its rollout's
    room: :func:`rollout_budget`); tasks absent from it are not capped.
    """
    if slots <= 0:
        return []
    seen: set[str] = set()
    chosen: list[Run] = []
    left = dict(budgets or {})
    for run in sorted(candidates, key=lambda r: (r.available_at, r.queued_at)):
        if (
            run.state is not RunState.PENDING
            or run.node_id in seen
            or run.node_id not in online
            or run.node_id in busy
            or run.available_at > now
            or (run.expires_at is not None and run.expires_at <= now)
        ):
            continue
        if run.task_id in left:
            if left[run.task_id] <= 0:
                continue
            left[run.task_id] -= 1
        seen.add(run.node_id)
        chosen.append(run)
        if len(chosen) == slots:
            break
    return chosen


@attrs.frozen(kw_only=True)
class Decision:
    """What to record for a dispatched run.

    Either ``state`` is terminal (finish the run), or it is ``pending`` (release it,
    eligible again at ``available_at``; ``delivered`` says whether the attempt counts),
    or it is ``dispatched``: the outcome is not known yet but the device keeps a record
    of the attempt, so the run stays as it is and the device is asked again for it (a
    recovery request) at ``available_at``.
    """

    state: RunState
    outcome: Outcome | None = None
    error: str | None = None
    available_at: datetime | None = None
    delivered: bool = True

    @property
    def recovering(self) -> bool:
        """The run stays dispatched and its device is asked again."""
        return self.state is RunState.DISPATCHED


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
    * ``OutcomeUnknown``: if ``recoverable`` (the device keeps a record of the
      attempt), stays dispatched and is asked again at once (:func:`decide_recovery`
      takes over); otherwise ``lost`` under at_most_once, and under at_least_once
      pending again with backoff while ``attempts < max_attempts``, else ``lost``.
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
        if result.recoverable:
            return Decision(state=RunState.DISPATCHED, available_at=now,
                            error=f"outcome unknown: {result}; asking the device")
        return _unknown(run, task, f"outcome unknown: {result}", now, retry)
    # any other ExecutorError: we cannot tell whether it ran, so assume it may have
    return _unknown(run, task, f"outcome unknown: {result!r}", now, retry)


def recovery_deadline(run: Run, task: Task, *, within: float) -> datetime:
    """Until when the device of a run whose outcome is unknown is asked for it: the
    run's ``expires_at`` if it has one, else ``within`` seconds after it was sent; never
    before the command could have finished (its start plus the task's timeout)."""
    sent = run.started_at or run.queued_at
    done = sent + timedelta(seconds=task.timeout)
    if run.expires_at is not None:
        return max(run.expires_at, done)
    return max(sent + timedelta(seconds=within), done)


def recover(
    run: Run, task: Task, *, now: datetime, retry: RetryPolicy = _DEFAULT_RETRY,
    deadline: datetime | None = None,
) -> Decision:
    """What to do with a run found ``dispatched`` at start-up: the process that sent it
    died, so the command may have run and its outcome is unknown here. Until
    ``deadline`` (default: none), ask its device (the run stays dispatched); after it,
    as an unknown outcome."""
    if deadline is not None and now < deadline:
        return Decision(state=RunState.DISPATCHED, available_at=now,
                        error="GhostRunner stopped while the command was in flight; "
                              "asking the device")
    return _unknown(
        run,
        task,
        "GhostRunner stopped while the command was in flight",
        now,
        retry,
    )


def decide_recovery(
    run: Run,
    task: Task,
    result: Outcome | ExecutorError,
    *,
    now: datetime,
    deadline: datetime,
    asked: int,
    retry: RetryPolicy = _DEFAULT_RETRY,
) -> Decision:
    """What the answer to a recovery request (the ``asked``-th for this run) means.

    * an outcome: the device's record (``recovered``), or the command ran now because
      the device proved it had never started: finished as :func:`decide` says;
    * ``NotDelivered`` (device away, agent busy, the attempt still running) or a
      recoverable ``OutcomeUnknown`` (no answer): ask again after a backoff, until
      ``deadline``; then the outcome is unknown;
    * anything else (no record, a wiped journal, an executor that keeps no record):
      the outcome is unknown: ``lost`` under at_most_once, sent again as a new attempt
      under at_least_once.
    """
    if isinstance(result, Outcome):
        return decide(run, task, result, now=now, retry=retry)
    retryable = isinstance(result, NotDelivered) or (
        isinstance(result, OutcomeUnknown) and result.recoverable
    )
    if retryable and now < deadline:
        return Decision(state=RunState.DISPATCHED, available_at=now + retry.delay(asked),
                        error=f"asking the device again: {result}")
    if retryable:
        reason = f"the device did not tell the outcome before {deadline:%Y-%m-%d %H:%M:%S}Z"
    else:
        reason = f"outcome unknown: {result}"
    return _unknown(run, task, reason, now, retry)

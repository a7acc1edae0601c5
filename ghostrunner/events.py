"""The event log: every change of a task and of its runs, in the order it happened.

A store writes an :class:`Event` **in the same transaction as the change** it tells of:
no change is stored without its event, and no event without its change, crash or not.
Each event has an ``id`` given by the store, increasing, and visible in that order: a
reader that has seen the event ``n`` never sees, later, an event with an id below ``n``
appear (ids may skip numbers, never fill them in later). So the last id read is a
complete cursor: :meth:`~ghostrunner.Store.events_after` with it returns exactly what
came since, and that is how ``GhostRunner.events()``, ``GET /events`` (Server-Sent
Events, ``Last-Event-ID``) and a webhook sender keeping its own cursor resume without
losing or repeating one. Old events are pruned (``prune_events``): a cursor older than
the retention misses what was pruned.

**Kinds.** Run-level events are about one run (``node_id`` set), task-level events
about the whole task (``node_id`` None); an operator's verb touching 10,000 runs writes
one task-level event with its ``count`` (and the node ids, when at most
:data:`NODES_LISTED`), not 10,000:

========================  =====  =========================================================
kind                      level  ``data``
========================  =====  =========================================================
``task.created``          task   ``name``, ``runs`` (how many), ``nodes`` (if few)
``run.claimed``           run    ``state`` (dispatched), ``attempts``
``run.finished``          run    ``state`` (succeeded, failed, timed_out, lost),
                                 ``attempts``, ``exit_code``, ``recovered`` (true only),
                                 ``error`` (if any, clipped)
``run.released``          run    ``state`` (pending; cancelled if its task was aborted
                                 meanwhile), ``attempts``, ``undelivered``,
                                 ``delivered``, ``error``
``runs.cancelled``        task   ``count``, ``nodes``, ``closed`` (the whole task)
``task.aborted``          task   ``reason``, ``count`` (runs cancelled), ``nodes``
``task.paused``           task   (nothing)
``task.resumed``          task   (nothing)
``runs.retried``          task   ``count``, ``nodes``, ``states`` (asked for)
``runs.expired``          task   ``count``, ``nodes``
``runs.added``            task   ``count``, ``nodes`` (a continuous task's new devices)
``task.deleted``          task   ``runs`` (how many it had)
========================  =====  =========================================================

An event is written only when something changed: a cancel that found no pending run
writes none (unless it closed the task), nor does pausing a paused task. ``data`` holds
JSON values only (str, int, bool, lists of str). The helpers below build it, so every
store writes the same.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import attrs

from ._types import Run, RunState, _aware

__all__ = [
    "KINDS",
    "NODES_LISTED",
    "RUNS_ADDED",
    "RUNS_CANCELLED",
    "RUNS_EXPIRED",
    "RUNS_RETRIED",
    "RUN_CLAIMED",
    "RUN_FINISHED",
    "RUN_RELEASED",
    "TASK_ABORTED",
    "TASK_CREATED",
    "TASK_DELETED",
    "TASK_PAUSED",
    "TASK_RESUMED",
    "Event",
    "clip",
    "created_data",
    "nodes_data",
    "released_data",
    "retried_data",
    "run_data",
]

TASK_CREATED: Final = "task.created"
RUN_CLAIMED: Final = "run.claimed"
RUN_FINISHED: Final = "run.finished"
RUN_RELEASED: Final = "run.released"
RUNS_CANCELLED: Final = "runs.cancelled"
TASK_ABORTED: Final = "task.aborted"
TASK_PAUSED: Final = "task.paused"
TASK_RESUMED: Final = "task.resumed"
RUNS_RETRIED: Final = "runs.retried"
RUNS_EXPIRED: Final = "runs.expired"
RUNS_ADDED: Final = "runs.added"
TASK_DELETED: Final = "task.deleted"

#: Every kind, in the order of the table above.
KINDS: Final = (
    TASK_CREATED, RUN_CLAIMED, RUN_FINISHED, RUN_RELEASED, RUNS_CANCELLED, TASK_ABORTED,
    TASK_PAUSED, TASK_RESUMED, RUNS_RETRIED, RUNS_EXPIRED, RUNS_ADDED, TASK_DELETED,
)

#: A task-level event lists the node ids it touched when there are at most this many.
NODES_LISTED: Final = 100
#: Characters kept of an error or a reason in ``data``.
TEXT_KEPT: Final = 500


@attrs.frozen(kw_only=True)
class Event:
    """One change, as the event log keeps it.

    Attributes:
        id: given by the store; increasing in the order events become visible.
        at: when the store wrote it (the time the change was made).
        kind: one of :data:`KINDS` (``run.finished``...).
        task_id: the task it is about.
        node_id: the run's device for run-level events; None for task-level ones.
        data: small, JSON values only; what it holds depends on ``kind`` (see the
            module's table).
    """

    id: int
    at: datetime = attrs.field(validator=_aware)
    kind: str
    task_id: str
    node_id: str | None = None
    data: Mapping[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The event as JSON values (``at`` in ISO 8601), as ``GET /events`` sends it."""
        return {
            "id": self.id,
            "at": self.at.isoformat().replace("+00:00", "Z"),
            "kind": self.kind,
            "task_id": self.task_id,
            "node_id": self.node_id,
            "data": dict(self.data),
        }


# ---------------------------------------------------------------- for store authors


def clip(text: str | None) -> str | None:
    """At most :data:`TEXT_KEPT` characters of ``text``, storable anywhere (no NUL, no
    lone surrogate)."""
    if text is None:
        return None
    text = text[:TEXT_KEPT].replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")


def nodes_data(nodes: Sequence[str], **extra: Any) -> dict[str, Any]:
    """A task-level event's ``data``: ``count``, ``nodes`` when few, and ``extra``."""
    data: dict[str, Any] = {"count": len(nodes)}
    if len(nodes) <= NODES_LISTED:
        data["nodes"] = list(nodes)
    data.update(extra)
    return data


def created_data(name: str, nodes: Sequence[str]) -> dict[str, Any]:
    """``task.created``'s ``data``."""
    data: dict[str, Any] = {"name": clip(name), "runs": len(nodes)}
    if len(nodes) <= NODES_LISTED:
        data["nodes"] = list(nodes)
    return data


def run_data(run: Run, **extra: Any) -> dict[str, Any]:
    """A run-level event's ``data``: the run's state and attempts, its exit code (if
    known), ``recovered`` (when true), its error (if any, clipped), and ``extra``."""
    data: dict[str, Any] = {"state": run.state.value, "attempts": run.attempts}
    if run.exit_code is not None:
        data["exit_code"] = run.exit_code
    if run.recovered:
        data["recovered"] = True
    if run.error is not None and run.state is not RunState.DISPATCHED:
        data["error"] = clip(run.error)
    data.update(extra)
    return data


def released_data(run: Run, delivered: bool) -> dict[str, Any]:
    """``run.released``'s ``data`` (``run`` as the release left it)."""
    return run_data(run, undelivered=run.undelivered, delivered=delivered)


def retried_data(runs: Sequence[Run], states: Collection[RunState]) -> dict[str, Any]:
    """``runs.retried``'s ``data``."""
    return nodes_data([r.node_id for r in runs], states=sorted(s.value for s in states))

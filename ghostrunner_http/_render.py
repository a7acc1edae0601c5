"""Turning GhostRunner values into the JSON the API answers with.

Seed field names are kept (``nodeids``, ``creation``, ``status``, ``online_devices``...)
and GhostRunner's extra fields are added next to them, so a client written against the
seed document finds everything where it expects it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.responses import Response

from ghostrunner import (
    Attempt,
    Device,
    GhostRunner,
    Rollout,
    Run,
    RunState,
    Selector,
    Task,
    TaskSummary,
)
from ghostrunner.runners import RunnerStatus
from ghostrunner.tokens import Token

__all__ = [
    "OK",
    "Envelope",
    "envelope",
    "render_attempt",
    "render_devices",
    "render_json",
    "render_run",
    "render_runner",
    "render_runners",
    "render_task",
    "render_task_with_runs",
    "render_token",
    "timestamp",
]

OK = "Request successful"


def timestamp(value: datetime | None) -> str | None:
    """ISO-8601 in UTC with a ``Z``, or None."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        try:
            value = value.astimezone(UTC)
        except OverflowError:  # beyond year 9999 (or before 1) in UTC: keep its offset
            return value.isoformat()
    return value.isoformat().replace("+00:00", "Z")


# (state, its JSON name), in the order answers list them; enum .value lookups add up
# over a page of tasks
_STATES = tuple((state, state.value) for state in RunState)


# the slow path's encoder: json.dumps(..., separators=...) would build one per answer
# (no cycle check: answers are trees built by this module)
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, check_circular=False,
                            separators=(",", ":"))


def render_json(content: Any) -> bytes:
    """``content`` as compact UTF-8 JSON: orjson (the same bytes as the standard
    library's compact output, ten times faster: 1.5 against 15 microseconds for a task),
    else the standard library for what orjson refuses: a lone surrogate (impossible from
    validated input, conceivable in device output: made harmless by "replace"), an
    integer beyond 64 bits."""
    try:
        return orjson.dumps(content)
    except TypeError:  # orjson.JSONEncodeError
        return _ENCODER.encode(content).encode("utf-8", "replace")


class Envelope(Response):
    """The seed's InfoResponse: ``{"status": ..., "message": ..., "data": ...}``."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return render_json(content)


def envelope(
    data: Any,
    *,
    status: int = 200,
    message: str = OK,
    headers: Mapping[str, str] | None = None,
) -> Envelope:
    """An answer in the envelope; ``status`` is both the HTTP status and ``status``."""
    return Envelope(
        {"status": status, "message": message, "data": data},
        status_code=status,
        headers=dict(headers) if headers else None,
    )


def render_selector(select: Selector | None) -> dict[str, Any] | None:
    """A task's selector, every field given (null: not given)."""
    if select is None:
        return None
    return {
        "group": select.group,
        "tags": list(select.tags),
        "tags_mode": select.tags_mode.value,
        "os": select.os,
        "name": select.name,
        "all": select.all,
    }


def render_rollout(rollout: Rollout) -> dict[str, Any]:
    """A task's rollout limits and abort rule (null: no limit, no rule)."""
    return {
        "max_concurrent": rollout.max_concurrent,
        "per_minute": rollout.per_minute,
        "abort_failed_pct": rollout.abort_failed_pct,
        "abort_min_finished": rollout.abort_min_finished,
    }


#: node ids a row of ``GET /task/list`` shows (the rest: ``GET /tasks/{id}``)
LIST_NODES = 100
#: output (characters, runs' and their attempts') after which a page of runs ends early
OUTPUT_PER_PAGE = 1_000_000


def render_task(task: Task, counts: Mapping[RunState, int], status: str, *,
                paused: bool = False, aborted: str | None = None,
                max_nodes: int | None = None) -> dict[str, Any]:
    """A task: the seed's TaskData fields, then GhostRunner's. ``nodeids`` are its
    explicit targets (the first ``max_nodes`` of them, if given: ``node_count`` says how
    many there are); the devices its selector chose have runs (and counts) too."""
    targets = task.targets
    truncated = max_nodes is not None and len(targets) > max_nodes
    return {
        "id": task.id,
        "name": task.name,
        "command": task.command,
        "nodeids": list(targets[:max_nodes] if truncated else targets),
        "node_count": len(targets),
        "nodes_truncated": truncated,
        "creation": timestamp(task.created_at),
        "status": status,
        "shell": task.shell.value,
        "run_as_user": task.run_as_user,
        "timeout": task.timeout,
        "not_before": timestamp(task.not_before),
        "expires_at": timestamp(task.expires_at),
        "max_attempts": task.max_attempts,
        "delivery": task.delivery.value,
        "select": render_selector(task.select),
        "continuous": task.continuous,
        "rollout": render_rollout(task.rollout),
        "success_exit_codes": list(task.success_exit_codes),
        "paused": paused,
        "aborted": aborted,
        "counts": {name: counts.get(state, 0) for state, name in _STATES},
    }


def render_summary(summary: TaskSummary, *, max_nodes: int | None = None) -> dict[str, Any]:
    """A task from the store, with its overall status and run counts."""
    return render_task(summary.task, summary.counts, summary.status.value,
                       paused=summary.paused, aborted=summary.aborted, max_nodes=max_nodes)


def render_attempt(attempt: Attempt, *, output: bool = False) -> dict[str, Any]:
    """One attempt of a run (``output=False``: but its output)."""
    out = {
        "number": attempt.number,
        "state": attempt.state.value,
        "started_at": timestamp(attempt.started_at),
        "finished_at": timestamp(attempt.finished_at),
        "exit_code": attempt.exit_code,
        "output": attempt.output,
        "output_truncated": attempt.output_truncated,
        "error": attempt.error,
        "recovered": attempt.recovered,
    }
    if not output:
        del out["output"]
    return out


def render_run(run: Run, *, output: bool = False,
               history: Sequence[Attempt] | None = None) -> dict[str, Any]:
    """One (task, device) run and everything known about it (``output=False``: but
    its output). ``history``: its attempts, oldest first, added as ``history``."""
    out: dict[str, Any] = {
        "nodeid": run.node_id,
        "state": run.state.value,
        "attempts": run.attempts,
        "undelivered": run.undelivered,
        "queued_at": timestamp(run.queued_at),
        "available_at": timestamp(run.available_at),
        "expires_at": timestamp(run.expires_at),
        "started_at": timestamp(run.started_at),
        "finished_at": timestamp(run.finished_at),
        "exit_code": run.exit_code,
        "output": run.output,
        "output_truncated": run.output_truncated,
        "error": run.error,
        "recovered": run.recovered,
    }
    if not output:
        del out["output"]
    if history is not None:
        out["history"] = [render_attempt(a, output=output) for a in history]
    return out


def render_task_with_runs(summary: TaskSummary, runs: Sequence[Run], *, output: bool = False,
                          attempts: Mapping[str, Sequence[Attempt]] | None = None,
                          start: int = 0, limit: int | None = None) -> dict[str, Any]:
    """A task and a page of its runs: up to ``limit`` (None: all) from the ``start``-th,
    each with its attempt history when ``attempts`` (node id -> attempts) is given. With
    ``output``, a page also ends once its runs' output passes ``OUTPUT_PER_PAGE``
    characters (after one run at least). ``runs_next_cursor`` continues it (None: the
    last page)."""
    end = len(runs) if limit is None else min(len(runs), start + limit)
    rendered = []
    size = 0
    index = start
    while index < end:
        run = runs[index]
        history = None if attempts is None else attempts.get(run.node_id, ())
        rendered.append(render_run(run, output=output, history=history))
        index += 1
        if output:
            size += len(run.output) + sum(len(a.output) for a in history or ())
            if size >= OUTPUT_PER_PAGE:
                break
    return {**render_summary(summary), "runs": rendered,
            "runs_next_cursor": str(index) if index < len(runs) else None}


def render_token(token: Token) -> dict[str, Any]:
    """A token, without its secret (only its hash is stored, and never shown)."""
    return {
        "name": token.name,
        "scope": token.scope.value,
        "created_at": timestamp(token.created_at),
        "last_used": timestamp(token.last_used),
        "builtin": token.builtin,
    }


def _device(dev: Device) -> dict[str, Any]:
    return {
        "name": dev.name or dev.node_id,
        "nodeid": dev.node_id,
        "os": dev.os,
        "group_id": dev.group_id,
        "group_name": dev.group_name,
        "tags": list(dev.tags),
        "agent_kind": dev.agent_kind.value,
    }


def render_devices(devices: Iterable[Device], *, connected: bool | None) -> dict[str, Any]:
    """The seed's PyOnlineDevices, plus whether the executor is connected."""
    ordered = sorted(devices, key=lambda d: ((d.name or d.node_id).lower(), d.node_id))
    online = [_device(d) for d in ordered if d.online]
    offline = [_device(d) for d in ordered if not d.online]
    return {
        "online_devices": online,
        "offline_devices": offline,
        "total_devices": len(online) + len(offline),
        "executor_connected": connected,
    }


def render_runner(gr: GhostRunner) -> dict[str, Any]:
    """``GET /``'s ``runner``: the runner answering, as it knows itself."""
    info = gr.runner
    left = gr.loop.lease_left
    return {
        "id": info.id,
        "name": info.name,
        "version": info.version,
        "started_at": timestamp(info.started_at),
        "shared": gr.loop.shared,
        "fenced": gr.loop.fenced,
        "lease_left": None if left is None else round(left, 3),
        "in_flight": len(gr.loop.in_flight | gr.loop.recovering),
    }


def render_runners(statuses: Iterable[RunnerStatus]) -> list[dict[str, Any]]:
    """``GET /``'s ``runners``: every runner sharing the store, as the store sees it."""
    return [
        {
            "id": s.info.id,
            "name": s.info.name,
            "version": s.info.version,
            "started_at": timestamp(s.info.started_at),
            "state": s.state.value,
            "heartbeat_at": timestamp(s.heartbeat_at),
            "heartbeat_age": round(s.heartbeat_age, 3),
            "expires_at": timestamp(s.expires_at),
            "runs": s.runs,
            "adopted_by": s.adopted_by,
        }
        for s in statuses
    ]

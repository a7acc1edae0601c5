"""An in-memory :class:`~ghostrunner.Store`: the reference for the store contract."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs

from ._types import (
    TERMINAL_STATES,
    TRANSITIONS,
    Outcome,
    Page,
    Run,
    RunKey,
    RunState,
    Task,
    TaskQuery,
    TaskSummary,
)
from .errors import Conflict, IllegalTransition, NotFound
from .tokens import Token

__all__ = ["InMemoryStore"]


class InMemoryStore:
    """A :class:`~ghostrunner.Store` that keeps everything in dicts.

    For tests, yours included. Its state survives :meth:`close` and :meth:`open`, so a
    test can "restart" GhostRunner over the same store; :meth:`reset` empties it.
    Inspect it with :attr:`tasks`, :attr:`runs` and :attr:`tokens`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self.tasks: dict[str, Task] = {}
        self.runs: dict[RunKey, Run] = {}
        self.tokens: dict[str, Token] = {}
        self._order: dict[str, int] = {}  # task id -> submission sequence
        self._by_node: dict[str, list[RunKey]] = {}  # submission order, pruned lazily
        self._seq = 0
        self.opened = 0
        self.closed = 0

    async def open(self) -> None:
        self.opened += 1

    async def close(self) -> None:
        self.closed += 1

    # ---------------------------------------------------------------- helpers

    def _run(self, key: RunKey) -> Run:
        try:
            return self.runs[key]
        except KeyError:
            raise NotFound(f"no run {key}") from None

    def _move(self, key: RunKey, to: RunState, **changes: Any) -> Run:
        run = self._run(key)
        if to not in TRANSITIONS.get(run.state, frozenset()):
            raise IllegalTransition(f"run {key}: {run.state} -> {to} is not allowed")
        new = attrs.evolve(run, state=to, **changes)
        self.runs[key] = new
        return new

    def _summary(self, task: Task) -> TaskSummary:
        counts = Counter(self.runs[RunKey(task.id, n)].state for n in task.targets)
        return TaskSummary(task=task, counts=dict(counts))

    # ---------------------------------------------------------------- tasks

    async def add_task(self, task: Task, now: datetime) -> None:
        if task.id in self.tasks:
            raise Conflict(f"task {task.id} exists")
        runs = task.first_runs(now)
        self._seq += 1
        self.tasks[task.id] = task
        self._order[task.id] = self._seq
        for run in runs:
            self.runs[run.key] = run
            self._by_node.setdefault(run.node_id, []).append(run.key)

    async def get_task(self, task_id: str) -> TaskSummary:
        try:
            return self._summary(self.tasks[task_id])
        except KeyError:
            raise NotFound(f"no task {task_id}") from None

    async def get_runs(self, task_id: str) -> Sequence[Run]:
        summary = await self.get_task(task_id)
        return [self.runs[RunKey(task_id, n)] for n in summary.task.targets]

    async def list_tasks(self, query: TaskQuery) -> Page:
        ordered = sorted(self.tasks.values(), key=lambda t: self._order[t.id], reverse=True)
        if query.cursor is not None:
            try:
                start = int(query.cursor)
            except ValueError:
                start = 0
            ordered = [t for t in ordered if self._order[t.id] < start]
        out: list[TaskSummary] = []
        for task in ordered:
            if query.name is not None and task.name != query.name:
                continue
            if query.node_id is not None and query.node_id not in task.targets:
                continue
            summary = self._summary(task)
            if query.state is not None and not summary.counts.get(query.state):
                continue
            if query.status is not None and summary.status != query.status:
                continue
            if len(out) == query.limit:
                return Page(items=tuple(out), next_cursor=str(self._order[out[-1].task.id]))
            out.append(summary)
        return Page(items=tuple(out), next_cursor=None)

    async def delete_task(self, task_id: str) -> None:
        runs = await self.get_runs(task_id)
        if any(r.state not in TERMINAL_STATES for r in runs):
            raise IllegalTransition(f"task {task_id} still has active runs")
        for run in runs:
            del self.runs[run.key]
            keys = self._by_node.get(run.node_id, [])
            if run.key in keys:  # next_pending may have pruned it already
                keys.remove(run.key)
        del self.tasks[task_id]
        del self._order[task_id]

    # ---------------------------------------------------------------- the loop's verbs

    async def next_pending(
        self, node_ids: Collection[str], now: datetime, *, limit: int | None = None
    ) -> Sequence[Run]:
        out: list[Run] = []
        for node in dict.fromkeys(node_ids):
            if limit is not None and len(out) >= limit:
                break
            keys = self._by_node.get(node)
            if not keys:
                continue
            # prune terminal runs from the front so this stays cheap
            while keys and self.runs[keys[0]].state in TERMINAL_STATES:
                keys.pop(0)
            for key in keys:
                run = self.runs[key]
                if (
                    run.state is RunState.PENDING
                    and run.available_at <= now
                    and (run.expires_at is None or run.expires_at > now)
                ):
                    out.append(run)
                    break
        return out

    async def claim_many(
        self, keys: Sequence[RunKey], now: datetime
    ) -> Sequence[tuple[Run, Task]]:
        before = dict(self.runs)
        out = []
        try:
            for key in keys:
                run = self._run(key)
                if run.state is RunState.PENDING:
                    run = self._move(
                        key, RunState.DISPATCHED, attempts=run.attempts + 1, started_at=now
                    )
                    out.append((run, self.tasks[key.task_id]))
        except BaseException:
            self.runs = before  # all or nothing, like one transaction
            raise
        return out

    async def finish(
        self,
        key: RunKey,
        state: RunState,
        now: datetime,
        *,
        outcome: Outcome | None = None,
        error: str | None = None,
    ) -> Run:
        if state not in TERMINAL_STATES:
            raise IllegalTransition(f"finish needs a terminal state, not {state}")
        if self._run(key).state is not RunState.DISPATCHED:
            raise IllegalTransition(f"run {key} is not dispatched")
        changes: dict[str, object] = {"finished_at": now, "error": error}
        if outcome is not None:
            changes.update(
                exit_code=outcome.exit_code,
                output=outcome.output,
                output_truncated=outcome.output_truncated,
            )
            if outcome.finished_at is not None:
                changes["finished_at"] = outcome.finished_at
            if outcome.started_at is not None:
                changes["started_at"] = outcome.started_at
        return self._move(key, state, **changes)

    async def release(
        self,
        key: RunKey,
        now: datetime,
        *,
        available_at: datetime,
        error: str,
        delivered: bool,
    ) -> Run:
        run = self._run(key)
        if run.state is not RunState.DISPATCHED:
            raise IllegalTransition(f"run {key} is not dispatched")
        if delivered:
            counts = {"attempts": run.attempts, "undelivered": run.undelivered}
        else:
            counts = {"attempts": run.attempts - 1, "undelivered": run.undelivered + 1}
        return self._move(
            key, RunState.PENDING, available_at=available_at, error=error, started_at=None,
            **counts,
        )

    async def cancel(
        self, task_id: str, node_ids: Collection[str] | None = None, *, now: datetime
    ) -> Sequence[Run]:
        runs = await self.get_runs(task_id)
        wanted = None if node_ids is None else set(node_ids)
        out = []
        for run in runs:
            if run.state is RunState.PENDING and (wanted is None or run.node_id in wanted):
                out.append(self._move(run.key, RunState.CANCELLED, finished_at=now))
        return out

    async def expire_due(self, now: datetime) -> int:
        due = [
            r.key
            for r in self.runs.values()
            if r.state is RunState.PENDING and r.expires_at is not None and r.expires_at <= now
        ]
        for key in due:
            self._move(
                key, RunState.EXPIRED, finished_at=now, error="expired before it could start"
            )
        return len(due)

    async def dispatched(self) -> Sequence[Run]:
        return [r for r in self.runs.values() if r.state is RunState.DISPATCHED]

    async def next_wakeup(self, now: datetime) -> datetime | None:
        times = [
            t
            for r in self.runs.values()
            if r.state is RunState.PENDING
            for t in (r.available_at, r.expires_at)
            if t is not None and t > now
        ]
        return min(times, default=None)

    async def counts(self) -> Mapping[RunState, int]:
        return dict(Counter(r.state for r in self.runs.values()))

    # ---------------------------------------------------------------- tokens

    async def add_token(self, token: Token) -> None:
        if token.name in self.tokens:
            raise Conflict(f"a token named {token.name!r} exists")
        if any(t.secret_hash == token.secret_hash for t in self.tokens.values()):
            raise Conflict("a token with this secret exists")
        self.tokens[token.name] = token

    async def token_by_hash(self, secret_hash: str) -> Token | None:
        for token in self.tokens.values():
            if token.secret_hash == secret_hash:
                return token
        return None

    async def list_tokens(self) -> Sequence[Token]:
        return sorted(self.tokens.values(), key=lambda t: t.created_at)

    async def delete_token(self, name: str) -> None:
        if self.tokens.pop(name, None) is None:
            raise NotFound(f"no token named {name!r}")

    async def touch_token(self, name: str, now: datetime) -> None:
        token = self.tokens.get(name)
        if token is not None:
            self.tokens[name] = attrs.evolve(token, last_used=now)

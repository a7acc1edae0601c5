"""An in-memory :class:`~ghostrunner.Store`: the reference for the store contract."""

from __future__ import annotations

from bisect import bisect_right, insort
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import attrs

from . import events as ev
from ._planner import rollout_budget
from ._types import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    Attempt,
    Outcome,
    Page,
    Run,
    RunKey,
    RunState,
    Task,
    TaskQuery,
    TaskSummary,
    retryable,
    utcnow,
)
from .audit import AuditEntry, AuditPage, AuditQuery
from .errors import Conflict, IllegalTransition, NotFound, NotOwner, ValidationError
from .runners import Adoption, LeaseState, Renewal, RunnerInfo, RunnerStatus
from .tokens import Token
from .webhooks import (
    DeliveryPage,
    DeliveryQuery,
    DeliveryStatus,
    NewDelivery,
    WebhookDelivery,
    clip_error,
)

__all__ = ["InMemoryStore", "SharedInMemoryStore"]


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
        self.nodes: dict[str, list[str]] = {}  # task id -> its runs' nodes, in order
        self.paused: set[str] = set()
        self.aborted: dict[str, str] = {}  # task id -> reason
        self.closed_tasks: set[str] = set()  # cancelled as a whole, or aborted
        self.history: dict[RunKey, list[Attempt]] = {}
        self.tokens: dict[str, Token] = {}
        self.audit: list[AuditEntry] = []
        self.events: list[ev.Event] = []
        self._event_seq = 0
        self._audit_seq = 0
        self.cursors: dict[str, int] = {}
        self.deliveries: dict[int, WebhookDelivery] = {}  # by id, in id order
        self._delivery_seq = 0
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
        counts = Counter(self.runs[RunKey(task.id, n)].state for n in self.nodes[task.id])
        return TaskSummary(
            task=task, counts=dict(counts), paused=task.id in self.paused,
            aborted=self.aborted.get(task.id), closed=task.id in self.closed_tasks,
        )

    def _task(self, task_id: str) -> Task:
        try:
            return self.tasks[task_id]
        except KeyError:
            raise NotFound(f"no task {task_id}") from None

    def _add(self, runs: Sequence[Run]) -> None:
        for run in runs:
            self.runs[run.key] = run
            self.nodes[run.task_id].append(run.node_id)
            # in submission order of the tasks: add_runs may add to an older task
            insort(self._by_node.setdefault(run.node_id, []), run.key,
                   key=lambda k: self._order[k.task_id])

    def _event(self, at: datetime, kind: str, task_id: str, node_id: str | None = None,
               data: Mapping[str, Any] | None = None) -> None:
        self._event_seq += 1
        self.events.append(ev.Event(id=self._event_seq, at=at, kind=kind, task_id=task_id,
                                    node_id=node_id, data=dict(data or {})))

    def _record(self, run: Run, state: RunState, error: str | None) -> None:
        attempt = Attempt(
            number=run.attempts, state=state, started_at=run.started_at,
            finished_at=run.finished_at, exit_code=run.exit_code, output=run.output,
            output_truncated=run.output_truncated, error=error, recovered=run.recovered,
        )
        self.history.setdefault(run.key, []).append(attempt)

    # ---------------------------------------------------------------- tasks

    async def add_task(
        self, task: Task, now: datetime, *, nodes: Sequence[str] | None = None,
        audit: AuditEntry | None = None,
    ) -> None:
        if task.id in self.tasks:
            raise Conflict(f"task {task.id} exists")
        runs = task.first_runs(now, nodes)
        self._seq += 1
        self.tasks[task.id] = task
        self.nodes[task.id] = []
        self._order[task.id] = self._seq
        self._add(runs)
        self._event(now, ev.TASK_CREATED, task.id,
                    data=ev.created_data(task.name, [r.node_id for r in runs]))
        if audit is not None:
            self._audit(audit)

    async def add_runs(
        self, task_id: str, node_ids: Sequence[str], now: datetime
    ) -> Sequence[Run]:
        task = self._task(task_id)
        if task_id in self.closed_tasks:
            return []
        have = set(self.nodes[task_id])
        new = [n for n in dict.fromkeys(node_ids) if n not in have]
        runs = task.first_runs(now, new)
        self._add(runs)
        if runs:
            self._event(now, ev.RUNS_ADDED, task_id,
                        data=ev.nodes_data([r.node_id for r in runs]))
        return runs

    async def pause(self, task_id: str, paused: bool) -> TaskSummary:
        task = self._task(task_id)
        if (task_id in self.paused) != paused:
            (self.paused.add if paused else self.paused.discard)(task_id)
            self._event(utcnow(), ev.TASK_PAUSED if paused else ev.TASK_RESUMED, task_id)
        return self._summary(task)

    async def abort(self, task_id: str, reason: str, now: datetime) -> Sequence[Run]:
        runs = await self.get_runs(task_id)
        self.aborted[task_id] = reason
        self.closed_tasks.add(task_id)
        out = [
            self._move(r.key, RunState.CANCELLED, finished_at=now, error=reason)
            for r in runs
            if r.state is RunState.PENDING
        ]
        self._event(now, ev.TASK_ABORTED, task_id,
                    data=ev.nodes_data([r.node_id for r in out], reason=ev.clip(reason)))
        return out

    async def retry(
        self, task_id: str, states: Collection[RunState], now: datetime
    ) -> Sequence[Run]:
        wanted = retryable(states)
        runs = await self.get_runs(task_id)
        reopened = task_id in self.closed_tasks or task_id in self.aborted
        self.aborted.pop(task_id, None)
        self.closed_tasks.discard(task_id)
        out = []
        for run in runs:
            if run.state in wanted:
                out.append(self._move(
                    run.key, RunState.PENDING, available_at=now, started_at=None,
                    expires_at=None,
                    finished_at=None, exit_code=None, output="", output_truncated=False,
                    error=None, recovered=False,
                ))
                keys = self._by_node.setdefault(run.node_id, [])
                if run.key not in keys:  # pruned while it was terminal
                    keys.append(run.key)
                    keys.sort(key=lambda k: self._order[k.task_id])
        if out or reopened:
            self._event(now, ev.RUNS_RETRIED, task_id, data=ev.retried_data(out, wanted))
        return out

    async def attempts(self, task_id: str) -> Mapping[str, Sequence[Attempt]]:
        self._task(task_id)
        return {
            node: list(self.history[RunKey(task_id, node)])
            for node in self.nodes[task_id]
            if RunKey(task_id, node) in self.history
        }

    async def open_continuous(self, now: datetime) -> Sequence[Task]:
        return [
            t for t in sorted(self.tasks.values(), key=lambda t: self._order[t.id])
            if t.continuous and t.id not in self.closed_tasks
            and (t.expires_at is None or t.expires_at > now)
        ]

    async def rollout_tasks(self) -> Sequence[Task]:
        return [
            t for t in sorted(self.tasks.values(), key=lambda t: self._order[t.id])
            if (t.rollout.max_concurrent is not None or t.rollout.per_minute is not None)
            and any(self.runs[RunKey(t.id, n)].state in ACTIVE_STATES for n in self.nodes[t.id])
        ]

    async def recent_starts(self, since: datetime) -> Sequence[tuple[str, datetime]]:
        limited = {t.id for t in self.tasks.values() if t.rollout.per_minute is not None}
        flying = [
            (r.task_id, r.started_at) for r in self.runs.values()
            if r.task_id in limited and r.state is RunState.DISPATCHED
            and r.started_at is not None and r.started_at > since
        ]
        done = [
            (key.task_id, a.started_at) for key, attempts in self.history.items()
            if key.task_id in limited for a in attempts
            if a.started_at is not None and a.started_at > since
        ]
        return flying + done

    async def get_task(self, task_id: str) -> TaskSummary:
        try:
            return self._summary(self.tasks[task_id])
        except KeyError:
            raise NotFound(f"no task {task_id}") from None

    async def get_runs(self, task_id: str) -> Sequence[Run]:
        self._task(task_id)
        return [self.runs[RunKey(task_id, n)] for n in self.nodes[task_id]]

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
            if query.node_id is not None and query.node_id not in self.nodes[task.id]:
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
        del self.nodes[task_id]
        for state in (self.paused, self.closed_tasks):
            state.discard(task_id)
        self.aborted.pop(task_id, None)
        for run in runs:
            self.history.pop(run.key, None)
        self._event(utcnow(), ev.TASK_DELETED, task_id, data={"runs": len(runs)})

    # ---------------------------------------------------------------- the loop's verbs

    async def next_pending(
        self,
        node_ids: Collection[str],
        now: datetime,
        *,
        limit: int | None = None,
        skip_tasks: Collection[str] = (),
    ) -> Sequence[Run]:
        skip = self.paused.union(skip_tasks)
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
                    and run.task_id not in skip
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
                if run.state is RunState.PENDING and key.task_id not in self.paused:
                    run = self._move(
                        key, RunState.DISPATCHED, attempts=run.attempts + 1, started_at=now,
                        recovered=False,
                    )
                    out.append((run, self.tasks[key.task_id]))
        except BaseException:
            self.runs = before  # all or nothing, like one transaction
            raise
        for run, _ in out:
            self._event(now, ev.RUN_CLAIMED, run.task_id, run.node_id, ev.run_data(run))
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
        if state not in TRANSITIONS[RunState.DISPATCHED]:
            raise IllegalTransition(f"run {key}: dispatched -> {state} is not allowed")
        changes: dict[str, object] = {"finished_at": now, "error": error}
        if outcome is not None:
            changes.update(
                exit_code=outcome.exit_code,
                output=outcome.output,
                output_truncated=outcome.output_truncated,
                recovered=outcome.recovered,
            )
            if outcome.finished_at is not None:
                changes["finished_at"] = outcome.finished_at
            if outcome.started_at is not None:
                changes["started_at"] = outcome.started_at
        run = self._move(key, state, **changes)
        self._record(run, state, error)
        self._event(now, ev.RUN_FINISHED, key.task_id, key.node_id, ev.run_data(run))
        return run

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
            self._record(attrs.evolve(run, finished_at=now), RunState.LOST, error)
        else:
            counts = {"attempts": run.attempts - 1, "undelivered": run.undelivered + 1}
        run = self._move(
            key, RunState.PENDING, available_at=available_at, error=error, started_at=None,
            **counts,
        )
        reason = self.aborted.get(key.task_id)
        if reason is not None:  # aborted while it was out: it goes no further
            run = self._move(key, RunState.CANCELLED, finished_at=now, error=reason)
        self._event(now, ev.RUN_RELEASED, key.task_id, key.node_id,
                    ev.released_data(run, delivered))
        return run

    async def cancel(
        self, task_id: str, node_ids: Collection[str] | None = None, *, now: datetime
    ) -> Sequence[Run]:
        runs = await self.get_runs(task_id)
        wanted = None if node_ids is None else set(node_ids)
        closed = wanted is None and task_id not in self.closed_tasks
        if wanted is None:
            self.closed_tasks.add(task_id)
        out = []
        for run in runs:
            if run.state is RunState.PENDING and (wanted is None or run.node_id in wanted):
                out.append(self._move(run.key, RunState.CANCELLED, finished_at=now))
        if out or closed:
            self._event(now, ev.RUNS_CANCELLED, task_id,
                        data=ev.nodes_data([r.node_id for r in out], closed=wanted is None))
        return out

    async def expire_due(self, now: datetime) -> int:
        due = [
            r.key
            for r in self.runs.values()
            if r.state is RunState.PENDING and r.expires_at is not None and r.expires_at <= now
        ]
        by_task: dict[str, list[str]] = {}
        for key in due:
            self._move(
                key, RunState.EXPIRED, finished_at=now, error="expired before it could start"
            )
            by_task.setdefault(key.task_id, []).append(key.node_id)
        for task_id in sorted(by_task, key=lambda t: self._order[t]):
            nodes = by_task[task_id]
            positions = {n: i for i, n in enumerate(self.nodes[task_id])}
            nodes.sort(key=positions.__getitem__)
            self._event(now, ev.RUNS_EXPIRED, task_id, data=ev.nodes_data(nodes))
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

    # ---------------------------------------------------------------- the event log

    async def events_after(self, after: int, limit: int = 1000) -> Sequence[ev.Event]:
        start = bisect_right(self.events, after, key=lambda e: e.id)
        return self.events[start : start + max(limit, 0)]

    async def last_event_id(self) -> int:
        return self.events[-1].id if self.events else 0

    async def prune_events(self, before: datetime) -> int:
        cut = 0
        while cut < len(self.events) and self.events[cut].at < before:
            cut += 1
        del self.events[:cut]
        return cut

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

    # ---------------------------------------------------------------- audit log

    async def record_audit(self, entry: AuditEntry) -> None:
        self._audit(entry)

    def _audit(self, entry: AuditEntry) -> None:
        self._audit_seq += 1
        self.audit.append(attrs.evolve(entry, id=self._audit_seq))

    async def query_audit(self, query: AuditQuery) -> AuditPage:
        try:
            before = query.before_id()
        except ValueError:
            raise ValidationError("cursor", "is not a cursor this server gave") from None
        found: list[AuditEntry] = []
        for entry in reversed(self.audit):
            assert entry.id is not None
            if (before is None or entry.id < before) and query.matches(entry):
                found.append(entry)
                if len(found) > query.limit:
                    break
        items = found[:query.limit]
        more = len(found) > query.limit and items
        return AuditPage(items, str(items[-1].id) if more else None)

    async def prune_audit(self, before: datetime) -> int:
        kept = [e for e in self.audit if e.at >= before]
        pruned = len(self.audit) - len(kept)
        self.audit = kept
        return pruned

    # ---------------------------------------------------------------- webhook outbox

    async def webhook_cursor(self, webhook: str, start: int) -> int:
        return self.cursors.setdefault(webhook, start)

    async def webhook_cursors(self) -> Mapping[str, int]:
        return dict(self.cursors)

    async def enqueue_deliveries(self, webhook: str, after: int, upto: int,
                                 deliveries: Sequence[NewDelivery], now: datetime) -> bool:
        if self.cursors.get(webhook) != after:
            return False
        known = {d.event_id for d in self.deliveries.values() if d.webhook == webhook}
        for new in deliveries:
            if new.event_id in known:
                continue
            known.add(new.event_id)
            self._delivery_seq += 1
            self.deliveries[self._delivery_seq] = WebhookDelivery(
                id=self._delivery_seq, webhook=webhook, event_id=new.event_id,
                kind=new.kind, msg_id=new.msg_id, body=new.body,
                status=DeliveryStatus.PENDING, created_at=now, started_at=now,
                next_attempt_at=now)
        self.cursors[webhook] = upto
        return True

    async def claim_deliveries(self, webhook: str, now: datetime, lease_until: datetime,
                               limit: int) -> Sequence[WebhookDelivery]:
        due = sorted(
            (d for d in self.deliveries.values()
             if d.webhook == webhook and d.status is DeliveryStatus.PENDING
             and d.next_attempt_at is not None and d.next_attempt_at <= now
             and (d.lease_until is None or d.lease_until <= now)),
            key=lambda d: (d.next_attempt_at, d.id))
        claimed = []
        for d in due[:max(0, limit)]:
            d = attrs.evolve(d, attempts=d.attempts + 1, lease_until=lease_until,
                             last_attempt_at=now)
            self.deliveries[d.id] = d
            claimed.append(d)
        return claimed

    async def finish_delivery(self, delivery_id: int, attempt: int, now: datetime, *,
                              status: DeliveryStatus, next_attempt_at: datetime | None,
                              http_status: int | None, error: str | None) -> bool:
        d = self.deliveries.get(delivery_id)
        status = DeliveryStatus(status)
        if status is DeliveryStatus.PENDING and next_attempt_at is None:
            raise ValidationError("next_attempt_at", "is required to stay pending")
        if d is None or d.status is not DeliveryStatus.PENDING:
            return False
        if status is not DeliveryStatus.DELIVERED and d.attempts != attempt:
            return False
        done = status is not DeliveryStatus.PENDING
        self.deliveries[delivery_id] = attrs.evolve(
            d, status=status, lease_until=None, last_status=http_status,
            last_error=clip_error(error),
            next_attempt_at=None if done else next_attempt_at,
            finished_at=now if done else None)
        return True

    async def query_deliveries(self, query: DeliveryQuery) -> DeliveryPage:
        try:
            before = query.before_id()
        except ValueError:
            raise ValidationError("cursor", "is not a cursor this server gave") from None
        found: list[WebhookDelivery] = []
        for d in sorted(self.deliveries.values(), key=lambda d: -d.id):
            if (before is None or d.id < before) and query.matches(d):
                found.append(d)
                if len(found) > query.limit:
                    break
        items = found[:query.limit]
        more = len(found) > query.limit and items
        return DeliveryPage(items, str(items[-1].id) if more else None)

    async def retry_delivery(self, delivery_id: int, now: datetime) -> WebhookDelivery:
        d = self.deliveries.get(delivery_id)
        if d is None:
            raise NotFound(f"no delivery {delivery_id}")
        if d.status is not DeliveryStatus.FAILED:
            raise IllegalTransition(f"delivery {delivery_id} is {d.status}, not failed")
        d = attrs.evolve(d, status=DeliveryStatus.PENDING, attempts=0, started_at=now,
                         next_attempt_at=now, lease_until=None, finished_at=None)
        self.deliveries[delivery_id] = d
        return d

    async def prune_deliveries(self, delivered_before: datetime,
                               failed_before: datetime) -> int:
        cutoff = {DeliveryStatus.DELIVERED: delivered_before,
                  DeliveryStatus.FAILED: failed_before}
        doomed = [d.id for d in self.deliveries.values()
                  if d.status in cutoff and d.finished_at is not None
                  and d.finished_at < cutoff[d.status]]
        for i in doomed:
            del self.deliveries[i]
        return len(doomed)

    async def delivery_counts(self) -> Mapping[str, Mapping[DeliveryStatus, int]]:
        out: dict[str, Counter[DeliveryStatus]] = {}
        for d in self.deliveries.values():
            out.setdefault(d.webhook, Counter())[d.status] += 1
        return {w: dict(c) for w, c in out.items()}


@attrs.define
class _RunnerRow:
    info: RunnerInfo
    heartbeat_at: datetime
    expires_at: datetime
    stopped: bool = False
    ended_at: datetime | None = None
    adopted_by: str | None = None


class SharedInMemoryStore(InMemoryStore):
    """An :class:`InMemoryStore` that several runners (GhostRunners in one process)
    share, as they would share a PostgreSQL database: it keeps runner leases
    (:class:`~ghostrunner.runners.Leases`: the reference for the contract tests of that
    capability), records the owner of each dispatched run, refuses a claim of a device
    that has a run dispatched, and leaves such a device out of :meth:`next_pending`.

    Args:
        clock: the store's clock, by which leases are counted (a
            :class:`~ghostrunner.testing.FakeClock` in tests; the runners' clock too).
    """

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self.clock = clock
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.runner_rows: dict[str, _RunnerRow] = {}
        self.owner: dict[RunKey, str | None] = {}  # the runner that dispatched each run last

    def _busy(self, node: str) -> bool:
        return any(self.runs[k].state is RunState.DISPATCHED for k in self._by_node.get(node, ()))

    async def next_pending(
        self,
        node_ids: Collection[str],
        now: datetime,
        *,
        limit: int | None = None,
        skip_tasks: Collection[str] = (),
    ) -> Sequence[Run]:
        idle = [n for n in dict.fromkeys(node_ids) if not self._busy(n)]
        return await super().next_pending(idle, now, limit=limit, skip_tasks=skip_tasks)

    async def claim_many(
        self, keys: Sequence[RunKey], now: datetime, *, runner: str | None = None
    ) -> Sequence[tuple[Run, Task]]:
        for key in keys:
            self._run(key)  # NotFound before anything changes
        # the tasks' rollout limits, over every runner: the keys past a task's room are
        # left out (in key order, as PostgresStore leaves them out)
        room = self._room({k.task_id for k in keys}, now)
        within = []
        for key in keys:
            left = room.get(key.task_id)
            if left is not None:
                if left <= 0:
                    continue
                room[key.task_id] = left - 1
            within.append(key)
        out = []
        for key in within:
            if self._busy(key.node_id):  # one dispatched run per device, whoever sent it
                continue
            for run, task in await super().claim_many([key], now):
                self.owner[run.key] = runner
                out.append((run, task))
        return out

    def _room(self, task_ids: Collection[str], now: datetime) -> dict[str, int]:
        """How many more runs of each limited task of ``task_ids`` may start at ``now``:
        its runs dispatched now and its starts in the last minute count, whoever made
        them (as PostgresStore counts them)."""
        room: dict[str, int] = {}
        for task_id in task_ids:
            task = self.tasks.get(task_id)
            if task is None or (task.rollout.max_concurrent is None
                                and task.rollout.per_minute is None):
                continue
            runs = [self.runs[RunKey(task_id, n)] for n in self.nodes[task_id]]
            flying = [r for r in runs if r.state is RunState.DISPATCHED]
            starts = [r.started_at for r in flying if r.started_at is not None]
            starts += [a.started_at for r in runs for a in self.history.get(r.key, ())
                       if a.started_at is not None]
            budget, _ = rollout_budget(task.rollout, in_flight=len(flying), starts=starts,
                                       now=now)
            if budget is not None:
                room[task_id] = budget
        return room

    def _check_owner(self, key: RunKey, runner: str | None) -> None:
        run = self._run(key)
        owner = self.owner.get(key)
        if runner is not None and run.state is RunState.DISPATCHED and owner != runner:
            who = "no runner" if owner is None else f"runner {owner}"
            raise NotOwner(f"run {key} is dispatched by {who}, not by {runner}")

    async def finish(
        self,
        key: RunKey,
        state: RunState,
        now: datetime,
        *,
        outcome: Outcome | None = None,
        error: str | None = None,
        runner: str | None = None,
    ) -> Run:
        if state in TERMINAL_STATES:
            self._check_owner(key, runner)
        return await super().finish(key, state, now, outcome=outcome, error=error)

    async def release(
        self,
        key: RunKey,
        now: datetime,
        *,
        available_at: datetime,
        error: str,
        delivered: bool,
        runner: str | None = None,
    ) -> Run:
        self._check_owner(key, runner)
        return await super().release(key, now, available_at=available_at, error=error,
                                     delivered=delivered)

    # ---------------------------------------------------------------- Leases

    def _alive(self, row: _RunnerRow, now: datetime) -> bool:
        return row.ended_at is None and not row.stopped and row.expires_at > now

    def _peers(self, runner_id: str, now: datetime) -> int:
        return sum(1 for rid, row in self.runner_rows.items()
                   if rid != runner_id and self._alive(row, now))

    async def register(self, runner: RunnerInfo, lease: float) -> None:
        now = self.clock()
        self.runner_rows[runner.id] = _RunnerRow(
            info=runner, heartbeat_at=now, expires_at=now + timedelta(seconds=lease))

    async def renew(self, runner_id: str, lease: float) -> Renewal:
        now = self.clock()
        row = self.runner_rows.get(runner_id)
        held = row is not None and row.ended_at is None and not row.stopped
        if held:
            assert row is not None
            row.heartbeat_at = now
            row.expires_at = now + timedelta(seconds=lease)
        return Renewal(held=held, peers=self._peers(runner_id, now))

    async def adopt(self, runner_id: str, grace: float) -> Adoption:
        now = self.clock()
        dead = [
            rid for rid, row in self.runner_rows.items()
            if rid != runner_id and row.ended_at is None
            and (row.stopped or row.expires_at < now - timedelta(seconds=grace))
        ]
        for rid in dead:
            row = self.runner_rows[rid]
            row.ended_at, row.adopted_by = now, runner_id
        ended = {rid for rid, row in self.runner_rows.items() if row.ended_at is not None}
        runs = []
        for key, run in self.runs.items():
            owner = self.owner.get(key)
            if run.state is RunState.DISPATCHED and (owner is None or owner in ended):
                self.owner[key] = runner_id
                runs.append(run)
        live = [row.expires_at for rid, row in self.runner_rows.items()
                if rid != runner_id and row.ended_at is None and not row.stopped]
        next_in = None
        if live:
            next_in = max(0.0, (min(live) - now).total_seconds() + grace)
        runs.sort(key=lambda r: (r.started_at or r.queued_at, r.node_id))
        return Adoption(runs=runs, runners=dead, next_in=next_in,
                        peers=self._peers(runner_id, now))

    async def retire(self, runner_id: str) -> None:
        row = self.runner_rows.get(runner_id)
        if row is not None:
            row.stopped = True
            row.expires_at = self.clock()

    async def runners(self) -> Sequence[RunnerStatus]:
        now = self.clock()
        out = []
        for rid, row in self.runner_rows.items():
            if row.ended_at is not None and row.ended_at <= now - timedelta(hours=1):
                continue
            if row.stopped:
                state = LeaseState.STOPPED
            elif row.adopted_by is not None:
                state = LeaseState.ADOPTED
            else:
                state = LeaseState.ALIVE if row.expires_at > now else LeaseState.EXPIRED
            runs = sum(1 for key, owner in self.owner.items()
                       if owner == rid and self.runs.get(key) is not None
                       and self.runs[key].state is RunState.DISPATCHED)
            out.append(RunnerStatus(
                info=row.info, state=state, heartbeat_at=row.heartbeat_at,
                heartbeat_age=max(0.0, (now - row.heartbeat_at).total_seconds()),
                expires_at=row.expires_at, runs=runs, adopted_by=row.adopted_by,
            ))
        out.sort(key=lambda s: (s.info.started_at, s.info.id))
        return out

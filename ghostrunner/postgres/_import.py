"""A bulk import into an empty GhostRunner database on PostgreSQL (``ghostrunner db
migrate``): tasks with their runs, attempts and flags, API tokens, the audit log, the
event log (ids kept: a client's ``Last-Event-ID`` and the webhooks' cursors stay valid)
and the webhook outbox (cursors and deliveries, ids kept), exactly as another store
holds them. Not part of the :class:`~ghostrunner.Store` protocol: a tool's door.

Everything goes in **one transaction** on one connection of its own: the schema is
created if missing, the target is checked empty (no task, no token), every row is
written, then the runs per task and per state are counted back and compared with what
was given. Any difference, or any error, rolls everything back. Runs keep their state as
given, ``dispatched`` included (the next start of a runner asks their devices what
became of them: outcome recovery).
"""

# ruff: noqa: S608
# (SQL built from this module's constants only; every value is a bound parameter.)

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterable, Mapping, Sequence
from typing import Any, Final

import attrs
import psycopg
from psycopg.types.json import Jsonb

from .. import events as ev
from .._types import Attempt, Run, RunState, TaskSummary
from ..audit import AuditEntry
from ..errors import Conflict, StoreError
from ..tokens import Token
from ..webhooks import WebhookDelivery
from . import _queries as q
from ._schema import migrate


@attrs.frozen(kw_only=True)
class TaskRecord:
    """One task as a store holds it: its summary (task, flags), its runs in target
    order, and the attempt history of each run (by node id)."""

    summary: TaskSummary
    runs: Sequence[Run]
    attempts: Mapping[str, Sequence[Attempt]] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class ImportReport:
    """What an import wrote (or, dry, would have written)."""

    tasks: int
    runs: int
    attempts: int
    tokens: int
    states: Mapping[RunState, int]
    audit: int = 0
    """Audit log entries."""
    events: int = 0
    """Events of the event log."""
    webhooks: int = 0
    """Webhook cursors."""
    deliveries: int = 0
    """Deliveries of the webhook outbox."""
    """Runs per state."""
    dry_run: bool = False


_RUN_INSERT: Final = """
INSERT INTO runs(task_seq, node, position, state, attempts, undelivered, queued_at,
                 available_at, expires_at, started_at, finished_at, exit_code, output,
                 output_truncated, error, recovered)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""
_ATTEMPT_INSERT: Final = """
INSERT INTO attempts(task_seq, node, number, state, started_at, finished_at, exit_code,
                     output, output_truncated, error, recovered)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""
_TOKEN_INSERT: Final = f"""
INSERT INTO tokens({q.TOKEN_COLS}) VALUES (%s, %s, %s, %s, %s, %s)
"""
_AUDIT_INSERT: Final = """
INSERT INTO audit(at, token, address, method, route, task_id, status, counts)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
"""
_TABLES: Final = ("tasks, runs, attempts, task_counts, tokens, audit, events, event_inbox, "
                   "webhook_cursors, webhook_deliveries")
#: Events and deliveries keep their ids; the identities then go on after the largest.
_EVENT_INSERT: Final = """
INSERT INTO events(id, at, kind, task_id, node_id, data) OVERRIDING SYSTEM VALUE
VALUES (%s, %s, %s, %s, %s, %s)
"""
_CURSOR_INSERT: Final = "INSERT INTO webhook_cursors(webhook, event_id) VALUES (%s, %s)"
_DELIVERY_INSERT: Final = """
INSERT INTO webhook_deliveries(id, webhook, event_id, kind, msg_id, body, status, attempts,
    created_at, started_at, next_attempt_at, lease_until, last_attempt_at, last_status,
    last_error, finished_at) OVERRIDING SYSTEM VALUE
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""
_GO_ON: Final = ("SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"
                 " HAVING count(*) > 0")


class _DryRun(Exception):
    """Rolls the dry run's transaction back."""


async def import_into(
    conn: psycopg.AsyncConnection[Any],
    records: AsyncIterable[TaskRecord],
    tokens: Sequence[Token],
    *,
    audit: Sequence[AuditEntry] = (),
    events: Sequence[ev.Event] = (),
    webhooks: Mapping[str, int] | None = None,
    deliveries: Sequence[WebhookDelivery] = (),
    dry_run: bool = False,
) -> ImportReport:
    """Write ``records`` (in submission order, oldest first), ``tokens``, the ``audit``
    log (oldest first), the ``events`` (oldest first), the ``webhooks``' cursors and
    their ``deliveries`` into the empty database of ``conn``, in one transaction (rolled
    back if ``dry_run``).

    Raises:
        Conflict: the database already has tasks or tokens.
        StoreError: the counts read back differ from what was given (nothing written).
    """
    report: ImportReport | None = None
    try:
        async with conn.transaction():
            report = await _import(conn, records, tokens, audit, dry_run=dry_run)
            n_events, n_webhooks, n_deliveries = await _add_logs(
                conn, events, webhooks or {}, deliveries)
            report = attrs.evolve(report, events=n_events, webhooks=n_webhooks,
                                  deliveries=n_deliveries)
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    assert report is not None
    return report


async def _import(
    conn: psycopg.AsyncConnection[Any],
    records: AsyncIterable[TaskRecord],
    tokens: Sequence[Token],
    audit: Sequence[AuditEntry],
    *,
    dry_run: bool,
) -> ImportReport:
    await conn.execute("SET LOCAL TIME ZONE 'UTC'")
    await migrate(conn)  # a savepoint: the schema commits with the rows, or not at all
    # nobody writes meanwhile (a runner started on the target would wait for us)
    await conn.execute(f"LOCK TABLE {_TABLES} IN SHARE ROW EXCLUSIVE MODE")
    cur = await conn.execute(
        "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM tokens), "
        "(SELECT count(*) FROM events) + (SELECT count(*) FROM event_inbox), "
        "(SELECT count(*) FROM webhook_deliveries)")
    found = await cur.fetchone()
    assert found is not None
    if any(found):
        raise Conflict(
            f"the target database is not empty ({found[0]} tasks, {found[1]} tokens, "
            f"{found[2]} events, {found[3]} webhook deliveries): migrate into an empty "
            "database"
        )
    expected: dict[int, Counter[str]] = {}
    states: Counter[RunState] = Counter()
    n_tasks = n_runs = n_attempts = 0
    async for record in records:
        seq = await _add_task(conn, record)
        counts = Counter(run.state.value for run in record.runs)
        expected[seq] = counts
        states.update(run.state for run in record.runs)
        n_tasks += 1
        n_runs += len(record.runs)
        n_attempts += await _add_runs(conn, seq, record)
    if tokens:
        async with conn.cursor() as tcur:
            await tcur.executemany(_TOKEN_INSERT, [
                (t.name, t.secret_hash, t.scope.value, q.ts(t.created_at), q.tso(t.last_used),
                 t.builtin) for t in tokens
            ])
    if audit:
        async with conn.cursor() as acur:
            await acur.executemany(_AUDIT_INSERT, [
                (q.ts(e.at), e.token, e.address, e.method, e.route, e.task_id, e.status,
                 Jsonb(dict(e.counts))) for e in audit
            ])
    await _verify(conn, expected, n_attempts, len(tokens))
    cur = await conn.execute("SELECT count(*) FROM audit")
    row = await cur.fetchone()
    if row is None or row[0] != len(audit):
        raise StoreError("the audit entries read back differ from those written")
    return ImportReport(tasks=n_tasks, runs=n_runs, attempts=n_attempts, tokens=len(tokens),
                        states=dict(states), audit=len(audit), dry_run=dry_run)


async def _add_task(conn: psycopg.AsyncConnection[Any], record: TaskRecord) -> int:
    summary = record.summary
    task = summary.task
    params = q.task_params(task, task.created_at)
    row = await (await conn.execute(q.ADD_TASK_SQL, params)).fetchone()
    if row is None:
        raise Conflict(f"task {task.id} given twice")
    seq = int(row[0])
    await conn.execute(
        "UPDATE tasks SET aborted = %s, closed = %s WHERE seq = %s",
        (q.text(summary.aborted), summary.closed, seq),
    )
    counts = Counter(run.state.value for run in record.runs)
    columns = ", ".join(q.STATES)
    await conn.execute(
        f"INSERT INTO task_counts(task_seq, total, paused, aborted, {columns}) "
        f"VALUES (%s, %s, %s, %s, {', '.join(['%s'] * len(q.STATES))})",
        (seq, len(record.runs), summary.paused, summary.aborted is not None,
         *(counts.get(s.value, 0) for s in q.STATES)),
    )
    return seq


async def _add_runs(conn: psycopg.AsyncConnection[Any], seq: int, record: TaskRecord) -> int:
    """The record's runs and attempts; the number of attempts."""
    nodes = {run.node_id for run in record.runs}
    unknown = set(record.attempts) - nodes
    if unknown:
        raise StoreError(f"task {record.summary.task.id}: attempts of no run "
                         f"({sorted(unknown)[0]!r})")
    async with conn.cursor() as cur:
        await cur.executemany(_RUN_INSERT, [
            (seq, r.node_id, i, r.state.value, r.attempts, r.undelivered, q.ts(r.queued_at),
             q.ts(r.available_at), q.tso(r.expires_at), q.tso(r.started_at),
             q.tso(r.finished_at), r.exit_code, q.blob(r.output), r.output_truncated,
             q.text(r.error), r.recovered)
            for i, r in enumerate(record.runs)
        ])
        rows = [
            (seq, node, a.number, a.state.value, q.tso(a.started_at), q.tso(a.finished_at),
             a.exit_code, q.blob(a.output), a.output_truncated, q.text(a.error), a.recovered)
            for node, history in record.attempts.items() for a in history
        ]
        if rows:
            await cur.executemany(_ATTEMPT_INSERT, rows)
    return len(rows)


async def _verify(
    conn: psycopg.AsyncConnection[Any],
    expected: Mapping[int, Counter[str]],
    attempts: int,
    tokens: int,
) -> None:
    """The rows counted back, per task and state, against what was written."""
    found: dict[int, Counter[str]] = {seq: Counter() for seq in expected}
    cur = await conn.execute("SELECT task_seq, state, count(*) FROM runs GROUP BY 1, 2")
    for seq, state, n in await cur.fetchall():
        found.setdefault(seq, Counter())[state] = n
    if found != {seq: +c for seq, c in expected.items()}:
        raise StoreError("the runs read back differ from the runs written: nothing imported")
    columns = ", ".join(f"sum({s.value})" for s in q.STATES)
    cur = await conn.execute(f"SELECT {columns} FROM task_counts")
    row = await cur.fetchone()
    total: Counter[str] = sum(expected.values(), Counter())
    if row is not None and any((n or 0) != total.get(s.value, 0)
                               for s, n in zip(q.STATES, row, strict=True)):
        raise StoreError("the task counts differ from the runs written: nothing imported")
    cur = await conn.execute("SELECT (SELECT count(*) FROM attempts), "
                             "(SELECT count(*) FROM tokens)")
    counted = await cur.fetchone()
    if counted is None or (counted[0], counted[1]) != (attempts, tokens):
        raise StoreError("the attempts or tokens read back differ from those written: "
                         "nothing imported")


async def _add_logs(
    conn: psycopg.AsyncConnection[Any], events: Sequence[ev.Event],
    webhooks: Mapping[str, int], deliveries: Sequence[WebhookDelivery],
) -> tuple[int, int, int]:
    """The event log and the webhook outbox, ids kept, then counted back."""
    async with conn.cursor() as cur:
        if events:
            await cur.executemany(_EVENT_INSERT, [
                (e.id, q.ts(e.at), e.kind, e.task_id, e.node_id, Jsonb(dict(e.data)))
                for e in events])
        if webhooks:
            await cur.executemany(_CURSOR_INSERT, list(webhooks.items()))
        if deliveries:
            await cur.executemany(_DELIVERY_INSERT, [
                (d.id, d.webhook, d.event_id, d.kind, d.msg_id, d.body, d.status.value,
                 d.attempts, q.ts(d.created_at), q.ts(d.started_at), q.tso(d.next_attempt_at),
                 q.tso(d.lease_until), q.tso(d.last_attempt_at), d.last_status,
                 q.text(d.last_error), q.tso(d.finished_at)) for d in deliveries])
    for table in ("events", "webhook_deliveries"):
        await conn.execute(_GO_ON.format(table=table))
    row = await (await conn.execute(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM webhook_cursors), "
        "(SELECT count(*) FROM webhook_deliveries)")).fetchone()
    if row != (len(events), len(webhooks), len(deliveries)):
        raise StoreError("the events or webhook deliveries read back differ from those "
                         "written")
    return len(events), len(webhooks), len(deliveries)

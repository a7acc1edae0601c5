"""``ghostrunner db migrate``: copy a SQLite database into an empty PostgreSQL one.

Read through the SQLite store's public verbs (every page of ``list_tasks``, each task's
``get_runs`` and ``attempts``, ``list_tokens``), written by
:meth:`ghostrunner.postgres.PostgresStore.import_all` in one transaction on the target,
then checked through the PostgreSQL store's verbs: every task's counts per state and
flags, the totals per state, the tokens.

Opening the SQLite store takes its lock (``<db>.lock``): a GhostRunner serving it makes
the command refuse, and no GhostRunner can start on it while the copy runs.

Exit status: 0 copied (or, ``--dry-run``, would be); 2 usage (a bad URL, no such
source file); 3 refused or failed (source in use, target not empty, a database error,
a difference found by the check).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO, TypeVar

from ghostrunner import RunState, SQLiteStore, TaskQuery, TaskSummary
from ghostrunner.audit import AuditEntry, AuditQuery
from ghostrunner.errors import Conflict, GhostRunnerError
from ghostrunner.events import Event
from ghostrunner.webhooks import DeliveryQuery, WebhookDelivery

from ._logging import redact_url
from .config import is_postgres_url, sqlite_path

if TYPE_CHECKING:
    from ghostrunner.postgres import ImportReport, PostgresStore, TaskRecord

__all__ = ["add_db_parser"]

EXIT_OK, EXIT_USAGE, EXIT_FAILED = 0, 2, 3

MIGRATE_HELP = """\
Copy an existing SQLite database into an empty PostgreSQL database: every task (with
its selector, rollout, paused/aborted/closed flags), every run (every field and state),
the attempt history, and the API tokens (their hashes and scopes: the same secrets keep
working). Stop the GhostRunner using the SQLite database first. The copy is one
transaction on the target; then the runs per task and per state are compared and a
summary printed. Runs left dispatched stay dispatched: the first start on PostgreSQL
asks their devices what became of them.

    ghostrunner db migrate --from sqlite:///var/lib/ghostrunner/ghostrunner.db \\
        --to postgresql://ghostrunner:PASSWORD@db.example.com/ghostrunner

The URLs may also come from GHOSTRUNNER_MIGRATE_FROM / GHOSTRUNNER_MIGRATE_TO (keeps the
password off the command line).
"""

_PAGE = 1000


def add_db_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = sub.add_parser("db", help="database tools (migrate SQLite to PostgreSQL)")
    dsub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    p = dsub.add_parser("migrate", help="copy a SQLite database into an empty PostgreSQL one",
                        description=MIGRATE_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", metavar="SQLITE",
                   help="sqlite:///path/to/ghostrunner.db, or the file's path "
                        "(env GHOSTRUNNER_MIGRATE_FROM)")
    p.add_argument("--to", dest="target", metavar="POSTGRESQL",
                   help="postgresql://user:password@host[:port]/database "
                        "(env GHOSTRUNNER_MIGRATE_TO)")
    p.add_argument("--dry-run", action="store_true",
                   help="read and write it all in a transaction that is rolled back: report "
                        "what would be copied, change nothing")
    p.set_defaults(handler=cmd_db_migrate)


def cmd_db_migrate(args: argparse.Namespace, out: TextIO) -> int:
    import os
    import sys

    source = args.source or os.environ.get("GHOSTRUNNER_MIGRATE_FROM")
    target = args.target or os.environ.get("GHOSTRUNNER_MIGRATE_TO")

    def fail(code: int, message: str) -> int:
        print(f"ghostrunner db migrate: {redact_url(message)}", file=sys.stderr)
        return code

    if not source or not target:
        return fail(EXIT_USAGE, "--from (the SQLite database) and --to (the PostgreSQL "
                                "URL) are both needed")
    if is_postgres_url(source):
        return fail(EXIT_USAGE, "--from must be a SQLite database (sqlite:///path or a "
                                "path); copying from PostgreSQL is not supported")
    if "://" in source and not source.lower().startswith("sqlite://"):
        return fail(EXIT_USAGE, f"--from must be sqlite:///path or a path, not a "
                                f"{source.partition('://')[0]!r} URL")
    try:
        path = sqlite_path(source)
    except ValueError as exc:
        return fail(EXIT_USAGE, f"--from: {exc}")
    if not path.is_file():
        return fail(EXIT_USAGE, f"--from: no SQLite database at {path}")
    if not is_postgres_url(target):
        scheme = target.partition("://")[0] if "://" in target else "not a URL"
        return fail(EXIT_USAGE, f"--to must be a postgresql://user:password@host/database "
                                f"URL ({scheme!r} given)")
    try:
        from ghostrunner.postgres import PostgresStore
    except ModuleNotFoundError as exc:
        return fail(EXIT_FAILED, str(exc))
    try:
        report = asyncio.run(_migrate(path, PostgresStore(target), dry_run=args.dry_run,
                                      out=out))
    except Conflict as exc:
        return fail(EXIT_FAILED, f"refused: {exc}")
    except GhostRunnerError as exc:
        return fail(EXIT_FAILED, str(exc))
    _print_report(report, path, redact_url(target), out)
    return EXIT_OK


async def _summaries(store: SQLiteStore) -> list[TaskSummary]:
    """Every task of ``store``, oldest first."""
    out: list[TaskSummary] = []
    cursor: str | None = None
    while True:
        page = await store.list_tasks(TaskQuery(limit=_PAGE, cursor=cursor))
        out.extend(page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    out.reverse()  # the listing is newest first
    return out


async def _records(store: SQLiteStore, summaries: Sequence[TaskSummary]
                   ) -> AsyncIterator[TaskRecord]:
    from ghostrunner.postgres import TaskRecord

    for summary in summaries:
        task_id = summary.task.id
        runs = await store.get_runs(task_id)
        attempts = await store.attempts(task_id)
        got = Counter(r.state for r in runs)
        if got != Counter({s: n for s, n in summary.counts.items() if n}):
            raise GhostRunnerError(f"the source changed while it was read (task {task_id})")
        yield TaskRecord(summary=summary, runs=runs, attempts=attempts)


async def _migrate(path: Path, target: PostgresStore, *, dry_run: bool,
                   out: TextIO) -> ImportReport:
    source = SQLiteStore(path)
    await source.open()  # takes the lock: refuses while a GhostRunner holds it
    try:
        summaries = await _summaries(source)
        tokens = await source.list_tokens()
        audit = await _audit_log(source)
        events = await _event_log(source)
        webhooks = await source.webhook_cursors()
        deliveries = await _outbox(source)
        report = await target.import_all(_records(source, summaries), tokens, audit=audit,
                                         events=events, webhooks=webhooks,
                                         deliveries=deliveries, dry_run=dry_run)
        if not dry_run:
            await _check(source, target, summaries)
        return report
    finally:
        await source.close()


_Item = TypeVar("_Item")
_Item_co = TypeVar("_Item_co", covariant=True)


class _Paged(Protocol[_Item_co]):
    @property
    def items(self) -> Sequence[_Item_co]: ...

    @property
    def next_cursor(self) -> str | None: ...


async def _oldest_first(page_at: Callable[[str | None], Awaitable[_Paged[_Item]]]
                        ) -> list[_Item]:
    """Every item of a listing that pages newest first, oldest first."""
    items: list[_Item] = []
    cursor: str | None = None
    while True:
        page = await page_at(cursor)
        items.extend(page.items)
        if page.next_cursor is None:
            return items[::-1]
        cursor = page.next_cursor


async def _audit_log(source: SQLiteStore) -> list[AuditEntry]:
    """The source's whole audit log, oldest first."""
    return await _oldest_first(
        lambda cursor: source.query_audit(AuditQuery(limit=1000, cursor=cursor)))


async def _event_log(source: SQLiteStore) -> list[Event]:
    """The source's whole event log, oldest first."""
    events: list[Event] = []
    while batch := await source.events_after(events[-1].id if events else 0, 10_000):
        events.extend(batch)
    return events


async def _outbox(source: SQLiteStore) -> list[WebhookDelivery]:
    """The source's whole webhook outbox, oldest first."""
    return await _oldest_first(
        lambda cursor: source.query_deliveries(DeliveryQuery(limit=1000, cursor=cursor)))


async def _check(source: SQLiteStore, target: PostgresStore,
                 summaries: Sequence[TaskSummary]) -> None:
    """The copy, read back through the PostgreSQL store's verbs, against the source."""
    await target.open()
    try:
        for want in summaries:
            got = await target.get_task(want.task.id)
            if (got.task, _nonzero(got.counts), got.paused, got.aborted, got.closed) != (
                    want.task, _nonzero(want.counts), want.paused, want.aborted, want.closed):
                raise GhostRunnerError(f"check failed: task {want.task.id} differs after the "
                                       "copy")
        if _nonzero(await target.counts()) != _nonzero(await source.counts()):
            raise GhostRunnerError("check failed: the runs per state differ after the copy")
        names = sorted(t.name for t in await source.list_tokens())
        if sorted(t.name for t in await target.list_tokens()) != names:
            raise GhostRunnerError("check failed: the tokens differ after the copy")
    finally:
        await target.close()


def _nonzero(counts: Mapping[RunState, int]) -> dict[RunState, int]:
    return {RunState(s): n for s, n in counts.items() if n}


def _print_report(report: ImportReport, path: Path, dsn: str, out: TextIO) -> None:
    verb = "would copy" if report.dry_run else "copied"
    print(f"{verb} {path} -> {dsn}", file=out)
    print(f"  tasks     {report.tasks}", file=out)
    print(f"  runs      {report.runs}", file=out)
    for state in RunState:
        if report.states.get(state):
            print(f"    {state.value:<11} {report.states[state]}", file=out)
    print(f"  attempts  {report.attempts}", file=out)
    print(f"  tokens    {report.tokens}", file=out)
    print(f"  audit     {report.audit} entries", file=out)
    print(f"  events    {report.events}", file=out)
    print(f"  webhooks  {report.webhooks} cursors, {report.deliveries} deliveries", file=out)
    if report.dry_run:
        print("dry run: nothing written", file=out)
    else:
        print("checked: every task's runs per state, flags and the tokens match", file=out)
        if report.states.get(RunState.DISPATCHED):
            print(f"{report.states[RunState.DISPATCHED]} runs were dispatched: the first "
                  "start on PostgreSQL asks their devices what became of them", file=out)

"""The audit log: every write the server answers, recorded in the store.

:class:`AuditLog` is an ASGI middleware around the whole app (API and console): every
request whose method is not ``GET``/``HEAD``/``OPTIONS`` and that matched a route is
recorded, whatever its result, so no write route can forget it. A handler only adds
what it knows through :func:`note` (the token's name, set by ``authorize`` and the
console; the task id when the path has none; counts).

**When.** The entry is written when the answer's status is known, and the answer is
sent only once the entry is stored: a client that saw an answer can find its entry.
``POST /task/create`` (the hot path of scripts) hands its entry to the store with the
task (:meth:`AuditNote.ahead`, ``Store.add_task(audit=...)``): one transaction, so a
created task always has its entry, and one commit per create instead of two. Other
writes are recorded in a transaction of their own: if the process dies after such a
write committed and before its entry did (one store round trip), that write has no
entry, and its client got no answer; see ``docs/operations.md``.

**Address.** ``scope["client"]``: the peer of the TCP connection, or what uvicorn's
``--forwarded-allow-ips`` made of ``X-Forwarded-For`` when the proxy is trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

import attrs
from starlette.requests import Request
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ghostrunner.audit import AuditEntry, AuditPage, AuditQuery
from ghostrunner.errors import GhostRunnerError

__all__ = ["AuditLog", "AuditNote", "AuditStore", "note", "pruning", "render_entry"]

log = logging.getLogger("ghostrunner.http")

#: the methods that change nothing: not recorded
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SCOPE_KEY = "ghostrunner.audit"
#: how often old entries are pruned (and once at start)
PRUNE_EVERY = timedelta(hours=6)


@runtime_checkable
class AuditStore(Protocol):
    """Durable audit log. Same rules as ``ghostrunner.Store``: atomic, durable, only
    GhostRunner's errors."""

    async def record_audit(self, entry: AuditEntry) -> None:
        """Store ``entry`` (its ``id`` is ignored: the store gives one, increasing)."""

    async def query_audit(self, query: AuditQuery) -> AuditPage:
        """The entries matching ``query``, newest first (highest id first). Raises
        ``ValidationError`` (field ``cursor``) for a cursor it did not give."""

    async def prune_audit(self, before: datetime) -> int:
        """Remove the entries recorded before ``before``; returns how many."""


@attrs.define
class AuditNote:
    """What a handler adds to its request's entry."""

    token: str | None = None
    task_id: str | None = None
    counts: dict[str, int] = attrs.field(factory=dict)
    #: the status of the entry already stored with the write (see :meth:`ahead`)
    stored: int | None = None
    draft: Callable[[int], AuditEntry | None] | None = attrs.field(default=None, repr=False)

    def ahead(self, status: int) -> AuditEntry | None:
        """The request's entry as it stands, with ``status``, for the store to keep
        with the write itself (in its transaction); the middleware then writes none if
        the answer has that status, and its own if not (the write failed: nothing of
        it, entry included, was stored). None if the request is not recorded."""
        entry = None if self.draft is None else self.draft(status)
        if entry is not None:
            self.stored = status
        return entry


def note(request: Request) -> AuditNote:
    """The request's note (a throwaway one for a request that is not recorded)."""
    found = request.scope.get(SCOPE_KEY)
    return found if isinstance(found, AuditNote) else AuditNote()


def _templates(routes: Iterable[BaseRoute]) -> dict[Any, str]:
    return {r.endpoint: r.path for r in routes if isinstance(r, Route)}


class AuditLog:
    """The middleware (see the module's docstring).

    Args:
        app: the app.
        routes: the app's routes, for their templates (``/tasks/{task_id}``).
        clock: the time of an entry.
    """

    def __init__(self, app: ASGIApp, *, routes: Iterable[BaseRoute],
                 clock: Callable[[], datetime]) -> None:
        self.app = app
        self.templates = _templates(routes)
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        audit = AuditNote()
        audit.draft = functools.partial(self.entry, scope, audit)
        scope[SCOPE_KEY] = audit
        recorded = False

        async def send_recorded(message: Message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                await self.record(scope, audit, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        except BaseException:
            if not recorded:  # the server's 500 comes from outside this middleware
                recorded = True
                with contextlib.suppress(Exception):
                    await self.record(scope, audit, 500)
            raise

    def entry(self, scope: Scope, audit: AuditNote, status: int) -> AuditEntry | None:
        """The request's entry, or None if it is not recorded (no route matched: a
        404, or a 405 for the method; or a store that keeps no audit log)."""
        route = self.templates.get(scope.get("endpoint"))
        if route is None or status == 405:
            return None
        svc = scope.get("state", {}).get("services")
        if getattr(svc, "audit", None) is None:
            return None
        client = scope.get("client")
        task_id = audit.task_id
        if task_id is None:
            task_id = scope.get("path_params", {}).get("task_id")
        return AuditEntry(
            at=self.clock(), method=scope["method"], route=route, status=status,
            token=audit.token, address=client[0] if client else None,
            task_id=task_id, counts=audit.counts,
        )

    async def record(self, scope: Scope, audit: AuditNote, status: int) -> None:
        if audit.stored == status:
            return  # stored with the write (AuditNote.ahead)
        try:
            entry = self.entry(scope, audit, status)
            if entry is None:
                return
            store = scope["state"]["services"].audit
            await store.record_audit(entry)
        except (GhostRunnerError, ValueError, TypeError) as exc:
            # the write (if any) is done: answering with an error would hide it
            log.error("could not record the audit entry of %s %s (status %d): %s",
                      scope["method"], self.templates.get(scope.get("endpoint")), status,
                      exc)


def render_entry(entry: AuditEntry) -> dict[str, Any]:
    """An entry as ``GET /audit`` shows it."""
    return {
        "id": entry.id,
        "at": entry.at.isoformat().replace("+00:00", "Z"),
        "token": entry.token,
        "address": entry.address,
        "method": entry.method,
        "route": entry.route,
        "task_id": entry.task_id,
        "status": entry.status,
        "counts": dict(entry.counts),
    }


@contextlib.asynccontextmanager
async def pruning(store: AuditStore, days: int, clock: Callable[[], datetime]
                  ) -> AsyncIterator[None]:
    """Prune entries older than ``days`` at start and every :data:`PRUNE_EVERY`, in the
    background, while the app runs."""

    async def loop() -> None:
        while True:
            try:
                pruned = await store.prune_audit(clock() - timedelta(days=days))
            except GhostRunnerError as exc:
                log.warning("could not prune the audit log: %s", exc)
            else:
                if pruned:
                    log.info("audit log: pruned %d entries older than %d days", pruned, days)
            await asyncio.sleep(PRUNE_EVERY.total_seconds())

    task = asyncio.create_task(loop(), name="ghostrunner-audit-prune")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

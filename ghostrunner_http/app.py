"""The Starlette application: :func:`create_app`.

Handlers are thin: read and authenticate the request (``_request``), parse its fields
(``_parse``), call one GhostRunner operation, render the answer (``_render``). The store,
executor and reconcile loop are opened and closed by the lifespan; every exception is
turned into an answer in one place (``_errors.exception_handlers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import ghostrunner
from ghostrunner import Executor, GhostRunner, RunState, SQLiteStore, Store, TaskSummary
from ghostrunner.errors import Conflict, GhostRunnerError, NotFound, ValidationError
from ghostrunner.tokens import Scope, Token

from ._audit import AuditLog, AuditStore, note, pruning, render_entry
from ._delivery import Dispatcher, delivering
from ._errors import ConflictError, exception_handlers
from ._events import StreamSlots, open_stream
from ._events import pruning as events_pruning
from ._ops import delete_matching, delete_task
from ._parse import (
    parse_abort,
    parse_audit_query,
    parse_cancel,
    parse_delete,
    parse_delivery_id,
    parse_delivery_query,
    parse_retry,
    parse_run_page,
    parse_task,
    parse_task_query,
    parse_token_create,
    parse_token_name,
)
from ._render import (
    LIST_NODES,
    envelope,
    render_devices,
    render_runner,
    render_runners,
    render_summary,
    render_task,
    render_task_with_runs,
    render_token,
)
from ._request import Authenticator, Services, authorize, services
from ._tokens import TOKENS_SIGNAL, TokenStore, new_token, verify_secret
from ._webhooks import (
    EventSource,
    WebhookStore,
    event_source,
    render_delivery,
    render_webhooks,
)
from .config import Settings
from .console import Console, console_routes
from .openapi import openapi_json

__all__ = ["ADMIN_TOKEN_NAME", "bootstrap_admin", "create_app"]

log = logging.getLogger("ghostrunner.http")

ADMIN_TOKEN_NAME = "admin"  # noqa: S105 - a name, not a secret
RUNNERS_TIMEOUT = 2.0  # seconds GET / waits for the store's list of runners


# --------------------------------------------------------------------------- handlers


async def info(request: Request) -> Response:
    """``GET /``: what this server is, and the runners sharing its store. Needs no
    token."""
    svc = services(request)
    return envelope({
        "name": "GhostRunner",
        "version": ghostrunner.__version__,
        "executor": svc.executor_kind,
        "executor_connected": svc.connected(),
        "store": svc.store_kind,
        "openapi": "/openapi.json",
        "runner": render_runner(svc.runner),
        "runners": await _runners(svc.runner),
    })


async def _runners(runner: GhostRunner) -> list[dict[str, Any]] | None:
    """The runners as the store sees them; None if it cannot say within a moment (the
    database is away: GET / still answers)."""
    try:
        async with asyncio.timeout(RUNNERS_TIMEOUT):
            return render_runners(await runner.runners())
    except (GhostRunnerError, TimeoutError) as exc:
        log.warning("GET /: the runners could not be read: %s", exc or "timed out")
        return None


async def openapi(request: Request) -> Response:
    """``GET /openapi.json``: the OpenAPI document (raw, not in the envelope)."""
    return Response(openapi_json(), media_type="application/json")


async def token_create(request: Request) -> Response:
    call = await authorize(request, Scope.ADMIN, fields=("details",))
    name, scope = parse_token_create(call.body)
    svc = services(request)
    try:
        token, secret = new_token(name, scope, now=svc.runner.clock())
    except ValidationError as exc:
        raise ValidationError(f"details.{exc.field}", exc.message) from None
    try:
        await svc.tokens.add_token(token)
    except Conflict:
        raise ConflictError(f"a token named {name!r} exists", code="duplicate_name") from None
    log.info("token %r created with scope %s by %r", name, scope.value, call.token.name)
    # the secret is in this answer and nowhere else, ever
    return envelope({**render_token(token), "token": secret},
                    headers={"Cache-Control": "no-store"})


async def token_delete(request: Request) -> Response:
    call = await authorize(request, Scope.ADMIN, fields=("details",))
    name = parse_token_name(call.body)
    svc = services(request)
    tokens = {t.name: t for t in await svc.tokens.list_tokens()}
    if name not in tokens:
        raise NotFound(f"no token named {name!r}")
    if tokens[name].builtin:
        raise ConflictError(
            "the bootstrap admin token cannot be deleted (set GHOSTRUNNER_ADMIN_TOKEN and "
            "restart to replace it)",
            code="builtin_token",
        )
    await svc.tokens.delete_token(name)
    svc.auth.forget(name)
    await svc.runner.signal(TOKENS_SIGNAL)  # the other runners forget it too, at once
    log.info("token %r deleted by %r", name, call.token.name)
    return envelope({"name": name, "deleted": True})


async def audit_list(request: Request) -> Response:
    """``GET /audit``: the audit log, newest first (admin)."""
    await authorize(request, Scope.ADMIN)
    store = services(request).audit
    if store is None:
        raise NotFound("this server's store keeps no audit log")
    page = await store.query_audit(parse_audit_query(request.query_params))
    return envelope({"entries": [render_entry(e) for e in page.items],
                     "next_cursor": page.next_cursor})


async def events(request: Request) -> Response:
    """``GET /events``: the event log as Server-Sent Events (read; see ``_events``)."""
    call = await authorize(request, Scope.READ)
    svc = call.services
    secret_hash = call.token.secret_hash

    async def allowed() -> bool:  # a token revoked meanwhile ends its streams
        return await svc.tokens.token_by_hash(secret_hash) is not None

    return open_stream(request, svc.broadcast, svc.streams, heartbeat=svc.stream_heartbeat,
                       send_timeout=svc.stream_send_timeout, allowed=allowed)


def _outbox(request: Request) -> WebhookStore:
    store = services(request).outbox
    if store is None:
        raise NotFound("this server's store keeps no webhook outbox")
    return store


async def webhook_list(request: Request) -> Response:
    """``GET /webhooks``: the webhooks, their cursors and delivery counts (admin)."""
    await authorize(request, Scope.ADMIN)
    svc = services(request)
    store = _outbox(request)
    rows = render_webhooks(svc.webhooks, await store.webhook_cursors(),
                           await store.delivery_counts())
    return envelope({"webhooks": rows, "event_log": svc.event_log})


async def delivery_list(request: Request) -> Response:
    """``GET /webhooks/deliveries``: the outbox, newest first (admin)."""
    await authorize(request, Scope.ADMIN)
    query = parse_delivery_query(request.query_params)
    page = await _outbox(request).query_deliveries(query)
    now = services(request).runner.clock()
    return envelope({"deliveries": [render_delivery(d, now) for d in page.items],
                     "next_cursor": page.next_cursor})


async def delivery_retry(request: Request) -> Response:
    """``POST /webhooks/deliveries/{delivery_id}/retry``: send a failed delivery again,
    with a new schedule and the same message id (admin)."""
    await authorize(request, Scope.ADMIN)
    delivery_id = parse_delivery_id(request.path_params["delivery_id"])
    svc = services(request)
    delivery = await _outbox(request).retry_delivery(delivery_id, svc.runner.clock())
    note(request).counts["deliveries"] = 1
    svc.notify_webhooks()
    log.info("webhook %r: delivery %d (%s) retried by %r", delivery.webhook, delivery.id,
             delivery.msg_id, note(request).token)
    return envelope(render_delivery(delivery, svc.runner.clock()))


async def token_list(request: Request) -> Response:
    await authorize(request, Scope.ADMIN)
    tokens = await services(request).tokens.list_tokens()
    return envelope({"tokens": [render_token(t) for t in tokens]})


async def task_create(request: Request) -> Response:
    call = await authorize(request, Scope.WRITE, fields=("details",))
    runner = call.services.runner
    task = parse_task(call.body, runner.clock)
    audit = note(request)
    audit.task_id = task.id
    audit.counts["nodeids"] = len(task.targets)
    # the entry goes in with the task (one transaction): a created task has its entry
    entry = audit.ahead(200) if call.services.audit_with_writes else None
    if task.select is None:
        # the seed's path: every target has a pending run, nothing more to read
        await runner.submit(task, audit=entry)
        return envelope(render_task(task, {RunState.PENDING: len(task.targets)}, "pending"),
                        headers={"Location": f"/tasks/{task.id}"})
    try:
        await runner.submit(task, audit=entry)
    except ValidationError as exc:  # the selector matches no device
        raise ValidationError(f"details.{exc.field}", exc.message) from None
    # the selector chose the devices: answer with the runs the store holds
    return envelope(render_summary(await runner.get(task.id)),
                    headers={"Location": f"/tasks/{task.id}"})


async def task_delete(request: Request) -> Response:
    call = await authorize(request, Scope.WRITE, fields=("details",))
    result = await delete_matching(services(request).runner, parse_delete(call.body))
    tasks = result.get("tasks", [])
    note(request).counts.update(tasks=len(tasks),
                                deleted=sum(1 for t in tasks if t.get("deleted")))
    return envelope(result)


async def task_list(request: Request) -> Response:
    await authorize(request, Scope.READ)
    page = await services(request).runner.list(parse_task_query(request.query_params))
    return envelope({
        # a row shows the first LIST_NODES node ids, node_count says how many there are
        "tasks": [render_summary(s, max_nodes=LIST_NODES) for s in page.items],
        "next_cursor": page.next_cursor,
    })


async def task_flush(request: Request) -> Response:
    await authorize(request, Scope.WRITE)
    result = await services(request).runner.flush()
    note(request).counts.update(cancelled=result.cancelled, deleted=result.deleted,
                                kept=result.kept)
    return envelope({"cancelled": result.cancelled, "deleted": result.deleted,
                     "kept": result.kept})


async def task_get(request: Request) -> Response:
    await authorize(request, Scope.READ)
    page = parse_run_page(request.query_params)
    runner = services(request).runner
    task_id = request.path_params["task_id"]
    stored = await runner.get(task_id)
    runs = await runner.runs(task_id)
    attempts = await runner.attempts(task_id)
    # counts from the runs read, so the two always agree
    summary = TaskSummary(task=stored.task, counts=dict(Counter(r.state for r in runs)),
                          paused=stored.paused, aborted=stored.aborted, closed=stored.closed)
    return envelope(render_task_with_runs(summary, runs, output=page.output,
                                          attempts=attempts, start=page.cursor,
                                          limit=page.limit))


async def task_remove(request: Request) -> Response:
    await authorize(request, Scope.WRITE)
    runner = services(request).runner
    return envelope(await delete_task(runner, request.path_params["task_id"]))


async def task_cancel(request: Request) -> Response:
    call = await authorize(request, Scope.WRITE, fields=("nodeids",))
    nodeids = parse_cancel(call.body)
    runner = services(request).runner
    task_id = request.path_params["task_id"]
    task = (await runner.get(task_id)).task
    if nodeids is not None:
        # a selector's devices are targets too: those the task has a run for
        targets = (set(task.targets) if task.select is None
                   else {r.node_id for r in await runner.runs(task_id)})
        for i, node in enumerate(nodeids):
            if node not in targets:
                raise ValidationError(f"nodeids[{i}]", f"{node!r} is not a target of this task")
    cancelled = await runner.cancel(task_id, nodeids)
    note(request).counts["runs"] = len(cancelled)
    return envelope({"id": task_id, "cancelled": [r.node_id for r in cancelled]})


async def task_pause(request: Request) -> Response:
    await authorize(request, Scope.WRITE)
    summary = await services(request).runner.pause(request.path_params["task_id"])
    return envelope(render_summary(summary))


async def task_resume(request: Request) -> Response:
    await authorize(request, Scope.WRITE)
    summary = await services(request).runner.resume(request.path_params["task_id"])
    return envelope(render_summary(summary))


async def task_retry(request: Request) -> Response:
    call = await authorize(request, Scope.WRITE, fields=("states",))
    states = parse_retry(call.body)
    runner = services(request).runner
    task_id = request.path_params["task_id"]
    await runner.get(task_id)  # 404 before the states are checked, as cancel does
    retried = await runner.retry(task_id, states)
    note(request).counts["runs"] = len(retried)
    return envelope({"id": task_id, "retried": [r.node_id for r in retried]})


async def task_abort(request: Request) -> Response:
    call = await authorize(request, Scope.WRITE, fields=("reason",))
    reason = parse_abort(call.body)
    task_id = request.path_params["task_id"]
    cancelled = await services(request).runner.abort(task_id, reason)
    note(request).counts["runs"] = len(cancelled)
    return envelope({"id": task_id, "cancelled": [r.node_id for r in cancelled]})


async def devices(request: Request) -> Response:
    await authorize(request, Scope.READ)
    svc = services(request)
    return envelope(render_devices(svc.runner.devices().values(), connected=svc.connected()))


ROUTES = [
    # the routes scripts call in bulk first: Starlette tries routes in order
    Route("/task/create", task_create, methods=["POST"], name="task_create"),
    Route("/task/list", task_list, methods=["GET"], name="task_list"),
    Route("/", info, methods=["GET"], name="info"),
    Route("/openapi.json", openapi, methods=["GET"], name="openapi"),
    Route("/token/create", token_create, methods=["POST"], name="token_create"),
    Route("/token/delete", token_delete, methods=["DELETE"], name="token_delete"),
    Route("/token/list", token_list, methods=["GET"], name="token_list"),
    Route("/task/delete", task_delete, methods=["DELETE"], name="task_delete"),
    Route("/task/flush", task_flush, methods=["DELETE"], name="task_flush"),
    Route("/tasks/{task_id}", task_get, methods=["GET"], name="task_get"),
    Route("/tasks/{task_id}", task_remove, methods=["DELETE"], name="task_remove"),
    Route("/tasks/{task_id}/cancel", task_cancel, methods=["POST"], name="task_cancel"),
    Route("/tasks/{task_id}/pause", task_pause, methods=["POST"], name="task_pause"),
    Route("/tasks/{task_id}/resume", task_resume, methods=["POST"], name="task_resume"),
    Route("/tasks/{task_id}/retry", task_retry, methods=["POST"], name="task_retry"),
    Route("/tasks/{task_id}/abort", task_abort, methods=["POST"], name="task_abort"),
    Route("/devices", devices, methods=["GET"], name="devices"),
    Route("/audit", audit_list, methods=["GET"], name="audit"),
    Route("/events", events, methods=["GET"], name="events"),
    Route("/webhooks", webhook_list, methods=["GET"], name="webhooks"),
    Route("/webhooks/deliveries", delivery_list, methods=["GET"], name="deliveries"),
    Route("/webhooks/deliveries/{delivery_id}/retry", delivery_retry, methods=["POST"],
          name="delivery_retry"),
]


# --------------------------------------------------------------------------- lifespan


def announce_admin_token(secret: str) -> None:
    """Print a generated admin token once, to stderr, outside the logging system."""
    bar = "=" * 72
    print(
        f"\n{bar}\nGhostRunner generated the admin token. It is shown only this once:\n\n"
        f"    {secret}\n\nSign in to the operator console (/ui/) with it, or use it with the "
        f"API and the CLI. Keep it safe. To replace it, set GHOSTRUNNER_ADMIN_TOKEN (or "
        f"admin_token in the config file) and restart.\n{bar}\n",
        file=sys.stderr,
        flush=True,
    )


async def bootstrap_admin(
    store: TokenStore,
    secret: str | None,
    *,
    now: datetime,
    announce: Callable[[str], None] = announce_admin_token,
) -> None:
    """Make sure the builtin admin token exists.

    With ``secret`` (from the configuration) the builtin token is that secret, replacing
    a different one. Without, an existing builtin token is kept; at the very first start
    one is generated and passed to ``announce`` (printed once), never logged or stored
    in clear.
    """
    builtin = [t for t in await store.list_tokens() if t.builtin]
    if secret is not None:
        if len(builtin) == 1 and verify_secret(secret, builtin[0]):
            return
        for token in builtin:
            await store.delete_token(token.name)
        token, _ = new_token(ADMIN_TOKEN_NAME, Scope.ADMIN, secret=secret, builtin=True,
                             now=now)
        if await _add_admin(store, token):
            log.info("admin token %r set from the configuration", ADMIN_TOKEN_NAME)
        elif not any(verify_secret(secret, t) for t in await store.list_tokens() if t.builtin):
            log.warning("another server sharing the database set a different admin token "
                        "at the same moment: give every server the same admin_token")
        return
    if builtin:
        return
    token, generated = new_token(ADMIN_TOKEN_NAME, Scope.ADMIN, builtin=True, now=now)
    if await _add_admin(store, token):
        log.info("admin token %r generated (printed once on stderr)", ADMIN_TOKEN_NAME)
        announce(generated)
    else:
        log.info("admin token %r generated by another server sharing the database (it "
                 "printed it)", ADMIN_TOKEN_NAME)


async def _add_admin(store: TokenStore, token: Token) -> bool:
    """Add the builtin admin token; False if another server sharing the database added
    one at the same moment (both started on an empty database)."""
    try:
        await store.add_token(token)
    except Conflict:
        if any(t.builtin for t in await store.list_tokens()):
            return False
        raise RuntimeError(
            f"a non-admin token named {token.name!r} exists; delete it (or rename) so the "
            f"builtin admin token can be created"
        ) from None
    return True


def _executor_from(settings: Settings) -> Executor:
    if settings.executor == "fake":
        from ghostrunner import Device
        from ghostrunner.testing import FakeExecutor  # executor = "fake": try it out

        return FakeExecutor(devices=[
            Device(
                node_id=d.nodeid, name=d.name or d.nodeid, online=d.online,
                group_id=None if d.group is None else f"mesh//{d.group}", group_name=d.group,
                tags=d.tags, os=d.os,
            )
            for d in settings.fake_devices
        ])
    # libmeshctrl is heavy: import it only when MeshCentral is asked for
    from ghostrunner.meshcentral import MeshCentralExecutor

    assert settings.meshcentral_url
    assert settings.meshcentral_user
    assert settings.meshcentral_password
    return MeshCentralExecutor(
        settings.meshcentral_url,
        user=settings.meshcentral_user,
        password=settings.meshcentral_password,
        ignore_ssl=settings.meshcentral_ignore_ssl,
        group_id=settings.meshcentral_group_id,
    )


def _store_from(settings: Settings) -> Store:
    if settings.database_url is not None:
        from ghostrunner.postgres import PostgresStore  # psycopg only when asked for

        return PostgresStore(settings.database_url, min_size=settings.database_pool_min,
                             max_size=settings.database_pool_max)
    # the store creates the missing directories (0700) and files (0600) itself
    return SQLiteStore(settings.database.expanduser(), synchronous=settings.database_synchronous)


def _takes_audit(store: Store) -> bool:
    """Whether ``store.add_task`` keeps an audit entry with the task (``audit=``): the
    shipped stores do; a store written against an older ``Store`` may not."""
    try:
        return "audit" in inspect.signature(store.add_task).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


def _store_kind(store: Store) -> str:
    """``GET /``'s ``store``: postgresql, sqlite, memory, or custom."""
    module = type(store).__module__
    for prefix, kind in (("ghostrunner.postgres", "postgresql"), ("ghostrunner.sqlite", "sqlite"),
                         ("ghostrunner._memory", "memory")):
        if module.startswith(prefix):
            return kind
    return "custom"


def webhook_events(store: Store, runner: GhostRunner) -> EventSource | None:
    """Where the webhooks read their events: THE one place the event log is connected
    to them.

    The store itself, if it has an event log (``events_after`` and ``last_event_id``:
    every shipped store has), else None (the webhook worker then only sends what its
    outbox holds). The live side is :func:`_waking`: each new event
    (``GhostRunner.events``) wakes the worker instead of its next poll
    (``webhook_delivery.poll_interval``).
    """
    del runner  # the live side: see _waking
    return event_source(store)


@contextlib.asynccontextmanager
async def _waking(runner: GhostRunner, dispatcher: Dispatcher) -> AsyncIterator[None]:
    """Wake the webhook worker on each new event (it reads them from the store with its
    own cursors; this only saves it the wait for its next poll)."""

    async def follow() -> None:
        async for _ in runner.event_batches():  # once per batch of new events
            dispatcher.notify()

    task = asyncio.create_task(follow(), name="ghostrunner-webhooks-wake")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _connected(executor: Executor, kind: str) -> Callable[[], bool | None]:
    if kind == "fake":
        return lambda: True

    def connected() -> bool | None:
        value = getattr(executor, "connected", None)  # MeshCentralExecutor has it
        return value if isinstance(value, bool) else None

    return connected


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    executor: Executor | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    announce: Callable[[str], None] = announce_admin_token,
) -> Starlette:
    """The GhostRunner HTTP API as a Starlette (ASGI) application.

    The store, the executor and the reconcile loop are opened when the app starts
    (its lifespan) and closed when it stops.

    Args:
        settings: defaults to ``Settings(executor="fake")``.
        store: the store; default ``PostgresStore(settings.database_url)`` if set, else
            ``SQLiteStore(settings.database)``. It keeps the API
            tokens too, so it must also implement :class:`TokenStore`.
        executor: the executor; default from ``settings.executor``.
        clock: the current time, for the runner and token times.
        announce: shows a generated admin token once (default: print to stderr).
    """
    cfg = settings or Settings(executor="fake")
    kind = "custom" if executor is not None else cfg.executor

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        queue = store if store is not None else _store_from(cfg)
        if not isinstance(queue, TokenStore):
            raise TypeError(f"{queue!r} does not keep API tokens (see TokenStore)")
        audit_store = queue if isinstance(queue, AuditStore) else None
        if audit_store is None:
            log.warning("%r keeps no audit log (see AuditStore): writes are not recorded",
                        queue)
        outbox = queue if isinstance(queue, WebhookStore) else None
        if outbox is None and cfg.webhooks:
            log.warning("%r keeps no webhook outbox (see WebhookStore): no webhook is sent",
                        queue)
        runs_on = executor if executor is not None else _executor_from(cfg)
        runner = GhostRunner(store=queue, executor=runs_on, settings=cfg.loop, clock=clock,
                             name=cfg.runner_name)
        async with runner:
            await bootstrap_admin(queue, cfg.admin_token, now=clock(), announce=announce)
            async with contextlib.AsyncExitStack() as background:
                if audit_store is not None:
                    await background.enter_async_context(
                        pruning(audit_store, cfg.audit_retention_days, clock))
                await background.enter_async_context(
                    events_pruning(runner, cfg.events_retention_days, clock))
                source = webhook_events(queue, runner)
                dispatcher: Dispatcher | None = None
                if outbox is not None and cfg.webhooks:
                    dispatcher = await background.enter_async_context(delivering(
                        outbox, cfg.webhooks, cfg.webhook_policy, source=source, clock=clock))
                    if source is not None:
                        await background.enter_async_context(_waking(runner, dispatcher))
                svc = Services(
                    runner=runner,
                    tokens=queue,
                    auth=Authenticator(queue, clock),
                    max_body_bytes=cfg.max_body_bytes,
                    executor_kind=kind,
                    connected=_connected(runs_on, kind),
                    store_kind=_store_kind(queue),
                    audit=audit_store,
                    audit_with_writes=audit_store is not None and _takes_audit(queue),
                    outbox=outbox,
                    webhooks=cfg.webhooks if outbox is not None else (),
                    event_log=source is not None,
                    notify_webhooks=dispatcher.notify if dispatcher else lambda: None,
                    streams=StreamSlots(cfg.max_streams),
                    stream_heartbeat=cfg.stream_heartbeat,
                    stream_send_timeout=cfg.stream_send_timeout,
                )
                background.push_async_callback(svc.broadcast.close)
                app.state.services = svc
                runner.on_signal(TOKENS_SIGNAL, lambda _signal: svc.auth.forget_all())
                yield {"services": svc}
                log.info("shutting down: stopping the reconcile loop")

    routes = [*ROUTES, *console_routes()]
    app = Starlette(routes=routes, exception_handlers=exception_handlers, lifespan=lifespan,
                    # every write, whatever route answers it, is recorded (_audit)
                    middleware=[Middleware(AuditLog, routes=routes, clock=clock)])
    app.state.console = Console()  # the operator console under /ui: its sessions
    # "/task/list/" is a 404 in the envelope, not a bodiless redirect to "/task/list"
    app.router.redirect_slashes = False
    return app

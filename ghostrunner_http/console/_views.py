"""The console's pages and actions (see ``docs/console.md``).

Every handler is wrapped by :func:`page`, which does what every console request needs,
in this order: find the session (else the sign-in page, or 401 for the JSON the page
script polls), look its token up (a revoked token ends the session), check the CSRF token
of a write (403), check the token's scope (403), then run the handler; a task that does
not exist is a 404 page. Every answer carries the security headers (:data:`HEADERS`).

Writes are plain HTML forms posted to the server, which answers with a redirect (303) to
the page to show next and a message for it; they work without JavaScript. The one script
(``static/console.js``) only keeps pages live (:func:`task_live`).
"""

from __future__ import annotations

import logging
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import jinja2
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

import ghostrunner
from ghostrunner import Device, Run, RunState, TaskQuery, TaskStatus, TaskSummary
from ghostrunner.audit import AuditEntry
from ghostrunner.errors import Conflict, IllegalTransition, NotFound, ValidationError
from ghostrunner.tokens import Scope, Token

from .._audit import note
from .._errors import ApiError
from .._events import open_stream
from .._ops import delete_task
from .._parse import (
    parse_audit_query,
    parse_delivery_id,
    parse_delivery_query,
    parse_task,
    parse_task_query,
)
from .._request import Services, read_body, services
from .._tokens import TOKENS_SIGNAL, hash_secret, new_token
from .._webhooks import render_delivery, render_webhooks
from ._sessions import COOKIE, Session, Sessions

__all__ = ["HEADERS", "Console", "page"]

log = logging.getLogger("ghostrunner.http")

HERE = Path(__file__).resolve().parent
#: the answer to a console write that worked: see other (the page to show next)
REDIRECT = 303

#: on every console answer: no inline script or style, nothing from elsewhere, no framing
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # not no-referrer: with it, a browser sends "Origin: null" on the console's own form
    # posts, and the Origin check of writes (_same_origin) could not tell them apart
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

#: tasks per page of the task list; runs per page of a task
TASKS_PAGE = 50
RUNS_PAGE = 100
#: tasks per page of a device's timeline
DEVICE_TASKS_PAGE = 20
#: the filters of the audit page (as ``GET /audit`` names them)
AUDIT_FILTERS = ("token", "route", "task_id", "since", "until", "status", "limit")
#: the filters of the webhooks page (as ``GET /webhooks/deliveries`` names them)
DELIVERY_FILTERS = ("webhook", "status", "event_id", "limit")
#: how many fields a form may have (the queue form's device picker: one per device)
MAX_FIELDS = 100_000


def _q(value: object) -> str:
    """``value`` quoted for a URL path segment or query value (every ``/`` too)."""
    return urllib.parse.quote(str(value), safe="")


def _when(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _duration(run: Run) -> str:
    if run.started_at is None:
        return ""
    end = run.finished_at
    if end is None:
        return "running"
    return _seconds((end - run.started_at).total_seconds())


def _seconds(total: float) -> str:
    if total < 60:
        return f"{total:.1f} s"
    minutes, secs = divmod(int(total), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every value a template shows is escaped unless marked safe
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = _q
    env.filters["when"] = _when
    env.filters["duration"] = _duration
    env.globals["version"] = ghostrunner.__version__
    env.globals["run_states"] = [s.value for s in RunState]
    env.globals["task_statuses"] = [s.value for s in TaskStatus]
    return Jinja2Templates(env=env)


class Console:
    """What the console keeps for the life of the app: its sessions and templates."""

    def __init__(self, sessions: Sessions | None = None) -> None:
        self.sessions = sessions if sessions is not None else Sessions()
        self.templates = _templates()


@attrs.frozen
class Ctx:
    """A console request whose session and token were checked."""

    request: Request
    session: Session
    token: Token
    svc: Services
    console: Console
    form: Mapping[str, Sequence[str]]

    @property
    def can_write(self) -> bool:
        return self.token.scope.allows(Scope.WRITE)

    @property
    def is_admin(self) -> bool:
        return self.token.scope.allows(Scope.ADMIN)

    def field(self, name: str, default: str = "") -> str:
        values = self.form.get(name)
        return values[0] if values else default

    def render(self, name: str, status: int = 200, **context: Any) -> Response:
        context.setdefault("flash", self.session.take_flash())
        return self.console.templates.TemplateResponse(
            self.request, name, {
                "token": self.token, "csrf": self.session.csrf, "can_write": self.can_write,
                "is_admin": self.is_admin, "executor_kind": self.svc.executor_kind,
                "connected": self.svc.connected(), **context,
            }, status_code=status, headers=HEADERS)

    def redirect(self, url: str, message: str | None = None, kind: str = "info") -> Response:
        if message:
            self.session.say(message, kind)
        return RedirectResponse(url, status_code=REDIRECT, headers=HEADERS)


def console_of(request: Request) -> Console:
    console = request.app.state.console
    assert isinstance(console, Console)
    return console


Handler = Callable[[Ctx], Awaitable[Response]]


def _bare(request: Request, name: str, status: int, **context: Any) -> Response:
    """A page shown without a session (sign-in, errors before one is found)."""
    return console_of(request).templates.TemplateResponse(
        request, name, {"token": None, "can_write": False, "is_admin": False, "flash": [],
                        "csrf": "", **context},
        status_code=status, headers=HEADERS)


async def _read_form(request: Request, limit: int) -> dict[str, list[str]]:
    """An ``application/x-www-form-urlencoded`` body (size-capped as the API's are)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await read_body(request, limit)
    if kind and kind != "application/x-www-form-urlencoded":
        raise ValidationError("body", "must be a form (application/x-www-form-urlencoded)")
    try:
        return urllib.parse.parse_qs(raw.decode(), keep_blank_values=True,
                                     max_num_fields=MAX_FIELDS, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise ValidationError("body", "is not a valid form") from None


def _same_origin(request: Request) -> bool:
    """A browser's write comes from a console page: its ``Origin`` (sent by every
    current browser with a POST) is this server, or absent (an old browser or a tool)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    own = f"{request.url.scheme}://{request.url.netloc}"
    return origin == own


def page(needed: Scope = Scope.READ, *, write: bool = False, json: bool = False
         ) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a console handler (see the module's docstring). ``write``: a POST whose form
    must carry the session's CSRF token; ``json``: answers the page script (401, not a
    redirect, when signed out)."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            console = console_of(request)
            svc = services(request)
            session = console.sessions.get(request.cookies.get(COOKIE))
            token = None
            if session is not None:
                token = await svc.tokens.token_by_hash(session.token_hash)
                if token is None:  # revoked: the session ends with it
                    console.sessions.end(session.id)
            if token is not None:
                note(request).token = token.name  # for the audit log
            if session is None or token is None:
                if json:
                    return JSONResponse({"error": "signed out"}, status_code=401,
                                        headers=HEADERS)
                if write:
                    return _bare(request, "error.html", 403, title="Signed out",
                                 message="Your session has ended: sign in again.")
                return RedirectResponse("/ui/login", status_code=303, headers=HEADERS)
            form: dict[str, list[str]] = {}
            if write:
                try:
                    form = await _read_form(request, svc.max_body_bytes)
                except ValidationError as exc:
                    return _bare(request, "error.html", 400, title="Bad request",
                                 message=exc.message)
                except ApiError as exc:  # too large
                    return _bare(request, "error.html", exc.status, title="Bad request",
                                 message=str(exc))
                given = (form["csrf"][0] if form.get("csrf")
                         else request.headers.get("x-csrf-token"))
                if not session.check_csrf(given) or not _same_origin(request):
                    log.warning("console: refused a write without a valid CSRF token "
                                "(token %r, %s %s)", token.name, request.method,
                                request.url.path)
                    return _bare(request, "error.html", 403, title="Refused",
                                 message="This form has expired or did not come from the "
                                 "console (CSRF check). Go back, reload the page and "
                                 "try again.")
            ctx = Ctx(request, session, token, svc, console, form)
            if not token.scope.allows(needed):
                return ctx.render("error.html", 403, title="Not allowed",
                                  message=f"This needs a token with scope {needed.value}; "
                                  f"you signed in with {token.name!r} "
                                  f"(scope {token.scope.value}).")
            try:
                return await handler(ctx)
            except NotFound as exc:
                return ctx.render("error.html", 404, title="Not found", message=str(exc))

        endpoint.__name__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        return endpoint

    return wrap


def _cookie(response: Response, request: Request, value: str, *, max_age: int) -> None:
    response.set_cookie(
        COOKIE, value, max_age=max_age, path="/ui", httponly=True, samesite="strict",
        # under TLS (served over https, or behind a proxy uvicorn trusts to say so)
        secure=request.url.scheme == "https",
    )


# --------------------------------------------------------------------------- sign-in


async def login_form(request: Request) -> Response:
    """``GET /ui/login``: the sign-in form (or the overview, when signed in)."""
    console = console_of(request)
    if console.sessions.get(request.cookies.get(COOKIE)) is not None:
        return RedirectResponse("/ui/", status_code=303, headers=HEADERS)
    return _bare(request, "login.html", 200, title="Sign in", error=None)


async def login(request: Request) -> Response:
    """``POST /ui/login``: exchange an API token for a session cookie."""
    console = console_of(request)
    svc = services(request)
    if not _same_origin(request):
        return _bare(request, "error.html", 403, title="Refused",
                     message="The sign-in form must be sent from this server's own page.")
    try:
        form = await _read_form(request, svc.max_body_bytes)
    except (ValidationError, ApiError):
        return _bare(request, "login.html", 400, title="Sign in", error="Not a valid form.")
    secret = (form.get("token") or [""])[0].strip()
    try:
        token = await svc.auth.check(secret)
    except ApiError:
        log.warning("console: sign-in refused (invalid or revoked token)")
        return _bare(request, "login.html", 401, title="Sign in",
                     error="That token is not valid (or was revoked).")
    old = request.cookies.get(COOKIE)
    if old:
        console.sessions.end(old)  # a new id at every sign-in (no session fixation)
    note(request).token = token.name
    session = console.sessions.create(hash_secret(secret), token.name)
    log.info("console: %r signed in (scope %s)", token.name, token.scope.value)
    response = RedirectResponse("/ui/", status_code=303, headers=HEADERS)
    _cookie(response, request, session.id, max_age=int(console.sessions.lifetime))
    return response


@page(write=True)
async def logout(ctx: Ctx) -> Response:
    """``POST /ui/logout``: end the session."""
    ctx.console.sessions.end(ctx.session.id)
    response = RedirectResponse("/ui/login", status_code=303, headers=HEADERS)
    _cookie(response, ctx.request, "", max_age=0)
    return response


async def root(request: Request) -> Response:
    """``GET /ui``: the console is at ``/ui/``."""
    return RedirectResponse("/ui/", status_code=307, headers=HEADERS)


# --------------------------------------------------------------------------- pages


def _device_counts(devices: Mapping[str, Device]) -> tuple[int, int]:
    online = sum(1 for d in devices.values() if d.online)
    return online, len(devices) - online


@page()
async def overview(ctx: Ctx) -> Response:
    """``GET /ui/``: run counts, devices, the executor's connection, latest failures."""
    runner = ctx.svc.runner
    counts = await runner.counts()
    devices = runner.devices()
    online, offline = _device_counts(devices)
    failures = await runner.list(TaskQuery(state=RunState.FAILED, limit=10))
    recent = await runner.list(TaskQuery(limit=10))
    return ctx.render("overview.html", title="Overview",
                      counts={s.value: counts.get(s, 0) for s in RunState},
                      online=online, offline=offline, failures=failures.items,
                      recent=recent.items)


_TASK_FILTERS = ("status", "state", "name", "nodeid", "cursor")


@page()
async def tasks(ctx: Ctx) -> Response:
    """``GET /ui/tasks``: the tasks, newest first, filtered and paginated by the store."""
    params = ctx.request.query_params
    # an empty field of the filter form means "any"
    given = {k: params[k] for k in _TASK_FILTERS if params.get(k)}
    error = None
    try:
        query = attrs.evolve(parse_task_query(QueryParams(given)), limit=TASKS_PAGE)
        page_ = await ctx.svc.runner.list(query)
        items, next_cursor = page_.items, page_.next_cursor
    except ValidationError as exc:
        error, items, next_cursor = f"{exc.field}: {exc.message}", (), None
    filters = {k: v for k, v in given.items() if k != "cursor"}
    next_url = None
    if next_cursor is not None:
        next_url = "/ui/tasks?" + urllib.parse.urlencode({**filters, "cursor": next_cursor})
    return ctx.render("tasks.html", 422 if error else 200, title="Tasks", tasks=items,
                      filters=filters, error=error, next_url=next_url,
                      first_url=("/ui/tasks?" + urllib.parse.urlencode(filters))
                      if "cursor" in given else None)


def _int_param(params: QueryParams, name: str, default: int = 0) -> int:
    text = params.get(name, "")
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else default


async def _task_runs(ctx: Ctx, task_id: str) -> tuple[TaskSummary, Sequence[Run]]:
    runner = ctx.svc.runner
    stored = await runner.get(task_id)
    runs = await runner.runs(task_id)
    # counts from the runs read, so the two always agree (as GET /tasks/{id} does)
    summary = TaskSummary(task=stored.task, counts=dict(Counter(r.state for r in runs)),
                          paused=stored.paused, aborted=stored.aborted, closed=stored.closed)
    return summary, runs


def _run_window(ctx: Ctx, runs: Sequence[Run]) -> tuple[Sequence[Run], int, int, str | None]:
    """The page of runs asked for: (runs, start, total, state filter)."""
    params = ctx.request.query_params
    state = params.get("state") or None
    if state is not None and state not in {s.value for s in RunState}:
        state = None
    chosen = runs if state is None else [r for r in runs if r.state.value == state]
    start = _int_param(params, "start")
    if start >= len(chosen):
        start = 0
    return chosen[start:start + RUNS_PAGE], start, len(chosen), state


def _run_row(run: Run, device: Device | None) -> dict[str, Any]:
    """A run as the page script updates it (the cells of its row, and whether its
    device is online now: ``""`` when the executor does not know it)."""
    return {
        "device": "" if device is None else ("online" if device.online else "offline"),
        "state": run.state.value,
        "exit_code": "" if run.exit_code is None else str(run.exit_code),
        "attempts": str(run.attempts),
        "duration": _duration(run),
        "finished": _when(run.finished_at),
        "recovered": "recovered" if run.recovered else "",
    }


@page()
async def task_page(ctx: Ctx) -> Response:
    """``GET /ui/tasks/{task_id}``: a task and a page of its runs (100 by default)."""
    task_id = ctx.request.path_params["task_id"]
    summary, runs = await _task_runs(ctx, task_id)
    window, start, total, state = _run_window(ctx, runs)
    base = {"state": state} if state else {}

    def at(offset: int) -> str:
        return f"/ui/tasks/{_q(task_id)}?" + urllib.parse.urlencode({**base, "start": offset})

    live = f"/ui/tasks/{_q(task_id)}/live?" + urllib.parse.urlencode({**base, "start": start})
    events = "/ui/events?" + urllib.parse.urlencode({"task": task_id})
    return ctx.render(
        "task.html", title=f"Task {summary.task.name}", summary=summary, runs=window,
        devices=ctx.svc.runner.devices(), start=start, total=total, state_filter=state,
        counts={s.value: summary.counts.get(s, 0) for s in RunState},
        prev_url=at(max(0, start - RUNS_PAGE)) if start > 0 else None,
        next_url=at(start + RUNS_PAGE) if start + RUNS_PAGE < total else None,
        live_url=live, events_url=events, retryable=[s.value for s in RunState
                                   if s is not RunState.SUCCEEDED and s.terminal])


@page(json=True)
async def task_live(ctx: Ctx) -> Response:
    """``GET /ui/tasks/{task_id}/live``: what the task page shows that changes (its
    status, counts and the rows of its page of runs), polled by ``console.js``."""
    task_id = ctx.request.path_params["task_id"]
    try:
        summary, runs = await _task_runs(ctx, task_id)
    except NotFound:
        return JSONResponse({"error": "not found"}, status_code=404, headers=HEADERS)
    window, _, total, _ = _run_window(ctx, runs)
    devices = ctx.svc.runner.devices()
    return JSONResponse({
        "status": summary.status.value,
        "paused": summary.paused,
        "counts": {s.value: summary.counts.get(s, 0) for s in RunState},
        "total": total,
        "rows": {r.node_id: _run_row(r, devices.get(r.node_id)) for r in window},
    }, headers=HEADERS)


@page(json=True)
async def events_stream(ctx: Ctx) -> Response:
    """``GET /ui/events``: ``GET /events`` for the console's script (``EventSource``),
    signed in by the session cookie (no token in the URL). The stream ends when the
    session does (sign-out, expiry, its token revoked)."""
    svc = ctx.svc
    console = ctx.console
    session_id = ctx.session.id

    async def allowed() -> bool:
        session = console.sessions.peek(session_id)
        return (session is not None
                and await svc.tokens.token_by_hash(session.token_hash) is not None)

    return open_stream(ctx.request, svc.broadcast, svc.streams, heartbeat=svc.stream_heartbeat,
                       send_timeout=svc.stream_send_timeout, allowed=allowed)


@page()
async def run_page(ctx: Ctx) -> Response:
    """``GET /ui/tasks/{task_id}/run?node=...``: one run, its output and attempts."""
    task_id = ctx.request.path_params["task_id"]
    node = ctx.request.query_params.get("node", "")
    runner = ctx.svc.runner
    summary = await runner.get(task_id)
    run = next((r for r in await runner.runs(task_id) if r.node_id == node), None)
    if run is None:
        raise NotFound(f"task {task_id!r} has no run on {node!r}")
    history = (await runner.attempts(task_id)).get(node, ())
    return ctx.render("run.html", title=f"Run on {node}", summary=summary, run=run,
                      history=history, device=runner.devices().get(node),
                      retryable=run.state.terminal and run.state is not RunState.SUCCEEDED)


@page()
async def devices_page(ctx: Ctx) -> Response:
    """``GET /ui/devices``: every device the executor knows, online first."""
    shown = ctx.request.query_params.get("show", "")
    devices = sorted(ctx.svc.runner.devices().values(),
                     key=lambda d: (not d.online, (d.name or d.node_id).lower(), d.node_id))
    online, offline = _device_counts(ctx.svc.runner.devices())
    if shown == "online":
        devices = [d for d in devices if d.online]
    elif shown == "offline":
        devices = [d for d in devices if not d.online]
    return ctx.render("devices.html", title="Devices", devices=devices, show=shown,
                      online=online, offline=offline)


@page()
async def device_page(ctx: Ctx) -> Response:
    """``GET /ui/device?node=...``: a device and its runs across tasks (the task list
    filtered by its node id, newest first)."""
    params = ctx.request.query_params
    node = params.get("node", "")
    if not node or len(node) > 1024 or "\x00" in node:
        raise NotFound("no device given")
    runner = ctx.svc.runner
    query = TaskQuery(node_id=node, limit=DEVICE_TASKS_PAGE, cursor=params.get("cursor") or None)
    listed = await runner.list(query)
    timeline = []
    for summary in listed.items:
        run = next((r for r in await runner.runs(summary.task.id) if r.node_id == node), None)
        timeline.append((summary, run))
    next_url = None
    if listed.next_cursor is not None:
        next_url = "/ui/device?" + urllib.parse.urlencode(
            {"node": node, "cursor": listed.next_cursor})
    return ctx.render("device.html", title=f"Device {node}", node=node,
                      device=runner.devices().get(node), timeline=timeline,
                      next_url=next_url)


# --------------------------------------------------------------------------- queue


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def _number(ctx: Ctx, name: str, label: str, kind: type[int] | type[float]) -> Any:
    text = ctx.field(name).strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValidationError(label, f"must be {what}") from None


def _task_details(ctx: Ctx) -> dict[str, Any]:
    """The queue form as a TaskBody's ``details`` (checked by ``parse_task``)."""
    details: dict[str, Any] = {"name": ctx.field("name").strip(),
                               "command": ctx.field("command")}
    nodeids = [n for n in ctx.form.get("nodeids", []) if n]
    if nodeids:
        details["nodeids"] = nodeids
    select: dict[str, Any] = {}
    for key in ("group", "os"):
        if ctx.field(f"select_{key}").strip():
            select[key] = ctx.field(f"select_{key}").strip()
    if ctx.field("select_name").strip():
        select["name"] = ctx.field("select_name").strip()
    tags = _split(ctx.field("select_tags"))
    if tags:
        select["tags"] = tags
        select["tags_mode"] = ctx.field("select_tags_mode", "all") or "all"
    if ctx.field("select_all"):
        select["all"] = True
    if select:
        details["select"] = select
    if ctx.field("continuous"):
        details["continuous"] = True
    rollout = {
        "max_concurrent": _number(ctx, "max_concurrent", "max_concurrent", int),
        "per_minute": _number(ctx, "per_minute", "per_minute", int),
        "abort_failed_pct": _number(ctx, "abort_failed_pct", "abort_failed_pct", float),
        "abort_min_finished": _number(ctx, "abort_min_finished", "abort_min_finished", int),
    }
    rollout = {k: v for k, v in rollout.items() if v is not None}
    if rollout:
        details["rollout"] = rollout
    codes = _split(ctx.field("success_exit_codes"))
    if codes:
        try:
            details["success_exit_codes"] = [int(c) for c in codes]
        except ValueError:
            raise ValidationError("success_exit_codes",
                                  "must be whole numbers separated by commas") from None
    for key, kind in (("timeout", float), ("max_attempts", int)):
        value = _number(ctx, key, key, kind)
        if value is not None:
            details[key] = value
    if ctx.field("shell"):
        details["shell"] = ctx.field("shell")
    return details


def _queue_form(ctx: Ctx, status: int = 200, error: str | None = None) -> Response:
    devices = sorted(ctx.svc.runner.devices().values(),
                     key=lambda d: (not d.online, (d.name or d.node_id).lower(), d.node_id))
    values = {k: v[0] if v else "" for k, v in ctx.form.items()}
    chosen = set(ctx.form.get("nodeids", []))
    preset = ctx.request.query_params.get("node")
    if preset and not ctx.form:
        chosen.add(preset)
    return ctx.render("queue.html", status, title="Queue a command", devices=devices,
                      values=values, chosen=chosen, error=error)


@page(Scope.WRITE)
async def queue_form(ctx: Ctx) -> Response:
    """``GET /ui/queue``: the form to queue a command."""
    return _queue_form(ctx)


@page(Scope.WRITE, write=True)
async def queue(ctx: Ctx) -> Response:
    """``POST /ui/queue``: queue the command; then its task's page."""
    runner = ctx.svc.runner
    try:
        task = parse_task({"details": _task_details(ctx)}, runner.clock)
        audit = note(ctx.request)
        audit.task_id = task.id
        audit.counts["nodeids"] = len(task.targets)
        # the entry goes in with the task (its answer: the redirect to its page)
        entry = audit.ahead(REDIRECT) if ctx.svc.audit_with_writes else None
        await runner.submit(task, audit=entry)
    except ValidationError as exc:
        field = exc.field.removeprefix("details.")
        return _queue_form(ctx, 422, f"{field}: {exc.message}")
    log.info("console: task %s queued by %r", task.id, ctx.token.name)
    return ctx.redirect(f"/ui/tasks/{_q(task.id)}", f"Queued task {task.name!r}.")


# --------------------------------------------------------------------------- actions


def _back(task_id: str) -> str:
    return f"/ui/tasks/{_q(task_id)}"


def _runs_of(ctx: Ctx) -> list[str] | None:
    nodes = [n for n in ctx.form.get("node", []) if n]
    return nodes or None


@page(Scope.WRITE, write=True)
async def cancel(ctx: Ctx) -> Response:
    """``POST /ui/tasks/{task_id}/cancel``: cancel its pending runs (or one: ``node``)."""
    task_id = ctx.request.path_params["task_id"]
    runner = ctx.svc.runner
    await runner.get(task_id)
    cancelled = await runner.cancel(task_id, _runs_of(ctx))
    note(ctx.request).counts["runs"] = len(cancelled)
    return ctx.redirect(_back(task_id), f"Cancelled {len(cancelled)} pending run(s).")


@page(Scope.WRITE, write=True)
async def retry(ctx: Ctx) -> Response:
    """``POST /ui/tasks/{task_id}/retry``: send the runs in the chosen states again (or
    one run: ``node``)."""
    task_id = ctx.request.path_params["task_id"]
    runner = ctx.svc.runner
    await runner.get(task_id)
    states = [s for s in ctx.form.get("states", []) if s]
    nodes = _runs_of(ctx)
    if nodes is not None and not states:
        states = [r.state.value for r in await runner.runs(task_id)
                  if r.node_id in nodes and r.state.terminal
                  and r.state is not RunState.SUCCEEDED]
    if not states:
        return ctx.redirect(_back(task_id), "Choose the states of the runs to retry.",
                            "error")
    try:
        retried = await runner.retry(task_id, states)
    except ValidationError as exc:
        return ctx.redirect(_back(task_id), exc.message, "error")
    note(ctx.request).counts["runs"] = len(retried)
    return ctx.redirect(_back(task_id), f"Sent {len(retried)} run(s) again.")


@page(Scope.WRITE, write=True)
async def pause(ctx: Ctx) -> Response:
    """``POST /ui/tasks/{task_id}/pause``."""
    task_id = ctx.request.path_params["task_id"]
    await ctx.svc.runner.pause(task_id)
    return ctx.redirect(_back(task_id), "Paused: no new run starts until resumed.")


@page(Scope.WRITE, write=True)
async def resume(ctx: Ctx) -> Response:
    """``POST /ui/tasks/{task_id}/resume``."""
    task_id = ctx.request.path_params["task_id"]
    await ctx.svc.runner.resume(task_id)
    return ctx.redirect(_back(task_id), "Resumed.")


@page(Scope.WRITE)
async def delete_confirm(ctx: Ctx) -> Response:
    """``GET /ui/tasks/{task_id}/delete``: the confirmation step."""
    task_id = ctx.request.path_params["task_id"]
    summary = await ctx.svc.runner.get(task_id)
    return ctx.render("confirm.html", title="Delete a task", action=f"{_back(task_id)}/delete",
                      back=_back(task_id), button="Delete the task",
                      question=f"Delete task {summary.task.name!r}? Its pending runs are "
                      "cancelled; runs in flight finish and keep it.")


@page(Scope.WRITE, write=True)
async def delete(ctx: Ctx) -> Response:
    """``POST /ui/tasks/{task_id}/delete``: cancel its pending runs and remove it."""
    task_id = ctx.request.path_params["task_id"]
    result = (await delete_task(ctx.svc.runner, task_id))["tasks"][0]
    if result["deleted"]:
        return ctx.redirect("/ui/tasks", f"Deleted task {result['name']!r}.")
    return ctx.redirect(_back(task_id), "Kept: runs are still in flight on "
                        f"{len(result['running'])} device(s); their pending runs were "
                        "cancelled.", "error")


@page(Scope.WRITE)
async def flush_confirm(ctx: Ctx) -> Response:
    """``GET /ui/flush``: the confirmation step."""
    return ctx.render("confirm.html", title="Flush the queue", action="/ui/flush",
                      back="/ui/tasks", button="Flush",
                      question="Cancel every pending run of every task, and remove every "
                      "task whose runs are all finished?")


@page(Scope.WRITE, write=True)
async def flush(ctx: Ctx) -> Response:
    """``POST /ui/flush``: cancel every pending run, remove every finished task."""
    result = await ctx.svc.runner.flush()
    note(ctx.request).counts.update(cancelled=result.cancelled, deleted=result.deleted,
                                    kept=result.kept)
    log.info("console: flush by %r", ctx.token.name)
    return ctx.redirect("/ui/tasks", f"Cancelled {result.cancelled} run(s), removed "
                        f"{result.deleted} task(s), kept {result.kept} with runs in flight.")


# --------------------------------------------------------------------------- tokens


@page(Scope.ADMIN)
async def tokens(ctx: Ctx) -> Response:
    """``GET /ui/tokens``: the API tokens (never their secrets)."""
    return ctx.render("tokens.html", title="Tokens",
                      tokens=await ctx.svc.tokens.list_tokens(), created=None, error=None)


@page(Scope.ADMIN, write=True)
async def token_create(ctx: Ctx) -> Response:
    """``POST /ui/tokens``: create a token; its secret is shown on this answer only."""
    name, scope = ctx.field("name").strip(), ctx.field("scope", "read")
    error = None
    try:
        token, secret = new_token(name, Scope(scope), now=ctx.svc.runner.clock())
        await ctx.svc.tokens.add_token(token)
    except ValueError:  # Scope(...), and ValidationError is a ValueError too
        error = ("the name must be 1 to 200 characters" if scope in set(Scope)
                 else "the scope must be read, write or admin")
    except Conflict:
        error = f"a token named {name!r} exists"
    if error is not None:
        return ctx.render("tokens.html", 422, title="Tokens", created=None, error=error,
                          tokens=await ctx.svc.tokens.list_tokens())
    log.info("console: token %r created with scope %s by %r", name, scope, ctx.token.name)
    return ctx.render("tokens.html", title="Tokens", created=(token, secret), error=None,
                      tokens=await ctx.svc.tokens.list_tokens())


@page(Scope.ADMIN, write=True)
async def token_revoke(ctx: Ctx) -> Response:
    """``POST /ui/tokens/revoke``: delete a token; its sessions end at once."""
    name = ctx.field("name")
    found = {t.name: t for t in await ctx.svc.tokens.list_tokens()}.get(name)
    if found is None:
        raise NotFound(f"no token named {name!r}")
    if found.builtin:
        return ctx.redirect("/ui/tokens", "The bootstrap admin token cannot be revoked "
                            "(set GHOSTRUNNER_ADMIN_TOKEN and restart to replace it).",
                            "error")
    await ctx.svc.tokens.delete_token(name)
    ctx.svc.auth.forget(name)
    await ctx.svc.runner.signal(TOKENS_SIGNAL)  # the other runners forget it too
    ctx.console.sessions.end_token(name)
    log.info("console: token %r revoked by %r", name, ctx.token.name)
    if name == ctx.token.name:
        response = RedirectResponse("/ui/login", status_code=303, headers=HEADERS)
        _cookie(response, ctx.request, "", max_age=0)
        return response
    return ctx.redirect("/ui/tokens", f"Revoked token {name!r}.")


# --------------------------------------------------------------------------- audit log


@page(Scope.ADMIN)
async def audit_page(ctx: Ctx) -> Response:
    """``GET /ui/audit``: the audit log, newest first, with ``GET /audit``'s filters."""
    params = ctx.request.query_params
    # the form sends every field, the empty ones too: an empty field is no filter
    given = {k: v for k, v in params.multi_items() if v.strip()}
    values = {k: params.get(k, "") for k in AUDIT_FILTERS}
    store = ctx.svc.audit
    error = None
    entries: Sequence[AuditEntry] = []
    next_url = None
    if store is None:
        error = "This server's store keeps no audit log."
    else:
        try:
            page_ = await store.query_audit(
                parse_audit_query(QueryParams(list(given.items()))))
        except ValidationError as exc:
            error = f"{exc.field}: {exc.message}"
        else:
            entries = page_.items
            if page_.next_cursor is not None:
                next_url = "/ui/audit?" + urllib.parse.urlencode(
                    {**{k: v for k, v in given.items() if k != "cursor"},
                     "cursor": page_.next_cursor})
    return ctx.render("audit.html", 422 if error and store is not None else 200,
                      title="Audit log", entries=entries, values=values, error=error,
                      next_url=next_url)


# --------------------------------------------------------------------------- webhooks


@page(Scope.ADMIN)
async def webhooks_page(ctx: Ctx) -> Response:
    """``GET /ui/webhooks``: the webhooks and their deliveries, newest first, with
    ``GET /webhooks/deliveries``' filters; failed ones can be sent again."""
    params = ctx.request.query_params
    given = {k: v for k, v in params.multi_items() if v.strip()}
    values = {k: params.get(k, "") for k in DELIVERY_FILTERS}
    store = ctx.svc.outbox
    error = None
    hooks: list[dict[str, Any]] = []
    deliveries: list[dict[str, Any]] = []
    next_url = None
    if store is not None:
        hooks = render_webhooks(ctx.svc.webhooks, await store.webhook_cursors(),
                                await store.delivery_counts())
        try:
            found = await store.query_deliveries(
                parse_delivery_query(QueryParams(list(given.items()))))
        except ValidationError as exc:
            error = f"{exc.field}: {exc.message}"
        else:
            now = ctx.svc.runner.clock()
            deliveries = [render_delivery(d, now) for d in found.items]
            for row, d in zip(deliveries, found.items, strict=True):
                row.update(next_attempt_at=d.next_attempt_at, finished_at=d.finished_at)
            if found.next_cursor is not None:
                next_url = "/ui/webhooks?" + urllib.parse.urlencode(
                    {**{k: v for k, v in given.items() if k != "cursor"},
                     "cursor": found.next_cursor})
    return ctx.render("webhooks.html", 422 if error else 200, title="Webhooks",
                      webhooks=hooks, deliveries=deliveries, values=values, error=error,
                      next_url=next_url, event_log=ctx.svc.event_log,
                      outbox_missing=store is None)


@page(Scope.ADMIN, write=True)
async def delivery_retry(ctx: Ctx) -> Response:
    """``POST /ui/webhooks/deliveries/{delivery_id}/retry``: send a failed delivery
    again (same message id, new schedule)."""
    store = ctx.svc.outbox
    if store is None:
        raise NotFound("this server's store keeps no webhook outbox")
    try:
        delivery_id = parse_delivery_id(ctx.request.path_params["delivery_id"])
    except ValidationError:
        raise NotFound("no such delivery") from None
    try:
        delivery = await store.retry_delivery(delivery_id, ctx.svc.runner.clock())
    except IllegalTransition as exc:
        return ctx.redirect("/ui/webhooks", str(exc), "error")
    note(ctx.request).counts["deliveries"] = 1
    ctx.svc.notify_webhooks()
    log.info("console: webhook %r delivery %d retried by %r", delivery.webhook, delivery.id,
             ctx.token.name)
    return ctx.redirect(f"/ui/webhooks?webhook={_q(delivery.webhook)}",
                        f"Delivery {delivery.id} ({delivery.msg_id}) will be sent again.")

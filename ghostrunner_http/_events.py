"""``GET /events``: the event log as Server-Sent Events (and the console's ``/ui/events``).

Each event is one SSE message::

    id: 1234
    event: run.finished
    data: {"id":1234,"at":"2025-01-01T12:00:00Z","kind":"run.finished","task_id":"...",
           "node_id":"node//...","data":{"state":"succeeded","attempts":1,"exit_code":0}}

(``data`` on one line). **Resuming.** A client that reconnects sends the id of the last
event it received (``Last-Event-ID``, which browsers' ``EventSource`` sends by itself;
``?after=`` for clients that cannot set headers; the header wins): the stream goes on
from the store after that id, so nothing is lost or repeated across a disconnection or a
restart of the server (events are durable before they are sent). Without either, it
starts with the events to come. With a filter (``?task=``, ``?kinds=``) the events left
out still move the cursor: an ``id:`` line alone (no event) tells the client where it
is, so a reconnection does not scan them again.

**Bounded.** Each stream reads the store (through the runner's shared window) only as
fast as its client takes what is sent: at most :data:`QUEUE` events wait in memory per
stream, and uvicorn holds back writes to a client whose socket is full (``drain``). A
client that takes nothing for ``send_timeout`` seconds is dropped (the connection guard
of ``ghostrunner serve`` closes it; this module too, as a last resort); it reconnects
with its ``Last-Event-ID`` and misses nothing. At most ``server.max_streams`` streams
are open at once (503 beyond), counted apart from ``server.max_connections``: long-lived
streams never take the places of ordinary requests, and the guard never closes them for
being idle. A comment line (``: keepalive``) every ``heartbeat`` seconds keeps proxies
from closing a quiet stream.

**Shutdown.** uvicorn waits for responses in progress before it stops; a stream never
ends by itself, so the guard closes stream connections at once when the server shuts
down (``_guard.GuardedProtocol.shutdown``); the stream sees the disconnection and ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import Final

import attrs
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ghostrunner import Event, GhostRunner
from ghostrunner.errors import GhostRunnerError, ValidationError
from ghostrunner.events import KINDS

from ._errors import ApiError

__all__ = [
    "STREAM_PATHS",
    "EventStream",
    "StreamQuery",
    "StreamSlots",
    "TooManyStreams",
    "format_event",
    "open_stream",
    "parse_stream_query",
    "pruning",
]

log = logging.getLogger("ghostrunner.http")

#: the paths whose answers are event streams (the connection guard counts them apart)
STREAM_PATHS: Final = frozenset({"/events", "/ui/events"})
#: events waiting in memory per stream, at most
QUEUE: Final = 256
#: events sent in one write, at most
CHUNK: Final = 100
#: what browsers wait before reconnecting (the ``retry:`` field), milliseconds
RETRY_MS: Final = 2000
_MAX_ID: Final = (1 << 63) - 1
_KEYS: Final = ("after", "task", "kinds")


class TooManyStreams(ApiError):
    """``server.max_streams`` streams are open (503)."""

    status = 503
    code = "too_many_streams"


class StreamSlots:
    """How many event streams may be open at once, and how many are."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def take(self) -> None:
        """Count a new stream. Raises TooManyStreams when all slots are taken."""
        if self.active >= self.limit:
            raise TooManyStreams(
                f"{self.active} event streams are open, the most this server allows "
                f"(server.max_streams); retry later",
                headers={"Retry-After": "5"},
            )
        self.active += 1

    def give(self) -> None:
        self.active -= 1


@attrs.frozen
class StreamQuery:
    """Where a stream starts and what it keeps."""

    after: int | None = None
    task_id: str | None = None
    kinds: frozenset[str] | None = None

    def keeps(self, event: Event) -> bool:
        return ((self.task_id is None or event.task_id == self.task_id)
                and (self.kinds is None or event.kind in self.kinds))


def _event_id(field: str, text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > _MAX_ID:
        raise ValidationError(field, "must be an event id (an integer >= 0)")
    return int(text)


def parse_stream_query(params: QueryParams, last_event_id: str | None) -> StreamQuery:
    """``?after=``, ``?task=``, ``?kinds=`` (comma-separated) and the ``Last-Event-ID``
    header (which wins over ``after``). Raises ValidationError naming the field."""
    values: dict[str, str] = {}
    for key in params:
        if key not in _KEYS:
            raise ValidationError(key, "unknown query parameter (known: " + ", ".join(_KEYS)
                                  + ")")
        got = params.getlist(key)
        if len(got) > 1:
            raise ValidationError(key, "given more than once")
        values[key] = got[0]
    after = None
    if last_event_id is not None and last_event_id.strip():
        after = _event_id("Last-Event-ID", last_event_id)
    elif "after" in values:
        after = _event_id("after", values["after"])
    task_id = values.get("task")
    if task_id is not None and (not task_id or len(task_id) > 1024 or "\x00" in task_id):
        raise ValidationError("task", "must be 1 to 1024 characters, without NUL")
    kinds = None
    if "kinds" in values:
        names = [k.strip() for k in values["kinds"].split(",") if k.strip()]
        unknown = [k for k in names if k not in KINDS]
        if not names or unknown:
            raise ValidationError("kinds", "must be a comma-separated list of: "
                                  + ", ".join(KINDS))
        kinds = frozenset(names)
    return StreamQuery(after=after, task_id=task_id, kinds=kinds)


#: formatted messages of recent events, by the event object: every stream of a server
#: sends the same Event objects (the runner's shared window), so each is encoded once
_FORMATTED: OrderedDict[int, tuple[Event, str]] = OrderedDict()
_FORMATTED_KEPT: Final = 4096


def format_event(event: Event) -> str:
    """One SSE message (encoded once per event object, whatever the streams)."""
    found = _FORMATTED.get(id(event))
    if found is not None and found[0] is event:
        return found[1]
    data = json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":"))
    text = f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"
    _FORMATTED[id(event)] = (event, text)  # the event is kept: its id() is not reused
    if len(_FORMATTED) > _FORMATTED_KEPT:
        _FORMATTED.popitem(last=False)
    return text


def _chunk(events: Iterable[Event], query: StreamQuery) -> tuple[str, int | None, int | None]:
    """The messages of ``events`` that ``query`` keeps, the id of the last one kept,
    and the id of the last event (kept or not)."""
    parts: list[str] = []
    kept = last = None
    for event in events:
        last = event.id
        if query.keeps(event):
            parts.append(format_event(event))
            kept = event.id
    return "".join(parts), kept, last


class EventStream(Response):
    """The streaming answer of ``GET /events`` (an ASGI response that runs until the
    client goes, the server shuts down, or the client stops reading).

    Args:
        runner: whose event log is followed.
        query: where to start and what to keep.
        slots: the stream's slot, taken by the handler, given back at the end.
        heartbeat: seconds between keep-alive comments on a quiet stream.
        send_timeout: seconds a client may take to take one write before it is dropped.
        allowed: checked at every heartbeat; the stream ends when it says False (the
            token was revoked, the console session ended).
    """

    media_type = "text/event-stream"

    def __init__(self, runner: GhostRunner, query: StreamQuery, slots: StreamSlots, *,
                 heartbeat: float, send_timeout: float,
                 allowed: Callable[[], Awaitable[bool]] | None = None) -> None:
        super().__init__(content=None, headers={
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # nginx: send each event at once
            "Connection": "close",  # a stream is the connection's last answer
        }, media_type="text/event-stream; charset=utf-8")
        # no body given, but it is not empty: no Content-Length (chunked)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.runner = runner
        self.query = query
        self.slots = slots
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.allowed = allowed
        self.sent = 0  # events sent (tests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            start = await self._start()
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            # the position it starts at: a client that reconnects before its first event
            # resumes from there (EventSource keeps it as its last event id)
            await self._write(send, f"retry: {RETRY_MS}\nid: {start}\n"
                                    f": ghostrunner event stream\n\n")
            await self._stream(start, receive, send)
        except (OSError, TimeoutError):
            pass  # the client went, or took too long: it reconnects where it was
        finally:
            self.slots.give()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _write(self, send: Send, text: str) -> None:
        async with asyncio.timeout(self.send_timeout):
            await send({"type": "http.response.body", "body": text.encode(),
                        "more_body": True})

    async def _start(self) -> int:
        """Where the stream starts: after the asked id, or at the newest event (only
        what comes next); an id beyond the newest (the database was replaced) starts
        from the oldest kept."""
        last = await self.runner.store.last_event_id()
        after = self.query.after
        return last if after is None else (0 if after > last else after)

    async def _stream(self, start: int, receive: Receive, send: Send) -> None:
        queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE)

        async def produce() -> None:
            async for event in self.runner.events(start):
                await queue.put(event)  # waits while the client is slow: bounded

        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        async def pump() -> None:
            told: int | None = start  # the last id the client was sent
            cursor: int | None = start
            while True:
                try:
                    async with asyncio.timeout(self.heartbeat):
                        first = await queue.get()
                except TimeoutError:
                    if self.allowed is not None and not await self.allowed():
                        return  # revoked meanwhile: the stream ends
                    beat = ": keepalive\n"
                    if cursor is not None and cursor != told:
                        beat += f"id: {cursor}\n"  # filtered out: move the client's cursor
                        told = cursor
                    await self._write(send, beat + "\n")
                    continue
                batch = [first]
                while len(batch) < CHUNK and not queue.empty():
                    batch.append(queue.get_nowait())
                text, kept, cursor = _chunk(batch, self.query)
                if text:
                    await self._write(send, text)
                    told = kept
                    self.sent += text.count("\nevent: ")

        tasks = [asyncio.create_task(produce(), name="ghostrunner-sse-read"),
                 asyncio.create_task(pump(), name="ghostrunner-sse-write"),
                 asyncio.create_task(gone(), name="ghostrunner-sse-disconnect")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if isinstance(exc, GhostRunnerError):
                log.warning("event stream ended: %s", exc)
            elif isinstance(exc, TimeoutError):
                log.info("event stream: dropped a client that read nothing for %gs",
                         self.send_timeout)
            elif exc is not None and not isinstance(exc, OSError):
                raise exc


def open_stream(request: Request, runner: GhostRunner, slots: StreamSlots, *,
                heartbeat: float, send_timeout: float,
                allowed: Callable[[], Awaitable[bool]] | None = None) -> EventStream:
    """The stream a request asks for (its query checked first: 422), in a slot (503)."""
    query = parse_stream_query(request.query_params, request.headers.get("last-event-id"))
    slots.take()
    return EventStream(runner, query, slots, heartbeat=heartbeat, send_timeout=send_timeout,
                       allowed=allowed)


#: how often old events are pruned (and once at start)
PRUNE_EVERY: Final = 3600.0


@contextlib.asynccontextmanager
async def pruning(runner: GhostRunner, days: float,
                  clock: Callable[[], datetime]) -> AsyncIterator[None]:
    """Prune events older than ``days`` at start and every :data:`PRUNE_EVERY`
    seconds, in the background, while the app runs."""

    async def loop() -> None:
        while True:
            try:
                pruned = await runner.store.prune_events(clock() - timedelta(days=days))
            except GhostRunnerError as exc:
                log.warning("could not prune the event log: %s", exc)
            else:
                if pruned:
                    log.info("event log: pruned %d events older than %g days", pruned, days)
            await asyncio.sleep(PRUNE_EVERY)

    task = asyncio.create_task(loop(), name="ghostrunner-events-prune")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

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

**Shared.** The streams of a server do not each follow the event log: one
:class:`Broadcast` does, a batch at a time (:meth:`GhostRunner.event_batches`: one read
of the runner's shared window per change), encodes each event once and joins each
batch into one block. At each hand-out it writes the block itself to every stream that
is waiting for events (one ``send`` per stream and batch, whatever the number of events
in it: with ``ghostrunner serve``, straight to the socket, see :data:`STREAM_WRITE`),
and wakes only the streams it cannot write to that way. Under a stream of changes the
hand-outs are spaced so that all streams together write about
:data:`WRITES_PER_SECOND` times a second (100 streams: every 50 ms; 10: every 5 ms;
:data:`INTERVAL` at most): the events of that time go out together, a few milliseconds
of latency for far fewer writes; a quiet server sends an event the moment it is read.
A filtered stream (``?task=``, ``?kinds=``) gets the events it keeps out of each block
(through an index by task, built once per block).

**Bounded.** The broadcast keeps the newest events only (:data:`KEEP`); a stream behind
them (it resumed from an older id, or its client is slow) reads the store, a batch at a
time, as fast as its client takes what is sent, until it is back among them. uvicorn
holds back writes to a client whose socket is full (``drain``): a stream costs at most
one write's worth of memory (:data:`CHUNK` events). A
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
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
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
    "STREAM_WRITE",
    "Broadcast",
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
#: events passed over in one write, at most (a stream's memory bound)
CHUNK: Final = 500
#: events the broadcast keeps (streams further behind read the store)
KEEP: Final = 4096
#: An ASGI extension (``scope["extensions"]``) a server may give an event stream:
#: ``write(body) -> bool`` writes a part of the body now if the client takes what is
#: sent, else returns False and the stream sends it the ASGI way (which waits).
#: ``ghostrunner serve`` gives it (``_guard.GuardedProtocol``): a write then costs the
#: socket's ``send`` and little more, half of what going through the middlewares,
#: uvicorn and h11 costs (measured: 14 µs instead of 27 µs a write).
STREAM_WRITE: Final = "ghostrunner.stream_write"
#: seconds at most between two hand-outs of new events to the streams (under load)
INTERVAL: Final = 0.05
#: the hand-outs are spaced so that all streams together write about this often, at most
WRITES_PER_SECOND: Final = 2000.0
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

    @property
    def plain(self) -> bool:
        """No filter: every event."""
        return self.task_id is None and self.kinds is None

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


def format_event(event: Event) -> bytes:
    """One SSE message."""
    data = json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


class _Block:
    """The events of one read of the log, each encoded once, and all of them joined."""

    __slots__ = ("_by_task", "after", "blob", "events", "ids", "last", "messages")

    def __init__(self, after: int, events: Sequence[Event]) -> None:
        self.after = after  # the id just before its first event
        self.events = events
        self.ids = [e.id for e in events]
        self.last = self.ids[-1]
        self.messages = [format_event(e) for e in events]
        self.blob = b"".join(self.messages)
        self._by_task: dict[str, list[int]] | None = None

    def positions(self, task_id: str) -> list[int]:
        """The positions of ``task_id``'s events (an index built at the first ask)."""
        if self._by_task is None:
            self._by_task = {}
            for i, event in enumerate(self.events):
                self._by_task.setdefault(event.task_id, []).append(i)
        return self._by_task.get(task_id, [])

    def pick(self, cursor: int, query: StreamQuery, out: list[bytes]) -> int | None:
        """Append the messages after ``cursor`` that ``query`` keeps to ``out``; the id
        of the last one kept (None: none)."""
        start = 0 if cursor <= self.after else bisect_right(self.ids, cursor)
        if query.plain:
            out.append(self.blob if start == 0 else b"".join(self.messages[start:]))
            return self.last if start < len(self.ids) else None
        where: Iterable[int] = (range(start, len(self.ids)) if query.task_id is None
                                else (i for i in self.positions(query.task_id) if i >= start))
        kept = None
        kinds = query.kinds
        for i in where:
            if kinds is None or self.events[i].kind in kinds:
                out.append(self.messages[i])
                kept = i
        return None if kept is None else self.ids[kept]


class _Listener:
    """A stream as the broadcast sees it: what it keeps, where it is, how to write to it
    directly (if its server allows), whether it waits for events (``waiter``), when it
    last wrote and whether it is in a write (since when), and whether its heartbeat is
    due."""

    __slots__ = ("cursor", "direct", "due", "heartbeat", "last_check", "last_write", "query",
                 "send_timeout", "stalled", "task", "told", "waiter", "writing_since")

    def __init__(self, query: StreamQuery, start: int, *, heartbeat: float,
                 send_timeout: float, direct: Callable[[bytes], bool] | None) -> None:
        self.query = query
        self.cursor = start  # the last event id passed (sent, or left out by the filter)
        self.told = start  # the last event id the client was told of
        self.direct = direct
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.last_write = self.last_check = time.monotonic()
        self.writing_since: float | None = None
        self.waiter: asyncio.Future[None] | None = None  # set while it waits for events
        self.due = False  # its heartbeat: check it is still allowed, keep it alive
        self.stalled = False  # dropped: its client took nothing for send_timeout
        self.task: asyncio.Task[None] | None = None  # what writes (cancelled if stalled)

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class Broadcast:
    """The event log followed once for every stream of a server (see the module's text).

    It follows :meth:`GhostRunner.event_batches` from the newest event while at least
    one stream is open (started by the first, stopped after the last), keeping the
    newest :data:`KEEP` events as encoded blocks; :meth:`since` gives a stream what
    came after its cursor. At each hand-out it writes the new events itself to the
    streams that wait for them and can be written to directly (``STREAM_WRITE``: no
    task switch per stream), and wakes the others. A ticker wakes the streams whose
    heartbeat is due and drops those whose client has taken nothing for their
    ``send_timeout``.

    Args:
        runner: whose event log is followed.
        interval: seconds at most between two hand-outs of new events.
        writes_per_second: the hand-outs are spaced so that the streams together make
            at most about this many writes a second (``interval`` at most apart).
        keep: events kept (whole blocks: a few more).
    """

    def __init__(self, runner: GhostRunner, *, interval: float = INTERVAL,
                 writes_per_second: float = WRITES_PER_SECOND, keep: int = KEEP) -> None:
        self.runner = runner
        self.interval = interval
        self.writes_per_second = writes_per_second
        self.keep = keep
        self.base: int | None = None  # the blocks hold every event with base < id
        self.last = 0  # ... up to last
        self.error: GhostRunnerError | None = None  # why following stopped
        self.batches = 0  # batches handed out (tests, benchmarks)
        self._blocks: list[_Block] = []
        self._lasts: list[int] = []  # each block's last id (for bisect)
        self._kept = 0
        self._listeners: set[_Listener] = set()
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()

    def covers(self, cursor: int) -> bool:
        """Whether what comes after ``cursor`` is in the blocks (else: in the store)."""
        return self.base is not None and cursor >= self.base

    def since(self, cursor: int, query: StreamQuery, limit: int = CHUNK
              ) -> tuple[bytes, int | None, int | None]:
        """The messages after ``cursor`` that ``query`` keeps (whole blocks, until
        ``limit`` events are passed), the id of the last one kept, and the id of the
        last event passed (None: nothing new). Only for a cursor it :meth:`covers`."""
        blocks = self._blocks
        i = bisect_right(self._lasts, cursor)
        if i == len(blocks):
            return b"", None, None
        out: list[bytes] = []
        kept = None
        passed = 0
        for block in blocks[i:]:
            got = block.pick(cursor, query, out)
            kept = got if got is not None else kept
            passed += len(block.ids)
            cursor = block.last
            if passed >= limit:
                break
        return (out[0] if len(out) == 1 else b"".join(out)), kept, cursor

    async def join(self, listener: _Listener) -> None:
        """A stream opens: follow the log if not yet (raises what the store raised)."""
        self._listeners.add(listener)
        try:
            async with self._starting:
                if self._task is None:
                    self.error = None
                    start = await self.runner.store.last_event_id()
                    self._blocks, self._lasts, self._kept = [], [], 0
                    self.base = self.last = start
                    self._task = asyncio.create_task(self._follow(start),
                                                     name="ghostrunner-sse-broadcast")
                if self._ticker is None:
                    self._ticker = asyncio.create_task(self._tick(),
                                                       name="ghostrunner-sse-ticker")
        except BaseException:
            self._listeners.discard(listener)
            raise

    def leave(self, listener: _Listener) -> None:
        """A stream ends (the last one stops the following at the next event)."""
        self._listeners.discard(listener)

    async def close(self) -> None:
        """Stop (the app stops)."""
        for task in (self._task, self._ticker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._ticker = None

    async def _follow(self, start: int) -> None:
        batches = self.runner.event_batches(start)
        try:
            async for batch in batches:
                self._hand_out(batch)
                if not self._listeners:
                    break
                # what comes meanwhile goes out together: a stream writes once per
                # hand-out, whatever the number of events
                pause = min(self.interval, len(self._listeners) / self.writes_per_second)
                await asyncio.sleep(pause)
        except GhostRunnerError as exc:
            log.warning("event streams: could not read the event log: %s", exc)
            self.error = exc
        except Exception:  # a bug: the streams end (their clients come back), logged
            log.exception("event streams: the broadcast failed")
            self.error = GhostRunnerError("the event broadcast failed (see the log)")
        finally:
            if self._task is asyncio.current_task():  # (before any await: see join)
                self._task = None
                self.base = None
                self._blocks, self._lasts, self._kept = [], [], 0
                for listener in self._listeners:
                    listener.wake()  # to the store (or the error)
            await batches.aclose()

    def _hand_out(self, batch: Sequence[Event]) -> None:
        block = _Block(self.last, batch)
        self._blocks.append(block)
        self._lasts.append(block.last)
        self._kept += len(block.ids)
        self.last = block.last
        while self._kept - len(self._blocks[0].ids) >= self.keep:
            gone = self._blocks.pop(0)
            del self._lasts[0]
            self._kept -= len(gone.ids)
            self.base = gone.last
        self.batches += 1
        now = time.monotonic()
        for x in self._listeners:
            if x.waiter is None or x.waiter.done():
                continue  # busy: it reads what is new itself when it is done
            if x.direct is not None and x.cursor == block.after:  # it waits at the head
                kept: int | None
                if x.query.plain:
                    body, kept = block.blob, block.last
                else:
                    out: list[bytes] = []
                    kept = block.pick(x.cursor, x.query, out)
                    body = b"".join(out)
                if not body or x.direct(body):  # written: it goes on waiting
                    x.cursor = block.last
                    if kept is not None:
                        x.told = kept
                    if body:
                        x.last_write = now
                    continue
            x.wake()  # it writes itself (the ASGI way, from the store, or a full socket)

    async def _tick(self) -> None:
        """Heartbeats and stalled clients, for every stream: one timer, not one per
        stream and write."""
        try:
            while self._listeners:
                await asyncio.sleep(min(min(x.heartbeat, x.send_timeout)
                                        for x in self._listeners) / 4)
                now = time.monotonic()
                for x in list(self._listeners):
                    if x.writing_since is not None:
                        if now - x.writing_since >= x.send_timeout and x.task is not None:
                            x.stalled = True
                            x.task.cancel()
                    elif (now - x.last_check >= x.heartbeat
                          or now - x.last_write >= x.heartbeat):
                        x.due = True
                        x.wake()
        finally:
            if self._ticker is asyncio.current_task():
                self._ticker = None


def _encode(events: Iterable[Event], query: StreamQuery
            ) -> tuple[bytes, int | None, int | None]:
    """The messages of ``events`` that ``query`` keeps, the id of the last one kept,
    and the id of the last event (kept or not)."""
    parts: list[bytes] = []
    kept = last = None
    for event in events:
        last = event.id
        if query.keeps(event):
            parts.append(format_event(event))
            kept = event.id
    return b"".join(parts), kept, last


class EventStream(Response):
    """The streaming answer of ``GET /events`` (an ASGI response that runs until the
    client goes, the server shuts down, or the client stops reading).

    Args:
        broadcast: the server's :class:`Broadcast` (its runner's event log).
        query: where to start and what to keep.
        slots: the stream's slot, taken by the handler, given back at the end.
        heartbeat: seconds between keep-alive comments on a quiet stream.
        send_timeout: seconds a client may take to take one write before it is dropped.
        allowed: checked at every heartbeat; the stream ends when it says False (the
            token was revoked, the console session ended).
    """

    media_type = "text/event-stream"

    def __init__(self, broadcast: Broadcast, query: StreamQuery, slots: StreamSlots, *,
                 heartbeat: float, send_timeout: float,
                 allowed: Callable[[], Awaitable[bool]] | None = None) -> None:
        super().__init__(content=None, headers={
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # nginx: send each event at once
            "Connection": "close",  # a stream is the connection's last answer
        }, media_type="text/event-stream; charset=utf-8")
        # no body given, but it is not empty: no Content-Length (chunked)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.broadcast = broadcast
        self.runner = broadcast.runner
        self.query = query
        self.slots = slots
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = scope.get("extensions") or {}
        self.direct: Callable[[bytes], bool] | None = extensions.get(STREAM_WRITE)
        try:
            start = await self._start()
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            # the position it starts at: a client that reconnects before its first event
            # resumes from there (EventSource keeps it as its last event id)
            async with asyncio.timeout(self.send_timeout):
                await send({"type": "http.response.body", "more_body": True,
                            "body": f"retry: {RETRY_MS}\nid: {start}\n"
                                    f": ghostrunner event stream\n\n".encode()})
            await self._stream(start, receive, send)
        except (OSError, TimeoutError):
            pass  # the client went, or took too long: it reconnects where it was
        finally:
            self.slots.give()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _start(self) -> int:
        """Where the stream starts: after the asked id, or at the newest event (only
        what comes next); an id beyond the newest (the database was replaced) starts
        from the oldest kept."""
        last = await self.runner.store.last_event_id()
        after = self.query.after
        return last if after is None else (0 if after > last else after)

    async def _stream(self, start: int, receive: Receive, send: Send) -> None:
        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        listener = _Listener(self.query, start, heartbeat=self.heartbeat,
                             send_timeout=self.send_timeout, direct=self.direct)
        try:
            await self.broadcast.join(listener)
        except GhostRunnerError as error:
            log.warning("event stream ended: %s", error)
            return
        listener.task = asyncio.create_task(self._pump(send, listener),
                                            name="ghostrunner-sse-write")
        tasks = [listener.task,
                 asyncio.create_task(gone(), name="ghostrunner-sse-disconnect")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.broadcast.leave(listener)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if task.cancelled():
                if listener.stalled:
                    log.info("event stream: dropped a client that read nothing for %gs",
                             self.send_timeout)
                continue
            exc = task.exception()
            if isinstance(exc, GhostRunnerError):
                log.warning("event stream ended: %s", exc)
            elif exc is not None and not isinstance(exc, OSError):
                raise exc

    async def _pump(self, send: Send, listener: _Listener) -> None:
        """Write what comes after the listener's cursor, wait (the broadcast writes for
        it meanwhile when it can, else wakes it), and its heartbeats."""
        hub = self.broadcast
        query = self.query
        direct = self.direct
        loop = asyncio.get_running_loop()

        async def write(body: bytes) -> None:
            if direct is None or not direct(body):  # (see STREAM_WRITE)
                listener.writing_since = time.monotonic()  # the ticker drops it if stuck
                await send({"type": "http.response.body", "body": body, "more_body": True})
                listener.writing_since = None
            listener.last_write = time.monotonic()

        while True:
            if listener.due:  # its heartbeat
                listener.due = False
                listener.last_check = time.monotonic()
                if self.allowed is not None and not await self.allowed():
                    return  # revoked meanwhile: the stream ends
                if listener.last_check - listener.last_write >= self.heartbeat:
                    beat = ": keepalive\n"
                    if listener.cursor != listener.told:
                        # filtered out: move the client's cursor
                        beat += f"id: {listener.cursor}\n"
                        listener.told = listener.cursor
                    await write((beat + "\n").encode())
            if hub.covers(listener.cursor):
                body, kept, last = hub.since(listener.cursor, query)
            else:  # behind what the broadcast keeps: from the store, a batch at a time
                if hub.error is not None:
                    raise hub.error
                batch = await self.runner.store.events_after(listener.cursor, CHUNK)
                body, kept, last = _encode(batch, query)
            if last is None:  # nothing new: wait (no await between the read and this)
                listener.waiter = loop.create_future()
                try:
                    await listener.waiter
                finally:
                    listener.waiter = None
                continue
            listener.cursor = last
            if body:
                await write(body)
                if kept is not None:
                    listener.told = kept


def open_stream(request: Request, broadcast: Broadcast, slots: StreamSlots, *,
                heartbeat: float, send_timeout: float,
                allowed: Callable[[], Awaitable[bool]] | None = None) -> EventStream:
    """The stream a request asks for (its query checked first: 422), in a slot (503)."""
    query = parse_stream_query(request.query_params, request.headers.get("last-event-id"))
    slots.take()
    return EventStream(broadcast, query, slots, heartbeat=heartbeat,
                       send_timeout=send_timeout, allowed=allowed)


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

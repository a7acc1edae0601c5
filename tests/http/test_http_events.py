"""``GET /events`` (and the console's ``/ui/events``): Server-Sent Events over a real
uvicorn server on loopback, with the connection guard of ``ghostrunner serve``: the
messages, resuming with ``Last-Event-ID`` / ``?after=``, filters, heartbeats, the
stream limit counted apart from connections, slow clients dropped, shutdown not held up
by open streams, revoked tokens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar, cast

import attrs
import httpx
import pytest
import uvicorn

from ghostrunner import LoopSettings, Task
from ghostrunner import events as ev
from ghostrunner.testing import FakeExecutor, InMemoryStore
from ghostrunner_http._events import (
    CHUNK,
    Broadcast,
    StreamQuery,
    format_event,
    parse_stream_query,
)
from ghostrunner_http._guard import (
    ConnectionGuard,
    GuardedListener,
    GuardedProtocol,
    guarded_protocol,
)
from ghostrunner_http._request import Services
from ghostrunner_http.app import create_app
from ghostrunner_http.config import Settings
from ghostrunner_http.console import COOKIE
from tests.http.conftest import ADMIN, DEVICES

T = TypeVar("T")
LIMIT = 10.0  # seconds: a safety net on every wait, never reached when things work


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@attrs.define
class Live:
    """A served app: its URL, services, guard and uvicorn server."""

    url: str
    app: Any
    guard: ConnectionGuard
    server: uvicorn.Server
    executor: FakeExecutor

    @property
    def svc(self) -> Services:
        services: Services = self.app.state.services
        return services

    def headers(self, token: str = ADMIN, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", **extra}


async def until(check: Callable[[], bool]) -> None:
    """Wait until ``check()``: for what the server does with no event to wait on (it
    noticed a disconnection, it started)."""
    async with asyncio.timeout(LIMIT):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def live(*, guarded: bool = True, store: InMemoryStore | None = None,
               **settings: Any) -> AsyncIterator[Live]:
    """The app served by uvicorn with the connection guard of ``ghostrunner serve``
    (its protocol gives streams their direct write, ``STREAM_WRITE``), or without it
    (``guarded=False``: plain uvicorn, every write the ASGI way)."""
    cfg = Settings(executor="fake", admin_token=ADMIN, **settings)
    executor = FakeExecutor(devices=DEVICES)
    app = create_app(cfg, store=store or InMemoryStore(), executor=executor,
                     announce=lambda s: None)
    guard = ConnectionGuard(header_timeout=cfg.header_timeout, body_timeout=cfg.body_timeout,
                            max_connections=cfg.max_connections, max_streams=cfg.max_streams,
                            stream_send_timeout=cfg.stream_send_timeout)
    config = uvicorn.Config(app, host="127.0.0.1", port=0,
                            http=guarded_protocol(guard) if guarded else "h11",
                            ws="none", lifespan="on", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    listener = config.bind_socket()
    if guarded:
        listener = GuardedListener.adopt(listener, guard)
    port = listener.getsockname()[1]
    task = asyncio.create_task(server.serve(sockets=[listener]))
    await until(lambda: server.started)
    try:
        yield Live(f"http://127.0.0.1:{port}", app, guard, server, executor)
    finally:
        server.should_exit = True
        async with asyncio.timeout(LIMIT):  # open streams must not hold the shutdown up
            await task


class CountingStore(InMemoryStore):
    """Counts the event log's reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def events_after(self, after: int, limit: int = 1000) -> Any:
        self.reads += 1
        return await super().events_after(after, limit)


@attrs.define
class Message:
    id: str | None = None
    event: str | None = None
    data: str | None = None
    comments: list[str] = attrs.field(factory=list)

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


async def messages(response: httpx.Response) -> AsyncIterator[Message]:
    """The SSE messages of ``response`` (comment-only ones too)."""
    current = Message()
    async for line in response.aiter_lines():
        if not line:
            yield current
            current = Message()
        elif line.startswith(":"):
            current.comments.append(line[1:].strip())
        else:
            field, _, value = line.partition(": ")
            if field in ("id", "event", "data"):
                setattr(current, field, value)


async def read_events(stream: AsyncIterator[Message], n: int) -> list[Message]:
    got: list[Message] = []
    async with asyncio.timeout(LIMIT):
        async for message in stream:
            if message.event is not None:
                got.append(message)
                if len(got) == n:
                    return got
    raise AssertionError(f"the stream ended after {len(got)} events")


async def closed(srv: Live) -> None:
    """Until the server has noticed that the streams' clients went (no event tells)."""
    await until(lambda: not (srv.svc.streams.active or srv.guard.streams))


async def submit(live_: Live, *nodes: str, name: str = "t") -> Task:
    return await live_.svc.runner.submit(Task(name=name, command="true", targets=nodes))


# --------------------------------------------------------------------------- parsing


def test_query_checks_name_the_field() -> None:
    from starlette.datastructures import QueryParams

    from ghostrunner.errors import ValidationError

    for query, header, field in (("after=x", None, "after"), ("after=-1", None, "after"),
                                 ("", "abc", "Last-Event-ID"), ("kinds=run.nope", None, "kinds"),
                                 ("kinds=", None, "kinds"), ("tsk=1", None, "tsk"),
                                 ("after=1&after=2", None, "after"), ("task=", None, "task")):
        with pytest.raises(ValidationError) as info:
            parse_stream_query(QueryParams(query), header)
        assert info.value.field == field, query
    got = parse_stream_query(QueryParams("after=5&task=t1&kinds=run.finished,task.created"),
                             "9")
    assert (got.after, got.task_id, got.kinds) == (9, "t1",
                                                   frozenset({ev.RUN_FINISHED,
                                                              ev.TASK_CREATED}))


def test_the_broadcast_hands_each_stream_what_it_keeps_after_its_cursor() -> None:
    from datetime import UTC, datetime

    from ghostrunner import Event

    async def go() -> None:
        hub = Broadcast(cast(Any, None))
        hub.base = hub.last = 10
        at = datetime(2025, 1, 1, tzinfo=UTC)
        kinds = [ev.TASK_CREATED, ev.RUN_CLAIMED, ev.RUN_FINISHED]

        def batch(first: int, n: int) -> list[Event]:
            return [Event(id=i, at=at, kind=kinds[i % 3], task_id=f"t{i % 2}",
                          node_id="node-001") for i in range(first, first + n)]

        hub._hand_out(batch(11, 4))  # 11-14
        hub._hand_out(batch(15, 3))  # 15-17
        everything = StreamQuery()
        body, kept, last = hub.since(10, everything)
        assert (kept, last) == (17, 17)
        assert [int(x) for x in re.findall(rb"^id: (\d+)$", body, re.M)] == list(range(11, 18))
        assert body == b"".join(format_event(e) for e in batch(11, 7))
        assert hub.since(17, everything) == (b"", None, None)  # nothing new
        # a cursor inside a batch: the rest of it
        body, kept, last = hub.since(12, everything)
        assert re.findall(rb"^id: (\d+)$", body, re.M) == [b"13", b"14", b"15", b"16", b"17"]
        # at most about ``limit`` events: whole batches
        assert hub.since(10, everything, limit=2)[2] == 14
        # filters: the task's events (its index), of the kinds asked
        body, kept, last = hub.since(10, StreamQuery(task_id="t1"))
        assert re.findall(rb"^id: (\d+)$", body, re.M) == [b"11", b"13", b"15", b"17"]
        assert (kept, last) == (17, 17)
        body, kept, last = hub.since(10, StreamQuery(task_id="t1", kinds=frozenset(
            {ev.RUN_FINISHED})))
        assert re.findall(rb"^id: (\d+)$", body, re.M) == [b"11", b"17"]
        body, kept, last = hub.since(12, StreamQuery(kinds=frozenset({ev.TASK_CREATED})))
        assert re.findall(rb"^id: (\d+)$", body, re.M) == [b"15"]
        # none kept, but the cursor moves past them (the next heartbeat tells the client)
        assert hub.since(10, StreamQuery(task_id="t9")) == (b"", None, 17)
        # only the newest ``keep`` events (whole batches) stay
        hub.keep = 3
        hub._hand_out(batch(18, 3))  # 18-20
        assert hub.base == 17 and not hub.covers(16) and hub.covers(17)

    run(go())


# --------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("guarded", [True, False], ids=["direct-writes", "asgi-writes"])
def test_events_are_sse_messages_in_order_with_id_kind_and_json(
        guarded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    direct: list[bytes] = []
    write = GuardedProtocol._stream_write

    def spy(self: GuardedProtocol, body: bytes) -> bool:
        done = write(self, body)
        if done:
            direct.append(body)
        return done

    monkeypatch.setattr(GuardedProtocol, "_stream_write", spy)

    async def go() -> None:
        async with live(guarded=guarded) as srv, httpx.AsyncClient(timeout=LIMIT) as client:
            srv.executor.set_online("node-001")
            async with client.stream("GET", srv.url + "/events", headers=srv.headers()) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                assert r.headers["cache-control"] == "no-store"
                assert r.headers["x-accel-buffering"] == "no"
                stream = messages(r)
                first = await anext(stream)  # the opening: retry and a comment, no event
                assert first.event is None and first.comments
                task = await submit(srv, "node-001")
                got = await read_events(stream, 3)
            assert [m.event for m in got] == [ev.TASK_CREATED, ev.RUN_CLAIMED, ev.RUN_FINISHED]
            bodies = [m.json() for m in got]
            assert [b["kind"] for b in bodies] == [m.event for m in got]
            assert [str(b["id"]) for b in bodies] == [m.id for m in got]
            assert [b["id"] for b in bodies] == sorted(b["id"] for b in bodies)
            assert {b["task_id"] for b in bodies} == {task.id}
            assert bodies[0]["data"] == {"name": "t", "runs": 1, "nodes": ["node-001"]}
            assert bodies[2]["node_id"] == "node-001"
            assert bodies[2]["data"] == {"state": "succeeded", "attempts": 1, "exit_code": 0}
            assert bodies[2]["at"].endswith("Z")
            await closed(srv)  # the stream's slot was given back

    run(go())
    # under ghostrunner serve's protocol the events were written directly (chunks
    # framed by the guard: httpx decoded them above), else through ASGI
    assert (b"".join(direct).count(b"\nevent: ") == 3) is guarded


def test_last_event_id_resumes_from_the_store_and_wins_over_after() -> None:
    async def go() -> None:
        async with live() as srv, httpx.AsyncClient(timeout=LIMIT) as client:
            tasks = [await submit(srv, "node-002", name=f"t{i}") for i in range(4)]
            stored = list(await srv.svc.runner.store.events_after(0, 100))
            assert [e.task_id for e in stored] == [t.id for t in tasks]
            for headers, query in (({"Last-Event-ID": str(stored[1].id)}, "?after=0"),
                                   ({}, f"?after={stored[1].id}")):
                async with client.stream("GET", srv.url + "/events" + query,
                                         headers=srv.headers(**headers)) as r:
                    got = await read_events(messages(r), 2)
                assert [m.json()["task_id"] for m in got] == [tasks[2].id, tasks[3].id]
            async with client.stream("GET", srv.url + "/events?after=0",
                                     headers=srv.headers()) as r:
                got = await read_events(messages(r), 4)
            assert [int(m.id or 0) for m in got] == [e.id for e in stored]

    run(go())


def test_filters_and_the_cursor_of_what_they_leave_out() -> None:
    async def go() -> None:
        async with live(stream_heartbeat=0.2) as srv, httpx.AsyncClient(timeout=LIMIT) as client:
            srv.executor.set_online("node-001")
            mine = await submit(srv, "node-001", name="mine")
            await srv.svc.runner.wait(mine.id, timeout=LIMIT)
            other = await submit(srv, "node-002", name="other")
            last = await srv.svc.runner.store.last_event_id()
            url = f"{srv.url}/events?after=0&task={mine.id}&kinds=task.created,run.finished"
            async with client.stream("GET", url, headers=srv.headers()) as r:
                stream = messages(r)
                got = await read_events(stream, 2)
                assert [m.event for m in got] == [ev.TASK_CREATED, ev.RUN_FINISHED]
                assert {m.json()["task_id"] for m in got} == {mine.id}
                # the other task's event is left out, but the next heartbeat moves the
                # client's cursor past it (an id line alone): a reconnection skips it
                async with asyncio.timeout(LIMIT):
                    async for message in stream:
                        if message.id is not None and message.event is None:
                            assert "keepalive" in message.comments
                            assert int(message.id) == last
                            break
            assert other.id != mine.id

    run(go())


def test_heartbeats_keep_a_quiet_stream_alive() -> None:
    async def go() -> None:
        async with (live(stream_heartbeat=0.1) as srv, httpx.AsyncClient(timeout=LIMIT) as client,
                    client.stream("GET", srv.url + "/events", headers=srv.headers()) as r):
            beats = 0
            async with asyncio.timeout(LIMIT):
                async for message in messages(r):
                    beats += "keepalive" in message.comments
                    if beats == 3:
                        break

    run(go())


def test_auth_and_bad_queries_are_answered_before_the_stream() -> None:
    async def go() -> None:
        async with live() as srv, httpx.AsyncClient(timeout=LIMIT) as client:
            r = await client.get(srv.url + "/events")
            assert r.status_code == 401
            r = await client.get(srv.url + "/events?after=soon", headers=srv.headers())
            assert (r.status_code, r.json()["data"]["field"]) == (422, "after")
            r = await client.get(srv.url + "/events",
                                 headers=srv.headers(**{"Last-Event-ID": "x"}))
            assert (r.status_code, r.json()["data"]["field"]) == (422, "Last-Event-ID")
            r = await client.get(srv.url + "/events?kinds=run.exploded", headers=srv.headers())
            assert (r.status_code, r.json()["data"]["field"]) == (422, "kinds")
            # read scope is enough
            r = await client.post(srv.url + "/token/create", headers=srv.headers(),
                                  json={"details": {"name": "viewer", "scope": "read"}})
            viewer = r.json()["data"]["token"]
            async with client.stream("GET", srv.url + "/events",
                                     headers=srv.headers(viewer)) as r:
                assert r.status_code == 200
            await closed(srv)

    run(go())


def test_streams_have_their_own_limit_and_never_starve_requests() -> None:
    async def go() -> None:
        # two connections at most for requests, two streams at most apart from them
        async with live(max_streams=2, max_connections=2) as srv:
            clients = [httpx.AsyncClient(timeout=LIMIT) for _ in range(4)]
            try:
                async with contextlib.AsyncExitStack() as stack:
                    for client in clients[:2]:
                        r = await stack.enter_async_context(
                            client.stream("GET", srv.url + "/events", headers=srv.headers()))
                        assert r.status_code == 200
                        await anext(messages(r))
                    assert srv.svc.streams.active == 2 and len(srv.guard.streams) == 2
                    r = await clients[2].get(srv.url + "/events", headers=srv.headers())
                    assert r.status_code == 503
                    assert r.json()["data"]["error"] == "too_many_streams"
                    assert r.headers["retry-after"]
                    # ordinary requests still have both their connections
                    answers = await asyncio.gather(
                        clients[2].get(srv.url + "/task/list", headers=srv.headers()),
                        clients[3].get(srv.url + "/devices", headers=srv.headers()))
                    assert [a.status_code for a in answers] == [200, 200]
                    assert srv.guard.closed["evicted"] == srv.guard.closed["refused"] == 0
            finally:
                for client in clients:
                    await client.aclose()
            await closed(srv)

    run(go())


def test_shutdown_closes_open_streams_at_once() -> None:
    async def go() -> None:
        async with httpx.AsyncClient(timeout=LIMIT) as client:
            async with live() as srv:
                r = await client.send(client.build_request(
                    "GET", srv.url + "/events", headers=srv.headers()), stream=True)
                stream = messages(r)
                await anext(stream)
                srv.server.should_exit = True  # the live() exit waits LIMIT at most

            async def drain() -> None:
                async with asyncio.timeout(LIMIT):
                    async for _ in stream:
                        pass

            with pytest.raises(httpx.HTTPError):  # the server went: the stream breaks
                await drain()
            await r.aclose()

    run(go())


def test_a_client_that_reads_nothing_is_dropped_and_costs_bounded_memory() -> None:
    async def go() -> None:
        async with live(stream_send_timeout=0.5) as srv:
            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            port = int(srv.url.rsplit(":", 1)[1])
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, (
                f"GET /events?after=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}"
                "\r\n\r\n").encode())
            try:
                await until(lambda: bool(srv.guard.streams))
                async with asyncio.timeout(LIMIT):
                    # events faster than a client that reads nothing can take
                    runner = srv.svc.runner
                    i = 0
                    while srv.guard.closed["stalled_stream"] == 0:
                        for _ in range(200):
                            await runner.submit(Task(name="x" * 200, command="true",
                                                     targets=["node-003"]))
                            i += 1
                        await asyncio.sleep(0.05)
                await closed(srv)
            finally:
                sock.close()
            assert i >= CHUNK  # more than a stream may hold were written meanwhile
            assert not srv.guard.streams

    run(go())


def test_without_the_guard_a_client_that_reads_nothing_is_dropped_by_the_app() -> None:
    async def go() -> None:
        # plain uvicorn: no stall timer in the protocol; the broadcast's ticker drops it
        async with live(guarded=False, stream_send_timeout=0.5) as srv:
            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            port = int(srv.url.rsplit(":", 1)[1])
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, (
                f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}"
                "\r\n\r\n").encode())
            try:
                await until(lambda: srv.svc.streams.active == 1)
                async with asyncio.timeout(LIMIT):
                    runner = srv.svc.runner
                    while srv.svc.streams.active:
                        for _ in range(200):
                            await runner.submit(Task(name="x" * 200, command="true",
                                                     targets=["node-003"]))
                        await asyncio.sleep(0.05)
            finally:
                sock.close()

    run(go())


def test_many_streams_share_one_read_and_one_encoding_per_batch() -> None:
    async def go() -> None:
        store = CountingStore()
        # no slow poll within the test: every read of the log is the broadcast's
        async with live(store=store, loop=LoopSettings(events_poll=3600)) as srv:
            hub = srv.svc.broadcast
            clients = [httpx.AsyncClient(timeout=LIMIT) for _ in range(20)]
            try:
                async with contextlib.AsyncExitStack() as stack:
                    streams = []
                    for client in clients:
                        r = await stack.enter_async_context(
                            client.stream("GET", srv.url + "/events", headers=srv.headers()))
                        streams.append(messages(r))
                        await anext(streams[-1])
                    reads, batches = store.reads, hub.batches
                    tasks = [await submit(srv, "node-002", name=f"t{i}") for i in range(30)]
                    got = [await read_events(stream, 30) for stream in streams]
                    reads, batches = store.reads - reads, hub.batches - batches
            finally:
                for client in clients:
                    await client.aclose()
        ids = [[m.json()["task_id"] for m in events] for events in got]
        assert ids == [[t.id for t in tasks]] * 20  # every stream every event, in order
        # the log was read once per hand-out (the feed's refresh), not once per stream
        assert 1 <= batches <= reads <= batches + 2, (reads, batches)
        assert reads < 20

    run(go())


def test_a_stream_behind_what_the_broadcast_keeps_reads_the_store_then_joins() -> None:
    async def go() -> None:
        async with live() as srv, httpx.AsyncClient(timeout=LIMIT) as client:
            hub = srv.svc.broadcast
            hub.keep = 5  # the newest 5 events (whole batches) only
            async with client.stream("GET", srv.url + "/events?after=0",
                                     headers=srv.headers()) as first:
                following = messages(first)
                await anext(following)
                tasks = []
                for i in range(30):  # one at a time: a batch each
                    tasks.append(await submit(srv, "node-002", name=f"t{i}"))
                    await read_events(following, 1)
                assert hub.base is not None and hub.base >= 25  # older events dropped
                # a second stream from the start: from the store, then from the broadcast
                async with client.stream("GET", srv.url + "/events?after=0",
                                         headers=srv.headers()) as second:
                    behind = messages(second)
                    early = await read_events(behind, 30)
                    more = [await submit(srv, "node-002", name=f"u{i}") for i in range(3)]
                    late = await read_events(behind, 3)
            assert [m.json()["task_id"] for m in early + late] == [t.id for t in tasks + more]
            await closed(srv)
            assert hub.base is not None  # waiting for the next event, which it drops
            await submit(srv, "node-002", name="nobody-follows")
            await until(lambda: hub.base is None)  # the last stream gone: it stopped

    run(go())


def test_a_store_failing_under_the_broadcast_ends_the_streams_and_the_next_ones_work(
        caplog: pytest.LogCaptureFixture) -> None:
    from ghostrunner.errors import StoreError

    class Flaky(InMemoryStore):
        failing = False

        async def events_after(self, after: int, limit: int = 1000) -> Any:
            if self.failing:
                raise StoreError("the database went away")
            return await super().events_after(after, limit)

    async def go() -> None:
        store = Flaky()
        async with live(store=store) as srv, httpx.AsyncClient(timeout=LIMIT) as client:
            async with client.stream("GET", srv.url + "/events", headers=srv.headers()) as r:
                stream = messages(r)
                await anext(stream)
                store.failing = True
                await submit(srv, "node-003")
                async with asyncio.timeout(LIMIT):
                    async for _ in stream:  # ends: its client would reconnect
                        pass
            await closed(srv)
            store.failing = False
            async with client.stream("GET", srv.url + "/events", headers=srv.headers()) as r:
                stream = messages(r)
                await anext(stream)
                task = await submit(srv, "node-003", name="after")
                (created,) = await read_events(stream, 1)
            assert created.json()["task_id"] == task.id

    run(go())
    assert "could not read the event log: the database went away" in caplog.text


def test_a_revoked_token_ends_its_streams() -> None:
    async def go() -> None:
        async with live(stream_heartbeat=0.1) as srv, httpx.AsyncClient(timeout=LIMIT) as client:
            r = await client.post(srv.url + "/token/create", headers=srv.headers(),
                                  json={"details": {"name": "gone", "scope": "read"}})
            secret = r.json()["data"]["token"]
            async with client.stream("GET", srv.url + "/events",
                                     headers=srv.headers(secret)) as r:
                stream = messages(r)
                await anext(stream)
                r2 = await client.request("DELETE", srv.url + "/token/delete",
                                          headers=srv.headers(), json={"details": {"name": "gone"}})
                assert r2.status_code == 200
                async with asyncio.timeout(LIMIT):
                    async for _ in stream:  # ends by itself
                        pass

    run(go())


def test_a_revoked_token_ends_its_streams_while_events_flow() -> None:
    async def go() -> None:
        async with live(stream_heartbeat=0.1) as srv, httpx.AsyncClient(timeout=LIMIT) as client:
            r = await client.post(srv.url + "/token/create", headers=srv.headers(),
                                  json={"details": {"name": "busy", "scope": "read"}})
            secret = r.json()["data"]["token"]

            async def churn() -> None:  # an event every 20 ms: never a quiet heartbeat
                for i in range(10_000):
                    await submit(srv, "node-003", name=f"c{i}")
                    await asyncio.sleep(0.02)

            async with client.stream("GET", srv.url + "/events",
                                     headers=srv.headers(secret)) as r:
                stream = messages(r)
                await anext(stream)
                busy = asyncio.create_task(churn())
                try:
                    await read_events(stream, 3)
                    r2 = await client.request("DELETE", srv.url + "/token/delete",
                                              headers=srv.headers(),
                                              json={"details": {"name": "busy"}})
                    assert r2.status_code == 200
                    async with asyncio.timeout(LIMIT):
                        async for _ in stream:  # ends by itself, events or not
                            pass
                finally:
                    busy.cancel()

    run(go())


def test_the_console_stream_signs_in_with_the_session_cookie() -> None:
    async def go() -> None:
        async with live() as srv, httpx.AsyncClient(timeout=LIMIT) as client:
            r = await client.get(srv.url + "/ui/events")
            assert r.status_code == 401  # signed out: no stream
            r = await client.post(srv.url + "/ui/login", data={"token": ADMIN},
                                  headers={"Origin": srv.url})
            assert client.cookies.get(COOKIE)
            async with client.stream("GET", srv.url + "/ui/events") as r:
                assert r.status_code == 200
                stream = messages(r)
                await anext(stream)
                task = await submit(srv, "node-003")
                (created,) = await read_events(stream, 1)
            assert created.json()["task_id"] == task.id

    run(go())

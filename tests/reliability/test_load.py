"""Load: 200 concurrent clients create and list tasks for 30 s against a real server.

``ghostrunner serve`` (fake executor: its devices are online, so the reconcile loop runs
every task while the clients keep creating; SQLite database in ``tmp_path``) runs in a
subprocess on a loopback port. 200 keep-alive connections, each alternating
``POST /task/create`` and ``GET /task/list``, as fast as the server answers (a closed
loop: the latency figures are those of a saturated server, about 200 / throughput).

Asserted: every answer is the expected 200; "database is locked" appears in no answer and
not in the server's log; the server stops cleanly afterwards; and the database then holds
exactly the tasks whose creation was answered, each with one run per target (no task half
written). Recorded: requests/s and the p50/p95/p99 latency of create and list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ghostrunner import TaskQuery
from ghostrunner.sqlite import SQLiteStore
from tests.reliability.rawhttp import Connection, build, percentile
from tests.serverproc import ServerProcess

CLIENTS = 200
SECONDS = 30.0
ADMIN = "load-admin-secret-0123456789abcdef"
NODES = ["node-001", "node-002", "node-003"]
LOCKED = "database is locked"
TIMEOUT = 60.0  # one request; longer counts as an error


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path, 'executor = "fake"\n', env={
        "GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
        # one log line per request would cost the server more than some handlers do
        "GHOSTRUNNER_SERVER_ACCESS_LOG": "false",
    })
    try:
        yield proc.start()
    finally:
        proc.kill()


class Tally:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {"create": [], "list": []}
        self.created: list[str] = []
        self.errors: list[str] = []
        self.locked = 0
        self.connected = 0
        self.all_connected = asyncio.Event()
        self.start = asyncio.Event()


async def _client(port: int, i: int, stop_at: Callable[[], bool], tally: Tally) -> None:
    create = build("POST", "/task/create", json.dumps({"details": {
        "name": f"load-{i % 20}", "command": f"echo client {i}", "nodeids": NODES,
    }}).encode(), ADMIN)
    listing = build("GET", "/task/list?limit=20", token=ADMIN)
    conn = await Connection.open(port)
    tally.connected += 1
    if tally.connected == CLIENTS:
        tally.all_connected.set()
    await tally.start.wait()
    n = 0
    try:
        while not stop_at():
            kind, request = ("create", create) if n % 2 == 0 else ("list", listing)
            n += 1
            began = time.perf_counter()
            try:
                status, _, body = await asyncio.wait_for(conn.send(request), TIMEOUT)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                tally.errors.append(f"{kind}: {exc!r}")
                await conn.close()
                conn = await Connection.open(port)
                continue
            tally.latency[kind].append((time.perf_counter() - began) * 1000)
            if LOCKED.encode() in body:
                tally.locked += 1
            if status != 200:
                tally.errors.append(f"{kind}: {status} {body[:300]!r}")
            elif kind == "create":
                tally.created.append(json.loads(body)["data"]["id"])
    finally:
        await conn.close()


async def _load(port: int) -> tuple[Tally, float]:
    tally = Tally()
    until = [float("inf")]
    tasks = [asyncio.create_task(_client(port, i, lambda: time.monotonic() >= until[0],
                                         tally)) for i in range(CLIENTS)]
    # the clock starts once every connection is open
    waiting = asyncio.create_task(tally.all_connected.wait())
    await asyncio.wait([waiting, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():
        waiting.cancel()
        until[0] = 0.0
        tally.start.set()
        await asyncio.gather(*tasks)  # raises the connection error, if one failed
        raise AssertionError(f"only {tally.connected} of {CLIENTS} connections opened")
    began = time.monotonic()
    until[0] = began + SECONDS
    tally.start.set()
    await asyncio.gather(*tasks)
    return tally, time.monotonic() - began


async def _stored(database: Path) -> tuple[dict[str, int], list[str]]:
    """Every stored task's number of targets, and the problems found (through the
    store's own verbs: no knowledge of its tables)."""
    store = SQLiteStore(database)
    await store.open()
    targets: dict[str, int] = {}
    problems: list[str] = []
    try:
        cursor = None
        while True:
            page = await store.list_tasks(TaskQuery(limit=1000, cursor=cursor))
            for summary in page.items:
                task = summary.task
                targets[task.id] = len(task.targets)
                if sum(summary.counts.values()) != len(task.targets):
                    problems.append(f"{task.id}: counts {summary.counts}")
                runs = await store.get_runs(task.id)
                if [r.node_id for r in runs] != list(task.targets):
                    problems.append(f"{task.id}: runs {[r.node_id for r in runs]}")
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    finally:
        await store.close()
    return targets, problems


@pytest.mark.slow
def test_200_clients_create_and_list_for_30_seconds(server: ServerProcess,
                                                     figures: Any) -> None:
    tally, elapsed = asyncio.run(_load(server.port))

    creates, lists = tally.latency["create"], tally.latency["list"]
    total = len(creates) + len(lists)
    figures.add("load: clients (concurrent connections)", CLIENTS)
    figures.add("load: duration", round(elapsed, 1), "s")
    figures.add("load: requests", total)
    figures.add("load: requests/s", total / elapsed, "req/s")
    for kind, values in (("create", creates), ("list", lists)):
        for q in (50, 95, 99):
            figures.add(f"load: {kind} p{q}", percentile(values, q), "ms")
    figures.add("load: errors", len(tally.errors))
    figures.add(f"load: '{LOCKED}' in answers", tally.locked)

    assert not tally.errors, f"{len(tally.errors)} errors, first: {tally.errors[:5]}"
    assert tally.locked == 0
    assert len(creates) > CLIENTS and len(lists) > CLIENTS  # every client got through

    assert server.stop(signal.SIGTERM, timeout=60) == 0
    log = server.log()
    figures.add(f"load: '{LOCKED}' in the server log", log.count(LOCKED))
    assert LOCKED not in log
    assert "Traceback" not in log
    assert " ERROR " not in log

    database = server.workdir / "ghostrunner.db"
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    targets, problems = asyncio.run(_stored(database))
    figures.add("load: tasks created (answered 200)", len(tally.created))
    figures.add("load: tasks in the database", len(targets))
    assert not problems, problems[:5]
    assert set(targets) == set(tally.created)
    assert len(targets) == len(tally.created)
    assert all(n == len(NODES) for n in targets.values())

"""Resuming ``GET /events`` across a restart of a real ``ghostrunner serve``: a client
reads events, the server is stopped (SIGTERM, and SIGKILL) and started again on the same
database, more events happen before the client is back, and the client, reconnecting
with ``Last-Event-ID`` as a browser would, receives every event exactly once, in id
order, with no gap: the same list as the store holds."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path

import httpx
import pytest

from ghostrunner.sqlite import SQLiteStore
from tests.serverproc import ServerProcess

ADMIN = "restart-admin-secret-0123456789"
LIMIT = 30.0


class Follower(threading.Thread):
    """An SSE client in a thread: follows ``/events`` from the start, and reconnects
    with ``Last-Event-ID`` (the last id received) whenever the connection breaks,
    once ``allowed`` is set."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.ids: list[int] = []
        self.kinds: list[str] = []
        self.connections = 0
        self.allowed = threading.Event()
        self.allowed.set()
        self.stop = threading.Event()
        self.changed = threading.Condition()

    def run(self) -> None:
        while not self.stop.is_set():
            self.allowed.wait()
            headers = {"Authorization": f"Bearer {ADMIN}"}
            url = self.url + "/events"
            if self.ids:
                headers["Last-Event-ID"] = str(self.ids[-1])
            else:
                url += "?after=0"
            try:
                with httpx.stream("GET", url, headers=headers,
                                  timeout=httpx.Timeout(5.0, read=2.0)) as r:
                    if r.status_code != 200:
                        continue
                    self.connections += 1
                    self._read(r)
            except httpx.HTTPError:
                pass  # the server went (or is not back yet): reconnect
            self.stop.wait(0.05)

    def _read(self, response: httpx.Response) -> None:
        event_id = kind = None
        for line in response.iter_lines():
            if self.stop.is_set():
                return
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("event: "):
                kind = line[7:]
            elif not line and event_id is not None and kind is not None:
                with self.changed:
                    self.ids.append(event_id)
                    self.kinds.append(kind)
                    self.changed.notify_all()
                event_id = kind = None

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.ids) >= count, LIMIT), (
                f"{len(self.ids)} events received, {count} expected")


def create(server: ServerProcess, name: str) -> str:
    r = server.call("POST", "/task/create", ADMIN, json={"details": {
        "name": name, "command": "true", "nodeids": ["node-001", "node-002"]}})
    assert r.status_code == 200, r.text
    task_id: str = r.json()["data"]["id"]
    return task_id


def wait_done(server: ServerProcess, task_id: str) -> None:
    """Until both runs succeeded (the fake devices answer at once)."""
    with httpx.Client(timeout=LIMIT) as client:
        for _ in range(int(LIMIT / 0.05)):
            r = client.get(f"{server.url}/tasks/{task_id}",
                           headers={"Authorization": f"Bearer {ADMIN}"})
            if r.json()["data"]["status"] == "succeeded":
                return
            threading.Event().wait(0.05)
    raise AssertionError(f"task {task_id} did not finish")


def stored_ids(workdir: Path) -> list[int]:
    async def read() -> list[int]:
        store = SQLiteStore(workdir / "ghostrunner.db")
        await store.open()
        try:
            return [e.id for e in await store.events_after(0, 100_000)]
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_client_resumes_across_a_restart_without_loss_or_repeat(
    tmp_path: Path, stop: signal.Signals
) -> None:
    server = ServerProcess(tmp_path, 'executor = "fake"\n',
                           {"GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
                            "GHOSTRUNNER_SERVER_STREAM_HEARTBEAT": "1"})
    server.start()
    follower = Follower(server.url)
    follower.start()
    try:
        before = [create(server, f"before-{i}") for i in range(3)]
        for task_id in before:
            wait_done(server, task_id)
        follower.wait_for(3 * 5)  # each: created, 2 claimed, 2 finished
        seen_before = follower.connections

        follower.allowed.clear()  # the client stays away until told
        if stop == signal.SIGKILL:
            server.kill()
        else:
            assert server.stop(stop) == 0
        received = len(follower.ids)

        server.start()  # the same database, the same port
        during = [create(server, f"while-away-{i}") for i in range(3)]
        for task_id in during:
            wait_done(server, task_id)
        assert len(follower.ids) == received  # nothing reached it while it was away
        follower.allowed.set()  # it reconnects with Last-Event-ID
        follower.wait_for(6 * 5)
        after = create(server, "after")
        wait_done(server, after)
        follower.wait_for(7 * 5)
        assert follower.connections > seen_before
    finally:
        follower.stop.set()
        if server.proc is not None and server.proc.poll() is None:
            assert server.stop() == 0
        follower.join(LIMIT)
    stored = stored_ids(tmp_path)
    assert len(stored) == 7 * 5
    assert follower.ids == stored  # every event once, in id order, nothing skipped
    assert follower.kinds.count("task.created") == 7

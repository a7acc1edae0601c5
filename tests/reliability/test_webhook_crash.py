"""Webhooks survive a crash and a receiver outage: at least once, none lost (#14).

A real ``ghostrunner serve`` (SQLite store, fake executor: four devices online that
answer at once, one offline) sends every event of its event log to a receiver on
loopback that verifies every signature (the spec's verifier and the reference
``standardwebhooks`` library). The events are the store's own, made through the HTTP
API: tasks created on online devices (``task.created``, then ``run.claimed`` and
``run.finished`` per device), tasks on the offline device cancelled (``task.created``,
``runs.cancelled``), and whatever the restarts add (a run a SIGKILL caught in flight is
settled at the next start). The receiver answers slowly, so deliveries are in flight
when the server is killed:

1. tasks are created; once some events have arrived and others are being received,
   SIGKILL;
2. the receiver stops (its port refuses connections); the server restarts and more
   tasks are created: every event is taken into the outbox, none can be delivered
   (connection refused: retried on the schedule); SIGKILL again mid-outage, restart;
3. the receiver comes back on the same port.

Every event id of the store's event log (read from the database once the server has
stopped) arrives at least once with a valid signature, and nothing else does; every
copy of an event carries the same ``webhook-id`` (so duplicates are detectable), and no
two events share one; the outbox ends with one delivery per event, all delivered. The
secret is in neither the server's log nor its database files.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serverproc import ServerProcess
from tests.webhookkit import SECRET, Receiver

ADMIN = "webhook-crash-admin-secret-0123456789"
ONLINE = ("node-001", "node-002", "node-003", "node-004")
OFFLINE = "node-off"
HEARTBEAT = 0.3  # server.stream_heartbeat: a quiet /events stream says so this soon


def wait(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return found


def config(receiver: Receiver) -> str:
    devices = ", ".join([f'"{n}"' for n in ONLINE]
                        + [f'{{ nodeid = "{OFFLINE}", online = false }}'])
    return f"""executor = "fake"

[fake]
devices = [{devices}]

[webhook_delivery]
retry_schedule = [0.2, 0.4, 0.8, 1.0]
max_attempts = 1000
poll_interval = 0.1

[[webhooks]]
name = "crash-test"
url = "{receiver.url}"
secret = "{SECRET}"
timeout = 2
concurrency = 4
"""


def deliveries(server: ServerProcess, **params: Any) -> list[dict[str, Any]]:
    r = server.call("GET", "/webhooks/deliveries", ADMIN, params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["data"]["deliveries"]
    return found


def make_events(server: ServerProcess, round_: int, tasks: int) -> list[str]:
    """``tasks`` tasks on two online devices each, and one on the offline device,
    cancelled; returns the ids of the tasks that run."""
    ids = []
    for i in range(tasks):
        nodes = [ONLINE[i % 4], ONLINE[(i + 1) % 4]]
        r = server.call("POST", "/task/create", ADMIN, json={"details": {
            "name": f"r{round_}-{i}", "command": "true", "nodeids": nodes}})
        assert r.status_code == 200, r.text
        ids.append(r.json()["data"]["id"])
    r = server.call("POST", "/task/create", ADMIN, json={"details": {
        "name": f"r{round_}-offline", "command": "true", "nodeids": [OFFLINE]}})
    assert r.status_code == 200, r.text
    r = server.call("POST", f"/tasks/{r.json()['data']['id']}/cancel", ADMIN)
    assert r.status_code == 200, r.text
    return ids


def settled(server: ServerProcess, task_ids: list[str]) -> bool:
    return all(server.call("GET", f"/tasks/{t}", ADMIN).json()["data"]["status"]
               not in ("pending", "running") for t in task_ids)


def logged_ids(server: ServerProcess, token: str) -> list[int]:
    """The event log's ids so far, as a client sees them: ``GET /events?after=0`` (read
    token) until the stream's first keep-alive (it has caught up)."""
    ids: list[int] = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.stream("GET", f"{server.url}/events?after=0", headers=headers,
                      timeout=10.0) as r:
        assert r.status_code == 200, r.read()
        event_id = None
        for line in r.iter_lines():
            if line == ": keepalive":
                return ids
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("event: ") and event_id is not None:
                ids.append(event_id)
    raise AssertionError("the stream ended")


@pytest.mark.slow
def test_sigkill_and_a_receiver_outage_lose_no_event(tmp_path: Path, figures: Any) -> None:
    receiver = Receiver(delay=0.15).start()
    server = ServerProcess(tmp_path, config(receiver),
                           {"GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
                            "GHOSTRUNNER_SERVER_STREAM_HEARTBEAT": str(HEARTBEAT)})
    try:
        server.start()
        r = server.call("POST", "/token/create", ADMIN,
                        json={"details": {"name": "reader", "scope": "read"}})
        assert r.status_code == 200, r.text
        reader = r.json()["data"]["token"]
        # the webhook's cursor is set at its first pass (the event log is empty: 0)
        wait(lambda: server.call("GET", "/webhooks", ADMIN).json()["data"]["webhooks"][0][
            "cursor"] == 0, what="the first pass")
        running = make_events(server, 1, 8)  # 8 x 5 + 2 events
        # 1. kill it while deliveries are being received
        wait(lambda: len(receiver.got) >= 8 and receiver.in_progress > 0,
             what="deliveries in flight")
        in_flight = receiver.in_progress
        server.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        server.proc.wait(10)  # type: ignore[union-attr]
        got_before_kill = len(set(receiver.event_ids()))

        # 2. the receiver goes away; the server restarts and more events come
        receiver.stop()
        server.start()
        running += make_events(server, 2, 8)
        wait(lambda: settled(server, running), what="every run settled")
        logged = logged_ids(server, reader)
        assert len(logged) >= 2 * (8 * 5 + 2)
        wait(lambda: sorted(d["event_id"] for d in deliveries(server)) == logged,
             what="every event in the outbox")
        failing = wait(lambda: [d for d in deliveries(server, status="pending")
                                if d["attempts"] >= 2 and d["last_error"]],
                       what="failed attempts being retried")
        assert all(d["last_status"] is None for d in failing)  # no answer: refused
        assert deliveries(server, status="failed") == []
        server.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        server.proc.wait(10)  # type: ignore[union-attr]
        server.start()

        # 3. the receiver comes back on the same port
        back = time.monotonic()
        receiver.start()
        wait(lambda: set(receiver.event_ids()) >= set(logged), what="every event")
        drained = time.monotonic() - back
        wait(lambda: all(d["status"] == "delivered" for d in deliveries(server)),
             what="every delivery recorded")
        assert server.stop() == 0
    finally:
        server.kill()
        receiver.stop()

    stored = [e.id for e in server.stored_events()]
    assert stored[:len(logged)] == logged  # what the client read is the store's log
    problems = [r.problem for r in receiver.got if not r.valid]
    assert problems == [], problems  # every request verified
    ids_of: dict[int, set[str]] = defaultdict(set)
    for r in receiver.got:
        assert r.body is not None
        ids_of[r.body["data"]["id"]].add(r.msg_id)
    assert sorted(ids_of) == stored  # every event of the log arrived, nothing else
    assert all(len(ids) == 1 for ids in ids_of.values())  # duplicates carry the same id
    assert len({next(iter(ids)) for ids in ids_of.values()}) == len(stored)  # one per event
    duplicates = len(receiver.got) - len(stored)
    log = server.log()
    assert SECRET[6:] not in log and SECRET[6:].encode() not in server.files_bytes()
    assert "Traceback" not in log
    figures.add("webhooks crash: events (the store's event log)", len(stored))
    figures.add("webhooks crash: in flight at the first SIGKILL", in_flight)
    figures.add("webhooks crash: events received before it", got_before_kill)
    figures.add("webhooks crash: duplicate deliveries (at least once)", duplicates)
    figures.add("webhooks crash: receiver back -> every event delivered", drained, "s")

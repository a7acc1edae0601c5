"""Webhooks survive a crash and a receiver outage: at least once, none lost (#14).

A real ``ghostrunner serve`` process (SQLite store; its event log, until the core's is
merged, is a JSON-lines file this test appends to: ``tests/webhook_serve.py``) sends each
event to a receiver on loopback that verifies every signature (the spec's verifier, and
the reference ``standardwebhooks`` library when installed). The receiver answers slowly,
so deliveries are in flight when the server is killed:

1. events 1-40; once some have arrived and others are being received, SIGKILL;
2. the receiver stops (its port refuses connections); events 41-80 are written while
   no server runs;
3. the server restarts, takes 41-80 into its outbox and fails to deliver (connection
   refused: retried on the schedule); SIGKILL again mid-outage, restart;
4. the receiver comes back on the same port.

Every event 1-80 arrives at least once with a valid signature; every copy of an event
carries the same ``webhook-id`` (so duplicates are detectable), and no two events share
one; the outbox ends with 80 deliveries, all delivered. The secret is in neither the
server's log nor its database files.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.serverproc import ServerProcess
from tests.webhookkit import SECRET, Ev, FileSource, Receiver

ADMIN = "webhook-crash-admin-secret-0123456789"
N1, N2 = 40, 80


def wait(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return found


def config(receiver: Receiver) -> str:
    return f"""executor = "fake"

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


@pytest.mark.slow
def test_sigkill_and_a_receiver_outage_lose_no_event(tmp_path: Path, figures: Any) -> None:
    events = tmp_path / "events.jsonl"
    events.touch()
    receiver = Receiver(delay=0.15).start()
    server = ServerProcess(tmp_path, config(receiver),
                           {"GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
                            "WEBHOOK_TEST_EVENTS": str(events)},
                           module="tests.webhook_serve")
    try:
        server.start()
        # the webhook's cursor is set at its first pass (the event log is empty: 0)
        wait(lambda: server.call("GET", "/webhooks", ADMIN).json()["data"]["webhooks"][0][
            "cursor"] == 0, what="the first pass")
        FileSource.append(events, [Ev(i, "run.finished", task_id=f"t{i}",
                                      data={"exit_code": 0}) for i in range(1, N1 + 1)])
        # 1. kill it while deliveries are being received
        wait(lambda: len(receiver.got) >= 8 and receiver.in_progress > 0,
             what="deliveries in flight")
        in_flight = receiver.in_progress
        server.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        server.proc.wait(10)  # type: ignore[union-attr]
        got_before_kill = len({i for i in receiver.event_ids()})

        # 2. the receiver goes away; events keep coming while no server runs
        receiver.stop()
        FileSource.append(events, [Ev(i, "task.created", task_id=f"t{i}")
                                   for i in range(N1 + 1, N2 + 1)])

        # 3. restart: everything is taken in, nothing can be delivered
        server.start()
        wait(lambda: len(deliveries(server)) == N2, what="all events in the outbox")
        failing = wait(lambda: [d for d in deliveries(server, status="pending")
                                if d["attempts"] >= 2 and d["last_error"]],
                       what="failed attempts being retried")
        assert all(d["last_status"] is None for d in failing)  # no answer: refused
        assert deliveries(server, status="failed") == []
        server.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        server.proc.wait(10)  # type: ignore[union-attr]
        server.start()

        # 4. the receiver comes back on the same port
        back = time.monotonic()
        receiver.start()
        wait(lambda: set(receiver.event_ids()) >= set(range(1, N2 + 1)), what="every event")
        drained = time.monotonic() - back
        wait(lambda: len(deliveries(server, status="delivered")) == N2,
             what="every delivery recorded")
        assert server.stop() == 0
    finally:
        server.kill()
        receiver.stop()

    problems = [r.problem for r in receiver.got if not r.valid]
    assert problems == [], problems  # every request verified
    ids_of: dict[int, set[str]] = defaultdict(set)
    for r in receiver.got:
        assert r.body is not None
        ids_of[r.body["data"]["id"]].add(r.msg_id)
    assert sorted(ids_of) == list(range(1, N2 + 1))  # none lost
    assert all(len(ids) == 1 for ids in ids_of.values())  # duplicates carry the same id
    assert len({next(iter(ids)) for ids in ids_of.values()}) == N2  # one id per event
    duplicates = len(receiver.got) - N2
    log = server.log()
    assert SECRET[6:] not in log and SECRET[6:].encode() not in server.files_bytes()
    assert "Traceback" not in log
    figures.add("webhooks crash: events", N2)
    figures.add("webhooks crash: in flight at the first SIGKILL", in_flight)
    figures.add("webhooks crash: events received before it", got_before_kill)
    figures.add("webhooks crash: duplicate deliveries (at least once)", duplicates)
    figures.add("webhooks crash: receiver back -> every event delivered", drained, "s")

"""Webhooks in a real ``ghostrunner serve`` process: a graceful stop never hangs on a
receiver that does not answer, and hands back what it was sending (sent again at the
next start, under the same message id); the secret stays out of the log and the
database. (The crash scenario, SIGKILL and a receiver outage, is
``tests/reliability/test_webhook_crash.py``.)

Plain ``ghostrunner serve`` (fake executor: its devices are online and answer at once);
the events are those of a task created through the API.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.serverproc import ServerProcess
from tests.webhookkit import SECRET, Receiver

ADMIN = "webhook-serve-admin-secret-0123456789"


def wait(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return found


def test_sigterm_with_a_hung_receiver_stops_promptly_and_hands_back(tmp_path: Path) -> None:
    hung = Receiver(hang=True).start()
    server = ServerProcess(tmp_path, f"""executor = "fake"
[webhook_delivery]
poll_interval = 0.1
[[webhooks]]
url = "{hung.url}"
secret = "{SECRET}"
timeout = 60
""", {"GHOSTRUNNER_ADMIN_TOKEN": ADMIN})
    fine = Receiver()
    try:
        server.start()
        wait(lambda: server.call("GET", "/webhooks", ADMIN).json()["data"]["webhooks"][0][
            "cursor"] == 0)
        r = server.call("POST", "/task/create", ADMIN, json={"details": {
            "name": "one", "command": "true", "nodeids": ["node-001"]}})
        assert r.status_code == 200, r.text
        # task.created, run.claimed, run.finished: all three being sent, none answered
        assert wait(lambda: len(hung.got) == 3)
        assert sorted(got.body["type"] for got in hung.got if got.body) == [
            "run.claimed", "run.finished", "task.created"]
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 10  # not the receiver's 60 s timeout

        fine.port = hung.port
        hung.stop()
        fine.start()
        restarted = time.monotonic()
        server.start()
        # handed back, due at once: sent again now, not when their lease (65 s) ends
        wait(lambda: len(fine.got) >= 3)
        assert time.monotonic() - restarted < 30
        wait(lambda: all(d["status"] == "delivered" for d in server.call(
            "GET", "/webhooks/deliveries", ADMIN).json()["data"]["deliveries"]))
        assert server.stop() == 0
    finally:
        server.kill()
        hung.stop()
        fine.stop()
    assert all(r.valid for r in hung.got + fine.got)
    assert {r.msg_id for r in fine.got} == {r.msg_id for r in hung.got}  # same ids
    stored = [e.id for e in server.stored_events()]
    assert len(stored) == 3
    assert sorted({r.body["data"]["id"] for r in fine.got if r.body}) == stored
    assert "webhook '127.0.0.1:" in server.log()  # the start-up line names it
    assert SECRET[6:] not in server.log()
    assert SECRET[6:].encode() not in server.files_bytes()
    assert "Traceback" not in server.log()

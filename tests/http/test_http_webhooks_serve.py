"""Webhooks in a real ``ghostrunner serve`` process: a graceful stop never hangs on a
receiver that does not answer, and hands back what it was sending (sent again at the
next start, under the same message id); the secret stays out of the log and the
database. (The crash scenario, SIGKILL and a receiver outage, is
``tests/reliability/test_webhook_crash.py``.)

The store's event log is a file the test writes (``tests/webhook_serve.py``) until the
core's event log is merged.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.serverproc import ServerProcess
from tests.webhookkit import SECRET, Ev, FileSource, Receiver

ADMIN = "webhook-serve-admin-secret-0123456789"


def wait(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return found


def test_sigterm_with_a_hung_receiver_stops_promptly_and_hands_back(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.touch()
    hung = Receiver(hang=True).start()
    server = ServerProcess(tmp_path, f"""executor = "fake"
[webhook_delivery]
poll_interval = 0.1
[[webhooks]]
url = "{hung.url}"
secret = "{SECRET}"
timeout = 60
""", {"GHOSTRUNNER_ADMIN_TOKEN": ADMIN, "WEBHOOK_TEST_EVENTS": str(events)},
        module="tests.webhook_serve")
    fine = Receiver()
    try:
        server.start()
        wait(lambda: server.call("GET", "/webhooks", ADMIN).json()["data"]["webhooks"][0][
            "cursor"] == 0)
        FileSource.append(events, [Ev(1), Ev(2), Ev(3)])
        assert wait(lambda: len(hung.got) == 3)
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
    assert "webhook '127.0.0.1:" in server.log()  # the start-up line names it
    assert SECRET[6:] not in server.log()
    assert SECRET[6:].encode() not in server.files_bytes()
    assert "Traceback" not in server.log()

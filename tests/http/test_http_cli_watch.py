"""``ghostrunner tasks watch`` against a real ``ghostrunner serve``, run as an operator
would run it (a subprocess): one line per event, control characters shown, ``--json``,
Ctrl-C exits 0, a task id makes it exit when the task is done (0 all succeeded, 1
otherwise, 3 unknown task), and a server restart is resumed without a missed or
repeated event."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.serverproc import REPO, ServerProcess

ADMIN = "watch-admin-secret-0123456789"
CONFIG = """executor = "fake"
[fake]
devices = ["node-001", {nodeid = "node-009", name = "Sleeper", online = false}]
"""
LIMIT = 30.0


class Watch:
    """``ghostrunner tasks watch ...`` in a subprocess; its stdout lines in a queue."""

    def __init__(self, server: ServerProcess, *args: str) -> None:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("GHOSTRUNNER_")},
               "GHOSTRUNNER_URL": server.url, "GHOSTRUNNER_TOKEN": ADMIN,
               "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ghostrunner_http.cli", "tasks", "watch", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            encoding="utf-8")
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.err: str | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def line(self) -> str:
        try:
            return self.lines.get(timeout=LIMIT)
        except queue.Empty:
            self.proc.kill()
            self.wait()
            raise AssertionError(f"no line from watch; stderr:\n{self.err}") from None

    def wait(self) -> int:
        """Its exit status (its stderr is then in :attr:`err`, its pipes closed)."""
        try:
            code = self.proc.wait(LIMIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(LIMIT)
        self.reader.join(LIMIT)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        if self.err is None:
            self.err = self.proc.stderr.read()
            self.proc.stderr.close()
        return code

    def rest(self) -> list[str]:
        """The lines printed and not read, once it exited."""
        out = []
        while not self.lines.empty():
            out.append(self.lines.get_nowait())
        return out


def start(tmp_path: Path) -> ServerProcess:
    return ServerProcess(tmp_path, CONFIG, {"GHOSTRUNNER_ADMIN_TOKEN": ADMIN}).start()


def call(server: ServerProcess, method: str, path: str, **body: Any) -> Any:
    r = server.call(method, path, ADMIN, json=body or None)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def create(server: ServerProcess, node: str, **details: Any) -> str:
    task_id: str = call(server, "POST", "/task/create", details={
        "name": "w", "command": "true", "nodeids": [node], **details})["id"]
    return task_id


def kind(line: str) -> str:
    return line.split()[2]  # "YYYY-MM-DD HH:MM:SS  kind  task ..."


def test_watch_a_task_until_it_succeeds(tmp_path: Path) -> None:
    server = start(tmp_path)
    try:
        # not before 5 s: time for watch to start and see it pending
        soon = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
        task_id = create(server, "node-001", not_before=soon)
        watch = Watch(server, task_id, "--after", "0")  # its story from the start
        assert kind(watch.line()) == "task.created"
        claimed = watch.line()
        assert kind(claimed) == "run.claimed" and task_id in claimed and "node-001" in claimed
        finished = watch.line()
        assert kind(finished) == "run.finished"
        assert "succeeded" in finished and "exit 0" in finished and "attempt 1" in finished
        assert watch.wait() == 0
        assert "no active run left: succeeded" in (watch.err or "")
        assert watch.rest() == []
        # a task already done: exits at once, 0; an unknown one: 3
        done = Watch(server, task_id)
        assert done.wait() == 0
        unknown = Watch(server, "no-such-task")
        assert unknown.wait() == 3
        assert "404" in (unknown.err or "")
    finally:
        server.stop()


def test_watch_everything_json_and_ctrl_c(tmp_path: Path) -> None:
    server = start(tmp_path)
    try:
        hostile = create(server, "node-009", name="evil\x1b[2Jname\x9b")
        plain = Watch(server, "--after", "0")
        line = plain.line()
        assert kind(line) == "task.created" and hostile in line
        assert "\\x1b[2J" in line and "\\x9b" in line and "\x1b" not in line
        raw = Watch(server, "--json", "--after", "0")
        event = json.loads(raw.line())
        assert (event["kind"], event["task_id"]) == ("task.created", hostile)
        assert event["data"]["name"] == "evil\x1b[2Jname\x9b"  # JSON keeps it, escaped
        call(server, "POST", f"/tasks/{hostile}/pause")
        assert json.loads(raw.line())["kind"] == "task.paused"
        assert kind(plain.line()) == "task.paused"
        for watch in (plain, raw):
            watch.proc.send_signal(signal.SIGINT)
            assert watch.wait() == 0
    finally:
        server.stop()


def test_watch_resumes_across_a_server_restart_and_exits_1_when_cancelled(
    tmp_path: Path,
) -> None:
    server = start(tmp_path)
    try:
        task_id = create(server, "node-009")  # offline: it stays pending
        watch = Watch(server, task_id, "--after", "0")
        assert kind(watch.line()) == "task.created"  # connected
        call(server, "POST", f"/tasks/{task_id}/pause")
        assert kind(watch.line()) == "task.paused"  # and following
        assert server.stop() == 0
        server.start()
        call(server, "POST", f"/tasks/{task_id}/resume")  # may come before it is back
        call(server, "POST", f"/tasks/{task_id}/cancel")
        assert kind(watch.line()) == "task.resumed"
        cancelled = watch.line()
        assert kind(cancelled) == "runs.cancelled" and "node-009" in cancelled
        assert watch.wait() == 1  # the task ended without succeeding
        err = watch.err or ""
        assert "reconnecting" in err and "no active run left: cancelled" in err
        assert watch.rest() == []  # nothing twice
    finally:
        server.stop()

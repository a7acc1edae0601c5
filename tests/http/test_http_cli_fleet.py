"""The fleet commands (issue #11) against a real server: ``tasks add`` with selectors and
rollout flags, ``tasks pause/resume/retry/abort``, ``tasks show --attempts``.

The server's fake devices have groups, tags and OSes (the ``[fake] devices`` tables of
docs/http-api.md); the offline ones never come online, so their runs stay pending."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from ghostrunner_http.cli import main
from tests.http.conftest import ServerProcess, as_operator, served
from tests.http.test_http_cli import run

ADMIN_SECRET = "cli-fleet-admin-secret-0123456789"
CONFIG = """executor = "fake"
[[fake.devices]]
nodeid = "node//pi-1"
name = "rpi-kitchen"
group = "pis"
tags = ["arm", "sensors"]
os = "Raspbian GNU/Linux 12"

[[fake.devices]]
nodeid = "node//pi-2"
name = "rpi-garage"
online = false
group = "pis"
tags = ["arm"]
os = "Raspbian GNU/Linux 12"

[[fake.devices]]
nodeid = "node//win-1"
name = "desk"
online = false
group = "office"
tags = ["x86"]
os = "Windows 11 Pro"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("cli-fleet"), CONFIG, ADMIN_SECRET) as proc:
        yield proc


@pytest.fixture
def env(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> ServerProcess:
    return as_operator(monkeypatch, server, ADMIN_SECRET)


def shown(server: ServerProcess, task_id: str) -> dict[str, Any]:
    r = server.call("GET", f"/tasks/{task_id}", ADMIN_SECRET)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def add(*args: str) -> str:
    code, out = run("tasks", "add", *args)
    assert code == 0, out
    return out.strip()


def test_add_by_group_and_tag_with_a_rollout(env: ServerProcess) -> None:
    task_id = add("apt-get -y upgrade", "--group", "pis", "--tag", "ARM", "--continuous",
                  "--max-concurrent", "10", "--per-minute", "30", "--abort-failed-pct", "20",
                  "--abort-min-finished", "5")
    task = shown(env, task_id)
    assert task["select"] == {"group": "pis", "tags": ["ARM"], "tags_mode": "all",
                              "os": None, "name": None, "all": False}
    assert task["continuous"] is True
    assert task["rollout"] == {"max_concurrent": 10, "per_minute": 30,
                               "abort_failed_pct": 20, "abort_min_finished": 5}
    # the offline Pi has its run too
    assert sorted(r["nodeid"] for r in task["runs"]) == ["node//pi-1", "node//pi-2"]

    code, out = run("tasks", "show", task_id)
    assert code == 0
    assert "paused:       no" in out
    assert "select:       group=pis AND tags(all)=ARM (continuous)" in out
    assert "at most 10 at once; at most 30 starts a minute; abort past 20% failed" in out
    assert "node//pi-2" in out


def test_add_with_other_selectors_and_exit_codes(env: ServerProcess) -> None:
    code, out = run("tasks", "add", "winget upgrade --all", "--os", "windows",
                    "--device-name", "DESK*", "--success-exit-code", "0",
                    "--success-exit-code", "3010", "--json")
    assert code == 0, out
    task = json.loads(out)
    assert task["select"]["os"] == "windows"
    assert task["select"]["name"] == "DESK*"
    assert task["success_exit_codes"] == [0, 3010]
    assert sum(task["counts"].values()) == 1

    task_id = add("uptime", "--tag", "sensors", "--tag", "x86", "--tags-mode", "any")
    assert sorted(r["nodeid"] for r in shown(env, task_id)["runs"]) == [
        "node//pi-1", "node//win-1"]
    task_id = add("uptime", "--all", "-n", "node//win-1")
    runs = shown(env, task_id)["runs"]
    assert [r["nodeid"] for r in runs] == ["node//win-1", "node//pi-2", "node//pi-1"]

    code, out = run("tasks", "show", task_id)
    assert "select:       all devices" in out


def test_add_usage_errors(env: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["uptime"], ["uptime", "-n", "node//pi-1", "--continuous"],
                 ["uptime", "--group", "pis", "--tags-mode", "any"],
                 ["uptime", "--all", "--max-concurrent", "many"]):
        with pytest.raises(SystemExit) as info:
            main(["tasks", "add", *args])
        assert info.value.code == 2, args
    capsys.readouterr()
    # the server's refusals name the field
    code, _ = run("tasks", "add", "uptime", "--group", "nobody-has-this")
    assert code == 3
    err = capsys.readouterr().err
    assert "422" in err and "details.select" in err and "matches no device" in err
    code, _ = run("tasks", "add", "uptime", "--all", "--per-minute", "0")
    assert code == 3
    assert "details.rollout.per_minute" in capsys.readouterr().err


def test_pause_and_resume(env: ServerProcess) -> None:
    task_id = add("uptime", "-n", "node//pi-2")
    code, out = run("tasks", "pause", task_id)
    assert code == 0
    assert out.strip() == f"task {task_id} is paused (0/1 done, paused)"
    code, out = run("tasks", "show", task_id)
    assert "paused:       yes" in out
    code, out = run("tasks", "resume", task_id, "--json")
    assert code == 0
    assert json.loads(out)["paused"] is False
    assert shown(env, task_id)["status"] == "pending"


def test_abort_then_retry_the_cancelled_runs(env: ServerProcess) -> None:
    task_id = add("uptime", "--group", "office")
    code, out = run("tasks", "abort", task_id, "--reason", "wrong build")
    assert code == 0
    assert "cancelled 1 pending run(s): node//win-1" in out
    code, out = run("tasks", "show", task_id)
    assert "aborted:      wrong build" in out
    assert "status:       aborted" in out

    code, out = run("tasks", "retry", task_id)  # failed and timed_out: none
    assert (code, out.strip()) == (0, "retried 0 run(s)")
    code, out = run("tasks", "retry", task_id, "--state", "cancelled", "--state", "failed")
    assert (code, out.strip()) == (0, "retried 1 run(s): node//win-1")
    task = shown(env, task_id)
    assert (task["aborted"], task["status"]) == (None, "pending")

    with pytest.raises(SystemExit) as info:
        main(["tasks", "retry", task_id, "--state", "succeeded"])
    assert info.value.code == 2

    code, out = run("tasks", "abort", task_id, "--json")
    assert json.loads(out) == {"id": task_id, "cancelled": ["node//win-1"]}
    assert shown(env, task_id)["aborted"] == "aborted by an operator"


def test_show_attempts(env: ServerProcess) -> None:
    code, _ = run("tasks", "add", "echo fleet", "-n", "node//pi-1", "--wait",
                  "--wait-timeout", "20")
    assert code == 0
    task_id = json.loads(run("tasks", "list", "--json", "--limit", "1")[1])["tasks"][0]["id"]
    code, out = run("tasks", "show", task_id, "--attempts")
    assert code == 0
    assert "--- attempts of node//pi-1 ---" in out
    lines = out.splitlines()
    header = lines.index("--- attempts of node//pi-1 ---")
    assert lines[header + 1].split()[:3] == ["#", "STATE", "EXIT"]
    assert lines[header + 2].split()[:3] == ["1", "succeeded", "0"]
    assert "-- output of attempt 1 --" in out
    code, out = run("tasks", "show", task_id, "--attempts", "--no-output")
    assert "-- output of attempt 1 --" not in out
    # a run not sent yet has no attempt
    pending = add("uptime", "-n", "node//pi-2")
    code, out = run("tasks", "show", pending, "--attempts")
    assert "(not sent yet)" in out


def test_errors(env: ServerProcess, monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("pause", "resume", "retry", "abort"):
        code, _ = run("tasks", action, "0" * 32)
        assert code == 3
        assert "404" in capsys.readouterr().err
    code, out = run("tokens", "create", "fleet-reader", "--scope", "read")
    assert code == 0
    task_id = add("uptime", "-n", "node//pi-2")
    monkeypatch.setenv("GHOSTRUNNER_TOKEN", out.strip())
    capsys.readouterr()
    for action in ("pause", "resume", "retry", "abort"):
        code, _ = run("tasks", action, task_id)
        assert code == 3
        assert "403" in capsys.readouterr().err
    code, out = run("tasks", "show", task_id, "--attempts")
    assert code == 0

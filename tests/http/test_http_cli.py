"""The operator subcommands (tasks, tokens, devices) against a real server."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ghostrunner_http.cli import main
from tests.http.conftest import ServerProcess, as_operator, served

ADMIN_SECRET = "cli-admin-secret-0123456789"
CONFIG = """executor = "fake"
[fake]
devices = ["node-001", "node-002", {nodeid = "node-009", name = "Sleeper", online = false}]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("cli"), CONFIG, ADMIN_SECRET) as proc:
        yield proc


@pytest.fixture
def env(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> ServerProcess:
    return as_operator(monkeypatch, server, ADMIN_SECRET)


def run(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(args), out=out)
    return code, out.getvalue()


def test_tasks_add_wait_show(env: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run("tasks", "add", "echo hello", "-n", "node-001", "-n", "node-002",
                    "--name", "greet", "--wait", "--output", "--wait-timeout", "20")
    assert code == 0, capsys.readouterr().err
    assert "node-001" in out
    assert "succeeded" in out
    assert "echo hello" in out
    err = capsys.readouterr().err
    assert "queued task" in err
    assert "2/2 done" in err

    code, out = run("tasks", "list", "--name", "greet")
    assert code == 0
    assert "greet" in out
    assert "succeeded" in out
    assert "2/2" in out
    task_id = out.splitlines()[1].split()[0]

    code, out = run("tasks", "show", task_id)
    assert code == 0
    assert "status:" in out
    assert "succeeded" in out
    assert "--- output of node-001 ---" in out

    code, out = run("tasks", "show", task_id, "--json")
    assert json.loads(out)["id"] == task_id


def test_tasks_show_follows_every_page_of_runs(env: ServerProcess) -> None:
    """The API answers runs 100 (or 1,000) at a time; ``tasks show`` shows them all."""
    nodes = [f"node//many-{i:04d}" for i in range(1205)]
    body = {"details": {"name": "many", "command": "c", "nodeids": nodes}}
    r = env.call("POST", "/task/create", ADMIN_SECRET, json=body)
    assert r.status_code == 200, r.text
    task_id = r.json()["data"]["id"]
    code, out = run("tasks", "show", task_id)
    assert code == 0
    shown = [line.split()[0] for line in out.splitlines() if line.startswith("node//many-")]
    assert shown == nodes
    code, out = run("tasks", "show", task_id, "--json")
    task = json.loads(out)
    assert [r["nodeid"] for r in task["runs"]] == nodes
    assert task["runs_next_cursor"] is None


def test_tasks_add_prints_the_id(env: ServerProcess) -> None:
    code, out = run("tasks", "add", "uptime", "-n", "node-009")
    assert code == 0
    task_id = out.strip()
    assert len(task_id) == 32
    r = env.call("GET", f"/tasks/{task_id}", ADMIN_SECRET)
    assert r.json()["data"]["status"] == "pending"


def test_wait_times_out_with_124(env: ServerProcess,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run("tasks", "add", "uptime", "-n", "node-009")
    task_id = out.strip()
    code, _ = run("tasks", "wait", task_id, "--wait-timeout", "0.3", "--interval", "0.1")
    assert code == 124
    assert "timed out" in capsys.readouterr().err


def test_wait_exit_status_1_when_a_run_did_not_succeed(env: ServerProcess) -> None:
    code, out = run("tasks", "add", "uptime", "-n", "node-001", "-n", "node-009")
    task_id = out.strip()
    code, out = run("tasks", "cancel", task_id, "-n", "node-009")
    assert code == 0
    assert "node-009" in out
    code, out = run("tasks", "wait", task_id, "--interval", "0.1", "--wait-timeout", "20")
    assert code == 1
    assert "cancelled" in out
    assert "succeeded" in out


def test_cancel_and_delete(env: ServerProcess) -> None:
    _, out = run("tasks", "add", "uptime", "-n", "node-009")
    task_id = out.strip()
    code, out = run("tasks", "cancel", task_id)
    assert code == 0
    assert "cancelled 1 pending run" in out
    code, out = run("tasks", "delete", task_id)
    assert code == 0
    assert f"deleted task {task_id}" in out
    code, _ = run("tasks", "show", task_id)
    assert code == 3


def test_list_filters_and_json(env: ServerProcess) -> None:
    run("tasks", "add", "uptime", "-n", "node-009", "--name", "filtered")
    code, out = run("tasks", "list", "--state", "pending", "--node", "node-009", "--json",
                    "--all")
    assert code == 0
    tasks = json.loads(out)["tasks"]
    assert tasks
    assert all("node-009" in t["nodeids"] for t in tasks)


def test_flush_needs_yes(env: ServerProcess) -> None:
    code, _ = run("tasks", "flush")
    assert code == 2


def test_tokens(env: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run("tokens", "create", "cli-reader", "--scope", "read")
    assert code == 0
    secret = out.strip()
    assert secret.startswith("gr_")
    assert "shown only this once" in capsys.readouterr().err
    code, out = run("tokens", "list")
    assert "cli-reader" in out
    assert "read" in out
    assert "builtin" in out
    assert secret not in out
    code, _ = run("tokens", "create", "cli-reader")
    assert code == 3
    assert "exists" in capsys.readouterr().err
    code, out = run("tokens", "delete", "cli-reader")
    assert code == 0
    assert env.call("GET", "/task/list", secret).status_code == 401
    code, _ = run("tokens", "delete", "admin")
    assert code == 3


def test_read_token_cannot_add(env: ServerProcess, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    _, out = run("tokens", "create", "cli-ro", "--scope", "read")
    monkeypatch.setenv("GHOSTRUNNER_TOKEN", out.strip())
    code, _ = run("tasks", "add", "uptime", "-n", "node-001")
    assert code == 3
    assert "403" in capsys.readouterr().err
    code, _ = run("tasks", "list")
    assert code == 0


def test_devices(env: ServerProcess) -> None:
    code, out = run("devices")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "NODEID", "STATE", "OS"]
    assert any("Sleeper" in line and "offline" in line for line in lines)
    code, out = run("devices", "--online")
    assert "Sleeper" not in out
    assert "node-001" in out
    code, out = run("devices", "--json")
    assert json.loads(out)["total_devices"] == 3


def test_token_file(env: ServerProcess, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GHOSTRUNNER_TOKEN")
    path = tmp_path / "token"
    path.write_text(ADMIN_SECRET + "\n", encoding="utf-8")
    code, _ = run("devices", "--token-file", str(path))
    assert code == 0
    code, _ = run("devices", "--token-file", str(tmp_path / "missing"))
    assert code == 2


def test_errors(env: ServerProcess, monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run("tasks", "show", "nope")
    assert code == 3
    assert "404" in capsys.readouterr().err
    monkeypatch.setenv("GHOSTRUNNER_TOKEN", "wrong")
    code, _ = run("devices")
    assert code == 3
    assert "401" in capsys.readouterr().err
    monkeypatch.delenv("GHOSTRUNNER_TOKEN")
    code, _ = run("devices")
    assert code == 2
    assert "GHOSTRUNNER_TOKEN" in capsys.readouterr().err
    code, _ = run("devices", "--url", "http://127.0.0.1:1", "--token", "x")
    assert code == 3
    assert "cannot reach" in capsys.readouterr().err


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["tasks", "add", "uptime"])  # no --node
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["nonsense"])
    assert info.value.code == 2

"""``ghostrunner lab up|status|down``, each run as its own process like a user would: the
lab started by ``up`` outlives that process, ``status`` sees it, ``down`` stops every
process of it by the PIDs recorded in its directory."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ghostrunner.lab import MeshLab

ROOT = Path(__file__).resolve().parents[2]


def lab_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "ghostrunner_http.cli", "lab", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (agents' commands, MeshCentral's child)."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if fields[0] != b"Z" and int(fields[2]) == pgid:
                members.append(int(name))
    return members


@pytest.fixture
def lab_dir(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "lab"
    yield root
    # Whatever the test left running (it failed half-way): stop it by the recorded PIDs.
    if (root / "lab.json").exists():
        lab = MeshLab(root)
        lab.attach()
        lab.close()


def test_up_status_down(lab_dir: Path) -> None:
    up = lab_cmd("up", "--dir", str(lab_dir), "--agents", "1")
    assert up.returncode == 0, up.stderr
    state = json.loads((lab_dir / "lab.json").read_text())
    server_pid = int((lab_dir / "server.pid").read_text())
    agent_pid = int((lab_dir / "agents" / "agent-1" / "agent.pid").read_text())
    node_id = (lab_dir / "agents" / "agent-1" / "nodeid").read_text().strip()
    # the processes outlive the command that started them
    assert alive(server_pid)
    assert alive(agent_pid)
    # what a user needs, and a serve command that sets exactly that
    out = up.stdout
    for value in (f"wss://127.0.0.1:{state['port']}", state["admin_password"],
                  state["group_id"], node_id):
        assert value in out
    serve = out[out.index("GHOSTRUNNER_MESHCENTRAL_URL=") :].split("ghostrunner serve")[0]
    assert dict(word.split("=", 1) for word in shlex.split(serve.replace("\\\n", " "))) == {
        "GHOSTRUNNER_MESHCENTRAL_URL": f"wss://127.0.0.1:{state['port']}",
        "GHOSTRUNNER_MESHCENTRAL_USER": state["admin_user"],
        "GHOSTRUNNER_MESHCENTRAL_PASSWORD": state["admin_password"],
        "GHOSTRUNNER_MESHCENTRAL_IGNORE_SSL": "true",
        "GHOSTRUNNER_MESHCENTRAL_GROUP_ID": state["group_id"],
    }

    status = lab_cmd("status", "--dir", str(lab_dir))
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"lab {lab_dir}: up" in status.stdout
    assert f"pid {server_pid}" in status.stdout
    [row] = [line.split() for line in status.stdout.splitlines() if "agent-1" in line]
    assert row == ["agent-1", str(agent_pid), "connected", node_id]

    again = lab_cmd("up", "--dir", str(lab_dir), "--agents", "1")  # reuses the running lab
    assert again.returncode == 0, again.stderr
    assert "already running, reused" in again.stdout
    assert int((lab_dir / "server.pid").read_text()) == server_pid
    assert int((lab_dir / "agents" / "agent-1" / "agent.pid").read_text()) == agent_pid

    down = lab_cmd("down", "--dir", str(lab_dir))
    assert down.returncode == 0, down.stderr
    assert down.stdout.splitlines() == [
        f"stopped agent agent-1 (pid {agent_pid})",
        f"stopped MeshCentral (pid {server_pid})",
    ]
    # down returns once the whole process groups are gone
    assert not alive(server_pid)
    assert not alive(agent_pid)
    assert group_members(server_pid) == []
    assert group_members(agent_pid) == []

    after = lab_cmd("status", "--dir", str(lab_dir))
    assert after.returncode == 3, after.stdout + after.stderr
    assert f"lab {lab_dir}: down" in after.stdout
    [row] = [line.split() for line in after.stdout.splitlines() if "agent-1" in line]
    assert row == ["agent-1", "-", "stopped", node_id]

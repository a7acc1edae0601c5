"""Smoke tests of the MeshCentral lab itself: if these fail, no integration test means much."""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ghostrunner.lab import Agent, MeshLab, node_id_from_hex

AgentFactory = Callable[..., Agent]  # the agent_factory fixture, see conftest.py


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) with a LISTEN socket on ``port``."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                address, hex_port = fields[1].rsplit(":", 1)
                if int(hex_port, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                    found.add(address)
    return found


def _by_name(lab: MeshLab) -> dict[str, list[dict[str, object]]]:
    devices: dict[str, list[dict[str, object]]] = {}
    for device in lab.list_devices():
        devices.setdefault(str(device["name"]), []).append(device)
    return devices


def _group_alive(pgid: int) -> bool:
    """True if a live (non-zombie) process is in process group ``pgid``."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            return True
    return False


def _processes_under(root: Path) -> list[int]:
    """PIDs whose command line or working directory is inside ``root``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        if str(root) in cmdline or cwd.startswith(str(root)):
            pids.append(int(name))
    return pids


def test_server_answers_on_loopback_only(mesh_lab: MeshLab) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(mesh_lab.https_url + "/", context=context, timeout=10) as resp:
        assert resp.status == 200
    assert mesh_lab.url == f"wss://127.0.0.1:{mesh_lab.port}"
    assert _listening_addresses(mesh_lab.port) == {"0100007F"}  # 127.0.0.1 only

    groups = json.loads(mesh_lab.meshctrl("listdevicegroups", "--json"))
    assert [g["_id"] for g in groups] == [mesh_lab.group_id]
    assert mesh_lab.group_id.startswith("mesh//")


def test_node_id_from_hex() -> None:
    hex_id = (
        "213ABFC7F6CE8606085C02163E66EFAE205C1F6A398F0658"
        "CBA23EDAEAE8085CBD2B59BC33CF8AB112797C289F228087"
    )
    assert node_id_from_hex(hex_id) == (
        "node//ITq$x$bOhgYIXAIWPmbvriBcH2o5jwZYy6I@2uroCFy9K1m8M8@KsRJ5fCifIoCH"
    )


def test_two_agents_connect_with_their_node_ids(
    mesh_lab: MeshLab, agent_factory: AgentFactory
) -> None:
    alpha, beta = agent_factory("alpha"), agent_factory("beta")
    assert alpha.node_id != beta.node_id
    assert not alpha.running
    assert not beta.running

    alpha.start()
    beta.start()
    mesh_lab.wait_connected([alpha, beta], timeout=30)

    devices = _by_name(mesh_lab)
    for agent in (alpha, beta):
        [device] = devices[agent.name]  # exactly one device per agent: no duplicates
        assert device["_id"] == agent.node_id
        assert int(str(device["conn"])) & 1
        assert device["meshid"] == mesh_lab.group_id


def test_stopped_agent_shows_disconnected(mesh_lab: MeshLab, agent_factory: AgentFactory) -> None:
    alpha, beta = agent_factory("alpha", start=True), agent_factory("beta", start=True)
    assert beta.pid is not None
    beta_pid = beta.pid

    beta.stop()

    assert not beta.running
    assert not Path(f"/proc/{beta_pid}").exists()  # stop() waited for it and reaped it
    mesh_lab.wait_connected([beta], connected=False, timeout=10)
    assert mesh_lab.connected_node_ids() == {alpha.node_id}

    beta.start()  # and back online, same device
    mesh_lab.wait_connected([alpha, beta], timeout=30)


def test_killed_agent_shows_disconnected(mesh_lab: MeshLab, agent_factory: AgentFactory) -> None:
    alpha = agent_factory("alpha", start=True)
    alpha.stop(kill=True)
    mesh_lab.wait_connected([alpha], connected=False, timeout=10)


def test_restart_keeps_group_and_agent_identities(
    mesh_lab: MeshLab, agent_factory: AgentFactory
) -> None:
    alpha, beta = agent_factory("alpha", start=True), agent_factory("beta", start=True)
    port, group_id = mesh_lab.port, mesh_lab.group_id
    ids = {alpha.name: alpha.node_id, beta.name: beta.node_id}

    mesh_lab.restart()

    assert mesh_lab.running
    assert (mesh_lab.port, mesh_lab.group_id) == (port, group_id)
    groups = json.loads(mesh_lab.meshctrl("listdevicegroups", "--json"))
    assert [g["_id"] for g in groups] == [group_id]
    # The agents were not touched: they reconnect by themselves.
    mesh_lab.wait_connected([alpha, beta], timeout=60)
    devices = _by_name(mesh_lab)
    assert {name: [d["_id"] for d in devices[name]] for name in ids} == {
        name: [node_id] for name, node_id in ids.items()
    }


def test_agent_reused_by_name(agent_factory: AgentFactory) -> None:
    first: Agent = agent_factory("alpha")
    assert agent_factory("alpha") is first


def test_close_leaves_no_process(tmp_path: Path) -> None:
    lab = MeshLab(tmp_path / "lab")
    with lab:
        agent = lab.add_agent("solo")
        agent.start()
        lab.wait_connected([agent])
        groups = [lab.pid, agent.pid]
        assert None not in groups
        assert all(_group_alive(pgid) for pgid in groups if pgid is not None)
    assert not lab.running
    assert not agent.running
    assert not any(_group_alive(pgid) for pgid in groups if pgid is not None)
    assert _processes_under(lab.root) == []
    # the kernel may hold the listening socket a moment after its process is gone
    deadline = time.monotonic() + 5
    while _listening_addresses(lab.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _listening_addresses(lab.port) == set()

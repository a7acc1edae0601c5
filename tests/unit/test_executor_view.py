"""The MeshCentral executor's device view, fed MeshCentral's messages by a stand-in
session (the real server's behaviour is covered in tests/integration)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ghostrunner.meshcentral import _executor
from ghostrunner.meshcentral._executor import MeshCentralExecutor

GROUP = "mesh//group"


class Session:
    """Answers the snapshot's two commands from ``nodes``; counts them."""

    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.asked: list[str] = []

    async def _send_command(self, data: dict[str, Any], name: str, **kw: Any) -> Any:
        self.asked.append(data["action"])
        if data["action"] == "meshes":
            return {"meshes": [{"_id": GROUP, "name": "lab"}]}
        return {"nodes": {GROUP: list(self.nodes)}}


def connect(node_id: str) -> dict[str, Any]:
    return {"action": "event", "event": {"action": "nodeconnect", "nodeid": node_id,
                                         "meshid": GROUP, "conn": 1}}


def test_a_device_no_addnode_announced_gets_its_details_from_a_new_snapshot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """It enrolled while the session logged in: its addnode came before the listener
    and its row after the snapshot's read. Its first event brings a snapshot (one for a
    burst of such devices), and its name, OS and tags with it."""
    monkeypatch.setattr(_executor, "RESNAPSHOT_DELAY", 0.0)
    monkeypatch.setattr(_executor, "RESNAPSHOT_EVERY", 0.0)
    asyncio.run(_unknown_devices())


async def _unknown_devices() -> None:
    executor = MeshCentralExecutor("wss://x", user="u", password="p", group_id=GROUP)
    session = Session()
    executor._session = session
    await executor._snapshot(session)  # the login's: nothing enrolled yet
    assert executor.devices() == {}
    session.nodes = [
        {"_id": f"node//new-{i}", "name": f"pi-{i}", "osdesc": "Raspbian", "tags": ["arm"],
         "conn": 1, "agent": {"id": 6}} for i in range(3)]
    kinds: list[str] = []

    async def consume() -> None:
        async for event in executor.events():
            kinds.append(event.kind.value)
            if event.kind.value == "resync":
                return

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)  # (a yield: the consumer subscribes)
    for i in range(3):
        executor._handle(connect(f"node//new-{i}"))
    assert executor.devices()["node//new-0"].name == "node//new-0"  # not known yet
    assert executor._resnapshot is not None
    await executor._resnapshot
    assert session.asked == ["meshes", "nodes"] * 2  # one more snapshot for the three
    view = executor.devices()
    assert [(view[f"node//new-{i}"].name, view[f"node//new-{i}"].tags) for i in range(3)] == [
        (f"pi-{i}", ("arm",)) for i in range(3)]
    assert view["node//new-1"].os == "Raspbian"
    await asyncio.wait_for(consumer, 5)
    assert kinds[-1] == "resync"
    # another unknown device at once: its snapshot waits RESNAPSHOT_EVERY (an hour here)
    _executor.RESNAPSHOT_EVERY = 3600.0
    executor._handle(connect("node//not-listed"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not executor._resnapshot.done() and session.asked == ["meshes", "nodes"] * 2
    await executor.close()


def test_a_new_session_takes_its_own_snapshot_instead(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_executor, "RESNAPSHOT_DELAY", 0.0)
    asyncio.run(_replaced_session())


async def _replaced_session() -> None:
    executor = MeshCentralExecutor("wss://x", user="u", password="p", group_id=GROUP)
    old, new = Session(), Session()
    executor._session = old
    executor._handle(connect("node//x"))
    executor._session = new  # the session was replaced before the snapshot ran
    assert executor._resnapshot is not None
    await executor._resnapshot
    assert old.asked == [] and new.asked == []
    await executor.close()

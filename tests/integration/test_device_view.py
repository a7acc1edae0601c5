"""The MeshCentral executor's view of devices carries what task selectors match on
(device group id and name, tags, OS) and follows changes made in MeshCentral."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from meshctrl.session import Session

from ghostrunner.lab import Agent, MeshLab
from ghostrunner.meshcentral import MeshCentralExecutor

LIMIT = 60.0


def make_executor(lab: MeshLab) -> MeshCentralExecutor:
    return MeshCentralExecutor(
        lab.url, user=lab.admin_user, password=lab.admin_password, ignore_ssl=True,
        group_id=lab.group_id,
    )


async def changed(executor: MeshCentralExecutor, check: Callable[[], bool]) -> None:
    """Wait for an executor event after which ``check()`` holds."""
    async with asyncio.timeout(LIMIT):
        if check():
            return
        async for _ in executor.events():
            if check():
                return


def test_device_view_follows_tags_and_group(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory("view-tags", start=True)

    async def scenario() -> None:
        executor = make_executor(mesh_lab)
        await executor.open()
        try:
            await executor.wait_connected(timeout=LIMIT)
            device = executor.devices()[agent.node_id]
            assert device.group_id == mesh_lab.group_id
            assert device.group_name == mesh_lab.group_name
            # a connected agent reports its OS description (a changenode event)
            await changed(executor, lambda: bool(executor.devices()[agent.node_id].os))
            async with Session(
                mesh_lab.url, user=mesh_lab.admin_user, password=mesh_lab.admin_password,
                ignore_ssl=True,
            ) as admin:
                await admin.edit_device(agent.node_id, tags=["arm", "pi"], timeout=10)
                await changed(
                    executor, lambda: executor.devices()[agent.node_id].tags == ("arm", "pi")
                )
                # MeshCentral drops the tags field when a device's tags are cleared
                await admin.edit_device(agent.node_id, tags="", timeout=10)
                await changed(executor, lambda: executor.devices()[agent.node_id].tags == ())
                # a renamed device group: its devices carry the new name
                try:
                    await admin.edit_device_group(mesh_lab.group_id, name="renamed-pis")
                    await changed(
                        executor,
                        lambda: executor.devices()[agent.node_id].group_name == "renamed-pis",
                    )
                finally:
                    await admin.edit_device_group(mesh_lab.group_id, name=mesh_lab.group_name)
                await changed(
                    executor,
                    lambda: executor.devices()[agent.node_id].group_name == mesh_lab.group_name,
                )
        finally:
            await executor.close()

    asyncio.run(scenario())

"""A fake :class:`~ghostrunner.Executor` driven by a plain function."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs

from ._fanout import EventFanout
from ._types import AgentKind, Device, DeviceEvent, EventKind, Outcome, RunRequest
from .errors import NotDelivered, PermanentError

__all__ = ["FakeExecutor", "Handler"]

Handler = Callable[[RunRequest, Device], Outcome | Awaitable[Outcome]]
"""Decides what a command does: return an Outcome, or raise NotDelivered,
OutcomeUnknown or PermanentError; may be async (e.g. to add latency or hang)."""


def _succeed(request: RunRequest, device: Device) -> Outcome:
    return Outcome(exit_code=0, output=f"{request.command}\n")


class FakeExecutor:
    """An in-process :class:`~ghostrunner.Executor` for tests.

    Devices are switched on and off with :meth:`set_online`; what a command does is
    decided by ``handler(request, device)``. It behaves like MeshCentral where that
    matters to GhostRunner: a command for an offline or unknown device raises
    ``NotDelivered``, and so does one for a device already running a command (one slot).

    Everything is inspectable: :attr:`calls` (every request received), :attr:`executions`
    (requests that may have run on the device, i.e. not refused before delivery),
    :attr:`offline_calls` and :attr:`overlaps` (requests the loop should never have
    made: to an offline device, or to a busy one).

    Args:
        handler: what each command does; default: exit 0 echoing the command.
        devices: initial devices (node ids or Device values).
        latency: seconds each command takes before the handler runs.
    """

    def __init__(
        self,
        handler: Handler | None = None,
        devices: Iterable[str | Device] = (),
        *,
        latency: float = 0.0,
    ) -> None:
        self.handler: Handler = handler or _succeed
        self.latency = latency
        self._devices: dict[str, Device] = {}
        self._fanout = EventFanout()
        self.calls: list[RunRequest] = []
        self.executions: list[RunRequest] = []
        self.offline_calls: list[RunRequest] = []
        self.overlaps: list[RunRequest] = []
        self.busy: set[str] = set()
        self.opened = False
        for dev in devices:
            self.add_device(dev)

    # ---------------------------------------------------------------- device control

    def add_device(
        self,
        device: str | Device,
        *,
        online: bool = False,
        name: str | None = None,
        agent_kind: AgentKind = AgentKind.POSIX,
    ) -> Device:
        """Add (or replace) a device. A plain node id gets ``online`` and ``name``."""
        if isinstance(device, str):
            device = Device(
                node_id=device, name=name or device, online=online, agent_kind=agent_kind
            )
        self._devices[device.node_id] = device
        self._emit(DeviceEvent(kind=EventKind.CHANGED, node_id=device.node_id))
        return device

    def update_device(self, node_id: str, **changes: Any) -> Device:
        """Change a known device's fields (``tags``, ``group_id``, ``group_name``,
        ``os``, ``name``...), as an operator editing it in MeshCentral would."""
        device = attrs.evolve(self._devices[node_id], **changes)
        self._devices[node_id] = device
        self._emit(DeviceEvent(kind=EventKind.CHANGED, node_id=node_id))
        return device

    def set_online(self, node_id: str, online: bool = True) -> None:
        """Switch a device on or off (adding it if unknown)."""
        dev = self._devices.get(node_id) or Device(node_id=node_id, name=node_id)
        self._devices[node_id] = attrs.evolve(dev, online=online)
        kind = EventKind.ONLINE if online else EventKind.OFFLINE
        self._emit(DeviceEvent(kind=kind, node_id=node_id))

    def remove_device(self, node_id: str) -> None:
        """Forget a device."""
        self._devices.pop(node_id, None)
        self._emit(DeviceEvent(kind=EventKind.REMOVED, node_id=node_id))

    def reset(self) -> None:
        """Clear the recorded calls (devices stay)."""
        self.calls.clear()
        self.executions.clear()
        self.offline_calls.clear()
        self.overlaps.clear()

    def _emit(self, event: DeviceEvent | None) -> None:
        if event is None:
            self._fanout.close()
        else:
            self._fanout.publish(event)

    # ---------------------------------------------------------------- Executor

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.opened = False
        self._emit(None)

    def devices(self) -> Mapping[str, Device]:
        return dict(self._devices)

    def events(self) -> AsyncIterator[DeviceEvent]:
        return self._fanout.subscribe()

    async def run(self, request: RunRequest) -> Outcome:
        self.calls.append(request)
        device = self._devices.get(request.node_id)
        if device is None:
            raise PermanentError(f"unknown device {request.node_id}")
        if not device.online:
            self.offline_calls.append(request)
            raise NotDelivered("device not connected")
        if request.node_id in self.busy:
            self.overlaps.append(request)
            raise NotDelivered("agent busy")
        self.busy.add(request.node_id)
        self.executions.append(request)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            result = self.handler(request, device)
            if inspect.isawaitable(result):
                result = await result
            assert isinstance(result, Outcome)
            return result
        except (NotDelivered, PermanentError):
            # refused before it ran: not an execution
            self.executions.remove(request)
            raise
        finally:
            self.busy.discard(request.node_id)

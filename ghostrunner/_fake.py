"""A fake :class:`~ghostrunner.Executor` driven by a plain function."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs

from ._fanout import EventFanout
from ._types import AgentKind, Device, DeviceEvent, EventKind, Outcome, RunRequest
from .errors import NotDelivered, OutcomeUnknown, PermanentError

__all__ = ["FakeExecutor", "Handler", "ReplyLost"]

Handler = Callable[[RunRequest, Device], Outcome | Awaitable[Outcome]]
"""Decides what a command does: return an Outcome, or raise NotDelivered,
OutcomeUnknown or PermanentError; may be async (e.g. to add latency or hang)."""


class ReplyLost(Exception):
    """Raised by a handler: the command ran to ``outcome`` on the device, but the reply
    never came back. With a journal the device keeps the outcome (the dispatch raises a
    recoverable ``OutcomeUnknown``); without one it is simply unknown."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__("reply lost")
        self.outcome = outcome


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

    With ``journal``, each device keeps a record of every attempt, as the MeshCentral
    backend's ``sh`` wrapper does (:attr:`records`: node id -> (task id, attempt) ->
    its outcome, or None while it runs or if it never finished): a request for an
    attempt the device has a record of reports it (``recovered``) instead of running
    it again; a recovery request (``recover``) for a device whose journal was wiped
    (:meth:`wipe_journal`) raises ``OutcomeUnknown``; a handler raising
    :class:`ReplyLost`, or a caller that stops waiting (a crash), leaves the outcome in
    the record and the dispatch recoverable. :attr:`reruns` lists executions of a run
    whose earlier attempt the device had a finished record of.

    Args:
        handler: what each command does; default: exit 0 echoing the command.
        devices: initial devices (node ids or Device values).
        latency: seconds each command takes before the handler runs.
        journal: keep a record of each attempt on the device (see above).
    """

    def __init__(
        self,
        handler: Handler | None = None,
        devices: Iterable[str | Device] = (),
        *,
        latency: float = 0.0,
        journal: bool = False,
    ) -> None:
        self.handler: Handler = handler or _succeed
        self.latency = latency
        self.journal = journal
        self.records: dict[str, dict[tuple[str, int], Outcome | None]] = {}
        self.reruns: list[RunRequest] = []
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

    def wipe_journal(self, node_id: str) -> None:
        """Delete the device's journal, as a reboot that clears it would."""
        self.records.pop(node_id, None)

    def reset(self) -> None:
        """Clear the recorded calls (devices stay)."""
        self.reruns.clear()
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

    def recoverable(self, node_id: str) -> bool:
        return self.journal

    async def run(self, request: RunRequest) -> Outcome:
        self.calls.append(request)
        if request.recover and not self.journal:
            raise OutcomeUnknown("this device keeps no record of what ran")
        device = self._devices.get(request.node_id)
        if device is None:
            raise PermanentError(f"unknown device {request.node_id}")
        if not device.online:
            self.offline_calls.append(request)
            raise NotDelivered("device not connected")
        if request.node_id in self.busy:
            self.overlaps.append(request)
            raise NotDelivered("agent busy")
        book: dict[tuple[str, int], Outcome | None] | None = None
        attempt = (request.task_id, request.attempt)
        if self.journal:
            book = self.records.get(request.node_id)
            if book is None:
                if request.recover:
                    raise OutcomeUnknown("the device's journal is gone")
                book = self.records[request.node_id] = {}
            if attempt in book:
                record = book[attempt]
                if record is None:
                    raise OutcomeUnknown("the attempt started but recorded no outcome")
                return attrs.evolve(record, recovered=True)
            if any(t == request.task_id and o is not None for (t, _), o in book.items()):
                self.reruns.append(request)
            book[attempt] = None
        self.busy.add(request.node_id)
        self.executions.append(request)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            result = self.handler(request, device)
            if inspect.isawaitable(result):
                result = await result
            assert isinstance(result, Outcome)
            if book is not None:
                book[attempt] = result
            return result
        except ReplyLost as lost:
            if book is None:
                raise OutcomeUnknown("no reply") from None
            book[attempt] = lost.outcome
            raise OutcomeUnknown("no reply", recoverable=True) from None
        except (NotDelivered, PermanentError):
            # refused before it ran: not an execution (nor a rerun)
            self.executions.remove(request)
            self.reruns[:] = [r for r in self.reruns if r is not request]
            if book is not None:
                del book[attempt]
            raise
        except asyncio.CancelledError:
            # the caller stopped waiting (GhostRunner stopped): the device goes on
            if book is not None:
                book[attempt] = Outcome(exit_code=0, output="finished after the caller left")
            raise
        finally:
            self.busy.discard(request.node_id)

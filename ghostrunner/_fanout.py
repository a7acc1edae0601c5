"""Fan-out of device events to any number of async subscribers (for executors)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ._types import DeviceEvent

__all__ = ["EventFanout"]


class EventFanout:
    """Each :meth:`subscribe` call gets every event published after it, in order, until
    :meth:`close`. Publishing never blocks (unbounded queues: events only wake loops,
    and a slow subscriber costs memory, not correctness)."""

    def __init__(self) -> None:
        self._queues: list[asyncio.Queue[DeviceEvent | None]] = []

    def publish(self, event: DeviceEvent) -> None:
        for queue in self._queues:
            queue.put_nowait(event)

    def close(self) -> None:
        """End every current subscription."""
        for queue in self._queues:
            queue.put_nowait(None)

    async def subscribe(self) -> AsyncIterator[DeviceEvent]:
        queue: asyncio.Queue[DeviceEvent | None] = asyncio.Queue()
        self._queues.append(queue)
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            self._queues.remove(queue)

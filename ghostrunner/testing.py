"""Fakes for tests, GhostRunner's and yours: an in-memory store and a fake executor.

Example::

    from ghostrunner import GhostRunner
    from ghostrunner.testing import FakeExecutor, InMemoryStore

    executor = FakeExecutor(devices=["node//a"])
    async with GhostRunner(store=InMemoryStore(), executor=executor,
                           background=False) as gr:
        task = await gr.submit(command="uptime", targets=["node//a"])
        executor.set_online("node//a")
        await gr.run_until_idle()
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from ._fake import FakeExecutor, Handler, ReplyLost
from ._memory import InMemoryStore, SharedInMemoryStore

if TYPE_CHECKING:
    from ._runner import GhostRunner

__all__ = [
    "FakeClock",
    "FakeExecutor",
    "Handler",
    "InMemoryStore",
    "ReplyLost",
    "SharedInMemoryStore",
    "crash",
]


async def crash(runner: GhostRunner) -> None:
    """Stop ``runner`` as abruptly as a killed process would, writing nothing more to
    its store. The store and executor are left open, as a dead process leaves them:
    start a new GhostRunner on the same store to test what recovery does."""
    await runner.loop.abort()
    task = runner._loop_task
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class FakeClock:
    """A clock that moves only when told: pass it as ``GhostRunner(clock=...)``."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        """Move the clock forward; returns the new time."""
        self.now += timedelta(seconds=seconds)
        return self.now

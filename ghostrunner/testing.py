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

from datetime import UTC, datetime, timedelta

from ._fake import FakeExecutor, Handler
from ._memory import InMemoryStore

__all__ = ["FakeClock", "FakeExecutor", "Handler", "InMemoryStore"]


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

"""Following the event log: :class:`EventFeed`, behind ``GhostRunner.events()``.

Every follower reads the store from its own cursor, but they do not each query the store
when something changes: the feed keeps the newest events (a window of at most ``keep``)
and refreshes it with **one** query per change, whoever asks first; a follower whose
cursor is inside the window reads from it, one further behind (resuming after a
disconnection...) reads the store. What wakes the followers:

* :meth:`EventFeed.wake`, called by the facade after each write of this process (its
  verbs and the loop's), and by anything that learns of writes from elsewhere (a
  PostgreSQL ``LISTEN`` on a channel other processes ``NOTIFY``, for example);
* a slow poll (``poll_interval``): at most one query per interval, whoever waits, so
  that events written by another process sharing the database show up without a hook.

The window is bounded and so is each read (``batch``): a slow follower costs the store
queries at its own pace, never memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from bisect import bisect_right
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Final

from ._protocols import Store
from .events import Event

__all__ = ["EventFeed"]

#: events kept in the shared window
KEEP: Final = 4096
#: events read from the store per query
BATCH: Final = 500


class EventFeed:
    """The shared window of recent events, and the followers' wake-up."""

    def __init__(self, store: Store, *, poll_interval: float = 2.0, keep: int = KEEP,
                 batch: int = BATCH) -> None:
        if not poll_interval > 0:
            raise ValueError("poll_interval must be a positive number of seconds")
        self.store = store
        self.poll_interval = poll_interval
        self.keep = max(keep, batch)
        self.batch = batch
        self.queries = 0  # store reads made for the window (tests, benchmarks)
        self._window: list[Event] = []
        self._base: int | None = None  # the window holds every event with base < id <= last
        self._last = 0
        self._wanted = 0  # wake-ups asked for
        self._fetched = 0  # wake-ups the window has caught up with
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    def wake(self) -> None:
        """New events may be in the store: the next read refreshes the window, and
        every follower waiting for one reads again. Cheap; call it from the event loop."""
        self._wanted += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def start(self, after: int | None) -> int:
        """The cursor a follower starts at: ``after``, or the newest event's id (only
        what comes next) when None. A cursor beyond the newest event (the database was
        replaced, or emptied) starts from the oldest event kept instead."""
        last = await self.store.last_event_id()
        if after is None:
            return last
        return 0 if after > last else max(after, 0)

    async def read(self, cursor: int) -> list[Event]:
        """The next events after ``cursor`` (at most ``batch``), from the window when it
        covers the cursor, else from the store."""
        await self._refresh()
        base = self._base
        if base is not None and cursor >= base:
            start = bisect_right(self._window, cursor, key=lambda e: e.id)
            return self._window[start : start + self.batch]
        return list(await self.store.events_after(cursor, self.batch))

    async def batches(self, after: int | None = None) -> AsyncGenerator[list[Event], None]:
        """Every event after ``after`` (None: from now on), then the new ones as they
        come, forever, a list at a time: each list is one read (of the window, else of
        the store), never empty. For consumers that hand events on in bulk (one step per
        read instead of one per event)."""
        cursor = await self.start(after)
        while True:
            changed = self._changed  # before reading: a wake-up meanwhile is not missed
            batch = await self.read(cursor)
            if batch:
                cursor = batch[-1].id
                yield batch
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self.poll_interval)
                continue
            if time.monotonic() - self._fetched_at >= self.poll_interval:
                self._wanted += 1  # the slow poll: one query, whoever waits

    async def follow(self, after: int | None = None,
                     accept: Callable[[Event], bool] | None = None) -> AsyncIterator[Event]:
        """Every event after ``after`` (None: from now on), then each new one as it
        comes, forever; those ``accept`` refuses are skipped (without a query each)."""
        batches = self.batches(after)
        try:
            async for batch in batches:
                for event in batch:
                    if accept is None or accept(event):
                        yield event
        finally:
            await batches.aclose()

    async def _refresh(self) -> None:
        if self._fetched == self._wanted and self._base is not None:
            return
        async with self._lock:
            if self._fetched == self._wanted and self._base is not None:
                return
            target = self._wanted
            if self._base is None:
                self._base = self._last = await self.store.last_event_id()
            while True:
                self.queries += 1
                got = list(await self.store.events_after(self._last, self.batch))
                if got:
                    self._window.extend(got)
                    self._last = got[-1].id
                if len(self._window) > self.keep:  # bounded, however many came
                    cut = len(self._window) - self.keep
                    self._base = self._window[cut - 1].id
                    del self._window[:cut]
                if len(got) < self.batch:
                    break
            self._fetched = target
            self._fetched_at = time.monotonic()

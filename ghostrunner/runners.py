"""Several runners on one store: who they are, their leases, and the signals between them.

A *runner* is one :class:`~ghostrunner.GhostRunner` (one ``ghostrunner serve`` process).
Several may share one database (:class:`~ghostrunner.postgres.PostgresStore`): each
dispatches, and the database decides who gets which run. Two optional capabilities of a
store make that safe and quick; the loop uses them when its store offers them, and a
store without them (SQLite, the in-memory store) runs one runner, as before:

* :class:`Leases`: each runner registers (:class:`RunnerInfo`) and holds a **lease** it
  renews every ``LoopSettings.heartbeat`` seconds. Claims record the runner that
  dispatched each run, and only that runner may record the run's end (``finish`` and
  ``release`` are conditional on it: :class:`~ghostrunner.errors.NotOwner`). A runner
  whose lease expired (plus a grace) is dead to the others: one survivor *adopts* its
  dispatched runs (atomically: only one survivor adopts each) and settles them through
  outcome recovery, asking each device's journal what became of the run.
* :class:`Signals`: a small message between the processes sharing the store (PostgreSQL
  ``LISTEN``/``NOTIFY``): a task submitted, retried or resumed through one runner, or a
  device freed by one, wakes the others at once instead of at their next resync.

Time: a lease is counted by the **store's** clock (the database server's for
PostgreSQL), so runners on hosts whose clocks disagree still agree on who is dead. A
runner judges its own lease by its monotonic clock from the moment it *sent* each
renewal, which the store's expiry can only follow: it stops starting commands
(*fences itself*) ``heartbeat`` seconds before its lease can expire, so a survivor
never acts on a run its owner may still send.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import AsyncGenerator, Collection, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

import attrs

from ._types import Outcome, Run, RunKey, RunState, Task, _aware, new_id

__all__ = [
    "Adoption",
    "LeaseState",
    "Leases",
    "Renewal",
    "RunnerInfo",
    "RunnerStatus",
    "Signal",
    "Signals",
    "default_runner_name",
]

#: The longest runner name kept.
MAX_RUNNER_NAME = 200


def default_runner_name() -> str:
    """``host:pid``: what a runner is called unless configured."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _name(value: str) -> str:
    value = str(value).strip()
    if not value:
        raise ValueError("a runner name must not be empty")
    return value[:MAX_RUNNER_NAME]


@attrs.frozen(kw_only=True)
class RunnerInfo:
    """Who a runner is: a new ``id`` for every start (a restarted process is a new
    runner), a ``name`` for people (``host:pid`` unless configured; not unique), the
    GhostRunner ``version`` it runs, and when it started."""

    name: str = attrs.field(factory=default_runner_name, converter=_name)
    version: str = ""
    started_at: datetime = attrs.field(validator=_aware)
    id: str = attrs.field(factory=new_id)


class LeaseState(enum.StrEnum):
    """Where a runner's lease stands, as the store sees it."""

    ALIVE = "alive"
    """Renewed in time: the runner dispatches."""
    EXPIRED = "expired"
    """Past its lease, not taken over yet: it may come back (its renewal then succeeds)
    or be adopted once the grace has passed too."""
    ADOPTED = "adopted"
    """Dead: a survivor took over its dispatched runs. It holds nothing any more; if it
    is still running it registers again under a new id."""
    STOPPED = "stopped"
    """Stopped gracefully: what it left dispatched is adopted at once."""


@attrs.frozen(kw_only=True)
class RunnerStatus:
    """A runner as the store knows it (``GET /``, ``ghostrunner runners``)."""

    info: RunnerInfo
    state: LeaseState
    heartbeat_at: datetime
    """The last renewal (the store's clock)."""
    heartbeat_age: float
    """Seconds since then (the store's clock)."""
    expires_at: datetime
    runs: int
    """Runs it has dispatched right now (in flight, or held until their device tells
    their outcome)."""
    adopted_by: str | None = None
    """The id of the runner that took over its runs."""


@attrs.frozen(kw_only=True)
class Renewal:
    """What :meth:`Leases.renew` found."""

    held: bool
    """False: the runner is dead to the others (adopted) or retired; it holds no run
    any more and must register again under a new id."""
    peers: int = 0
    """Other runners holding a live lease."""


@attrs.frozen(kw_only=True)
class Adoption:
    """What :meth:`Leases.adopt` took over."""

    runs: Sequence[Run] = ()
    """Dispatched runs the caller owns now, to settle through outcome recovery."""
    runners: Sequence[str] = ()
    """The ids of the runners declared dead by this call."""
    next_in: float | None = None
    """Seconds until the next other runner's lease (plus the grace) ends, if it is not
    renewed meanwhile: when to look again. None: no other live runner."""
    peers: int = 0
    """Other runners holding a live lease."""


@attrs.frozen(kw_only=True)
class Signal:
    """A message from another process sharing the store.

    ``kind``: ``runs`` (these devices may have work now: a task submitted, retried or
    resumed, a device freed), ``runners`` (a runner started or stopped: look for runs
    to adopt), or any other kind a later feature sends (it reaches the callbacks given
    to :meth:`ghostrunner.GhostRunner.on_signal`). ``nodes``: the devices concerned;
    None means all (too many to list, or a listener that reconnected and may have
    missed some).
    """

    kind: str
    nodes: tuple[str, ...] | None = None


@runtime_checkable
class Leases(Protocol):
    """Optional capability of a store shared by several runners (see the module
    docstring). Every method is atomic; times are the store's own clock.

    The loop passes ``runner`` to the three verbs below when its store has this
    capability; without ``runner`` they behave as :class:`~ghostrunner.Store` says
    (unconditional), which tools and tests may use.
    """

    async def register(self, runner: RunnerInfo, lease: float) -> None:
        """Record ``runner`` as alive, its lease ending ``lease`` seconds from now, and
        tell the other runners (a ``runners`` signal, with :class:`Signals`)."""

    async def renew(self, runner_id: str, lease: float) -> Renewal:
        """Extend the runner's lease to ``lease`` seconds from now, unless it was
        adopted or retired (``held`` False). A lease past its end but not adopted yet
        is renewed: the runner is back."""

    async def adopt(self, runner_id: str, grace: float) -> Adoption:
        """Take over the dispatched runs of every runner whose lease ended more than
        ``grace`` seconds ago or that retired, and of none (runs dispatched before
        runners were recorded): mark those runners adopted by ``runner_id`` and make it
        the owner of their runs. Two runners adopting at once never both get a run."""

    async def retire(self, runner_id: str) -> None:
        """The runner stops gracefully: its lease ends now and what it leaves
        dispatched may be adopted at once (a ``runners`` signal tells the others)."""

    async def runners(self) -> Sequence[RunnerStatus]:
        """The runners alive or expired, and those that ended in the last hour, oldest
        start first."""

    async def claim_many(
        self, keys: Sequence[RunKey], now: datetime, *, runner: str | None = None
    ) -> Sequence[tuple[Run, Task]]:
        """:meth:`Store.claim_many`, recording ``runner`` as the runs' owner."""

    async def finish(
        self,
        key: RunKey,
        state: RunState,
        now: datetime,
        *,
        outcome: Outcome | None = None,
        error: str | None = None,
        runner: str | None = None,
    ) -> Run:
        """:meth:`Store.finish`; with ``runner``, only if that runner owns the run
        (else :class:`~ghostrunner.errors.NotOwner`, and nothing changes)."""

    async def release(
        self,
        key: RunKey,
        now: datetime,
        *,
        available_at: datetime,
        error: str,
        delivered: bool,
        runner: str | None = None,
    ) -> Run:
        """:meth:`Store.release`; with ``runner``, only if that runner owns the run
        (else :class:`~ghostrunner.errors.NotOwner`, and nothing changes)."""


@runtime_checkable
class Signals(Protocol):
    """Optional capability of a store shared by several processes: small messages
    between them (PostgreSQL ``LISTEN``/``NOTIFY``). Losing one costs latency, never
    correctness: every runner still passes every ``resync_interval``."""

    async def signal(self, kind: str, nodes: Collection[str] | None = None) -> None:
        """Send a :class:`Signal` to the other processes (not to this one)."""

    def signals(self) -> AsyncGenerator[Signal, None]:
        """The signals the other processes send, for as long as the store is open:
        one listening connection, opened again (with backoff) whenever it breaks; each
        (re)connection yields ``Signal("runs")`` (all devices), as signals may have
        been missed meanwhile."""

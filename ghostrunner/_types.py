"""GhostRunner's values: frozen attrs classes, changed only through ``attrs.evolve``.

A :class:`Task` is what an operator queues: one command and its target devices.
Each (task, device) pair is a :class:`Run`, tracked on its own through the states of
:class:`RunState`. Validation happens at construction and raises
:class:`~ghostrunner.ValidationError` naming the field, so an invalid value never exists.
"""

from __future__ import annotations

import enum
import fnmatch
import os
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar

import attrs

from ._output import DEFAULT_OUTPUT_LIMIT
from .errors import IllegalTransition, ValidationError

__all__ = [
    "ACTIVE_STATES",
    "RETRYABLE_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "AgentKind",
    "Attempt",
    "Delivery",
    "Device",
    "DeviceEvent",
    "EventKind",
    "Outcome",
    "Page",
    "RetryPolicy",
    "Rollout",
    "Run",
    "RunKey",
    "RunRequest",
    "RunState",
    "Selector",
    "Shell",
    "TagsMode",
    "Task",
    "TaskQuery",
    "TaskStatus",
    "TaskSummary",
    "new_id",
    "task_status",
    "utcnow",
]

E = TypeVar("E", bound=enum.StrEnum)
_V = TypeVar("_V")

#: GhostRunner's version (``ghostrunner.__version__``; runners record it).
VERSION = "0.1.0"

MAX_NAME = 200
MAX_COMMAND = 64 * 1024
MAX_TARGETS = 10_000
MAX_NODE_ID = 256
MAX_TIMEOUT = 7 * 24 * 3600.0


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


# Ids are unique, not secret: a PRNG seeded from the OS is enough, and os.urandom per id
# releases the GIL, which costs up to a whole switch interval when the store's thread is
# busy (measured: a third of POST /task/create's time under load).
_ID_RANDOM = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ID_RANDOM.seed(os.urandom(32)))


def new_id() -> str:
    """A new, unique, time-ordered identifier (UUIDv7 layout, 32 hex digits)."""
    ms = time.time_ns() // 1_000_000
    rand = _ID_RANDOM.getrandbits(76)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand & ((1 << 76) - 1))
    # set the RFC 4122 variant bits
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return f"{value:032x}"


class RunState(enum.StrEnum):
    """Where one (task, device) run stands.

    ``pending`` and ``dispatched`` are active; the rest are terminal: they change only
    when an operator retries the run (back to ``pending``, a new attempt).
    """

    PENDING = "pending"
    """Waiting for its device to come online (or for ``not_before`` / a retry backoff)."""
    DISPATCHED = "dispatched"
    """Sent to the device; the outcome is not known yet."""
    SUCCEEDED = "succeeded"
    """Ran and exited 0."""
    FAILED = "failed"
    """Ran and exited non-zero, or can never run as asked (``error`` says why)."""
    TIMED_OUT = "timed_out"
    """Ran past the task's timeout and was killed on the device."""
    EXPIRED = "expired"
    """The task's ``expires_at`` passed before the run could start."""
    CANCELLED = "cancelled"
    """Cancelled by an operator while pending."""
    LOST = "lost"
    """It may have run, and its outcome can never be known."""

    @property
    def terminal(self) -> bool:
        """True for the states a run leaves only when retried."""
        return self in TERMINAL_STATES


TERMINAL_STATES: frozenset[RunState] = frozenset(
    {
        RunState.SUCCEEDED,
        RunState.FAILED,
        RunState.TIMED_OUT,
        RunState.EXPIRED,
        RunState.CANCELLED,
        RunState.LOST,
    }
)
ACTIVE_STATES: frozenset[RunState] = frozenset({RunState.PENDING, RunState.DISPATCHED})
#: The end states an operator may retry (a run that succeeded is done).
RETRYABLE_STATES: frozenset[RunState] = TERMINAL_STATES - {RunState.SUCCEEDED}


def retryable(states: Iterable[RunState | str]) -> frozenset[RunState]:
    """``states`` as RunStates, if every one may be retried; else IllegalTransition."""
    wanted = frozenset(RunState(s) for s in states)
    if not wanted <= RETRYABLE_STATES:
        bad = sorted(s.value for s in wanted - RETRYABLE_STATES)
        raise IllegalTransition(f"runs that {', '.join(bad)} cannot be retried")
    return wanted

#: Every legal change of a run's state; a store refuses anything else with
#: IllegalTransition. The store contract tests (``tests/contract``) hold every store to it.
TRANSITIONS: Mapping[RunState, frozenset[RunState]] = {
    RunState.PENDING: frozenset({RunState.DISPATCHED, RunState.EXPIRED, RunState.CANCELLED}),
    RunState.DISPATCHED: frozenset(
        {
            RunState.PENDING,  # certainly not delivered, or at-least-once retry
            RunState.SUCCEEDED,
            RunState.FAILED,
            RunState.TIMED_OUT,
            RunState.LOST,
        }
    ),
    # an operator's retry: a new attempt
    **{state: frozenset({RunState.PENDING}) for state in RETRYABLE_STATES},
}


class Shell(enum.StrEnum):
    """Which shell runs the command on the device."""

    AUTO = "auto"
    """``sh`` on Linux, macOS and BSD agents, ``cmd`` on Windows agents."""
    SH = "sh"
    CMD = "cmd"
    POWERSHELL = "powershell"


class Delivery(enum.StrEnum):
    """What GhostRunner may do when it can't know whether a command ran."""

    AT_MOST_ONCE = "at_most_once"
    """Never send again a command that may have reached the device: it becomes ``lost``."""
    AT_LEAST_ONCE = "at_least_once"
    """Send it again (up to ``max_attempts``, with backoff) until an outcome is known."""


class AgentKind(enum.StrEnum):
    """The family of a device's MeshCentral agent, which decides the default shell."""

    POSIX = "posix"
    WINDOWS = "windows"
    UNKNOWN = "unknown"


# --------------------------------------------------------------------------- validators


def _aware(inst: object, attribute: attrs.Attribute[Any], value: datetime | None) -> None:
    if value is None:
        return
    if not isinstance(value, datetime):
        raise ValidationError(attribute.name, "must be a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(attribute.name, "must be timezone-aware (e.g. end with Z)")
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValidationError(attribute.name, "is out of range") from None


def _encodable(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _text(max_len: int, *, strip: bool = True) -> Any:
    def check(inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if not isinstance(value, str):
            raise ValidationError(attribute.name, "must be a string")
        if not (value.strip() if strip else value):
            raise ValidationError(attribute.name, "must not be empty")
        if len(value) > max_len:
            raise ValidationError(attribute.name, f"must be at most {max_len} characters")
        if "\x00" in value:
            raise ValidationError(attribute.name, "must not contain NUL characters")
        if not _encodable(value):
            raise ValidationError(attribute.name, "must be valid Unicode text")

    return check


def _targets(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ValidationError("targets", "must be a list of node ids, not a string")
    return tuple(value)


# C0 controls, DEL and C1 controls: in no MeshCentral node id, and invisible in logs
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _node_id_problem(node: str) -> str | None:
    """Why ``node`` cannot be a node id, or None. A node id that no device can have
    (``"node-1 "``, ``"node-1\\n"``) would leave its run pending forever."""
    stripped = node.strip()
    if not stripped:
        return "must be a non-empty node id"
    if len(node) > MAX_NODE_ID or not _encodable(node):
        return "is not a valid node id"
    if stripped != node:
        return f"must not start or end with whitespace ({node!r})"
    found = _CONTROL.search(node)
    if found is not None:
        return f"must not contain control characters ({found.group()!r} at {found.start()})"
    return None


def _check_targets(inst: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if len(value) > MAX_TARGETS:
        raise ValidationError(attribute.name, f"must name at most {MAX_TARGETS} devices")
    seen: set[str] = set()
    for i, node in enumerate(value):
        if not isinstance(node, str):
            raise ValidationError(f"{attribute.name}[{i}]", "must be a non-empty node id")
        problem = _node_id_problem(node)
        if problem is not None:
            raise ValidationError(f"{attribute.name}[{i}]", problem)
        if node in seen:
            raise ValidationError(f"{attribute.name}[{i}]", f"duplicate node id {node!r}")
        seen.add(node)


def _positive_timeout(inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(attribute.name, "must be a number of seconds")
    if not (0 < value <= MAX_TIMEOUT):  # also rejects NaN
        raise ValidationError(attribute.name, f"must be > 0 and <= {MAX_TIMEOUT:.0f} seconds")


def _attempts(inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(attribute.name, "must be an integer")
    if not (1 <= value <= 100):
        raise ValidationError(attribute.name, "must be between 1 and 100")


def _member(cls: type[E], field: str, value: object) -> E:
    if isinstance(value, cls):
        return value
    allowed = ", ".join(m.value for m in cls)
    if isinstance(value, str):
        try:
            return cls(value)
        except ValueError:
            pass
    raise ValidationError(field, f"must be one of: {allowed} (got {value!r})")


def _to_shell(value: object) -> Shell:
    return _member(Shell, "shell", value)


def _to_delivery(value: object) -> Delivery:
    return _member(Delivery, "delivery", value)


def _to_state(value: object) -> RunState:
    return _member(RunState, "state", value)


# --------------------------------------------------------------------------- fleets


class TagsMode(enum.StrEnum):
    """How a selector's tags combine."""

    ALL = "all"
    """The device has every tag."""
    ANY = "any"
    """The device has at least one of the tags."""


def _opt_text(max_len: int) -> Any:
    check = _text(max_len)

    def optional(inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
        if value is not None:
            check(inst, attribute, value)

    return optional


def _tags(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ValidationError("tags", "must be a list of tags, not a string")
    return tuple(value)


def _check_tags(inst: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if len(value) > 100:
        raise ValidationError(attribute.name, "must list at most 100 tags")
    for i, tag in enumerate(value):
        if not isinstance(tag, str) or not tag.strip() or len(tag) > MAX_NAME:
            raise ValidationError(f"{attribute.name}[{i}]", "must be a non-empty tag")


def _to_tags_mode(value: object) -> TagsMode:
    return _member(TagsMode, "tags_mode", value)


@attrs.frozen(kw_only=True)
class Selector:
    """Which devices a task targets, beyond its explicit node ids: every device whose
    fields match all of those given (an AND), online or not.

    Args:
        group: a device group, by id (``mesh//...``) or by name (case-insensitive).
        tags: device tags (case-insensitive); ``tags_mode`` ``all`` (default: the
            device has every one) or ``any`` (at least one).
        os: a case-insensitive substring of the device's OS description.
        name: a glob (``*``, ``?``, ``[...]``) on the device name, case-insensitive.
        all: every device the executor manages.

    Raises:
        ValidationError: naming the field; a selector must say at least one thing.
    """

    group: str | None = attrs.field(default=None, validator=_opt_text(MAX_NAME))
    tags: tuple[str, ...] = attrs.field(default=(), converter=_tags, validator=_check_tags)
    tags_mode: TagsMode = attrs.field(default=TagsMode.ALL, converter=_to_tags_mode)
    os: str | None = attrs.field(default=None, validator=_opt_text(MAX_NAME))
    name: str | None = attrs.field(default=None, validator=_opt_text(MAX_NAME))
    all: bool = False
    # matching runs for every device on every change: prepared once
    _tag_set: frozenset[str] = attrs.field(init=False, repr=False, eq=False)
    _name_re: re.Pattern[str] | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.all, bool):
            raise ValidationError("all", "must be true or false")
        if not (self.all or self.group or self.tags or self.os or self.name):
            raise ValidationError(
                "select", "must give at least one of group, tags, os, name or all: true"
            )
        object.__setattr__(self, "_tag_set", frozenset(t.casefold() for t in self.tags))
        pattern = None if self.name is None else re.compile(
            fnmatch.translate(self.name.casefold()), re.DOTALL
        )
        object.__setattr__(self, "_name_re", pattern)

    def matches(self, device: Device) -> bool:
        """True if ``device`` is selected."""
        if self.group is not None:
            if self.group.startswith("mesh//"):
                if device.group_id != self.group:
                    return False
            elif (device.group_name or "").casefold() != self.group.casefold():
                return False
        if self.tags:
            wanted = self._tag_set
            have = device.folded_tags
            if self.tags_mode is TagsMode.ALL and not wanted <= have:
                return False
            if self.tags_mode is TagsMode.ANY and not wanted & have:
                return False
        if self.os is not None and self.os.casefold() not in (device.os or "").casefold():
            return False
        return self._name_re is None or bool(self._name_re.match((device.name or "").casefold()))

    def __str__(self) -> str:
        parts = [f"group={self.group}"] if self.group else []
        if self.tags:
            parts.append(f"tags({self.tags_mode.value})={','.join(self.tags)}")
        parts += [f"os~{self.os}"] if self.os else []
        parts += [f"name={self.name}"] if self.name else []
        return " AND ".join(parts) or "all devices"


def _opt_count(low: int, high: int) -> Any:
    def check(inst: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValidationError(attribute.name, f"must be an integer from {low} to {high}")

    return check


def _opt_pct(inst: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 100:
        raise ValidationError(attribute.name, "must be a percentage from 0 to below 100")


@attrs.frozen(kw_only=True)
class Rollout:
    """How fast a task spreads over its devices, and when it gives up.

    Args:
        max_concurrent: the most runs of this task in flight at once.
        per_minute: the most runs of this task started in any 60 seconds.
        abort_failed_pct: abort the task when more than this percentage of its
            finished runs failed or timed out...
        abort_min_finished: ...once at least this many runs finished (default 1).

    Abort cancels every run not yet started, with the reason recorded; runs in flight
    finish. None (the default) means no limit and no abort rule.
    """

    max_concurrent: int | None = attrs.field(default=None, validator=_opt_count(1, 1_000_000))
    per_minute: int | None = attrs.field(default=None, validator=_opt_count(1, 1_000_000))
    abort_failed_pct: float | None = attrs.field(default=None, validator=_opt_pct)
    abort_min_finished: int = attrs.field(default=1, validator=_opt_count(1, 1_000_000))

    def should_abort(self, finished: int, failed: int) -> str | None:
        """The reason to abort, if ``failed`` of ``finished`` runs break the rule."""
        pct = self.abort_failed_pct
        if pct is None or finished < self.abort_min_finished or failed * 100 <= pct * finished:
            return None
        return (
            f"aborted: {failed} of {finished} finished runs failed or timed out "
            f"(more than {pct:g}%)"
        )


def _exit_codes(value: Iterable[int]) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValidationError("success_exit_codes", "must be a list of exit codes")
    return tuple(value)


def _check_exit_codes(
    inst: object, attribute: attrs.Attribute[Any], value: tuple[int, ...]
) -> None:
    if not value or len(value) > 256:
        raise ValidationError(attribute.name, "must list 1 to 256 exit codes")
    for i, code in enumerate(value):
        if isinstance(code, bool) or not isinstance(code, int) or not -(2**31) <= code < 2**32:
            raise ValidationError(f"{attribute.name}[{i}]", "must be an integer exit code")


_NO_ROLLOUT = Rollout()


def _nested(cls: type[_V], field: str, value: object) -> _V:
    if not isinstance(value, Mapping):
        return value  # type: ignore[return-value]  # the Task's checks name it
    try:
        return cls(**value)
    except ValidationError as exc:
        name = field if exc.field == field else f"{field}.{exc.field}"
        raise ValidationError(name, exc.message) from None
    except TypeError:
        unknown = sorted(set(value) - {f.name for f in attrs.fields(cls)})  # type: ignore[arg-type]
        raise ValidationError(f"{field}.{unknown[0] if unknown else field}",
                              "unknown field") from None


def _to_selector(value: Selector | Mapping[str, Any] | None) -> Selector | None:
    """A Selector, or its fields as a mapping (``{"tags": ["arm"]}``)."""
    return None if value is None else _nested(Selector, "select", value)


def _to_rollout(value: Rollout | Mapping[str, Any]) -> Rollout:
    """A Rollout, or its fields as a mapping (``{"max_concurrent": 10}``)."""
    return _nested(Rollout, "rollout", value)

# --------------------------------------------------------------------------- tasks & runs


@attrs.frozen(kw_only=True)
class Task:
    """A command queued for one or more devices.

    Args:
        name: a label for operators (not unique).
        command: the shell command, run as is by ``shell`` on each device.
        targets: MeshCentral node ids (full ``node//...`` form); one run each. Up to
            256 characters each, without control characters or whitespace at either end.
        shell: ``auto`` picks ``sh`` or ``cmd`` from the device's agent.
        run_as_user: run in the logged-in user's session instead of as the agent.
        timeout: seconds the command may run on the device before it is killed.
        not_before: do not start before this time.
        expires_at: runs not started by this time end ``expired``.
        max_attempts: the most times the command may be handed to a device.
        delivery: ``at_most_once`` (default) or ``at_least_once``.
        select: a :class:`Selector`: the devices it matches get a run too (those known
            when the task is submitted; with ``continuous``, also those that match later).
        continuous: keep adding a run for every device that starts to match ``select``,
            until ``expires_at`` or until the task is cancelled. A device never gets two
            runs of one task.
        rollout: :class:`Rollout` limits and the abort rule.
        success_exit_codes: the exit codes that mean success (default ``(0,)``).

    Raises:
        ValidationError: naming the field, for any invalid value.
    """

    # the limits the validators enforce (the HTTP API documents them)
    MAX_NAME: ClassVar[int] = MAX_NAME
    MAX_COMMAND: ClassVar[int] = MAX_COMMAND
    MAX_TARGETS: ClassVar[int] = MAX_TARGETS
    MAX_NODE_ID: ClassVar[int] = MAX_NODE_ID
    MAX_TIMEOUT: ClassVar[float] = MAX_TIMEOUT

    id: str = attrs.field(factory=new_id, validator=_text(64))
    name: str = attrs.field(validator=_text(MAX_NAME))
    command: str = attrs.field(validator=_text(MAX_COMMAND, strip=True))
    targets: tuple[str, ...] = attrs.field(converter=_targets, validator=_check_targets)
    created_at: datetime = attrs.field(factory=utcnow, validator=_aware)
    shell: Shell = attrs.field(default=Shell.AUTO, converter=_to_shell)
    run_as_user: bool = attrs.field(default=False)
    timeout: float = attrs.field(default=300.0, validator=_positive_timeout)
    not_before: datetime | None = attrs.field(default=None, validator=_aware)
    expires_at: datetime | None = attrs.field(default=None, validator=_aware)
    max_attempts: int = attrs.field(default=3, validator=_attempts)
    delivery: Delivery = attrs.field(default=Delivery.AT_MOST_ONCE, converter=_to_delivery)
    select: Selector | None = attrs.field(default=None, converter=_to_selector)
    continuous: bool = False
    rollout: Rollout = attrs.field(factory=lambda: _NO_ROLLOUT, converter=_to_rollout)
    success_exit_codes: tuple[int, ...] = attrs.field(
        default=(0,), converter=_exit_codes, validator=_check_exit_codes
    )

    @run_as_user.validator
    def _check_bool(self, attribute: attrs.Attribute[bool], value: bool) -> None:
        if not isinstance(value, bool):
            raise ValidationError(attribute.name, "must be true or false")

    def __attrs_post_init__(self) -> None:
        if (
            self.not_before is not None
            and self.expires_at is not None
            and self.expires_at <= self.not_before
        ):
            raise ValidationError("expires_at", "must be later than not_before")
        if self.select is not None and not isinstance(self.select, Selector):
            raise ValidationError("select", "must be a Selector")
        if not isinstance(self.rollout, Rollout):
            raise ValidationError("rollout", "must be a Rollout")
        if not isinstance(self.continuous, bool):
            raise ValidationError("continuous", "must be true or false")
        if self.continuous and self.select is None:
            raise ValidationError("continuous", "needs a selector (select) to follow")
        if not self.targets and self.select is None:
            raise ValidationError("targets", "must name at least one device (or select some)")

    def succeeded(self, exit_code: int | None) -> bool:
        """True if ``exit_code`` means success for this task."""
        return exit_code is not None and exit_code in self.success_exit_codes

    def first_runs(
        self, now: datetime | None = None, nodes: Sequence[str] | None = None
    ) -> list[Run]:
        """The pending runs this task starts with: one per node of ``nodes`` (default:
        its targets), in that order."""
        nodes = self.targets if nodes is None else nodes
        if not nodes:
            return []
        queued = now or utcnow()
        first = Run(
            task_id=self.id,
            node_id=nodes[0],
            queued_at=queued,
            available_at=self.not_before or queued,
            expires_at=self.expires_at,
        )
        # the others differ only in node_id, which this task validated: don't validate
        # every field of every run again (a task may have thousands of targets)
        values = attrs.asdict(first, recurse=False)
        return [first, *(trusted(Run, **{**values, "node_id": node}) for node in nodes[1:])]


@attrs.frozen(order=True)
class RunKey:
    """Identifies one run: a task and one of its target devices."""

    task_id: str
    node_id: str

    def __str__(self) -> str:
        return f"{self.task_id}/{self.node_id}"


@attrs.frozen(kw_only=True)
class Run:
    """One (task, device) pair and everything known about its execution.

    ``attempts`` counts the times the command was handed to the device (or may have
    been); ``undelivered`` counts dispatches that certainly did not reach it (device
    not connected, agent busy), which are retried without using up ``max_attempts``.
    ``output`` is capped: when ``output_truncated`` is true the middle was cut and the
    head and tail kept. ``recovered``: the outcome of the latest attempt was read back
    from the device's journal after GhostRunner had lost the reply (a crash, an outage).
    """

    task_id: str
    node_id: str
    state: RunState = attrs.field(default=RunState.PENDING, converter=_to_state)
    attempts: int = 0
    undelivered: int = 0
    queued_at: datetime = attrs.field(factory=utcnow, validator=_aware)
    available_at: datetime = attrs.field(factory=utcnow, validator=_aware)
    expires_at: datetime | None = attrs.field(default=None, validator=_aware)
    started_at: datetime | None = attrs.field(default=None, validator=_aware)
    finished_at: datetime | None = attrs.field(default=None, validator=_aware)
    exit_code: int | None = None
    output: str = ""
    output_truncated: bool = False
    error: str | None = None
    recovered: bool = False

    @property
    def key(self) -> RunKey:
        """This run's :class:`RunKey`."""
        return RunKey(self.task_id, self.node_id)

    @property
    def terminal(self) -> bool:
        """True once the run can never change again."""
        return self.state.terminal


@attrs.frozen(kw_only=True)
class Attempt:
    """One time a run's command was handed to its device, and what came of it: a run
    keeps its latest attempt's fields itself, and every attempt in its history."""

    number: int
    state: RunState
    """succeeded, failed or timed_out; lost if its outcome is unknown (and, under
    at_least_once, it was sent again)."""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    output: str = ""
    output_truncated: bool = False
    error: str | None = None
    recovered: bool = False
    """The outcome was read back from the device's journal (the reply had been lost)."""


class TaskStatus(enum.StrEnum):
    """A task's overall status, derived from its runs' states."""

    PENDING = "pending"
    """No run has started yet (some may have been cancelled)."""
    RUNNING = "running"
    """Some runs have started or finished, others are still active."""
    PAUSED = "paused"
    """Paused by an operator with runs still active: nothing new starts."""
    ABORTED = "aborted"
    """Stopped by its rollout's abort rule (or an operator): runs not started were
    cancelled."""
    SUCCEEDED = "succeeded"
    """Every run succeeded."""
    CANCELLED = "cancelled"
    """Every run was cancelled."""
    FAILED = "failed"
    """Every run is terminal and at least one did not succeed."""


def task_status(
    counts: Mapping[RunState, int], *, paused: bool = False, aborted: bool = False
) -> TaskStatus:
    """The overall status of a task whose runs are in ``counts``."""
    total = sum(counts.values())
    pending = counts.get(RunState.PENDING, 0)
    active = pending + counts.get(RunState.DISPATCHED, 0)
    if aborted:
        return TaskStatus.ABORTED
    if paused and (active or total == 0):
        return TaskStatus.PAUSED
    if total == 0 or (pending + counts.get(RunState.CANCELLED, 0) == total and pending):
        return TaskStatus.PENDING
    if active:
        return TaskStatus.RUNNING
    if counts.get(RunState.SUCCEEDED, 0) == total:
        return TaskStatus.SUCCEEDED
    if counts.get(RunState.CANCELLED, 0) == total:
        return TaskStatus.CANCELLED
    return TaskStatus.FAILED


@attrs.frozen(kw_only=True)
class TaskSummary:
    """A task with the number of its runs in each state, and what operators (or its
    rollout) did to it: ``paused``, ``aborted`` (the reason) and ``closed`` (no run is
    added to it any more: cancelled as a whole, or aborted)."""

    task: Task
    counts: Mapping[RunState, int]
    paused: bool = False
    aborted: str | None = None
    closed: bool = False

    @property
    def status(self) -> TaskStatus:
        """The task's overall status (see :class:`TaskStatus`)."""
        return task_status(self.counts, paused=self.paused, aborted=self.aborted is not None)


@attrs.frozen(kw_only=True)
class TaskQuery:
    """Filters and pagination for listing tasks, newest first.

    Args:
        limit: page size, 1 to 1000.
        cursor: the ``next_cursor`` of the previous page.
        state: only tasks having at least one run in this state.
        status: only tasks whose overall status is this.
        node_id: only tasks targeting this device.
        name: only tasks with exactly this name.
    """

    limit: int = attrs.field(default=50)
    cursor: str | None = None
    state: RunState | None = None
    status: TaskStatus | None = None
    node_id: str | None = None
    name: str | None = None

    @limit.validator
    def _check_limit(self, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not (1 <= value <= 1000):
            raise ValidationError("limit", "must be an integer between 1 and 1000")


@attrs.frozen(kw_only=True)
class Page:
    """One page of a listing; ``next_cursor`` is None on the last page."""

    items: tuple[TaskSummary, ...]
    next_cursor: str | None = None


# --------------------------------------------------------------------------- devices


def _tag_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class Device:
    """A device as the executor sees it.

    ``online`` means ready to take a command now (for MeshCentral: agent connected and
    its start-up finished), not merely "seen on the network". ``group_id`` and
    ``group_name`` name its device group (MeshCentral: ``mesh//...`` and the group's
    name), ``tags`` are its tags, ``os`` describes its operating system: what task
    selectors match on.
    """

    node_id: str
    name: str = ""
    online: bool = False
    group_id: str | None = None
    group_name: str | None = None
    tags: tuple[str, ...] = attrs.field(default=(), converter=_tag_tuple)
    os: str | None = None
    agent_kind: AgentKind = AgentKind.UNKNOWN
    _folded: frozenset[str] | None = attrs.field(
        default=None, init=False, repr=False, eq=False
    )

    @property
    def folded_tags(self) -> frozenset[str]:
        """The tags, case-folded (what selectors compare), computed once."""
        if self._folded is None:
            object.__setattr__(self, "_folded", frozenset(t.casefold() for t in self.tags))
        assert self._folded is not None
        return self._folded


class EventKind(enum.StrEnum):
    """What changed in the executor's view of the devices."""

    ONLINE = "online"
    OFFLINE = "offline"
    CHANGED = "changed"
    REMOVED = "removed"
    RESYNC = "resync"
    """The whole view was refreshed (e.g. after a reconnect): recompute everything."""


@attrs.frozen(kw_only=True)
class DeviceEvent:
    """A change in who is online. Only wakes the loop, which then looks at the state."""

    kind: EventKind
    node_id: str | None = None


# --------------------------------------------------------------------------- dispatch


@attrs.frozen(kw_only=True)
class RunRequest:
    """What the loop asks an executor to run: one command on one device."""

    task_id: str
    node_id: str
    command: str
    shell: Shell = Shell.AUTO
    run_as_user: bool = False
    timeout: float = 300.0
    attempt: int = 1
    delivery: Delivery = Delivery.AT_MOST_ONCE
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    """Characters of output the loop keeps (head and tail). An executor that can bound
    the output on the device, before it crosses the network, should use it; the loop
    caps whatever comes back to it anyway."""
    recover: bool = False
    """This attempt may have reached the device already (GhostRunner lost its reply):
    report its outcome if the device knows it, run it only if the device proves it
    never started, never run it twice. An executor that keeps no record on the device
    raises ``OutcomeUnknown`` (not recoverable)."""

    @property
    def key(self) -> RunKey:
        """The run this request is for."""
        return RunKey(self.task_id, self.node_id)


@attrs.frozen(kw_only=True)
class Outcome:
    """What happened when a command ran on a device.

    ``exit_code`` is None only when ``timed_out`` is true (the command was killed).
    """

    exit_code: int | None
    output: str = ""
    output_truncated: bool = False
    timed_out: bool = False
    started_at: datetime | None = attrs.field(default=None, validator=_aware)
    finished_at: datetime | None = attrs.field(default=None, validator=_aware)
    recovered: bool = False
    """Read back from the device's record of an earlier dispatch of this attempt: the
    command was not run again."""

    @property
    def state(self) -> RunState:
        """The terminal run state this outcome leads to."""
        if self.timed_out:
            return RunState.TIMED_OUT
        return RunState.SUCCEEDED if self.exit_code == 0 else RunState.FAILED


_T = TypeVar("_T")


def trusted(cls: type[_T], **values: Any) -> _T:
    """Build an attrs instance from values a store wrote itself, skipping validators and
    converters (they ran when the value was first made). Every field must be given.

    For backends only: reading 100 tasks for a page spends most of its time validating
    them again otherwise.
    """
    inst = object.__new__(cls)
    fields = attrs.fields(cls)  # type: ignore[arg-type]
    if len(values) != len(fields):
        missing = {f.name for f in fields} - set(values)
        raise TypeError(f"trusted({cls.__name__}) needs every field; missing {missing}")
    for name, value in values.items():
        object.__setattr__(inst, name, value)
    return inst


@attrs.frozen
class RetryPolicy:
    """How long a run waits before it is sent again: ``base`` seconds, doubled after
    each retry, never more than ``cap``."""

    base: float = 1.0
    cap: float = 60.0

    def __attrs_post_init__(self) -> None:
        if not (self.base > 0 and self.cap > 0):  # also refuses NaN
            raise ValueError("retry base and cap must be positive numbers of seconds")

    def delay(self, n: int) -> timedelta:
        """The wait before the n-th retry: ``base * 2**(n-1)`` seconds, capped."""
        return timedelta(seconds=min(self.cap, self.base * (2 ** max(0, n - 1))))

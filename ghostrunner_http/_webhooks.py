"""Signed webhooks: what they are (:class:`Webhook`, :class:`DeliveryPolicy`), how they
are signed (the Standard Webhooks scheme), the outbox a store keeps for them
(:class:`WebhookStore`), and the event log they read (:class:`EventSource`).

The worker that takes events into the outbox and sends them is ``_delivery``.

**Signing** (Standard Webhooks 1.0, symmetric): the secret is ``whsec_`` + base64 of
24 to 64 random bytes, the HMAC key being those bytes; each attempt is POSTed with the
headers ``webhook-id`` (the message id, the same on every attempt), ``webhook-timestamp``
(the attempt's time, integer Unix seconds) and ``webhook-signature``: ``v1,`` + base64
of HMAC-SHA256(key, ``{id}.{timestamp}.{body}``).

**Message ids** are ``msg_<event id>_<10 random characters>``, chosen when the event
is taken into the outbox and kept with the delivery: every attempt of a delivery, and a
retry an operator asks for, carries the same id, and no two deliveries ever share one,
even across a database that was reset (its event ids start again at 1: a receiver that
remembers ``msg_1`` must not drop the new event 1).

**The event log** is the core's (``Store.events_after`` and ``Store.last_event_id``):
this module only states, structurally, what it needs of an event and of its source, so
that any store with an event log is a source.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import fnmatch
import hashlib
import hmac
import inspect
import json
import math
import random
import re
import secrets
import urllib.parse
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

import attrs

from ghostrunner.webhooks import (
    DeliveryPage,
    DeliveryQuery,
    DeliveryStatus,
    NewDelivery,
    WebhookDelivery,
)

__all__ = [
    "DEFAULT_SCHEDULE",
    "DeliveryPolicy",
    "EventLike",
    "EventSource",
    "Webhook",
    "WebhookStore",
    "derive_name",
    "event_source",
    "new_msg_id",
    "next_attempt",
    "parse_retry_after",
    "parse_secret",
    "payload",
    "render_delivery",
    "render_webhooks",
    "retry_delay",
    "sign",
]

#: the secret's prefix, and the sizes of its key the specification allows
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64

#: The Standard Webhooks specification's example schedule: the delay (seconds) before
#: attempts 2, 3, ... (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h: ten
#: attempts over about 3 days and 4 hours).
DEFAULT_SCHEDULE: tuple[float, ...] = (
    5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
#: an events filter: dot-separated names with ``*`` (any characters) and ``?`` (one)
_PATTERN = re.compile(r"^[A-Za-z0-9_.*?-]{1,200}$")


# --------------------------------------------------------------------------- events


@runtime_checkable
class EventLike(Protocol):
    """What a webhook needs of an event of the core's event log."""

    @property
    def id(self) -> int:
        """Increasing in commit order."""

    @property
    def at(self) -> datetime: ...

    @property
    def kind(self) -> str:
        """``run.finished``, ``task.created``..."""

    @property
    def task_id(self) -> str: ...

    @property
    def node_id(self) -> str | None: ...

    @property
    def data(self) -> Mapping[str, Any]:
        """JSON-able."""


class EventSource(Protocol):
    """The event log: a store with ``events_after`` and ``last_event_id``."""

    async def events_after(self, after_id: int, limit: int, /) -> Sequence[EventLike]:
        """Up to ``limit`` events with an id above ``after_id``, in id order (called
        positionally: the store may name its parameters as it likes). Ids must become
        visible in increasing order (a reader that has seen id n never sees a lower id
        appear later): the cursor relies on it."""

    async def last_event_id(self) -> int:
        """The id of the newest event (0 when there is none)."""


def event_source(store: object) -> EventSource | None:
    """``store`` if it keeps an event log (has ``events_after`` and
    ``last_event_id``), else None."""
    if callable(getattr(store, "events_after", None)) and callable(
            getattr(store, "last_event_id", None)):
        return store  # type: ignore[return-value]
    return None


async def last_event_id(source: EventSource) -> int:
    """``source.last_event_id()``, whether the source answers it at once or awaits."""
    found: Any = source.last_event_id()
    if inspect.isawaitable(found):
        found = await found
    return int(found)


# --------------------------------------------------------------------------- the outbox


@runtime_checkable
class WebhookStore(Protocol):
    """The webhook outbox. Same rules as ``ghostrunner.Store``: every method atomic and
    durable, only GhostRunner's errors. Several processes may share it (PostgreSQL):
    the cursor moves by compare-and-set, and a delivery is claimed by one process at a
    time (a lease)."""

    async def webhook_cursor(self, webhook: str, start: int) -> int:
        """The id of the last event taken into ``webhook``'s outbox. A webhook not known
        yet is recorded with ``start`` (and that is returned)."""

    async def webhook_cursors(self) -> Mapping[str, int]:
        """Every webhook's cursor."""

    async def enqueue_deliveries(self, webhook: str, after: int, upto: int,
                                 deliveries: Sequence[NewDelivery], now: datetime) -> bool:
        """In one transaction: if ``webhook``'s cursor is ``after``, add ``deliveries``
        (pending, due at ``now``; an event the webhook has a delivery for already is
        skipped) and set the cursor to ``upto``, and return True. If the cursor is not
        ``after`` (another process took these events), change nothing and return
        False."""

    async def claim_deliveries(self, webhook: str, now: datetime, lease_until: datetime,
                               limit: int) -> Sequence[WebhookDelivery]:
        """Up to ``limit`` pending deliveries of ``webhook`` that are due at ``now`` and
        not leased (or their lease ended), earliest due first: each gets one more
        attempt and a lease until ``lease_until``, and is returned so. No two calls, in
        any process, get the same delivery while its lease runs."""

    async def finish_delivery(self, delivery_id: int, attempt: int, now: datetime, *,
                              status: DeliveryStatus, next_attempt_at: datetime | None,
                              http_status: int | None, error: str | None) -> bool:
        """Record how attempt number ``attempt`` went, and end its lease: ``delivered``,
        ``failed`` (given up), or ``pending`` again, due at ``next_attempt_at``. Applied
        only while the delivery is pending and ``attempt`` is its latest attempt (a
        delivered one while it is pending, whatever the attempt). Returns whether it
        was applied. ``error`` is clipped (``ghostrunner.webhooks.clip_error``)."""

    async def query_deliveries(self, query: DeliveryQuery) -> DeliveryPage:
        """The deliveries matching ``query``, newest first (highest id first). Raises
        ``ValidationError`` (field ``cursor``) for a cursor it did not give."""

    async def retry_delivery(self, delivery_id: int, now: datetime) -> WebhookDelivery:
        """Make a failed delivery pending again, due at ``now``, with a new schedule
        (attempts counted from 0, ``started_at`` = ``now``); the same message id.
        Raises ``NotFound``, or ``IllegalTransition`` if it is not failed."""

    async def prune_deliveries(self, delivered_before: datetime,
                               failed_before: datetime) -> int:
        """Remove the deliveries delivered before ``delivered_before`` and those given
        up before ``failed_before``; returns how many."""

    async def delivery_counts(self) -> Mapping[str, Mapping[DeliveryStatus, int]]:
        """How many deliveries each webhook has in each status (zero counts left
        out)."""


# --------------------------------------------------------------------------- settings


def parse_secret(text: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret. Raises ValueError (whose message
    never repeats the secret)."""
    if not isinstance(text, str) or not text.startswith(SECRET_PREFIX):
        raise ValueError(f"must be a Standard Webhooks secret: {SECRET_PREFIX} followed by "
                         "base64")
    encoded = text[len(SECRET_PREFIX):].strip()
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SECRET_PREFIX} is not valid base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"must hold {MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes "
                         f"(this one holds {len(key)})")
    return key


def new_secret() -> str:
    """A new random secret (32 bytes), in the ``whsec_`` form."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL: what logs and reprs show of it (a receiver's
    path or query may hold a secret of its own)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def derive_name(url: str) -> str:
    """A webhook's default name: its URL's host (and port, if written), in the
    characters a name may have."""
    parts = urllib.parse.urlsplit(url)
    host = re.sub(r"[^A-Za-z0-9._-]", "-", parts.hostname or "").strip("-._") or "webhook"
    try:
        port = parts.port
    except ValueError:
        port = None
    return (host[:90] + (f":{port}" if port else ""))


def check_url(url: str) -> str | None:
    """What is wrong with a webhook URL, or None."""
    if not isinstance(url, str) or not url:
        return "is required"
    if len(url) > 2048:
        return "must be at most 2048 characters"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return ("must not hold a user or password (the signature authenticates "
                "GhostRunner to the receiver)")
    if parts.fragment:
        return "must not have a #fragment"
    if port == 0:
        return "must not use port 0"
    return None


@attrs.frozen(kw_only=True)
class Webhook:
    """A receiver of signed events (a ``[[webhooks]]`` table of the configuration).

    Args:
        name: identifies it in the outbox (its cursor and deliveries) and the API;
            default: the URL's host. Renaming a webhook starts a new outbox.
        url: where the events are POSTed (http or https). Only its origin appears in
            reprs and logs.
        key: the HMAC key (the decoded ``whsec_`` secret); never in reprs.
        events: which events it gets: kinds (``run.finished``) or globs (``run.*``);
            default every event.
        timeout: seconds an attempt may take, from connecting to the answer's end.
        concurrency: its attempts in flight at once, at most.
    """

    name: str
    url: str = attrs.field(repr=_origin)
    key: bytes = attrs.field(repr=False)
    events: tuple[str, ...] = ("*",)
    timeout: float = 15.0
    concurrency: int = 4

    def __attrs_post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError("name must be 1 to 100 letters, digits, '.', '_', ':' or '-', "
                             "starting with a letter or digit")
        problem = check_url(self.url)
        if problem is not None:
            raise ValueError(f"url {problem}")
        if not MIN_KEY_BYTES <= len(self.key) <= MAX_KEY_BYTES:
            raise ValueError("the key must be 24 to 64 bytes")
        if not self.events:
            raise ValueError("events must name at least one kind (or '*')")
        for pattern in self.events:
            if not _PATTERN.match(pattern):
                raise ValueError(f"events: {pattern!r} is not an event kind or a glob "
                                 "(letters, digits, '_', '-', '.', '*', '?')")
        if not 0 < self.timeout <= 300 or math.isnan(self.timeout):
            raise ValueError("timeout must be > 0 and <= 300 seconds")
        if not 1 <= self.concurrency <= 1000:
            raise ValueError("concurrency must be between 1 and 1000")

    @property
    def origin(self) -> str:
        """``scheme://host[:port]`` of its URL."""
        return _origin(self.url)

    def wants(self, kind: str) -> bool:
        """Whether an event of ``kind`` goes to this webhook."""
        return any(fnmatch.fnmatchcase(kind, p) for p in self.events)


@attrs.frozen(kw_only=True)
class DeliveryPolicy:
    """How the outbox is worked (the ``[webhook_delivery]`` table).

    Args:
        schedule: seconds to wait before attempt 2, 3, ...; past its end the last delay
            repeats. Each delay is stretched or shrunk by up to ``jitter`` (a fraction).
        max_attempts: attempts before a delivery is given up (``failed``).
        max_age: seconds after which a delivery is given up, whatever its attempts
            (counted from when it was taken in, or retried by an operator).
        concurrency: attempts in flight at once, all webhooks together.
        retention_days: delivered deliveries are removed this long after delivery.
        failed_retention_days: failed ones, this long after they were given up.
        poll_interval: seconds between two looks at the event log and the outbox when
            nothing wakes the worker.
        batch: events read, and deliveries claimed, at once.
    """

    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    jitter: float = 0.1
    max_attempts: int = len(DEFAULT_SCHEDULE) + 1
    max_age: float = 4 * 86400.0
    concurrency: int = 16
    retention_days: float = 7.0
    failed_retention_days: float = 30.0
    poll_interval: float = 1.0
    batch: int = 100

    def __attrs_post_init__(self) -> None:
        if not self.schedule or not all(
                isinstance(s, int | float) and math.isfinite(s) and 0 <= s <= 7 * 86400
                for s in self.schedule):
            raise ValueError("schedule must be a list of seconds, each 0 to 604800")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        if not 1 <= self.max_attempts <= 1000:
            raise ValueError("max_attempts must be between 1 and 1000")
        if not 0 < self.max_age <= 365 * 86400:
            raise ValueError("max_age must be > 0 and at most a year (in seconds)")
        if not 1 <= self.concurrency <= 1000:
            raise ValueError("concurrency must be between 1 and 1000")
        for name in ("retention_days", "failed_retention_days"):
            if not 0 < getattr(self, name) <= 100_000:
                raise ValueError(f"{name} must be > 0 and <= 100000")
        if not 0.01 <= self.poll_interval <= 3600:
            raise ValueError("poll_interval must be between 0.01 and 3600 seconds")
        if not 1 <= self.batch <= 10_000:
            raise ValueError("batch must be between 1 and 10000")


# --------------------------------------------------------------------------- messages


def new_msg_id(event_id: int) -> str:
    """A message id for an event's delivery (see the module's docstring)."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return f"msg_{event_id}_" + "".join(secrets.choice(alphabet) for _ in range(10))


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_finite(v) for v in value]
    return value


def payload(event: EventLike) -> str:
    """The body POSTed for ``event`` (compact JSON, UTF-8):
    ``{"type": kind, "timestamp": when it happened, "data": the event}``.

    Never raises: an event whose data JSON cannot hold (NaN, a cycle) still gets a body
    (NaN as null; else its data replaced by an ``error``), so that one odd event cannot
    hold up every later one."""
    def doc(data: Any) -> dict[str, Any]:
        return {
            "type": event.kind,
            "timestamp": _iso(event.at),
            "data": {
                "id": event.id,
                "kind": event.kind,
                "at": _iso(event.at),
                "task_id": event.task_id,
                "node_id": event.node_id,
                "data": data,
            },
        }

    def dumps(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                          default=_jsonable, allow_nan=False)

    try:
        return dumps(doc(dict(event.data)))
    except (ValueError, TypeError, RecursionError):
        pass
    try:
        return dumps(doc(_finite(dict(event.data))))
    except (ValueError, TypeError, RecursionError):
        return dumps(doc({"error": "the event's data could not be encoded as JSON"}))


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` + base64 HMAC-SHA256 of
    ``{msg_id}.{timestamp}.{body}``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# --------------------------------------------------------------------------- retries


def retry_delay(policy: DeliveryPolicy, attempts: int, rng: random.Random) -> float:
    """Seconds to wait after ``attempts`` failed attempts (1 or more): the schedule's
    delay, jittered."""
    base = policy.schedule[min(attempts, len(policy.schedule)) - 1]
    return max(0.0, base * (1 + policy.jitter * (2 * rng.random() - 1)))


def next_attempt(policy: DeliveryPolicy, delivery: WebhookDelivery, now: datetime,
                 rng: random.Random, *, retry_after: float | None = None
                 ) -> datetime | None:
    """When to try ``delivery`` again after its latest attempt failed at ``now``, or
    None to give up (its attempts or its age are used up). A receiver's
    ``Retry-After`` lengthens the wait (never beyond the maximum age)."""
    if delivery.attempts >= policy.max_attempts:
        return None
    give_up_at = delivery.started_at + timedelta(seconds=policy.max_age)
    delay = retry_delay(policy, max(1, delivery.attempts), rng)
    if retry_after is not None:
        delay = max(delay, retry_after)
    at = now + timedelta(seconds=delay)
    if at > give_up_at:
        return None
    return at


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date),
    at most a day; None if absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return min(float(text), 86400.0)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - now).total_seconds()), 86400.0)


def wanted(webhooks: Collection[Webhook], kind: str) -> list[Webhook]:
    """The webhooks an event of ``kind`` goes to."""
    return [w for w in webhooks if w.wants(kind)]


# --------------------------------------------------------------------------- rendering


def _iso_or_none(value: datetime | None) -> str | None:
    return None if value is None else _iso(value)


def render_delivery(delivery: WebhookDelivery, now: datetime) -> dict[str, Any]:
    """A delivery as ``GET /webhooks/deliveries`` shows it (not its body)."""
    return {
        "id": delivery.id,
        "webhook": delivery.webhook,
        "event_id": delivery.event_id,
        "kind": delivery.kind,
        "msg_id": delivery.msg_id,
        "status": delivery.status.value,
        "sending": delivery.sending(now),
        "attempts": delivery.attempts,
        "created_at": _iso(delivery.created_at),
        "started_at": _iso(delivery.started_at),
        "next_attempt_at": _iso_or_none(delivery.next_attempt_at),
        "last_attempt_at": _iso_or_none(delivery.last_attempt_at),
        "last_status": delivery.last_status,
        "last_error": delivery.last_error,
        "finished_at": _iso_or_none(delivery.finished_at),
    }


def render_webhooks(configured: Sequence[Webhook], cursors: Mapping[str, int],
                    counts: Mapping[str, Mapping[DeliveryStatus, int]]) -> list[dict[str, Any]]:
    """Every webhook the configuration or the outbox knows, for ``GET /webhooks``:
    configured ones first (in their order), then those only the outbox remembers."""
    rows = []
    names = [w.name for w in configured]
    names += sorted((set(cursors) | set(counts)) - set(names))
    by_name = {w.name: w for w in configured}
    for name in names:
        hook = by_name.get(name)
        found = counts.get(name, {})
        rows.append({
            "name": name,
            "configured": hook is not None,
            "url": None if hook is None else hook.origin,
            "events": [] if hook is None else list(hook.events),
            "cursor": cursors.get(name),
            "counts": {s.value: found.get(s, 0) for s in DeliveryStatus},
        })
    return rows

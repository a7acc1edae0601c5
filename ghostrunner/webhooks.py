"""Webhook outbox records: what a store that keeps the HTTP server's webhook outbox
stores.

The queue knows nothing of webhooks: the HTTP package (``ghostrunner_http``) signs and
sends them and owns the ``WebhookStore`` protocol (``ghostrunner_http._webhooks``).
These values live here, beside ``audit`` and ``tokens``, so that a store can keep the
outbox without importing the HTTP package (the three shipped stores do).

The outbox holds, per webhook, a **cursor** (the id of the last event taken into it) and
one **delivery** per (webhook, event): the body to send, its message id (the
``webhook-id`` header, the same on every attempt), and where its delivery stands.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime

import attrs

from ._types import _aware, _member

__all__ = [
    "DeliveryPage",
    "DeliveryQuery",
    "DeliveryStatus",
    "NewDelivery",
    "WebhookDelivery",
]

#: the longest error text kept of an attempt
MAX_ERROR = 500


class DeliveryStatus(enum.StrEnum):
    """Where a delivery stands: ``pending`` (to send, or to send again),
    ``delivered`` (a 2xx answer), ``failed`` (given up)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


def _to_status(value: object) -> DeliveryStatus:
    return _member(DeliveryStatus, "status", value)


def clip_error(value: str | None) -> str | None:
    """At most :data:`MAX_ERROR` characters of one line of printable text, storable by
    every store (no NUL, no lone surrogate, no control character)."""
    if value is None:
        return None
    text = "".join(c if c.isprintable() else " " for c in value[:MAX_ERROR])
    return text.encode("utf-8", "replace").decode("utf-8")


@attrs.frozen(kw_only=True)
class NewDelivery:
    """One event to send to one webhook, as the outbox takes it in.

    ``body`` is the JSON document sent (and signed) on every attempt; ``msg_id`` the
    ``webhook-id`` header, stable across retries.
    """

    event_id: int
    kind: str
    msg_id: str
    body: str


@attrs.frozen(kw_only=True)
class WebhookDelivery:
    """A delivery of the outbox (``id`` given by the store, increasing).

    ``attempts`` counts the attempts started (a claim counts one: a process that died
    while sending had perhaps sent it). ``next_attempt_at`` is when a pending delivery
    is due (None once delivered or failed); ``lease_until`` is set while a process is
    sending it (no other process claims it before then); ``started_at`` is when its
    retry schedule began (its creation, or an operator's retry): the maximum age counts
    from it. ``last_status`` and ``last_error`` describe the latest failed attempt (the
    HTTP status, or what went wrong: never a secret); ``finished_at`` is when it was
    delivered or given up.
    """

    id: int
    webhook: str
    event_id: int
    kind: str
    msg_id: str
    body: str
    status: DeliveryStatus = attrs.field(converter=_to_status)
    attempts: int = 0
    created_at: datetime = attrs.field(validator=_aware)
    started_at: datetime = attrs.field(validator=_aware)
    next_attempt_at: datetime | None = attrs.field(default=None, validator=_aware)
    lease_until: datetime | None = attrs.field(default=None, validator=_aware)
    last_attempt_at: datetime | None = attrs.field(default=None, validator=_aware)
    last_status: int | None = None
    last_error: str | None = None
    finished_at: datetime | None = attrs.field(default=None, validator=_aware)

    def sending(self, now: datetime) -> bool:
        """Whether a process holds it (claimed, its lease running) at ``now``."""
        return (self.status is DeliveryStatus.PENDING and self.lease_until is not None
                and self.lease_until > now)


@attrs.frozen(kw_only=True)
class DeliveryQuery:
    """Which deliveries to list, newest first (highest id first). Every filter given
    must match; ``cursor`` is the ``next_cursor`` of the previous page."""

    webhook: str | None = None
    status: DeliveryStatus | None = attrs.field(
        default=None, converter=attrs.converters.optional(_to_status))
    event_id: int | None = None
    limit: int = 100
    cursor: str | None = None

    def before_id(self) -> int | None:
        """The cursor as the id deliveries must be below. Raises ValueError."""
        if self.cursor is None:
            return None
        value = int(self.cursor)
        if value < 0:
            raise ValueError("negative cursor")
        return value

    def matches(self, delivery: WebhookDelivery) -> bool:
        """Whether ``delivery`` passes the filters (not the cursor): the in-memory
        store's query, and the definition the SQL stores follow."""
        return ((self.webhook is None or delivery.webhook == self.webhook)
                and (self.status is None or delivery.status is self.status)
                and (self.event_id is None or delivery.event_id == self.event_id))


@attrs.frozen
class DeliveryPage:
    """A page of deliveries, newest first, and the cursor of the next (None: the last)."""

    items: Sequence[WebhookDelivery]
    next_cursor: str | None = None

"""Audit log records: what a store that keeps the HTTP API's audit log stores.

The queue has no notion of who asked for what: the HTTP package (``ghostrunner_http``)
records every write it answers (API, console, and the CLI through the API) and owns the
``AuditStore`` protocol. These values live here, beside ``tokens``, so that a store can
keep the log without importing the HTTP package (the three shipped stores do).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import attrs

from ._types import _aware

__all__ = ["AuditEntry", "AuditPage", "AuditQuery"]

#: the longest value kept of a free-text field (route, token name, address, task id)
MAX_FIELD = 1024


def _clip(value: str | None) -> str | None:
    """At most :data:`MAX_FIELD` characters of text every store can hold (no NUL, no
    lone surrogate: they come from URLs as the client sent them)."""
    if value is None:
        return None
    if value.isascii() and len(value) <= MAX_FIELD and "\x00" not in value:
        return value  # (most values: nothing to clip)
    value = value[:MAX_FIELD].replace("\x00", "\ufffd")
    return value.encode("utf-8", "replace").decode("utf-8")


def _counts(value: Mapping[str, int] | None) -> Mapping[str, int]:
    return dict(sorted((value or {}).items()))


@attrs.frozen(kw_only=True)
class AuditEntry:
    """One write answered by the HTTP server, whatever its result.

    ``token`` is the *name* of the token that made it (None when no valid token was
    given); a secret or its hash is never part of an entry. ``route`` is the route's
    template (``/tasks/{task_id}/retry``), ``task_id`` the task it was about, if any;
    ``counts`` what it touched (``{"runs": 3}``...). ``id`` is given by the store
    (increasing: the newest entry has the highest).
    """

    at: datetime = attrs.field(validator=_aware)
    method: str
    route: str = attrs.field(converter=_clip)
    status: int
    token: str | None = attrs.field(default=None, converter=_clip)
    address: str | None = attrs.field(default=None, converter=_clip)
    task_id: str | None = attrs.field(default=None, converter=_clip)
    counts: Mapping[str, int] = attrs.field(factory=dict, converter=_counts)
    id: int | None = None


@attrs.frozen(kw_only=True)
class AuditQuery:
    """Which entries to list, newest first. Every filter given must match.

    ``status_class`` is the first digit of the status (2: succeeded, 4: refused...);
    ``since`` is inclusive, ``until`` exclusive; ``cursor`` is the ``next_cursor`` of
    the previous page.
    """

    token: str | None = None
    route: str | None = None
    task_id: str | None = None
    since: datetime | None = attrs.field(default=None, validator=_aware)
    until: datetime | None = attrs.field(default=None, validator=_aware)
    status_class: int | None = None
    limit: int = 100
    cursor: str | None = None

    def before_id(self) -> int | None:
        """The cursor as the id entries must be below. Raises ValueError."""
        if self.cursor is None:
            return None
        value = int(self.cursor)
        if value < 0:
            raise ValueError("negative cursor")
        return value

    def matches(self, entry: AuditEntry) -> bool:
        """Whether ``entry`` passes the filters (not the cursor): the in-memory store's
        query, and the definition the SQL stores follow."""
        return (
            (self.token is None or entry.token == self.token)
            and (self.route is None or entry.route == self.route)
            and (self.task_id is None or entry.task_id == self.task_id)
            and (self.since is None or entry.at >= self.since)
            and (self.until is None or entry.at < self.until)
            and (self.status_class is None or entry.status // 100 == self.status_class)
        )


@attrs.frozen
class AuditPage:
    """A page of entries, newest first, and the cursor of the next (None: the last)."""

    items: Sequence[AuditEntry]
    next_cursor: str | None = None

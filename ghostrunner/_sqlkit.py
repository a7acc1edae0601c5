"""What the SQL stores (``sqlite``, ``postgres``) share: how a task's fleet fields are
kept as one JSON document, how each task status reads on a ``task_counts`` row, and how
a page of the audit log and of the webhook outbox is asked for.

One module, so that a database moved from one backend to the other (``ghostrunner db
migrate``) reads alike, and a status means the same SQL in both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Final

import attrs
import orjson

from ._types import Rollout, Selector, Task, TaskStatus
from .audit import AuditQuery
from .errors import ValidationError
from .webhooks import DeliveryQuery

__all__ = ["AUDIT_COLS", "DELIVERY_COLS", "STATUS_SQL", "audit_sql", "deliveries_sql",
           "fleet_fields", "fleet_json", "json_text"]

_PLAIN_ROLLOUT: Final = Rollout()


def json_text(value: Any) -> str:
    """``value`` as compact JSON text (a statement's JSON parameter): orjson, ten times
    faster than the standard library; the standard library for what orjson refuses (a
    lone surrogate, an integer beyond 64 bits: the database refuses them with a clear
    error)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def fleet_json(task: Task) -> str | None:
    """A task's selector, rollout and success exit codes as JSON; None for a plain task
    (most tasks: nothing to write, nothing to parse back)."""
    if (
        task.select is None and not task.continuous and task.rollout == _PLAIN_ROLLOUT
        and task.success_exit_codes == (0,)
    ):
        return None
    select = None if task.select is None else {
        "group": task.select.group, "tags": list(task.select.tags),
        "tags_mode": task.select.tags_mode.value, "os": task.select.os,
        "name": task.select.name, "all": task.select.all,
    }
    return json.dumps({
        "select": select,
        "continuous": task.continuous,
        "rollout": attrs.asdict(task.rollout),
        "success_exit_codes": list(task.success_exit_codes),
    }, separators=(",", ":"))


def fleet_fields(text: str | None) -> dict[str, Any]:
    """The Task fields a :func:`fleet_json` document holds (the defaults for None)."""
    if text is None:
        return {"select": None, "continuous": False, "rollout": _PLAIN_ROLLOUT,
                "success_exit_codes": (0,)}
    doc = json.loads(text)
    return {
        "select": None if doc["select"] is None else Selector(**doc["select"]),
        "continuous": doc["continuous"],
        "rollout": Rollout(**doc["rollout"]),
        "success_exit_codes": tuple(doc["success_exit_codes"]),
    }


# How each TaskStatus reads on a task_counts row (alias c); mirrors
# ghostrunner._types.task_status, in the same order of tests (tests/contract checks it on
# every store).
_ACTIVE = "c.pending + c.dispatched > 0"
_LIVE = "NOT c.aborted"
_NOT_PAUSED = f"NOT (c.paused AND ({_ACTIVE} OR c.total = 0))"
_WAITING = "(c.total = 0 OR (c.pending > 0 AND c.pending + c.cancelled = c.total))"
_SETTLED = f"{_LIVE} AND {_NOT_PAUSED} AND NOT {_WAITING} AND NOT ({_ACTIVE})"
STATUS_SQL: Final[Mapping[TaskStatus, str]] = {
    TaskStatus.ABORTED: "c.aborted",
    TaskStatus.PAUSED: f"{_LIVE} AND NOT {_NOT_PAUSED}",
    TaskStatus.PENDING: f"{_LIVE} AND {_NOT_PAUSED} AND {_WAITING}",
    TaskStatus.RUNNING: f"{_LIVE} AND {_NOT_PAUSED} AND NOT {_WAITING} AND {_ACTIVE}",
    TaskStatus.SUCCEEDED: f"{_SETTLED} AND c.succeeded = c.total",
    TaskStatus.CANCELLED: f"{_SETTLED} AND c.succeeded <> c.total AND c.cancelled = c.total",
    TaskStatus.FAILED: f"{_SETTLED} AND c.succeeded <> c.total AND c.cancelled <> c.total",
}


#: The columns of a ``webhook_deliveries`` row, in the order the stores read them.
DELIVERY_COLS: Final = (
    "id, webhook, event_id, kind, msg_id, body, status, attempts, created_at, started_at, "
    "next_attempt_at, lease_until, last_attempt_at, last_status, last_error, finished_at")


def deliveries_sql(query: DeliveryQuery, mark: str) -> tuple[str, list[Any]]:
    """The statement and parameters reading one page of ``query`` from the outbox,
    newest first, one row more than the page (there is a next page if it comes back);
    ``mark`` is the driver's placeholder (``?`` or ``%s``). Raises ``ValidationError``
    for a cursor this server did not give."""
    return _page_sql(
        DELIVERY_COLS, "webhook_deliveries", query.before_id, query.limit, mark,
        (("webhook", query.webhook), ("event_id", query.event_id),
         ("status", query.status and query.status.value)))


def _page_sql(
    cols: str, table: str, before_id: Callable[[], int | None], limit: int, mark: str,
    equal: Iterable[tuple[str, Any]], terms: Iterable[str] = (), values: Iterable[Any] = (),
) -> tuple[str, list[Any]]:
    """One page of ``table``, newest first (highest id first), one row more than
    ``limit``: the rows whose ``equal`` columns have their value (None: any), that match
    ``terms`` (taking ``values``), and come before the cursor (``before_id``, which
    raises ``ValueError`` for a cursor this server did not give: ``ValidationError``)."""
    try:
        before = before_id()
    except ValueError:
        raise ValidationError("cursor", "is not a cursor this server gave") from None
    where: list[str] = []
    params: list[Any] = []
    for column, value in equal:
        if value is not None:
            where.append(f"{column} = {mark}")
            params.append(value)
    where += terms
    params += values
    if before is not None:
        where.append(f"id < {mark}")
        params.append(min(before, (1 << 63) - 1))
    clause = "WHERE " + " AND ".join(where) if where else ""
    params.append(limit + 1)
    # constant columns and placeholders only: every value is a parameter
    sql = (f"SELECT {cols} FROM {table} {clause} "  # noqa: S608
           f"ORDER BY id DESC LIMIT {mark}")
    return sql, params


#: The audit log's columns, in the order ``AuditEntry`` takes them.
AUDIT_COLS: Final = "id, at, token, address, method, route, task_id, status, counts"


def audit_sql(query: AuditQuery, mark: str, stamp: Callable[[datetime], Any]
              ) -> tuple[str, list[Any]]:
    """The statement and parameters reading one page of ``query`` from the audit log,
    newest first, one row more than the page; ``mark`` is the driver's placeholder,
    ``stamp`` how it takes a time. Raises ``ValidationError`` for a cursor this server
    did not give."""
    terms: list[str] = []
    values: list[Any] = []
    if query.since is not None:
        terms.append(f"at >= {mark}")
        values.append(stamp(query.since))
    if query.until is not None:
        terms.append(f"at < {mark}")
        values.append(stamp(query.until))
    if query.status_class is not None:
        terms.append(f"status >= {mark} AND status < {mark}")
        values += [query.status_class * 100, query.status_class * 100 + 100]
    return _page_sql(
        AUDIT_COLS, "audit", query.before_id, query.limit, mark,
        (("token", query.token), ("route", query.route), ("task_id", query.task_id)),
        terms, values)

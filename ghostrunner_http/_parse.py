"""Turning request bodies and query strings into GhostRunner values.

Every failure is a :class:`~ghostrunner.ValidationError` naming the field as the client
wrote it (``details.nodeids[1]``, ``limit``), which the app answers with 422.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
from starlette.datastructures import QueryParams

from ghostrunner import Rollout, RunState, Selector, Task, TaskQuery, TaskStatus
from ghostrunner.audit import AuditQuery
from ghostrunner.errors import ValidationError
from ghostrunner.tokens import Scope
from ghostrunner.webhooks import DeliveryQuery, DeliveryStatus

from ._convert import structure
from .openapi import NODE_ID_BODY

__all__ = [
    "DeleteSelector",
    "RunPage",
    "parse_abort",
    "parse_audit_query",
    "parse_cancel",
    "parse_delete",
    "parse_delivery_id",
    "parse_delivery_query",
    "parse_retry",
    "parse_run_page",
    "parse_task",
    "parse_task_query",
    "parse_time",
    "parse_token_create",
    "parse_token_name",
]

_TASK_FIELDS = {"targets": "nodeids", "created_at": "creation"}


def _details(body: Mapping[str, Any], allowed: set[str], *, required: bool = True
             ) -> dict[str, Any]:
    if "details" not in body:
        if not required:
            return {}
        raise ValidationError("details", "is required")
    details = body["details"]
    if not isinstance(details, dict):
        raise ValidationError("details", "must be a JSON object")
    for key in details:
        if key not in allowed:
            raise ValidationError(f"details.{key}", "unknown field")
    return details


def _seed_field(field: str) -> str:
    for ours, theirs in _TASK_FIELDS.items():
        if field == ours or field.startswith(ours + "["):
            return "details." + theirs + field[len(ours):]
    return "details." + field


# --------------------------------------------------------------------------- tasks


@attrs.frozen(kw_only=True)
class _SelectDetails:
    """``details.select``: the JSON types; the values are checked by :class:`Selector`."""

    group: str | None = None
    tags: tuple[str, ...] | None = None
    tags_mode: str | None = None
    os: str | None = None
    name: str | None = None
    all: bool | None = None


@attrs.frozen(kw_only=True)
class _RolloutDetails:
    """``details.rollout``: the JSON types; the values are checked by :class:`Rollout`."""

    max_concurrent: int | None = None
    per_minute: int | None = None
    abort_failed_pct: float | None = None
    abort_min_finished: int | None = None


@attrs.frozen(kw_only=True)
class _TaskDetails:
    """TaskBody.details: the seed's TaskData plus GhostRunner's optional fields.
    ``creation`` and ``status`` are accepted (seed clients send them) and ignored.
    ``nodeids`` may be left out when ``select`` chooses the devices."""

    name: str
    command: str
    nodeids: tuple[str, ...] | None = None
    creation: Any = None
    status: Any = None
    shell: str | None = None
    run_as_user: bool | None = None
    timeout: float | None = None
    not_before: str | None = None
    expires_at: str | None = None
    max_attempts: int | None = None
    delivery: str | None = None
    select: _SelectDetails | None = None
    continuous: bool | None = None
    rollout: _RolloutDetails | None = None
    success_exit_codes: tuple[int, ...] | None = None


def parse_time(field: str, text: str | None) -> datetime | None:
    """An RFC 3339 / ISO-8601 time with a zone (``2025-05-27T10:15:30Z``; a lower-case
    ``t`` or ``z`` too), representable in UTC."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.upper() if text.isascii() else text)
    except ValueError:
        raise ValidationError(field, f"not an ISO-8601 date and time: {text!r}") from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(field, "must have a time zone (e.g. end with Z)")
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValidationError(field, "is out of range (years 1 to 9999 in UTC)") from None
    return value


@attrs.frozen
class _TaskBody:
    details: _TaskDetails


_TASK_KEYS = {a.name for a in attrs.fields(_TaskDetails)}
_SEED_KEYS = frozenset({"name", "command", "nodeids", "creation", "status"})
_OPTIONAL = ("shell", "run_as_user", "timeout", "not_before", "expires_at", "max_attempts",
             "delivery", "continuous", "success_exit_codes")
_NESTED: dict[str, frozenset[str]] = {
    "select": frozenset(a.name for a in attrs.fields(Selector) if a.init),
    "rollout": frozenset(a.name for a in attrs.fields(Rollout) if a.init),
}


def _check_nested(details: Mapping[str, Any]) -> None:
    """What cattrs would not name well: unknown keys inside ``select`` and ``rollout``,
    a ``nodeids`` of null, a ``success_exit_codes`` that is not a list, NUL in a tag."""
    for key, known in _NESTED.items():
        value = details.get(key)
        if isinstance(value, dict):
            for inner in value:
                if inner not in known:
                    raise ValidationError(f"details.{key}.{inner}", "unknown field (known: "
                                          + ", ".join(sorted(known)) + ")")
    if "nodeids" in details and details["nodeids"] is None:
        raise ValidationError("details.nodeids", "must be a list of node ids (or be left "
                              "out, with select)")
    codes = details.get("success_exit_codes")
    if codes is not None and not isinstance(codes, list):
        raise ValidationError("details.success_exit_codes", "must be a list of exit codes")
    select = details.get("select")
    tags = select.get("tags") if isinstance(select, dict) else None
    if isinstance(tags, list):
        for i, tag in enumerate(tags):
            if isinstance(tag, str) and "\x00" in tag:
                raise ValidationError(f"details.select.tags[{i}]",
                                      "must not contain NUL characters")


def _nested_fields(value: _SelectDetails | _RolloutDetails | None) -> dict[str, Any] | None:
    """The fields given (not null) of a parsed select or rollout."""
    if value is None:
        return None
    return {k: v for k, v in attrs.asdict(value, recurse=False).items() if v is not None}


def parse_task(body: Mapping[str, Any], clock: Callable[[], datetime]) -> Task:
    """The Task of a TaskBody. The server sets the creation time; ``status`` is derived
    from the runs, so both are ignored when a client sends them."""
    details = _details(body, _TASK_KEYS)
    name, command, nodeids = details.get("name"), details.get("command"), details.get("nodeids")
    options: dict[str, Any] = {}
    if not (
        # the seed's own body, every field of its JSON type: nothing for cattrs to
        # check or convert (the Task checks the values). The hot path of scripts.
        details.keys() <= _SEED_KEYS
        and type(name) is str
        and type(command) is str
        and type(nodeids) is list
        and all(type(node) is str for node in nodeids)
    ):
        _check_nested(details)
        parsed = structure({"details": details}, _TaskBody).details
        name, command, nodeids = parsed.name, parsed.command, parsed.nodeids
        options = {k: getattr(parsed, k) for k in _OPTIONAL if getattr(parsed, k) is not None}
        for key in ("not_before", "expires_at"):
            if key in options:
                options[key] = parse_time(f"details.{key}", options[key])
        select, rollout = _nested_fields(parsed.select), _nested_fields(parsed.rollout)
        if select is not None:
            options["select"] = select
        if rollout is not None:
            options["rollout"] = rollout
        if nodeids is None:
            if select is None:
                raise ValidationError("details.nodeids", "is required (or details.select)")
            nodeids = ()
    try:
        return Task(name=name, command=command, targets=nodeids, created_at=clock(), **options)
    except ValidationError as exc:
        raise ValidationError(_seed_field(exc.field), exc.message) from None


@attrs.frozen(kw_only=True)
class DeleteSelector:
    """Which tasks ``DELETE /task/delete`` acts on: by ``id`` or by ``name``, and
    optionally only for some of their devices (``nodeids``)."""

    id: str | None = None
    name: str | None = None
    nodeids: tuple[str, ...] | None = None


@attrs.frozen(kw_only=True)
class _DeleteDetails:
    id: str | None = None
    name: str | None = None
    nodeids: tuple[str, ...] | None = None
    # a seed client may send the whole TaskData back: accepted, not used
    command: Any = None
    creation: Any = None
    status: Any = None


@attrs.frozen
class _DeleteBody:
    details: _DeleteDetails


_NODE_ID = re.compile(NODE_ID_BODY)


def _nodeids(field: str, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The node ids of a cancel or a delete: the rule of a task's targets (and of the
    OpenAPI document's pattern), so that what no task can target is a 422 here too."""
    if value is None:
        return None
    if not value:
        raise ValidationError(field, "must name at least one device (or be left out)")
    for i, node in enumerate(value):
        if not node.strip():
            raise ValidationError(f"{field}[{i}]", "must be a non-empty node id")
        if len(node) > Task.MAX_NODE_ID or _NODE_ID.fullmatch(node) is None:
            raise ValidationError(f"{field}[{i}]", "is not a node id (at most "
                                  f"{Task.MAX_NODE_ID} characters, no control characters, "
                                  "no whitespace at either end)")
    return value


def parse_delete(body: Mapping[str, Any]) -> DeleteSelector:
    """The selector of ``DELETE /task/delete``: ``details`` with ``id`` or ``name``."""
    details = _details(body, {a.name for a in attrs.fields(_DeleteDetails)})
    parsed = structure({"details": details}, _DeleteBody).details
    if parsed.id is None and parsed.name is None:
        raise ValidationError("details.name", "is required (or details.id)")
    for field, value in (("details.id", parsed.id), ("details.name", parsed.name)):
        if value is not None and not value.strip():
            raise ValidationError(field, "must not be empty")
    return DeleteSelector(
        id=parsed.id, name=parsed.name, nodeids=_nodeids("details.nodeids", parsed.nodeids)
    )


@attrs.frozen
class _CancelBody:
    nodeids: tuple[str, ...] | None = None


def parse_cancel(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The optional ``nodeids`` of ``POST /tasks/{id}/cancel``."""
    parsed = structure(dict(body), _CancelBody)
    return _nodeids("nodeids", parsed.nodeids)


@attrs.frozen
class _RetryBody:
    states: tuple[str, ...] | None = None


#: what ``POST /tasks/{id}/retry`` retries when its body names no states
DEFAULT_RETRY_STATES = (RunState.FAILED.value, RunState.TIMED_OUT.value)


def parse_retry(body: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``states`` of ``POST /tasks/{id}/retry`` (default failed and timed_out); the
    runner checks that each can be retried (``states[i]``)."""
    parsed = structure(dict(body), _RetryBody)
    return DEFAULT_RETRY_STATES if parsed.states is None else parsed.states


MAX_REASON = 1000
DEFAULT_ABORT_REASON = "aborted by an operator"


@attrs.frozen
class _AbortBody:
    reason: str | None = None


def parse_abort(body: Mapping[str, Any]) -> str:
    """The ``reason`` of ``POST /tasks/{id}/abort`` (default: aborted by an operator)."""
    reason = structure(dict(body), _AbortBody).reason
    if reason is None:
        return DEFAULT_ABORT_REASON
    if not reason.strip():
        raise ValidationError("reason", "must not be empty")
    if len(reason) > MAX_REASON or "\x00" in reason:
        raise ValidationError("reason", f"must be at most {MAX_REASON} characters, "
                              "without NUL")
    return reason


# --------------------------------------------------------------------------- tokens


@attrs.frozen(kw_only=True)
class _TokenDetails:
    name: str
    # the seed's flow is "an admin makes a token, a script queues tasks with it": a token
    # asked for without a scope can write; read-only must be asked for
    scope: str = Scope.WRITE.value


@attrs.frozen
class _TokenBody:
    details: _TokenDetails


def parse_token_create(body: Mapping[str, Any]) -> tuple[str, Scope]:
    """``details.name`` and ``details.scope`` (default ``write``) of a TokenCreateBody."""
    details = _details(body, {"name", "scope"})
    parsed = structure({"details": details}, _TokenBody).details
    try:
        scope = Scope(parsed.scope)
    except ValueError:
        allowed = ", ".join(s.value for s in Scope)
        raise ValidationError("details.scope", f"must be one of: {allowed}") from None
    return parsed.name, scope


@attrs.frozen
class _TokenNameDetails:
    name: str


@attrs.frozen
class _TokenNameBody:
    details: _TokenNameDetails


def parse_token_name(body: Mapping[str, Any]) -> str:
    """``details.name`` of ``DELETE /token/delete``."""
    details = _details(body, {"name"})
    return structure({"details": details}, _TokenNameBody).details.name


# --------------------------------------------------------------------------- queries

_QUERY_KEYS = ("limit", "cursor", "state", "status", "nodeid", "name")


def _single_values(params: QueryParams, known: Sequence[str]) -> dict[str, str]:
    """The query's parameters, each of ``known`` and given at most once (else 422)."""
    values: dict[str, str] = {}
    for key in params:
        if key not in known:
            raise ValidationError(key, "unknown query parameter (known: "
                                  + ", ".join(known) + ")")
        got = params.getlist(key)
        if len(got) > 1:
            raise ValidationError(key, "given more than once")
        values[key] = got[0]
    return values


def parse_task_query(params: QueryParams) -> TaskQuery:
    """The filters and page of ``GET /task/list``."""
    values = _single_values(params, _QUERY_KEYS)
    fields: dict[str, Any] = {}
    if "limit" in values:
        text = values["limit"].strip()
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1000:
            raise ValidationError("limit", "must be an integer between 1 and 1000")
        fields["limit"] = int(text)
    for key, enum_type in (("state", RunState), ("status", TaskStatus)):
        if key in values:
            try:
                fields[key] = enum_type(values[key])
            except ValueError:
                allowed = ", ".join(m.value for m in enum_type)
                raise ValidationError(key, f"must be one of: {allowed}") from None
    for key, field in (("cursor", "cursor"), ("nodeid", "node_id"), ("name", "name")):
        if key in values:
            text = values[key]
            if not text or len(text) > 1024 or "\x00" in text:
                raise ValidationError(key, "must be 1 to 1024 characters, without NUL")
            fields[field] = text
    return TaskQuery(**fields)


_AUDIT_KEYS = ("limit", "cursor", "token", "route", "task_id", "since", "until", "status")
_STATUS_CLASSES = {f"{n}xx": n for n in range(1, 6)}


def _page_fields(values: Mapping[str, str]) -> dict[str, Any]:
    """``limit`` (1 to 1000) and ``cursor`` (the digits of an id) of a paged admin list."""
    fields: dict[str, Any] = {}
    if "limit" in values:
        text = values["limit"].strip()
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1000:
            raise ValidationError("limit", "must be an integer between 1 and 1000")
        fields["limit"] = int(text)
    if "cursor" in values:
        text = values["cursor"]
        if not (text.isascii() and text.isdigit()) or len(text) > 19:
            raise ValidationError("cursor", "is not a cursor this server gave")
        fields["cursor"] = text
    return fields


def parse_audit_query(params: QueryParams) -> AuditQuery:
    """The filters and page of ``GET /audit`` (and of the console's audit page)."""
    values = _single_values(params, _AUDIT_KEYS)
    fields = _page_fields(values)
    for key in ("token", "route", "task_id"):
        if key in values:
            text = values[key]
            if not text or len(text) > 1024 or "\x00" in text:
                raise ValidationError(key, "must be 1 to 1024 characters, without NUL")
            fields[key] = text
    for key in ("since", "until"):
        if key in values:
            try:
                when = datetime.fromisoformat(values[key].strip())
            except ValueError:
                when = None
            if when is None or when.tzinfo is None:
                raise ValidationError(key, "must be an ISO 8601 time with a timezone "
                                      "(2024-05-01T12:00:00Z)")
            fields[key] = when
    if "status" in values:
        status = _STATUS_CLASSES.get(values["status"].strip().lower())
        if status is None:
            raise ValidationError("status", "must be one of: " + ", ".join(_STATUS_CLASSES))
        fields["status_class"] = status
    return AuditQuery(**fields)


_DELIVERY_KEYS = ("limit", "cursor", "webhook", "status", "event_id")
#: the largest id a delivery can have (a 64-bit signed integer)
MAX_ID = (1 << 63) - 1


def _id(field: str, text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_ID:
        raise ValidationError(field, "must be a non-negative integer (at most 2^63 - 1)")
    return int(text)


def parse_delivery_query(params: QueryParams) -> DeliveryQuery:
    """The filters and page of ``GET /webhooks/deliveries`` (and of the console's page)."""
    values = _single_values(params, _DELIVERY_KEYS)
    fields = _page_fields(values)
    if "webhook" in values:
        text = values["webhook"]
        if not text or len(text) > 1024 or "\x00" in text:
            raise ValidationError("webhook", "must be 1 to 1024 characters, without NUL")
        fields["webhook"] = text
    if "status" in values:
        text = values["status"].strip().lower()
        if text not in {s.value for s in DeliveryStatus}:
            raise ValidationError("status", "must be one of: "
                                  + ", ".join(s.value for s in DeliveryStatus))
        fields["status"] = text
    if "event_id" in values:
        fields["event_id"] = _id("event_id", values["event_id"])
    return DeliveryQuery(**fields)


def parse_delivery_id(text: str) -> int:
    """The ``{delivery_id}`` of a path."""
    return _id("delivery_id", text)


#: runs per page of ``GET /tasks/{id}``: by default, and at most
RUNS_PAGE = 100
MAX_RUNS_PAGE = 1000
_RUN_QUERY_KEYS = ("output", "limit", "cursor")
_FLAGS = {"true": True, "1": True, "false": False, "0": False}


@attrs.frozen(kw_only=True)
class RunPage:
    """Which runs ``GET /tasks/{id}`` answers with: ``limit`` runs from the ``cursor``-th
    (in target order), with their output or not."""

    output: bool = False
    limit: int = RUNS_PAGE
    cursor: int = 0


def parse_run_page(params: QueryParams) -> RunPage:
    """``GET /tasks/{id}?output=true&limit=100&cursor=100``: output is left out unless
    asked for (``true`` or ``1``); ``cursor`` is the ``runs_next_cursor`` of the previous
    page."""
    values = _single_values(params, _RUN_QUERY_KEYS)
    fields: dict[str, Any] = {}
    if "output" in values:
        if values["output"] not in _FLAGS:
            raise ValidationError("output", "must be true or false (or 1 or 0)")
        fields["output"] = _FLAGS[values["output"]]
    if "limit" in values:
        text = values["limit"].strip()
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_RUNS_PAGE:
            raise ValidationError("limit", f"must be an integer between 1 and {MAX_RUNS_PAGE}")
        fields["limit"] = int(text)
    if "cursor" in values:
        text = values["cursor"]
        if not (text.isascii() and text.isdigit()) or len(text) > 9:
            raise ValidationError("cursor", "must be the runs_next_cursor of a previous page")
        fields["cursor"] = int(text)
    return RunPage(**fields)

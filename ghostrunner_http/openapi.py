"""The OpenAPI 3.1 document of the HTTP API, written out by hand.

It is served at ``GET /openapi.json``. The tests check that it lists exactly the app's
routes and that every answer they receive matches the schema documented for it.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import ghostrunner
from ghostrunner import Delivery, RunState, Shell, Task, TaskStatus
from ghostrunner.events import KINDS
from ghostrunner.tokens import Scope

MAX_COMMAND = Task.MAX_COMMAND
MAX_NAME = Task.MAX_NAME
MAX_NODE_ID = Task.MAX_NODE_ID
MAX_TARGETS = Task.MAX_TARGETS
MAX_TIMEOUT = Task.MAX_TIMEOUT

__all__ = ["openapi_document", "openapi_json"]

Schema = dict[str, Any]



# What Python's str.strip() strips (JSON Schema's \s differs: it lacks \x1c-\x1f and
# \x85 and has \ufeff). The tests check this against str.isspace().
SPACE_CHARS = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def _space_class() -> str:
    return "".join(f"\\u{ord(c):04x}" for c in SPACE_CHARS)


# non-blank (by the library's str.strip()), no NUL
_NOT_SPACE = "[^\\u0000" + _space_class() + "]"
_TEXT = "^[^\\u0000]*" + _NOT_SPACE + "[^\\u0000]*$"
_NO_NUL = "^[^\\u0000]+$"
# a node id: no control character (C0, DEL, C1) anywhere, no whitespace at either end.
# No lookarounds, so that generators (Schemathesis) can draw from it; the tests check it
# against the library's rule (Task targets).
_CONTROL_RANGE = "\\u0000-\\u001f\\u007f-\\u009f"
_NODE_END = "[^" + _CONTROL_RANGE + _space_class() + "]"
NODE_ID_BODY = _NODE_END + "(?:[^" + _CONTROL_RANGE + "]*" + _NODE_END + ")?"
NODE_ID_PATTERN = "^" + NODE_ID_BODY + "$"
# a path segment other than "." and ".." (which clients resolve away)
_SEGMENT = "^(?!\\.{1,2}$)[^/]+$"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _text(max_len: int, description: str = "") -> Schema:
    out: Schema = {"type": "string", "minLength": 1, "maxLength": max_len, "pattern": _TEXT}
    if description:
        out["description"] = description
    return out


def _obj(properties: dict[str, Schema], required: list[str] | None = None,
         *, description: str = "", extra: bool = False) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    if not extra:
        out["additionalProperties"] = False
    if description:
        out["description"] = description
    return out


_DATETIME: Schema = {"type": "string", "format": "date-time"}
_RECOVERED: Schema = {
    "type": "boolean",
    "description": "The outcome was read back from the device's journal after GhostRunner "
                   "had lost the reply (a crash, an outage): the command ran once.",
}
# what requests may send: RFC 3339 without leap seconds (no ":60"), in years 1 to 9999
# once converted to UTC
_DATETIME_IN: Schema = {
    "type": "string",
    "format": "date-time",
    "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-5][0-9]",
}
_NODEIDS: Schema = {
    "type": "array",
    "minItems": 1,
    "maxItems": MAX_TARGETS,
    "uniqueItems": True,
    "items": {"type": "string", "minLength": 1, "maxLength": MAX_NODE_ID,
              "pattern": NODE_ID_PATTERN,
              "description": "A MeshCentral node id: no control characters, no whitespace "
                             "at either end."},
    "description": "MeshCentral node ids (node//...), one run each.",
}
#: the states POST /tasks/{id}/retry accepts (a run that succeeded is done)
RETRYABLE = [s.value for s in RunState
             if s.terminal and s is not RunState.SUCCEEDED]
_COUNT: Schema = {"type": "integer", "minimum": 1, "maximum": 1_000_000}
_EXIT_CODE: Schema = {"type": "integer", "minimum": -(2**31), "maximum": 2**32 - 1}
_SELECT_DOC = (
    "Which devices get a run besides nodeids: every device the executor knows (online "
    "or not) whose fields match ALL of those given. group: a device group by id "
    "(mesh//...) or name; tags: device tags (tags_mode all: every one, any: at least "
    "one); os: a substring of the OS description; name: a glob (*, ?, [...]) on the "
    "device name; all: true for every device. Names and tags match case-insensitively. "
    "Give at least one. Unless continuous, it must match a device now (422 "
    "details.select otherwise)."
)
_AUTHTOKEN: Schema = {
    "type": "string",
    "description": "The API token, as the seed's bodies carry it. Alternatively send "
                   "`Authorization: Bearer <token>` (which wins when both are given).",
}

SCHEMAS: dict[str, Schema] = {
    "Selector": {
        **_obj(
            {
                "group": _nullable(_text(MAX_NAME, "A device group: its id (mesh//...) or "
                                                   "its name.")),
                "tags": _nullable({"type": "array", "maxItems": 100,
                                   "items": _text(MAX_NAME),
                                   "description": "Device tags, case-insensitive."}),
                "tags_mode": _nullable({"type": "string", "enum": ["all", "any"],
                                        "default": "all",
                                        "description": "all: the device has every tag; "
                                                       "any: at least one."}),
                "os": _nullable(_text(MAX_NAME, "A case-insensitive substring of the "
                                                "device's OS description.")),
                "name": _nullable(_text(MAX_NAME, "A glob on the device name (*, ?, "
                                                  "[...]), case-insensitive.")),
                "all": _nullable({"type": "boolean", "description": "true: every device."}),
            },
            description=_SELECT_DOC,
        ),
        # a selector must say something: at least one of these
        "anyOf": [
            {"required": ["group"], "properties": {"group": {"type": "string"}}},
            {"required": ["tags"], "properties": {"tags": {"type": "array",
                                                           "minItems": 1}}},
            {"required": ["os"], "properties": {"os": {"type": "string"}}},
            {"required": ["name"], "properties": {"name": {"type": "string"}}},
            {"required": ["all"], "properties": {"all": {"const": True}}},
        ],
    },
    "Rollout": _obj(
        {
            "max_concurrent": _nullable({**_COUNT, "description": "The most runs of the "
                                         "task in flight at once."}),
            "per_minute": _nullable({**_COUNT, "description": "The most runs of the task "
                                     "started in any 60 seconds."}),
            "abort_failed_pct": _nullable({
                "type": "number", "minimum": 0, "exclusiveMaximum": 100,
                "description": "Abort the task when more than this percentage of its "
                               "finished runs (succeeded, failed, timed_out; lost not "
                               "counted) failed or timed out."}),
            "abort_min_finished": _nullable({**_COUNT, "default": 1,
                                             "description": "...once at least this many "
                                             "runs finished."}),
        },
        description="How fast the task spreads over its devices, and when it gives up. "
                    "null or absent: no limit, no abort rule.",
    ),
    "TaskDetails": {**_obj(
        {
            "name": _text(MAX_NAME, "A label for operators (not unique)."),
            "command": _text(MAX_COMMAND, "The shell command, run as is on each device."),
            "nodeids": {**_NODEIDS, "minItems": 0,
                        "description": "MeshCentral node ids (node//...), one run each. "
                                       "Required, and not empty, unless select is given."},
            "creation": {"description": "Accepted for the seed's clients and ignored: the "
                                        "server sets the creation time."},
            "status": {"description": "Accepted for the seed's clients and ignored: the "
                                      "status is derived from the runs."},
            "shell": _nullable({"type": "string", "enum": [s.value for s in Shell],
                                "description": "auto: sh on POSIX agents, cmd on Windows."}),
            "run_as_user": _nullable({"type": "boolean"}),
            "timeout": _nullable({"type": "number", "exclusiveMinimum": 0,
                                  "maximum": MAX_TIMEOUT,
                                  "description": "Seconds the command may run (default "
                                                 "300)."}),
            "not_before": _nullable({**_DATETIME_IN, "description": "Do not start before."}),
            "expires_at": _nullable({**_DATETIME_IN, "description": "Runs not started by "
                                                    "then end expired; after not_before."}),
            "max_attempts": _nullable({"type": "integer", "minimum": 1, "maximum": 100}),
            "delivery": _nullable({"type": "string", "enum": [d.value for d in Delivery]}),
            "select": _nullable(_ref("Selector")),
            "continuous": _nullable({
                "type": "boolean",
                "description": "true (needs select): also give a run to every device that "
                               "starts to match select later, until expires_at or until "
                               "the task is cancelled or aborted. A device never gets two "
                               "runs of one task."}),
            "rollout": _nullable(_ref("Rollout")),
            "success_exit_codes": _nullable({
                "type": "array", "minItems": 1, "maxItems": 256, "items": _EXIT_CODE,
                "description": "The exit codes that mean success (default [0])."}),
        },
        ["name", "command"],
        description="The seed's TaskData, plus GhostRunner's optional fields (null or "
                    "absent: the default). nodeids is required unless select is given; "
                    "it may then be empty or left out. continuous needs select.",
    ), "anyOf": [
        {"required": ["nodeids"], "properties": {"nodeids": {"minItems": 1}}},
        {"required": ["select"], "properties": {"select": {"type": "object"}}},
    ]},
    "TaskBody": _obj({"authtoken": _AUTHTOKEN, "details": _ref("TaskDetails")}, ["details"]),
    "RetryBody": _obj({
        "authtoken": _AUTHTOKEN,
        "states": _nullable({"type": "array", "minItems": 1,
                             "items": {"type": "string", "enum": RETRYABLE},
                             "description": "Retry the runs that ended in these states "
                                            "(default failed and timed_out)."}),
    }),
    "RetryResult": _obj({"id": {"type": "string"},
                         "retried": {"type": "array", "items": {"type": "string"},
                                     "description": "Devices whose run is pending again, "
                                                    "as a new attempt."}},
                        ["id", "retried"]),
    "AbortBody": _obj({
        "authtoken": _AUTHTOKEN,
        "reason": _nullable({**_text(1000), "description": "Recorded as the task's "
                                                           "aborted reason (default: "
                                                           "aborted by an operator)."}),
    }),
    "Counts": _obj({s.value: {"type": "integer", "minimum": 0} for s in RunState},
                   [s.value for s in RunState],
                   description="How many of the task's runs are in each state."),
    "Task": _obj(
        {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "command": {"type": "string"},
            "nodeids": {"type": "array", "items": {"type": "string"},
                        "description": "The explicit node ids; in GET /task/list only the "
                                       "first 100 (nodes_truncated)."},
            "node_count": {"type": "integer", "minimum": 0,
                           "description": "How many explicit node ids the task has."},
            "nodes_truncated": {"type": "boolean",
                                "description": "nodeids holds only the first ones (GET "
                                               "/task/list shows 100): GET /tasks/{id} "
                                               "has them all."},
            "creation": _DATETIME,
            "status": {"type": "string", "enum": [s.value for s in TaskStatus]},
            "shell": {"type": "string", "enum": [s.value for s in Shell]},
            "run_as_user": {"type": "boolean"},
            "timeout": {"type": "number"},
            "not_before": _nullable(_DATETIME),
            "expires_at": _nullable(_DATETIME),
            "max_attempts": {"type": "integer"},
            "delivery": {"type": "string", "enum": [d.value for d in Delivery]},
            "select": _nullable(_ref("SelectorOut")),
            "continuous": {"type": "boolean"},
            "rollout": _ref("RolloutOut"),
            "success_exit_codes": {"type": "array", "items": {"type": "integer"}},
            "paused": {"type": "boolean", "description": "Paused by an operator: none of "
                                                        "its runs starts until resumed."},
            "aborted": _nullable({"type": "string",
                                  "description": "Why it was aborted (by its rollout's "
                                                 "abort rule or an operator); null if "
                                                 "not."}),
            "counts": _ref("Counts"),
        },
        ["id", "name", "command", "nodeids", "node_count", "nodes_truncated", "creation",
         "status", "shell", "run_as_user",
         "timeout", "not_before", "expires_at", "max_attempts", "delivery", "select",
         "continuous", "rollout", "success_exit_codes", "paused", "aborted", "counts"],
        description="The seed's TaskData (name, command, nodeids, creation, status) and "
                    "GhostRunner's fields. nodeids are the explicit targets; the devices "
                    "select chose have runs (and counts) too.",
    ),
    "SelectorOut": _obj(
        {
            "group": _nullable({"type": "string"}),
            "tags": {"type": "array", "items": {"type": "string"}},
            "tags_mode": {"type": "string", "enum": ["all", "any"]},
            "os": _nullable({"type": "string"}),
            "name": _nullable({"type": "string"}),
            "all": {"type": "boolean"},
        },
        ["group", "tags", "tags_mode", "os", "name", "all"],
        description="A task's selector, every field (null or empty: not given).",
    ),
    "RolloutOut": _obj(
        {
            "max_concurrent": _nullable({"type": "integer", "minimum": 1}),
            "per_minute": _nullable({"type": "integer", "minimum": 1}),
            "abort_failed_pct": _nullable({"type": "number"}),
            "abort_min_finished": {"type": "integer", "minimum": 1},
        },
        ["max_concurrent", "per_minute", "abort_failed_pct", "abort_min_finished"],
        description="A task's rollout (null: no limit, no abort rule).",
    ),
    "Attempt": _obj(
        {
            "number": {"type": "integer", "minimum": 1},
            "state": {"type": "string", "enum": [s.value for s in RunState]},
            "started_at": _nullable(_DATETIME),
            "finished_at": _nullable(_DATETIME),
            "exit_code": _nullable({"type": "integer"}),
            "output": {"type": "string"},
            "output_truncated": {"type": "boolean"},
            "error": _nullable({"type": "string"}),
            "recovered": _RECOVERED,
        },
        ["number", "state", "started_at", "finished_at", "exit_code", "output_truncated",
         "error", "recovered"],
        description="One time a run's command was handed to its device, and what came of "
                    "it (lost: its outcome is unknown). output is there only with "
                    "?output=true.",
    ),
    "Run": _obj(
        {
            "nodeid": {"type": "string"},
            "state": {"type": "string", "enum": [s.value for s in RunState]},
            "attempts": {"type": "integer", "minimum": 0},
            "undelivered": {"type": "integer", "minimum": 0},
            "queued_at": _DATETIME,
            "available_at": _DATETIME,
            "expires_at": _nullable(_DATETIME),
            "started_at": _nullable(_DATETIME),
            "finished_at": _nullable(_DATETIME),
            "exit_code": _nullable({"type": "integer"}),
            "output": {"type": "string"},
            "output_truncated": {"type": "boolean"},
            "error": _nullable({"type": "string"}),
            "recovered": _RECOVERED,
            "history": {"type": "array", "items": _ref("Attempt"),
                        "description": "Every attempt of the run, oldest first (a retry "
                                       "adds one; the run's own fields are its latest)."},
        },
        ["nodeid", "state", "attempts", "undelivered", "queued_at", "available_at",
         "expires_at", "started_at", "finished_at", "exit_code", "output_truncated",
         "error", "recovered", "history"],
        description="One (task, device) run. output is there only with ?output=true.",
    ),
    "TaskPage": _obj(
        {"tasks": {"type": "array", "items": _ref("Task")},
         "next_cursor": _nullable({"type": "string"})},
        ["tasks", "next_cursor"],
        description="Newest first; pass next_cursor as ?cursor= for the next page.",
    ),
    "DeleteDetails": {
        **_obj(
            {
                "id": _text(64, "A task id."),
                "name": _text(MAX_NAME, "Every task with this name."),
                "nodeids": {**_NODEIDS,
                            "description": "Only for these devices; all when absent."},
                "command": {"description": "Accepted (seed clients may send their TaskData) "
                                           "and ignored."},
                "creation": {"description": "Accepted and ignored."},
                "status": {"description": "Accepted and ignored."},
            },
            description="Which tasks: by id or by name (at least one), optionally only for "
                        "some devices.",
        ),
        # neither id nor name is a 422: say so, so that clients (and fuzzers) know
        "anyOf": [{"required": ["id"]}, {"required": ["name"]}],
    },
    "DeleteBody": _obj({"authtoken": _AUTHTOKEN, "details": _ref("DeleteDetails")},
                       ["details"]),
    "DeleteOutcome": _obj(
        {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "deleted": {"type": "boolean", "description": "The task was removed."},
            "cancelled": {"type": "array", "items": {"type": "string"},
                          "description": "Devices whose pending run was cancelled."},
            "running": {"type": "array", "items": {"type": "string"},
                        "description": "Devices whose run is in flight: it finishes "
                                       "normally, and the task is kept."},
        },
        ["id", "name", "deleted", "cancelled", "running"],
    ),
    "DeleteResult": _obj(
        {"deleted": {"type": "integer", "minimum": 0},
         "tasks": {"type": "array", "items": _ref("DeleteOutcome")}},
        ["deleted", "tasks"],
    ),
    "CancelBody": _obj({"authtoken": _AUTHTOKEN, "nodeids": _NODEIDS}),
    "CancelResult": _obj({"id": {"type": "string"},
                          "cancelled": {"type": "array", "items": {"type": "string"}}},
                         ["id", "cancelled"]),
    "FlushResult": _obj(
        {
            "cancelled": {"type": "integer", "minimum": 0,
                          "description": "Pending runs cancelled."},
            "deleted": {"type": "integer", "minimum": 0, "description": "Tasks removed."},
            "kept": {"type": "integer", "minimum": 0,
                     "description": "Tasks kept because a run is in flight."},
        },
        ["cancelled", "deleted", "kept"],
    ),
    "AuthBody": _obj({"authtoken": _AUTHTOKEN},
                     description="The seed's TokenListBody: only the token."),
    "TokenCreateDetails": _obj(
        {"name": _text(MAX_NAME, "Unique."),
         "scope": {"type": "string", "enum": [s.value for s in Scope], "default": "write"}},
        ["name"],
    ),
    "TokenCreateBody": _obj({"authtoken": _AUTHTOKEN, "details": _ref("TokenCreateDetails")},
                            ["details"]),
    "TokenNameBody": _obj(
        {"authtoken": _AUTHTOKEN,
         "details": _obj({"name": {"type": "string"}}, ["name"])},
        ["details"],
    ),
    "Token": _obj(
        {
            "name": {"type": "string"},
            "scope": {"type": "string", "enum": [s.value for s in Scope]},
            "created_at": _DATETIME,
            "last_used": _nullable({**_DATETIME, "description": "Updated at most once a "
                                                               "minute."}),
            "builtin": {"type": "boolean", "description": "The bootstrap admin token."},
        },
        ["name", "scope", "created_at", "last_used", "builtin"],
    ),
    "TokenList": _obj({"tokens": {"type": "array", "items": _ref("Token")}}, ["tokens"]),
    "AuditEntry": _obj(
        {
            "id": {"type": "integer", "description": "Increasing: the newest is highest."},
            "at": {"type": "string", "format": "date-time"},
            "token": _nullable({"type": "string", "description": "The token's name (never "
                                "its secret); null when no valid token was given."}),
            "address": _nullable({"type": "string", "description": "The client's address "
                                  "as the server sees it."}),
            "method": {"type": "string"},
            "route": {"type": "string", "description": "The route's template, e.g. "
                      "/tasks/{task_id}/retry."},
            "task_id": _nullable({"type": "string"}),
            "status": {"type": "integer", "description": "The answer's HTTP status."},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"},
                       "description": "What the write touched: runs, nodeids, tasks, "
                       "deleted, cancelled, kept."},
        },
        ["id", "at", "token", "address", "method", "route", "task_id", "status", "counts"],
    ),
    "AuditPage": _obj({"entries": {"type": "array", "items": _ref("AuditEntry")},
                       "next_cursor": _nullable({"type": "string"})},
                      ["entries", "next_cursor"]),
    "Delivery": _obj(
        {
            "id": {"type": "integer", "description": "Increasing: the newest is highest."},
            "webhook": {"type": "string", "description": "The webhook's name."},
            "event_id": {"type": "integer", "description": "The event's id in the event "
                         "log (also in the body, data.id)."},
            "kind": {"type": "string", "description": "The event's kind (the body's "
                     "type), e.g. run.finished."},
            "msg_id": {"type": "string", "description": "The webhook-id header: the same "
                       "on every attempt; receivers drop duplicates by it."},
            "status": {"type": "string", "enum": ["pending", "delivered", "failed"],
                       "description": "pending: to send (again); delivered: a 2xx answer; "
                                      "failed: given up."},
            "sending": {"type": "boolean", "description": "A process is sending it now."},
            "attempts": {"type": "integer", "minimum": 0,
                         "description": "Attempts started (since an operator's retry)."},
            "created_at": _DATETIME,
            "started_at": {**_DATETIME, "description": "When its retry schedule began "
                                                       "(created, or retried)."},
            "next_attempt_at": _nullable({**_DATETIME, "description": "When a pending "
                                          "delivery is due."}),
            "last_attempt_at": _nullable(_DATETIME),
            "last_status": _nullable({"type": "integer", "description": "The HTTP status "
                                      "of the latest failed attempt (null: no answer)."}),
            "last_error": _nullable({"type": "string", "description": "What went wrong "
                                     "the latest time (at most 500 characters)."}),
            "finished_at": _nullable({**_DATETIME, "description": "When it was delivered "
                                      "or given up."}),
        },
        ["id", "webhook", "event_id", "kind", "msg_id", "status", "sending", "attempts",
         "created_at", "started_at", "next_attempt_at", "last_attempt_at", "last_status",
         "last_error", "finished_at"],
    ),
    "DeliveryPage": _obj({"deliveries": {"type": "array", "items": _ref("Delivery")},
                          "next_cursor": _nullable({"type": "string"})},
                         ["deliveries", "next_cursor"]),
    "Webhook": _obj(
        {
            "name": {"type": "string"},
            "configured": {"type": "boolean", "description": "false: no longer in the "
                           "configuration (its outbox is kept, not sent)."},
            "url": _nullable({"type": "string", "description": "The URL's origin only "
                              "(scheme, host, port)."}),
            "events": {"type": "array", "items": {"type": "string"},
                       "description": "The kinds (or globs) it gets."},
            "cursor": _nullable({"type": "integer", "description": "The id of the last "
                                 "event taken into its outbox."}),
            "counts": _obj({s: {"type": "integer", "minimum": 0}
                            for s in ("pending", "delivered", "failed")},
                           ["pending", "delivered", "failed"]),
        },
        ["name", "configured", "url", "events", "cursor", "counts"],
    ),
    "WebhookList": _obj(
        {"webhooks": {"type": "array", "items": _ref("Webhook")},
         "event_log": {"type": "boolean", "description": "Whether the store keeps an "
                       "event log (false: no new event reaches the webhooks)."}},
        ["webhooks", "event_log"]),
    "TokenDeleted": _obj({"name": {"type": "string"}, "deleted": {"const": True}},
                         ["name", "deleted"]),
    "Event": _obj(
        {
            "id": {"type": "integer", "minimum": 1,
                   "description": "Increasing, in the order events became visible."},
            "at": _DATETIME,
            "kind": {"type": "string", "enum": list(KINDS)},
            "task_id": {"type": "string"},
            "node_id": _nullable({"type": "string", "description": "The run's device "
                                  "(run.* kinds); null for task-level kinds."}),
            "data": {"type": "object", "description": "Depends on the kind (see "
                     "docs/concepts.md): state, attempts, exit_code, count, nodes..."},
        },
        ["id", "at", "kind", "task_id", "node_id", "data"],
        description="One change of a task or a run, as GET /events sends it in each "
                    "message's data.",
    ),
    "Device": _obj(
        {
            "name": {"type": "string"},
            "nodeid": {"type": "string"},
            "os": _nullable({"type": "string"}),
            "group_id": _nullable({"type": "string"}),
            "group_name": _nullable({"type": "string"}),
            "tags": {"type": "array", "items": {"type": "string"}},
            "agent_kind": {"type": "string", "enum": ["posix", "windows", "unknown"]},
        },
        ["name", "nodeid", "os", "group_id", "group_name", "tags", "agent_kind"],
    ),
    "PyOnlineDevices": _obj(
        {
            "online_devices": {"type": "array", "items": _ref("Device")},
            "offline_devices": {"type": "array", "items": _ref("Device")},
            "total_devices": {"type": "integer", "minimum": 0},
            "executor_connected": _nullable({"type": "boolean"}),
        },
        ["online_devices", "offline_devices", "total_devices", "executor_connected"],
        description="The seed's PyOnlineDevices, from the executor's current view.",
    ),
    "Info": _obj(
        {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "executor": {"type": "string"},
            "executor_connected": _nullable({"type": "boolean"}),
            "store": {
                "type": "string",
                "enum": ["postgresql", "sqlite", "memory", "custom"],
                "description": "Where the tasks are kept.",
            },
            "openapi": {"type": "string"},
            "runner": _ref("ThisRunner"),
            "runners": _nullable({
                "type": "array", "items": _ref("Runner"),
                "description": "Every runner sharing the store, as the store sees it "
                               "(oldest start first; those that ended in the last hour "
                               "too). One (this one) for a store kept by one runner "
                               "(SQLite). null: the store could not answer within 2 s.",
            }),
        },
        ["name", "version", "executor", "executor_connected", "store", "openapi", "runner",
         "runners"],
    ),
    "ThisRunner": _obj(
        {
            "id": {"type": "string", "description": "New at every start (and after a "
                   "lost lease)."},
            "name": {"type": "string", "description": "runner.name, else host:pid."},
            "version": {"type": "string"},
            "started_at": {"type": "string", "format": "date-time"},
            "shared": {"type": "boolean", "description": "Whether the store keeps runner "
                       "leases (PostgreSQL: several runners may share it)."},
            "fenced": {"type": "boolean", "description": "This runner could not renew "
                       "its lease in time and sends no command until it can."},
            "lease_left": _nullable({"type": "number", "minimum": 0,
                                     "description": "Seconds its lease surely holds "
                                                    "(null: no leases)."}),
            "in_flight": {"type": "integer", "minimum": 0, "description": "Runs it has "
                          "dispatched (in flight, or asking their device)."},
        },
        ["id", "name", "version", "started_at", "shared", "fenced", "lease_left",
         "in_flight"],
        description="The runner answering, as it knows itself.",
    ),
    "Runner": _obj(
        {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "version": {"type": "string"},
            "started_at": {"type": "string", "format": "date-time"},
            "state": {"type": "string", "enum": ["alive", "expired", "adopted", "stopped"],
                      "description": "alive: renewed in time; expired: past its lease, "
                      "not taken over yet; adopted: another runner took over its runs; "
                      "stopped: stopped gracefully."},
            "heartbeat_at": {"type": "string", "format": "date-time"},
            "heartbeat_age": {"type": "number", "minimum": 0, "description": "Seconds "
                              "since its last renewal, by the database's clock."},
            "expires_at": {"type": "string", "format": "date-time"},
            "runs": {"type": "integer", "minimum": 0, "description": "Runs it has "
                     "dispatched now."},
            "adopted_by": _nullable({"type": "string", "description": "The runner that "
                                     "took over its runs."}),
        },
        ["id", "name", "version", "started_at", "state", "heartbeat_at", "heartbeat_age",
         "expires_at", "runs", "adopted_by"],
        description="A runner sharing the store, as the store sees it.",
    ),
    "ErrorData": _obj(
        {
            "error": {"type": "string", "description": "A stable machine-readable code."},
            "field": {"type": "string", "description": "The invalid field (422 only)."},
        },
        ["error"],
    ),
}


def _envelope(data: Schema) -> Schema:
    return {
        "type": "object",
        "properties": {
            "status": {"type": "integer", "description": "The HTTP status, repeated."},
            "message": {"type": "string"},
            "data": data,
        },
        "required": ["status", "message", "data"],
        "additionalProperties": False,
    }


_ERRORS = {
    400: "Malformed request: the body is not JSON, not UTF-8, or not a JSON object.",
    401: "Missing, malformed, wrong or revoked token.",
    403: "The token's scope does not allow this.",
    404: "No such task (or token).",
    405: "Method not allowed.",
    409: "Conflict: the name is taken, or the token is the builtin admin token.",
    413: "The body is over the size limit (1 MiB by default).",
    422: "An invalid field or query parameter, named in data.field and the message.",
    503: "The database is unavailable, or too many connections are open; retry.",
}


def _ok(data: Schema, description: str) -> Schema:
    return {"description": description,
            "content": {"application/json": {"schema": _envelope(data)}}}


def _error(code: int) -> Schema:
    out: Schema = {"description": _ERRORS[code],
                   "content": {"application/json": {"schema": _ref("Error")}}}
    if code == 401:
        out["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out


def _op(
    summary: str,
    scope: Scope | None,
    ok: Schema,
    *,
    description: str = "",
    body: str | None = None,
    body_required: bool = True,
    errors: tuple[int, ...] = (),
    params: list[Schema] | None = None,
    tag: str = "tasks",
) -> Schema:
    codes = set(errors)
    if scope is not None:
        codes |= {400, 401, 403, 413, 503}
    if scope is not None or body is not None or params:
        codes.add(422)
    op: Schema = {
        "summary": summary,
        "tags": [tag],
        "responses": {"200": ok, **{str(c): _error(c) for c in sorted(codes)}},
    }
    text = description
    if scope is not None:
        text = (f"Needs a token with scope **{scope.value}** or higher. " + text).strip()
        op["security"] = [{"bearer": []}]
    else:
        op["security"] = []
    op["description"] = text
    if body is not None:
        op["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if params:
        op["parameters"] = params
    return op


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


_TASK_ID = {"name": "task_id", "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1, "pattern": _SEGMENT},
            "description": "The task's id."}
_AUTH_ONLY = ("The seed's clients may send `{\"authtoken\": ...}` as the body, even on "
              "GET; anything else in the body is refused (422).")


def _paths() -> dict[str, Any]:
    return {
        "/": {"get": _op(
            "What this server is", None, _ok(_ref("Info"), "Server information."),
            description="Needs no token. Also the runners sharing its database (their "
                        "names are host:pid unless runner.name is set).", tag="server")},
        "/openapi.json": {"get": {
            "summary": "This document", "tags": ["server"], "security": [],
            "description": "The OpenAPI document itself, not wrapped in the envelope.",
            "responses": {"200": {"description": "The OpenAPI document.",
                                  "content": {"application/json": {
                                      "schema": {"type": "object"}}}}},
        }},
        "/token/create": {"post": _op(
            "Create a token", Scope.ADMIN,
            _ok(_ref("NewToken"), "The new token, with its secret (shown only this once)."),
            description="The secret is random (256 bits) and only its hash is stored.",
            body="TokenCreateBody", errors=(409,), tag="tokens")},
        "/token/delete": {"delete": _op(
            "Revoke a token", Scope.ADMIN,
            _ok(_ref("TokenDeleted"), "The token is deleted; it stops working at once."),
            description="The builtin admin token cannot be deleted (409).",
            body="TokenNameBody", errors=(404, 409), tag="tokens")},
        "/token/list": {"get": _op(
            "List tokens", Scope.ADMIN, _ok(_ref("TokenList"), "Every token, oldest first "
                                                              "(never their secrets)."),
            description=_AUTH_ONLY, tag="tokens")},
        "/task/create": {"post": _op(
            "Queue a task", Scope.WRITE,
            {**_ok(_ref("Task"), "The new task; data.id is its id."),
             "headers": {"Location": {"schema": {"type": "string"},
                                      "description": "/tasks/{id} of the new task."}}},
            description="One run per node id, and per device select matches (explicit "
                        "node ids first, then the matched devices by name); each starts "
                        "when its device is online, within the rollout's limits. creation "
                        "and status from the client are ignored. A select that matches no "
                        "device (and is not continuous) is a 422 naming details.select; "
                        "continuous without select is a 422 naming details.continuous.",
            body="TaskBody")},
        "/task/delete": {"delete": _op(
            "Delete tasks by name or id", Scope.WRITE,
            _ok(_ref("DeleteResult"), "What was done to each task."),
            description="Every task with details.name (or the task details.id). With "
                        "details.nodeids covering all of a task's devices, or without "
                        "nodeids, the task's pending runs are cancelled and the task is "
                        "removed (kept while a run is in flight). With nodeids naming only "
                        "some of its devices, those devices' pending runs are cancelled "
                        "and the task stays. 404 when nothing matches.",
            body="DeleteBody", errors=(404,))},
        "/task/list": {"get": _op(
            "List tasks", Scope.READ, _ok(_ref("TaskPage"), "One page of tasks."),
            description="Newest first. " + _AUTH_ONLY,
            params=[
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000,
                                 "default": 50}, "Page size."),
                _query("cursor", {"type": "string", "minLength": 1, "maxLength": 1024,
                                  "pattern": _NO_NUL},
                       "next_cursor of the previous page."),
                _query("state", {"type": "string", "enum": [s.value for s in RunState]},
                       "Only tasks having a run in this state."),
                _query("status", {"type": "string",
                                  "enum": [s.value for s in TaskStatus]},
                       "Only tasks with this overall status."),
                _query("nodeid", {"type": "string", "minLength": 1, "maxLength": 1024,
                                  "pattern": _NO_NUL},
                       "Only tasks targeting this device."),
                _query("name", {"type": "string", "minLength": 1, "maxLength": 1024,
                                "pattern": _NO_NUL},
                       "Only tasks with exactly this name."),
            ])},
        "/task/flush": {"delete": _op(
            "Flush: cancel everything pending, remove finished tasks", Scope.WRITE,
            _ok(_ref("FlushResult"), "What was cancelled, removed and kept."),
            description="Cancels every pending run of every task, then removes every task "
                        "whose runs are all finished (succeeded, failed, timed out, "
                        "expired, cancelled, lost), including those just cancelled. A task "
                        "with a run still in flight is kept (counted in kept): flush again "
                        "once it finishes. " + _AUTH_ONLY)},
        "/tasks/{task_id}": {
            "get": _op("A task and a page of its runs", Scope.READ,
                       _ok(_ref("TaskWithRuns"), "The task, with a page of its runs: "
                                                "state, attempts, times, exit code (and "
                                                "output if asked for)."),
                       description="Runs come a page at a time (limit, default 100; "
                                   "follow runs_next_cursor). Their output (and their "
                                   "attempts') is left out unless output=true; with it, a "
                                   "page also ends once its output passes 1,000,000 "
                                   "characters. " + _AUTH_ONLY,
                       errors=(404,), params=[
                           _TASK_ID,
                           _query("output", {"type": "string",
                                             "enum": ["true", "false", "1", "0"],
                                             "default": "false"},
                                  "true: include the runs' output."),
                           _query("limit", {"type": "integer", "minimum": 1,
                                            "maximum": 1000, "default": 100},
                                  "Runs per page."),
                           _query("cursor", {"type": "string", "pattern": "^[0-9]{1,9}$"},
                                  "runs_next_cursor of the previous page."),
                       ]),
            "delete": _op("Delete a task", Scope.WRITE,
                          _ok(_ref("DeleteResult"), "What was done."),
                          description="Cancels its pending runs and removes it; kept "
                                      "(deleted: false) while a run is in flight.",
                          errors=(404,), params=[_TASK_ID]),
        },
        "/tasks/{task_id}/cancel": _task_action(
            "Cancel a task's pending runs", "CancelResult",
            "The devices whose run was cancelled.", body="CancelBody",
            description="All pending runs, or those of nodeids (which must be targets of "
                        "the task: 422 otherwise). Runs in flight finish normally; "
                        "finished runs are unchanged. The task stays."),
        "/tasks/{task_id}/pause": _task_action(
            "Pause a task", "Task",
            "The task, paused.", body="AuthBody",
            description="None of its runs starts until it is resumed; runs in flight "
                        "finish. A continuous task still adds runs for new devices (they "
                        "wait). Pausing a paused task changes nothing. " + _AUTH_ONLY),
        "/tasks/{task_id}/resume": _task_action(
            "Resume a paused task", "Task",
            "The task, resumed.", body="AuthBody",
            description="Its runs start again as their devices are online (within its "
                        "rollout limits). Resuming a task not paused changes nothing. "
                        + _AUTH_ONLY),
        "/tasks/{task_id}/retry": _task_action(
            "Retry a task's runs that did not succeed", "RetryResult",
            "The devices whose run is pending again.", body="RetryBody",
            description="Every run of the task that ended in one of states (default "
                        "failed and timed_out) goes back to pending, as a new attempt; its "
                        "earlier attempts stay in its history. Retrying cancelled runs "
                        "reopens an aborted task. A state that cannot be retried is a 422 "
                        "naming states[i]."),
        "/tasks/{task_id}/abort": _task_action(
            "Abort a task", "CancelResult",
            "The devices whose pending run was cancelled.", body="AbortBody",
            description="As its rollout's abort rule would: every run not yet started is "
                        "cancelled, no device is added any more, and the task shows "
                        "aborted with the reason. Runs in flight finish."),
        "/audit": {"get": _op(
            "The audit log", Scope.ADMIN, _ok(_ref("AuditPage"), "One page of entries."),
            description="Every write answered by this server (API, console, CLI), "
                        "refused ones too, newest first. " + _AUTH_ONLY,
            params=[
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000,
                                 "default": 100}, "Page size."),
                _query("cursor", {"type": "string", "pattern": "^[0-9]{1,19}$"},
                       "next_cursor of the previous page."),
                _query("token", {"type": "string", "minLength": 1, "maxLength": 1024,
                                 "pattern": _NO_NUL},
                       "Only the writes of the token with this name."),
                _query("route", {"type": "string", "minLength": 1, "maxLength": 1024,
                                 "pattern": _NO_NUL},
                       "Only this route template, e.g. /tasks/{task_id}/retry."),
                _query("task_id", {"type": "string", "minLength": 1, "maxLength": 1024,
                                 "pattern": _NO_NUL},
                       "Only the writes about this task."),
                _query("since", {"type": "string", "format": "date-time"},
                       "Only entries at or after this time."),
                _query("until", {"type": "string", "format": "date-time"},
                       "Only entries before this time."),
                _query("status", {"type": "string",
                                  "enum": ["1xx", "2xx", "3xx", "4xx", "5xx"]},
                       "Only answers of this status class."),
            ], tag="audit")},
        "/events": {"get": _events_op()},
        "/webhooks": {"get": _op(
            "The webhooks", Scope.ADMIN, _ok(_ref("WebhookList"), "Every webhook, its "
                                             "cursor and its deliveries by status."),
            description="Those configured ([[webhooks]]), then any the outbox still "
                        "holds deliveries of. 404 if the store keeps no outbox. "
                        + _AUTH_ONLY,
            errors=(404,), tag="webhooks")},
        "/webhooks/deliveries": {"get": _op(
            "Webhook deliveries", Scope.ADMIN, _ok(_ref("DeliveryPage"),
                                                   "One page of deliveries."),
            description="One delivery per (webhook, event), newest first: its status, "
                        "attempts, next attempt, and the latest error. 404 if the store "
                        "keeps no outbox. " + _AUTH_ONLY,
            errors=(404,), params=[
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000,
                                 "default": 100}, "Page size."),
                _query("cursor", {"type": "string", "pattern": "^[0-9]{1,19}$"},
                       "next_cursor of the previous page."),
                _query("webhook", {"type": "string", "minLength": 1, "maxLength": 1024,
                                   "pattern": _NO_NUL}, "Only this webhook's."),
                _query("status", {"type": "string",
                                  "enum": ["pending", "delivered", "failed"]},
                       "Only deliveries in this status."),
                _query("event_id", {"type": "string", "pattern": "^[0-9]{1,18}$"},
                       "Only the deliveries of this event."),
            ], tag="webhooks")},
        "/webhooks/deliveries/{delivery_id}/retry": {"post": _op(
            "Send a failed delivery again", Scope.ADMIN,
            _ok(_ref("Delivery"), "The delivery, pending and due now."),
            description="A delivery given up (failed) is sent again with a new retry "
                        "schedule (attempts from 0) and the same message id (webhook-id), "
                        "so a receiver that got it after all drops it. 404: no such "
                        "delivery; 409: it is not failed (pending or delivered). "
                        + _AUTH_ONLY,
            body="AuthBody", body_required=False, errors=(404, 409), params=[
                {"name": "delivery_id", "in": "path", "required": True,
                 "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                 "description": "The delivery's id."}],
            tag="webhooks")},
        "/devices": {"get": _op(
            "Devices, online and offline", Scope.READ,
            _ok(_ref("PyOnlineDevices"), "The executor's current view."),
            description=_AUTH_ONLY, tag="devices")},
    }


def _events_op() -> Schema:
    """``GET /events``: a stream, not an envelope."""
    op = _op(
        "Follow the event log (Server-Sent Events)", Scope.READ,
        {"description": "An endless text/event-stream: each event is a message with "
                        "`id:` (its id), `event:` (its kind) and `data:` (the Event as "
                        "JSON, one line); `: keepalive` comments on a quiet stream; an "
                        "`id:` line alone when filtered-out events moved the cursor.",
         "content": {"text/event-stream": {"schema": {"type": "string"}},
                     # for the documentation: what each message's data holds
                     "application/json": {"schema": _ref("Event")}}},
        description="The run and task changes, as they are stored, oldest first: "
                    "`Last-Event-ID` (sent by EventSource when it reconnects) or `after` "
                    "resumes after that id, from the store, without gaps, across a "
                    "restart of the server; without either, the stream starts with the "
                    "events to come. At most server.max_streams streams are open at once "
                    "(503 too_many_streams beyond). Not audited (a read). " + _AUTH_ONLY,
        params=[
            _query("after", {"type": "string", "pattern": "^[0-9]{1,18}$"},
                   "Start after this event id (0: from the oldest kept). "
                   "Last-Event-ID wins."),
            {"name": "Last-Event-ID", "in": "header", "required": False,
             "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
             "description": "The id of the last event received: the stream resumes "
                            "after it."},
            _query("task", {"type": "string", "minLength": 1, "maxLength": 1024,
                            "pattern": _NO_NUL}, "Only the events of this task."),
            _query("kinds", {"type": "string", "minLength": 1,
                             "pattern": "^(" + "|".join(k.replace(".", "\\.") for k in KINDS)
                             + ")(,(" + "|".join(k.replace(".", "\\.") for k in KINDS)
                             + "))*$"},
                   "Only events of these kinds, comma-separated: " + ", ".join(KINDS) + "."),
        ], tag="events")
    op["responses"]["503"]["description"] = (
        "Too many event streams are open (too_many_streams, with Retry-After), or the "
        "database is unavailable; retry.")
    return op


def _task_action(
    summary: str, result: str, result_doc: str, *, body: str, description: str
) -> dict[str, Any]:
    """A ``POST /tasks/{task_id}/...`` operation: scope write, optional body, 404."""
    return {"post": _op(summary, Scope.WRITE, _ok(_ref(result), result_doc),
                        description=description, body=body, body_required=False,
                        errors=(404,), params=[_TASK_ID])}


def _extend(base: str, properties: dict[str, Schema], description: str) -> Schema:
    """``base`` with more properties, written out in full: ``allOf`` would not work with
    ``additionalProperties: false``."""
    schema = copy.deepcopy(SCHEMAS[base])
    schema["properties"].update(properties)
    schema["required"] = [*schema["required"], *properties]
    schema["description"] = description
    return schema


SCHEMAS["TaskWithRuns"] = _extend(
    "Task", {"runs": {"type": "array", "items": _ref("Run"),
                      "description": "One page of the task's runs, in target order."},
             "runs_next_cursor": _nullable({"type": "string",
                                            "description": "Pass as ?cursor= for the next "
                                                           "page of runs; null on the "
                                                           "last."})},
    "A task and one page of its runs, in the order of its nodeids (then the devices its "
    "selector chose).",
)
SCHEMAS["NewToken"] = _extend(
    "Token",
    {"token": {"type": "string", "description": "The secret: shown only here, once."}},
    "A new token, with its secret.",
)


@functools.cache
def _document() -> dict[str, Any]:
    schemas = dict(SCHEMAS)
    schemas["Error"] = _envelope(_ref("ErrorData"))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "GhostRunner",
            "version": ghostrunner.__version__,
            "description": "Queue shell commands for MeshCentral devices that are offline; "
                           "they run when each device comes online. Every answer is the "
                           "envelope {status, message, data}. Any route may also "
                           "answer 408 (request_timeout: the request's headers or body "
                           "came too slowly) or 503 (too many connections), and close the "
                           "connection. See docs/http-api.md.",
        },
        "paths": _paths(),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token; it may instead be sent as `authtoken` "
                                   "in the JSON body.",
                },
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())


@functools.cache
def openapi_json() -> bytes:
    """The OpenAPI document, serialised once."""
    return json.dumps(_document(), separators=(",", ":")).encode("utf-8")

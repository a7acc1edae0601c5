"""JSON in and out of the HTTP API: one cattrs converter, and the seed's task shape.

*The seed API* is the HTTP API of the original GhostRunner server, whose request bodies
this server accepts unchanged (``TaskData``: ``name``, ``command``, ``nodeids``...);
docs/http-api.md says where the answers differ. :func:`task_from_seed` and
:func:`task_to_seed` map its ``TaskData`` to and from :class:`ghostrunner.Task`.

Datetimes travel as ISO-8601 strings and must carry a timezone; unknown keys are
refused (``forbid_extra_keys``), and :func:`structure` turns every failure into a
:class:`~ghostrunner.ValidationError` naming the field, ready for a 4xx answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import cattrs
from cattrs.preconf.json import JsonConverter
from cattrs.preconf.json import make_converter as _make_json_converter

from ghostrunner import RunState, Task, TaskSummary
from ghostrunner.errors import ValidationError
from ghostrunner.tokens import Token

__all__ = [
    "make_converter",
    "structure",
    "task_from_seed",
    "task_to_seed",
]

T = TypeVar("T")


def _parse_datetime(value: Any, _: Any) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an ISO-8601 date and time: {value!r}") from None
    else:
        raise ValueError(f"expected an ISO-8601 string, got {type(value).__name__}")
    if parsed.tzinfo is None:
        raise ValueError("must be timezone-aware (e.g. 2025-05-27T10:15:30Z)")
    return parsed


def _format_datetime(value: datetime) -> str:
    text = value.astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z")


def _strict_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _strict_int(value: Any, _: Any) -> int:
    # 30.0 is an integer to JSON (and JSON Schema): accept it; never a bool or 30.5
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")
    return value


def _strict_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return float(value)


def _strict_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def make_converter() -> JsonConverter:
    """A JSON converter with GhostRunner's rules (aware datetimes, no extra keys, no
    silent coercion of ``"3"`` to 3 or 1 to True)."""
    conv = _make_json_converter(forbid_extra_keys=True)
    conv.register_structure_hook(datetime, _parse_datetime)
    conv.register_unstructure_hook(datetime, _format_datetime)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    # cattrs would iterate a string into a tuple of characters ("node1" -> 5 targets)
    str_tuple = conv.get_structure_hook(tuple[str, ...])

    def _strict_str_tuple(value: Any, type_: Any) -> tuple[str, ...]:
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of strings")
        result: tuple[str, ...] = str_tuple(value, type_)
        return result

    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _strict_str_tuple)
    conv.register_unstructure_hook(
        Token,
        lambda t: {
            "name": t.name,
            "scope": t.scope.value,
            "created_at": _format_datetime(t.created_at),
            "last_used": None if t.last_used is None else _format_datetime(t.last_used),
            "builtin": t.builtin,
        },
    )
    conv.register_unstructure_hook(
        TaskSummary,
        lambda s: {
            **conv.unstructure(s.task),
            "status": s.status.value,
            "counts": {state.value: s.counts.get(state, 0) for state in RunState},
        },
    )
    return conv


converter = make_converter()


def _path(exc: BaseException, path: str = "") -> list[tuple[str, str]]:
    """Flatten a cattrs error tree to (dotted field, message) pairs."""
    if isinstance(exc, ValidationError):
        return [(f"{path}.{exc.field}".lstrip(".") if path else exc.field, exc.message)]
    if isinstance(exc, cattrs.ClassValidationError | cattrs.IterableValidationError):
        out: list[tuple[str, str]] = []
        for sub in exc.exceptions:
            note = next(
                (n for n in getattr(sub, "__notes__", []) if hasattr(n, "name") or
                 hasattr(n, "index")),
                None,
            )
            name = getattr(note, "name", None)
            if name is None and note is not None:
                name = f"[{note.index}]"
            sub_path = path
            if name is not None:
                sub_path = f"{path}{name}" if str(name).startswith("[") else (
                    f"{path}.{name}".lstrip(".")
                )
            out.extend(_path(sub, sub_path))
        return out
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        keys = ", ".join(sorted(exc.extra_fields))
        return [(path or keys, f"unknown field(s): {keys}")]
    if isinstance(exc, KeyError):
        missing = str(exc.args[0]) if exc.args else "?"
        # cattrs notes the missing attribute's name, so ``path`` already ends with it
        return [(path or missing, "is required")]
    return [(path or "body", str(exc) or type(exc).__name__)]


def structure(data: Any, cls: type[T], conv: JsonConverter | None = None) -> T:
    """Build a ``cls`` from JSON-like ``data``.

    Raises:
        ValidationError: naming the first bad field (all problems are in the message).
    """
    conv = conv or converter
    if not isinstance(data, Mapping):
        raise ValidationError("body", "must be a JSON object")
    try:
        return conv.structure(data, cls)
    except ValidationError:
        raise
    except Exception as exc:
        problems = _path(exc)
        field, _ = problems[0]
        message = "; ".join(f"{f}: {m}" for f, m in problems)
        err = ValidationError(field, message)
        err.args = (message,)
        raise err from exc


def task_from_seed(data: Mapping[str, Any], **options: Any) -> Task:
    """A :class:`Task` from the seed document's ``TaskData`` JSON
    (``name``, ``command``, ``nodeids``, ``creation``, ``status``).

    ``creation`` becomes ``created_at`` when given; ``status`` is derived from the runs
    and so is not an input. ``options`` sets the other Task fields.
    """
    allowed = {"name", "command", "nodeids", "creation", "status"}
    extra = set(data) - allowed
    if extra:
        raise ValidationError(sorted(extra)[0], "unknown field")
    fields: dict[str, Any] = {
        "name": data.get("name"),
        "command": data.get("command"),
        "targets": data.get("nodeids"),
        **options,
    }
    for key, seed_key in (("name", "name"), ("command", "command"), ("targets", "nodeids")):
        if fields[key] is None:
            raise ValidationError(seed_key, "is required")
    if not isinstance(fields["targets"], list):
        raise ValidationError("nodeids", "must be a list of node ids")
    if data.get("creation") is not None and "created_at" not in options:
        try:
            fields["created_at"] = _parse_datetime(data["creation"], datetime)
        except ValueError as exc:
            raise ValidationError("creation", str(exc)) from None
    try:
        return Task(**fields)
    except ValidationError as exc:
        seed_name = {"targets": "nodeids", "created_at": "creation"}
        field = exc.field
        for ours, theirs in seed_name.items():
            if field == ours or field.startswith(ours + "["):
                field = theirs + field[len(ours):]
        raise ValidationError(field, exc.message) from None


def task_to_seed(summary: TaskSummary) -> dict[str, Any]:
    """The seed's ``TaskData`` JSON for a task: ``status`` is the task's overall status."""
    task = summary.task
    return {
        "name": task.name,
        "command": task.command,
        "nodeids": list(task.targets),
        "creation": _format_datetime(task.created_at),
        "status": summary.status.value,
    }

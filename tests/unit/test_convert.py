"""The cattrs converter: JSON round trips, field-naming errors, the seed's TaskData."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostrunner import Delivery, RunState, Shell, Task, TaskSummary
from ghostrunner._types import MAX_TIMEOUT
from ghostrunner.errors import ValidationError
from ghostrunner.tokens import Scope
from ghostrunner_http._convert import make_converter, structure, task_from_seed, task_to_seed
from ghostrunner_http._tokens import new_token

# Copied byte for byte from the seed document (SEED.md, "TaskData").
SEED_TASK_DATA = """{
  "name": "UpdateScript",
  "command": "sudo apt update && sudo apt upgrade -y",
  "nodeids": ["node-001", "node-002", "node-003"],
  "creation": "2025-05-27T10:15:30Z",
  "status": "pending"
}"""

# --------------------------------------------------------------------------- strategies

# fixed offsets strictly inside (-24h, +24h), down to the second, plus UTC
_offsets = st.one_of(
    st.just(UTC),
    st.sampled_from([timedelta(hours=h) for h in (-12, -8, -5, 1, 2, 9, 14)]).map(timezone),
    st.integers(min_value=-(24 * 3600 - 1), max_value=24 * 3600 - 1).map(
        lambda s: timezone(timedelta(seconds=s))
    ),
)
_aware = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=_offsets
)

# any non-NUL text that is not blank; includes non-ASCII, emoji, control characters
_char = st.characters(exclude_characters="\x00", codec="utf-8")
_text = st.text(_char, min_size=1, max_size=40).filter(lambda s: s.strip())
# node ids as a Task takes them: no control characters, no whitespace at either end
_node = st.text(st.characters(exclude_categories=["Cc"], codec="utf-8"), min_size=1,
                max_size=30).map(str.strip).filter(bool)


@st.composite
def tasks(draw: st.DrawFn) -> Task:
    not_before = draw(st.none() | _aware)
    expires_at: datetime | None
    if draw(st.booleans()):
        expires_at = None
    elif not_before is None:
        expires_at = draw(_aware)
    else:
        delta = draw(st.integers(min_value=1, max_value=10**12))
        expires_at = not_before + timedelta(microseconds=delta)
    kwargs: dict[str, Any] = {
        "name": draw(_text),
        "command": draw(st.text(_char, min_size=1, max_size=200).filter(lambda s: s.strip())),
        "targets": draw(st.lists(_node, min_size=1, max_size=6, unique=True)),
        "created_at": draw(_aware),
        "shell": draw(st.sampled_from(list(Shell))),
        "run_as_user": draw(st.booleans()),
        "timeout": draw(
            st.floats(min_value=0, max_value=MAX_TIMEOUT, exclude_min=True)
            | st.integers(min_value=1, max_value=int(MAX_TIMEOUT))
        ),
        "not_before": not_before,
        "expires_at": expires_at,
        "max_attempts": draw(st.integers(min_value=1, max_value=100)),
        "delivery": draw(st.sampled_from(list(Delivery))),
    }
    if draw(st.booleans()):
        kwargs["id"] = draw(st.text(_char, min_size=1, max_size=64).filter(lambda s: s.strip()))
    return Task(**kwargs)


# --------------------------------------------------------------------------- round trips


CONV = make_converter()


@settings(deadline=None)  # the first example pays for cattrs' code generation
@given(tasks())
def test_task_json_round_trip(task: Task) -> None:
    conv = CONV
    text = conv.dumps(task)
    assert isinstance(text, str)
    back = conv.loads(text, Task)
    assert back == task
    # datetimes travel normalised to UTC, with a Z
    data = json.loads(text)
    assert data["created_at"].endswith("Z")
    assert back.created_at.utcoffset() == timedelta(0)
    # and a second trip gives the same document
    assert json.loads(conv.dumps(back)) == data


@settings(deadline=None)  # the first example pays for cattrs' code generation
@given(tasks())
def test_task_round_trip_through_structure(task: Task) -> None:
    conv = CONV
    data = json.loads(conv.dumps(task))
    assert structure(data, Task, conv) == task
    assert structure(data, Task) == task


@settings(deadline=None)  # the first example pays for cattrs' code generation
@given(tasks(), st.dictionaries(st.sampled_from(list(RunState)), st.integers(0, 5)))
def test_summary_unstructure(task: Task, counts: dict[RunState, int]) -> None:
    summary = TaskSummary(task=task, counts=counts)
    data = json.loads(CONV.dumps(summary))
    assert data["status"] == summary.status.value
    assert data["counts"] == {s.value: counts.get(s, 0) for s in RunState}
    assert data["id"] == task.id
    assert data["targets"] == list(task.targets)


def test_token_unstructure_never_shows_the_hash() -> None:
    token, secret = new_token("deploy", Scope.WRITE)
    text = make_converter().dumps(token)
    assert secret not in text
    assert token.secret_hash not in text
    assert json.loads(text)["scope"] == "write"
    assert json.loads(text)["name"] == "deploy"


def test_datetime_formats() -> None:
    conv = make_converter()
    plus2 = timezone(timedelta(hours=2))
    assert conv.unstructure(datetime(2025, 5, 27, 12, 15, 30, tzinfo=plus2)) == (
        "2025-05-27T10:15:30Z"
    )
    parsed = conv.structure("2025-05-27T12:15:30+02:00", datetime)
    assert parsed == datetime(2025, 5, 27, 10, 15, 30, tzinfo=UTC)


# --------------------------------------------------------------------------- errors

MINIMAL: dict[str, Any] = {"name": "x", "command": "y", "targets": ["node1"]}


def structure_error(data: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        structure(data, Task)
    return info.value


def test_minimal_document() -> None:
    task = structure(dict(MINIMAL), Task)
    assert task.targets == ("node1",)
    assert task.delivery is Delivery.AT_MOST_ONCE


def test_string_targets_are_refused() -> None:
    err = structure_error({"name": "x", "command": "y", "targets": "node1"})
    assert err.field == "targets"


@pytest.mark.parametrize("targets", [{"node1": 1}, 5, None])
def test_non_list_targets_are_refused(targets: Any) -> None:
    assert structure_error({**MINIMAL, "targets": targets}).field == "targets"


def test_extra_key_is_named() -> None:
    err = structure_error({**MINIMAL, "priority": 5})
    assert "priority" in err.field
    assert "priority" in str(err)


@pytest.mark.parametrize("value", ["10", True, None, [1], {"s": 1}])
def test_wrong_type_for_timeout(value: Any) -> None:
    assert structure_error({**MINIMAL, "timeout": value}).field == "timeout"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_attempts", "3"),
        ("max_attempts", 2.5),
        ("max_attempts", True),
        ("max_attempts", 0),
        ("run_as_user", 1),
        ("run_as_user", "true"),
        ("shell", "bash"),
        ("delivery", "exactly_once"),
        ("name", 5),
        ("name", ""),
        ("command", ["ls"]),
        ("command", "a\x00b"),
        ("created_at", "2025-05-27T10:15:30"),
        ("created_at", "yesterday"),
        ("created_at", 1748340930),
        ("timeout", 0),
        ("timeout", -5),
    ],
)
def test_bad_field_is_named(key: str, value: Any) -> None:
    err = structure_error({**MINIMAL, key: value})
    assert err.field == key
    assert str(err).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("targets", "field"),
    [
        ([1], "targets[0]"),
        (["a", 2], "targets[1]"),
        (["a", "a"], "targets[1]"),
        ([""], "targets[0]"),
    ],
)
def test_bad_target_is_named_with_its_index(targets: list[Any], field: str) -> None:
    assert structure_error({**MINIMAL, "targets": targets}).field == field


@pytest.mark.parametrize("missing", ["name", "command", "targets"])
def test_missing_field_is_named(missing: str) -> None:
    data = {k: v for k, v in MINIMAL.items() if k != missing}
    err = structure_error(data)
    assert err.field == missing
    assert "required" in str(err)


def test_expires_before_not_before() -> None:
    err = structure_error(
        {**MINIMAL, "not_before": "2025-01-02T00:00:00Z", "expires_at": "2025-01-01T00:00:00Z"}
    )
    assert err.field == "expires_at"


@pytest.mark.parametrize("body", [[], "task", 3, None])
def test_non_object_body(body: Any) -> None:
    assert structure_error(body).field == "body"


def test_all_problems_are_in_the_message() -> None:
    err = structure_error(
        {"name": "x", "command": "y", "targets": ["a"], "timeout": "x", "max_attempts": "y"}
    )
    assert err.field in {"timeout", "max_attempts"}
    assert "timeout" in str(err)
    assert "max_attempts" in str(err)


# --------------------------------------------------------------------------- seed TaskData


def test_seed_task_data_maps_onto_task() -> None:
    data = json.loads(SEED_TASK_DATA)
    task = task_from_seed(data)
    assert task.name == "UpdateScript"
    assert task.command == "sudo apt update && sudo apt upgrade -y"
    assert task.targets == ("node-001", "node-002", "node-003")
    assert task.created_at == datetime(2025, 5, 27, 10, 15, 30, tzinfo=UTC)


def test_seed_task_data_round_trip() -> None:
    data = json.loads(SEED_TASK_DATA)
    task = task_from_seed(data)
    summary = TaskSummary(task=task, counts={RunState.PENDING: len(task.targets)})
    assert task_to_seed(summary) == data
    # and the text is the seed's, key order included
    assert json.dumps(task_to_seed(summary)) == json.dumps(data)


@pytest.mark.parametrize(
    ("counts", "status"),
    [
        ({RunState.PENDING: 2, RunState.DISPATCHED: 1}, "running"),
        ({RunState.SUCCEEDED: 3}, "succeeded"),
        ({RunState.SUCCEEDED: 2, RunState.LOST: 1}, "failed"),
        ({RunState.CANCELLED: 3}, "cancelled"),
    ],
)
def test_seed_status_is_derived(counts: dict[RunState, int], status: str) -> None:
    task = task_from_seed(json.loads(SEED_TASK_DATA))
    assert task_to_seed(TaskSummary(task=task, counts=counts))["status"] == status


def test_seed_options_set_other_fields() -> None:
    data = json.loads(SEED_TASK_DATA)
    task = task_from_seed(data, delivery="at_least_once", max_attempts=5)
    assert task.delivery is Delivery.AT_LEAST_ONCE
    assert task.max_attempts == 5
    when = datetime(2030, 1, 1, tzinfo=UTC)
    assert task_from_seed(data, created_at=when).created_at == when


def test_seed_without_creation_gets_now() -> None:
    data = {k: v for k, v in json.loads(SEED_TASK_DATA).items() if k != "creation"}
    before = datetime.now(UTC)
    task = task_from_seed(data)
    assert before <= task.created_at <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"nodeids": "node-001"}, "nodeids"),
        ({"nodeids": []}, "nodeids"),
        ({"nodeids": ["a", "a"]}, "nodeids[1]"),
        ({"nodeids": ["a", ""]}, "nodeids[1]"),
        ({"nodeids": None}, "nodeids"),
        ({"name": None}, "name"),
        ({"name": ""}, "name"),
        ({"command": None}, "command"),
        ({"creation": "2025-05-27T10:15:30"}, "creation"),
        ({"creation": "soon"}, "creation"),
        ({"authtoken": "abc"}, "authtoken"),
    ],
)
def test_seed_errors_use_seed_names(change: dict[str, Any], field: str) -> None:
    data = {**json.loads(SEED_TASK_DATA), **change}
    with pytest.raises(ValidationError) as info:
        task_from_seed(data)
    assert info.value.field == field


@settings(deadline=None)  # the first example pays for cattrs' code generation
@given(tasks(), st.sampled_from(list(RunState)))
def test_seed_round_trip_property(task: Task, state: RunState) -> None:
    summary = TaskSummary(task=task, counts={state: len(task.targets)})
    seed = json.loads(json.dumps(task_to_seed(summary)))
    back = task_from_seed(seed, id=task.id)
    assert back.name == task.name
    assert back.command == task.command
    assert back.targets == task.targets
    assert back.created_at == task.created_at
    assert seed["status"] == summary.status.value


def test_an_integral_float_is_an_integer() -> None:
    """JSON (and JSON Schema) has no separate integers: 3.0 is 3; 3.5 and true are not."""
    conv = make_converter()
    assert conv.structure(3.0, int) == 3
    assert type(conv.structure(3.0, int)) is int

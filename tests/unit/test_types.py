"""GhostRunner's values: validation at construction, the run state machine, tokens."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import attrs
import pytest

from ghostrunner import (
    Delivery,
    Outcome,
    Run,
    RunState,
    Shell,
    Task,
    TaskQuery,
    TaskStatus,
    TaskSummary,
)
from ghostrunner._types import (
    ACTIVE_STATES,
    MAX_COMMAND,
    MAX_NAME,
    MAX_TARGETS,
    MAX_TIMEOUT,
    RETRYABLE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    new_id,
    task_status,
)
from ghostrunner.errors import ValidationError
from ghostrunner.tokens import Scope, Token
from ghostrunner_http._tokens import hash_secret, new_token, verify_secret

T0 = datetime(2025, 5, 27, 10, 15, 30, tzinfo=UTC)
NAIVE = datetime(2025, 5, 27, 10, 15, 30)


def task(**overrides: Any) -> Task:
    fields: dict[str, Any] = {"name": "update", "command": "apt update", "targets": ["node//a"]}
    fields.update(overrides)
    return Task(**fields)


def rejects(field: str, **overrides: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        task(**overrides)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    return info.value


# --------------------------------------------------------------------------- Task


def test_valid_task_defaults() -> None:
    t = task()
    assert t.targets == ("node//a",)
    assert t.shell is Shell.AUTO
    assert t.delivery is Delivery.AT_MOST_ONCE
    assert t.max_attempts == 3
    assert t.timeout == 300.0
    assert t.run_as_user is False
    assert t.created_at.tzinfo is not None
    assert re.fullmatch(r"[0-9a-f]{32}", t.id)


def test_task_is_frozen() -> None:
    t = task()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        t.command = "rm -rf /"  # type: ignore[misc]
    assert attrs.evolve(t, command="ls").command == "ls"


def test_task_converts_enum_strings_and_target_lists() -> None:
    t = task(shell="powershell", delivery="at_least_once", targets=["a", "b"])
    assert t.shell is Shell.POWERSHELL
    assert t.delivery is Delivery.AT_LEAST_ONCE
    assert t.targets == ("a", "b")
    assert task(targets=iter(["x", "y"])).targets == ("x", "y")


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_rejects_empty_name(value: str) -> None:
    rejects("name", name=value)


def test_rejects_long_name_and_non_string_name() -> None:
    task(name="n" * MAX_NAME)
    rejects("name", name="n" * (MAX_NAME + 1))
    rejects("name", name=42)
    rejects("name", name=None)


@pytest.mark.parametrize("value", ["", "  ", "\n"])
def test_rejects_empty_command(value: str) -> None:
    rejects("command", command=value)


def test_rejects_nul_in_command_and_name() -> None:
    err = rejects("command", command="echo a\x00b")
    assert "NUL" in err.message
    rejects("name", name="a\x00")


def test_command_length_limit() -> None:
    task(command="x" * MAX_COMMAND)
    rejects("command", command="x" * (MAX_COMMAND + 1))


def test_rejects_empty_targets() -> None:
    rejects("targets", targets=[])
    rejects("targets", targets=())


@pytest.mark.parametrize("value", ["node//a", ""])
def test_rejects_string_targets(value: str) -> None:
    err = rejects("targets", targets=value)
    assert "string" in err.message


def test_rejects_duplicate_target_naming_its_index() -> None:
    err = rejects("targets[2]", targets=["a", "b", "a"])
    assert "duplicate" in err.message


@pytest.mark.parametrize(
    ("targets", "field"),
    [
        (["a", ""], "targets[1]"),
        (["  "], "targets[0]"),
        (["a", 7], "targets[1]"),
        ([None], "targets[0]"),
        (["a", "b", "x" * 257], "targets[2]"),
        (["a\x00b"], "targets[0]"),
    ],
)
def test_rejects_bad_node_ids(targets: list[Any], field: str) -> None:
    rejects(field, targets=targets)


@pytest.mark.parametrize(
    ("node", "says"),
    [
        ("node//a ", "whitespace"),
        (" node//a", "whitespace"),
        ("node//a\n", "whitespace"),
        ("\u00a0node//a", "whitespace"),
        ("node//a\u3000", "whitespace"),
        ("node//\x1ba", "control characters ('\\x1b' at 6)"),
        ("node//a\tb", "control characters"),
        ("node//a\x7fb", "control characters"),
        ("node//a\x85b", "control characters"),
        ("a\x00b", "control characters"),
    ],
)
def test_node_ids_no_device_can_have_are_refused(node: str, says: str) -> None:
    """A run for such a node id would stay pending forever (#12)."""
    err = rejects("targets[1]", targets=["node//ok", node])
    assert says in err.message, err.message


@pytest.mark.parametrize("node", ["node//a b", "node//ñé-✓", "x", "node//" + "a" * 250,
                                  "node//a\u200bb"])
def test_node_ids_with_inner_spaces_and_any_letters_are_fine(node: str) -> None:
    assert task(targets=[node]).targets == (node,)


def test_target_count_limit() -> None:
    assert len(task(targets=[f"n{i}" for i in range(MAX_TARGETS)]).targets) == MAX_TARGETS
    rejects("targets", targets=[f"n{i}" for i in range(MAX_TARGETS + 1)])


@pytest.mark.parametrize("field", ["created_at", "not_before", "expires_at"])
def test_rejects_naive_datetimes(field: str) -> None:
    err = rejects(field, **{field: NAIVE})
    assert "timezone" in err.message


@pytest.mark.parametrize("field", ["created_at", "not_before", "expires_at"])
def test_rejects_non_datetimes(field: str) -> None:
    rejects(field, **{field: "2025-05-27T10:15:30Z"})


def test_accepts_aware_datetimes_in_any_offset() -> None:
    plus5 = timezone(timedelta(hours=5, minutes=30))
    t = task(created_at=T0.astimezone(plus5), not_before=T0, expires_at=T0 + timedelta(1))
    assert t.created_at == T0


@pytest.mark.parametrize("delta", [timedelta(0), timedelta(seconds=-1), timedelta(days=-3)])
def test_rejects_expires_at_not_after_not_before(delta: timedelta) -> None:
    err = rejects("expires_at", not_before=T0, expires_at=T0 + delta)
    assert "not_before" in err.message


def test_expires_at_after_not_before_is_fine() -> None:
    t = task(not_before=T0, expires_at=T0 + timedelta(microseconds=1))
    assert t.expires_at is not None
    assert t.not_before is not None
    assert t.expires_at > t.not_before


@pytest.mark.parametrize("value", ["bash", "SH", "", None, 1])
def test_rejects_bad_shell(value: Any) -> None:
    err = rejects("shell", shell=value)
    assert "auto" in err.message


@pytest.mark.parametrize("value", ["exactly_once", "AT_MOST_ONCE", "", None])
def test_rejects_bad_delivery(value: Any) -> None:
    err = rejects("delivery", delivery=value)
    assert "at_most_once" in err.message


@pytest.mark.parametrize(
    "value",
    [0, 0.0, -1, -0.001, math.nan, math.inf, -math.inf, MAX_TIMEOUT + 1, True, False, "10", None],
)
def test_rejects_bad_timeout(value: Any) -> None:
    rejects("timeout", timeout=value)


@pytest.mark.parametrize("value", [0.001, 1, 2.5, MAX_TIMEOUT])
def test_accepts_good_timeout(value: float) -> None:
    assert task(timeout=value).timeout == value


@pytest.mark.parametrize("value", [0, -1, 101, 1000, True, 1.0, 2.5, "3", None])
def test_rejects_bad_max_attempts(value: Any) -> None:
    rejects("max_attempts", max_attempts=value)


@pytest.mark.parametrize("value", [1, 2, 100])
def test_accepts_good_max_attempts(value: int) -> None:
    assert task(max_attempts=value).max_attempts == value


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_rejects_non_bool_run_as_user(value: Any) -> None:
    rejects("run_as_user", run_as_user=value)


def test_rejects_bad_id() -> None:
    rejects("id", id="")
    rejects("id", id="x" * 65)


def test_validation_error_is_a_value_error_with_field_and_message() -> None:
    err = ValidationError("targets[1]", "duplicate")
    assert isinstance(err, ValueError)
    assert err.field == "targets[1]"
    assert err.message == "duplicate"
    assert str(err) == "targets[1]: duplicate"


def test_first_runs() -> None:
    t = task(targets=["c", "a", "b"], expires_at=T0 + timedelta(hours=1))
    runs = t.first_runs(T0)
    assert [r.node_id for r in runs] == ["c", "a", "b"]
    for run in runs:
        assert run.task_id == t.id
        assert run.state is RunState.PENDING
        assert run.attempts == 0
        assert run.undelivered == 0
        assert run.queued_at == T0
        assert run.available_at == T0
        assert run.expires_at == t.expires_at
        assert not run.terminal


def test_first_runs_wait_for_not_before() -> None:
    later = T0 + timedelta(minutes=5)
    (run,) = task(not_before=later).first_runs(T0)
    assert run.available_at == later
    assert run.queued_at == T0


def test_new_ids_are_unique_uuid7_layout() -> None:
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for value in ids[:50]:
        assert re.fullmatch(r"[0-9a-f]{32}", value)
        assert value[12] == "7"  # version nibble
        assert value[16] in "89ab"  # RFC 4122 variant
    # time-ordered at millisecond resolution: the 48-bit timestamp prefix never decreases
    stamps = [int(v[:12], 16) for v in ids]
    assert stamps == sorted(stamps)


def test_run_key() -> None:
    run = Run(task_id="t", node_id="n", queued_at=T0, available_at=T0)
    assert run.key.task_id == "t"
    assert run.key.node_id == "n"
    assert str(run.key) == "t/n"


def test_run_rejects_naive_times() -> None:
    with pytest.raises(ValidationError) as info:
        Run(task_id="t", node_id="n", queued_at=NAIVE)
    assert info.value.field == "queued_at"


# --------------------------------------------------------------------------- state machine


def test_states_partition() -> None:
    assert set(RunState) == TERMINAL_STATES | ACTIVE_STATES
    assert not TERMINAL_STATES & ACTIVE_STATES
    for state in RunState:
        assert state.terminal == (state in TERMINAL_STATES)


def test_a_terminal_state_is_left_only_by_a_retry() -> None:
    assert set(TRANSITIONS) == ACTIVE_STATES | RETRYABLE_STATES
    assert RunState.SUCCEEDED not in TRANSITIONS  # a success is never retried
    for state in RETRYABLE_STATES:
        assert TRANSITIONS[state] == {RunState.PENDING}


def test_transitions_from_active_states() -> None:
    assert TRANSITIONS[RunState.PENDING] == {
        RunState.DISPATCHED,
        RunState.EXPIRED,
        RunState.CANCELLED,
    }
    # a dispatched run cannot be cancelled or expire: it may be running
    assert RunState.CANCELLED not in TRANSITIONS[RunState.DISPATCHED]
    assert RunState.EXPIRED not in TRANSITIONS[RunState.DISPATCHED]
    assert RunState.PENDING in TRANSITIONS[RunState.DISPATCHED]
    assert RunState.LOST in TRANSITIONS[RunState.DISPATCHED]
    # lost only comes from dispatched (something may have run)
    assert RunState.LOST not in TRANSITIONS[RunState.PENDING]


@pytest.mark.parametrize(
    ("counts", "status"),
    [
        ({}, TaskStatus.PENDING),
        ({RunState.PENDING: 3}, TaskStatus.PENDING),
        ({RunState.PENDING: 2, RunState.DISPATCHED: 1}, TaskStatus.RUNNING),
        ({RunState.PENDING: 1, RunState.SUCCEEDED: 1}, TaskStatus.RUNNING),
        ({RunState.DISPATCHED: 1}, TaskStatus.RUNNING),
        ({RunState.SUCCEEDED: 3}, TaskStatus.SUCCEEDED),
        ({RunState.CANCELLED: 2}, TaskStatus.CANCELLED),
        ({RunState.SUCCEEDED: 2, RunState.FAILED: 1}, TaskStatus.FAILED),
        ({RunState.SUCCEEDED: 1, RunState.CANCELLED: 1}, TaskStatus.FAILED),
        ({RunState.LOST: 1}, TaskStatus.FAILED),
        ({RunState.EXPIRED: 1}, TaskStatus.FAILED),
        ({RunState.TIMED_OUT: 1}, TaskStatus.FAILED),
        ({RunState.SUCCEEDED: 0, RunState.PENDING: 1}, TaskStatus.PENDING),
        # some cancelled, the rest waiting, nothing started: still pending
        ({RunState.PENDING: 2, RunState.CANCELLED: 1}, TaskStatus.PENDING),
    ],
)
def test_task_status(counts: dict[RunState, int], status: TaskStatus) -> None:
    assert task_status(counts) is status
    assert TaskSummary(task=task(), counts=counts).status is status


@pytest.mark.parametrize(
    ("counts", "paused", "aborted", "status"),
    [
        ({RunState.PENDING: 2}, True, False, TaskStatus.PAUSED),
        ({RunState.DISPATCHED: 1, RunState.PENDING: 1}, True, False, TaskStatus.PAUSED),
        ({}, True, False, TaskStatus.PAUSED),  # a continuous task waiting for devices
        ({RunState.SUCCEEDED: 2}, True, False, TaskStatus.SUCCEEDED),  # nothing left to hold
        ({RunState.FAILED: 1, RunState.CANCELLED: 3}, False, True, TaskStatus.ABORTED),
        ({RunState.DISPATCHED: 1, RunState.CANCELLED: 3}, True, True, TaskStatus.ABORTED),
    ],
)
def test_task_status_paused_or_aborted(
    counts: dict[RunState, int], paused: bool, aborted: bool, status: TaskStatus
) -> None:
    assert task_status(counts, paused=paused, aborted=aborted) is status
    summary = TaskSummary(task=task(), counts=counts, paused=paused,
                          aborted="reason" if aborted else None)
    assert summary.status is status


@pytest.mark.parametrize(
    ("outcome", "state"),
    [
        (Outcome(exit_code=0), RunState.SUCCEEDED),
        (Outcome(exit_code=1), RunState.FAILED),
        (Outcome(exit_code=None), RunState.FAILED),
        (Outcome(exit_code=None, timed_out=True), RunState.TIMED_OUT),
    ],
)
def test_outcome_state(outcome: Outcome, state: RunState) -> None:
    assert outcome.state is state


def test_outcome_rejects_naive_times() -> None:
    with pytest.raises(ValidationError) as info:
        Outcome(exit_code=0, finished_at=NAIVE)
    assert info.value.field == "finished_at"


@pytest.mark.parametrize("limit", [0, -1, 1001, True, 2.0, "5"])
def test_task_query_rejects_bad_limit(limit: Any) -> None:
    with pytest.raises(ValidationError) as info:
        TaskQuery(limit=limit)
    assert info.value.field == "limit"


def test_task_query_accepts_limits() -> None:
    assert TaskQuery(limit=1).limit == 1
    assert TaskQuery(limit=1000).limit == 1000


# --------------------------------------------------------------------------- tokens


def test_scope_order() -> None:
    assert Scope.ADMIN.allows(Scope.WRITE)
    assert Scope.ADMIN.allows(Scope.READ)
    assert Scope.WRITE.allows(Scope.READ)
    assert Scope.WRITE.allows(Scope.WRITE)
    assert not Scope.WRITE.allows(Scope.ADMIN)
    assert not Scope.READ.allows(Scope.WRITE)


def test_token_scopes() -> None:
    token, _ = new_token("ci", Scope.WRITE)
    assert token.scopes == {Scope.READ, Scope.WRITE}


def test_new_token_generates_secret_and_keeps_only_its_hash() -> None:
    token, secret = new_token("deploy", Scope.ADMIN, now=T0)
    assert secret.startswith("gr_")
    assert len(secret) > 40
    assert token.name == "deploy"
    assert token.scope is Scope.ADMIN
    assert token.created_at == T0
    assert token.secret_hash == hash_secret(secret)
    assert token.secret_hash != secret
    assert secret not in attrs.asdict(token).values()
    other, other_secret = new_token("deploy2")
    assert other_secret != secret
    assert other.scope is Scope.READ
    assert not other.builtin


def test_token_repr_hides_secret_and_hash() -> None:
    token, secret = new_token("deploy", Scope.WRITE)
    for text in (repr(token), str(token)):
        assert secret not in text
        assert token.secret_hash not in text
        assert "deploy" in text


def test_verify_secret() -> None:
    token, secret = new_token("t", secret="gr_known-secret", builtin=True)
    assert secret == "gr_known-secret"
    assert token.builtin
    assert verify_secret(secret, token)
    assert not verify_secret(secret + "x", token)
    assert not verify_secret("", token)
    assert hash_secret(secret) == hash_secret("gr_known-secret")
    assert hash_secret("a") != hash_secret("b")


def test_token_validation() -> None:
    with pytest.raises(ValidationError) as info:
        Token(name="", secret_hash="h")
    assert info.value.field == "name"
    with pytest.raises(ValidationError) as info:
        Token(name="x", secret_hash="h", scope="root")
    assert info.value.field == "scope"
    with pytest.raises(ValidationError) as info:
        Token(name="x", secret_hash="h", created_at=NAIVE)
    assert info.value.field == "created_at"
    assert Token(name="x", secret_hash="h", scope="write").scope is Scope.WRITE

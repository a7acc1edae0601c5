"""Fleet targeting and rollout values: Selector matching, the Rollout abort rule,
success exit codes. Pure: no store, no loop."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghostrunner import Device, Outcome, Rollout, RunState, Selector, Task
from ghostrunner._planner import decide
from ghostrunner._types import Run, TagsMode
from ghostrunner.errors import ValidationError

PI = Device(node_id="node//pi7", name="rpi-07", group_id="mesh//g1", group_name="Pis",
            tags=("arm", "Lab"), os="Raspbian GNU/Linux 12")
SRV = Device(node_id="node//srv", name="server-1", group_id="mesh//g2", group_name="servers",
             tags=("x86",), os="Ubuntu 24.04")
BARE = Device(node_id="node//bare")


@pytest.mark.parametrize(
    ("selector", "pi", "srv", "bare"),
    [
        (Selector(all=True), True, True, True),
        (Selector(group="pis"), True, False, False),  # by name, any case
        (Selector(group="mesh//g2"), False, True, False),  # by id, exactly
        (Selector(group="mesh//G2"), False, False, False),
        (Selector(tags=["ARM"]), True, False, False),
        (Selector(tags=["arm", "lab"]), True, False, False),  # all (default)
        (Selector(tags=["arm", "x86"]), False, False, False),
        (Selector(tags=["arm", "x86"], tags_mode="any"), True, True, False),
        (Selector(os="raspbian"), True, False, False),
        (Selector(os="LINUX"), True, False, False),
        (Selector(name="rpi-*"), True, False, False),
        (Selector(name="RPI-0?"), True, False, False),
        (Selector(name="*"), True, True, True),
        (Selector(name="server-[12]"), False, True, False),
        (Selector(group="pis", tags=["x86"]), False, False, False),  # fields AND
        (Selector(all=True, group="servers"), False, True, False),
    ],
)
def test_selector_matches(selector: Selector, pi: bool, srv: bool, bare: bool) -> None:
    assert (selector.matches(PI), selector.matches(SRV), selector.matches(BARE)) == (
        pi, srv, bare)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "select"),
        ({"all": False}, "select"),
        ({"tags": "arm"}, "tags"),
        ({"tags": ["arm", " "]}, "tags[1]"),
        ({"tags": ["a"], "tags_mode": "some"}, "tags_mode"),
        ({"group": ""}, "group"),
        ({"name": "x" * 201}, "name"),
        ({"all": 1}, "all"),
    ],
)
def test_selector_validation_names_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        Selector(**fields)
    assert err.value.field == field


def test_selector_equality_and_text() -> None:
    a = Selector(tags=["arm"], tags_mode=TagsMode.ANY, name="rpi-*")
    assert a == Selector(tags=("arm",), tags_mode="any", name="rpi-*")
    assert hash(a) == hash(Selector(tags=("arm",), tags_mode="any", name="rpi-*"))
    assert str(a) == "tags(any)=arm AND name=rpi-*"
    assert str(Selector(all=True)) == "all devices"


names = st.text(st.characters(codec="utf-8", exclude_characters="*?[]\\\x00"), max_size=12)


@given(name=names)
def test_a_name_without_wildcards_matches_itself_in_any_case(name: str) -> None:
    selector = Selector(name=name) if name.strip() else Selector(all=True)
    device = Device(node_id="n", name=name.upper())
    assert selector.matches(device) == (
        not name.strip() or name.casefold() == name.upper().casefold())


@pytest.mark.parametrize(
    ("rollout", "finished", "failed", "aborts"),
    [
        (Rollout(), 10, 10, False),  # no rule
        (Rollout(abort_failed_pct=20), 1, 1, True),  # default: from the first finish
        (Rollout(abort_failed_pct=20, abort_min_finished=5), 4, 4, False),
        (Rollout(abort_failed_pct=20, abort_min_finished=5), 5, 1, False),  # 20%: not more
        (Rollout(abort_failed_pct=20, abort_min_finished=5), 5, 2, True),
        (Rollout(abort_failed_pct=0, abort_min_finished=3), 3, 1, True),
        (Rollout(abort_failed_pct=0, abort_min_finished=3), 3, 0, False),
    ],
)
def test_abort_rule(rollout: Rollout, finished: int, failed: int, aborts: bool) -> None:
    reason = rollout.should_abort(finished, failed)
    assert (reason is not None) == aborts
    if reason:
        assert f"{failed} of {finished}" in reason


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"per_minute": 1.5}, "per_minute"),
        ({"abort_failed_pct": 100}, "abort_failed_pct"),
        ({"abort_failed_pct": -1}, "abort_failed_pct"),
        ({"abort_min_finished": 0}, "abort_min_finished"),
    ],
)
def test_rollout_validation(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        Rollout(**fields)
    assert err.value.field == field


def test_task_targets_or_selector() -> None:
    with pytest.raises(ValidationError) as err:
        Task(name="t", command="c", targets=[])
    assert err.value.field == "targets"
    task = Task(name="t", command="c", targets=[], select=Selector(tags=["arm"]))
    assert task.targets == ()
    with pytest.raises(ValidationError) as err:
        Task(name="t", command="c", targets=["a"], continuous=True)
    assert err.value.field == "continuous"


@pytest.mark.parametrize("codes", [[], [0.5], ["0"], [True], list(range(300))])
def test_success_exit_codes_validation(codes: list[Any]) -> None:
    with pytest.raises(ValidationError) as err:
        Task(name="t", command="c", targets=["a"], success_exit_codes=codes)
    assert err.value.field.startswith("success_exit_codes")


@pytest.mark.parametrize(
    ("codes", "exit_code", "timed_out", "state"),
    [
        ((0,), 0, False, RunState.SUCCEEDED),
        ((0,), 1, False, RunState.FAILED),
        ((0, 3010), 3010, False, RunState.SUCCEEDED),  # "reboot required" counts as done
        ((1,), 0, False, RunState.FAILED),
        ((0,), None, True, RunState.TIMED_OUT),
    ],
)
def test_success_exit_codes_decide_the_state(
    codes: tuple[int, ...], exit_code: int | None, timed_out: bool, state: RunState
) -> None:
    task = Task(name="t", command="c", targets=["a"], success_exit_codes=codes)
    run = Run(task_id=task.id, node_id="a", state=RunState.DISPATCHED, attempts=1)
    outcome = Outcome(exit_code=exit_code, timed_out=timed_out)
    assert decide(run, task, outcome, now=run.queued_at).state is state


TAG_POOL = ["arm", "ARM", "x86", "lab", "pi"]
selectors = st.builds(
    Selector,
    group=st.none() | st.sampled_from(["pis", "PIS", "mesh//p", "servers"]),
    tags=st.lists(st.sampled_from(TAG_POOL), max_size=3),
    tags_mode=st.sampled_from(["all", "any"]),
    os=st.none() | st.sampled_from(["rasp", "ubuntu"]),
    name=st.none() | st.sampled_from(["rpi-*", "*", "srv-?"]),
    all=st.just(True),
)
devices = st.builds(
    Device,
    node_id=st.just("n"),
    name=st.sampled_from(["rpi-1", "srv-1", ""]),
    group_id=st.none() | st.sampled_from(["mesh//p", "mesh//s"]),
    group_name=st.none() | st.sampled_from(["pis", "Pis", "servers"]),
    tags=st.lists(st.sampled_from(TAG_POOL), max_size=3),
    os=st.none() | st.sampled_from(["Raspbian", "Ubuntu 24.04"]),
)


@given(select=st.lists(selectors, min_size=1, max_size=8), device=devices)
def test_the_loops_selector_index_never_misses_a_match(
    select: list[Selector], device: Device
) -> None:
    """The loop tests a changed device only against the continuous tasks its index
    offers: every task the device matches must be among them."""
    from ghostrunner._loop import _SelectorIndex

    tasks = [Task(name="t", command="c", targets=[], select=s, continuous=True)
             for s in select]
    offered = {t.id for t in _SelectorIndex(tasks).candidates(device)}
    assert {t.id for t in tasks if t.select and t.select.matches(device)} <= offered

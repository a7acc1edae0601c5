"""Fleet targeting and safe rollouts over HTTP (issue #11): selectors and continuous
tasks in POST /task/create, rollout limits, the abort rule, pause/resume, retry, abort
and the attempt history, through the real app over InMemoryStore + FakeExecutor.

Every answer is checked against the OpenAPI document by the ``api`` fixture."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ghostrunner import Device, Outcome, RunRequest
from ghostrunner.testing import FakeExecutor
from ghostrunner.tokens import Scope
from tests.http.conftest import Api, ApiFactory

# a small fleet: two Raspberry Pis in group "pis" (one offline), a Windows box, a laptop
FLEET = (
    Device(node_id="node//pi-1", name="rpi-kitchen", online=True, group_id="mesh//pis",
           group_name="pis", tags=("arm", "Sensors"), os="Raspbian GNU/Linux 12"),
    Device(node_id="node//pi-2", name="rpi-garage", online=False, group_id="mesh//pis",
           group_name="pis", tags=("arm",), os="Raspbian GNU/Linux 12"),
    Device(node_id="node//win-1", name="desk", online=False, group_id="mesh//office",
           group_name="office", tags=("x86",), os="Windows 11 Pro"),
    Device(node_id="node//lap-1", name="laptop", online=False, group_id="mesh//office",
           group_name="office", tags=("x86", "mobile"), os="Ubuntu 24.04 LTS (Linux)"),
)
PIS = ["node//pi-1", "node//pi-2"]


@pytest.fixture
def fleet(api_factory: ApiFactory) -> Api:
    """An app whose executor knows FLEET (pi-1 online, the others offline)."""
    return api_factory(executor=FakeExecutor(devices=FLEET))


def create(api: Api, **details: Any) -> dict[str, Any]:
    body = {"name": "t", "command": "echo hi", **details}
    r = api.post("/task/create", json={"details": body})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def create_error(api: Api, details: dict[str, Any]) -> str:
    body = {"name": "t", "command": "echo hi", **details}
    r = api.post("/task/create", json={"details": body})
    assert r.status_code == 422, r.text
    field: str = r.json()["data"]["field"]
    return field


def nodes(task: dict[str, Any]) -> list[str]:
    return [run["nodeid"] for run in task["runs"]]


def run_of(task: dict[str, Any], node: str) -> dict[str, Any]:
    found: dict[str, Any] = next(r for r in task["runs"] if r["nodeid"] == node)
    return found


def fail_with(code: int) -> Any:
    def handler(request: RunRequest, device: Device) -> Outcome:
        return Outcome(exit_code=code, output=f"exit {code}\n")

    return handler


# --------------------------------------------------------------------------- select


def test_select_by_tag_gives_offline_devices_a_run_too(fleet: Api) -> None:
    r = fleet.post("/task/create", json={"details": {
        "name": "upgrade", "command": "apt-get -y upgrade", "select": {"tags": ["ARM"]}}})
    assert r.status_code == 200, r.text
    task = r.json()["data"]
    assert r.headers["location"] == f"/tasks/{task['id']}"
    assert task["nodeids"] == []  # no explicit targets: the selector chose the devices
    assert task["select"] == {"group": None, "tags": ["ARM"], "tags_mode": "all", "os": None,
                              "name": None, "all": False}
    assert task["continuous"] is False
    assert task["rollout"] == {"max_concurrent": None, "per_minute": None,
                               "abort_failed_pct": None, "abort_min_finished": 1}
    assert task["success_exit_codes"] == [0]
    assert (task["paused"], task["aborted"]) == (False, None)
    assert sum(task["counts"].values()) == 2

    shown = fleet.wait_for(task["id"], lambda t: run_of(t, "node//pi-1")["state"]
                           == "succeeded")
    # matched devices come by name: rpi-garage before rpi-kitchen
    assert nodes(shown) == ["node//pi-2", "node//pi-1"]
    assert run_of(shown, "node//pi-2")["state"] == "pending"  # offline: waits
    assert shown["status"] == "running"

    fleet.executor.set_online("node//pi-2")
    done = fleet.wait_done(task["id"])
    assert done["status"] == "succeeded"


@pytest.mark.parametrize(("select", "expected"), [
    ({"group": "pis"}, PIS),
    ({"group": "PIS"}, PIS),
    ({"group": "mesh//office"}, ["node//win-1", "node//lap-1"]),
    ({"tags": ["x86", "mobile"]}, ["node//lap-1"]),
    ({"tags": ["sensors", "mobile"], "tags_mode": "any"}, ["node//pi-1", "node//lap-1"]),
    ({"os": "linux"}, ["node//pi-1", "node//pi-2", "node//lap-1"]),
    ({"name": "RPI-*"}, PIS),
    ({"name": "rpi-*", "tags": ["sensors"]}, ["node//pi-1"]),
    ({"group": "office", "os": "windows"}, ["node//win-1"]),
    ({"all": True}, [d.node_id for d in FLEET]),
])
def test_selectors_match_as_documented(fleet: Api, select: dict[str, Any],
                                       expected: list[str]) -> None:
    task = create(fleet, select=select)
    assert sorted(nodes(fleet.show(task["id"]))) == sorted(expected)


def test_explicit_nodeids_come_first_and_are_not_doubled(fleet: Api) -> None:
    task = create(fleet, nodeids=["node//lap-1", "node//pi-2"], select={"group": "pis"})
    assert task["nodeids"] == ["node//lap-1", "node//pi-2"]
    assert nodes(fleet.show(task["id"])) == ["node//lap-1", "node//pi-2", "node//pi-1"]
    # an empty nodeids is fine with a selector
    task = create(fleet, nodeids=[], select={"group": "pis"})
    assert sorted(nodes(fleet.show(task["id"]))) == PIS


def test_nodeids_still_required_without_select(fleet: Api) -> None:
    assert create_error(fleet, {}) == "details.nodeids"
    assert create_error(fleet, {"nodeids": []}) == "details.nodeids"
    assert create_error(fleet, {"nodeids": None, "select": {"all": True}}) == "details.nodeids"


@pytest.mark.parametrize(("details", "field"), [
    ({"select": {"tags": [""]}}, "details.select.tags[0]"),
    ({"select": {"tags": ["arm", "a\u0000b"]}}, "details.select.tags[1]"),
    ({"select": {"tags": ["arm", 3]}}, "details.select.tags[1]"),
    ({"select": {"tags": "arm"}}, "details.select.tags"),
    ({"select": {"tags": ["arm"], "tags_mode": "most"}}, "details.select.tags_mode"),
    ({"select": {"group": ""}}, "details.select.group"),
    ({"select": {"group": 5}}, "details.select.group"),
    ({"select": {"name": "  "}}, "details.select.name"),
    ({"select": {"all": "yes"}}, "details.select.all"),
    ({"select": {}}, "details.select"),
    ({"select": {"all": False}}, "details.select"),
    ({"select": {"group": None}}, "details.select"),
    ({"select": ["arm"]}, "details.select"),
    ({"select": {"tag": ["arm"]}}, "details.select.tag"),
    ({"select": {"group": "nope"}}, "details.select"),  # matches no device
    ({"continuous": True}, "details.nodeids"),
    ({"continuous": True, "nodeids": ["node//pi-1"]}, "details.continuous"),
    ({"select": {"all": True}, "continuous": "yes"}, "details.continuous"),
    ({"select": {"all": True}, "rollout": {"max_concurrent": 0}},
     "details.rollout.max_concurrent"),
    ({"select": {"all": True}, "rollout": {"max_concurrent": 1.5}},
     "details.rollout.max_concurrent"),
    ({"select": {"all": True}, "rollout": {"per_minute": 0}}, "details.rollout.per_minute"),
    ({"select": {"all": True}, "rollout": {"per_minute": "10"}}, "details.rollout.per_minute"),
    ({"select": {"all": True}, "rollout": {"abort_failed_pct": 100}},
     "details.rollout.abort_failed_pct"),
    ({"select": {"all": True}, "rollout": {"abort_failed_pct": -1}},
     "details.rollout.abort_failed_pct"),
    ({"select": {"all": True}, "rollout": {"abort_min_finished": 0}},
     "details.rollout.abort_min_finished"),
    ({"select": {"all": True}, "rollout": {"max_in_flight": 3}},
     "details.rollout.max_in_flight"),
    ({"select": {"all": True}, "rollout": 10}, "details.rollout"),
    ({"select": {"all": True}, "success_exit_codes": []}, "details.success_exit_codes"),
    ({"select": {"all": True}, "success_exit_codes": 0}, "details.success_exit_codes"),
    ({"select": {"all": True}, "success_exit_codes": "0"}, "details.success_exit_codes"),
    ({"select": {"all": True}, "success_exit_codes": [0, "1"]},
     "details.success_exit_codes[1]"),
    ({"select": {"all": True}, "success_exit_codes": [0, 2**40]},
     "details.success_exit_codes[1]"),
    ({"nodeids": ["node//pi-1"], "success_exit_codes": [True]},
     "details.success_exit_codes[0]"),
])
def test_invalid_fleet_fields_are_422_naming_the_field(fleet: Api, details: dict[str, Any],
                                                       field: str) -> None:
    assert create_error(fleet, details) == field
    # never a half-written task
    r = fleet.get("/task/list")
    assert r.json()["data"]["tasks"] == []


def test_fleet_fields_round_trip(fleet: Api) -> None:
    task = create(fleet, select={"group": "pis", "tags": ["arm"], "tags_mode": "any",
                                 "os": "raspbian", "name": "rpi-*", "all": None},
                  continuous=True,
                  rollout={"max_concurrent": 10, "per_minute": 30.0, "abort_failed_pct": 20,
                           "abort_min_finished": 5},
                  success_exit_codes=[0, 3010])
    shown = fleet.show(task["id"])
    for data in (task, shown):
        assert data["select"] == {"group": "pis", "tags": ["arm"], "tags_mode": "any",
                                  "os": "raspbian", "name": "rpi-*", "all": False}
        assert data["continuous"] is True
        assert data["rollout"] == {"max_concurrent": 10, "per_minute": 30,
                                   "abort_failed_pct": 20, "abort_min_finished": 5}
        assert data["success_exit_codes"] == [0, 3010]
    listed = fleet.get("/task/list").json()["data"]["tasks"]
    assert listed[0]["rollout"]["max_concurrent"] == 10
    # the seed's plain body still renders the defaults
    plain = create(fleet, nodeids=["node//lap-1"])
    assert (plain["select"], plain["continuous"], plain["success_exit_codes"]) == (
        None, False, [0])


def test_cancel_names_a_device_the_selector_chose(fleet: Api) -> None:
    task = create(fleet, select={"os": "windows"})
    r = fleet.post(f"/tasks/{task['id']}/cancel", json={"nodeids": ["node//win-1"]})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["cancelled"] == ["node//win-1"]
    r = fleet.post(f"/tasks/{task['id']}/cancel", json={"nodeids": ["node//pi-1"]})
    assert r.status_code == 422
    assert r.json()["data"]["field"] == "nodeids[0]"


# --------------------------------------------------------------------------- continuous


def test_continuous_task_picks_up_devices_enrolled_later(fleet: Api) -> None:
    task = create(fleet, select={"tags": ["new"]}, continuous=True)
    assert sum(task["counts"].values()) == 0
    assert task["status"] == "pending"

    fleet.executor.add_device(Device(node_id="node//pi-3", name="rpi-new", online=True,
                                     tags=("new",)))
    shown = fleet.wait_for(task["id"], lambda t: any(
        r["state"] == "succeeded" for r in t["runs"]))
    assert nodes(shown) == ["node//pi-3"]

    # a device retagged to match gets its run too; the first one never gets a second
    fleet.executor.update_device("node//lap-1", tags=("x86", "new"))
    fleet.executor.set_online("node//lap-1")
    shown = fleet.wait_for(task["id"], lambda t: len(t["runs"]) == 2 and all(
        r["state"] == "succeeded" for r in t["runs"]))
    assert sorted(nodes(shown)) == ["node//lap-1", "node//pi-3"]
    assert all(len(r["history"]) == 1 for r in shown["runs"])


# --------------------------------------------------------------------------- rollout


def test_max_concurrent_holds(api_factory: ApiFactory) -> None:
    in_flight = peak = 0

    async def slow(request: RunRequest, device: Device) -> Outcome:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return Outcome(exit_code=0)

    devices = [Device(node_id=f"node//{i}", name=f"d{i}", online=True, tags=("t",))
               for i in range(4)]
    api = api_factory(executor=FakeExecutor(slow, devices=devices))
    task = create(api, select={"tags": ["t"]}, rollout={"max_concurrent": 1})
    assert api.wait_done(task["id"])["status"] == "succeeded"
    assert peak == 1


def test_abort_rule_stops_the_rollout(fleet: Api) -> None:
    fleet.executor.handler = fail_with(2)
    task = create(fleet, select={"group": "pis"},
                  rollout={"abort_failed_pct": 0, "abort_min_finished": 1})
    shown = fleet.wait_for(task["id"], lambda t: t["status"] == "aborted")
    assert shown["aborted"] is not None and shown["aborted"].startswith("aborted:")
    assert run_of(shown, "node//pi-1")["state"] == "failed"
    assert run_of(shown, "node//pi-2")["state"] == "cancelled"


def test_success_exit_codes(fleet: Api) -> None:
    fleet.executor.handler = fail_with(3010)
    task = create(fleet, nodeids=["node//pi-1"], success_exit_codes=[0, 3010])
    done = fleet.wait_done(task["id"])
    assert done["status"] == "succeeded"
    assert run_of(done, "node//pi-1")["exit_code"] == 3010
    other = create(fleet, nodeids=["node//pi-1"])
    assert fleet.wait_done(other["id"])["status"] == "failed"


# --------------------------------------------------------------------------- pause, resume


def test_pause_blocks_and_resume_releases(fleet: Api) -> None:
    held = create(fleet, nodeids=["node//pi-2"])
    r = fleet.post(f"/tasks/{held['id']}/pause")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert (data["id"], data["paused"], data["status"]) == (held["id"], True, "paused")
    assert fleet.show(held["id"])["paused"] is True

    # a later task for the same device runs; the paused one, queued first, does not
    later = create(fleet, nodeids=["node//pi-2"])
    fleet.executor.set_online("node//pi-2")
    assert fleet.wait_done(later["id"])["status"] == "succeeded"
    assert fleet.show(held["id"])["runs"][0]["state"] == "pending"
    assert not [c for c in fleet.executor.calls if c.task_id == held["id"]]

    r = fleet.post(f"/tasks/{held['id']}/resume", via="body")
    assert r.status_code == 200, r.text
    assert r.json()["data"]["paused"] is False
    assert fleet.wait_done(held["id"])["status"] == "succeeded"


# --------------------------------------------------------------------------- retry, history


def test_retry_after_a_failure_keeps_both_attempts(fleet: Api) -> None:
    fleet.executor.handler = fail_with(1)
    task = create(fleet, nodeids=["node//pi-1"])
    failed = fleet.wait_done(task["id"])
    assert failed["status"] == "failed"
    history = run_of(failed, "node//pi-1")["history"]
    assert [(a["number"], a["state"], a["exit_code"]) for a in history] == [(1, "failed", 1)]
    assert history[0]["output"] == "exit 1\n"

    fleet.executor.handler = fail_with(0)
    r = fleet.post(f"/tasks/{task['id']}/retry")
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {"id": task["id"], "retried": ["node//pi-1"]}
    done = fleet.wait_done(task["id"])
    assert done["status"] == "succeeded"
    run = run_of(done, "node//pi-1")
    assert [(a["number"], a["state"], a["exit_code"]) for a in run["history"]] == [
        (1, "failed", 1), (2, "succeeded", 0)]
    assert all(a["started_at"] and a["finished_at"] for a in run["history"])

    quiet = fleet.get(f"/tasks/{task['id']}", params={"output": "false"}).json()["data"]
    assert all("output" not in a for a in quiet["runs"][0]["history"])

    # nothing left to retry: an empty list
    r = fleet.post(f"/tasks/{task['id']}/retry", json={"states": ["failed", "lost"]})
    assert r.json()["data"]["retried"] == []


@pytest.mark.parametrize(("body", "field"), [
    ({"states": ["succeeded"]}, "states[0]"),
    ({"states": ["failed", "pending"]}, "states[1]"),
    ({"states": ["bogus"]}, "states[0]"),
    ({"states": []}, "states"),
    ({"states": "failed"}, "states"),
    ({"states": [1]}, "states[0]"),
    ({"state": ["failed"]}, "state"),
])
def test_retry_refuses_bad_states(fleet: Api, body: dict[str, Any], field: str) -> None:
    task = create(fleet, nodeids=["node//pi-2"])
    r = fleet.post(f"/tasks/{task['id']}/retry", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["data"]["field"] == field


def test_abort_cancels_what_has_not_started_and_retry_reopens(fleet: Api) -> None:
    task = create(fleet, select={"tags": ["x86"]})
    r = fleet.post(f"/tasks/{task['id']}/abort", json={"reason": "wrong package"})
    assert r.status_code == 200, r.text
    assert sorted(r.json()["data"]["cancelled"]) == ["node//lap-1", "node//win-1"]
    shown = fleet.show(task["id"])
    assert (shown["status"], shown["aborted"]) == ("aborted", "wrong package")

    r = fleet.post(f"/tasks/{task['id']}/retry", json={"states": ["cancelled"]})
    assert sorted(r.json()["data"]["retried"]) == ["node//lap-1", "node//win-1"]
    shown = fleet.show(task["id"])
    assert shown["aborted"] is None
    assert shown["status"] == "pending"


def test_abort_default_reason(fleet: Api) -> None:
    task = create(fleet, nodeids=["node//pi-2"])
    r = fleet.post(f"/tasks/{task['id']}/abort")
    assert r.json()["data"]["cancelled"] == ["node//pi-2"]
    assert fleet.show(task["id"])["aborted"] == "aborted by an operator"


@pytest.mark.parametrize(("body", "field"), [
    ({"reason": ""}, "reason"),
    ({"reason": " "}, "reason"),
    ({"reason": 5}, "reason"),
    ({"reason": "x" * 1001}, "reason"),
    ({"why": "x"}, "why"),
])
def test_abort_refuses_a_bad_reason(fleet: Api, body: dict[str, Any], field: str) -> None:
    task = create(fleet, nodeids=["node//pi-2"])
    r = fleet.post(f"/tasks/{task['id']}/abort", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["data"]["field"] == field
    assert fleet.show(task["id"])["aborted"] is None


# --------------------------------------------------------------------------- 404, scopes

ROUTES = ("pause", "resume", "retry", "abort")


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_task_is_404(fleet: Api, route: str) -> None:
    r = fleet.post(f"/tasks/{'0' * 32}/{route}")
    assert r.status_code == 404, r.text


@pytest.mark.parametrize("route", ROUTES)
def test_a_read_token_cannot_change_a_task(fleet: Api, route: str) -> None:
    reader = fleet.token("reader", Scope.READ)
    writer = fleet.token("writer", Scope.WRITE)
    task = create(fleet, nodeids=["node//pi-2"])
    r = fleet.post(f"/tasks/{task['id']}/{route}", token=reader)
    assert r.status_code == 403, r.text
    assert fleet.get(f"/tasks/{task['id']}", token=reader).status_code == 200
    r = fleet.post(f"/tasks/{task['id']}/{route}", token=writer)
    assert r.status_code == 200, r.text
    assert fleet.post(f"/tasks/{task['id']}/{route}", token=None).status_code == 401


def test_the_new_routes_are_in_the_document(fleet: Api) -> None:
    doc = fleet.client.get("/openapi.json").json()
    for route in ROUTES:
        op = doc["paths"][f"/tasks/{{task_id}}/{route}"]["post"]
        assert "403" in op["responses"] and "404" in op["responses"]
    details = doc["components"]["schemas"]["TaskDetails"]
    assert {"select", "continuous", "rollout", "success_exit_codes"} <= set(
        details["properties"])
    assert details["required"] == ["name", "command"]


def test_delete_by_name_and_nodeids_reaches_the_devices_a_selector_chose(fleet: Api) -> None:
    """``DELETE /task/delete`` by name for some devices acts on the runs the selector
    gave the task, not only on its explicit targets (it has none here)."""
    fleet.executor.set_online("node//pi-1", False)
    task = create(fleet, name="sel", select={"tags": ["arm"]})
    r = fleet.delete("/task/delete", json={"details": {"name": "sel", "nodeids": PIS[:1]}})
    assert r.status_code == 200, r.text
    [outcome] = r.json()["data"]["tasks"]
    assert (outcome["id"], outcome["deleted"], outcome["cancelled"]) == (
        task["id"], False, PIS[:1])
    r = fleet.delete("/task/delete", json={"details": {"name": "sel", "nodeids": PIS}})
    assert r.json()["data"]["deleted"] == 1

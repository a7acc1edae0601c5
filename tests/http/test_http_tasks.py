"""Tasks over HTTP: create, list (pages, filters), read one with its runs, delete by id
and by name and node ids, cancel, flush; and devices."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from ghostrunner import Device, Outcome, RunKey, RunRequest, RunState
from ghostrunner.testing import FakeExecutor
from tests.http.conftest import Api, ApiFactory

GOOD = {"name": "n", "command": "echo hi", "nodeids": ["node-001"]}


def _gated_executor(gate: threading.Event, exit_code: int = 0) -> FakeExecutor:
    async def handler(request: RunRequest, device: Device) -> Outcome:
        while not gate.is_set():  # noqa: ASYNC110 - set from the test's thread
            await asyncio.sleep(0.005)
        return Outcome(exit_code=exit_code, output=f"ran {request.command}\n")

    return FakeExecutor(handler, devices=["node-001", "node-002", "node-003"])


# --------------------------------------------------------------------------- create


def test_create_with_every_optional_field(api: Api) -> None:
    details = {
        **GOOD,
        "nodeids": ["node-001", "node-002"],
        "shell": "powershell",
        "run_as_user": True,
        "timeout": 12.5,
        "not_before": "2030-01-01T00:00:00+02:00",
        "expires_at": "2030-01-02T00:00:00Z",
        "max_attempts": 5,
        "delivery": "at_least_once",
    }
    r = api.post("/task/create", json={"details": details})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["shell"] == "powershell"
    assert data["run_as_user"] is True
    assert data["timeout"] == 12.5
    assert data["not_before"] == "2029-12-31T22:00:00Z"
    assert data["expires_at"] == "2030-01-02T00:00:00Z"
    assert data["max_attempts"] == 5
    assert data["delivery"] == "at_least_once"
    assert data["counts"]["pending"] == 2
    task = api.store.tasks[data["id"]]
    assert task.timeout == 12.5
    assert task.max_attempts == 5
    assert task.run_as_user
    run = api.store.runs[RunKey(task.id, "node-001")]
    assert run.available_at == task.not_before


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        ("2030-01-01t00:00:00z", "2030-01-01T00:00:00Z"),
        ("2030-01-01T00:00:00.1234567Z", "2030-01-01T00:00:00.123456Z"),
        ("0001-01-01T00:30:00Z", "0001-01-01T00:30:00Z"),
        ("9999-12-31T23:59:59+01:00", "9999-12-31T22:59:59Z"),
    ],
)
def test_times_in_rfc3339_forms(api: Api, sent: str, shown: str) -> None:
    r = api.post("/task/create", json={"details": {**GOOD, "not_before": sent}})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["not_before"] == shown
    assert api.show(r.json()["data"]["id"])["not_before"] == shown


def test_create_with_null_optional_fields_uses_defaults(api: Api) -> None:
    details = {**GOOD, **dict.fromkeys(("shell", "run_as_user", "timeout", "not_before",
                                        "expires_at", "max_attempts", "delivery"))}
    r = api.post("/task/create", json={"details": details})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert (data["shell"], data["timeout"], data["max_attempts"], data["delivery"]) == (
        "auto", 300.0, 3, "at_most_once")


INVALID: list[tuple[Any, str]] = [
    ({}, "details"),
    ({"details": None}, "details"),
    ({"details": []}, "details"),
    ({"details": "x"}, "details"),
    ({"details": {"command": "c", "nodeids": ["a"]}}, "details.name"),
    ({"details": {"name": "n", "nodeids": ["a"]}}, "details.command"),
    ({"details": {"name": "n", "command": "c"}}, "details.nodeids"),
    ({"details": {**GOOD, "name": ""}}, "details.name"),
    ({"details": {**GOOD, "name": "   "}}, "details.name"),
    ({"details": {**GOOD, "name": "x" * 201}}, "details.name"),
    ({"details": {**GOOD, "name": "a\x00b"}}, "details.name"),
    ({"details": {**GOOD, "name": 7}}, "details.name"),
    ({"details": {**GOOD, "name": None}}, "details.name"),
    ({"details": {**GOOD, "command": ""}}, "details.command"),
    ({"details": {**GOOD, "command": "x" * (64 * 1024 + 1)}}, "details.command"),
    ({"details": {**GOOD, "command": ["ls"]}}, "details.command"),
    ({"details": {**GOOD, "nodeids": []}}, "details.nodeids"),
    ({"details": {**GOOD, "nodeids": "node-001"}}, "details.nodeids"),
    ({"details": {**GOOD, "nodeids": {"a": 1}}}, "details.nodeids"),
    ({"details": {**GOOD, "nodeids": None}}, "details.nodeids"),
    ({"details": {**GOOD, "nodeids": [1]}}, "details.nodeids[0]"),
    ({"details": {**GOOD, "nodeids": ["a", ""]}}, "details.nodeids[1]"),
    ({"details": {**GOOD, "nodeids": ["a", "b", "a"]}}, "details.nodeids[2]"),
    ({"details": {**GOOD, "nodeids": ["x" * 257]}}, "details.nodeids[0]"),
    ({"details": {**GOOD, "nodeids": [f"n{i}" for i in range(10_001)]}}, "details.nodeids"),
    ({"details": {**GOOD, "shell": "bash"}}, "details.shell"),
    ({"details": {**GOOD, "shell": 1}}, "details.shell"),
    ({"details": {**GOOD, "run_as_user": "yes"}}, "details.run_as_user"),
    ({"details": {**GOOD, "run_as_user": 1}}, "details.run_as_user"),
    ({"details": {**GOOD, "timeout": 0}}, "details.timeout"),
    ({"details": {**GOOD, "timeout": -1}}, "details.timeout"),
    ({"details": {**GOOD, "timeout": "5"}}, "details.timeout"),
    ({"details": {**GOOD, "timeout": True}}, "details.timeout"),
    ({"details": {**GOOD, "timeout": 1e9}}, "details.timeout"),
    (b'{"details": {"name": "n", "command": "c", "nodeids": ["a"], "timeout": 1e400}}',
     "details.timeout"),
    ({"details": {**GOOD, "not_before": "tomorrow"}}, "details.not_before"),
    ({"details": {**GOOD, "not_before": "2030-01-01T00:00:00"}}, "details.not_before"),
    ({"details": {**GOOD, "not_before": 1700000000}}, "details.not_before"),
    ({"details": {**GOOD, "expires_at": "2030-13-01T00:00:00Z"}}, "details.expires_at"),
    ({"details": {**GOOD, "expires_at": "2030-01-01T23:59:60Z"}}, "details.expires_at"),
    ({"details": {**GOOD, "not_before": "0001-01-01T00:00:00+01:00"}}, "details.not_before"),
    ({"details": {**GOOD, "not_before": "9999-12-31T23:59:59-01:00"}}, "details.not_before"),
    ({"details": {**GOOD, "expires_at": "9999-12-31T23:59:59-01:00"}}, "details.expires_at"),
    ({"details": {**GOOD, "expires_at": "\uff12\uff10\uff13\uff10-01-01T00:00:00Z"}},
     "details.expires_at"),
    ({"details": {**GOOD, "not_before": "2030-01-02T00:00:00Z",
                  "expires_at": "2030-01-01T00:00:00Z"}}, "details.expires_at"),
    ({"details": {**GOOD, "max_attempts": 0}}, "details.max_attempts"),
    ({"details": {**GOOD, "max_attempts": 101}}, "details.max_attempts"),
    ({"details": {**GOOD, "max_attempts": 1.5}}, "details.max_attempts"),
    ({"details": {**GOOD, "max_attempts": "3"}}, "details.max_attempts"),
    ({"details": {**GOOD, "delivery": "exactly_once"}}, "details.delivery"),
    ({"details": {**GOOD, "foo": 1}}, "details.foo"),
    ({"details": {**GOOD, "id": "mine"}}, "details.id"),
    ({"details": GOOD, "extra": 1}, "extra"),
]


@pytest.mark.parametrize(("body", "field"), INVALID, ids=[f for _, f in INVALID])
def test_create_refuses_invalid_fields_naming_them(api: Api, body: Any, field: str) -> None:
    if isinstance(body, bytes):
        r = api.post("/task/create", content=body)
    else:
        r = api.post("/task/create", json=body)
    assert r.status_code == 422, r.text
    data = r.json()
    assert data["data"] == {"error": "invalid_field", "field": field}
    assert field in data["message"]
    assert api.store.tasks == {}
    assert api.store.runs == {}


#: node ids no device can have: their runs would wait forever (#12)
BAD_NODE_IDS = ["node-001 ", " node-001", "node-001\n", "node\t001", "node-001\x1b[0m",
                "node-001\x7f", "\u00a0node-001", "node-001\u2028", "node\x85001"]


@pytest.mark.parametrize("node", BAD_NODE_IDS, ids=[repr(n) for n in BAD_NODE_IDS])
def test_node_ids_no_device_can_have_are_422_everywhere(api: Api, node: str) -> None:
    r = api.post("/task/create", json={"details": {**GOOD, "nodeids": ["node-002", node]}})
    assert r.status_code == 422, r.text
    assert r.json()["data"] == {"error": "invalid_field", "field": "details.nodeids[1]"}
    assert ("whitespace" in r.json()["message"]) != ("control" in r.json()["message"])
    assert api.store.tasks == {}
    task_id = api.create(["node-001"])["id"]
    for method, path, body, field in (
        ("POST", f"/tasks/{task_id}/cancel", {"nodeids": [node]}, "nodeids[0]"),
        ("DELETE", "/task/delete", {"details": {"name": "t", "nodeids": [node]}},
         "details.nodeids[0]"),
    ):
        r = api.request(method, path, json=body)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["data"]["field"] == field
        assert "not a node id" in r.json()["message"], r.text
    assert api.show(task_id)["counts"]["pending"] == 1


def test_create_answers_the_id_and_the_task_reads_back(api: Api) -> None:
    r = api.post("/task/create", json={"details": {**GOOD, "nodeids": ["node-002", "node-001"],
                                                   "name": "deploy"}})
    data = r.json()["data"]
    assert r.headers["location"] == f"/tasks/{data['id']}"
    task = api.show(data["id"])
    assert task["id"] == data["id"]
    assert task["nodeids"] == ["node-002", "node-001"]
    assert [r["nodeid"] for r in task["runs"]] == ["node-002", "node-001"]
    assert all(r["state"] == "pending" and r["attempts"] == 0 for r in task["runs"])


def test_task_names_need_not_be_unique(api: Api) -> None:
    a = api.create(name="same")
    b = api.create(name="same")
    assert a["id"] != b["id"]


# --------------------------------------------------------------------------- read one


def test_show_has_every_run_with_outcome(api_factory: ApiFactory) -> None:
    def handler(request: RunRequest, device: Device) -> Outcome:
        if device.node_id == "node-002":
            return Outcome(exit_code=3, output="boom\n")
        return Outcome(exit_code=0, output=f"hello from {device.node_id}\n")

    executor = FakeExecutor(handler, devices=["node-001", "node-002", "node-003"])
    executor.set_online("node-001")
    executor.set_online("node-002")
    api = api_factory(executor=executor)
    task_id = api.create(["node-001", "node-002", "node-003"])["id"]
    task = api.wait_for(task_id, lambda t: t["counts"]["pending"] == 1
                        and t["counts"]["dispatched"] == 0)
    assert task["status"] == "running"
    runs = {r["nodeid"]: r for r in task["runs"]}
    assert runs["node-001"]["state"] == "succeeded"
    assert runs["node-001"]["exit_code"] == 0
    assert runs["node-001"]["output"] == "hello from node-001\n"
    assert runs["node-001"]["attempts"] == 1
    assert runs["node-001"]["started_at"]
    assert runs["node-001"]["finished_at"]
    assert runs["node-002"]["state"] == "failed"
    assert runs["node-002"]["exit_code"] == 3
    assert runs["node-003"]["state"] == "pending"
    assert runs["node-003"]["started_at"] is None
    assert runs["node-003"]["exit_code"] is None
    assert task["counts"] == {"pending": 1, "dispatched": 0, "succeeded": 1, "failed": 1,
                              "timed_out": 0, "expired": 0, "cancelled": 0, "lost": 0}
    # the offline device comes online: its run goes
    executor.set_online("node-003")
    task = api.wait_done(task_id)
    assert task["status"] == "failed"
    assert {r["state"] for r in task["runs"]} == {"succeeded", "failed"}


def test_show_leaves_output_out_unless_asked(api_factory: ApiFactory) -> None:
    api = api_factory(online=("node-001",))
    task_id = api.create(["node-001"])["id"]
    api.wait_done(task_id)
    for query in ({}, {"output": "false"}, {"output": "0"}):
        run = api.get(f"/tasks/{task_id}", params=query).json()["data"]["runs"][0]
        assert "output" not in run, query
        assert all("output" not in a for a in run["history"])
        assert run["exit_code"] == 0
    for query in ({"output": "true"}, {"output": "1"}):
        run = api.get(f"/tasks/{task_id}", params=query).json()["data"]["runs"][0]
        assert run["output"] == "echo hi\n"
        assert run["history"][0]["output"] == "echo hi\n"
    for query in ("output=no", "output=true&output=false", "other=1", "limit=0",
                  "limit=1001", "limit=x", "cursor=-1", "cursor=abc", "cursor=1234567890"):
        r = api.get(f"/tasks/{task_id}?{query}")
        assert r.status_code == 422, query
        assert r.json()["data"]["field"] == query.split("=")[0], query


def _node_ids(count: int) -> list[str]:
    return [f"node//{i:04d}" for i in range(count)]


def test_show_answers_runs_a_page_at_a_time(api: Api) -> None:
    task_id = api.create(_node_ids(250))["id"]
    first = api.get(f"/tasks/{task_id}").json()["data"]
    assert [r["nodeid"] for r in first["runs"]] == _node_ids(100)
    assert first["runs_next_cursor"] == "100"
    assert first["counts"]["pending"] == 250  # counts are the whole task's
    assert len(first["nodeids"]) == first["node_count"] == 250
    seen = list(first["runs"])
    cursor = first["runs_next_cursor"]
    while cursor is not None:
        page = api.get(f"/tasks/{task_id}", params={"cursor": cursor, "limit": 60}).json()[
            "data"]
        assert len(page["runs"]) <= 60
        seen += page["runs"]
        cursor = page["runs_next_cursor"]
    assert [r["nodeid"] for r in seen] == _node_ids(250)
    whole = api.get(f"/tasks/{task_id}", params={"limit": 1000}).json()["data"]
    assert (len(whole["runs"]), whole["runs_next_cursor"]) == (250, None)
    past = api.get(f"/tasks/{task_id}", params={"cursor": "999"}).json()["data"]
    assert (past["runs"], past["runs_next_cursor"]) == ([], None)


def test_a_page_with_output_ends_once_its_output_is_large(
        api_factory: ApiFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import ghostrunner_http._render

    monkeypatch.setattr(ghostrunner_http._render, "OUTPUT_PER_PAGE", 50)
    api = api_factory(online=("node-001", "node-002", "node-003"))
    task_id = api.create(["node-001", "node-002", "node-003"], command="x" * 20)["id"]
    api.wait_done(task_id)
    # each run's output is 21 characters (the fake device echoes the command), and its
    # one attempt's the same: past 50 after two runs
    page = api.get(f"/tasks/{task_id}", params={"output": "true"}).json()["data"]
    assert [r["nodeid"] for r in page["runs"]] == ["node-001", "node-002"]
    assert page["runs_next_cursor"] == "2"
    page = api.get(f"/tasks/{task_id}", params={"output": "true", "cursor": "2"}).json()[
        "data"]
    assert ([r["nodeid"] for r in page["runs"]], page["runs_next_cursor"]) == (
        ["node-003"], None)
    # without output, no such limit
    page = api.get(f"/tasks/{task_id}").json()["data"]
    assert (len(page["runs"]), page["runs_next_cursor"]) == (3, None)


def test_a_big_task_answers_a_bounded_page(api_factory: ApiFactory, figures: Any) -> None:
    """1,000 runs with 60 KB of output each (#12): 60 MB in one answer before runs were
    paged and output left out by default."""
    big = "y" * 60_000

    def handler(request: RunRequest, device: Device) -> Outcome:
        return Outcome(exit_code=0, output=big)

    nodes = _node_ids(1000)
    api = api_factory(executor=FakeExecutor(handler, devices=nodes),
                      online=())
    for node in nodes:
        api.executor.set_online(node)
    task_id = api.create(nodes)["id"]
    api.wait_for(task_id, lambda t: t["counts"]["succeeded"] == 1000, timeout=60)
    default = api.get(f"/tasks/{task_id}")
    everything = api.get(f"/tasks/{task_id}", params={"output": "true", "limit": 1000})
    figures.add("GET /tasks/{id}, 1,000 runs x 60 KB: answer by default",
                len(default.content) / 1024, "KiB")
    figures.add("GET /tasks/{id}, 1,000 runs x 60 KB: answer with output, limit 1000",
                len(everything.content) / 1024, "KiB")
    assert len(default.content) < 200_000
    assert len(default.json()["data"]["runs"]) == 100
    # with output: a page stops past 1,000,000 characters (plus one run's worth)
    data = everything.json()["data"]
    assert len(everything.content) < 1_000_000 + 2 * 2 * 60_000 + 200_000
    assert data["runs_next_cursor"] == str(len(data["runs"]))


def test_show_unknown_task_is_404(api: Api) -> None:
    r = api.get("/tasks/nope")
    assert r.status_code == 404
    assert r.json()["data"]["error"] == "not_found"


# --------------------------------------------------------------------------- list


def test_list_pages_newest_first(api: Api) -> None:
    ids = [api.create(name=f"t{i}")["id"] for i in range(7)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        data = api.get("/task/list", params=params).json()["data"]
        seen.extend(t["id"] for t in data["tasks"])
        pages += 1
        cursor = data["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(ids))


def test_list_rows_show_the_first_100_node_ids(api: Api) -> None:
    """A page of 1,000 tasks of 10,000 node ids each would be ten million node ids
    (#12): a row shows the first 100, and says how many there are."""
    big = api.create(_node_ids(150))["id"]
    small = api.create(["node-001", "node-002"])["id"]
    rows = {t["id"]: t for t in api.get("/task/list").json()["data"]["tasks"]}
    assert rows[big]["nodeids"] == _node_ids(100)
    assert (rows[big]["node_count"], rows[big]["nodes_truncated"]) == (150, True)
    assert rows[small]["nodeids"] == ["node-001", "node-002"]
    assert (rows[small]["node_count"], rows[small]["nodes_truncated"]) == (2, False)
    # the task itself has them all
    shown = api.get(f"/tasks/{big}").json()["data"]
    assert (shown["nodeids"], shown["nodes_truncated"]) == (_node_ids(150), False)


def test_list_default_page_is_50(api: Api) -> None:
    for _ in range(51):
        api.create()
    data = api.get("/task/list").json()["data"]
    assert len(data["tasks"]) == 50
    assert data["next_cursor"]


def test_list_filters(api_factory: ApiFactory) -> None:
    executor = FakeExecutor(devices=["node-001", "node-002", "node-003"])
    executor.set_online("node-002")
    api = api_factory(executor=executor)
    a = api.create(["node-001"], name="alpha")["id"]
    b = api.create(["node-002"], name="beta")["id"]
    c = api.create(["node-001", "node-003"], name="alpha")["id"]
    api.wait_done(b)

    def ids(**params: Any) -> list[str]:
        r = api.get("/task/list", params=params)
        assert r.status_code == 200, r.text
        return [t["id"] for t in r.json()["data"]["tasks"]]

    assert ids(name="alpha") == [c, a]
    assert ids(name="nobody") == []
    assert ids(nodeid="node-001") == [c, a]
    assert ids(nodeid="node-003") == [c]
    assert ids(state="succeeded") == [b]
    assert ids(state="pending") == [c, a]
    assert ids(status="succeeded") == [b]
    assert ids(status="pending", nodeid="node-003") == [c]
    assert ids(name="alpha", limit=1) == [c]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=abc", "limit"),
        ("limit=1.5", "limit"),
        ("limit=-1", "limit"),
        ("limit=%EF%BC%91", "limit"),  # a full-width digit one
        ("limit=1&limit=2", "limit"),
        ("state=bogus", "state"),
        ("status=done", "status"),
        ("name=", "name"),
        ("nodeid=", "nodeid"),
        ("cursor=", "cursor"),
        ("node_id=node-001", "node_id"),
        ("name=a%00b", "name"),
    ],
)
def test_list_refuses_bad_query_parameters(api: Api, query: str, field: str) -> None:
    r = api.get(f"/task/list?{query}")
    assert r.status_code == 422, r.text
    assert r.json()["data"]["field"] == field


def test_list_with_an_unknown_cursor_does_not_fail(api: Api) -> None:
    api.create()
    r = api.get("/task/list", params={"cursor": "garbage"})
    assert r.status_code in (200, 422)


# --------------------------------------------------------------------------- delete


def test_delete_by_id(api: Api) -> None:
    task_id = api.create(["node-001", "node-002"])["id"]
    r = api.delete(f"/tasks/{task_id}")
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {"deleted": 1, "tasks": [{
        "id": task_id, "name": "t", "deleted": True,
        "cancelled": ["node-001", "node-002"], "running": []}]}
    assert task_id not in api.store.tasks
    assert api.get(f"/tasks/{task_id}").status_code == 404
    assert api.delete(f"/tasks/{task_id}").status_code == 404


def test_delete_by_name_takes_every_task_of_that_name(api: Api) -> None:
    a = api.create(name="dup")["id"]
    b = api.create(name="dup")["id"]
    keep = api.create(name="other")["id"]
    r = api.delete("/task/delete", json={"details": {"name": "dup"}})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["deleted"] == 2
    assert {t["id"] for t in data["tasks"]} == {a, b}
    assert set(api.store.tasks) == {keep}


def test_delete_by_name_for_some_devices_cancels_only_theirs(api: Api) -> None:
    task_id = api.create(["node-001", "node-002", "node-003"], name="x")["id"]
    r = api.delete("/task/delete", json={"details": {"name": "x", "nodeids": ["node-002"]}})
    assert r.status_code == 200, r.text
    outcome = r.json()["data"]["tasks"][0]
    assert outcome == {"id": task_id, "name": "x", "deleted": False,
                       "cancelled": ["node-002"], "running": []}
    states = {r["nodeid"]: r["state"] for r in api.show(task_id)["runs"]}
    assert states == {"node-001": "pending", "node-002": "cancelled", "node-003": "pending"}


def test_delete_by_name_with_all_devices_removes_the_task(api: Api) -> None:
    api.create(["node-001", "node-002"], name="x")
    other = api.create(["node-003"], name="x")["id"]
    r = api.delete("/task/delete", json={"details": {"name": "x",
                                                     "nodeids": ["node-002", "node-001"]}})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["deleted"] == 1
    # the other task of that name targets none of these devices: untouched
    assert set(api.store.tasks) == {other}


def test_delete_by_id_in_the_body(api: Api) -> None:
    task_id = api.create(name="x")["id"]
    r = api.delete("/task/delete", json={"details": {"id": task_id}})
    assert r.status_code == 200
    assert r.json()["data"]["deleted"] == 1
    r = api.delete("/task/delete", json={"details": {"id": task_id}})
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("details", "status", "field"),
    [
        ({"name": "nobody"}, 404, None),
        ({"name": "x", "nodeids": ["node-009"]}, 404, None),
        ({"id": "nope"}, 404, None),
        ({"id": "{id}", "name": "other"}, 404, None),
        ({}, 422, "details.name"),
        ({"nodeids": ["node-001"]}, 422, "details.name"),
        ({"name": ""}, 422, "details.name"),
        ({"name": 5}, 422, "details.name"),
        ({"name": "x", "nodeids": []}, 422, "details.nodeids"),
        ({"name": "x", "nodeids": "node-001"}, 422, "details.nodeids"),
        ({"name": "x", "nodeids": [""]}, 422, "details.nodeids[0]"),
        ({"name": "x", "bogus": 1}, 422, "details.bogus"),
    ],
)
def test_delete_refusals(api: Api, details: dict[str, Any], status: int,
                         field: str | None) -> None:
    task_id = api.create(name="x")["id"]
    if details.get("id") == "{id}":
        details = {**details, "id": task_id}
    r = api.delete("/task/delete", json={"details": details})
    assert r.status_code == status, r.text
    if field:
        assert r.json()["data"]["field"] == field
    assert task_id in api.store.tasks


def test_delete_keeps_a_task_with_a_run_in_flight(api_factory: ApiFactory) -> None:
    gate = threading.Event()
    executor = _gated_executor(gate)
    executor.set_online("node-001")
    api = api_factory(executor=executor)
    task_id = api.create(["node-001", "node-002"])["id"]
    api.wait_for(task_id, lambda t: t["counts"]["dispatched"] == 1)
    r = api.delete(f"/tasks/{task_id}")
    assert r.status_code == 200
    assert r.json()["data"]["tasks"][0] == {
        "id": task_id, "name": "t", "deleted": False, "cancelled": ["node-002"],
        "running": ["node-001"]}
    gate.set()
    task = api.wait_done(task_id)
    assert {r["nodeid"]: r["state"] for r in task["runs"]} == {
        "node-001": "succeeded", "node-002": "cancelled"}
    # now it can go
    assert api.delete(f"/tasks/{task_id}").json()["data"]["deleted"] == 1


# --------------------------------------------------------------------------- cancel


def test_cancel_all_pending(api: Api) -> None:
    task_id = api.create(["node-001", "node-002"])["id"]
    r = api.post(f"/tasks/{task_id}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {"id": task_id, "cancelled": ["node-001", "node-002"]}
    task = api.show(task_id)
    assert task["status"] == "cancelled"
    # again: nothing left to cancel
    assert api.post(f"/tasks/{task_id}/cancel").json()["data"]["cancelled"] == []


def test_cancel_some_devices(api: Api) -> None:
    task_id = api.create(["node-001", "node-002"])["id"]
    r = api.post(f"/tasks/{task_id}/cancel", json={"nodeids": ["node-002"]})
    assert r.json()["data"]["cancelled"] == ["node-002"]
    # one pending, one cancelled, nothing started: the task is still pending
    assert api.show(task_id)["status"] == "pending"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"nodeids": ["node-009"]}, 422, "nodeids[0]"),
        ({"nodeids": []}, 422, "nodeids"),
        ({"nodeids": "node-001"}, 422, "nodeids"),
        ({"nodeids": [3]}, 422, "nodeids[0]"),
        ({"other": 1}, 422, "other"),
    ],
)
def test_cancel_refusals(api: Api, body: Any, status: int, field: str) -> None:
    task_id = api.create(["node-001"])["id"]
    r = api.post(f"/tasks/{task_id}/cancel", json=body)
    assert r.status_code == status, r.text
    assert r.json()["data"]["field"] == field
    assert api.show(task_id)["status"] == "pending"


def test_cancel_unknown_task_is_404(api: Api) -> None:
    assert api.post("/tasks/nope/cancel").status_code == 404


# --------------------------------------------------------------------------- flush


def test_flush_cancels_pending_removes_finished_keeps_in_flight(
    api_factory: ApiFactory,
) -> None:
    gate = threading.Event()
    executor = _gated_executor(gate)
    executor.set_online("node-001")
    api = api_factory(executor=executor)
    busy = api.create(["node-001", "node-002"], name="busy")["id"]  # 1 in flight, 1 pending
    api.wait_for(busy, lambda t: t["counts"]["dispatched"] == 1)
    pending = api.create(["node-002", "node-003"], name="pending")["id"]  # 2 pending
    r = api.delete("/task/flush")
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {"cancelled": 3, "deleted": 1, "kept": 1}
    assert pending not in api.store.tasks
    assert busy in api.store.tasks
    gate.set()
    api.wait_done(busy)
    r = api.delete("/task/flush")
    assert r.json()["data"] == {"cancelled": 0, "deleted": 1, "kept": 0}
    assert api.store.tasks == {}


def test_flush_on_nothing(api: Api) -> None:
    assert api.delete("/task/flush").json()["data"] == {"cancelled": 0, "deleted": 0,
                                                         "kept": 0}


# --------------------------------------------------------------------------- devices


def test_devices_follow_the_executor(api_factory: ApiFactory) -> None:
    executor = FakeExecutor(devices=[])
    executor.add_device(Device(node_id="node-005", name="Server-02", online=True))
    executor.add_device(Device(node_id="node-001", name="RaspberryPi-01", online=True,
                               os="Raspbian", group_id="mesh//pis", group_name="pis",
                               tags=("arm", "lab")))
    executor.add_device(Device(node_id="node-003", name="IoT-Gateway", online=False))
    api = api_factory(executor=executor)
    data = api.get("/devices").json()["data"]
    assert [(d["name"], d["nodeid"]) for d in data["online_devices"]] == [
        ("RaspberryPi-01", "node-001"), ("Server-02", "node-005")]
    assert [(d["name"], d["nodeid"]) for d in data["offline_devices"]] == [
        ("IoT-Gateway", "node-003")]
    assert data["total_devices"] == 3
    pi = data["online_devices"][0]
    assert (pi["os"], pi["group_id"], pi["group_name"], pi["tags"]) == (
        "Raspbian", "mesh//pis", "pis", ["arm", "lab"])
    assert data["online_devices"][1]["tags"] == []
    executor.set_online("node-003")
    data = api.get("/devices").json()["data"]
    assert len(data["online_devices"]) == 3
    assert data["offline_devices"] == []


def test_a_task_for_an_unknown_device_stays_pending(api: Api) -> None:
    """GhostRunner queues for any node id: a device may be enrolled later."""
    task_id = api.create(["node//not-enrolled-yet"])["id"]
    assert api.show(task_id)["runs"][0]["state"] == RunState.PENDING.value

"""The audit log: every write route (API and console) leaves an entry, refused writes
too; ``GET /audit`` (admin only, filters, pages); the console's audit page; no secret
ever in an entry."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pytest
from starlette.routing import Route

from ghostrunner import Task
from ghostrunner.errors import StoreError
from ghostrunner.testing import InMemoryStore
from ghostrunner.tokens import Scope
from ghostrunner_http._tokens import hash_secret
from ghostrunner_http.openapi import openapi_document
from tests.http.conftest import ADMIN, Api, ApiFactory
from tests.http.test_http_console import XSS, Browser

SAFE = {"get", "head", "options"}


def entries(api: Api, **params: Any) -> list[dict[str, Any]]:
    r = api.get("/audit", params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["data"]["entries"]
    return found


def latest(api: Api) -> dict[str, Any]:
    return entries(api)[0]


def test_every_write_route_of_the_api_is_recorded(api: Api) -> None:
    doc = openapi_document()
    writes = [(path, method) for path, item in doc["paths"].items() for method in item
              if method not in SAFE]
    assert len(writes) >= 10
    for path, method in writes:
        task = api.create(["node-001"])
        before = {e["id"] for e in entries(api)}
        concrete = path.replace("{task_id}", task["id"])
        body: dict[str, Any] = {}
        if path == "/token/create":
            body = {"details": {"name": f"t-{method}", "scope": "read"}}
        elif path == "/token/delete":
            api.token("doomed", Scope.READ)
            before = {e["id"] for e in entries(api)}
            body = {"details": {"name": "doomed"}}
        elif path == "/task/create":
            body = {"details": {"name": "n", "command": "c", "nodeids": ["node-002"]}}
        elif path == "/task/delete":
            body = {"details": {"id": task["id"]}}
        r = api.request(method.upper(), concrete, json=body or None)
        assert r.status_code < 500, (path, method, r.text)
        new = [e for e in entries(api) if e["id"] not in before]
        assert [(e["method"], e["route"]) for e in new] == [(method.upper(), path)], path
        assert new[0]["token"] == "admin" and new[0]["status"] == r.status_code
        assert new[0]["address"] == "testclient"
        if "{task_id}" in path or path in ("/task/create",):
            assert new[0]["task_id"] is not None


def test_counts_and_task_ids(api: Api) -> None:
    task = api.create(["node-001", "node-002", "node-003"])
    created = latest(api)
    assert created["task_id"] == task["id"] and created["counts"] == {"nodeids": 3}
    api.post(f"/tasks/{task['id']}/cancel", json={"nodeids": ["node-001"]})
    assert latest(api)["counts"] == {"runs": 1}
    assert latest(api)["route"] == "/tasks/{task_id}/cancel"
    api.post(f"/tasks/{task['id']}/retry", json={"states": ["cancelled"]})
    assert latest(api)["counts"] == {"runs": 1}
    api.delete("/task/flush")
    assert set(latest(api)["counts"]) == {"cancelled", "deleted", "kept"}


def test_refused_writes_are_recorded_with_what_is_known(api: Api) -> None:
    reader = api.token("reader", Scope.READ)
    assert api.post("/task/create", token=None, json={"details": {}}).status_code == 401
    assert (latest(api)["token"], latest(api)["status"]) == (None, 401)
    assert api.post("/task/create", token="gr_wrong-secret",
                    json={"details": {}}).status_code == 401
    assert (latest(api)["token"], latest(api)["status"]) == (None, 401)
    assert api.delete("/task/flush", token=reader).status_code == 403
    assert (latest(api)["token"], latest(api)["status"]) == ("reader", 403)
    assert api.post("/task/create", json={"details": {}, "bogus": 1}).status_code == 422
    assert (latest(api)["token"], latest(api)["status"]) == ("admin", 422)
    assert api.post("/tasks/nope/pause").status_code == 404
    assert (latest(api)["task_id"], latest(api)["status"]) == ("nope", 404)


def test_reads_and_unknown_routes_are_not_recorded(api: Api) -> None:
    api.get("/task/list")
    api.get("/devices")
    api.client.post("/no/such/route")
    api.client.put("/task/list")
    assert [e["route"] for e in entries(api)] == []


def test_only_admins_read_the_audit_log(api: Api) -> None:
    for scope in (Scope.READ, Scope.WRITE):
        secret = api.token(f"t-{scope.value}", scope)
        assert api.get("/audit", token=secret).status_code == 403
    assert api.get("/audit", token=None).status_code == 401
    assert api.get("/audit").status_code == 200


def test_filters_and_pages(api: Api) -> None:
    writer = api.token("writer", Scope.WRITE)
    first = api.create(["node-001"])
    for _ in range(4):
        api.post("/task/create", token=writer,
                 json={"details": {"name": "w", "command": "c", "nodeids": ["node-002"]}})
    api.post(f"/tasks/{first['id']}/pause")
    assert len(entries(api, token="writer")) == 4
    assert [e["route"] for e in entries(api, task_id=first["id"])] == [
        "/tasks/{task_id}/pause", "/task/create"]
    assert len(entries(api, route="/tasks/{task_id}/pause")) == 1
    assert entries(api, status="4xx") == []
    assert len(entries(api, since="2000-01-01T00:00:00Z", until="2999-01-01T00:00:00Z")) == 7
    assert entries(api, until="2000-01-01T00:00:00Z") == []
    seen: list[int] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        data = api.get("/audit", params=params).json()["data"]
        seen += [e["id"] for e in data["entries"]]
        if data["next_cursor"] is None:
            break
        params["cursor"] = data["next_cursor"]
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen)) == 7
    for bad in ({"status": "2"}, {"since": "yesterday"}, {"since": "2024-01-01T00:00:00"},
                {"cursor": "abc"}, {"limit": "0"}, {"colour": "red"}):
        assert api.get("/audit", params=bad).status_code == 422, bad


def test_secrets_never_appear_in_entries(api: Api) -> None:
    secret = api.token("ops", Scope.WRITE)
    api.post("/task/create", token=secret, via="body",
             json={"details": {"name": "n", "command": "c", "nodeids": ["node-001"]}})
    api.post("/task/create", token=secret + "x", json={"details": {}})
    text = json.dumps(entries(api)) + repr(api.store.audit)
    for value in (ADMIN, secret, hash_secret(ADMIN), hash_secret(secret)):
        assert value not in text


def test_every_console_write_is_recorded(api: Api) -> None:
    task = api.create(["node-001"])
    b = Browser(api.client)
    assert b.sign_in(ADMIN).status_code == 303
    console_writes = [r for r in api.client.app.routes  # type: ignore[attr-defined]
                      if isinstance(r, Route) and r.path.startswith("/ui")
                      and r.methods and "POST" in r.methods]
    forms: dict[str, dict[str, Any]] = {
        "/ui/queue": {"name": "q", "command": "c", "nodeids": "node-001"},
        "/ui/tokens": {"name": "made-here", "scope": "read"},
        "/ui/tokens/revoke": {"name": "made-here"},
        "/ui/tasks/{task_id}/retry": {"states": "cancelled"},
    }
    assert len(console_writes) >= 10
    # logout last: it ends the session
    for route in sorted(console_writes, key=lambda r: (r.path == "/ui/logout", r.path)):
        before = {e["id"] for e in entries(api)}
        path = route.path.replace("{task_id}", task["id"])
        if route.path == "/ui/login":
            r = b.sign_in(ADMIN)  # a new session, and its CSRF token
        else:
            r = b.post(path, forms.get(route.path, {}))
        new = [e for e in entries(api) if e["id"] not in before]
        assert [(e["method"], e["route"]) for e in new] == [("POST", route.path)], route.path
        assert new[0]["token"] == "admin" and new[0]["status"] == r.status_code, route.path
    queued = entries(api, route="/ui/queue")[0]
    assert queued["status"] == 303, queued
    assert queued["task_id"] is not None and queued["counts"] == {"nodeids": 1}


def test_refused_console_writes_are_recorded(api: Api) -> None:
    task = api.create(["node-001"])
    b = Browser(api.client)
    b.sign_in(ADMIN)
    assert b.post(f"/ui/tasks/{task['id']}/pause", csrf="forged").status_code == 403
    assert (latest(api)["token"], latest(api)["status"]) == ("admin", 403)
    assert Browser(api.client).sign_in("gr_not-a-token").status_code == 401
    assert (latest(api)["route"], latest(api)["token"], latest(api)["status"]) == (
        "/ui/login", None, 401)


def test_the_console_page_is_for_admins(api: Api) -> None:
    writer = api.token("writer", Scope.WRITE)
    api.create(["node-001"])
    admin = Browser(api.client)
    admin.sign_in(ADMIN)
    page = admin.get("/ui/audit")
    assert page.status_code == 200
    assert "/task/create" in page.text and 'href="/ui/audit"' in page.text
    assert "4xx" in admin.get("/ui/audit", params={"status": "4xx"}).text
    assert admin.get("/ui/audit", params={"since": "bad"}).status_code == 422
    other = Browser(api.client)
    other.sign_in(writer)
    assert other.get("/ui/audit").status_code == 403
    assert 'href="/ui/audit"' not in other.get("/ui/").text
    assert Browser(api.client).get("/ui/audit").status_code == 303  # signed out


def test_the_console_page_escapes_every_value(api: Api) -> None:
    api.token(XSS, Scope.WRITE)  # a token name is free text
    api.post(f"/tasks/{XSS}/pause")  # a task id from the URL
    admin = Browser(api.client)
    admin.sign_in(ADMIN)
    page = admin.get("/ui/audit", params={"route": XSS}).text
    assert XSS not in page and "<script>alert" not in page
    assert "&lt;script&gt;alert(" in page  # the filter's value, shown back as text
    page = admin.get("/ui/audit").text
    assert "<script>alert" not in page and "onerror=alert(1)>" not in page


def test_cli_writes_go_through_the_api_and_are_recorded(api: Api) -> None:
    # the CLI is an API client: its writes are API writes (see test_http_cli*); here the
    # address and route of one, as a script would send it
    api.post("/task/create", json={"details": {"name": "n", "command": "c",
                                               "nodeids": ["node-001"]}},
             headers={"User-Agent": "ghostrunner-cli"})
    assert latest(api)["route"] == "/task/create"


# ------------------------------------------- a create's entry goes in with the task itself


def _no_record_audit(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """record_audit fails from here on: an entry stored now came with add_task."""
    async def failing(entry: Any) -> None:
        raise StoreError("record_audit was called")

    monkeypatch.setattr(api.store, "record_audit", failing)


def test_a_create_is_recorded_once_in_the_tasks_transaction(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_record_audit(api, monkeypatch)
    task = api.create(["node-001", "node-002"])
    assert [(e.route, e.task_id, e.status, dict(e.counts)) for e in api.store.audit] == [
        ("/task/create", task["id"], 200, {"nodeids": 2})]


def test_a_task_queued_in_the_console_is_recorded_with_it(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    b = Browser(api.client)
    assert b.sign_in(ADMIN).status_code == 303
    _no_record_audit(api, monkeypatch)
    r = b.post("/ui/queue", {"name": "q", "command": "c", "nodeids": "node-001"})
    assert r.status_code == 303, r.text
    assert [(e.route, e.status, dict(e.counts)) for e in api.store.audit
            if e.route != "/ui/login"] == [("/ui/queue", 303, {"nodeids": 1})]


def test_a_create_the_store_fails_has_the_failures_entry_only(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing(task: Any, now: Any, *, nodes: Any = None, audit: Any = None) -> None:
        raise StoreError("disk full")

    monkeypatch.setattr(api.store, "add_task", failing)
    r = api.post("/task/create",
                 json={"details": {"name": "n", "command": "c", "nodeids": ["node-001"]}})
    assert r.status_code == 503, r.text
    assert [(e["route"], e["status"]) for e in entries(api)] == [("/task/create", 503)]


class _OlderStore(InMemoryStore):
    """A store written before ``add_task`` took ``audit``."""

    async def add_task(self, task: Task, now: datetime, *,  # type: ignore[override]
                       nodes: Sequence[str] | None = None) -> None:
        await super().add_task(task, now, nodes=nodes)


def test_a_store_whose_add_task_takes_no_entry_is_recorded_by_the_middleware(
        api_factory: ApiFactory) -> None:
    api = api_factory(store=_OlderStore())
    task = api.create(["node-001"])
    assert [(e["task_id"], e["status"]) for e in entries(api)] == [(task["id"], 200)]

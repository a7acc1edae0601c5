"""Authentication and scopes, on every route: no token, a wrong one, a revoked one, a
malformed header, and each scope (through the header and through the body)."""

from __future__ import annotations

from typing import Any

import pytest

from ghostrunner.tokens import Scope
from tests.http.conftest import ADMIN, Api, ApiFactory

# (method, path, body details or None, the scope it needs). {id} is a task created first.
ROUTES: list[tuple[str, str, dict[str, Any] | None, Scope]] = [
    ("POST", "/token/create", {"details": {"name": "newtoken"}}, Scope.ADMIN),
    ("DELETE", "/token/delete", {"details": {"name": "victim"}}, Scope.ADMIN),
    ("GET", "/token/list", None, Scope.ADMIN),
    ("POST", "/task/create",
     {"details": {"name": "n", "command": "c", "nodeids": ["node-001"]}}, Scope.WRITE),
    ("DELETE", "/task/delete", {"details": {"name": "existing"}}, Scope.WRITE),
    ("GET", "/task/list", None, Scope.READ),
    ("DELETE", "/task/flush", None, Scope.WRITE),
    ("GET", "/tasks/{id}", None, Scope.READ),
    ("DELETE", "/tasks/{id}", None, Scope.WRITE),
    ("POST", "/tasks/{id}/cancel", {}, Scope.WRITE),
    ("GET", "/devices", None, Scope.READ),
]
IDS = [f"{m} {p}" for m, p, _, _ in ROUTES]


class World:
    """An app with one token of each scope, a revoked token, and one task."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.tokens = {
            Scope.READ: api.token("reader", Scope.READ),
            Scope.WRITE: api.token("writer", Scope.WRITE),
            Scope.ADMIN: api.token("admin2", Scope.ADMIN),
        }
        self.revoked = api.token("revoked", Scope.ADMIN)
        r = api.delete("/token/delete", json={"details": {"name": "revoked"}})
        assert r.status_code == 200
        api.token("victim", Scope.READ)
        self.task_id = api.create(name="existing")["id"]

    def call(self, method: str, path: str, body: dict[str, Any] | None, token: str | None,
             via: str = "header") -> Any:
        return self.api.request(method, path.replace("{id}", self.task_id), token=token,
                                via=via, json=body)

    def snapshot(self) -> tuple[Any, ...]:
        store = self.api.store
        return (dict(store.tasks), dict(store.runs),
                {n: (t.secret_hash, t.scope) for n, t in store.tokens.items()})


@pytest.fixture
def world(api: Api) -> World:
    return World(api)


def _assert_refused(world: World, r: Any, status: int, before: tuple[Any, ...]) -> None:
    assert r.status_code == status, r.text
    assert r.json()["data"]["error"] == {401: "unauthorized", 403: "forbidden"}[status]
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert world.snapshot() == before, "a refused request changed something"


@pytest.mark.parametrize(("method", "path", "body", "needed"), ROUTES, ids=IDS)
@pytest.mark.parametrize("via", ["header", "body"])
def test_no_token_is_401(world: World, method: str, path: str, body: Any, needed: Scope,
                         via: str) -> None:
    before = world.snapshot()
    r = world.call(method, path, body, None, via)
    _assert_refused(world, r, 401, before)
    assert "missing token" in r.json()["message"]


@pytest.mark.parametrize(("method", "path", "body", "needed"), ROUTES, ids=IDS)
@pytest.mark.parametrize("via", ["header", "body"])
def test_wrong_token_is_401(world: World, method: str, path: str, body: Any, needed: Scope,
                            via: str) -> None:
    before = world.snapshot()
    for wrong in ("gr_wrong", ADMIN + "x", ADMIN[:-1], "", " ", "x" * 5000):
        r = world.call(method, path, body, wrong, via)
        _assert_refused(world, r, 401, before)


@pytest.mark.parametrize(("method", "path", "body", "needed"), ROUTES, ids=IDS)
@pytest.mark.parametrize("via", ["header", "body"])
def test_revoked_token_is_401(world: World, method: str, path: str, body: Any,
                              needed: Scope, via: str) -> None:
    before = world.snapshot()
    r = world.call(method, path, body, world.revoked, via)
    _assert_refused(world, r, 401, before)
    assert "revoked" in r.json()["message"]


@pytest.mark.parametrize(("method", "path", "body", "needed"), ROUTES, ids=IDS)
@pytest.mark.parametrize("header", ["Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer   ",
                                    "Token " + ADMIN, ADMIN])
def test_malformed_authorization_header_is_401(world: World, method: str, path: str,
                                               body: Any, needed: Scope, header: str) -> None:
    before = world.snapshot()
    r = world.api.request(method, path.replace("{id}", world.task_id), token=None, json=body,
                          headers={"Authorization": header})
    _assert_refused(world, r, 401, before)


@pytest.mark.parametrize(("method", "path", "body", "needed"), ROUTES, ids=IDS)
@pytest.mark.parametrize("scope", list(Scope))
@pytest.mark.parametrize("via", ["header", "body"])
def test_each_scope(world: World, method: str, path: str, body: Any, needed: Scope,
                    scope: Scope, via: str) -> None:
    before = world.snapshot()
    r = world.call(method, path, body, world.tokens[scope], via)
    if scope.allows(needed):
        assert r.status_code == 200, r.text
    else:
        _assert_refused(world, r, 403, before)
        assert needed.value in r.json()["message"]


def test_scopes_nest() -> None:
    assert Scope.ADMIN.allows(Scope.WRITE)
    assert Scope.ADMIN.allows(Scope.READ)
    assert Scope.WRITE.allows(Scope.READ)
    assert not Scope.WRITE.allows(Scope.ADMIN)
    assert not Scope.READ.allows(Scope.WRITE)


def test_header_wins_over_the_body_token(world: World) -> None:
    # a good header and a wrong body token: the header decides
    r = world.api.request("GET", "/task/list", token=ADMIN,
                          json={"authtoken": "wrong"})
    assert r.status_code == 200
    # a wrong header and a good body token: refused
    r = world.api.request("GET", "/task/list", token="wrong",
                          json={"authtoken": ADMIN})
    assert r.status_code == 401


def test_body_token_must_be_a_string(api: Api) -> None:
    for value in (1, None, ["x"], {"a": 1}, True):
        r = api.request("GET", "/task/list", token=None, json={"authtoken": value})
        assert r.status_code == 401, value


def test_open_routes_need_no_token(api: Api) -> None:
    assert api.get("/", token=None).status_code == 200
    assert api.get("/openapi.json", token=None).status_code == 200
    # and a bad token there is simply not looked at
    assert api.get("/", token="wrong").status_code == 200


def test_last_used_is_recorded(api: Api) -> None:
    secret = api.token("user", Scope.READ)
    assert api.store.tokens["user"].last_used is None
    assert api.get("/task/list", token=secret).status_code == 200
    first = api.store.tokens["user"].last_used
    assert first is not None
    # written at most once a minute: a second use right after does not write again
    assert api.get("/task/list", token=secret).status_code == 200
    assert api.store.tokens["user"].last_used == first
    listed = {t["name"]: t for t in api.get("/token/list").json()["data"]["tokens"]}
    assert listed["user"]["last_used"] is not None
    assert listed["user"]["created_at"] is not None


def test_revocation_is_immediate(api: Api) -> None:
    secret = api.token("soon-gone", Scope.WRITE)
    assert api.get("/task/list", token=secret).status_code == 200
    assert api.delete("/token/delete", json={"details": {"name": "soon-gone"}}).status_code \
        == 200
    assert api.get("/task/list", token=secret).status_code == 401


def test_a_token_may_revoke_itself(api: Api) -> None:
    secret = api.token("self", Scope.ADMIN)
    r = api.delete("/token/delete", token=secret, json={"details": {"name": "self"}})
    assert r.status_code == 200
    assert api.get("/token/list", token=secret).status_code == 401


def test_unknown_body_field_is_checked_after_auth(api_factory: ApiFactory) -> None:
    api = api_factory()
    r = api.request("GET", "/task/list", token=None, json={"bogus": 1})
    assert r.status_code == 401
    r = api.request("GET", "/task/list", json={"bogus": 1})
    assert r.status_code == 422
    assert r.json()["data"]["field"] == "bogus"

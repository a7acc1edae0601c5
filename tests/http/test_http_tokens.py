"""Tokens: creation (secret shown once, stored as a hash), names unique, scopes,
revocation, the builtin admin token (bootstrapped, printed once, undeletable)."""

from __future__ import annotations

from typing import Any

import pytest

from ghostrunner.testing import InMemoryStore
from ghostrunner.tokens import Scope
from ghostrunner_http import Settings
from ghostrunner_http._tokens import hash_secret
from tests.http.conftest import ADMIN, Api, ApiFactory


def test_create_shows_the_secret_once_and_stores_a_hash(api: Api) -> None:
    r = api.post("/token/create", json={"details": {"name": "ci", "scope": "write"}})
    assert r.status_code == 200
    data = r.json()["data"]
    secret = data["token"]
    assert data["scope"] == "write"
    assert data["builtin"] is False
    assert data["last_used"] is None
    assert data["created_at"].endswith("Z")
    assert secret.startswith("gr_")
    assert len(secret) >= 40
    stored = api.store.tokens["ci"]
    assert stored.secret_hash == hash_secret(secret)
    assert secret not in repr(stored)
    # never shown again
    listing = api.get("/token/list").text
    assert secret not in listing
    assert stored.secret_hash not in listing


def test_each_secret_is_random(api: Api) -> None:
    secrets = {api.token(f"t{i}", Scope.READ) for i in range(20)}
    assert len(secrets) == 20


def test_default_scope_is_write_and_read_must_be_asked_for(api: Api) -> None:
    r = api.post("/token/create", json={"details": {"name": "w"}})
    assert r.json()["data"]["scope"] == "write"
    secret = r.json()["data"]["token"]
    body = {"details": {"name": "n", "command": "c", "nodeids": ["a"]}}
    assert api.post("/task/create", token=secret, json=body).status_code == 200
    assert api.get("/token/list", token=secret).status_code == 403  # not admin
    r = api.post("/token/create", json={"details": {"name": "r", "scope": "read"}})
    assert r.json()["data"]["scope"] == "read"
    assert api.post("/task/create", token=r.json()["data"]["token"],
                    json=body).status_code == 403


def test_names_are_unique(api: Api) -> None:
    api.token("dup", Scope.READ)
    r = api.post("/token/create", json={"details": {"name": "dup", "scope": "admin"}})
    assert r.status_code == 409
    assert r.json()["data"]["error"] == "duplicate_name"
    assert api.store.tokens["dup"].scope is Scope.READ
    # the builtin admin token's name is taken too
    assert api.post("/token/create", json={"details": {"name": "admin"}}).status_code == 409


@pytest.mark.parametrize(
    ("details", "field"),
    [
        ({}, "details.name"),
        ({"name": ""}, "details.name"),
        ({"name": "   "}, "details.name"),
        ({"name": 5}, "details.name"),
        ({"name": "x" * 201}, "details.name"),
        ({"name": "a\x00"}, "details.name"),
        ({"name": "n", "scope": "root"}, "details.scope"),
        ({"name": "n", "scope": 1}, "details.scope"),
        ({"name": "n", "extra": 1}, "details.extra"),
    ],
)
def test_create_refuses_invalid_fields(api: Api, details: dict[str, Any], field: str) -> None:
    before = set(api.store.tokens)
    r = api.post("/token/create", json={"details": details})
    assert r.status_code == 422, r.text
    assert r.json()["data"]["field"] == field
    assert set(api.store.tokens) == before


def test_create_needs_details(api: Api) -> None:
    r = api.post("/token/create", json={})
    assert r.status_code == 422
    assert r.json()["data"]["field"] == "details"


def test_delete(api: Api) -> None:
    api.token("gone", Scope.READ)
    r = api.delete("/token/delete", json={"details": {"name": "gone"}})
    assert r.status_code == 200
    assert r.json()["data"] == {"name": "gone", "deleted": True}
    assert "gone" not in api.store.tokens
    r = api.delete("/token/delete", json={"details": {"name": "gone"}})
    assert r.status_code == 404


@pytest.mark.parametrize(("details", "field"), [({}, "details.name"),
                                                ({"name": 1}, "details.name"),
                                                ({"name": "a", "scope": "read"},
                                                 "details.scope")])
def test_delete_refuses_invalid_fields(api: Api, details: dict[str, Any], field: str) -> None:
    r = api.delete("/token/delete", json={"details": details})
    assert r.status_code == 422
    assert r.json()["data"]["field"] == field


def test_the_builtin_admin_token_cannot_be_deleted(api: Api) -> None:
    r = api.delete("/token/delete", json={"details": {"name": "admin"}})
    assert r.status_code == 409
    assert r.json()["data"]["error"] == "builtin_token"
    assert api.get("/token/list").status_code == 200


def test_list(api: Api) -> None:
    api.token("one", Scope.READ)
    api.token("two", Scope.WRITE)
    tokens = api.get("/token/list").json()["data"]["tokens"]
    assert [(t["name"], t["scope"], t["builtin"]) for t in tokens] == [
        ("admin", "admin", True), ("one", "read", False), ("two", "write", False)]


# --------------------------------------------------------------------------- bootstrap


def test_configured_admin_token(api: Api) -> None:
    admin = api.store.tokens["admin"]
    assert admin.builtin
    assert admin.scope is Scope.ADMIN
    assert admin.secret_hash == hash_secret(ADMIN)
    assert api.announced == []


def test_generated_admin_token_is_announced_once(api_factory: ApiFactory) -> None:
    store = InMemoryStore()
    first = api_factory(store=store, settings=Settings(executor="fake"))
    assert len(first.announced) == 1
    secret = first.announced[0]
    assert secret.startswith("gr_")
    assert first.get("/token/list", token=secret).status_code == 200
    assert store.tokens["admin"].secret_hash == hash_secret(secret)
    # a restart over the same store keeps it and prints nothing
    again = api_factory(store=store, settings=Settings(executor="fake"))
    assert again.announced == []
    assert again.get("/token/list", token=secret).status_code == 200


def test_configured_admin_token_replaces_the_old_one(api_factory: ApiFactory) -> None:
    store = InMemoryStore()
    first = api_factory(store=store, settings=Settings(executor="fake"))
    old = first.announced[0]
    new = "a-new-admin-secret-of-some-length"
    second = api_factory(store=store, settings=Settings(executor="fake", admin_token=new))
    assert second.announced == []
    assert second.get("/token/list", token=old).status_code == 401
    assert second.get("/token/list", token=new).status_code == 200
    assert [t.name for t in store.tokens.values() if t.builtin] == ["admin"]


def test_other_tokens_survive_a_restart(api_factory: ApiFactory) -> None:
    store = InMemoryStore()
    first = api_factory(store=store)
    secret = first.token("keeper", Scope.WRITE)
    second = api_factory(store=store)
    assert second.get("/task/list", token=secret).status_code == 200


def test_short_configured_admin_token_is_refused() -> None:
    from ghostrunner_http import ConfigError

    with pytest.raises(ConfigError, match="admin_token"):
        Settings(executor="fake", admin_token="short")

"""Fixtures for the HTTP API tests: the real ASGI app over InMemoryStore + FakeExecutor.

``api`` is a started app (lifespan run) wrapped so that EVERY answer it receives is
checked against the OpenAPI document: envelope, documented status, data schema. So the
OpenAPI document is tested by every test, not only by its own.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.exceptions import StarletteDeprecationWarning

from ghostrunner.testing import FakeExecutor, InMemoryStore
from ghostrunner.tokens import Scope
from ghostrunner_http import Settings, create_app
from ghostrunner_http._tokens import new_token
from ghostrunner_http.openapi import openapi_document
from tests.serverproc import REPO, ServerProcess, free_port

with warnings.catch_warnings():
    # starlette warns at import that it prefers httpx2; the project pins httpx
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

ADMIN = "admin-secret-0123456789abcdef"
DEVICES = ("node-001", "node-002", "node-003")

# Copied byte for byte from the seed document (SEED.md), with the seed's own token.
SEED_TOKEN = "abc123securetoken"
SEED_TASK_BODY = b"""{
  "authtoken": "abc123securetoken",
  "details": {
    "name": "UpdateScript",
    "command": "sudo apt update && sudo apt upgrade -y",
    "nodeids": ["node-001", "node-002", "node-003"],
    "creation": "2025-05-27T10:15:30Z",
    "status": "pending"
  }
}"""
SEED_TOKEN_CREATE_BODY = b"""{
  "authtoken": "abc123securetoken",
  "details": {
    "name": "DeploymentToken123"
  }
}"""
SEED_TOKEN_LIST_BODY = b"""{
  "authtoken": "abc123securetoken"
}"""


# --------------------------------------------------------------------------- schema checks

_DOC = openapi_document()


class SchemaMismatch(AssertionError):
    pass


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = _DOC["components"]["schemas"][name]
    return schema


def check_schema(value: Any, schema: dict[str, Any], path: str = "$") -> None:
    """A small JSON Schema checker: enough of the vocabulary the document uses."""
    schema = _resolve(schema)
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                check_schema(value, option, path)
                break
            except SchemaMismatch as exc:
                errors.append(str(exc))
        else:
            raise SchemaMismatch(f"{path}: matches no anyOf option: {errors}")
        return
    for part in schema.get("allOf", []):
        check_schema(value, part, path)
    if "const" in schema and value != schema["const"]:
        raise SchemaMismatch(f"{path}: {value!r} != const {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaMismatch(f"{path}: {value!r} not in {schema['enum']}")
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if kind is not None and not checks[kind](value):
        raise SchemaMismatch(f"{path}: {value!r} is not of type {kind}")
    if kind == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                raise SchemaMismatch(f"{path}: missing required {key!r}")
        for key, item in value.items():
            if key in props:
                check_schema(item, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                raise SchemaMismatch(f"{path}: undocumented property {key!r}")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{path}[{i}]")
    if kind == "integer" and "minimum" in schema and value < schema["minimum"]:
        raise SchemaMismatch(f"{path}: {value} < {schema['minimum']}")


def _template(path: str) -> str | None:
    template: str
    for template in _DOC["paths"]:
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path):
            return template
    return None


def check_response(method: str, path: str, response: httpx.Response) -> None:
    """The answer is documented: its status for this operation, and its body's schema."""
    status = response.status_code
    # the path as sent, after the client normalised it ("/tasks/./x" is "/tasks/x")
    template = _template(response.request.url.path)
    body = response.json()
    if template is None or method.lower() not in _DOC["paths"][template]:
        # unknown route or method: still the envelope
        assert status in (404, 405), (method, path, status)
        check_schema(body, _DOC["components"]["schemas"]["Error"])
        return
    op = _DOC["paths"][template][method.lower()]
    assert str(status) in op["responses"], f"{method} {path}: {status} is not documented"
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    check_schema(body, schema)
    if template != "/openapi.json":
        assert body["status"] == status


class Api:
    """A started app, with helpers; every answer is checked against the OpenAPI."""

    def __init__(self, client: TestClient, store: InMemoryStore, executor: FakeExecutor,
                 announced: list[str]) -> None:
        self.client = client
        self.store = store
        self.executor = executor
        self.announced = announced

    def request(self, method: str, path: str, *, token: str | None = ADMIN,
                via: str = "header", json: Any = None, content: bytes | None = None,
                params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
        """``via="header"``: Bearer; ``via="body"``: ``authtoken`` in the JSON body."""
        hdrs = dict(headers or {})
        if token is not None and via == "header":
            hdrs["Authorization"] = f"Bearer {token}"
        if token is not None and via == "body":
            json = {"authtoken": token, **(json or {})}
        response: httpx.Response = self.client.request(
            method, path, json=json, content=content, params=params, headers=hdrs)
        check_response(method, path, response)
        return response

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", path, **kw)

    def token(self, name: str, scope: Scope) -> str:
        """Create a token through the API; returns its secret."""
        r = self.post("/token/create", json={"details": {"name": name, "scope": scope.value}})
        assert r.status_code == 200, r.text
        secret: str = r.json()["data"]["token"]
        return secret

    def create(self, nodeids: list[str] | None = None, **details: Any) -> dict[str, Any]:
        body = {"name": "t", "command": "echo hi", "nodeids": nodeids or ["node-001"],
                **details}
        r = self.post("/task/create", json={"details": body})
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()["data"]
        return data

    def show(self, task_id: str) -> dict[str, Any]:
        """``GET /tasks/{id}`` with the runs' output, every page of runs followed."""
        params: dict[str, Any] = {"output": "true", "limit": 1000}
        r = self.get(f"/tasks/{task_id}", params=params)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()["data"]
        while data["runs_next_cursor"] is not None:
            r = self.get(f"/tasks/{task_id}",
                         params={**params, "cursor": data["runs_next_cursor"]})
            assert r.status_code == 200, r.text
            data = {**r.json()["data"], "runs": data["runs"] + r.json()["data"]["runs"]}
        return data

    def wait_for(self, task_id: str, predicate: Callable[[dict[str, Any]], bool],
                 timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            task = self.show(task_id)
            if predicate(task):
                return task
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; last: {task}")
            time.sleep(0.01)

    def wait_done(self, task_id: str) -> dict[str, Any]:
        return self.wait_for(task_id, lambda t: t["status"] not in ("pending", "running"))


ApiFactory = Callable[..., Api]


@pytest.fixture
def api_factory() -> Iterator[ApiFactory]:
    """``api_factory(online=..., settings=..., store=...)`` -> a started :class:`Api`."""
    stack: list[TestClient] = []

    def make(*, online: tuple[str, ...] = (), settings: Settings | None = None,
             store: InMemoryStore | None = None, executor: FakeExecutor | None = None,
             **kwargs: Any) -> Api:
        store = store if store is not None else InMemoryStore()
        if executor is None:
            executor = FakeExecutor(devices=DEVICES)
            for node in online:
                executor.set_online(node)
        announced: list[str] = []
        app = create_app(
            settings or Settings(executor="fake", admin_token=ADMIN),
            store=store, executor=executor, announce=announced.append, **kwargs,
        )
        client = TestClient(app)
        client.__enter__()
        stack.append(client)
        return Api(client, store, executor, announced)

    yield make
    for client in reversed(stack):
        client.__exit__(None, None, None)


@pytest.fixture
def api(api_factory: ApiFactory) -> Api:
    """A started app; devices node-001..003 known and offline; admin token ADMIN."""
    return api_factory()


@pytest.fixture
def seed_api(api_factory: ApiFactory) -> Api:
    """A started app whose store also holds the seed's token (abc123securetoken) as an
    admin token, so the seed's bodies can be sent byte for byte."""
    store = InMemoryStore()
    token, _ = new_token("seed", Scope.ADMIN, secret=SEED_TOKEN)
    store.tokens[token.name] = token
    return api_factory(store=store)


# --------------------------------------------------------------------------- real servers

# ServerProcess lives in tests/serverproc.py (the fault tests use it too); REPO and
# free_port are re-exported for the HTTP tests that import them from here.
__all__ = ["REPO", "ServerProcess", "free_port"]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``server_factory(config=..., env=...)`` -> a not-yet-started ServerProcess; every
    process still running at the end is killed."""
    made: list[ServerProcess] = []

    def make(config: str = 'executor = "fake"\n', env: dict[str, str] | None = None,
             workdir: Path | None = None, scheme: str = "http") -> ServerProcess:
        server = ServerProcess(workdir or tmp_path, config, env, scheme)
        made.append(server)
        return server

    yield make
    for server in made:
        server.kill()


@contextlib.contextmanager
def served(folder: Path, config: str, admin: str) -> Iterator[ServerProcess]:
    """A started ``ghostrunner serve`` with ``config`` and the admin token ``admin``,
    stopped cleanly (exit 0) at the end: the CLI modules' shared server."""
    proc = ServerProcess(folder, config, {"GHOSTRUNNER_ADMIN_TOKEN": admin})
    proc.start()
    yield proc
    assert proc.stop() == 0


def as_operator(monkeypatch: pytest.MonkeyPatch, server: ServerProcess,
                token: str) -> ServerProcess:
    """Point the CLI at ``server`` with ``token``, as an operator's environment would."""
    monkeypatch.setenv("GHOSTRUNNER_URL", server.url)
    monkeypatch.setenv("GHOSTRUNNER_TOKEN", token)
    return server

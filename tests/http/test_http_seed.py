"""The seed document's bodies, sent byte for byte, on the seed system's routes."""

from __future__ import annotations

import json

from ghostrunner import RunKey, RunState
from tests.http.conftest import (
    SEED_TASK_BODY,
    SEED_TOKEN_CREATE_BODY,
    SEED_TOKEN_LIST_BODY,
    Api,
    ApiFactory,
)


def test_info_is_the_envelope_and_needs_no_token(seed_api: Api) -> None:
    r = seed_api.get("/", token=None)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"status", "message", "data"}
    assert body["status"] == 200
    assert body["message"] == "Request successful"
    assert body["data"]["name"] == "GhostRunner"


def test_task_create_with_the_seed_body(seed_api: Api) -> None:
    r = seed_api.post("/task/create", token=None, content=SEED_TASK_BODY)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    task_id = data["id"]
    assert data["name"] == "UpdateScript"
    assert data["command"] == "sudo apt update && sudo apt upgrade -y"
    assert data["nodeids"] == ["node-001", "node-002", "node-003"]
    assert data["status"] == "pending"
    # creation from the client is ignored: the server sets it
    assert data["creation"] != "2025-05-27T10:15:30Z"
    stored = seed_api.store.tasks[task_id]
    assert stored.targets == ("node-001", "node-002", "node-003")
    assert stored.created_at.year >= 2025
    assert data["creation"].endswith("Z")
    assert all(seed_api.store.runs[RunKey(task_id, n)].state is RunState.PENDING
               for n in stored.targets)


def test_task_create_ignores_a_client_status(seed_api: Api) -> None:
    body = json.loads(SEED_TASK_BODY)
    body["details"]["status"] = "succeeded"
    body["details"]["creation"] = "not even a date"
    r = seed_api.post("/task/create", token=None, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["status"] == "pending"


def test_task_list_with_the_seed_token_body(seed_api: Api) -> None:
    seed_api.post("/task/create", token=None, content=SEED_TASK_BODY)
    r = seed_api.get("/task/list", token=None, content=SEED_TOKEN_LIST_BODY)
    assert r.status_code == 200, r.text
    (task,) = r.json()["data"]["tasks"]
    # the seed's TaskData fields are all there
    for key in ("name", "command", "nodeids", "creation", "status"):
        assert key in task
    assert task["status"] == "pending"


def test_task_delete_with_the_seed_task_body(seed_api: Api) -> None:
    """A seed client deleting by sending its TaskBody back: name + nodeids."""
    created = seed_api.post("/task/create", token=None, content=SEED_TASK_BODY).json()
    r = seed_api.delete("/task/delete", token=None, content=SEED_TASK_BODY)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["deleted"] == 1
    assert data["tasks"][0]["id"] == created["data"]["id"]
    assert seed_api.store.tasks == {}


def test_task_flush_with_the_seed_token_body(seed_api: Api) -> None:
    seed_api.post("/task/create", token=None, content=SEED_TASK_BODY)
    r = seed_api.delete("/task/flush", token=None, content=SEED_TOKEN_LIST_BODY)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {"cancelled": 3, "deleted": 1, "kept": 0}


def test_token_create_with_the_seed_body(seed_api: Api) -> None:
    r = seed_api.post("/token/create", token=None, content=SEED_TOKEN_CREATE_BODY)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["name"] == "DeploymentToken123"
    assert data["scope"] == "write"
    secret = data["token"]
    assert r.headers["cache-control"] == "no-store"
    # the new token works for the seed's workflow (queue a task), and only a hash of it
    # is stored
    assert seed_api.get("/task/list", token=secret).status_code == 200
    assert seed_api.post("/task/create", token=secret, json={"details": {
        "name": "n", "command": "c", "nodeids": ["a"]}}).status_code == 200
    stored = seed_api.store.tokens["DeploymentToken123"]
    assert secret not in repr(stored)
    assert stored.secret_hash != secret


def test_token_list_with_the_seed_body(seed_api: Api) -> None:
    r = seed_api.get("/token/list", token=None, content=SEED_TOKEN_LIST_BODY)
    assert r.status_code == 200, r.text
    names = {t["name"] for t in r.json()["data"]["tokens"]}
    assert names == {"admin", "seed"}


def test_token_delete_with_a_seed_style_body(seed_api: Api) -> None:
    seed_api.post("/token/create", token=None, content=SEED_TOKEN_CREATE_BODY)
    r = seed_api.delete("/token/delete", token=None, content=SEED_TOKEN_CREATE_BODY)
    assert r.status_code == 200, r.text
    assert "DeploymentToken123" not in seed_api.store.tokens


def test_devices_in_the_seed_shape(api_factory: ApiFactory) -> None:
    api = api_factory(online=("node-001",))
    r = api.get("/devices", token=None, content=SEED_TOKEN_LIST_BODY.replace(
        b"abc123securetoken", b"admin-secret-0123456789abcdef"))
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["nodeid"] for d in data["online_devices"]] == ["node-001"]
    assert [d["nodeid"] for d in data["offline_devices"]] == ["node-002", "node-003"]
    assert data["total_devices"] == 3
    for dev in data["online_devices"] + data["offline_devices"]:
        assert {"name", "nodeid"} <= set(dev)

"""Bad input of every kind: malformed JSON (400), bodies over the limit (413), unknown
routes (404) and methods (405), all in the envelope; and fuzzing: no input gets a 500 or
leaves a half-written task."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostrunner import RunKey, TaskQuery
from ghostrunner_http import Settings
from tests.http.conftest import ADMIN, Api, ApiFactory

BODY_ROUTES = [
    ("POST", "/task/create"),
    ("DELETE", "/task/delete"),
    ("GET", "/task/list"),
    ("DELETE", "/task/flush"),
    ("POST", "/token/create"),
    ("DELETE", "/token/delete"),
    ("GET", "/token/list"),
    ("GET", "/devices"),
    ("GET", "/tasks/x"),
    ("DELETE", "/tasks/x"),
    ("POST", "/tasks/x/cancel"),
]

MALFORMED = [
    b"{",
    b"{bad json}",
    b"{'single': 'quotes'}",
    b'{"a": 1,}',
    b'{"details": {"name": "x"}',
    b"\xff\xfe\x00garbage",
    b'{"a": "\xff"}',
    b"[1, 2, 3]",
    b'"a string"',
    b"42",
    b"null",
    b"true",
    b'{"timeout": NaN}',
    b'{"timeout": Infinity}',
    b'{"timeout": -Infinity}',
    b'{"n": ' + b"9" * 5000 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize("body", MALFORMED, ids=[repr(b[:20]) for b in MALFORMED])
def test_malformed_json_is_400(api: Api, method: str, path: str, body: bytes) -> None:
    r = api.request(method, path, content=body)
    assert r.status_code == 400, r.text
    assert r.json()["data"]["error"] == "bad_request"
    assert api.store.tasks == {}


def test_malformed_json_without_a_token_is_400_too(api: Api) -> None:
    # the token may be inside the body: without a readable body there is none to check
    r = api.request("POST", "/task/create", token=None, content=b"{oops")
    assert r.status_code == 400


def test_a_utf8_bom_is_accepted(api: Api) -> None:
    body = json.dumps({"details": {"name": "n", "command": "c", "nodeids": ["a"]}})
    r = api.post("/task/create", content=b"\xef\xbb\xbf" + body.encode())
    assert r.status_code == 200, r.text


def test_content_type_is_not_required(api: Api) -> None:
    """curl -d sends application/x-www-form-urlencoded; the body is JSON anyway."""
    body = json.dumps({"details": {"name": "n", "command": "c", "nodeids": ["a"]}})
    r = api.post("/task/create", content=body.encode(),
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("details", "field"),
    [
        ({"name": "\ud800", "command": "c", "nodeids": ["a"]}, "details.name"),
        ({"name": "n", "command": "c", "nodeids": ["a", "\udfff"]}, "details.nodeids[1]"),
        ({"name": "n", "command": "x\udc80y", "nodeids": ["a"]}, "details.command"),
        ({"name": "n", "command": "c", "nodeids": ["a"], "\ud801": 1}, "details.\ud801"),
    ],
)
def test_lone_surrogates_are_422(api: Api, details: dict[str, Any], field: str) -> None:
    body = json.dumps({"details": details})  # ensure_ascii: written as \\udXXX escapes
    r = api.post("/task/create", content=body.encode())
    assert r.status_code == 422, r.text
    assert r.json()["data"]["field"].encode("utf-8", "replace") == field.encode(
        "utf-8", "replace")
    assert api.store.tasks == {}


_TASK = '"name": "n", "command": "c", "nodeids": ["a"]'


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"details": {"name": "a", ' + _TASK + "}}", "details.name"),
        ('{"details": {' + _TASK + '}, "details": {' + _TASK + "}}", "details"),
        ('{"details": {' + _TASK + ', "select": {"group": "g", "group": "h"}}}',
         "details.select.group"),
        ('{"details": {' + _TASK + ', "rollout": {"per_minute": 1, "per_minute": 9}}}',
         "details.rollout.per_minute"),
        ('{"details": {"name": "n", "command": "c", "nodeids": [{"x": 1, "x": 2}]}}',
         "details.nodeids[0].x"),
        # the token itself: which of the two would count is a guess
        ('{"authtoken": "' + ADMIN + '", "authtoken": "wrong", "details": {' + _TASK
         + "}}", "authtoken"),
        ('{"details": {"nodeids": ["a"], "name": "n", "command": "c", "nodeids": ["b"]}}',
         "details.nodeids"),
    ],
    ids=["name", "details", "select.group", "rollout.per_minute", "in-a-list", "authtoken",
         "nodeids-apart"],
)
def test_a_key_given_twice_is_422_naming_it(api: Api, body: str, field: str) -> None:
    r = api.post("/task/create", content=body.encode(), token=None)
    assert r.status_code == 422, r.text
    data = r.json()["data"]
    assert data == {"error": "invalid_field", "field": field}
    key = field.rsplit(".", 1)[-1]
    assert f"duplicate key {key!r}" in r.json()["message"]
    assert api.store.tasks == {}


def test_a_key_given_twice_is_422_on_every_body_route(api: Api) -> None:
    for method, path in BODY_ROUTES:
        r = api.request(method, path, content=b'{"details": {}, "details": {}}')
        assert r.status_code == 422, (method, path, r.text)
        assert r.json()["data"]["field"] == "details"


def test_text_that_looks_like_keys_is_not_a_duplicate(api: Api) -> None:
    """Strings may hold anything, quotes and colons included; keys of different objects
    may be equal."""
    body = ('{"details": {"name": "name", "command": "echo \\"name\\": \\"x\\" ", '
            '"nodeids": ["name", "command"], "select": {"name": "*", "os": "name"}}}')
    r = api.post("/task/create", content=body.encode())
    assert r.status_code == 200, r.text
    assert r.json()["data"]["command"] == 'echo "name": "x" '


def test_non_ascii_text_round_trips(api: Api) -> None:
    details = {"name": "déploiement 🚀", "command": "echo 'ünïcödé' ✓",
               "nodeids": ["node//ñ"]}
    r = api.post("/task/create", json={"details": details})
    assert r.status_code == 200, r.text
    shown = api.show(r.json()["data"]["id"])
    assert (shown["name"], shown["command"], shown["nodeids"]) == (
        details["name"], details["command"], details["nodeids"])


# --------------------------------------------------------------------------- size limit


@pytest.fixture
def small(api_factory: ApiFactory) -> Api:
    return api_factory(settings=Settings(executor="fake", admin_token=ADMIN,
                                         max_body_bytes=2048))


def _big_details(size: int) -> bytes:
    return json.dumps({"details": {"name": "n", "command": "x" * size,
                                   "nodeids": ["a"]}}).encode()


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_body_over_the_limit_is_413(small: Api, method: str, path: str) -> None:
    r = small.request(method, path, content=_big_details(3000))
    assert r.status_code == 413, r.text
    assert r.json()["data"]["error"] == "payload_too_large"
    assert small.store.tasks == {}


def test_body_at_the_limit_is_read(small: Api) -> None:
    body = _big_details(100)
    body = body[:-1] + b" " * (2048 - len(body)) + b"}"
    assert len(body) == 2048
    assert small.post("/task/create", content=body).status_code == 200


def test_limit_enforced_while_streaming_without_content_length(small: Api) -> None:
    sent = []

    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            sent.append(1)
            yield b" " * 512

    r = small.client.post("/task/create", content=chunks(),
                          headers={"Authorization": f"Bearer {ADMIN}"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413
    assert r.json()["data"]["error"] == "payload_too_large"


def test_declared_content_length_over_the_limit_is_413_at_once(small: Api) -> None:
    r = small.request("POST", "/task/create", content=_big_details(3000),
                      headers={"Content-Length": str(len(_big_details(3000)))})
    assert r.status_code == 413


def test_default_limit_is_one_mebibyte(api: Api) -> None:
    assert Settings(executor="fake").max_body_bytes == 1024 * 1024
    r = api.post("/task/create", content=_big_details(1024 * 1024))
    assert r.status_code == 413
    # a command of 64 KiB (the most a command may be) fits
    r = api.post("/task/create", content=_big_details(64 * 1024))
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- routing


@pytest.mark.parametrize("path", ["/nope", "/task", "/task/", "/tasks", "/tasks/a/b/c",
                                  "/task/list/", "/devices/", "/tasks/x/",
                                  "/token/create/x", "/%00", "/task/list/extra"])
def test_unknown_route_is_404_in_the_envelope(api: Api, path: str) -> None:
    r = api.get(path)
    assert r.status_code == 404
    assert r.json()["data"]["error"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/task/create"), ("PUT", "/task/create"), ("POST", "/task/list"),
     ("GET", "/task/delete"), ("POST", "/task/flush"), ("PATCH", "/tasks/x"),
     ("POST", "/"), ("DELETE", "/devices"), ("POST", "/token/list"),
     ("GET", "/tasks/x/cancel"), ("PUT", "/openapi.json")],
)
def test_wrong_method_is_405_in_the_envelope(api: Api, method: str, path: str) -> None:
    r = api.request(method, path)
    assert r.status_code == 405
    assert r.json()["data"]["error"] == "method_not_allowed"
    assert r.headers["allow"]


def test_head_on_get_routes(api: Api) -> None:
    r = api.client.head("/")
    assert r.status_code == 200


# --------------------------------------------------------------------------- fuzzing

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                  max_size=4),
    max_leaves=12,
)
_detail_keys = st.sampled_from(["name", "command", "nodeids", "creation", "status", "shell",
                                "run_as_user", "timeout", "not_before", "expires_at",
                                "max_attempts", "delivery", "id", "scope", "x"])
_details = st.dictionaries(
    _detail_keys,
    _json_values | st.lists(st.sampled_from(["node-001", "node-002", "", " "]), max_size=4)
    | st.sampled_from(["2030-01-01T00:00:00Z", "auto", "at_least_once", "admin", "sh"]),
    max_size=8,
)
_bodies = st.one_of(
    st.fixed_dictionaries({"details": _details}),
    st.fixed_dictionaries({"details": _json_values}),
    st.dictionaries(st.sampled_from(["details", "authtoken", "nodeids", "x"]), _json_values,
                    max_size=3),
)


def _consistent(api: Api) -> None:
    """Every stored task has exactly one run per target, and nothing else exists."""
    expected = {RunKey(t.id, n) for t in api.store.tasks.values() for n in t.targets}
    assert set(api.store.runs) == expected


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(BODY_ROUTES), body=_bodies)
def test_fuzz_bodies_never_500(api: Api, route: tuple[str, str], body: Any) -> None:
    method, path = route
    r = api.request(method, path, json=body)
    assert r.status_code in (200, 400, 401, 404, 409, 413, 422), r.text
    _consistent(api)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(BODY_ROUTES), raw=st.binary(max_size=200))
def test_fuzz_raw_bytes_never_500(api: Api, route: tuple[str, str], raw: bytes) -> None:
    method, path = route
    r = api.request(method, path, content=raw)
    assert r.status_code in (200, 400, 404, 422), r.text
    _consistent(api)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.dictionaries(
    st.sampled_from(["limit", "cursor", "state", "status", "nodeid", "name", "zz"]),
    st.text(max_size=12), max_size=4))
def test_fuzz_list_query_never_500(api: Api, params: dict[str, str]) -> None:
    r = api.get("/task/list", params=params)
    assert r.status_code in (200, 422), r.text


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task_id=st.text(min_size=1, max_size=80).filter(lambda s: "/" not in s))
def test_fuzz_task_ids_never_500(api: Api, task_id: str) -> None:
    from urllib.parse import quote

    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/cancel")):
        r = api.request(method, f"/tasks/{quote(task_id, safe='')}{suffix}")
        # "." and ".." are path segments: "/tasks/./cancel" is "/tasks/cancel" (405)
        assert r.status_code in (404, 405, 422), r.text


@pytest.fixture
def sqlite_api(api_factory: ApiFactory, tmp_path: Any) -> Api:
    from ghostrunner.sqlite import SQLiteStore

    return api_factory(store=SQLiteStore(tmp_path / "fuzz.db"), online=("node-001",))


def _consistent_sqlite(api: Api) -> None:
    """Through the store's own verbs: every listed task has one run per target."""
    store = api.client.app.state.services.runner.store  # type: ignore[attr-defined]
    portal = api.client.portal
    assert portal is not None
    page = portal.call(store.list_tasks, TaskQuery(limit=1000))
    for summary in page.items:
        runs = portal.call(store.get_runs, summary.task.id)
        assert [r.node_id for r in runs] == list(summary.task.targets)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(BODY_ROUTES), body=_bodies)
def test_fuzz_bodies_never_500_over_sqlite(sqlite_api: Api, route: tuple[str, str],
                                           body: Any) -> None:
    method, path = route
    r = sqlite_api.request(method, path, json=body)
    assert r.status_code in (200, 400, 401, 404, 409, 413, 422), r.text
    _consistent_sqlite(sqlite_api)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(details=st.fixed_dictionaries({
    "name": st.text(min_size=1, max_size=30),
    "command": st.text(min_size=1, max_size=60),
    "nodeids": st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=5),
}, optional={"timeout": st.floats(allow_nan=False, allow_infinity=False)
             | st.integers(min_value=-2**70, max_value=2**70),
             "max_attempts": st.integers(min_value=-2**70, max_value=2**70),
             "not_before": st.datetimes(timezones=st.just(UTC)).map(
                 lambda d: d.isoformat())}))
def test_fuzz_task_fields_over_sqlite(sqlite_api: Api, details: dict[str, Any]) -> None:
    r = sqlite_api.post("/task/create", json={"details": details})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        shown = sqlite_api.show(r.json()["data"]["id"])
        assert shown["name"] == details["name"]
        assert shown["command"] == details["command"]
        assert shown["nodeids"] == details["nodeids"]
    _consistent_sqlite(sqlite_api)


_offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda m: timezone(timedelta(minutes=m)))
_times = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59),
                      timezones=_offsets).map(lambda d: d.isoformat())


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(not_before=st.none() | _times, expires_at=st.none() | _times)
def test_fuzz_times_never_500(api: Api, not_before: str | None,
                              expires_at: str | None) -> None:
    details = {"name": "n", "command": "c", "nodeids": ["node-001"],
               "not_before": not_before, "expires_at": expires_at}
    r = api.post("/task/create", json={"details": details})
    assert r.status_code in (200, 422), r.text
    assert api.get("/task/list").status_code == 200
    if r.status_code == 200:
        assert api.get(f"/tasks/{r.json()['data']['id']}").status_code == 200


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(not_before=st.none() | _times, expires_at=st.none() | _times)
def test_fuzz_times_never_500_over_sqlite(sqlite_api: Api, not_before: str | None,
                                          expires_at: str | None) -> None:
    details = {"name": "n", "command": "c", "nodeids": ["node-002"],
               "not_before": not_before, "expires_at": expires_at}
    r = sqlite_api.post("/task/create", json={"details": details})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        assert sqlite_api.get(f"/tasks/{r.json()['data']['id']}").status_code == 200

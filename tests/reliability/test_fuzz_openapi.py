"""Schemathesis over the served OpenAPI document, in-process against the real ASGI app.

The document is the one the app serves at ``GET /openapi.json`` (fetched through the app
itself). For every operation Schemathesis generates requests from it, both schema-valid
(positive) and schema-violating (negative) ones, and sends them to the app (its lifespan
run: store, executor and reconcile loop started) as three callers:

- ``none``: no token at all (a generated body may still carry a random ``authtoken``);
- ``read``: a valid token of scope ``read``;
- ``admin``: the valid admin token.

Every answer must pass Schemathesis' checks: no 5xx, a documented status, a documented
content type and headers, a body matching the documented schema, schema-valid requests
not refused as invalid (400/422), schema-violating ones refused. On top: the envelope
repeats the HTTP status, and no request gets past the token check that should not
(``none`` never gets a 2xx from a protected route; ``read`` never from a write or admin
one).

Two disagreements it found (``max_attempts: 30.0``, an integer to JSON Schema, was
refused; a non-string body ``authtoken`` was ignored when a header carried the token)
were fixed; the tests at the end keep them fixed. Examples are bounded (``EXAMPLES``):
about 1,700 requests, under a minute.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi
from schemathesis.specs.openapi import converter
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ghostrunner import Device, Selector
from ghostrunner.errors import ValidationError
from ghostrunner.testing import FakeExecutor, InMemoryStore
from ghostrunner.tokens import Scope
from ghostrunner_http import Settings, create_app
from ghostrunner_http._tokens import new_token
from ghostrunner_http.openapi import openapi_document

ADMIN = "fuzz-admin-secret-0123456789abcdef"
READ = "fuzz-read-secret-0123456789abcdef"
CALLERS = {"none": None, "read": READ, "admin": ADMIN}
SCOPE_OF = {"none": None, "read": Scope.READ, "admin": Scope.ADMIN}
#: examples per (operation, generation mode), by caller: the admin token reaches the
#: handlers, so it gets the most; without a token (or with read on a write route) the
#: request stops at the token check.
#: ``GHOSTRUNNER_FUZZ_SCALE=10`` multiplies them (to fuzz longer by hand).
EXAMPLES = {caller: max(1, round(n * float(os.environ.get("GHOSTRUNNER_FUZZ_SCALE", "1"))))
            for caller, n in {"none": 15, "read": 15, "admin": 60}.items()}

#: the targets of the task each app holds from the start
SEED_TARGETS = ["node-001", "node-002"]

DOC = openapi_document()
# GET /events never ends (a stream): tests/http/test_http_events.py checks it over a
# real server instead
OPERATIONS = [(method.upper(), path) for path, item in DOC["paths"].items()
              for method in item if path != "/events"]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    positive_data_acceptance,
    negative_data_rejection,
]
NEEDS = {"read": Scope.READ, "write": Scope.WRITE, "admin": Scope.ADMIN}


def _needed_scope(method: str, path: str) -> Scope | None:
    op = DOC["paths"][path][method.lower()]
    if not op["security"]:
        return None
    # "Needs a token with scope **write** or higher."
    word = op["description"].split("**")[1]
    return NEEDS[word]


def _has_input(method: str, path: str) -> bool:
    op = DOC["paths"][path][method.lower()]
    return "parameters" in op or "requestBody" in op


class Target:
    """One app (own store, executor and lifespan) for one caller, with a task in it."""

    def __init__(self) -> None:
        store = InMemoryStore()
        reader, _ = new_token("fuzz-reader", Scope.READ, secret=READ)
        store.tokens[reader.name] = reader
        # node-001 online (its runs finish), the others offline (their runs stay pending)
        executor = FakeExecutor(devices=[Device(node_id="node-001", name="node-001",
                                                online=True),
                                         Device(node_id="node-002", name="node-002"),
                                         Device(node_id="node-003", name="node-003")])
        self.app = create_app(Settings(executor="fake", admin_token=ADMIN), store=store,
                              executor=executor, announce=lambda secret: None)
        self.statuses: Counter[int] = Counter()
        self.task_id = ""

    def seed(self) -> None:
        with asgi.get_client(self.app) as client:
            r = client.post(f"http://{asgi.HOST}/task/create",
                            headers={"Authorization": f"Bearer {ADMIN}"},
                            data=json.dumps({"details": {
                                "name": "fuzz-seed", "command": "echo seed",
                                "nodeids": SEED_TARGETS}}))
            assert r.status_code == 200, r.text
            self.task_id = r.json()["data"]["id"]


def _fold_only_short_bounds(original: Any) -> Any:
    """Schemathesis folds ``maxLength`` into a pattern's quantifiers before generating
    (``^[^\\x00]{0,65535}...``); with the command's bound of 65,536 every strategy built
    from it costs seconds (``POST /task/create``: 10 s, and 30 s more for negative
    cases). Skip the folding for bounds over 4,096: the generated values are the same kind
    (the bound is still checked), the module runs in a fraction of the time."""

    def update_pattern_in_schema(schema: dict[str, Any]) -> None:
        bound = schema.get("maxLength")
        if isinstance(bound, int) and bound > 4096:
            return
        original(schema)

    return update_pattern_in_schema


def _config() -> SchemathesisConfig:
    """413 is a right answer to any request, valid or not, whose body is over the limit
    (1 MiB): a few thousand long node ids are enough, and Schemathesis makes them."""
    defaults = SchemathesisConfig.from_dict({}).projects.default.checks
    return SchemathesisConfig.from_dict({"checks": {
        name: {"expected-statuses": [*getattr(defaults, name).expected_statuses, "413"]}
        for name in ("negative_data_rejection", "positive_data_acceptance")
    }})


@pytest.fixture(scope="module")
def fuzz() -> Iterator[tuple[Any, dict[str, Target]]]:
    """The schema as served by the app, and one started app per caller."""
    targets = {caller: Target() for caller in CALLERS}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(converter, "update_pattern_in_schema",
                      _fold_only_short_bounds(converter.update_pattern_in_schema))
        try:
            schema = schemathesis.openapi.from_asgi("/openapi.json", targets["admin"].app,
                                                    config=_config())
            assert schema.raw_schema == json.loads(json.dumps(DOC))
            for target in targets.values():
                target.seed()
            yield schema, targets
        finally:
            # stops every lifespan Schemathesis started (store closed, loop stopped)
            asgi.shutdown_lifespans()


def _check_auth(caller: str, method: str, path: str, status: int, text: str) -> None:
    needed = _needed_scope(method, path)
    if needed is None or not 200 <= status < 300:
        return
    scope = SCOPE_OF[caller]
    assert scope is not None, f"{method} {path} answered {status} without a token: {text}"
    assert scope.allows(needed), (
        f"{method} {path} answered {status} to a {scope.value} token: {text}")


#: negative cases only where the request has something to make invalid
CASES = [(method, path, mode) for method, path in OPERATIONS for mode in GenerationMode
         if mode.is_positive or _has_input(method, path)]


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize(("method", "path", "mode"), CASES,
                         ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_schemathesis(fuzz: tuple[Any, dict[str, Target]], method: str, path: str,
                      mode: GenerationMode, caller: str) -> None:
    schema, targets = fuzz
    target = targets[caller]
    token = CALLERS[caller]
    operation = schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode)
    if "{task_id}" in path:
        # half the cases name a task that exists, so the handlers behind the 404 run too
        strategy = st.one_of(strategy, operation.as_strategy(
            generation_mode=mode, path_parameters={"task_id": target.task_id}))

    @settings(max_examples=EXAMPLES[caller], deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        headers = {k: v for k, v in (case.headers or {}).items()
                   if k.lower() != "authorization"}
        checks = CHECKS
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if _breaks_a_rule_in_prose(path, case.body):
            # a 422 is right, though the JSON Schema alone allows the request
            checks = [c for c in checks if c is not positive_data_acceptance]
        case.headers = headers
        response = case.call(app=target.app)
        target.statuses[response.status_code] += 1
        case.validate_response(response, checks=checks, headers=headers)
        if path != "/openapi.json":
            assert response.json()["status"] == response.status_code, response.text
        _check_auth(caller, method, path, response.status_code, response.text)

    run()


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text.upper() if text.isascii() else text)
        value.astimezone(UTC)
    except (ValueError, OverflowError):
        return datetime.min.replace(tzinfo=UTC)  # refused: out of range in UTC
    return value


def _breaks_a_rule_in_prose(path: str, body: Any) -> bool:
    """Rules that JSON Schema cannot state, which the document gives in the descriptions:
    a task's ``expires_at`` after its ``not_before``, times in years 1 to 9999 once in
    UTC; the ``nodeids`` of a cancel among the task's targets."""
    if not isinstance(body, dict):
        return False
    if path == "/tasks/{task_id}/cancel":
        nodeids = body.get("nodeids")
        return isinstance(nodeids, list) and any(
            not isinstance(node, str) or node not in SEED_TARGETS for node in nodeids)
    if not isinstance(body.get("details"), dict):
        return False
    details = body["details"]
    if _selects_nothing(details):
        return True
    not_before, expires_at = _time(details.get("not_before")), _time(details.get("expires_at"))
    out_of_range = datetime.min.replace(tzinfo=UTC)
    if out_of_range in (not_before, expires_at):
        return True
    return not_before is not None and expires_at is not None and expires_at <= not_before


def _selects_nothing(details: dict[str, Any]) -> bool:
    """``continuous`` without ``select``, or a snapshot ``select`` that matches none of
    the fuzz app's devices and no ``nodeids``: 422 (devices are known at run time)."""
    select = details.get("select")
    if not isinstance(select, dict):
        return details.get("continuous") is True
    if details.get("continuous") is True or details.get("nodeids"):
        return False
    try:
        selector = Selector(**{k: v for k, v in select.items() if v is not None})
    except (ValidationError, TypeError):
        return False  # the schema refuses it already
    return not any(selector.matches(Device(node_id=n, name=n))
                   for n in ("node-001", "node-002", "node-003"))


def test_fuzz_totals(fuzz: tuple[Any, dict[str, Target]], figures: Any) -> None:
    """Record how many requests each caller sent and what came back (after the
    fuzzing above: tests run in file order)."""
    _, targets = fuzz
    for caller, target in targets.items():
        total = sum(target.statuses.values())
        figures.add(f"fuzz: requests as {caller}", total)
        figures.add(f"fuzz: statuses as {caller}",
                    ", ".join(f"{code}x{n}" for code, n in sorted(target.statuses.items())))
        assert not any(code >= 500 for code in target.statuses)


# --------------------------------------------------------------------------- known bugs


@pytest.fixture
def one_app(fuzz: tuple[Any, dict[str, Target]]) -> Iterator[Any]:
    """A client of the admin caller's app (already started by ``fuzz``)."""
    with asgi.get_client(fuzz[1]["admin"].app) as client:
        yield client


def _post(client: Any, path: str, body: dict[str, Any], token: str | None = ADMIN) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post(f"http://{asgi.HOST}{path}", headers=headers, data=json.dumps(body))


def test_integral_float_is_an_integer(one_app: Any) -> None:
    r = _post(one_app, "/task/create", {"details": {
        "name": "n", "command": "c", "nodeids": ["node-002"], "max_attempts": 30.0}})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["max_attempts"] == 30
    for bad in (30.5, True):
        r = _post(one_app, "/task/create", {"details": {
            "name": "n", "command": "c", "nodeids": ["node-002"], "max_attempts": bad}})
        assert r.status_code == 422, r.text
        assert r.json()["data"]["field"] == "details.max_attempts"


def test_non_string_body_authtoken_is_refused_even_with_a_header(one_app: Any) -> None:
    r = _post(one_app, "/token/create", {"authtoken": True, "details": {"name": "x"}})
    assert r.status_code == 401, r.text
    assert "authtoken must be a string" in r.json()["message"]


def test_delete_details_need_an_id_or_a_name(one_app: Any) -> None:
    """The document says so (anyOf id/name), and the server answers 422."""
    details = DOC["components"]["schemas"]["DeleteDetails"]
    assert details["anyOf"] == [{"required": ["id"]}, {"required": ["name"]}]
    r = one_app.delete(f"http://{asgi.HOST}/task/delete",
                       headers={"Authorization": f"Bearer {ADMIN}"},
                       data=json.dumps({"details": {}}))
    assert r.status_code == 422
    assert r.json()["data"]["field"] == "details.name"


"""The OpenAPI document: it lists exactly the app's routes, every reference resolves, and
the seed's bodies match the request schemas. (Every answer the other tests receive is
checked against it by the ``api`` fixture.)"""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.routing import Route

from ghostrunner import Task
from ghostrunner.errors import ValidationError
from ghostrunner_http.app import ROUTES
from ghostrunner_http.openapi import openapi_document
from tests.http.conftest import (
    SEED_TASK_BODY,
    SEED_TOKEN_CREATE_BODY,
    SEED_TOKEN_LIST_BODY,
    Api,
    check_schema,
)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["$ref"]] if "$ref" in node else []
        for value in node.values():
            out.extend(_refs(value))
        return out
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def test_served_document_is_the_document(api: Api) -> None:
    r = api.get("/openapi.json", token=None)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == json.loads(json.dumps(openapi_document()))


def test_every_route_and_method_is_documented_and_nothing_else() -> None:
    doc = openapi_document()
    app_ops = set()
    for route in ROUTES:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                app_ops.add((route.path, method.lower()))
    doc_ops = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert app_ops == doc_ops


def test_every_reference_resolves() -> None:
    doc = openapi_document()
    for ref in _refs(doc):
        assert re.fullmatch(r"#/components/schemas/\w+", ref), ref
        assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], ref


def test_every_operation_documents_its_answers() -> None:
    doc = openapi_document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert "200" in op["responses"], (path, method)
            assert op["summary"]
            assert "description" in op
            if op["security"]:
                for code in ("400", "401", "403", "413", "422"):
                    assert code in op["responses"], (path, method, code)
            for param in op.get("parameters", []):
                if param["in"] == "path":
                    assert "{" + param["name"] + "}" in path


def test_seed_bodies_match_the_request_schemas() -> None:
    doc = openapi_document()

    def body_schema(path: str, method: str) -> dict[str, Any]:
        schema: dict[str, Any] = doc["paths"][path][method]["requestBody"]["content"][
            "application/json"]["schema"]
        return schema

    check_schema(json.loads(SEED_TASK_BODY), body_schema("/task/create", "post"))
    check_schema(json.loads(SEED_TASK_BODY), body_schema("/task/delete", "delete"))
    check_schema(json.loads(SEED_TOKEN_CREATE_BODY), body_schema("/token/create", "post"))
    check_schema(json.loads(SEED_TOKEN_CREATE_BODY), body_schema("/token/delete", "delete"))
    check_schema(json.loads(SEED_TOKEN_LIST_BODY), doc["components"]["schemas"]["AuthBody"])


def test_bearer_security_scheme() -> None:
    doc = openapi_document()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"]}
    assert doc["paths"]["/"]["get"]["security"] == []
    assert doc["paths"]["/task/create"]["post"]["security"] == [{"bearer": []}]


def test_the_whitespace_of_text_patterns_is_pythons() -> None:
    from ghostrunner_http.openapi import SPACE_CHARS

    assert set(SPACE_CHARS) == {chr(c) for c in range(0x110000) if chr(c).isspace()}


def test_text_pattern_agrees_with_the_library() -> None:
    from ghostrunner_http.openapi import _TEXT

    for text in ("a", " ", "\x1c", " a ", "\ufeff", "a\x00b", "\u3000", "\u3000x", ""):
        assert bool(re.match(_TEXT, text)) == (bool(text.strip()) and "\x00" not in text), text


def _library_takes(node: str) -> bool:
    try:
        Task(name="n", command="c", targets=[node])
    except ValidationError:
        return False
    return True


_NODE_CHARS = st.sampled_from(["a", "/", " ", "\t", "\n", "\x00", "\x1b", "\x7f", "\x85",
                               "\x9f", "\xa0", "\u2028", "\u3000", "\ufeff", "é", "✓"])


@settings(max_examples=500, deadline=None)
@given(node=st.text(_NODE_CHARS, min_size=1, max_size=6) | st.text(min_size=1, max_size=8))
def test_node_id_pattern_agrees_with_the_library(node: str) -> None:
    """The document's node id pattern says what a Task takes (and the HTTP layer checks
    cancel and delete node ids with it): the same node ids, length aside."""
    from ghostrunner_http.openapi import NODE_ID_BODY, NODE_ID_PATTERN

    assert f"^{NODE_ID_BODY}$" == NODE_ID_PATTERN
    for lookaround in ("(?=", "(?!", "(?<=", "(?<!"):
        assert lookaround not in NODE_ID_PATTERN  # generators cannot draw from those
    if any("\ud800" <= c <= "\udfff" for c in node):
        return  # lone surrogates: refused before any field is read
    assert bool(re.fullmatch(NODE_ID_BODY, node)) == _library_takes(node), repr(node)


def test_every_nodeids_list_in_the_document_has_the_node_id_pattern() -> None:
    from ghostrunner_http.openapi import NODE_ID_PATTERN

    schemas = openapi_document()["components"]["schemas"]
    for name, holder in (("TaskDetails", schemas["TaskDetails"]),
                         ("DeleteDetails", schemas["DeleteDetails"]),
                         ("CancelBody", schemas["CancelBody"])):
        assert holder["properties"]["nodeids"]["items"]["pattern"] == NODE_ID_PATTERN, name

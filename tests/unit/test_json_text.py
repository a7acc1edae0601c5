"""JSON written by orjson (answers, PostgreSQL's JSON parameters), the standard library
for what orjson refuses: the same text either way (but the spelling of exponents:
``1e-7`` for ``1e-07``, the same number)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ghostrunner._sqlkit import json_text
from ghostrunner_http._render import Envelope, render_json

VALUES: list[Any] = [
    {"status": 200, "message": "Request successful", "data": {
        "name": "café ☕ 日本", "timeout": 300.0, "ratio": 0.1, "n": -(2**63),
        "none": None, "ok": True, "list": [1, 2.5, "x\n\t\"\\", []], "empty": {}}},
    ["a", 12345678.9, 2**63 - 1],
]


@pytest.mark.parametrize("value", VALUES)
def test_the_same_text_as_the_standard_librarys_compact_output(value: Any) -> None:
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert render_json(value) == expected.encode()
    assert json_text(value) == expected
    assert Envelope(value).body == expected.encode()


def test_exponents_are_spelled_differently_but_read_back_the_same() -> None:
    value = [1e-7, 1e22, 1.5e300]
    assert json.loads(render_json(value)) == value == json.loads(json_text(value))


def test_what_orjson_refuses_goes_the_slow_way() -> None:
    # a lone surrogate (conceivable in device output) and an integer beyond 64 bits
    assert render_json({"out": "a\ud800b"}) == b'{"out":"a?b"}'
    assert render_json({"n": 2**70}) == b'{"n":1180591620717411303424}'
    assert json_text({"n": 2**70}) == '{"n":1180591620717411303424}'
    assert json.loads(json_text({"out": "a\ud800b"})) == {"out": "a\ud800b"}

"""MeshCentralExecutor's reading of a reply (``_outcome``), without a server: which
replies mean "never started" (retry), "unknown" (lost under at_most_once) or "failed"."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from ghostrunner.errors import NotDelivered, OutcomeUnknown, PermanentError
from ghostrunner.meshcentral import MeshCentralExecutor
from ghostrunner.meshcentral._executor import _Dispatch
from ghostrunner.meshcentral._wrappers import wrap_command

STARTED = datetime(2026, 1, 1, tzinfo=UTC)


def outcome(raw: str, *, once: str | None, shell: str = "sh") -> object:
    async def read() -> object:
        executor = MeshCentralExecutor("wss://127.0.0.1:1", user="u", password="p")
        wrapped = wrap_command("echo hi", shell, timeout=5, once=once)
        dispatch = _Dispatch(node_id="node//x", wrapped=wrapped, responseid="r")
        return executor._outcome(dispatch, {"action": "msg", "result": raw}, STARTED)

    return asyncio.run(read())


@pytest.mark.parametrize("raw", ["", "\n", "  \r\n"])
def test_an_empty_reply_is_not_delivered_when_the_wrapper_is_guarded(raw: str) -> None:
    """An agent that is stopping answers with nothing: the wrapper never reached BEGIN,
    and a resend of a command that had got further would meet the once-only guard."""
    with pytest.raises(NotDelivered, match="without starting"):
        outcome(raw, once="k" * 16)


@pytest.mark.parametrize(("once", "shell"), [(None, "sh"), ("k" * 16, "cmd")])
def test_an_empty_reply_is_unknown_without_a_guard(once: str | None, shell: str) -> None:
    with pytest.raises(OutcomeUnknown, match="no output at all"):
        outcome("", once=once, shell=shell)


def test_other_text_without_begin_is_a_permanent_failure() -> None:
    with pytest.raises(PermanentError, match="did not run GhostRunner's wrapper"):
        outcome("sh: 1: not found\n", once="k" * 16)

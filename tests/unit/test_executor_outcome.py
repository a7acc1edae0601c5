"""MeshCentralExecutor's reading of a reply (``_outcome``), without a server: which
replies mean "never started" (retry), "unknown" (recoverable from the device's journal,
or not: lost under at_most_once), "failed", or an outcome recovered from the journal."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from ghostrunner import Outcome
from ghostrunner.errors import NotDelivered, OutcomeUnknown, PermanentError
from ghostrunner.meshcentral import MeshCentralExecutor
from ghostrunner.meshcentral._executor import _Dispatch
from ghostrunner.meshcentral._wrappers import wrap_command

STARTED = datetime(2026, 1, 1, tzinfo=UTC)


def outcome(raw: str, *, once: str | None, shell: str = "sh", marker: str = "m" * 32) -> object:
    async def read() -> object:
        executor = MeshCentralExecutor("wss://127.0.0.1:1", user="u", password="p")
        wrapped = wrap_command("echo hi", shell, timeout=5, once=once, marker=marker)
        dispatch = _Dispatch(node_id="node//x", wrapped=wrapped, responseid="r")
        return executor._outcome(dispatch, {"action": "msg", "result": raw}, STARTED)

    return asyncio.run(read())


@pytest.mark.parametrize("raw", ["", "\n", "  \r\n"])
def test_an_empty_reply_is_not_delivered_when_the_wrapper_is_guarded(raw: str) -> None:
    """An agent that is stopping answers with nothing: the wrapper never reached BEGIN,
    and a resend of a command that had got further would meet the once-only guard."""
    with pytest.raises(NotDelivered, match="without starting"):
        outcome(raw, once="k" * 16)


@pytest.mark.parametrize("once", [None, "k" * 16])
def test_an_empty_reply_is_unknown_without_a_journal(once: str | None) -> None:
    """Windows agents keep no journal: an empty reply proves nothing."""
    with pytest.raises(OutcomeUnknown, match="no output at all") as info:
        outcome("", once=once, shell="cmd")
    assert not info.value.recoverable


M = "m" * 32


def test_a_record_from_the_journal_is_a_recovered_outcome() -> None:
    raw = f"\nGR_RECORD_{M}\n\nGR_BEGIN_{M}\nhello\n\nGR_END_{M} rc=3 timeout=0 cut=0\n"
    result = outcome(raw, once="k" * 16)
    assert isinstance(result, Outcome)
    assert (result.exit_code, result.output, result.recovered) == (3, "hello\n", True)
    assert result.started_at is None  # the record has no times: the loop keeps its own


def test_a_command_run_now_is_not_recovered() -> None:
    result = outcome(f"\nGR_BEGIN_{M}\nhi\n\nGR_END_{M} rc=0 timeout=0 cut=0\n", once="k" * 16)
    assert isinstance(result, Outcome)
    assert (result.exit_code, result.recovered) == (0, False)


@pytest.mark.parametrize(
    ("line", "error", "match", "recoverable"),
    [
        (f"GR_RUNNING_{M}", NotDelivered, "still running", False),
        (f"GR_UNKNOWN_{M}", OutcomeUnknown, "recorded no outcome", False),
        (f"GR_GONE_{M}", OutcomeUnknown, "journal is gone", False),
        (f"GR_NOJOURNAL_{M} no journal directory: set X", PermanentError,
         "no usable journal \\(no journal directory: set X\\)", False),
        (f"GR_BEGIN_{M}\npartial", OutcomeUnknown, "never came back", True),
    ],
)
def test_what_the_journal_says(
    line: str, error: type[Exception], match: str, recoverable: bool
) -> None:
    with pytest.raises(error, match=match) as info:
        outcome(f"noise\n{line}\n", once="k" * 16)
    assert getattr(info.value, "recoverable", False) is recoverable


def test_journal_lines_need_this_runs_marker() -> None:
    with pytest.raises(PermanentError, match="did not run GhostRunner's wrapper"):
        outcome(f"\nGR_GONE_{'0' * 32}\n", once="k" * 16)


def test_other_text_without_begin_is_a_permanent_failure() -> None:
    with pytest.raises(PermanentError, match="did not run GhostRunner's wrapper"):
        outcome("sh: 1: not found\n", once="k" * 16)

"""Session-wide test helpers.

``figures``: fault, load and fuzz tests record what they measured (``figures.add(
"load: create p99", 41.2, "ms")``). The figures are printed in the terminal summary of
every run (so CI's log carries them) and, when ``GHOSTRUNNER_FIGURES`` names a file,
also written there as JSON lines. ``docs/reliability.md`` quotes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.pg import PgServer


class Figures:
    """Measured values a test wants reported, in the order recorded."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float | int | str, str]] = []

    def add(self, name: str, value: float | int | str, unit: str = "", *,
            test: str = "") -> None:
        self.rows.append((test, name, value, unit))
        target = os.environ.get("GHOSTRUNNER_FIGURES")
        if target:
            with Path(target).open("a", encoding="utf-8") as out:
                out.write(json.dumps({"test": test, "name": name, "value": value,
                                      "unit": unit}) + "\n")


_FIGURES = Figures()


class _Bound:
    def __init__(self, test: str) -> None:
        self._test = test

    def add(self, name: str, value: float | int | str, unit: str = "") -> None:
        _FIGURES.add(name, value, unit, test=self._test)


@pytest.fixture(autouse=True, scope="session")
def _device_journal(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Wrapped commands run here keep their journal in a temporary directory, never in
    the machine's /var/lib/ghostrunner or ~/.ghostrunner (tests may pick their own)."""
    os.environ.setdefault(
        "GHOSTRUNNER_JOURNAL", str(tmp_path_factory.mktemp("device") / "journal")
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """A real PostgreSQL (pgserver) for the session, started on first use and stopped
    (its data deleted) at the end; ``postgres.database()`` makes a fresh database."""
    from tests.pg import PgServer

    server = PgServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_postgres() -> Iterator[PgServer]:
    """A PostgreSQL of the test's own, which it may stop and start again (a database
    restart) without disturbing the session's."""
    from tests.pg import PgServer

    server = PgServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> _Bound:
    """Record a measured figure: ``figures.add(name, value, unit)``."""
    return _Bound(request.node.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES.rows:
        return
    terminalreporter.section("measured figures")
    for _test, name, value, unit in _FIGURES.rows:
        shown = f"{value:,.2f}" if isinstance(value, float) else (
            f"{value:,}" if isinstance(value, int) else value)
        terminalreporter.write_line(f"{name:60} {shown} {unit}".rstrip())

"""Fixtures for the store contract suite: one event loop per test, and every store.

``async def`` tests run on that loop through the tiny ``pytest_pyfunc_call`` hook below
(the project does not depend on pytest-asyncio). Sync tests (Hypothesis ones) call
``runner.run(...)`` themselves.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ghostrunner._memory import InMemoryStore
from ghostrunner._protocols import Store
from ghostrunner.sqlite import SQLiteStore

STORES = ["memory", "sqlite"]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    runner: asyncio.Runner = pyfuncitem.funcargs["runner"]  # type: ignore[assignment]
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in names}
    runner.run(pyfuncitem.obj(**kwargs))
    return True


@pytest.fixture(autouse=True)
def runner() -> Iterator[asyncio.Runner]:
    """The test's event loop (autouse, so the hook above always finds it)."""
    with asyncio.Runner() as r:
        yield r


def make_store(kind: str, path: Path) -> Store:
    if kind == "memory":
        return InMemoryStore()
    return SQLiteStore(path / "ghostrunner.db")


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path, runner: asyncio.Runner) -> Iterator[Any]:
    """An open store of each kind; closed after the test."""
    s = make_store(request.param, tmp_path)
    runner.run(s.open())
    yield s
    runner.run(s.close())


@pytest.fixture
def sqlite_store(tmp_path: Path, runner: asyncio.Runner) -> Iterator[SQLiteStore]:
    """An open SQLiteStore on a file in tmp_path, for the SQLite-only tests."""
    s = SQLiteStore(tmp_path / "ghostrunner.db")
    runner.run(s.open())
    yield s
    runner.run(s.close())

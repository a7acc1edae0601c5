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
from ghostrunner.postgres import PostgresStore
from ghostrunner.sqlite import SQLiteStore
from tests.pg import PgServer

STORES = ["memory", "sqlite", "postgres"]


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


def make_store(kind: str, path: Path, request: pytest.FixtureRequest | None = None) -> Store:
    """A store of ``kind``: on a file in ``path`` (SQLite), or on a fresh database of
    the session's PostgreSQL (which ``request`` starts on first use)."""
    if kind == "memory":
        return InMemoryStore()
    if kind == "postgres":
        assert request is not None
        server: PgServer = request.getfixturevalue("postgres")
        dsn = server.database()
        request.addfinalizer(lambda: server.drop(dsn))
        return PostgresStore(dsn, max_size=4)
    return SQLiteStore(path / "ghostrunner.db")


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path, runner: asyncio.Runner) -> Iterator[Any]:
    """An open store of each kind; closed after the test."""
    s = make_store(request.param, tmp_path, request)
    runner.run(s.open())
    yield s
    runner.run(s.close())


@pytest.fixture
def pg_store(postgres: PgServer, runner: asyncio.Runner) -> Iterator[PostgresStore]:
    """An open PostgresStore on a fresh database, for the PostgreSQL-only tests."""
    dsn = postgres.database()
    s = PostgresStore(dsn, max_size=4)
    runner.run(s.open())
    yield s
    runner.run(s.close())
    postgres.drop(dsn)


@pytest.fixture
def sqlite_store(tmp_path: Path, runner: asyncio.Runner) -> Iterator[SQLiteStore]:
    """An open SQLiteStore on a file in tmp_path, for the SQLite-only tests."""
    s = SQLiteStore(tmp_path / "ghostrunner.db")
    runner.run(s.open())
    yield s
    runner.run(s.close())

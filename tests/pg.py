"""A real PostgreSQL for the tests: the ``pgserver`` wheel (PostgreSQL 16 inside a
Python package) started in a temporary directory, and a fresh database per test.

One server per test session (``postgres`` fixture in tests/conftest.py, started on
first use, stopped and deleted at the end). Each test gets its own database, created
from a template that already has GhostRunner's schema (``CREATE DATABASE ... TEMPLATE``:
about 50 ms), so tests never see each other's data; :meth:`PgServer.empty_database`
gives one without the schema, for the migration tests.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import psycopg


class PgServer:
    """A running PostgreSQL, and the databases the tests made on it."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: as root, pgserver runs PostgreSQL as the user
        # "pgserver", which must be able to reach the data directory, and every pytest
        # session on the machine (other checkouts' too) makes /tmp/pytest-of-root
        # private again (0700): the server would lose its own files mid-run.
        self.root = Path(tempfile.mkdtemp(prefix="ghostrunner-pg-"))
        with warnings.catch_warnings():  # platformdirs warns without XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            import pgserver

            self._server: Any = pgserver.get_server(self.root / "data", cleanup_mode="delete")
        self.uri: str = self._server.get_uri()
        self.pid: int | None = self._server.get_pid()
        self._names = itertools.count()
        with self.admin() as conn:
            # a test server: durability is not what is tested here, speed matters
            for name, value in (("fsync", "off"), ("synchronous_commit", "off"),
                                ("full_page_writes", "off")):
                conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("CREATE DATABASE gr_template")
            conn.execute("CREATE DATABASE gr_empty")
        self._migrate(self.dsn("gr_template"))
        with self.admin() as conn:
            conn.execute("ALTER DATABASE gr_template WITH is_template = true")

    def dsn(self, database: str) -> str:
        return self._server.get_uri(database)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.uri, autocommit=True)

    @staticmethod
    def _migrate(dsn: str) -> None:
        from ghostrunner.postgres import PostgresStore

        async def go() -> None:
            store = PostgresStore(dsn)
            await store.open()
            await store.close()

        asyncio.run(go())

    def database(self, *, schema: bool = True) -> str:
        """A new database (with GhostRunner's schema, or empty); its DSN."""
        name = f"gr_test_{next(self._names)}"
        template = "gr_template" if schema else "gr_empty"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
        return self.dsn(name)

    def drop(self, dsn: str) -> None:
        name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop_server(self) -> None:
        """Stop PostgreSQL now (``pg_ctl stop -m fast``: every connection is cut), keeping
        its data: :meth:`start_server` brings it back on the same socket."""
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self._server.pgdata,
               user=self._server.system_user, timeout=60)

    def start_server(self) -> None:
        with self._server._lock:
            self._server.ensure_postgres_running()
        self.pid = self._server.get_pid()
        assert self._server.get_uri() == self.uri

    def stop(self) -> None:
        """Stop the server (pg_ctl stop) and delete its files."""
        try:
            self._server.cleanup()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

"""PostgreSQL as the server's database: the ``database`` setting (file, environment,
flag), a real ``ghostrunner serve`` on a real PostgreSQL (pgserver), and ``ghostrunner
db migrate`` from SQLite, compared field by field."""

from __future__ import annotations

import asyncio
import io
import urllib.parse
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest

from ghostrunner import Outcome, Rollout, RunKey, RunState, Selector, SQLiteStore, TaskQuery
from ghostrunner.audit import AuditEntry, AuditQuery
from ghostrunner.postgres import PostgresStore
from ghostrunner.tokens import Scope
from ghostrunner.webhooks import DeliveryQuery, DeliveryStatus, NewDelivery
from ghostrunner_http import ConfigError, Settings, load_settings
from ghostrunner_http._tokens import new_token
from ghostrunner_http.cli import main
from tests.contract.test_store_contract import NOW, add, at, dispatch, make_task
from tests.http.conftest import ServerProcess
from tests.pg import PgServer

ADMIN_SECRET = "pg-admin-secret-0123456789"
DB_PASSWORD = "pg-Pass-w0rd-never-logged"
FAKE = {"executor": "fake"}


# --------------------------------------------------------------------------- settings


def test_a_postgresql_url_picks_postgres(tmp_path: Path) -> None:
    url = f"postgresql://gr:{DB_PASSWORD}@db.example.com:5432/ghostrunner"
    s = load_settings(None, {"GHOSTRUNNER_DATABASE": url}, FAKE)
    assert s.database_url == url
    assert s.store_kind == "postgresql"
    assert DB_PASSWORD not in repr(s)
    assert "gr:[REDACTED]@db.example.com" in repr(s)
    assert DB_PASSWORD in s.secrets
    # postgres:// too; a path or sqlite:/// keeps SQLite
    assert load_settings(None, {}, {**FAKE, "database": "postgres://h/db"}).store_kind == (
        "postgresql")
    for value, path in (("/var/lib/gr/x.db", Path("/var/lib/gr/x.db")),
                        ("sqlite:///var/lib/gr/x.db", Path("/var/lib/gr/x.db")),
                        ("sqlite:////var/lib/gr/x.db", Path("/var/lib/gr/x.db"))):
        s = load_settings(None, {}, {**FAKE, "database": value})
        assert (s.database, s.database_url, s.store_kind) == (path, None, "sqlite")
    assert Settings(executor="fake").store_kind == "sqlite"


def test_database_precedence_file_env_flag(tmp_path: Path) -> None:
    config = tmp_path / "gr.toml"
    config.write_text('executor = "fake"\ndatabase = "postgresql://file/db"\n'
                      "database_pool_min = 2\ndatabase_pool_max = 4\n", encoding="utf-8")
    s = load_settings(config, {}, {})
    assert (s.database_url, s.database_pool_min, s.database_pool_max) == (
        "postgresql://file/db", 2, 4)
    s = load_settings(config, {"GHOSTRUNNER_DATABASE": "postgresql://env/db",
                               "GHOSTRUNNER_DATABASE_POOL_MAX": "8"}, {})
    assert (s.database_url, s.database_pool_max) == ("postgresql://env/db", 8)
    # the flag wins, and a path there means SQLite again
    s = load_settings(config, {"GHOSTRUNNER_DATABASE": "postgresql://env/db"},
                      {"database": str(tmp_path / "x.db")})
    assert (s.database, s.database_url) == (tmp_path / "x.db", None)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"database": f"mysql://u:{DB_PASSWORD}@h/db"}, "database"),
    ({"database": "sqlite://"}, "database"),
    ({"database": ""}, "database"),
    ({"database_pool_min": 5, "database_pool_max": 2}, "database_pool_min"),
    ({"database_pool_max": 0}, "database_pool_max"),
])
def test_bad_database_settings(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, {}, {**FAKE, **overrides})
    assert err.value.key == key
    assert DB_PASSWORD not in str(err.value)


# --------------------------------------------------------------------------- serve


def _with_password(postgres: PgServer, dsn: str) -> str:
    """``dsn`` as a role that has a password (the test server trusts local connections,
    but the password is in the URL the server is given: it must never be logged)."""
    with postgres.admin() as conn:
        conn.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = "
                     "'gr_app') THEN CREATE ROLE gr_app LOGIN SUPERUSER; END IF; END $$")
        conn.execute(f"ALTER ROLE gr_app PASSWORD '{DB_PASSWORD}'")
    parts = urllib.parse.urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"gr_app:{DB_PASSWORD}@{host}"))


def test_serve_on_postgresql_keeps_tasks_across_a_restart(
    postgres: PgServer, tmp_path: Path
) -> None:
    dsn = _with_password(postgres, postgres.database(schema=False))
    server = ServerProcess(tmp_path, env={"GHOSTRUNNER_DATABASE": dsn,
                                          "GHOSTRUNNER_ADMIN_TOKEN": ADMIN_SECRET,
                                          "GHOSTRUNNER_SERVER_LOG_LEVEL": "debug"})
    try:
        server.start()
        info = server.call("GET", "/").json()["data"]
        assert info["store"] == "postgresql"
        r = server.call("POST", "/task/create", ADMIN_SECRET, json={"details": {
            "name": "kept", "command": "echo kept", "nodeids": ["node-001", "node//gone"]}})
        assert r.status_code == 200, r.text
        task_id = r.json()["data"]["id"]
        assert server.stop() == 0
        assert not (tmp_path / "ghostrunner.db").exists()  # not SQLite
        server.start()
        r = server.call("GET", f"/tasks/{task_id}", ADMIN_SECRET)
        assert r.status_code == 200, r.text
        runs = {run["nodeid"]: run["state"] for run in r.json()["data"]["runs"]}
        assert runs["node//gone"] == "pending"
        assert set(runs) == {"node-001", "node//gone"}
        assert server.stop() == 0
        log = server.log()
        assert "PostgreSQL postgresql://gr_app:[REDACTED]@" in log
        assert DB_PASSWORD not in log
    finally:
        server.kill()
        postgres.drop(dsn)


def test_serve_on_sqlite_says_so(server_factory: Any) -> None:
    server = server_factory(env={"GHOSTRUNNER_ADMIN_TOKEN": ADMIN_SECRET}).start()
    assert server.call("GET", "/").json()["data"]["store"] == "sqlite"


# --------------------------------------------------------------------------- migrate


async def _fill(path: Path) -> None:
    """A SQLite database with every kind of state, through the store's verbs."""
    store = SQLiteStore(path)
    await store.open()
    try:
        done = await add(store, "node//a", "node//b", "node//c", "node//d", "node//e",
                         name="done")
        outcomes = {
            "node//a": (RunState.SUCCEEDED, Outcome(exit_code=0, output="ok\x00\né",
                                                    started_at=at(1), finished_at=at(2))),
            "node//b": (RunState.FAILED, Outcome(exit_code=3, output="x" * 100,
                                                 output_truncated=True)),
            "node//c": (RunState.LOST, None),
            "node//d": (RunState.TIMED_OUT, Outcome(exit_code=None, timed_out=True)),
            "node//e": (RunState.SUCCEEDED, Outcome(exit_code=0, output="from the journal",
                                                    recovered=True)),
        }
        for node, (state, outcome) in outcomes.items():
            await dispatch(store, done, node, at(1))
            await store.finish(RunKey(done.id, node), state, at(3), outcome=outcome,
                               error="lost track" if state is RunState.LOST else None)
        # a retried run: two attempts (the first lost and sent again)
        retried = await add(store, "node//a", name="retried", delivery="at_least_once",
                            max_attempts=3)
        await dispatch(store, retried, "node//a", at(4))
        await store.release(RunKey(retried.id, "node//a"), at(5), available_at=at(6),
                            error="connection lost", delivered=True)
        await dispatch(store, retried, "node//a", at(7))
        await store.finish(RunKey(retried.id, "node//a"), RunState.SUCCEEDED, at(8),
                           outcome=Outcome(exit_code=0, output="second"))
        # undelivered once, then left dispatched (the next start recovers it)
        out = await add(store, "node//f", name="out")
        await dispatch(store, out, "node//f", at(4))
        await store.release(RunKey(out.id, "node//f"), at(5), available_at=at(5),
                            error="agent busy", delivered=False)
        await dispatch(store, out, "node//f", at(6))
        cancelled = await add(store, "node//a", "node//b", name="cancelled")
        await store.cancel(cancelled.id, ["node//b"], now=at(2))
        expired = await add(store, "node//g", name="expired", expires_at=at(10))
        await store.expire_due(at(20))
        paused = await add(store, "node//h", name="paused", not_before=at(30))
        await store.pause(paused.id, True)
        aborted = await add(store, "node//i", "node//j", name="aborted")
        await store.abort(aborted.id, "too many failures", at(9))
        fleet = make_task("node//k", name="fleet", select=Selector(tags=("pi",)),
                          continuous=True, rollout=Rollout(max_concurrent=2, per_minute=10),
                          created_at=NOW + timedelta(seconds=1))
        await store.add_task(fleet, at(1))
        await store.add_runs(fleet.id, ["node//l"], at(2))
        closed = await add(store, "node//m", name="closed")
        await store.cancel(closed.id, now=at(3))
        for scope in Scope:
            token, _ = new_token(f"t-{scope.value}", scope, now=at(1))
            await store.add_token(token)
        for i, (route, status) in enumerate([("POST /task/create", 200),
                                             ("POST /tasks/{id}/retry", 403)]):
            await store.record_audit(AuditEntry(
                at=at(10 + i), token=f"t-{i}", address="10.0.0.7", method="POST",
                route=route, task_id=done.id, status=status, counts={"runs": i}))
        assert expired and paused
        # the webhook outbox: two webhooks, deliveries pending and delivered
        log = list(await store.events_after(0, 1000))
        for name in ("ops", "audit-sink"):
            await store.webhook_cursor(name, 0)
            assert await store.enqueue_deliveries(name, 0, log[2].id, [
                NewDelivery(event_id=e.id, kind=e.kind, msg_id=f"msg_{name}_{e.id}",
                            body=f'{{"type": "{e.kind}"}}') for e in log[:3]], at(11))
        first = (await store.claim_deliveries("ops", at(12), at(13), limit=2))[0]
        await store.finish_delivery(first.id, first.attempts, at(12),
                                    status=DeliveryStatus.DELIVERED, next_attempt_at=None,
                                    http_status=200, error=None)
    finally:
        await store.close()


async def _everything(store: Any) -> dict[str, Any]:
    items: list[Any] = []
    cursor = None
    while True:
        page = await store.list_tasks(TaskQuery(limit=3, cursor=cursor))
        items += page.items
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    tasks = {}
    for summary in items:
        tid = summary.task.id
        got = await store.get_task(tid)
        tasks[tid] = {
            "summary": (got.task, {s: n for s, n in got.counts.items() if n}, got.paused,
                        got.aborted, got.closed, got.status),
            "runs": list(await store.get_runs(tid)),
            "attempts": {k: list(v) for k, v in (await store.attempts(tid)).items()},
        }
    return {
        "order": [s.task.id for s in items],
        "tasks": tasks,
        "tokens": list(await store.list_tokens()),
        "counts": {s: n for s, n in (await store.counts()).items() if n},
        "dispatched": sorted((r.task_id, r.node_id) for r in await store.dispatched()),
        # entries as recorded (their ids are the target's own)
        "audit": [attrs.evolve(e, id=None)
                  for e in (await store.query_audit(AuditQuery(limit=1000))).items],
        # the event log and the webhook outbox keep their ids
        "events": list(await store.events_after(0, 10_000)),
        "webhooks": dict(await store.webhook_cursors()),
        "deliveries": list((await store.query_deliveries(DeliveryQuery(limit=1000))).items),
    }


def _read(store: Any) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        await store.open()
        try:
            return await _everything(store)
        finally:
            await store.close()

    return asyncio.run(go())


def _migrate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    out = io.StringIO()
    code = main(["db", "migrate", *args], out=out)
    return code, out.getvalue(), capsys.readouterr().err


def test_migrate_copies_everything(postgres: PgServer, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ghostrunner.db"
    asyncio.run(_fill(path))
    want = _read(SQLiteStore(path))
    assert want["counts"].keys() == {RunState.SUCCEEDED, RunState.FAILED, RunState.LOST,
                                     RunState.TIMED_OUT, RunState.DISPATCHED,
                                     RunState.CANCELLED, RunState.EXPIRED, RunState.PENDING}
    dsn = _with_password(postgres, postgres.database(schema=False))
    try:
        code, out, err = _migrate(capsys, "--dry-run", "--from", f"sqlite://{path}",
                                  "--to", dsn)
        assert code == 0, err
        assert "would copy" in out and "dry run: nothing written" in out
        assert DB_PASSWORD not in out + err
        name = urllib.parse.urlsplit(dsn).path.lstrip("/")
        with psycopg.connect(postgres.dsn(name)) as db:  # not even the schema
            assert db.execute("SELECT to_regclass('tasks')").fetchone() == (None,)

        code, out, err = _migrate(capsys, "--from", f"sqlite://{path}", "--to", dsn)
        assert code == 0, err
        assert f"tasks     {len(want['tasks'])}" in out
        assert "tokens    3" in out
        assert "audit     2 entries" in out
        assert f"events    {len(want['events'])}" in out and len(want["events"]) > 20
        assert "webhooks  2 cursors, 6 deliveries" in out
        assert "checked:" in out
        assert "1 runs were dispatched" in out
        assert DB_PASSWORD not in out + err
        got = _read(PostgresStore(dsn))
        assert got["order"] == want["order"]
        for tid, task in want["tasks"].items():
            assert got["tasks"][tid] == task, tid
        assert got == want
        retried = next(t for t in want["tasks"].values() if t["summary"][0].name == "retried")
        assert [a.state for a in next(iter(retried["attempts"].values()))] == [
            RunState.LOST, RunState.SUCCEEDED]
        assert any(r.recovered for t in want["tasks"].values() for r in t["runs"])
        assert {d.status.value for d in want["deliveries"]} == {"pending", "delivered"}
        # the copy's new events and deliveries go on after the copied ids
        async def one_more() -> int:
            store = PostgresStore(dsn)
            await store.open()
            try:
                await add(store, "node//after")
                return (await store.events_after(want["events"][-1].id, 10))[0].id
            finally:
                await store.close()

        assert asyncio.run(one_more()) == want["events"][-1].id + 1
        want = _read(PostgresStore(dsn))  # with that task, for the check below

        # a second time: the target is not empty
        code, out, err = _migrate(capsys, "--from", str(path), "--to", dsn)
        assert code == 3
        assert "not empty" in err and DB_PASSWORD not in err
        assert _read(PostgresStore(dsn)) == want
    finally:
        postgres.drop(dsn)


def test_migrate_refuses_a_source_in_use(postgres: PgServer, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ghostrunner.db"
    asyncio.run(_fill(path))
    dsn = postgres.database(schema=False)

    async def held() -> tuple[int, str, str]:
        store = SQLiteStore(path)
        await store.open()  # as a running GhostRunner holds it
        try:
            return await asyncio.to_thread(_migrate, capsys, "--from", str(path), "--to", dsn)
        finally:
            await store.close()

    try:
        code, _, err = asyncio.run(held())
        assert code == 3
        assert "in use by another GhostRunner" in err
        assert _read(PostgresStore(dsn))["tasks"] == {}  # nothing copied
    finally:
        postgres.drop(dsn)


@pytest.mark.parametrize(("source", "target", "message"), [
    ("sqlite:///{db}", f"mysql://u:{DB_PASSWORD}@h/db", "--to must be a postgresql://"),
    ("sqlite:///{db}", "not a url", "--to must be a postgresql://"),
    ("sqlite:///{missing}", f"postgresql://u:{DB_PASSWORD}@h/db", "no SQLite database"),
    (f"postgresql://u:{DB_PASSWORD}@h/db", f"postgresql://u:{DB_PASSWORD}@h/db",
     "--from must be a SQLite database"),
    ("http://example.com/x.db", "postgresql://h/db", "--from must be sqlite:///path"),
])
def test_migrate_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              source: str, target: str, message: str) -> None:
    db = tmp_path / "ghostrunner.db"
    db.write_bytes(b"")
    source = source.format(db=str(db).lstrip("/"), missing=str(tmp_path / "no.db").lstrip("/"))
    code, out, err = _migrate(capsys, "--from", source, "--to", target)
    assert code == 2, err
    assert message in err
    assert DB_PASSWORD not in out + err


def test_migrate_to_an_unreachable_database(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ghostrunner.db"
    asyncio.run(_fill(path))
    code, _, err = _migrate(capsys, "--from", str(path), "--to",
                            f"postgresql://u:{DB_PASSWORD}@127.0.0.1:1/db?connect_timeout=2")
    assert code == 3
    assert "PostgreSQL" in err and DB_PASSWORD not in err

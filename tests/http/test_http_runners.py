"""Several ``ghostrunner serve`` processes on one PostgreSQL: the ``[runner]`` settings,
``GET /``'s ``runner`` and ``runners``, ``ghostrunner runners``; what one server shows
when the other is killed (expired, then adopted) or stopped (stopped); a SQLite server
has one runner, itself."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ghostrunner import LoopSettings
from ghostrunner._types import utcnow
from ghostrunner.postgres import PostgresStore
from ghostrunner_http import ConfigError, load_settings
from ghostrunner_http._tokens import verify_secret
from ghostrunner_http.app import bootstrap_admin
from ghostrunner_http.cli import main
from tests.http.conftest import ServerProcess
from tests.pg import PgServer

ADMIN = "runners-admin-secret-0123456789"
FAKE = {"executor": "fake"}


def test_runner_settings(tmp_path: Path) -> None:
    config = tmp_path / "gr.toml"
    config.write_text('executor = "fake"\n[runner]\nname = "gr-a"\nlease = 30\n'
                      "heartbeat = 6\nadopt_grace = 1.5\n", encoding="utf-8")
    s = load_settings(config, {})
    assert s.runner_name == "gr-a"
    assert (s.loop.lease, s.loop.heartbeat, s.loop.adopt_grace) == (30.0, 6.0, 1.5)
    s = load_settings(config, {"GHOSTRUNNER_RUNNER_NAME": "gr-b",
                               "GHOSTRUNNER_RUNNER_LEASE": "12"})
    assert (s.runner_name, s.loop.lease, s.loop.heartbeat) == ("gr-b", 12.0, 6.0)
    # by default: host:pid, 15 s, a third of it, half a second
    s = load_settings(None, {}, FAKE)
    assert (s.runner_name, s.loop.lease, s.loop.heartbeat, s.loop.adopt_grace) == (
        None, 15.0, 5.0, 0.5)
    assert load_settings(None, {"GHOSTRUNNER_RUNNER_LEASE": "60"}, FAKE).loop.heartbeat == 20
    assert LoopSettings(lease=9).heartbeat == 3


@pytest.mark.parametrize(("env", "key"), [
    ({"GHOSTRUNNER_RUNNER_LEASE": "0"}, "runner.lease"),
    ({"GHOSTRUNNER_RUNNER_LEASE": "nan"}, "runner.lease"),
    ({"GHOSTRUNNER_RUNNER_HEARTBEAT": "-1"}, "runner.heartbeat"),
    ({"GHOSTRUNNER_RUNNER_HEARTBEAT": "8"}, "runner.heartbeat"),  # over half of 15
    ({"GHOSTRUNNER_RUNNER_LEASE": "4", "GHOSTRUNNER_RUNNER_HEARTBEAT": "3"},
     "runner.heartbeat"),
    ({"GHOSTRUNNER_RUNNER_ADOPT_GRACE": "-0.5"}, "runner.adopt_grace"),
    ({"GHOSTRUNNER_RUNNER_NAME": " "}, "runner.name"),
    ({"GHOSTRUNNER_RUNNER_NAME": "x" * 201}, "runner.name"),
])
def test_bad_runner_settings_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env, FAKE)
    assert info.value.key == key


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(args), out=out), out.getvalue()


def info(server: ServerProcess) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(server.url + "/", timeout=10).json()["data"]
    return data


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def test_two_servers_on_one_database_show_each_other(
    postgres: PgServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = postgres.database()
    config = ('executor = "fake"\n[runner]\nlease = 2\nheartbeat = 0.5\nadopt_grace = 0.2\n'
              '[loop]\nresync_interval = 30\n')
    servers = []
    for name in ("gr-a", "gr-b"):
        folder = tmp_path / name
        folder.mkdir()
        servers.append(ServerProcess(folder, config, env={
            "GHOSTRUNNER_DATABASE": dsn, "GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
            "GHOSTRUNNER_RUNNER_NAME": name}))
    a, b = servers
    try:
        a.start()
        b.start()
        seen = info(a)
        me = seen["runner"]
        assert (me["name"], me["shared"], me["fenced"], me["version"]) == (
            "gr-a", True, False, seen["version"])
        assert 0 < me["lease_left"] <= 2
        by_name = {r["name"]: r for r in seen["runners"]}
        assert set(by_name) == {"gr-a", "gr-b"}
        assert {r["state"] for r in by_name.values()} == {"alive"}
        assert by_name["gr-a"]["id"] == me["id"]
        assert info(b)["runner"]["id"] == by_name["gr-b"]["id"]
        # a task submitted through a runs (on either): both see it done
        r = a.call("POST", "/task/create", ADMIN, json={"details": {
            "name": "both", "command": "echo both", "nodeids": ["node-001", "node-002"]}})
        task_id = r.json()["data"]["id"]
        wait_until(lambda: b.call("GET", f"/tasks/{task_id}", ADMIN).json()["data"][
            "status"] == "succeeded", 10, "the task done")

        # a token deleted through a stops working on b at once (not when b's cache of
        # valid tokens expires, 30 s later)
        r = a.call("POST", "/token/create", ADMIN, json={"details": {"name": "ci",
                                                                      "scope": "read"}})
        secret = r.json()["data"]["token"]
        assert b.call("GET", "/task/list", secret).status_code == 200  # cached by b
        assert a.call("DELETE", "/token/delete", ADMIN,
                      json={"details": {"name": "ci"}}).status_code == 200
        wait_until(lambda: b.call("GET", "/task/list", secret).status_code == 401, 2,
                   "the token refused by b")

        code, out = cli("runners", "--url", a.url)  # no token needed
        assert code == 0, capsys.readouterr().err
        lines = out.splitlines()
        assert lines[0].split()[:4] == ["ID", "NAME", "STATE", "HEARTBEAT"]
        mine = next(line for line in lines if "gr-a" in line)
        assert mine.startswith("*") and "alive" in mine
        assert "gr-b" in out and not next(
            line for line in lines if "gr-b" in line).startswith("*")
        code, out = cli("runners", "--url", b.url, "--json")
        assert code == 0
        data = json.loads(out)
        assert data["runner"]["name"] == "gr-b" and len(data["runners"]) == 2

        # b is killed: a sees its lease end, then takes over what it left
        b_id = info(b)["runner"]["id"]
        b.kill()
        state = lambda: {r["id"]: r["state"] for r in info(a)["runners"]}[b_id]  # noqa: E731
        wait_until(lambda: state() != "alive", 5, "b's lease ended")
        wait_until(lambda: state() == "adopted", 5, "b adopted")
        gone = next(r for r in info(a)["runners"] if r["id"] == b_id)
        assert gone["adopted_by"] == me["id"] and gone["heartbeat_age"] >= 2
        code, out = cli("runners", "--url", a.url)
        assert code == 0 and f"runs taken by {me['id']}" in out

        # b comes back: a new runner (a new id), alive; a stops gracefully: stopped
        b.start()
        assert info(b)["runner"]["id"] != b_id
        assert a.stop(signal.SIGTERM) == 0
        states = {r["name"]: r["state"] for r in info(b)["runners"]
                  if r["id"] != b_id}
        assert states == {"gr-a": "stopped", "gr-b": "alive"}
        assert b.stop(signal.SIGTERM) == 0
        assert "registered: lease 2s" in b.log()
    finally:
        for server in servers:
            server.kill()
        postgres.drop(dsn)


def test_a_sqlite_server_has_one_runner_itself(server_factory: Any) -> None:
    server = server_factory(env={"GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
                                 "GHOSTRUNNER_RUNNER_NAME": "solo"}).start()
    data = info(server)
    assert (data["runner"]["name"], data["runner"]["shared"], data["runner"]["fenced"],
            data["runner"]["lease_left"]) == ("solo", False, False, None)
    [only] = data["runners"]
    assert (only["id"], only["name"], only["state"]) == (data["runner"]["id"], "solo",
                                                         "alive")
    code, out = cli("runners", "--url", server.url)
    assert code == 0 and "solo" in out


def test_servers_starting_together_on_an_empty_database_share_one_admin_token(
    postgres: PgServer,
) -> None:
    async def main() -> None:
        for secret in (ADMIN, None):
            dsn = postgres.database()
            stores = [PostgresStore(dsn, max_size=2) for _ in range(3)]
            announced: list[str] = []
            try:
                for store in stores:
                    await store.open()
                await asyncio.gather(*(bootstrap_admin(store, secret, now=utcnow(),
                                                       announce=announced.append)
                                       for store in stores))
                builtin = [t for t in await stores[0].list_tokens() if t.builtin]
                assert len(builtin) == 1
                if secret is None:
                    assert len(announced) == 1  # printed once, by the one that made it
                    assert verify_secret(announced[0], builtin[0])
                else:
                    assert announced == [] and verify_secret(secret, builtin[0])
            finally:
                for store in stores:
                    await store.close()
                postgres.drop(dsn)

    asyncio.run(main())

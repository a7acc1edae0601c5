"""Two ``ghostrunner serve`` processes on one PostgreSQL, against the real lab.

Each server runs the MeshCentral executor and sees every agent; the database decides
who dispatches what. Executions are counted on the device side (``faultkit.Ledger``:
every command appends its label to one executions log) and matched against the
database afterwards:

* **SIGKILL**: 1,000 runs over 4 agents, submitted through both servers in batches;
  after each of the first batches one server, picked at random, is killed at a random
  moment while it has runs in flight, and started again. The survivor (or the restarted
  process) takes over the dead runner's runs once its lease has ended and reads their
  outcomes from the devices' journals. Measured: kill -> the dead runner's runs taken
  over (the lease, 3 s here, plus the grace, 0.5 s), and kill -> those runs settled.
* **Database restart**: PostgreSQL stopped mid-dispatch for longer than a lease, then
  started: both servers reconnect, renew, and drain the queue.
* **Overlap**: both servers race for the same 4 devices with commands that take a lock
  on the device (``mkdir``) and record any command that finds it taken: none does.

In every scenario: no at_most_once run executed twice, no at_least_once run executed
more than once (the journals answer for the runs a fault caught), nothing left pending
or dispatched, every acknowledged task present (``Ledger.check(reachable=True)``).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest

from ghostrunner import Store
from ghostrunner.lab import Agent, MeshLab
from ghostrunner.postgres import PostgresStore
from tests.integration.faultkit import Figures, Ledger, Planned, recorded_runs, start_agents
from tests.pg import PgServer
from tests.serverproc import ServerProcess

AGENTS = [f"fault-{i}" for i in range(1, 5)]
ADMIN = "runners-lab-admin-token-0123456789"
LEASE, HEARTBEAT, GRACE = 3.0, 1.0, 0.5
TASKS = 60  # in the overlap test, each on every device
_T = TypeVar("_T")


def config(lab: MeshLab) -> str:
    return (
        'executor = "meshcentral"\n'
        "[meshcentral]\n"
        f'url = "{lab.url}"\n'
        "ignore_ssl = true\n"
        f'group_id = "{lab.group_id}"\n'
        "[loop]\n"
        "resync_interval = 2.0\n"
        "retry_base = 0.5\n"
        "retry_cap = 4.0\n"
        "[runner]\n"
        f"lease = {LEASE}\n"
        f"heartbeat = {HEARTBEAT}\n"
        f"adopt_grace = {GRACE}\n"
    )


class Pair:
    """Two servers on the database ``dsn``, and what the test asks of them."""

    def __init__(self, lab: MeshLab, dsn: str, workdir: Path) -> None:
        self.dsn = dsn
        self.servers: list[ServerProcess] = []
        for name in ("gr-a", "gr-b"):
            folder = workdir / name
            folder.mkdir()
            self.servers.append(ServerProcess(folder, config(lab), env={
                "GHOSTRUNNER_DATABASE": dsn,
                "GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
                "GHOSTRUNNER_RUNNER_NAME": name,
                "GHOSTRUNNER_MESHCENTRAL_USER": lab.admin_user,
                "GHOSTRUNNER_MESHCENTRAL_PASSWORD": lab.admin_password,
            }))

    def start(self, server: ServerProcess) -> float:
        """Start ``server``; seconds until it is connected to MeshCentral."""
        began = time.monotonic()
        server.start(timeout=120)
        wait_for(lambda: info(server)["executor_connected"], 120, f"{server.url} connected")
        return time.monotonic() - began

    def submit(self, planned: Sequence[Planned], servers: Sequence[ServerProcess]) -> None:
        """POST every planned run (one task each) through ``servers`` in turn, a few
        clients at once; each must be acknowledged (200)."""
        clients = [httpx.Client(base_url=s.url, timeout=30.0,
                                headers={"Authorization": f"Bearer {ADMIN}"})
                   for s in servers]

        def create(item: tuple[int, Planned]) -> None:
            i, p = item
            r = clients[i % len(clients)].post("/task/create", json={"details": p.details()})
            assert r.status_code == 200, (p.label, r.status_code, r.text)

        try:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(create, enumerate(planned)))
        finally:
            for c in clients:
                c.close()

    def sql(self, query: str, *args: Any) -> Any:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(query, args).fetchone()
            return None if row is None else row[0]

    def owned(self, runner_id: str) -> int:
        """Runs dispatched by ``runner_id`` right now."""
        return int(self.sql("SELECT count(*) FROM runs WHERE state = 'dispatched' "
                            "AND runner = %s", runner_id))

    def active(self) -> int:
        return int(self.sql("SELECT count(*) FROM runs WHERE state IN ('pending', "
                            "'dispatched')"))

    def read(self, fn: Callable[[Store], Awaitable[_T]]) -> _T:
        async def go() -> _T:
            store = PostgresStore(self.dsn, max_size=2)
            await store.open()
            try:
                return await fn(store)
            finally:
                await store.close()

        return asyncio.run(go())

    def stop(self) -> None:
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                assert server.stop(signal.SIGTERM, timeout=30) == 0, server.log()

    def kill(self) -> None:
        for server in self.servers:
            server.kill()


def info(server: ServerProcess) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(server.url + "/", timeout=10).json()["data"]
    return data


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.slow
def test_two_servers_one_killed_again_and_again(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], postgres: PgServer,
    tmp_path: Path, figures: Figures,
) -> None:
    runs, kills = 1000, 5
    began = time.monotonic()
    agents = start_agents(agent_factory, AGENTS)
    ledger = Ledger("pair", tmp_path / "executions.log", [a.node_id for a in agents])
    dsn = postgres.database()
    pair = Pair(mesh_lab, dsn, tmp_path)
    taken_over: list[float] = []  # kill -> no run of the dead runner left to take over
    settled: list[float] = []  # kill -> every run it left settled
    at_kill: list[int] = []
    try:
        for server in pair.servers:
            pair.start(server)
        cuts = sorted(ledger.rng.sample(range(60, runs - 59), kills))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, runs], strict=True)]
        for cycle, size in enumerate(sizes):
            pair.submit(ledger.plan(size), pair.servers)
            if cycle == kills:
                break
            # a random moment while runs are in flight (the last ones of the cycle at the
            # latest), and a victim among the runners that have some: a runner keeps the
            # devices it works on (it claims a device's next run as it finishes one), so
            # the one restarted last may get no device until the other's queues drain
            ids = {info(server)["runner"]["id"]: server for server in pair.servers}
            moment = time.monotonic() + ledger.rng.uniform(0.0, 1.5)

            def busy(m: float = moment, ids: dict[str, ServerProcess] = ids) -> list[str]:
                owners = [i for i in ids if pair.owned(i)]
                late = time.monotonic() >= m or pair.active() <= len(agents)
                return owners if late else []

            wait_for(busy, 120, f"runs in flight before kill {cycle + 1}")
            victim_id = ledger.rng.choice(sorted(busy(0.0)) or sorted(ids))
            victim = ids[victim_id]
            victim.kill()  # SIGKILL
            killed = time.monotonic()
            left = pair.sql("SELECT array_agg(r.task_seq || ' ' || r.node) FROM runs AS r "
                            "WHERE state = 'dispatched' AND runner = %s", victim_id) or []
            at_kill.append(len(left))
            # watched while the dead process starts again (after a random pause)
            with ThreadPoolExecutor(1) as watcher:
                gone = watcher.submit(wait_for, lambda v=victim_id: pair.owned(v) == 0, 60,
                                      "the dead runner's runs taken over")
                time.sleep(ledger.rng.uniform(0.0, 1.0))
                pair.start(victim)  # a new runner (a new id) on the same database
                taken_over.append(gone.result())
            wait_for(lambda rows=left: not pair.sql(
                "SELECT count(*) FROM runs AS r WHERE state = 'dispatched' AND "
                "(r.task_seq || ' ' || r.node) = ANY(%s)", rows), 60,
                "the dead runner's runs settled")
            settled.append(time.monotonic() - killed)
        drained = wait_for(lambda: pair.active() == 0, 600, "the queue drained")
        pair.stop()
        recorded = pair.read(recorded_runs)
        tally = ledger.check(recorded, reachable=True, kills=kills,
                             **{"dispatched at each kill": at_kill})
    finally:
        pair.kill()
    assert tally.runs == runs
    assert sum(at_kill) > 0
    assert tally.recovered > 0, "no outcome was read back from a journal"
    # dispatch resumes on the devices the dead runner held within lease + 1 s (a
    # restart of the dead process takes longer than that: the survivor did it)
    assert max(taken_over) <= LEASE + 1.0, taken_over
    tally.record(figures, "two runners, SIGKILL")
    add = figures.add
    add("two runners, SIGKILL: seed", str(ledger.seed))
    add("two runners, SIGKILL: kills", kills)
    add("two runners, SIGKILL: runs in flight on the victim at each kill",
        " ".join(map(str, at_kill)))
    add(f"two runners, SIGKILL: kill -> its runs taken over (max; lease {LEASE:g} s)",
        round(max(taken_over), 2), "s")
    add("two runners, SIGKILL: kill -> its runs taken over (each)",
        " ".join(f"{t:.2f}" for t in taken_over))
    add("two runners, SIGKILL: kill -> its runs settled (max)", round(max(settled), 2), "s")
    add("two runners, SIGKILL: drain after the last kill", drained, "s")
    add("two runners, SIGKILL: wall time", time.monotonic() - began, "s")


@pytest.mark.slow
def test_two_servers_survive_a_database_restart(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], own_postgres: PgServer,
    tmp_path: Path, figures: Figures,
) -> None:
    agents = start_agents(agent_factory, AGENTS)
    ledger = Ledger("dbrestart", tmp_path / "executions.log", [a.node_id for a in agents])
    pair = Pair(mesh_lab, own_postgres.database(), tmp_path)
    try:
        for server in pair.servers:
            pair.start(server)
        pair.submit(ledger.plan(300), pair.servers)
        wait_for(lambda: pair.sql("SELECT count(*) FROM runs WHERE state = 'dispatched'"),
                 60, "runs dispatched")
        time.sleep(ledger.rng.uniform(0.0, 1.0))  # a random moment mid-dispatch
        dispatched = pair.sql("SELECT count(*) FROM runs WHERE state = 'dispatched'")
        own_postgres.stop_server()
        down = LEASE + ledger.rng.uniform(1.0, 3.0)  # past every lease
        time.sleep(down)
        fenced = [info(s)["runner"]["fenced"] for s in pair.servers]
        own_postgres.start_server()
        back = time.monotonic()
        renewed = wait_for(lambda: pair.sql(
            "SELECT count(*) FROM runners WHERE ended_at IS NULL AND NOT stopped "
            "AND heartbeat_at > pg_postmaster_start_time()") == 2, 60,
            "both runners renewed their leases")
        wait_for(lambda: pair.active() == 0, 300, "the queue drained")
        drained = time.monotonic() - back
        assert not any(info(s)["runner"]["fenced"] for s in pair.servers)
        pair.stop()
        recorded = pair.read(recorded_runs)
        tally = ledger.check(recorded, reachable=True, outage=round(down, 1),
                             dispatched=dispatched)
    finally:
        pair.kill()
    assert fenced == [True, True], "a runner went on dispatching without its lease"
    assert tally.runs == 300
    for server in pair.servers:
        assert "lease renewal failed" in server.log()
    tally.record(figures, "two runners, database restart")
    figures.add("two runners, database restart: outage", round(down, 1), "s")
    figures.add("two runners, database restart: runs dispatched at the stop", dispatched)
    figures.add("two runners, database restart: back -> both leases renewed",
                round(renewed, 2), "s")
    figures.add("two runners, database restart: back -> queue drained", round(drained, 2), "s")


@pytest.mark.slow
def test_two_servers_never_send_a_device_two_commands_at_once(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], postgres: PgServer,
    tmp_path: Path, figures: Figures,
) -> None:
    agents = start_agents(agent_factory, AGENTS)
    nodes = [a.node_id for a in agents]
    log, overlaps = tmp_path / "executions.log", tmp_path / "overlaps.log"
    pair = Pair(mesh_lab, postgres.database(), tmp_path)
    rng = random.Random()
    try:
        for server in pair.servers:
            pair.start(server)
        clients = [httpx.Client(base_url=s.url, timeout=30.0,
                                headers={"Authorization": f"Bearer {ADMIN}"})
                   for s in pair.servers]
        created = []
        for i in range(TASKS):
            # every task targets every device, so both servers want each device at once.
            # The lock is the device's own ($TMPDIR: one directory per lab agent); a
            # command finding it taken records itself as an overlap.
            label = f"race-{i:03d}"
            command = (f'l="$TMPDIR/overlap.lock"; if mkdir "$l" 2>/dev/null; then '
                       f'echo "{label} $TMPDIR" >> {log}; sleep 0.0{rng.randint(1, 9)}; '
                       f'rmdir "$l"; else echo "{label} $TMPDIR" >> {overlaps}; fi')
            r = clients[i % 2].post("/task/create", json={"details": {
                "name": label, "command": command, "nodeids": nodes}})
            assert r.status_code == 200, r.text
            created.append(r.json()["data"]["id"])
        for c in clients:
            c.close()
        wait_for(lambda: pair.active() == 0, 300, "the queue drained")
        owners = pair.sql("SELECT json_object_agg(name, n) FROM (SELECT x.name, count(*) AS n "
                          "FROM attempts AS a JOIN runs AS r USING (task_seq, node) "
                          "JOIN runners AS x ON x.id = r.runner GROUP BY x.name) AS c")
        pair.stop()
    finally:
        pair.kill()
    ran = log.read_text().splitlines() if log.exists() else []
    clashed = overlaps.read_text().splitlines() if overlaps.exists() else []
    assert clashed == [], f"commands found their device busy: {clashed}"
    # each (task, device) once, on 4 distinct devices
    assert len(ran) == len(set(ran)) == len(created) * len(nodes)
    assert len({line.split()[1] for line in ran}) == len(nodes)
    assert set(owners) == {"gr-a", "gr-b"}, owners  # both dispatched
    figures.add(f"two runners, overlap: runs ({TASKS} tasks x {len(nodes)} devices)",
                len(ran))
    figures.add("two runners, overlap: runs dispatched by each", str(owners))
    figures.add("two runners, overlap: a command finding its device busy", len(clashed))

"""``ghostrunner serve`` killed with SIGKILL while it dispatches, against the real lab.

A real server process (MeshCentral executor, SQLite database) drives 4 real agents. 1,000
runs are queued over HTTP with the admin token, in batches, each batch after a (re)start
of the server; while they are being dispatched the server is killed with SIGKILL at a
random moment and started again on the same database, five times. After the last start
drains the queue, the executions log on the device side is matched against the database
(``faultkit.Ledger.check``): nothing left in flight, no at_most_once command executed
twice, every execution belongs to a run that may have executed that often, every
succeeded run executed; and, since the devices stay up, each device's journal answers
for the runs a kill caught in flight: no run ``lost``, no at_least_once run executed
twice, every executed run with its real outcome.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ghostrunner import RunState
from ghostrunner.lab import Agent, MeshLab
from tests.integration.faultkit import (
    Figures,
    Ledger,
    Planned,
    read_store,
    recorded_runs,
    start_agents,
    wait_for,
)
from tests.serverproc import ServerProcess

RUNS = 1000
KILLS = 5
AGENTS = 4
ADMIN = "crash-test-admin-token-0123456789"


def config(lab: MeshLab) -> str:
    # the MeshCentral user and password come from the environment (see server())
    return (
        'executor = "meshcentral"\n'
        "[meshcentral]\n"
        f'url = "{lab.url}"\n'
        "ignore_ssl = true\n"
        f'group_id = "{lab.group_id}"\n'
        "[loop]\n"
        "resync_interval = 1.0\n"
        "retry_base = 0.5\n"
        "retry_cap = 4.0\n"
    )


class Api:
    """The server's HTTP API, as an operator's script uses it."""

    def __init__(self, server: ServerProcess) -> None:
        self.client = httpx.Client(base_url=server.url, timeout=30.0,
                                   headers={"Authorization": f"Bearer {ADMIN}"})

    def connected(self) -> bool:
        return bool(self.client.get("/").json()["data"]["executor_connected"])

    def create(self, planned: Planned) -> None:
        r = self.client.post("/task/create", json={"details": planned.details()})
        assert r.status_code == 200, (planned.label, r.status_code, r.text)

    def any_in(self, state: str) -> bool:
        r = self.client.get("/task/list", params={"state": state, "limit": 1})
        assert r.status_code == 200, r.text
        return bool(r.json()["data"]["tasks"])

    def drained(self) -> bool:
        return not self.any_in("pending") and not self.any_in("dispatched")


def batch_sizes(ledger: Ledger, total: int, batches: int) -> list[int]:
    cuts = sorted(ledger.rng.sample(range(50, total - 49), batches - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def submit(api: Api, planned: Sequence[Planned]) -> None:
    with ThreadPoolExecutor(4) as pool:  # a few clients at once
        list(pool.map(api.create, planned))


def test_sigkill_mid_dispatch_then_restart_on_the_same_database(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path, figures: Figures
) -> None:
    began = time.monotonic()
    agents = start_agents(agent_factory, [f"fault-{i}" for i in range(1, AGENTS + 1)])
    ledger = Ledger("crash", tmp_path / "executions.log", [a.node_id for a in agents])
    server = ServerProcess(tmp_path, config(mesh_lab), env={
        "GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
        "GHOSTRUNNER_MESHCENTRAL_USER": mesh_lab.admin_user,
        "GHOSTRUNNER_MESHCENTRAL_PASSWORD": mesh_lab.admin_password,
    })
    db = tmp_path / "ghostrunner.db"
    api = Api(server)
    at_kill: list[int] = []  # runs left dispatched by each kill
    restarts: list[float] = []  # start of the process -> MeshCentral connected

    def describe() -> str:
        return f"(seed {ledger.seed}; kills so far {at_kill}; server log {server.log_path})"

    try:
        sizes = batch_sizes(ledger, RUNS, KILLS + 1)
        for cycle, size in enumerate(sizes):
            started = time.monotonic()
            server.start(timeout=120)
            wait_for(api.connected, 120, "the server connected to MeshCentral", describe)
            restarts.append(time.monotonic() - started)
            submit(api, ledger.plan(size))
            if cycle == KILLS:
                break
            # a random moment while runs are dispatched
            moment = time.monotonic() + ledger.rng.uniform(0.0, 2.0)

            def ripe(at: float = moment) -> bool:
                return time.monotonic() >= at and api.any_in("dispatched")

            wait_for(ripe, 120, f"runs dispatched before kill {cycle + 1}", describe)
            server.kill()  # SIGKILL
            at_kill.append(read_store(db, lambda s: s.counts()).get(RunState.DISPATCHED, 0))
        drained_in = wait_for(api.drained, 600, "the queue drained after the last restart",
                              describe)
        assert server.stop(signal.SIGTERM) == 0
        recovered = server.log().count(" was left dispatched: ")
        recorded = read_store(db, recorded_runs)
        context = {"kills": KILLS, "dispatched at each kill": at_kill,
                   "server log": server.log_path}
        tally = ledger.check(recorded, reachable=True, **context)
    finally:
        server.kill()
        api.client.close()
    assert tally.runs == RUNS
    assert sum(at_kill) > 0, f"no kill hit a dispatched run {describe()}"
    # every run a kill left dispatched was taken up by the next start, and only those
    assert recovered == sum(at_kill), f"{recovered} runs taken up {describe()}"
    assert tally.recovered > 0, f"no outcome was read back from a journal {describe()}"
    tally.record(figures, "crash")
    add = figures.add
    add("crash: seed", str(ledger.seed))
    add("crash: agents", AGENTS)
    add("crash: SIGKILLs", KILLS)
    add("crash: runs dispatched at a SIGKILL (total)", sum(at_kill))
    add("crash: runs dispatched at a SIGKILL (per kill)", " ".join(map(str, at_kill)))
    add("crash: restart to MeshCentral connected (max)", max(restarts), "s")
    add("crash: drain after the last restart", drained_in, "s")
    add("crash: wall time", time.monotonic() - began, "s")


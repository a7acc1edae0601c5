"""GhostRunner on PostgreSQL (``PostgresStore``), against SQLite in the same run.

The script starts its own PostgreSQL 16 with ``pgserver`` (as the tests do, nothing to
install by hand) in a temporary directory, with PostgreSQL's durable defaults (fsync and
``synchronous_commit`` on), and deletes it at the end.

1. **Reconnect storm**: 10,000 devices, one pending run each, all online at once,
   FakeExecutor answering at once, each runner a process of its own (a GhostRunner
   facade, its loop in the background). Modes, alternated round by round: SQLite
   (``synchronous=FULL``), one runner on PostgreSQL, and two runners sharing one
   PostgreSQL, every runner seeing every device (``pg x2``, as in production) or each
   half of them (``pg x2 split``). Runs/s = 10,000 / (last run recorded - devices
   online). Target: two runners (``pg x2``) >= 1.5 x one runner.
2. **Backlog**: 1,000,000 pending runs over 100,000 devices, loaded with
   ``INSERT ... SELECT`` over ``generate_series`` (``_pgkit.load_backlog``); then one
   device's ``next_pending([node])`` + ``claim_many([key])``, as the loop does when a
   device comes online. Target: p95 <= 5 ms. ``--explain`` prints the query plans.
3. **HTTP**: ``POST /task/create`` (3 node ids) against ``ghostrunner serve`` on
   PostgreSQL, as a ratio to a bare Starlette endpoint measured in alternation in the
   same run (bench_http.py's method; ``ghostrunner serve`` on SQLite measured alongside
   for reference). Target: ratio >= 0.5.

Each figure is printed with the machine's load average (other work on the machine
moves them). Run ``python benchmarks/bench_postgres.py`` (``--help``: the parts alone,
sizes, rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _pgkit import BenchPostgres, load_backlog, size  # noqa: E402

from ghostrunner import GhostRunner, LoopSettings, SQLiteStore, Task  # noqa: E402
from ghostrunner.postgres import PostgresStore  # noqa: E402
from ghostrunner.testing import FakeExecutor  # noqa: E402

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def storm_nodes(n: int) -> list[str]:
    return [f"node//storm-{i:05d}" for i in range(n)]


# --------------------------------------------------------------------------- 1. storm


class _Timed:
    """A store that notes when it last recorded a run's end (``finish``)."""

    last = 0.0
    finished = 0

    async def finish(self, *args: Any, **kwargs: Any) -> Any:
        run = await super().finish(*args, **kwargs)  # type: ignore[misc]
        self.last = time.time()
        self.finished += 1
        return run


class TimedSQLite(_Timed, SQLiteStore):
    pass


class TimedPostgres(_Timed, PostgresStore):
    pass


async def runner_child(spec: dict[str, Any]) -> None:
    """One runner: a GhostRunner over the store of ``spec``, with a FakeExecutor that
    knows its devices (all of them, or its share). Prints ``ready``; on ``go`` (stdin)
    brings its devices online; on ``stop``, stops and prints what it measured."""
    nodes = storm_nodes(spec["n"])
    index, count = spec["share"]
    mine = nodes[index::count]
    store: TimedSQLite | TimedPostgres
    if spec["store"] == "sqlite":
        store = TimedSQLite(spec["path"], synchronous="FULL")
    else:
        store = TimedPostgres(spec["dsn"], max_size=spec["pool"])
    executor = FakeExecutor(devices=mine)
    settings = LoopSettings(resync_interval=5.0)
    loop = asyncio.get_running_loop()
    profile = None
    if spec.get("profile"):
        import cProfile

        profile = cProfile.Profile()
    async with GhostRunner(store=store, executor=executor, settings=settings) as gr:
        # Ready once the loop has recovered and made its first pass: on today's store,
        # a runner whose start-up recovery reads the database while another runner has
        # runs in flight takes them for a dead process's and settles them (seen here:
        # a run recorded lost while the other runner ran it). Runner leases end that;
        # until then, the runners of a round all start before the storm.
        while gr.loop.passes == 0:  # noqa: ASYNC110 (the loop signals no first pass)
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        if profile is not None:
            profile.enable()
        cpu0 = time.process_time()
        start = time.time()
        for node in mine:
            executor.set_online(node)
        await loop.run_in_executor(None, sys.stdin.readline)  # stop
        cpu = time.process_time() - cpu0
        if profile is not None:
            profile.disable()
            profile.dump_stats(spec["profile"])
        passes = gr.loop.passes
    statements = getattr(store, "finish_statements", None)
    print(json.dumps({
        "start": start, "last": store.last, "finished": store.finished,
        "executions": len(executor.executions), "overlaps": len(executor.overlaps),
        "cpu": cpu, "passes": passes,
        "finish_batches": statements,
    }), flush=True)


def _cpu_of(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _pg_backends(pg: BenchPostgres) -> list[int]:
    """The postmaster and its children (backends, writers, WAL writer...)."""
    if pg.pid is None:
        return []
    pids = [pg.pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pg.pid:
            pids.append(int(entry.name))
    return pids


class _PgCpu:
    """CPU seconds of PostgreSQL's processes over an interval (backends that end in
    it are not counted: the pools keep theirs for the whole round)."""

    def __init__(self, pg: BenchPostgres) -> None:
        self.pg = pg
        self.before = {pid: _cpu_of([pid]) for pid in _pg_backends(pg)}

    def spent(self) -> float:
        return sum(_cpu_of([pid]) - self.before.get(pid, 0.0) for pid in _pg_backends(self.pg))


class _Watch:
    """Polls the database for the end of the storm on one connection of its own (a
    query on indexes: whether any run is still pending or dispatched)."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind = kind
        self.conn: Any
        if kind == "sqlite":
            import sqlite3

            self.conn = sqlite3.connect(f"file:{where}?mode=ro", uri=True)
            self.sql = "SELECT coalesce(sum(pending + dispatched), 0) FROM task_counts"
        else:
            import psycopg

            self.conn = psycopg.connect(where, autocommit=True)
            self.sql = ("SELECT (EXISTS (SELECT 1 FROM runs WHERE state = 'pending') OR "
                        "EXISTS (SELECT 1 FROM runs WHERE state = 'dispatched'))::int")

    def done(self) -> bool:
        row = self.conn.execute(self.sql).fetchone()
        return not row[0]

    def sample(self, into: Counter[str]) -> None:
        """What the runners' PostgreSQL backends are doing now: on CPU, waiting (for a
        lock, the WAL's fsync...), or in a transaction waiting for the runner."""
        if self.kind == "sqlite":
            return
        rows = self.conn.execute(
            "SELECT CASE WHEN state = 'idle in transaction' THEN 'in a transaction, "
            "waiting for the runner' ELSE coalesce(wait_event_type || ':' || wait_event, "
            "'on CPU') END, count(*) FROM pg_stat_activity WHERE datname = "
            "current_database() AND pid <> pg_backend_pid() AND state <> 'idle' GROUP BY 1"
        ).fetchall()
        into["samples"] += 1
        for what, count in rows:
            into[what] += count

    def succeeded(self) -> int:
        """Runs succeeded, each with one attempt (none sent twice)."""
        row = self.conn.execute("SELECT sum(succeeded) FROM task_counts").fetchone()
        again = self.conn.execute("SELECT count(*) FROM runs WHERE attempts <> 1").fetchone()
        return int(row[0]) if not again[0] else -int(again[0])

    def close(self) -> None:
        self.conn.close()


async def _prepare_sqlite(path: Path, n: int) -> None:
    store = SQLiteStore(path)
    await store.open()
    await store.bulk_add_tasks(
        (Task(name=f"t{i}", command="true", targets=[node])
         for i, node in enumerate(storm_nodes(n))), NOW)
    await store.close()


def storm_round(mode: str, n: int, pg: BenchPostgres | None, folder: Path, *,
                pool: int, profile: str | None = None) -> dict[str, Any]:
    """One storm of ``mode`` (sqlite, pg x1, pg x2, pg x2 split) on a fresh database."""
    if mode == "sqlite":
        path = folder / f"storm-{time.monotonic_ns()}.db"
        asyncio.run(_prepare_sqlite(path, n))
        base: dict[str, Any] = {"store": "sqlite", "path": str(path)}
        where = str(path)
    else:
        assert pg is not None
        where = pg.create("storm", template="storm_template")
        base = {"store": "postgres", "dsn": where, "pool": pool}
    runners = {"sqlite": 1, "pg x1": 1}.get(mode, 2)
    split = mode.endswith("split")
    procs = []
    for i in range(runners):
        spec = {**base, "n": n, "share": [i, runners] if split else [0, 1]}
        if profile:
            spec["profile"] = f"{profile}.{mode.replace(' ', '')}.{i}"
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--runner", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        ))
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"runner did not start: {line!r}")
        load_before = os.getloadavg()[0]
        watch = _Watch(base["store"], where)
        pg_cpu = _PgCpu(pg) if pg is not None and mode != "sqlite" else None
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        deadline = time.monotonic() + 600
        activity: Counter[str] = Counter()
        while not watch.done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: the storm did not end")
            watch.sample(activity)
            time.sleep(0.02)
        db_cpu = pg_cpu.spent() if pg_cpu is not None else None
        succeeded = watch.succeeded()
        reports = []
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.stdout is not None
            out, _ = proc.communicate(timeout=120)
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if "watch" in locals():
            watch.close()
    start = min(r["start"] for r in reports)
    elapsed = max(r["last"] for r in reports) - start
    executions = sum(r["executions"] for r in reports)
    assert executions == n, f"{mode}: {executions} executions for {n} runs"
    assert succeeded == n, f"{mode}: {succeeded} runs succeeded of {n}"
    assert not any(r["overlaps"] for r in reports)
    return {
        "mode": mode, "rate": n / elapsed, "elapsed": elapsed, "load": load_before,
        "cpu": [round(r["cpu"], 2) for r in reports],
        "shares": [r["finished"] for r in reports],
        "passes": [r["passes"] for r in reports],
        "finish_batches": [r["finish_batches"] for r in reports],
        "db_cpu": db_cpu, "activity": activity,
    }


def _busy(activity: Counter[str]) -> str:
    """The average number of backends in each state over the samples."""
    samples = activity.get("samples", 0)
    if not samples:
        return "no samples"
    parts = [f"{what} {count / samples:.2f}" for what, count in activity.most_common()
             if what != "samples"]
    return ", ".join(parts) or "none"


def storm(pg: BenchPostgres, args: argparse.Namespace, folder: Path) -> list[tuple[str, bool]]:
    n = args.storm
    t = load_backlog(pg.create("storm_template"), tasks=n, per_task=1, devices=n,
                     now=NOW, nodes="storm")
    print(f"\n1. reconnect storm: {n:,} devices, one run each, FakeExecutor "
          f"(template database loaded in {t:.1f} s; PostgreSQL pool max {args.pool} "
          "connections per runner)")
    modes = args.modes.split(",")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        for mode in order:
            res = storm_round(mode, n, pg, folder, pool=args.pool, profile=args.profile)
            results[mode].append(res)
            db = "" if res["db_cpu"] is None else f", PostgreSQL CPU {res['db_cpu']:.1f} s"
            extra = "" if res["db_cpu"] is None else (
                f"; passes {res['passes']}, finish statements {res['finish_batches']}; "
                f"backends busy: {_busy(res['activity'])}")
            print(f"  round {r + 1} {mode:12} {res['rate']:7,.0f} runs/s "
                  f"({res['elapsed']:.2f} s; runner CPU {res['cpu']} s{db}; runs per runner "
                  f"{res['shares']}{extra}; load {res['load']:.2f})", flush=True)
    medians = {m: statistics.median(x["rate"] for x in v) for m, v in results.items()}
    print("  medians: " + ", ".join(f"{m} {v:,.0f} runs/s" for m, v in medians.items()))
    out: list[tuple[str, bool]] = []
    if "pg x1" in medians and "pg x2" in medians:
        # the ratio of each round's pair (measured back to back), then their median
        ratios = [b["rate"] / a["rate"]
                  for a, b in zip(results["pg x1"], results["pg x2"], strict=True)]
        ratio = statistics.median(ratios)
        ok = ratio >= 1.5
        print(f"  two runners / one runner (shared devices): {ratio:.2f} (rounds: "
              f"{', '.join(f'{x:.2f}' for x in ratios)}) target >= 1.5: {verdict(ok)}")
        out.append(("storm: two runners >= 1.5 x one runner", ok))
    if "pg x1" in medians and "pg x2 split" in medians:
        ratios = [b["rate"] / a["rate"]
                  for a, b in zip(results["pg x1"], results["pg x2 split"], strict=True)]
        print(f"  two runners / one runner (devices split): {statistics.median(ratios):.2f}")
    if "sqlite" in medians and "pg x1" in medians:
        print(f"  one runner on PostgreSQL / SQLite: "
              f"{medians['pg x1'] / medians['sqlite']:.2f}")
    return out


# --------------------------------------------------------------------------- 2. backlog


async def backlog_measure(dsn: str, args: argparse.Namespace) -> bool:
    import psycopg

    with psycopg.connect(dsn) as conn:
        nodes = [row[0] for row in conn.execute(
            "SELECT DISTINCT node FROM runs WHERE state = 'pending'").fetchall()]
    rng = random.Random(7)
    now = NOW + timedelta(seconds=1)
    store = PostgresStore(dsn)
    await store.open()
    try:
        for node in rng.sample(nodes, 20):  # warm the pool and the plans
            await store.next_pending([node], now)
        hot: list[float] = []
        found: list[float] = []
        claimed = 0
        for node in rng.sample(nodes, args.samples):
            t0 = time.perf_counter()
            runs = await store.next_pending([node], now, limit=256)
            t1 = time.perf_counter()
            if runs:
                claimed += len(await store.claim_many([runs[0].key], now))
            t2 = time.perf_counter()
            hot.append(t2 - t0)
            found.append(t1 - t0)
        many = rng.sample(nodes, 10_000)
        t0 = time.perf_counter()
        batch = await store.next_pending(many, now, limit=256)
        reconnect = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = await store.claim_many([r.key for r in batch], now)
        claim_batch = time.perf_counter() - t0
    finally:
        await store.close()
    p50, p95, p99 = (pct(hot, q) * 1000 for q in (0.5, 0.95, 0.99))
    ok = p95 <= 5.0
    print(f"  next_pending([1 device]) + claim_many([its run]), {len(hot)} devices "
          f"({claimed} claimed): p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms, "
          f"max {max(hot) * 1000:.2f} ms (target p95 <= 5 ms): {verdict(ok)}; {load()}")
    print(f"  next_pending alone: p50 {pct(found, 0.5) * 1000:.2f} ms, "
          f"p95 {pct(found, 0.95) * 1000:.2f} ms")
    print(f"  next_pending(10,000 devices, limit=256) {reconnect * 1000:.1f} ms -> "
          f"{len(batch)} runs; claim_many of them {claim_batch * 1000:.1f} ms "
          f"({len(got)} claimed)")
    return ok


def explain(dsn: str) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of the hot path's statements, for one device (the
    claim in a transaction rolled back)."""
    import psycopg

    from ghostrunner.postgres import _queries as q

    with psycopg.connect(dsn) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        row = conn.execute(
            "SELECT t.id, r.node FROM runs AS r JOIN tasks AS t ON t.seq = r.task_seq "
            "WHERE r.state = 'pending' ORDER BY r.node DESC LIMIT 1").fetchone()
        assert row is not None
        task_id, node = row
        now = NOW + timedelta(seconds=1)
        for label, sql, params in (
            ("next_pending", q.NEXT_PENDING_SQL,
             {"nodes": [node], "now": now, "limit": 256, "skip": []}),
            ("claim_many", q.CLAIM_SQL,
             {"task_ids": [task_id], "node_ids": [node], "now": now}),
        ):
            plan = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", params)
            print(f"\n  EXPLAIN ANALYZE {label}:")
            for (line,) in plan.fetchall():
                print(f"    {line}")
        conn.rollback()


def backlog(pg: BenchPostgres, args: argparse.Namespace) -> list[tuple[str, bool]]:
    dsn = pg.create("backlog")
    took = load_backlog(dsn, tasks=args.backlog_runs // 10, per_task=10,
                        devices=args.backlog_devices, now=NOW, expire_every=10,
                        expires_at=NOW + timedelta(hours=1))
    print(f"\n2. backlog: {args.backlog_runs:,} pending runs over {args.backlog_devices:,} "
          f"devices (10 per task, every tenth task expiring), loaded in {took:.1f} s; "
          f"database {size(dsn)}")
    if args.explain:
        explain(dsn)
    ok = asyncio.run(backlog_measure(dsn, args))
    return [("backlog: one device's find + claim p95 <= 5 ms", ok)]


# --------------------------------------------------------------------------- 3. HTTP


def http(pg: BenchPostgres, args: argparse.Namespace, folder: Path) -> list[tuple[str, bool]]:
    import bench_http as bh

    dsn = pg.create("http")
    create = bh._request("POST", "/task/create", bh.TASK_BODY, bh.ADMIN)
    rates: dict[str, list[float]] = {"bare": [], "sqlite": [], "postgres": []}
    cpus: dict[str, list[float]] = {"bare": [], "sqlite": [], "postgres": []}
    db_cpus: list[float] = []
    ports = {name: bh._free_port() for name in rates}
    print(f"\n3. POST /task/create (3 node ids), real uvicorn on loopback, "
          f"{args.connections} connections, {args.http_rounds} rounds of {args.seconds:g} s, "
          f"{load()}")
    with bh.bare_server(ports["bare"]) as bare, \
            bh.ghostrunner_server(ports["sqlite"], folder / "create.db") as lite, \
            bh.ghostrunner_server(ports["postgres"], dsn) as gpg:  # type: ignore[arg-type]
        procs = {"bare": bare, "sqlite": lite, "postgres": gpg}
        for r in range(args.http_rounds):
            order = list(rates) if r % 2 == 0 else list(rates)[::-1]
            for name in order:
                pid = procs[name].pid
                box: dict[str, Any] = {}

                def mark(box: dict[str, Any] = box, pid: int = pid, name: str = name) -> None:
                    box["cpu"] = _cpu_of([pid])  # after the warm-up, as bench_http
                    box["db"] = _PgCpu(pg) if name == "postgres" else None

                rate, count = asyncio.run(bh._throughput(
                    ports[name], create, args.seconds, args.connections, mark=mark))
                rates[name].append(rate)
                cpus[name].append((_cpu_of([pid]) - box["cpu"]) * 1000 / max(count, 1))
                if box["db"] is not None:
                    db_cpus.append(box["db"].spent() * 1000 / max(count, 1))
            print(f"  round {r + 1}: " + ", ".join(
                f"{n} {rates[n][-1]:,.0f} req/s" for n in rates) + f"; {load()}", flush=True)
    ratios = {n: [g / b for g, b in zip(rates[n], rates["bare"], strict=True)]
              for n in ("sqlite", "postgres")}
    for name in rates:
        extra = "" if name == "bare" else (
            f", ratio {statistics.median(ratios[name]):.2f} (rounds "
            f"{', '.join(f'{x:.2f}' for x in ratios[name])})")
        cpu_note = "" if name != "postgres" else (
            f" + PostgreSQL {statistics.median(db_cpus):.2f} ms")
        print(f"  {name:8}: {statistics.median(rates[name]):7,.0f} req/s median, "
              f"server {statistics.median(cpus[name]):.2f} ms CPU/request{cpu_note}{extra}")
    ratio = statistics.median(ratios["postgres"])
    ok = ratio >= 0.5
    print(f"  PostgreSQL / bare Starlette: {ratio:.2f} (target >= 0.5): {verdict(ok)}")
    return [("POST /task/create on PostgreSQL ratio >= 0.5", ok)]


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="storm,backlog,http",
                        help="which parts, comma-separated (storm, backlog, http)")
    parser.add_argument("--storm", type=int, default=10_000, help="devices in the storm")
    parser.add_argument("--rounds", type=int, default=3, help="storm rounds (each mode)")
    parser.add_argument("--modes", default="sqlite,pg x1,pg x2,pg x2 split")
    parser.add_argument("--pool", type=int, default=10,
                        help="PostgresStore max_size of each runner (default: its default)")
    parser.add_argument("--profile", help="cProfile each storm runner to PREFIX.<mode>.<i>")
    parser.add_argument("--backlog-runs", type=int, default=1_000_000)
    parser.add_argument("--backlog-devices", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--explain", action="store_true", help="print the query plans")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--http-rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--runner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runner:
        asyncio.run(runner_child(json.loads(args.runner)))
        return 0

    parts = set(args.parts.split(","))
    results: list[tuple[str, bool]] = []
    with tempfile.TemporaryDirectory(prefix="gr-bench-pg-") as tmp, BenchPostgres() as pg:
        print(f"bench_postgres: PostgreSQL {pg.version} (pgserver, started in "
              f"{pg.started_in:.1f} s; {pg.settings}); {os.cpu_count()} CPUs, {load()}")
        folder = Path(tmp)
        if "storm" in parts:
            results += storm(pg, args, folder)
        if "backlog" in parts:
            results += backlog(pg, args)
        if "http" in parts:
            results += http(pg, args, folder)
    print()
    for name, ok in results:
        print(f"{verdict(ok)}  {name}")
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The reconcile loop under load, with SQLiteStore on disk and FakeExecutor.

1. Reconnect storm: 10,000 devices, one pending run each, all come online at once;
   the FakeExecutor answers at once. Target: all runs recorded at >= 2,000 runs/s.
2. Backlog: 1,000,000 pending runs over 100,000 devices (built by bench_store.py's
   builder in a child process, so this process never holds it). A fresh process opens
   it and starts GhostRunner. Targets: start-up <= 5 s; the process's RSS <= 200 MB;
   from a device coming online to its first run claimed (and done) p50/p95 reported,
   store-level find+claim <= 5 ms (bench_store.py measures that part alone).

Run: ``python benchmarks/bench_loop.py [--storm N] [--backlog-runs N --backlog-devices N]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ghostrunner import GhostRunner, LoopSettings, RunState, SQLiteStore, Task  # noqa: E402
from ghostrunner.testing import FakeExecutor  # noqa: E402

NOW = datetime(2025, 1, 1, tzinfo=UTC)
SYNC = os.environ.get("BENCH_SYNC", "FULL")
IN_FLIGHT = int(os.environ.get("BENCH_IN_FLIGHT", str(LoopSettings().max_in_flight)))


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


async def storm(n: int, folder: Path) -> bool:
    path = folder / "storm.db"
    nodes = [f"node//storm-{i:05d}" for i in range(n)]
    store = SQLiteStore(path)
    await store.open()
    await store.bulk_add_tasks(
        (Task(name=f"t{i}", command="true", targets=[node]) for i, node in enumerate(nodes)),
        NOW,
    )
    await store.close()

    executor = FakeExecutor(devices=nodes)
    settings = LoopSettings(resync_interval=5.0, max_in_flight=IN_FLIGHT)
    store = SQLiteStore(path, synchronous=SYNC)
    async with GhostRunner(store=store, executor=executor, settings=settings) as gr:

        async def all_done() -> bool:
            return (await gr.counts()).get(RunState.SUCCEEDED, 0) == n

        t0 = time.perf_counter()
        for node in nodes:
            executor.set_online(node)
        await gr.wait_until(all_done, timeout=600)
        elapsed = time.perf_counter() - t0
    rate = n / elapsed
    assert len(executor.executions) == n and not executor.overlaps
    ok = rate >= 2000
    print(f"reconnect storm: {n:,} devices online at once (max_in_flight={IN_FLIGHT}, "
          f"synchronous={SYNC}), {n:,} runs recorded in "
          f"{elapsed:.2f} s = {rate:,.0f} runs/s (target >= 2,000): {verdict(ok)}")
    return ok


def build_backlog(folder: Path, runs: int, devices: int) -> None:
    """Build the backlog in a child process (bench_store's builder)."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_store.py"), "--runs", str(runs),
         "--devices", str(devices), "--samples", "50", "--dir", str(folder),
         "--large-tries", "0"],  # the backlog as built, without bench_store's large tasks
        check=True, stdout=subprocess.DEVNULL,
    )
    print(f"backlog: built {runs:,} runs over {devices:,} devices in "
          f"{time.perf_counter() - t0:.1f} s (child process)")


async def backlog_child(folder: Path, devices: int, samples: int) -> None:
    """In a fresh process: open the backlog, start the loop, bring devices online."""
    path = folder / "bench.db"
    before = rss_mb()
    t0 = time.perf_counter()
    rng = random.Random(7)
    # bench_store names its devices node//dev-<i> ... read them back from the store
    store = SQLiteStore(path)
    executor = FakeExecutor()
    settings = LoopSettings(resync_interval=5.0)
    async with GhostRunner(store=store, executor=executor, settings=settings) as gr:
        page = await gr.list(limit=1000)
        nodes = sorted({n for s in page.items for n in s.task.targets})
        for node in nodes:
            executor.add_device(node)
        await gr.loop.step()  # the first pass, with every device offline
        startup = time.perf_counter() - t0
        after_start = rss_mb()
        latencies = []
        for node in rng.sample(nodes, min(samples, len(nodes))):
            claimed_before = len(executor.executions)
            t1 = time.perf_counter()
            executor.set_online(node)

            async def claimed(before: int = claimed_before) -> bool:
                return len(executor.executions) > before

            await gr.wait_until(claimed, timeout=30)
            latencies.append(time.perf_counter() - t1)
            executor.set_online(node, False)
        counts = await gr.counts()
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p95 = latencies[int(len(latencies) * 0.95) - 1] * 1000
    peak = peak_mb()
    print(f"backlog: {sum(counts.values()):,} runs stored; start-up (open, recover, first "
          f"pass) {startup:.2f} s (target <= 5 s): {verdict(startup <= 5)}")
    print(f"backlog: RSS {before:.0f} MB before, {after_start:.0f} MB after start-up, "
          f"peak {peak:.0f} MB (target <= 200 MB): {verdict(peak <= 200)}")
    print(f"backlog: device online -> its first run dispatched, {len(latencies)} devices: "
          f"p50 {p50:.1f} ms, p95 {p95:.1f} ms (event -> wake -> find -> claim -> run)")
    sys.exit(0 if startup <= 5 and peak <= 200 else 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storm", type=int, default=10_000)
    parser.add_argument("--backlog-runs", type=int, default=1_000_000)
    parser.add_argument("--backlog-devices", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(backlog_child(Path(args.child), args.backlog_devices, args.samples))
        return 0
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="gr-bench-loop-") as tmp:
        folder = Path(tmp)
        ok = asyncio.run(storm(args.storm, folder))
        build_backlog(folder, args.backlog_runs, args.backlog_devices)
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(folder),
             "--backlog-devices", str(args.backlog_devices), "--samples", str(args.samples)],
            check=False,
        )
        ok = ok and child.returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Fleet targeting and rollouts, with FakeExecutor (and SQLiteStore on disk).

1. Selecting every device: a task with ``select={"all": True}`` over 100,000 devices
   (most offline) is accepted (resolved, validated, stored with one run per device).
   Target: <= 1 s.
2. Continuous matching: 1,000 continuous tasks live, a device comes online / is tagged:
   the matching work of one pass (diffing the device view, testing the changed device
   against every continuous task, adding its runs). Target: <= 2 ms per device.
3. Rate: a rollout with ``per_minute=30`` over 5,000 devices (all online) driven by the
   loop with a fake clock that advances 1 s per step for a simulated hour. Target: the
   starts per minute within +-5% of 30, and never more than 30 in any 60 s window.

Run: ``python benchmarks/bench_fleet.py [--devices N] [--continuous N]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ghostrunner import Device, GhostRunner, LoopSettings, RunState, SQLiteStore  # noqa: E402
from ghostrunner.testing import FakeClock, FakeExecutor  # noqa: E402


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def fleet(n: int, online_every: int = 10) -> FakeExecutor:
    return FakeExecutor(devices=[
        Device(node_id=f"node//fleet-{i:06d}", name=f"dev-{i:06d}", group_name="pis",
               group_id="mesh//pis", tags=("arm",) if i % 2 else ("x86",),
               os="Raspbian GNU/Linux 12", online=i % online_every == 0)
        for i in range(n)
    ])


async def select_all(n: int, folder: Path) -> bool:
    executor = fleet(n)
    store = SQLiteStore(folder / "all.db")
    async with GhostRunner(store=store, executor=executor, background=False) as gr:
        times = []
        for i in range(3):
            t0 = time.perf_counter()
            task = await gr.submit(command=f"upgrade {i}", select={"all": True})
            times.append(time.perf_counter() - t0)
        total = (await gr.get(task.id)).counts[RunState.PENDING]
    best, worst = min(times), max(times)
    ok = total == n and worst <= 1.0
    print(f"select all: {n:,} devices -> {total:,} runs; accepted in "
          f"{best * 1000:.0f}-{worst * 1000:.0f} ms over 3 tasks (target <= 1 s): {verdict(ok)}")
    return ok


async def continuous(tasks: int, devices: int, folder: Path) -> bool:
    executor = fleet(devices, online_every=devices + 1)  # all offline
    store = SQLiteStore(folder / "continuous.db")
    clock = FakeClock()
    async with GhostRunner(store=store, executor=executor, clock=clock,
                           background=False) as gr:
        for i in range(tasks):
            # tags no device has yet: every task is live and waiting
            await gr.submit(command=f"t{i}", select={"tags": [f"wave-{i % 50}"]},
                            continuous=True)
        await gr.loop.step()  # the first pass matches every task against every device
        costs, matching = [], []
        for i in range(200):
            node = f"node//fleet-{i:06d}"
            executor.update_device(node, tags=("arm", f"wave-{i % 50}"))
            executor.set_online(node)
            before = gr.loop.matching_seconds
            t0 = time.perf_counter()
            await gr.loop._match_continuous(executor.devices(), clock())  # the pass's part
            costs.append(time.perf_counter() - t0)
            matching.append(gr.loop.matching_seconds - before)
        matched = 0
        for summary in (await gr.list(limit=1000)).items:
            matched += len(await gr.runs(summary.task.id))
    def ms(values: list[float]) -> str:
        p95 = statistics.quantiles(values, n=20)[18]
        return f"p50 {statistics.median(values) * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms"

    ok = statistics.quantiles(matching, n=20)[18] <= 0.002 and matched == 200 * (tasks // 50)
    print(f"continuous: {tasks:,} live tasks, {devices:,} devices; a device tagged and "
          f"online costs {ms(matching)} of matching (target <= 2 ms): {verdict(ok)}; with "
          f"storing its {tasks // 50} new runs (one SQLite commit, synchronous=FULL): "
          f"{ms(costs)} ({matched:,} runs added in all)")
    return ok


async def rate(per_minute: int, devices: int, minutes: int, folder: Path) -> bool:
    executor = fleet(devices, online_every=1)
    store = SQLiteStore(folder / "rate.db", synchronous="NORMAL")
    clock = FakeClock()
    settings = LoopSettings(max_in_flight=256)
    async with GhostRunner(store=store, executor=executor, clock=clock, settings=settings,
                           background=False) as gr:
        await gr.submit(command="roll", select={"all": True},
                        rollout={"per_minute": per_minute})
        starts = []
        seen = 0
        for _ in range(minutes * 60):
            await gr.run_until_idle()
            calls = executor.calls
            starts += [clock.now] * (len(calls) - seen)
            seen = len(calls)
            clock.advance(1)
    per_min = [
        sum(1 for t in starts if m * 60 <= (t - starts[0]).total_seconds() < (m + 1) * 60)
        for m in range(minutes)
    ]
    worst_window = max(
        sum(1 for u in starts if t - timedelta(minutes=1) < u <= t) for t in starts
    )
    mean = statistics.mean(per_min)
    ok = abs(mean - per_minute) <= 0.05 * per_minute and worst_window <= per_minute
    print(f"rate: per_minute={per_minute}, {minutes} simulated minutes: {len(starts):,} "
          f"starts, {mean:.2f}/min on average (min {min(per_min)}, max {max(per_min)}), "
          f"most in any 60 s window {worst_window} (target within +-5%, never over): "
          f"{verdict(ok)}")
    return ok


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--continuous", type=int, default=1_000)
    parser.add_argument("--minutes", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gr-bench-fleet-") as tmp:
        folder = Path(tmp)
        results = [
            await select_all(args.devices, folder),
            await continuous(args.continuous, 10_000, folder),
            await rate(30, 5_000, args.minutes, folder),
        ]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

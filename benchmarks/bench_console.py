"""Console benchmark: the task page of a 10,000-run task, rendered server-side.

A SQLite database holds one task with 10,000 runs that have finished (each with a short
output), plus 200 small tasks. The console app runs in-process (ASGI, no network) over
that database with a fake executor that knows the 10,000 devices; a signed-in session
asks for:

1. ``GET /ui/tasks/{id}``: the task page (status, counts, the first 100 runs);
2. ``GET /ui/tasks/{id}?start=9900``: its last page of runs;
3. ``GET /ui/tasks/{id}/live``: the JSON its script polls every 2 s;
4. ``GET /ui/`` and ``GET /ui/tasks``: the overview and the task list.

Target: the task page (1 and 2) p50 <= 200 ms server-side. The times include the
in-process test client's own overhead, so they overstate the server's time a little.

Run ``python benchmarks/bench_console.py`` (or ``nox -s bench -- bench_console``). It
prints its figures and PASS/FAIL, and exits 1 if the target is missed. Options:
``--runs``, ``--repeat``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

ADMIN = "bench-admin-token-0123456789abcdef"
TARGET_MS = 200.0


def _devices(n: int) -> list[str]:
    return [f"node//bench-{i:05d}" for i in range(n)]


async def _fill(path: Path, runs: int) -> str:
    """A database with one task of ``runs`` finished runs; returns its id."""
    from ghostrunner import GhostRunner, Outcome, SQLiteStore, Task
    from ghostrunner.testing import FakeExecutor

    def handler(request: object, device: object) -> Outcome:
        return Outcome(exit_code=0 if hash(str(device)) % 10 else 1,
                       output="Reading package lists... Done\nAll packages are up to date.\n")

    nodes = _devices(runs)
    executor = FakeExecutor(handler, devices=nodes)
    async with GhostRunner(store=SQLiteStore(path), executor=executor) as gr:
        for i in range(200):
            await gr.submit(Task(name=f"small-{i}", command="uptime", targets=nodes[:3]))
        task = await gr.submit(Task(name="fleet-upgrade", command="apt-get upgrade -y",
                                    targets=nodes))
        for node in nodes:
            executor.set_online(node)
        await gr.wait(task.id, timeout=1200)
        return task.id


def _measure(client: object, url: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        r = client.get(url)  # type: ignore[attr-defined]
        times.append((time.perf_counter() - started) * 1000)
        assert r.status_code == 200, (url, r.status_code)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    from ghostrunner import SQLiteStore
    from ghostrunner.testing import FakeExecutor
    from ghostrunner_http import Settings, create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    print(f"bench_console: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{args.runs:,} runs")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "console.db"
        started = time.perf_counter()
        task_id = asyncio.run(_fill(db, args.runs))
        print(f"  (database filled in {time.perf_counter() - started:.1f} s)")
        executor = FakeExecutor(devices=_devices(args.runs))
        app = create_app(Settings(executor="fake", admin_token=ADMIN, database=db),
                         store=SQLiteStore(db), executor=executor, announce=lambda s: None)
        with TestClient(app) as client:
            r = client.post("/ui/login", data={"token": ADMIN})
            assert r.status_code == 200 and "Signed in as" in r.text
            page = client.get(f"/ui/tasks/{task_id}").text
            rows = len(re.findall(r'<tr data-node="', page))
            assert rows == 100, rows
            cases = [
                ("task page, first 100 runs", f"/ui/tasks/{task_id}", True),
                ("task page, last 100 runs", f"/ui/tasks/{task_id}?start={args.runs - 100}",
                 True),
                ("task page, failed runs only", f"/ui/tasks/{task_id}?state=failed", True),
                ("live JSON of the task page", f"/ui/tasks/{task_id}/live", False),
                ("overview", "/ui/", False),
                ("task list", "/ui/tasks", False),
            ]
            ok = True
            print(f"\nGET, in-process, {args.repeat} requests each (ms)")
            for name, url, held in cases:
                times = _measure(client, url, args.repeat)
                p50 = statistics.median(times)
                p95 = sorted(times)[int(len(times) * 0.95) - 1]
                line = f"  {name:30} p50 {p50:7.1f}  p95 {p95:7.1f}"
                if held:
                    passed = p50 <= TARGET_MS
                    ok = ok and passed
                    line += f"   target p50 <= {TARGET_MS:.0f} ms  {'PASS' if passed else 'FAIL'}"
                print(line)
    print(f"\n{'PASS' if ok else 'FAIL'}  the task page of a {args.runs:,}-run task")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

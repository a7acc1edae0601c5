"""Live events: ``GET /events`` delivery under load, against a real ``ghostrunner serve``.

A server (SQLite, fake executor with online devices: every run is claimed and finished
at once) is given tasks at a steady rate by a driver process, so that about ``--rate``
run changes per second happen (each task of 2 devices writes 5 events: created, 2
claimed, 2 finished), while ``--clients`` SSE clients follow ``GET /events``. Each
event's delivery latency is the time a client read it minus the event's ``at`` (when
the store wrote it; one machine, one clock). Reported: events per second delivered to
every client, p50/p95/max latency, and events lost or repeated (must be none).
Target (issue #14): p95 <= 100 ms with 100 clients and 1,000 changes/s.

The clients are raw asyncio connections (no JSON parsing but for ``at`` on a tenth of
them): their own cost is kept small, as it shares the machine with the server.

Run ``python benchmarks/bench_events.py`` (``--clients``, ``--rate``, ``--seconds``).
Exits 1 if the target is missed or an event is lost or repeated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.serverproc import ServerProcess  # noqa: E402

ADMIN = "bench-events-admin-0123456789abcdef"
DEVICES = 50
CONFIG = ('executor = "fake"\n[fake]\ndevices = '
          + json.dumps([f"node-{i:03d}" for i in range(DEVICES)]) + "\n")

#: the driver: creates tasks of 2 devices at RATE tasks/s for SECONDS, keep-alive
DRIVER = """
import http.client, json, sys, time
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
token, devices = sys.argv[4], int(sys.argv[5])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
start = time.monotonic(); i = 0
while time.monotonic() - start < seconds:
    due = start + i / rate
    pause = due - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    nodes = [f"node-{(2 * i) % devices:03d}", f"node-{(2 * i + 1) % devices:03d}"]
    body = json.dumps({"details": {"name": f"b{i}", "command": "true", "nodeids": nodes}})
    conn.request("POST", "/task/create", body, {"Authorization": "Bearer " + token,
                                                "Content-Type": "application/json"})
    r = conn.getresponse(); r.read()
    assert r.status == 200, r.status
    i += 1
print(i)
"""


class Client:
    def __init__(self, measure: bool) -> None:
        self.measure = measure
        self.ids: list[int] = []
        self.latencies: list[float] = []

    async def follow(self, port: int, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"GET /events HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {ADMIN}"
                      "\r\n\r\n").encode())
        await writer.drain()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # the head
        try:
            while not stop.is_set():
                line = await reader.readline()
                if not line:
                    return
                if line.startswith(b"id: "):  # chunked framing lines are skipped alike
                    self.ids.append(int(line[4:]))
                elif self.measure and line.startswith(b"data: "):
                    at = line[line.index(b'"at":"') + 6:]
                    at = at[:at.index(b'"')]
                    sent = datetime.fromisoformat(at.decode().replace("Z", "+00:00"))
                    self.latencies.append(time.time() - sent.timestamp())
        finally:
            writer.close()


async def measure(server: ServerProcess, clients: int, rate: float, seconds: float) -> bool:
    port = server.port
    stop = asyncio.Event()
    followers = [Client(measure=i % 10 == 0) for i in range(clients)]
    tasks = [asyncio.create_task(c.follow(port, stop)) for c in followers]
    await asyncio.sleep(1.0)  # every stream open
    tasks_per_s = rate / 5
    t0 = time.monotonic()
    driver = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DRIVER, str(port), str(tasks_per_s), str(seconds), ADMIN,
        str(DEVICES), stdout=asyncio.subprocess.PIPE)
    out, _ = await driver.communicate()
    elapsed = time.monotonic() - t0
    created = int(out.decode().strip() or 0)
    await asyncio.sleep(2.0)  # the last events reach everyone
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # the opening id line of each stream is the start, not an event
    expected = created * 5
    counts = [len(c.ids) - 1 for c in followers]
    repeated = sum(len(c.ids) - len(set(c.ids)) for c in followers)
    ordered = all(c.ids == sorted(c.ids) for c in followers)
    latencies = sorted(x for c in followers for x in c.latencies)
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p95 = latencies[int(len(latencies) * 0.95) - 1] * 1000 if latencies else float("nan")
    worst = latencies[-1] * 1000 if latencies else float("nan")
    changes = (expected - created) / elapsed  # claims and finishes: run changes
    print(f"{clients} SSE clients, {created:,} tasks in {elapsed:.1f} s: {changes:,.0f} run "
          f"changes/s ({expected / elapsed:,.0f} events/s), each client received "
          f"{min(counts):,}-{max(counts):,} of {expected:,} events; repeated {repeated}, "
          f"in order: {ordered}")
    ok = p95 <= 100 and min(counts) == expected and repeated == 0 and ordered
    print(f"delivery latency (store write -> client read): p50 {p50:.1f} ms, p95 {p95:.1f} "
          f"ms, max {worst:.1f} ms (target p95 <= 100 ms, none lost or repeated): "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="run changes per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="gr-bench-events-") as tmp:
        server = ServerProcess(Path(tmp), CONFIG, {
            "GHOSTRUNNER_ADMIN_TOKEN": ADMIN, "GHOSTRUNNER_SERVER_ACCESS_LOG": "false",
            "GHOSTRUNNER_SERVER_MAX_STREAMS": str(args.clients + 10)})
        server.start()
        try:
            ok = asyncio.run(measure(server, args.clients, args.rate, args.seconds))
        finally:
            server.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

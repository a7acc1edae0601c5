"""Live events: ``GET /events`` under load, against a real ``ghostrunner serve``.

Issue #14's targets, both measured in one run:

1. **Create ratio with 100 clients connected.** ``POST /task/create`` throughput (32
   keep-alive connections each, closed loop, as ``bench_http.py``) as a ratio to a bare
   Starlette JSON endpoint served the same way, measured without SSE clients and with
   ``--clients`` of them following ``GET /events`` (each create writes a
   ``task.created`` event, which every client receives). The two servers are loaded in
   turns of 0.25 s, so that what else the machine does weighs on both alike; rounds
   measure without clients, then with them (the order swapped every other round).
   Target: the ratio with clients is at most 10 % below the ratio without (median of
   rounds). Also shown: the server's CPU per create without and with the clients, the
   drop the ratio would show if the server had the machine's CPU to itself (on a
   machine busy with other work the throughput ratio is noisy: compare both).
2. **Delivery latency at 1,000 run changes/s.** Tasks of 2 online fake devices (every
   run claimed and finished at once: 2 run changes per run, 5 events per task) are
   created at ``--rate`` run changes/s, open loop, over a few connections, while the
   clients follow. An event's delivery latency is the time a client read it minus the
   event's ``at`` (when the store wrote it; one machine, one clock). Target: p95 <= 100
   ms, every client receiving every event once, in order.

The server (SQLite, fake executor), the bare server, the clients and the load share the
machine; the clients are kept cheap so that the server is what gets measured: one
process, raw asyncio protocols that find ``id:`` lines with a regular expression per
read (and ``at`` for one client in ten), no HTTP library.

Run ``python benchmarks/bench_events.py`` (``--clients``, ``--rate``, ``--seconds``,
``--rounds``, ``--round-seconds``). Exits 1 if a target is missed or an event is lost,
repeated or out of order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench_http import (  # noqa: E402
    TASK_BODY,
    Connection,
    _cpu_seconds,
    _free_port,
    _request,
    bare_server,
)

from tests.serverproc import ServerProcess  # noqa: E402

ADMIN = "bench-events-admin-0123456789abcdef"
DEVICES = 50
CONFIG = ('executor = "fake"\n[fake]\ndevices = '
          + json.dumps([f"node-{i:03d}" for i in range(DEVICES)]) + "\n")


# --------------------------------------------------------------------------- the clients
# (their own process: ``bench_events.py --clients-process PORT N``; "ready" on stdout when
# every stream is open; then, on each line "wait COUNT" on stdin, they wait (10 s at
# most) until every client has COUNT events more than at the previous line, and print a
# JSON summary; stdin closed: exit)

_ID = re.compile(rb"^id: (\d+)\nevent: ", re.M)
_AT = re.compile(rb'^data: \{"id":\d+,"at":"([^"]+)"', re.M)


class _Client(asyncio.Protocol):
    """One ``GET /events`` stream: counts the events and checks that their ids increase
    (each read's first id above the last one before it); ``measure`` (one client in ten)
    checks every id and records every event's latency."""

    def __init__(self, measure: bool, opened: asyncio.Future[None],
                 progress: asyncio.Event) -> None:
        self.measure = measure
        self.opened = opened
        self.progress = progress
        self.buffer = b""
        self.head = True
        self.count = 0
        self.last = -1
        self.disorder = 0  # ids not above the one before: repeated or out of order
        self.latencies: list[float] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write((f"GET /events HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer "
                         f"{ADMIN}\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer + data if self.buffer else data
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self.buffer = buffer
            return
        done, self.buffer = buffer[:end + 2], buffer[end + 2:]
        if self.head:  # the answer's head and the opening message (retry, id: start)
            self.head = False
            if not self.opened.done():
                self.opened.set_result(None)
            return
        if self.measure:
            ids = [int(x) for x in _ID.findall(done)]
            count = len(ids)
            if ids and any(a >= b for a, b in itertools.pairwise(ids)):
                self.disorder += 1
            for at in _AT.findall(done):
                sent = datetime.fromisoformat(at.decode().replace("Z", "+00:00"))
                self.latencies.append(now - sent.timestamp())
        else:  # the first and the last id, and how many: C speed
            count = done.count(b"\nevent: ")
            first = _ID.search(done)
            at = done.rfind(b"\nid: ")  # (a newline is escaped in the JSON)
            ids = [int(first[1]), int(done[at + 5:done.index(b"\n", at + 5)])
                   ] if first else []
        if count:
            self.progress.set()
            self.count += count
            if ids[0] <= self.last:
                self.disorder += 1
            self.last = ids[-1]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed"))


async def _clients_main(port: int, n: int) -> None:
    loop = asyncio.get_running_loop()
    progress = asyncio.Event()
    clients = []
    for i in range(n):
        opened: asyncio.Future[None] = loop.create_future()
        _, client = await loop.create_connection(
            lambda opened=opened, i=i: _Client(i % 10 == 0, opened, progress),
            "127.0.0.1", port)
        clients.append(client)
        await opened
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    base = [0] * n
    while line := await reader.readline():
        wanted = int(line.split()[1])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while any(c.count - b < wanted for c, b in zip(clients, base, strict=True)):
                    progress.clear()
                    await progress.wait()
        got = [c.count - b for c, b in zip(clients, base, strict=True)]
        base = [c.count for c in clients]
        latencies = [x for c in clients for x in c.latencies]
        for c in clients:
            c.latencies.clear()
        print(json.dumps({"got": got, "last": [c.last for c in clients],
                          "disorder": sum(c.disorder for c in clients),
                          "latencies": latencies, "cpu": time.process_time()}), flush=True)
    for c in clients:
        assert c.transport is not None
        c.transport.close()


class Clients:
    """The clients' process, seen from the benchmark."""

    def __init__(self, port: int, n: int) -> None:
        self.n = n
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--clients-process", str(port), str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the SSE clients could not connect")

    def wait(self, count: int) -> dict[str, Any]:
        """Until every client got ``count`` events more (10 s at most): what they got."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"wait {count}\n")
        self.proc.stdin.flush()
        summary: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return summary

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _check(summary: dict[str, Any], expected: int) -> tuple[bool, str]:
    got, last = summary["got"], summary["last"]
    ok = (min(got) == max(got) == expected and len(set(last)) == 1
          and summary["disorder"] == 0)
    text = (f"each client received {min(got):,}-{max(got):,} of {expected:,} events, "
            f"out of order or repeated: {summary['disorder']}")
    return ok, text


# --------------------------------------------------------------------------- load


class _Pool:
    """Keep-alive connections to one server, driven in slices: a closed loop of ``POST
    /task/create`` (bench_http's body: 3 unknown devices, one event each)."""

    def __init__(self, port: int, pid: int, connections: int) -> None:
        self.port, self.pid, self.n = port, pid, connections
        self.conns: list[Connection] = []
        self.answered = 0  # requests answered, warm-up included
        self.done = 0  # requests answered in counted slices
        self.seconds = 0.0  # time spent in counted slices
        self.cpu = 0.0  # the server's CPU seconds in slices

    async def open(self) -> None:
        self.conns = [await Connection.open(self.port) for _ in range(self.n)]

    async def slice(self, seconds: float, *, counted: bool = True) -> None:
        """Every connection sends requests back to back for ``seconds``; those still
        out when the time is up are waited for (and counted: their time too)."""
        request = _request("POST", "/task/create", TASK_BODY, ADMIN)
        stop = False
        done = 0

        async def worker(conn: Connection) -> None:
            nonlocal done
            while not stop:
                status, body = await conn.send(request)
                if status != 200:
                    raise RuntimeError(f"status {status}: {body[:200]!r}")
                done += 1

        cpu = _cpu_seconds(self.pid)
        start = time.perf_counter()
        tasks = [asyncio.create_task(worker(c)) for c in self.conns]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
        self.answered += done
        if counted:
            self.done += done
            self.seconds += time.perf_counter() - start
            self.cpu += _cpu_seconds(self.pid) - cpu

    def close(self) -> None:
        for c in self.conns:
            c.close()


async def _side_by_side(bare: _Pool, gr: _Pool, seconds: float, step: float = 0.25
                        ) -> tuple[float, float, float]:
    """Both servers loaded in turns of ``step`` seconds, ``seconds`` each in all, so
    that what else the machine does weighs on both alike: (bare requests/s,
    ghostrunner requests/s, ghostrunner CPU ms per create)."""
    await bare.slice(0.3, counted=False)  # warm up
    await gr.slice(0.3, counted=False)
    for _ in range(max(int(seconds / step), 1)):
        await bare.slice(step)
        await gr.slice(step)
    return bare.done / bare.seconds, gr.done / gr.seconds, gr.cpu * 1000 / max(gr.done, 1)


async def _drive(port: int, tasks_per_s: float, seconds: float, connections: int) -> int:
    """Tasks of 2 online devices, due at a steady rate (open loop), over
    ``connections`` keep-alive connections; returns how many were created."""
    start = time.monotonic()
    issued = 0

    async def worker() -> int:
        nonlocal issued
        conn = await Connection.open(port)
        made = 0
        try:
            while True:
                i = issued
                due = start + i / tasks_per_s
                if due - start >= seconds:
                    return made
                issued += 1
                pause = due - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                nodes = [f"node-{(2 * i) % DEVICES:03d}", f"node-{(2 * i + 1) % DEVICES:03d}"]
                body = json.dumps({"details": {"name": f"b{i}", "command": "true",
                                               "nodeids": nodes}}).encode()
                status, answer = await conn.send(_request("POST", "/task/create", body, ADMIN))
                if status != 200:
                    raise RuntimeError(f"status {status}: {answer[:200]!r}")
                made += 1
        finally:
            conn.close()

    return sum(await asyncio.gather(*(worker() for _ in range(connections))))


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[max(int(len(values) * q) - 1, 0)] if values else float("nan")


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients-process", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="run changes per second")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="seconds of the latency measurement")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the create ratio")
    parser.add_argument("--round-seconds", type=float, default=4.0,
                        help="seconds of load per server and round (in turns of 0.25 s)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--driver-connections", type=int, default=32)
    parser.add_argument("--only", choices=("ratio", "latency"),
                        help="measure one target only")
    args = parser.parse_args()
    if args.clients_process:
        asyncio.run(_clients_main(*args.clients_process))
        return 0

    print(f"bench_events: {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {args.clients} SSE clients")
    results: list[tuple[str, bool]] = []
    with tempfile.TemporaryDirectory(prefix="gr-bench-events-") as tmp:
        server = ServerProcess(Path(tmp), CONFIG, {
            "GHOSTRUNNER_ADMIN_TOKEN": ADMIN, "GHOSTRUNNER_SERVER_ACCESS_LOG": "false",
            "GHOSTRUNNER_SERVER_MAX_STREAMS": str(args.clients + 10)})
        server.start()
        assert server.proc is not None
        pid = server.proc.pid
        bare_port = _free_port()
        try:
            with bare_server(bare_port) as bare:
                ok = True
                if args.only != "latency":
                    ok = _ratio(args, server.port, pid, bare_port, bare.pid, results)
                if args.only != "ratio":
                    ok = _latency(args, server.port, pid, results) and ok
        finally:
            server.stop()
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, passed in results:
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    return 0 if ok and all(passed for _, passed in results) else 1


def _ratio(args: argparse.Namespace, port: int, pid: int, bare_port: int, bare_pid: int,
           results: list[tuple[str, bool]]) -> bool:
    """Target 1; False if a client missed an event."""
    print(f"\n1. POST /task/create vs bare Starlette, {args.connections} connections each, "
          f"the two servers in turns of 0.25 s; {args.rounds} rounds of {args.round_seconds:g}"
          f" s a server without and with {args.clients} SSE clients")
    ratios: dict[str, list[float]] = {"without": [], "with": []}
    cpu: dict[str, list[float]] = {"without": [], "with": []}
    delivered = True

    async def load() -> tuple[float, float, float, int]:
        bare, gr = _Pool(bare_port, bare_pid, args.connections), _Pool(
            port, pid, args.connections)
        await bare.open()
        await gr.open()
        try:
            return (*await _side_by_side(bare, gr, args.round_seconds), gr.answered)
        finally:
            bare.close()
            gr.close()

    def measure(side: str) -> str:
        nonlocal delivered
        clients = Clients(port, args.clients) if side == "with" else None
        try:
            bare_rate, rate, per, events = asyncio.run(load())
            if clients is not None:  # every event since they connected
                fine, text = _check(clients.wait(events), events)
                delivered = delivered and fine
                if not fine:
                    print(f"   clients: {text}")
        finally:
            if clients is not None:
                clients.close()
        ratios[side].append(rate / bare_rate)
        cpu[side].append(per)
        return (f"{side} clients {rate:,.0f}/{bare_rate:,.0f} = {rate / bare_rate:.2f} "
                f"({per:.2f} ms CPU/create)")

    for round_ in range(args.rounds):
        sides = ["without", "with"] if round_ % 2 == 0 else ["with", "without"]
        line = [measure(side) for side in sides]
        print(f"   round {round_ + 1} (load {os.getloadavg()[0]:.1f}): " + "; ".join(line))
    without, with_ = statistics.median(ratios["without"]), statistics.median(ratios["with"])
    drop = 1 - with_ / without
    ok = drop <= 0.10
    print(f"   create ratio without clients {without:.2f} (rounds "
          f"{', '.join(f'{r:.2f}' for r in ratios['without'])}), with {args.clients} clients "
          f"{with_:.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios['with'])}): "
          f"{drop * 100:+.1f} % drop (target <= 10 %) {'PASS' if ok else 'FAIL'}")
    cpu_without, cpu_with = statistics.median(cpu["without"]), statistics.median(cpu["with"])
    print(f"   server CPU per create: {cpu_without:.2f} ms without, {cpu_with:.2f} ms with "
          f"clients ({(1 - cpu_without / cpu_with) * 100:+.1f} %: the drop if the server had "
          f"the CPU to itself; informational); every client received every event, in order: "
          f"{delivered}")
    results.append((f"create ratio drop with {args.clients} SSE clients <= 10 %", ok))
    results.append(("create ratio: every client received every event once, in order",
                    delivered))
    return delivered


def _latency(args: argparse.Namespace, port: int, pid: int,
             results: list[tuple[str, bool]]) -> bool:
    """Target 2."""
    tasks_per_s = args.rate / 4  # 2 runs a task, each claimed and finished
    print(f"\n2. delivery latency, {args.clients} SSE clients, tasks of 2 devices asked at "
          f"{tasks_per_s:g}/s ({args.rate:g} run changes/s) for {args.seconds:g} s")
    clients = Clients(port, args.clients)
    try:
        clients_cpu = clients.wait(0)["cpu"]
        cpu = _cpu_seconds(pid)
        t0 = time.monotonic()
        created = asyncio.run(_drive(port, tasks_per_s, args.seconds,
                                     args.driver_connections))
        elapsed = time.monotonic() - t0
        used = _cpu_seconds(pid) - cpu
        summary = clients.wait(created * 5)
        clients_cpu = summary["cpu"] - clients_cpu
    finally:
        clients.close()
    expected = created * 5
    fine, text = _check(summary, expected)
    latencies = summary["latencies"]
    p50, p95 = _pct(latencies, 0.5) * 1000, _pct(latencies, 0.95) * 1000
    worst = max(latencies, default=float("nan")) * 1000
    changes = created * 4 / elapsed
    ok = p95 <= 100 and changes >= 0.9 * args.rate
    print(f"   {created:,} tasks in {elapsed:.1f} s: {changes:,.0f} run changes/s "
          f"({expected / elapsed:,.0f} events/s); {text}; CPU: server {used / elapsed:.2f} "
          f"s/s, clients {clients_cpu / elapsed:.2f} s/s")
    print(f"   delivery latency (store write -> client read): p50 {p50:.1f} ms, p95 "
          f"{p95:.1f} ms, max {worst:.1f} ms (target p95 <= 100 ms at "
          f"{args.rate:,.0f} changes/s) {'PASS' if ok else 'FAIL'}")
    results.append((f"delivery p95 <= 100 ms, {args.clients} clients, {args.rate:,.0f} run "
                    "changes/s", ok))
    results.append(("latency run: every client received every event once, in order", fine))
    return fine


if __name__ == "__main__":
    sys.exit(main())

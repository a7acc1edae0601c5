"""Dispatch throughput against a real MeshCentral: GhostRunner against a bare libmeshctrl
loop (issue #12).

One lab (MeshCentral + ``--agents`` real agents, 3 by default) for the whole run. Two
contenders, measured in alternation (bare, GhostRunner, bare, GhostRunner, ...), each
round on its own MeshCentral session so that neither sees the other's traffic:

* **bare**: one libmeshctrl session; per agent one coroutine sending ``runcommands``
  ``true`` (type 0, ``reply: true``, a unique response id per call), one in flight per
  agent (an agent has one command slot), ``--per-agent`` calls each, all agents at once.
  This is the floor MeshCentral and its agents set on this machine.
* **GhostRunner**: the facade with a :class:`SQLiteStore` in a temporary directory and a
  :class:`MeshCentralExecutor` on the same lab; ``--per-agent`` tasks of ``true``, each
  targeting every agent, submitted once the devices are online; timed from the first
  submit to the last run terminal (the facade's ``wait_until`` on the store's counts).

Runs/s = runs / wall time. Target: GhostRunner / bare >= 0.8 (medians over the rounds).
The script reports; it exits 0 whether or not the target is met.

Other modes:

* ``--wrapper-only``: no MeshCentral. The per-run cost of the ``sh`` wrapper on this
  machine: its script for ``true`` fed to ``/bin/sh``'s stdin (as the agent does), N times
  in sequence, against ``sh -c true`` and ``true`` fed to ``/bin/sh``'s stdin (what the
  bare loop costs the agent). ``--wrapper module:function`` measures another wrapper
  (same signature as :func:`ghostrunner.meshcentral._wrappers.wrap_command`; it may
  return the script or an object with ``.script``); :func:`measure_wrapper` does the
  same from Python. This module's :func:`wrap_minimal` (a lower bound, not a
  proposal) is a design to compare against.
* ``--diagnose``: after the A/B rounds, instrumented GhostRunner rounds (methods of the
  store, the executor and the loop wrapped from the outside, this process only) give a
  per-run timeline of each device's command slot, the store calls per run and the CPU
  per run of each process; then variants (no coalescing window, the minimal wrapper, a
  cheaper store...), each alternated with bare rounds, give the gain of each change.
  ``--profile`` adds a cProfile of one GhostRunner round.

Run: ``python benchmarks/bench_dispatch.py [--rounds N] [--per-agent N] [--diagnose]``
or ``python benchmarks/bench_dispatch.py --wrapper-only [--runs N] [--wrapper m:f]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import importlib
import importlib.util
import inspect
import io
import itertools
import json
import os
import pstats
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ghostrunner import (  # noqa: E402
    GhostRunner,
    LoopSettings,
    RunState,
    SQLiteStore,
    Task,
)
from ghostrunner.meshcentral import _executor as executor_module  # noqa: E402
from ghostrunner.meshcentral._wrappers import WrappedCommand, wrap_command  # noqa: E402

TARGET = 0.8
CALL_TIMEOUT = 60.0
ACTIVE = (RunState.PENDING, RunState.DISPATCHED)


# ===================================================================== wrapper alone

WrapFunc = Callable[..., Any]


def wrap_minimal(command: str, shell: str, *, timeout: float, marker: str | None = None,
                 once: str | None = None, **_: Any) -> WrappedCommand:
    """The least a wrapper can do and still be parsed by ``parse_result``: BEGIN, the
    command in a subshell with stdin from /dev/null, END with its status. No device-side
    timeout, no once-only guard, no output cap: a lower bound, not a proposal."""
    marker = marker or secrets.token_hex(16)
    quoted = "'" + command.replace("'", "'\\''") + "'"
    script = (
        f"gr_m={marker}\n"
        "printf '\\nGR_BEGIN_%s\\n' \"$gr_m\"\n"
        f"(eval {quoted}) </dev/null\n"
        "gr_e=$?\n"
        "printf '\\nGR_END_%s rc=%s timeout=0\\n' \"$gr_m\" \"$gr_e\"\n"
    )
    return WrappedCommand(script=script, mesh_type=0, marker=marker, shell="sh")


def load_wrapper(spec: str) -> WrapFunc:
    """``module:function`` (or ``path/to/file.py:function``) -> the function."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise SystemExit(f"--wrapper wants module:function, got {spec!r}")
    if module_name.endswith(".py"):
        loaded = importlib.util.spec_from_file_location("_bench_wrapper", module_name)
        assert loaded is not None and loaded.loader is not None
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    func: WrapFunc = getattr(module, func_name)
    return func


def _script_of(wrapper: WrapFunc, command: str, once: str) -> str:
    wrapped = wrapper(command, "sh", timeout=300, once=once)
    return wrapped if isinstance(wrapped, str) else str(wrapped.script)


def count_processes(argv: Sequence[str], text: str, env: dict[str, str]) -> tuple[int, int]:
    """(processes, execs) of one run of ``argv`` with ``text`` on stdin, counted with
    strace (0, 0 if strace is not installed): exact, unlike a machine-wide count."""
    with tempfile.NamedTemporaryFile(prefix="gr-bench-strace-") as trace:
        try:
            subprocess.run(["strace", "-f", "-qq", "-o", trace.name, "-e",
                            "trace=execve,exit_group,clone,clone3,fork,vfork", *argv],
                           input=text, capture_output=True, text=True, env=env, check=False)
        except FileNotFoundError:
            return 0, 0
        lines = Path(trace.name).read_text().splitlines()
    pids = {line.split(None, 1)[0] for line in lines if line[:1].isdigit()}
    execs = sum(1 for line in lines if " execve(" in line and "= 0" in line)
    return len(pids), execs


@attrs.frozen
class ShellCost:
    name: str
    ms_per_run: float
    p95_ms: float
    processes: int
    execs: int
    bytes: int


@attrs.frozen
class _Contender:
    name: str
    argv: tuple[str, ...]
    inputs: Callable[[int], str]
    check: Callable[[str], bool]


def _shell_costs(contenders: Sequence[_Contender], runs: int,
                 env: dict[str, str]) -> list[ShellCost]:
    """Each contender ``runs`` times, interleaved (one of each in turn), so that a busy
    machine slows them all alike."""
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for i in range(runs):
        for c in contenders:
            text = c.inputs(i)
            t0 = time.perf_counter()
            done = subprocess.run(c.argv, input=text, capture_output=True, text=True,
                                  env=env, check=False)
            times[c.name].append(time.perf_counter() - t0)
            if not c.check(done.stdout):
                raise RuntimeError(f"{c.name}: unexpected output {done.stdout[-300:]!r}")
    out = []
    for c in contenders:
        ordered = sorted(times[c.name])
        processes, execs = count_processes(c.argv, c.inputs(runs), env)
        out.append(ShellCost(c.name, statistics.median(ordered) * 1000,
                             ordered[max(0, round(0.95 * runs) - 1)] * 1000, processes,
                             execs, len(c.inputs(0).encode())))
    return out


def measure_wrappers(wrappers: Sequence[WrapFunc] = (wrap_command,), runs: int = 200,
                     command: str = "true") -> list[ShellCost]:
    """Per-run cost of each wrapper's sh script for ``command`` fed to ``/bin/sh``'s
    stdin, as the agent does (a new once-only key per run, as every dispatch gets),
    against ``sh -c COMMAND`` and COMMAND alone fed to ``/bin/sh``'s stdin (what the bare
    loop costs an agent). ``runs`` of each, in sequence, interleaved. Returns those two
    first, then one line per wrapper."""
    with tempfile.TemporaryDirectory(prefix="gr-bench-wrap-") as tmp:
        env = {**os.environ, "TMPDIR": tmp}  # the once-only guards go here

        def scripts(wrapper: WrapFunc) -> Callable[[int], str]:
            return lambda i: _script_of(wrapper, command, f"{secrets.token_hex(8)}{i:08d}")

        contenders = [
            _Contender(f"sh -c {command}", ("/bin/sh", "-c", command), lambda i: "",
                       lambda s: True),
            _Contender(f"'{command}' on sh's stdin (the bare loop)", ("/bin/sh",),
                       lambda i: command + "\n", lambda s: True),
        ]
        for wrapper in wrappers:
            name = getattr(wrapper, "__qualname__", repr(wrapper))
            contenders.append(_Contender(f"{name}(...) on sh's stdin", ("/bin/sh",),
                                         scripts(wrapper), lambda s: "GR_END_" in s))
        return _shell_costs(contenders, runs, env)


def measure_wrapper(wrapper: WrapFunc = wrap_command, runs: int = 200,
                    command: str = "true") -> list[ShellCost]:
    """:func:`measure_wrappers` for one wrapper."""
    return measure_wrappers([wrapper], runs, command)


def print_wrapper_costs(costs: Sequence[ShellCost]) -> None:
    print(f"{'per run, sequential':<46} {'median ms':>9} {'p95 ms':>7} "
          f"{'procs':>6} {'execs':>6} {'bytes':>6}")
    for c in costs:
        print(f"{c.name:<46} {c.ms_per_run:>9.2f} {c.p95_ms:>7.2f} {c.processes:>6} "
              f"{c.execs:>6} {c.bytes:>6}")
    base = costs[0].ms_per_run
    for c in costs[2:]:
        print(f"  {c.name}: {c.ms_per_run - base:+.2f} ms/run and "
              f"{c.processes - costs[0].processes:+d} processes/run over sh -c true")


# ===================================================================== CPU accounting


def _stat_fields(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(fields: list[str], children: bool = True) -> float:
    # fields[0] is the state (field 3); utime, stime, cutime, cstime are fields 14-17
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def group_cpu(pgid: int) -> float:
    """CPU seconds of every process of a process group (with its reaped children)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(f"/proc/{entry}/stat")
            if fields is not None and int(fields[2]) == pgid:
                total += _cpu_of(fields)
    return total


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads, by name (the event loop is MainThread's
    ``python``; the store's worker has its own name)."""
    out: dict[str, float] = defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        fields = _stat_fields(f"/proc/self/task/{tid}/stat")
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if fields is not None:
            out["event loop" if int(tid) == os.getpid() else comm] += _cpu_of(fields, False)
    return dict(out)


class CpuMeter:
    """CPU seconds of this process, the MeshCentral server and the agents."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab

    def sample(self) -> dict[str, float]:
        sample = {"python": time.process_time()}
        if self.lab.pid is not None:
            sample["meshcentral"] = group_cpu(self.lab.pid)
        agents = 0.0
        for agent in self.lab.agents:
            if agent.pid is not None:
                agents += group_cpu(agent.pid)  # each agent leads its own group
        sample["agents+shells"] = agents
        return sample


def cpu_delta(a: dict[str, float], b: dict[str, float], runs: int) -> dict[str, float]:
    return {k: (b[k] - a[k]) * 1000 / runs for k in a if k in b}


# ===================================================================== rounds


@attrs.define
class RoundResult:
    kind: str
    runs: int
    wall: float
    cpu_ms: dict[str, float] = attrs.field(factory=dict)
    call_ms: list[float] = attrs.field(factory=list)  # bare: each call's round trip
    submit: float = 0.0  # GhostRunner: seconds spent submitting
    checks: int = 0
    states: dict[str, int] = attrs.field(factory=dict)

    @property
    def rate(self) -> float:
        return self.runs / self.wall


async def open_session(lab: Any) -> Any:
    from meshctrl.session import Session

    session = Session(lab.url, user=lab.admin_user, password=lab.admin_password,
                      ignore_ssl=True, auto_reconnect=False)
    await asyncio.wait_for(session.initialized.wait(), 30)
    if not session.alive:
        raise RuntimeError("could not open a libmeshctrl session on the lab")
    return session


async def bare_round(lab: Any, nodes: Sequence[str], per_agent: int) -> RoundResult:
    session = await open_session(lab)
    meter = CpuMeter(lab)
    calls: list[float] = []
    try:
        async def agent_loop(node: str) -> None:
            for _ in range(per_agent):
                t = time.perf_counter()
                reply = await session._send_command(
                    {"action": "runcommands", "nodeids": [node], "type": 0, "cmds": "true",
                     "runAsUser": 0, "reply": True},
                    "bench", timeout=CALL_TIMEOUT, responseid=f"bench_{secrets.token_hex(10)}",
                )
                calls.append(time.perf_counter() - t)
                if reply.get("type") != "runcommands":
                    raise RuntimeError(f"bare loop: unexpected reply {reply!r}")

        cpu0 = meter.sample()
        t0 = time.perf_counter()
        await asyncio.gather(*(agent_loop(n) for n in nodes))
        wall = time.perf_counter() - t0
        cpu1 = meter.sample()
    finally:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(session.close(), 5)
    runs = per_agent * len(nodes)
    return RoundResult("bare", runs, wall, cpu_delta(cpu0, cpu1, runs),
                       [c * 1000 for c in calls])


@attrs.frozen
class Variant:
    """How a GhostRunner round is set up (the default is GhostRunner as shipped)."""

    name: str = "GhostRunner"
    coalesce: float | None = None  # None: LoopSettings' default
    store: str = "sqlite"  # sqlite (synchronous=FULL), sqlite-normal, memory
    wrapper: WrapFunc | None = None  # patched into the executor for the round

    def make_store(self, folder: Path) -> Any:
        path = folder / f"gr-{secrets.token_hex(4)}.db"
        if self.store == "sqlite":
            return SQLiteStore(path)
        if self.store == "sqlite-normal":
            return SQLiteStore(path, synchronous="NORMAL")
        if self.store == "memory":
            from ghostrunner.testing import InMemoryStore

            return InMemoryStore()
        raise ValueError(self.store)

    def settings(self) -> LoopSettings:
        if self.coalesce is None:
            return LoopSettings()
        return LoopSettings(coalesce=self.coalesce)


@contextlib.contextmanager
def patched_wrapper(wrapper: WrapFunc | None) -> Iterator[None]:
    if wrapper is None:
        yield
        return
    original = executor_module.wrap_command
    executor_module.wrap_command = wrapper  # type: ignore[assignment]
    try:
        yield
    finally:
        executor_module.wrap_command = original


async def gr_round(lab: Any, nodes: Sequence[str], per_agent: int, folder: Path,
                   variant: Variant = Variant(), probe: Probe | None = None,
                   profiler: cProfile.Profile | None = None) -> RoundResult:
    from ghostrunner.meshcentral import MeshCentralExecutor

    executor = MeshCentralExecutor(lab.url, user=lab.admin_user,
                                   password=lab.admin_password, ignore_ssl=True,
                                   group_id=lab.group_id)
    store = variant.make_store(folder)
    meter = CpuMeter(lab)
    total = per_agent * len(nodes)
    checks = 0
    with patched_wrapper(variant.wrapper):
        async with GhostRunner(store=store, executor=executor,
                               settings=variant.settings()) as gr:
            await executor.wait_connected(timeout=60)

            async def online() -> bool:
                devices = executor.devices()
                return all(n in devices and devices[n].online for n in nodes)

            await gr.wait_until(online, timeout=60)

            async def finished() -> bool:
                nonlocal checks
                checks += 1
                counts = await gr.counts()
                return sum(n for s, n in counts.items() if s not in ACTIVE) >= total

            async def wait_finished() -> None:
                # poll every 2 ms; ask the store only when no command is in flight, so
                # that the benchmark's own reads hardly load the store's thread
                while gr.loop.in_flight or not await finished():  # noqa: ASYNC110
                    await asyncio.sleep(0.002)

            if probe is not None:
                probe.install(gr, executor)
            threads0 = thread_cpu()
            cpu0 = meter.sample()
            if profiler is not None:
                profiler.enable()
            t0 = time.perf_counter()
            for i in range(per_agent):
                await gr.submit(Task(name=f"bench-{i}", command="true", targets=nodes))
            submitted = time.perf_counter() - t0
            await asyncio.wait_for(wait_finished(), CALL_TIMEOUT + 10 * per_agent)
            wall = time.perf_counter() - t0
            if profiler is not None:
                profiler.disable()
            cpu1 = meter.sample()
            threads1 = thread_cpu()
            counts = await gr.counts()
            if probe is not None:
                probe.threads = {k: (threads1.get(k, 0.0) - v) * 1000 / total
                                 for k, v in threads0.items()}
                probe.commits = getattr(getattr(store, "_worker", None), "commits", 0)
    return RoundResult(variant.name, total, wall, cpu_delta(cpu0, cpu1, total),
                       submit=submitted, checks=checks,
                       states={str(s): n for s, n in counts.items()})


# ===================================================================== instrumentation


class Probe:
    """Timestamps (``time.monotonic``) of what happens to each device's command slot,
    taken by wrapping methods of one GhostRunner's store, executor and loop from the
    outside. Diagnostics only: it adds a few microseconds per call."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []  # (time, what, node id)
        self.store_calls: dict[str, list[float]] = defaultdict(list)
        self.steps: list[tuple[float, float]] = []
        self.wakes: list[float] = []
        self.handled: Counter[str] = Counter()
        self.handle_seconds = 0.0
        self.sent_bytes: list[int] = []
        self.threads: dict[str, float] = {}
        self.commits = 0

    def mark(self, what: str, node: str, at: float | None = None) -> None:
        self.events.append((time.monotonic() if at is None else at, what, node))

    def install(self, gr: GhostRunner, executor: Any) -> None:
        self._wrap_store(gr.store)
        self._wrap_executor(executor)
        self._wrap_loop(gr)

    def _wrap_store(self, store: Any) -> None:
        for name in dir(type(store)):
            if name.startswith("_") or name in {"open", "close"}:
                continue
            method = getattr(store, name)
            if not inspect.iscoroutinefunction(method):
                continue

            def wrapper(method: Any = method, name: str = name) -> Any:
                @functools.wraps(method)
                async def timed(*args: Any, **kwargs: Any) -> Any:
                    t = time.monotonic()
                    try:
                        return await method(*args, **kwargs)
                    finally:
                        end = time.monotonic()
                        self.store_calls[name].append(end - t)
                        if name == "finish":
                            self.mark("finish start", args[0].node_id, t)
                            self.mark("finish done", args[0].node_id, end)
                        elif name == "claim_many":
                            for key in args[0]:
                                self.mark("claim done", key.node_id, end)
                return timed

            setattr(store, name, wrapper())

    def _wrap_executor(self, executor: Any) -> None:
        run, handle = executor.run, executor._handle

        async def timed_run(request: Any) -> Any:
            self.mark("run start", request.node_id)
            try:
                return await run(request)
            finally:
                self.mark("sent", request.node_id, executor.sent_at.get(request.node_id))
                self.mark("run end", request.node_id)

        def timed_handle(msg: Any) -> None:
            t = time.monotonic()
            kind = f"{msg.get('action')}/{msg.get('type') or ''}"
            self.handled[kind] += 1
            dispatch = None
            if msg.get("action") == "msg" and msg.get("type") == "console":
                dispatch = executor._by_node.get(str(msg.get("nodeid")))
                if dispatch is not None and not dispatch.started.is_set():
                    if not dispatch.console:
                        self.mark("first console", dispatch.node_id, t)
                else:
                    dispatch = None
            elif msg.get("type") == "runcommands" or msg.get("action") == "runcommands":
                reply_to = executor._by_response.get(str(msg.get("responseid")))
                if reply_to is not None:
                    self.mark("reply", reply_to.node_id, t)
            handle(msg)
            if dispatch is not None and dispatch.started.is_set():
                self.mark("begin seen", dispatch.node_id, t)
            self.handle_seconds += time.monotonic() - t

        executor.run = timed_run
        executor._handle = timed_handle
        session = executor._session
        queue_put = session._message_queue.put

        async def counted_put(message: str) -> None:
            if '"runcommands"' in message[:40]:
                self.sent_bytes.append(len(message.encode()))
            await queue_put(message)

        session._message_queue.put = counted_put

    def _wrap_loop(self, gr: GhostRunner) -> None:
        loop = gr.loop
        step = loop._step

        async def timed_step() -> int:
            t = time.monotonic()
            try:
                return await step()
            finally:
                self.steps.append((t, time.monotonic()))

        loop._step = timed_step  # type: ignore[method-assign]
        wake_set = loop._wake.set

        def timed_set() -> None:
            self.wakes.append(time.monotonic())
            wake_set()

        loop._wake.set = timed_set  # type: ignore[method-assign]

    # ------------------------------------------------------------------ analysis

    STAGES = (
        ("run start", "sent", "executor: wrap the command, build and queue the message"),
        ("sent", "reply", "message queued -> reply (websocket, MeshCentral, agent, sh and "
         "the wrapper, reply)"),
        ("reply", "run end", "reply -> executor.run returns (parse)"),
        ("run end", "finish start", "run returns -> store.finish called (decide)"),
        ("finish start", "finish done", "store.finish round trip (UPDATE, attempt row, "
         "commit)"),
        ("finish done", "next step", "finish done -> next pass starts (coalescing "
         "window, waiting for the loop)"),
        ("next step", "claim done", "pass: expire_due, next_wakeup?, next_pending, "
         "claim_many"),
        ("claim done", "next run start", "claim -> executor.run (dispatch task starts)"),
    )
    SPLIT = (
        ("sent", "begin seen", "of which: queued -> BEGIN seen in a console chunk"),
        ("begin seen", "reply", "of which: BEGIN seen -> reply"),
    )
    WHOLE = "whole cycle (run start -> next run start)"

    def timeline(self) -> dict[str, list[float]]:
        """Per stage, the durations (ms) of every run's cycle on its device: a cycle
        starts when ``executor.run`` is called and ends when it is called for the
        device's next run."""
        steps = sorted(s for s, _ in self.steps)
        by_node: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for t, what, node in sorted(self.events):
            by_node[node].append((t, what))
        out: dict[str, list[float]] = defaultdict(list)
        for events in by_node.values():
            cycles: list[dict[str, float]] = []
            for t, what in events:
                if what == "run start":
                    cycles.append({})
                if cycles and what not in cycles[-1]:
                    cycles[-1][what] = t  # the first of each kind in the cycle
            for cycle, nxt in itertools.pairwise(cycles):
                done = cycle.get("finish done")
                later = [s for s in steps if done is not None and s >= done]
                if later:
                    cycle["next step"] = later[0]
                cycle["next run start"] = nxt["run start"]
                for a, b, label in self.STAGES + self.SPLIT:
                    if a in cycle and b in cycle:
                        out[label].append((cycle[b] - cycle[a]) * 1000)
                if "sent" in cycle and "reply" in cycle:
                    seen = "with" if "begin seen" in cycle else "without"
                    out[f"queued -> reply, cycles {seen} a console chunk"].append(
                        (cycle["reply"] - cycle["sent"]) * 1000)
                out[self.WHOLE].append((nxt["run start"] - cycle["run start"]) * 1000)
        return out


# ===================================================================== reporting


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_rounds(results: Sequence[RoundResult]) -> tuple[float, float]:
    print(f"{'round':>5} {'contender':<24} {'runs':>5} {'wall s':>7} {'runs/s':>8} "
          f"{'CPU ms/run: python':>19} {'meshcentral':>11} {'agents+sh':>10}")
    for i, r in enumerate(results):
        cpu = r.cpu_ms
        print(f"{i // 2 + 1:>5} {r.kind:<24} {r.runs:>5} {r.wall:>7.3f} {r.rate:>8.1f} "
              f"{cpu.get('python', 0):>19.2f} {cpu.get('meshcentral', 0):>11.2f} "
              f"{cpu.get('agents+shells', 0):>10.2f}")
    bare = [r.rate for r in results if r.kind == "bare"]
    other = [r.rate for r in results if r.kind != "bare"]
    return median(bare), median(other)


def print_summary(name: str, bare: float, ours: float) -> float:
    ratio = ours / bare
    met = "MET" if ratio >= TARGET else "NOT MET"
    print(f"medians: bare {bare:.1f} runs/s, {name} {ours:.1f} runs/s, "
          f"ratio {ratio:.2f} (target >= {TARGET}): {met}")
    return ratio


async def ab_rounds(lab: Any, nodes: Sequence[str], per_agent: int, rounds: int,
                    folder: Path, variant: Variant = Variant()) -> list[RoundResult]:
    results: list[RoundResult] = []
    for _ in range(rounds):
        results.append(await bare_round(lab, nodes, per_agent))
        results.append(await gr_round(lab, nodes, per_agent, folder, variant))
        bad = {k: v for k, v in results[-1].states.items() if k != "succeeded"}
        if bad:
            print(f"  warning: {variant.name} round ended with {bad}")
    return results


async def breakdown(lab: Any, nodes: Sequence[str], per_agent: int, rounds: int,
                    folder: Path, variant: Variant) -> None:
    """Instrumented rounds of ``variant`` (alternated with bare ones): where each run's
    time goes on its device's command slot, the store calls, the CPU per run."""
    print(f"\n== diagnosis: instrumented rounds of {variant.name} ==")
    probes: list[Probe] = []
    results: list[RoundResult] = []
    bares: list[RoundResult] = []
    for _ in range(rounds):
        bares.append(await bare_round(lab, nodes, per_agent))
        probe = Probe()
        results.append(await gr_round(lab, nodes, per_agent, folder, variant, probe=probe))
        probes.append(probe)
    runs = sum(r.runs for r in results)
    wall = sum(r.wall for r in results)
    bare_calls = [c for r in bares for c in r.call_ms]
    print(f"instrumented: {runs / wall:.1f} runs/s (per device: one run every "
          f"{wall / (runs / len(nodes)) * 1000:.1f} ms); bare loop: "
          f"{median([r.rate for r in bares]):.1f} runs/s, per call (send -> reply, one "
          f"device) median {median(bare_calls):.2f} ms")
    stages: dict[str, list[float]] = defaultdict(list)
    for p in probes:
        for label, values in p.timeline().items():
            stages[label] += values
    whole = stages.get(Probe.WHOLE, [])
    print(f"per run, on one device's command slot (median / mean ms over {len(whole)} "
          f"cycles):")
    total_mean = 0.0
    for _, _, label in Probe.STAGES:
        values = stages.get(label, [])
        mean = statistics.fmean(values) if values else 0.0
        total_mean += mean
        print(f"  {median(values):7.2f} / {mean:7.2f}  {label}")
    print(f"  {median(whole):7.2f} / {statistics.fmean(whole) if whole else 0:7.2f}"
          f"  whole cycle (sum of the means above: {total_mean:.2f})")
    extra = [label for _, _, label in Probe.SPLIT] + sorted(
        k for k in stages if k.startswith("queued -> reply, cycles"))
    for label in extra:
        values = stages.get(label, [])
        print(f"  {median(values):7.2f} / {statistics.fmean(values) if values else 0:7.2f}"
              f"  {label} ({len(values)} cycles)")
    print("store calls per run (calls/run, mean ms per call, p95):")
    merged: dict[str, list[float]] = defaultdict(list)
    for p in probes:
        for name, values in p.store_calls.items():
            merged[name] += values
    for name, values in sorted(merged.items(), key=lambda kv: -sum(kv[1])):
        ordered = sorted(values)
        print(f"  {name:<16} {len(values) / runs:5.2f}/run  {statistics.fmean(values) * 1000:6.2f}"
              f" ms  (p95 {ordered[max(0, round(0.95 * len(ordered)) - 1)] * 1000:.2f})")
    if any(p.commits for p in probes):
        print(f"  SQLite commits (incl. set-up): {sum(p.commits for p in probes) / runs:.2f}/run")
    steps = sum(len(p.steps) for p in probes)
    wakes = sum(len(p.wakes) for p in probes)
    print(f"loop passes: {steps / runs:.2f}/run; wake-ups: {wakes / runs:.2f}/run; the "
          f"benchmark's counts() checks: {sum(r.checks for r in results) / runs:.2f}/run")
    handled: Counter[str] = Counter()
    for p in probes:
        handled.update(p.handled)
    print("messages handled by the executor per run: "
          + ", ".join(f"{k} {v / runs:.2f}" for k, v in handled.most_common())
          + f"; executor._handle: {sum(p.handle_seconds for p in probes) * 1000 / runs:.3f}"
          " ms/run")
    sizes = [b for p in probes for b in p.sent_bytes]
    print(f"bytes sent per dispatch: {median(sizes):.0f} (bare loop: "
          f"{len(json.dumps(_bare_message(nodes[0])).encode())})")
    threads: dict[str, list[float]] = defaultdict(list)
    for p in probes:
        for k, v in p.threads.items():
            threads[k].append(v)
    print("CPU ms per run by thread of this process: "
          + ", ".join(f"{k} {median(v):.2f}" for k, v in sorted(threads.items())
                      if median(v) >= 0.005))
    keys = bares[0].cpu_ms.keys()
    print("CPU ms per run by process, bare -> this: " + ", ".join(
        f"{k} {median([r.cpu_ms[k] for r in bares]):.2f} -> "
        f"{median([r.cpu_ms[k] for r in results]):.2f}" for k in keys))


VARIANTS = (
    Variant(name="coalesce=0", coalesce=0.0),
    Variant(name="synchronous=NORMAL", store="sqlite-normal"),
    Variant(name="InMemoryStore", store="memory"),
    Variant(name="minimal wrapper", wrapper=wrap_minimal),
    Variant(name="minimal wrapper, coalesce=0", coalesce=0.0, wrapper=wrap_minimal),
    Variant(name="minimal wrapper, InMemoryStore", store="memory", wrapper=wrap_minimal),
    Variant(name="minimal wrapper, coalesce=0, NORMAL", coalesce=0.0,
            store="sqlite-normal", wrapper=wrap_minimal),
    Variant(name="minimal wrapper, coalesce=0, memory", coalesce=0.0, store="memory",
            wrapper=wrap_minimal),
)
"""What --diagnose tries: each changes one thing (or several) for the round only."""


async def diagnose(lab: Any, nodes: Sequence[str], per_agent: int, rounds: int,
                   folder: Path, profile: bool) -> None:
    await breakdown(lab, nodes, per_agent, rounds, folder, Variant())
    await breakdown(lab, nodes, per_agent, rounds, folder, VARIANTS[4])
    if profile:
        profiler = cProfile.Profile()
        await gr_round(lab, nodes, per_agent, folder, profiler=profiler)
        for key in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(30)
            print(f"\ncProfile of one GhostRunner round (event loop thread), by {key}:")
            print("\n".join(text.getvalue().splitlines()[6:40]))
    print(f"\n== variants (each: {rounds} rounds alternated with bare; medians) ==")
    for variant in VARIANTS:
        res = await ab_rounds(lab, nodes, per_agent, rounds, folder, variant)
        bare_rate = median([r.rate for r in res if r.kind == "bare"])
        ours = median([r.rate for r in res if r.kind != "bare"])
        print(f"  {variant.name:<36} bare {bare_rate:6.1f}  this {ours:6.1f} runs/s  "
              f"ratio {ours / bare_rate:.2f}  per device {len(nodes) / ours * 1000:5.1f} ms/run",
              flush=True)


def _bare_message(node: str) -> dict[str, Any]:
    return {"action": "runcommands", "nodeids": [node], "type": 0, "cmds": "true",
            "runAsUser": 0, "reply": True, "tag": "bench_" + "0" * 20,
            "responseid": "bench_" + "0" * 20}


async def lab_main(args: argparse.Namespace) -> int:
    from ghostrunner.lab import MeshLab

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="gr-bench-disp-") as tmp:
        folder = Path(tmp)
        lab = MeshLab(folder / "lab")
        try:
            await asyncio.to_thread(lab.start)
            agents = [await asyncio.to_thread(lab.add_agent, f"bench-disp-{i}")
                      for i in range(args.agents)]
            await asyncio.to_thread(lab.start_agents, agents)
            await asyncio.to_thread(lab.wait_connected, agents)
            nodes = [a.node_id for a in agents]
            # warm-up (not counted): agents' and server's first commands, imports
            await bare_round(lab, nodes, 2)
            await gr_round(lab, nodes, 2, folder)
            print(f"lab: MeshCentral {lab.version}, {len(nodes)} agents; {args.per_agent} "
                  f"runs of `true` per agent per round; {args.rounds} rounds of bare then "
                  f"GhostRunner")
            results = await ab_rounds(lab, nodes, args.per_agent, args.rounds, folder)
            bare, ours = print_rounds(results)
            print_summary("GhostRunner", bare, ours)
            if args.diagnose:
                await diagnose(lab, nodes, args.per_agent, args.rounds, folder, args.profile)
        finally:
            await asyncio.to_thread(lab.close)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5,
                        help="bare/GhostRunner round pairs (default 5)")
    parser.add_argument("--per-agent", type=int, default=30,
                        help="runs per agent per round (default 30)")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--diagnose", action="store_true",
                        help="also: instrumented rounds, per-stage breakdown, variants")
    parser.add_argument("--profile", action="store_true",
                        help="with --diagnose: cProfile one GhostRunner round")
    parser.add_argument("--wrapper-only", action="store_true",
                        help="only the sh wrapper's per-run cost, without MeshCentral")
    parser.add_argument("--runs", type=int, default=200,
                        help="with --wrapper-only: runs of each (default 200)")
    parser.add_argument("--wrapper", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="with --wrapper-only: measure this wrapper function "
                             "(repeatable; default: GhostRunner's wrap_command)")
    args = parser.parse_args()
    if args.wrapper_only:
        wrappers = [load_wrapper(s) for s in args.wrapper] or [wrap_command]
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
              f"/bin/sh -> {os.path.realpath('/bin/sh')}")
        print_wrapper_costs(measure_wrappers(wrappers, args.runs))
        return 0
    return asyncio.run(lab_main(args))


if __name__ == "__main__":
    raise SystemExit(main())

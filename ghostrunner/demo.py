"""The main job, end to end on this machine: ``python -m ghostrunner.demo``.

1. Brings up a real MeshCentral on 127.0.0.1 (installed from npm into a cache on first
   use) and enrols a real agent, "kitchen-pi", then switches it off.
2. Starts GhostRunner (SQLite store, MeshCentral executor) and queues two commands for
   the device while it is offline.
3. Switches the device on, and shows each run going from pending to its outcome, with
   output and exit code, as it happens.

Everything it starts is stopped again at the end; ``--keep`` leaves the lab directory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ._loop import LoopSettings
from ._runner import GhostRunner
from ._types import Run, RunState, Task
from .lab import MeshLab
from .sqlite import SQLiteStore

_TTY = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
_T0 = time.monotonic()

_COLOURS = {
    RunState.PENDING: "33",
    RunState.DISPATCHED: "36",
    RunState.SUCCEEDED: "32",
    RunState.FAILED: "31",
    RunState.TIMED_OUT: "31",
    RunState.LOST: "35",
    RunState.EXPIRED: "90",
    RunState.CANCELLED: "90",
}


def _c(code: str, text: str) -> str:
    return f"\033[{code}m{text}\033[0m" if _TTY else text


def _stamp() -> str:
    return _c("90", f"[{time.monotonic() - _T0:6.2f}s]")


def step(text: str) -> None:
    print(f"{_stamp()} {_c('1', '==>')} {text}", flush=True)


def info(text: str) -> None:
    print(f"{_stamp()}     {text}", flush=True)


def state(run_state: RunState) -> str:
    return _c(_COLOURS.get(run_state, "0"), f"{run_state.value:<10}")


def show_run(label: str, run: Run) -> None:
    extra = ""
    if run.exit_code is not None:
        extra += f" exit code {run.exit_code}"
    if run.attempts:
        extra += f", attempt {run.attempts}"
    if run.error and not run.terminal:
        extra += _c("90", f" ({run.error})")
    info(f"{label:<14} {state(run.state)}{extra}")


async def watch(gr: GhostRunner, tasks: Sequence[Task], timeout: float) -> list[Run]:
    """Print every state change of the tasks' runs until all are terminal."""
    seen: dict[tuple[str, str], RunState] = {
        (r.task_id, r.node_id): r.state for t in tasks for r in await gr.runs(t.id)
    }
    names = {t.id: t.name for t in tasks}
    runs: list[Run] = []

    async def changed() -> bool:
        # re-checked by GhostRunner after each change it makes: no polling
        nonlocal runs
        runs = [r for t in tasks for r in await gr.runs(t.id)]
        fresh = [r for r in runs if seen[(r.task_id, r.node_id)] is not r.state]
        for run in fresh:
            seen[(run.task_id, run.node_id)] = run.state
            show_run(names[run.task_id], run)
        return all(r.terminal for r in runs)

    await gr.wait_until(changed, timeout=timeout)
    return runs


async def main_async(root: Path) -> int:
    from .meshcentral import MeshCentralExecutor

    step("Starting a real MeshCentral on 127.0.0.1 (installed from npm on first use)")
    lab = MeshLab(root / "lab", log=lambda m: info(_c("90", m)))
    try:
        await asyncio.to_thread(lab.start)
        info(f"MeshCentral {lab.version} is up at {lab.https_url}")

        step('Enrolling a device, "kitchen-pi" (a real MeshCentral agent), then switching it off')
        agent = await asyncio.to_thread(lab.add_agent, "kitchen-pi")
        await asyncio.to_thread(agent.start, wait=True)
        node_id = agent.node_id
        await asyncio.to_thread(agent.stop)
        await asyncio.to_thread(lab.wait_connected, [agent], connected=False)
        info(f"kitchen-pi is {_c('33', 'offline')}; its node id is {node_id}")

        step("Starting GhostRunner: SQLite store + MeshCentral executor")
        executor = MeshCentralExecutor(
            lab.url,
            user=lab.admin_user,
            password=lab.admin_password,
            ignore_ssl=True,  # the lab's certificate is self-signed
            group_id=lab.group_id,
        )
        store = SQLiteStore(root / "ghostrunner.db")
        settings = LoopSettings(resync_interval=2.0)
        async with GhostRunner(store=store, executor=executor, settings=settings) as gr:
            await executor.wait_connected(timeout=60)
            online = [d.name for d in gr.devices().values() if d.online]
            info(f"connected; devices online: {online or 'none'}")

            step("Queueing two commands for kitchen-pi while it is offline")
            hello = await gr.submit(
                Task(
                    name="say-hello",
                    command='echo "hello from $(hostname), kernel $(uname -r)"; id -un',
                    targets=[node_id],
                    timeout=30,
                )
            )
            check = await gr.submit(
                Task(
                    name="disk-check",
                    command="df -P / | tail -n 1; echo 'pretend the disk is full' >&2; exit 3",
                    targets=[node_id],
                    timeout=30,
                )
            )
            for task in (hello, check):
                info(f"{task.name:<14} queued as task {task.id}")
            await asyncio.sleep(1.0)  # let the loop show it really waits: nothing starts
            for task in (hello, check):
                (run,) = await gr.runs(task.id)
                show_run(task.name, run)

            step("kitchen-pi comes online (starting its agent)")
            switched_on = time.monotonic()
            await asyncio.to_thread(agent.start, wait=False)
            runs = await watch(gr, [hello, check], timeout=90)
            took = time.monotonic() - switched_on

            step(f"Done {took:.1f}s after the device came online. What was recorded:")
            for task, run in zip((hello, check), runs, strict=True):
                assert run.started_at is not None and run.finished_at is not None
                secs = (run.finished_at - run.started_at).total_seconds()
                info(f"{_c('1', task.name)}: {state(run.state)} exit code {run.exit_code}, "
                     f"{run.attempts} attempt(s), ran {secs:.2f}s")
                for line in run.output.rstrip("\n").splitlines() or ["(no output)"]:
                    info(f"    │ {line}")
            ok = runs[0].state is RunState.SUCCEEDED and runs[1].exit_code == 3
            step("Stopping GhostRunner, the agent and MeshCentral")
        return 0 if ok else 1
    finally:
        await asyncio.to_thread(lab.close)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ghostrunner.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the lab directory")
    parser.add_argument("--verbose", action="store_true", help="show GhostRunner's logs")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    root = Path(tempfile.mkdtemp(prefix="ghostrunner-demo-"))
    try:
        code = asyncio.run(main_async(root))
    except KeyboardInterrupt:
        code = 130
    finally:
        if args.keep:
            print(f"lab kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(_c("32", "demo finished: OK") if code == 0 else _c("31", "demo finished: FAILED"))
    return code


if __name__ == "__main__":
    raise SystemExit(main())

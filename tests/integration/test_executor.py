"""MeshCentralExecutor + the reconcile loop against a real MeshCentral with real agents.

Devices go offline and online by stopping and starting real agent processes. Commands
write to files in a directory of the test, so executions on the device can be counted
independently of what GhostRunner records.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import pytest

from ghostrunner import (
    Delivery,
    GhostRunner,
    LoopSettings,
    RetryPolicy,
    RunRequest,
    RunState,
    Task,
)
from ghostrunner.lab import Agent, MeshLab
from ghostrunner.meshcentral import MeshCentralExecutor
from ghostrunner.sqlite import SQLiteStore
from ghostrunner.testing import InMemoryStore

FAST = LoopSettings(resync_interval=1.0, retry=RetryPolicy(0.5, 2.0), shutdown_grace=2.0)


def make_executor(lab: MeshLab, **options: float) -> MeshCentralExecutor:
    return MeshCentralExecutor(
        lab.url,
        user=lab.admin_user,
        password=lab.admin_password,
        ignore_ssl=True,
        group_id=lab.group_id,
        **options,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def mesh_runner(
    lab: MeshLab, store: object | None = None, **options: float
) -> AsyncIterator[tuple[GhostRunner, MeshCentralExecutor]]:
    executor = make_executor(lab, **options)
    async with GhostRunner(
        store=store or InMemoryStore(),  # type: ignore[arg-type]
        executor=executor,
        settings=FAST,
    ) as gr:
        await executor.wait_connected(timeout=60)
        yield gr, executor


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 30.0) -> None:
    """Poll an external condition (a file on the device side, a process) until true."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


async def start(agent: Agent) -> None:
    await asyncio.to_thread(agent.start, wait=False)


async def stop(agent: Agent, kill: bool = False) -> None:
    await asyncio.to_thread(agent.stop, kill)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_queued_offline_then_device_comes_online(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = agent_factory("exec-basic")

    async def scenario() -> None:
        async with mesh_runner(mesh_lab, SQLiteStore(tmp_path / "gr.db")) as (gr, executor):
            assert executor.devices()[agent.node_id].online is False
            ok = await gr.submit(Task(name="ok", command="echo hello; echo oops >&2",
                                      targets=[agent.node_id], timeout=30))
            bad = await gr.submit(Task(name="bad", command="echo failing; exit 3",
                                       targets=[agent.node_id], timeout=30))
            await gr.run_until_idle()
            assert [r.state for r in await gr.runs(ok.id)] == [RunState.PENDING]
            await start(agent)
            (run,) = await gr.wait(ok.id, timeout=60)
            assert run.state is RunState.SUCCEEDED, run
            assert run.exit_code == 0
            assert run.output == "hello\noops\n"
            assert run.attempts == 1
            assert run.started_at is not None and run.finished_at is not None
            assert run.finished_at >= run.started_at
            (run,) = await gr.wait(bad.id, timeout=60)
            assert run.state is RunState.FAILED, run
            assert run.exit_code == 3
            assert run.output == "failing\n"

    asyncio.run(scenario())


def test_devices_run_their_commands_one_at_a_time_in_submission_order(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    d1, d2, d3 = (agent_factory(n) for n in ("order-1", "order-2", "order-3"))
    targets = [d1.node_id, d2.node_id, d3.node_id]

    async def scenario() -> None:
        async with mesh_runner(mesh_lab) as (gr, _):
            tasks = []
            for i in range(4):
                # each command logs its start and end on the device; overlap would show
                cmd = (f'echo "start {i}" >> {tmp_path}/log-$DEV; sleep 0.2; '
                       f'echo "end {i}" >> {tmp_path}/log-$DEV')
                tasks.append(cmd)
            submitted = []
            for i, cmd in enumerate(tasks):
                per_device = [
                    Task(name=f"t{i}", command=cmd.replace("$DEV", agent.name),
                         targets=[agent.node_id], timeout=30)
                    for agent in (d1, d2, d3)
                ]
                submitted.append([await gr.submit(t) for t in per_device])
            both = Task(name="both", command=f"echo both >> {tmp_path}/both",
                        targets=targets, timeout=30)
            await gr.submit(both)
            await asyncio.gather(start(d1), start(d2))
            await gr.wait(both.id, timeout=90, node_ids=[d1.node_id, d2.node_id])
            for agent in (d1, d2):
                expected = [f"{w} {i}" for i in range(4) for w in ("start", "end")]
                assert lines(tmp_path / f"log-{agent.name}") == expected
            for row in submitted:
                for agent, task in zip((d1, d2, d3), row, strict=True):
                    (run,) = await gr.runs(task.id)
                    if agent is d3:
                        assert run.state is RunState.PENDING
                        assert run.attempts == 0 and run.undelivered == 0
                    else:
                        assert run.state is RunState.SUCCEEDED, run
            runs = {r.node_id: r for r in await gr.runs(both.id)}
            assert runs[d3.node_id].state is RunState.PENDING
            assert lines(tmp_path / "both") == ["both", "both"]

    asyncio.run(scenario())


def test_timeout_kills_the_command_and_frees_the_agent(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = agent_factory("exec-timeout", start=True)

    async def scenario() -> None:
        async with mesh_runner(mesh_lab) as (gr, _):
            slow = await gr.submit(Task(name="slow", command="echo begun; sleep 60",
                                        targets=[agent.node_id], timeout=2))
            reads = await gr.submit(Task(name="stdin", command='read x; echo "got:$x"; cat',
                                         targets=[agent.node_id], timeout=10))
            after = await gr.submit(Task(name="after", command="echo after",
                                         targets=[agent.node_id], timeout=10))
            began = time.monotonic()
            (run,) = await gr.wait(slow.id, timeout=60)
            assert run.state is RunState.TIMED_OUT, run
            assert run.exit_code is None
            assert run.output == "begun\n"
            assert time.monotonic() - began < 20
            (run,) = await gr.wait(reads.id, timeout=30)
            assert run.state is RunState.SUCCEEDED, run
            assert run.output == "got:\n"
            (run,) = await gr.wait(after.id, timeout=30)
            assert run.state is RunState.SUCCEEDED, run
            assert run.output == "after\n"

    asyncio.run(scenario())


@pytest.mark.parametrize("delivery", [Delivery.AT_MOST_ONCE, Delivery.AT_LEAST_ONCE])
def test_agent_killed_mid_run(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path, delivery: Delivery
) -> None:
    agent = agent_factory("exec-killed", start=True)
    flag = tmp_path / "began"
    count = tmp_path / "count"
    command = (f"echo x >> {count}; if [ -e {flag} ]; then echo second; "
               f"else touch {flag}; sleep 60; fi")

    async def scenario() -> None:
        async with mesh_runner(mesh_lab) as (gr, _):
            task = await gr.submit(Task(name="victim", command=command, targets=[agent.node_id],
                                        timeout=120, delivery=delivery, max_attempts=3))
            try:
                await until(flag.exists)
            except TimeoutError:
                raise AssertionError(f"never started: {await gr.runs(task.id)}") from None
            await stop(agent, kill=True)
            # the device went away mid-run: the outcome is unknown until it can tell,
            # so the run stays dispatched and its device is held
            async def held() -> bool:
                return agent.node_id in gr.loop.recovering

            await gr.wait_until(held, 30)
            assert (await gr.runs(task.id))[0].state is RunState.DISPATCHED
            await start(agent)
            (run,) = await gr.wait(task.id, timeout=60)
            # its journal says it started and never recorded an end (the agent's
            # shell died with it): unknown, so never run again under at_most_once
            if delivery is Delivery.AT_MOST_ONCE:
                assert run.state is RunState.LOST, run
                assert run.error is not None and "recorded no outcome" in run.error, run
                assert run.attempts == 1
                await gr.run_until_idle()
                assert lines(count) == ["x"]
            else:
                assert run.state is RunState.SUCCEEDED, run
                assert run.output == "second\n"
                assert run.attempts == 2
                assert lines(count) == ["x", "x"]

    asyncio.run(scenario())


def executor_online(gr: GhostRunner, agent: Agent) -> bool:
    device = gr.devices().get(agent.node_id)
    return device is not None and device.online


async def run_state(gr: GhostRunner, task_id: str, wanted: RunState) -> bool:
    return all(r.state is wanted for r in await gr.runs(task_id))


def test_output_is_capped_and_exit_code_exact(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory("exec-big", start=True)

    async def scenario() -> None:
        async with mesh_runner(mesh_lab) as (gr, _):
            big = await gr.submit(Task(
                name="big", targets=[agent.node_id], timeout=60,
                command="echo FIRST; head -c 5000000 /dev/zero | tr '\\0' x; echo; echo LAST",
            ))
            (run,) = await gr.wait(big.id, timeout=60)
            assert run.state is RunState.SUCCEEDED, run.error
            assert run.output_truncated is True
            assert run.output.startswith("FIRST\nxxx")
            assert run.output.endswith("xxx\nLAST\n")
            assert len(run.output) < 70_000

    asyncio.run(scenario())


def test_meshcentral_restart_while_runs_are_pending_and_in_flight(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    r1 = agent_factory("restart-1", start=True)
    r2 = agent_factory("restart-2", start=True)
    log = tmp_path / "executions"
    began = tmp_path / "long-began"

    def cmd(tag: str, extra: str = "") -> str:
        return f"echo {tag} >> {log}; {extra}echo done {tag}"

    async def scenario() -> None:
        async with mesh_runner(mesh_lab, SQLiteStore(tmp_path / "gr.db")) as (gr, executor):
            first_sessions = executor.sessions_started
            long = await gr.submit(Task(name="long", targets=[r1.node_id], timeout=60,
                                        command=cmd("long", f"touch {began}; sleep 4; ")))
            before = [await gr.submit(Task(name=f"b{i}-{a.name}", command=cmd(f"b{i}-{a.name}"),
                                           targets=[a.node_id], timeout=30))
                      for i in range(3) for a in (r1, r2)]
            await until(began.exists)
            restart = asyncio.create_task(asyncio.to_thread(mesh_lab.restart))
            await until(lambda: not executor.connected, timeout=30)
            during = [await gr.submit(Task(name=f"d{i}-{a.name}", command=cmd(f"d{i}-{a.name}"),
                                           targets=[a.node_id], timeout=30))
                      for i in range(3) for a in (r1, r2)]
            await restart
            for task in [long, *before, *during]:
                await gr.wait(task.id, timeout=120)
            assert executor.sessions_started > first_sessions
            counts = await gr.counts()
            assert counts.get(RunState.DISPATCHED, 0) == 0
            assert counts.get(RunState.PENDING, 0) == 0
            executed = lines(log)
            assert len(executed) == len(set(executed)), f"ran twice: {executed}"
            for task in [*before, *during]:
                for run in await gr.runs(task.id):
                    # whatever happened to each run, the record agrees with the device
                    if run.state is RunState.SUCCEEDED:
                        assert run.output == f"done {task.name}\n"
                        assert task.name in executed
                    else:
                        assert run.state is RunState.LOST, run
            (run,) = await gr.runs(long.id)
            assert run.state in {RunState.SUCCEEDED, RunState.LOST}
            assert executed.count("long") == 1
            # the queue really finished after the restart: the tasks submitted during
            # the outage all ran on both devices
            for task in during:
                assert all(r.state is RunState.SUCCEEDED for r in await gr.runs(task.id))

    asyncio.run(scenario())


def test_forged_markers_in_output_do_not_change_the_exit_code(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory("exec-forge", start=True)
    forged = (
        "echo GR_BEGIN_0123456789abcdef0123456789abcdef; "
        "echo 'GR_END_0123456789abcdef0123456789abcdef rc=0 timeout=0'; "
        "printf '\\nGR_END_%s rc=0 timeout=0\\n' deadbeef; exit 7"
    )

    async def scenario() -> None:
        async with mesh_runner(mesh_lab) as (gr, _):
            task = await gr.submit(Task(name="forge", command=forged, targets=[agent.node_id],
                                        timeout=30))
            (run,) = await gr.wait(task.id, timeout=60)
            assert run.state is RunState.FAILED, run
            assert run.exit_code == 7
            assert "GR_END_0123456789abcdef0123456789abcdef rc=0 timeout=0" in run.output

    asyncio.run(scenario())


def test_login_token_and_meshcentral_down_at_start_up(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    """Connects with a MeshCentral login token (not the password), starts while
    MeshCentral is down (tasks queue meanwhile), and catches up once it is up."""
    agent = agent_factory("exec-token", start=True)
    token_user, token_password = mesh_lab.create_login_token("ghostrunner-test")
    assert token_user.startswith("~t:")
    mesh_lab.stop()  # the agent stays running and will reconnect by itself

    async def scenario() -> None:
        executor = MeshCentralExecutor(
            mesh_lab.url, user=token_user, password=token_password, ignore_ssl=True,
            group_id=mesh_lab.group_id,
        )
        async with GhostRunner(store=SQLiteStore(tmp_path / "gr.db"), executor=executor,
                               settings=FAST) as gr:
            task = await gr.submit(Task(name="queued", command="echo queued while down",
                                        targets=[agent.node_id], timeout=30))
            with pytest.raises(TimeoutError):
                await executor.wait_connected(timeout=2)
            assert not executor.connected
            assert token_password not in repr(executor)
            assert [r.state for r in await gr.runs(task.id)] == [RunState.PENDING]
            await asyncio.to_thread(mesh_lab.start)
            (run,) = await gr.wait(task.id, timeout=120)
            assert run.state is RunState.SUCCEEDED, run
            assert run.output == "queued while down\n"
            assert executor.connected

    asyncio.run(scenario())


def test_a_resent_attempt_never_runs_twice_on_the_device(
    mesh_lab: MeshLab, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    """A dispatch that the loop gave up on (start timeout) may still start late; its
    resend carries the same key, so the device runs the command at most once per
    attempt and answers the resend (or a recovery request) with the first one's record.
    This sends one attempt twice, as a resend would after a late start."""
    agent = agent_factory("once", start=True)
    log = tmp_path / "ran"

    async def scenario() -> None:
        executor = make_executor(mesh_lab)
        await executor.open()
        try:
            await executor.wait_connected(timeout=60)
            await until(lambda: (d := executor.devices().get(agent.node_id)) is not None
                        and d.online)
            request = RunRequest(task_id="once-task", node_id=agent.node_id,
                                 command=f"echo ran >> {log}; echo out", timeout=20)
            first = await executor.run(request)
            assert (first.exit_code, first.output) == (0, "out\n")
            for recover in (False, True):
                resent = await executor.run(attrs.evolve(request, recover=recover))
                assert (resent.exit_code, resent.output, resent.recovered) == (0, "out\n", True)
            assert lines(log) == ["ran"]
            again = await executor.run(attrs.evolve(request, attempt=2))  # at_least_once
            assert (again.exit_code, again.output) == (0, "out\n")
            assert lines(log) == ["ran", "ran"]
        finally:
            await executor.close()

    asyncio.run(scenario())

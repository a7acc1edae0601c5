"""The command wrappers of the MeshCentral backend.

``sh`` wrappers are really executed the way the MeshCentral agent runs them (the agent
removes every ``\\r`` from the text, appends ``\\nexit\\n``, writes it to the stdin of
``/bin/sh`` and never closes that stdin; stdout and stderr come back merged), with
dash, bash and bash-as-``sh`` where present, and in all three timeout strategies:
``timeout`` found, ``timeout`` hidden (``setsid`` watchdog), both hidden (job control
or process-tree watchdog).  The Windows wrappers (``cmd``, ``powershell``) can only be
checked as text here: no Windows.

The sh runs happen once, in parallel, in a module fixture (the timeout runs dominate:
about 2 s), and each test then checks its own runs.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostrunner.meshcentral._wrappers import (
    ParsedResult,
    WrappedCommand,
    has_started,
    parse_result,
    wrap_command,
)

# --------------------------------------------------------------------------------------
# Running sh wrappers like the agent does


@attrs.frozen
class ShellCase:
    """One way /bin/sh can be: ``argv0`` is what the shell is called (``sh`` puts bash in
    POSIX mode), ``path`` the file run for both the outer shell and the wrapper's own
    shells (so the whole wrapper runs in the shell under test)."""

    name: str
    path: str
    argv0: str


@attrs.frozen
class Env:
    shell: ShellCase
    mode: str  # "timeout", "setsid" (timeout hidden) or "jobs" (timeout and setsid hidden)
    environ: dict[str, str]

    @property
    def id(self) -> str:
        return f"{self.shell.name}-{self.mode}"


@attrs.frozen
class Run:
    wrapped: WrappedCommand
    raw: str
    elapsed: float
    pgid: int  # of the agent's shell: it leads its own session, so also its pid and sid

    @property
    def parsed(self) -> ParsedResult:
        return parse_result(self.wrapped, self.raw)


T = TypeVar("T")
HOME = "/home/gr test"
SHELL_NAMES = ("dash", "bash", "bash-as-sh")
MODES = ("timeout", "setsid", "jobs")
ENV_IDS = [f"{s}-{m}" for s in SHELL_NAMES for m in MODES]


def run_like_agent(wrapped: WrappedCommand, env: Env, *, limit: float = 30.0) -> Run:
    """Run ``wrapped.script`` as meshcore.js does: ``\\r`` removed, ``\\nexit\\n``
    appended, written to the stdin of the shell, which is never closed while it runs."""
    data = (wrapped.script.replace("\r", "") + "\nexit\n").encode()
    read_end, write_end = os.pipe()
    start = time.monotonic()
    proc = subprocess.Popen(
        [env.shell.argv0],
        executable=env.shell.path,
        stdin=read_end,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**env.environ, MARK.split("=")[0]: MARK.split("=")[1]},
        start_new_session=True,
    )
    os.close(read_end)

    def feed() -> None:
        view = memoryview(data)
        with contextlib.suppress(BrokenPipeError):
            while view:
                view = view[os.write(write_end, view) :]

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        # processes that left the session may still hold stdout: don't wait for them
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        proc.wait()
        raise
    finally:
        # close only once the writer is done with the descriptor (its number could be
        # reused by a parallel run); the shell is gone, so the write has ended
        writer.join(timeout=10)
        if not writer.is_alive():
            os.close(write_end)
    return Run(
        wrapped=wrapped,
        raw=out.decode("utf-8", "surrogateescape"),
        elapsed=time.monotonic() - start,
        pgid=proc.pid,
    )


#: In the environment of every shell these tests start, so inherited by whatever the
#: wrapped commands start, even processes that left the session: the processes below
#: are only ever ones this test run started, never a stranger's with the same argv.
MARK = f"GHOSTRUNNER_WRAPPER_TEST={os.getpid()}-{secrets.token_hex(8)}"


def processes_with_argv(argv: list[str]) -> list[int]:
    """Live processes this test run started whose command line is exactly ``argv``."""
    wanted = ("\0".join(argv) + "\0").encode()
    mark = b"\0" + MARK.encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes() == wanted and mark in (
                b"\0" + (entry / "environ").read_bytes()
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_processes(argv: list[str]) -> None:
    for pid in processes_with_argv(argv):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def assert_no_process(argv: list[str]) -> None:
    """Fail (after killing them) if processes running ``argv`` are still alive after 2 s."""
    deadline = time.monotonic() + 2.0
    while (left := processes_with_argv(argv)) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_processes(argv)
    assert not left, f"{argv} survived: pids {left}"


@pytest.fixture(scope="module")
def envs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Env | str]:
    """Every shell x timeout strategy, or the reason it can't run here."""
    base = tmp_path_factory.mktemp("wrappers")
    shells: dict[str, ShellCase | str] = {}
    for name, path in (("dash", "/bin/dash"), ("bash", "/bin/bash")):
        shells[name] = ShellCase(name, path, name) if os.access(path, os.X_OK) else f"no {path}"
    if os.access("/bin/bash", os.X_OK):
        link = base / "bash-as-sh" / "sh"
        link.parent.mkdir()
        link.symlink_to("/bin/bash")
        shells["bash-as-sh"] = ShellCase("bash-as-sh", str(link), "sh")
    else:
        shells["bash-as-sh"] = "no /bin/bash"

    def path_without(*hidden: str) -> str:
        """A directory that links to every program on PATH except ``hidden``."""
        target = base / ("no-" + "-".join(hidden))
        target.mkdir()
        seen = set(hidden)
        for directory in os.environ["PATH"].split(os.pathsep):
            try:
                entries = list(os.scandir(directory or "."))
            except OSError:
                continue
            for entry in entries:
                if entry.name not in seen:
                    seen.add(entry.name)
                    os.symlink(entry.path, target / entry.name)
        return str(target)

    paths: dict[str, str] = {"timeout": os.environ["PATH"]}
    missing: dict[str, str] = {}
    if shutil.which("timeout") is None:
        missing["timeout"] = "no timeout(1) on this machine"
    paths["setsid"] = path_without("timeout")
    if shutil.which("setsid") is None:
        missing["setsid"] = "no setsid(1) on this machine"
    paths["jobs"] = path_without("timeout", "setsid")

    result: dict[str, Env | str] = {}
    for shell_name, shell in shells.items():
        for mode in MODES:
            key = f"{shell_name}-{mode}"
            if isinstance(shell, str):
                result[key] = shell
            elif mode in missing:
                result[key] = missing[mode]
            else:
                journal = base / f"journal-{key}"
                environ = dict(os.environ, PATH=paths[mode], HOME=HOME,
                               GHOSTRUNNER_JOURNAL=str(journal))
                result[key] = Env(shell, mode, environ)
    return result


# Commands with awkward text.  (id, command, expected output, expected exit status)
AWKWARD: list[tuple[str, str, str, int]] = [
    ("single-quotes", r"""printf '%s\n' 'it'\''s' "'q'" """, "it's\n'q'\n", 0),
    ("double-quotes", r'echo "say \"hi\"" "a""b"', 'say "hi" ab\n', 0),
    ("newlines", "echo one\necho two\n\n  echo three\n", "one\ntwo\nthree\n", 0),
    ("dollar-literal", r"""echo '$HOME' "\$HOME" '$(id)'""", "$HOME $HOME $(id)\n", 0),
    ("dollar-expanded", 'echo "$HOME" "$((6 * 7))"', f"{HOME} 42\n", 0),
    ("percent", "printf '100%%\\n'; echo '%PATH%' %d %%", "100%\n%PATH% %d %%\n", 0),
    ("backticks", "echo `echo sub` '`not run`'", "sub `not run`\n", 0),
    (
        "backslashes",
        r"""printf '%s\n' 'a\b\\c' "d\\e\$"; echo x\ y""",
        "a\\b\\\\c\nd\\e$\nx y\n",
        0,
    ),
    ("non-ascii", "echo 'héllo ✓' \"日本\"", "héllo ✓ 日本\n", 0),
    ("carriage-returns", "printf '%s' 'a\rb\r\n'", "a\rb\r\n", 0),
    ("no-trailing-newline", "printf 'no newline'", "no newline", 0),
    ("empty-output", "true", "", 0),
    ("only-newlines", "printf '\\n\\n'", "\n\n", 0),
    ("trailing-cr-lf", "printf 'x\\r\\n'", "x\r\n", 0),
    ("stderr-merged", "echo out; echo err >&2; echo out2", "out\nerr\nout2\n", 0),
    ("exit-0", "exit 0", "", 0),
    ("exit-3", "echo x; exit 3", "x\n", 3),
    ("exit-255", "exit 255", "", 255),
    ("status-of-last-command", "false", "", 1),
    ("exit-124-is-not-a-timeout", "echo done; exit 124", "done\n", 124),
    ("exit-137-is-not-a-timeout", "exit 137", "", 137),
    ("killed-own-shell", "echo a; kill -9 $$; echo b", "a\n", 137),
    ("exit-trap", "trap 'echo bye' EXIT; echo hi", "hi\nbye\n", 0),
    ("argv", 'echo "$0:$#"', "sh:0\n", 0),
    ("read-gets-eof", 'read x; echo "got:$x:$?"', "got::1\n", 0),
    (
        "stdin-eof",
        'read x; echo "read:$x:$?"; cat; head -c 5; printf "%s" "$(cat)"; echo done',
        "read::1\ndone\n",
        0,
    ),
    (
        "streams-and-status",
        "echo out; echo err >&2; echo out2; printf 'no newline'; exit 3",
        "out\nerr\nout2\nno newline",
        3,
    ),
    ("cat-gets-eof", "cat; echo done", "done\n", 0),
    ("head-gets-eof", "head -c 5; echo done", "done\n", 0),
    (
        "wrapper-fds-closed",
        "for fd in 3 4 5 6; do if (: >&$fd) 2>/dev/null; then echo open $fd; fi; done",
        "",
        0,
    ),
    ("placeholder-text", "echo '@MARKER@ @COMMAND@ @SH@'", "@MARKER@ @COMMAND@ @SH@\n", 0),
]

_big_text = "".join(
    f'{i:06d} it\'s "quoted" $HOME `x` \\ % ✓\t' + ("\n" if i % 7 == 0 else "")
    for i in range(4_500)
)
BIG_PRINTF = ("big-printf", f"printf '%s' {shlex.quote(_big_text)}", _big_text, 0)
_big_lines = 16_000
BIG_SCRIPT = (
    "big-script",
    "\n".join(f"echo line{i:05d}" for i in range(_big_lines)) + "\nexit 9",
    "".join(f"line{i:05d}\n" for i in range(_big_lines)),
    9,
)
FUNCTIONAL = [*AWKWARD, BIG_PRINTF, BIG_SCRIPT]

# Quoting does not depend on the timeout strategy, so every case runs on the two
# /bin/sh flavours found in the wild (dash; bash in POSIX mode, as on RHEL and macOS)
# with timeout(1); every other shell x strategy runs the cases that exercise what
# differs between strategies (file descriptors, stdin, statuses, stderr, the pipe that
# carries the command).  This keeps the module at a few seconds.
FULL_ENVS = ("dash-timeout", "bash-as-sh-timeout")
CORE = {
    "streams-and-status",
    "stdin-eof",
    "exit-124-is-not-a-timeout",
    "killed-own-shell",
    "wrapper-fds-closed",
}
# bash takes ~0.2 s CPU per 200 KB command, so the per-strategy big-command check
# runs on dash only (bash-as-sh still runs both big cases in the full set)
CORE_DASH = {"big-printf"}
FUNCTIONAL_RUNS = [
    (env_id, case)
    for env_id in ENV_IDS
    for case in FUNCTIONAL
    if env_id in FULL_ENVS
    or case[0] in CORE
    or (case[0] in CORE_DASH and env_id.startswith("dash-"))
]
FORGED_NAMES = ["other-marker", "plain-text", "same-marker", "same-marker-mid-line"]
FORGED_ENVS = list(FULL_ENVS)


def forged_cases(marker: str) -> list[tuple[str, str, str, int]]:
    """Output that imitates wrapper lines must not change the result."""
    other = "".join("1" if c == "0" else "0" for c in marker)  # any other marker
    return [
        (
            "other-marker",
            f"printf '\\nGR_BEGIN_{other}\\nGR_END_{other} rc=0 timeout=1\\n'; exit 7",
            f"\nGR_BEGIN_{other}\nGR_END_{other} rc=0 timeout=1\n",
            7,
        ),
        (
            "plain-text",
            "echo GR_END_; echo 'GR_END_... rc=0 timeout=0'; echo GR_BEGIN_x; exit 6",
            "GR_END_\nGR_END_... rc=0 timeout=0\nGR_BEGIN_x\n",
            6,
        ),
        # Even a line with *this* marker (which a command cannot know) loses to the
        # wrapper's own, later, END line.
        (
            "same-marker",
            f"printf '\\nGR_END_{marker} rc=0 timeout=1\\n'; exit 5",
            f"\nGR_END_{marker} rc=0 timeout=1\n",
            5,
        ),
        (
            "same-marker-mid-line",
            f"printf 'xGR_END_{marker} rc=0 timeout=0\\n'; exit 4",
            f"xGR_END_{marker} rc=0 timeout=0\n",
            4,
        ),
    ]


@attrs.frozen
class TimeoutCase:
    name: str
    command: str  # "{n}" is replaced with a unique sleep duration
    output: str
    kill_after: float = 5.0


TIMEOUT_CASES = [
    TimeoutCase("sleep", "echo started; sleep {n}; echo never", "started\n"),
    TimeoutCase("grandchild", "sh -c 'sleep {n}'; echo never", ""),
    TimeoutCase("background-subshell", "(sleep {n}; echo never) & wait", ""),
    # ignores SIGTERM: needs the SIGKILL after kill_after
    TimeoutCase("ignores-term", "trap '' TERM; sleep {n}; echo never", "", kill_after=1),
    # catches SIGTERM and exits 0: still a timeout
    TimeoutCase("exits-0-on-term", "trap 'echo caught; exit 0' TERM; sleep {n} & wait", "caught\n"),
]


# prints the command's process group and the name of its shell's parent
STRATEGY_PROBE = 'echo "$(ps -o pgid= -p $$) $(ps -o comm= -p $PPID)"'


@attrs.frozen
class Results:
    # (env id, case id) -> run, or why it can't run here (str), or how it failed
    functional: dict[tuple[str, str], Run | str | Exception]
    forged: dict[tuple[str, str], Run | str | Exception]
    timeouts: dict[tuple[str, str], tuple[Run | Exception, str] | str]  # (run, sleep arg)
    strategy: dict[tuple[str, str], Run | str | Exception]  # (env id, "") -> STRATEGY_PROBE
    watchdog_seconds: int


@pytest.fixture(scope="module")
def results(envs: dict[str, Env | str]) -> Iterator[Results]:
    """All sh runs, in parallel."""
    # A unique timeout for the fast runs: a watchdog left behind would be a live
    # `sleep <watchdog_seconds>`, and a watchdog not stopped would make a run take that long.
    watchdog_seconds = 1000 + secrets.randbelow(9000)
    base = 40_000 + secrets.randbelow(50_000)
    # The timeout runs mostly sleep: all at once.  The others are CPU-bound: a few at once.
    slow_pool = ThreadPoolExecutor(max_workers=len(ENV_IDS) * len(TIMEOUT_CASES))
    pool = ThreadPoolExecutor(max_workers=4)
    timeouts: dict[tuple[str, str], tuple[Future[Run], str] | str] = {}
    functional: dict[tuple[str, str], Future[Run] | str] = {}
    forged: dict[tuple[str, str], Future[Run] | str] = {}
    strategy: dict[tuple[str, str], Future[Run] | str] = {}
    n = 0
    for env_id in ENV_IDS:
        env = envs[env_id]
        for case in TIMEOUT_CASES:
            n += 1
            seconds = str(base + n)
            if isinstance(env, str):
                timeouts[env_id, case.name] = env
                continue
            wrapped = wrap_command(
                case.command.format(n=seconds),
                "sh",
                timeout=1,
                kill_after=case.kill_after,
                _sh_path=env.shell.path,
            )
            timeouts[env_id, case.name] = (slow_pool.submit(run_like_agent, wrapped, env), seconds)
    for env_id, (name, command, _, _) in FUNCTIONAL_RUNS:
        env = envs[env_id]
        if isinstance(env, str):
            functional[env_id, name] = env
            continue
        wrapped = wrap_command(
            command, "sh", timeout=watchdog_seconds, _sh_path=env.shell.path,
            output_limit=1 << 30,  # exactness of big outputs; capping is tested apart
        )
        functional[env_id, name] = pool.submit(run_like_agent, wrapped, env)
    for env_id in FORGED_ENVS:
        env = envs[env_id]
        marker = secrets.token_hex(16)
        for name, command, _, _ in forged_cases(marker):
            if isinstance(env, str):
                forged[env_id, name] = env
                continue
            wrapped = wrap_command(
                command, "sh", timeout=watchdog_seconds, marker=marker, _sh_path=env.shell.path
            )
            forged[env_id, name] = pool.submit(run_like_agent, wrapped, env)
    for env_id in ENV_IDS:
        env = envs[env_id]
        if isinstance(env, str):
            strategy[env_id, ""] = env
            continue
        wrapped = wrap_command(STRATEGY_PROBE, "sh", timeout=60, _sh_path=env.shell.path)
        strategy[env_id, ""] = pool.submit(run_like_agent, wrapped, env)

    def outcome(future: Future[Run]) -> Run | Exception:
        try:
            return future.result()
        except Exception as exc:  # a run that hung or crashed fails its own test
            return exc

    def runs(
        table: dict[tuple[str, str], Future[Run] | str],
    ) -> dict[tuple[str, str], Run | str | Exception]:
        return {k: v if isinstance(v, str) else outcome(v) for k, v in table.items()}

    try:
        yield Results(
            functional=runs(functional),
            forged=runs(forged),
            timeouts={
                k: v if isinstance(v, str) else (outcome(v[0]), v[1]) for k, v in timeouts.items()
            },
            strategy=runs(strategy),
            watchdog_seconds=watchdog_seconds,
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        slow_pool.shutdown(wait=True, cancel_futures=True)
        # a broken wrapper must not leave hours-long sleeps behind (the argv are unique)
        for value in timeouts.values():
            if not isinstance(value, str):
                kill_processes(["sleep", value[1]])
        kill_processes(["sleep", str(watchdog_seconds)])


def got(table: Mapping[tuple[str, str], T | str | Exception], env_id: str, name: str) -> T:
    value = table[env_id, name]
    if isinstance(value, str):
        pytest.skip(value)
    if isinstance(value, Exception):
        raise value
    return value


# --------------------------------------------------------------------------------------
# sh: real runs


@pytest.mark.parametrize(
    ("env_id", "case"), FUNCTIONAL_RUNS, ids=[f"{e}-{c[0]}" for e, c in FUNCTIONAL_RUNS]
)
def test_sh_output_and_exit_status_are_exact(
    results: Results, env_id: str, case: tuple[str, str, str, int]
) -> None:
    name, _, expected_output, expected_exit = case
    run = got(results.functional, env_id, name)
    assert isinstance(run, Run)
    parsed = run.parsed
    assert parsed == ParsedResult(
        started=True,
        completed=True,
        exit_code=expected_exit,
        timed_out=False,
        output=expected_output,
    ), run.raw[-2000:]
    # nothing waited for the (long) watchdog, and stdin readers did not hang
    assert run.elapsed < 10


@pytest.mark.parametrize("name", FORGED_NAMES)
@pytest.mark.parametrize("env_id", FORGED_ENVS)
def test_sh_forged_marker_lines_do_not_change_the_result(
    results: Results, env_id: str, name: str
) -> None:
    run = got(results.forged, env_id, name)
    assert isinstance(run, Run)
    _, _, expected_output, expected_exit = next(
        c for c in forged_cases(run.wrapped.marker) if c[0] == name
    )
    assert run.parsed == ParsedResult(
        started=True,
        completed=True,
        exit_code=expected_exit,
        timed_out=False,
        output=expected_output,
    ), run.raw


@pytest.mark.parametrize("case", TIMEOUT_CASES, ids=[c.name for c in TIMEOUT_CASES])
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sh_timeout_kills_the_whole_tree(results: Results, env_id: str, case: TimeoutCase) -> None:
    value = got(results.timeouts, env_id, case.name)
    assert isinstance(value, tuple)
    run, seconds = value
    if isinstance(run, Exception):
        assert_no_process(["sleep", seconds])
        raise run
    assert run.parsed == ParsedResult(
        started=True, completed=True, exit_code=None, timed_out=True, output=case.output
    ), run.raw
    # timeout=1: SIGTERM at 1 s, SIGKILL kill_after later; a generous margin for a busy
    # box (the command itself would sleep for more than 11 hours)
    assert run.elapsed < 1 + math.ceil(case.kill_after) + 6
    if case.kill_after == 1:
        assert run.elapsed >= 2  # really needed the SIGKILL
    assert has_started(run.wrapped, run.raw)
    assert_no_process(["sleep", seconds])


def test_sh_no_watchdog_left_behind(results: Results) -> None:
    assert_no_process(["sleep", str(results.watchdog_seconds)])


def test_sh_no_process_left_in_the_runs_sessions(results: Results) -> None:
    sessions = set()
    for table in (results.functional, results.forged):
        sessions |= {r.pgid for r in table.values() if isinstance(r, Run)}
    sessions |= {
        v[0].pgid
        for v in results.timeouts.values()
        if isinstance(v, tuple) and isinstance(v[0], Run)
    }
    assert sessions
    deadline = time.monotonic() + 2.0
    while True:
        alive = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2 :].split()
                if fields[0] != "Z" and int(fields[3]) in sessions:
                    alive.append(int(entry.name))
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not alive


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sh_strategy_is_the_one_under_test(
    envs: dict[str, Env | str], results: Results, env_id: str
) -> None:
    """The process group the command runs in shows which strategy the wrapper took."""
    run = got(results.strategy, env_id, "")
    assert isinstance(run, Run)
    env = envs[env_id]
    assert isinstance(env, Env)
    parsed = run.parsed
    assert parsed.exit_code == 0, run.raw
    pgid_text, parent = parsed.output.split()
    pgid = int(pgid_text)
    if env.mode == "timeout":
        assert parent == "timeout"
        assert pgid != run.pgid
    elif env.mode == "setsid":
        assert pgid != run.pgid  # setsid made a session (and process group) of its own
    elif env.shell.name == "dash":
        assert pgid == run.pgid  # no job control without a tty: the ps tree is used
    else:
        assert pgid != run.pgid  # bash: set -m puts the job in its own process group


@pytest.mark.parametrize("env_id", ["dash-timeout", "dash-jobs", "bash-as-sh-setsid"])
def test_sh_marker_is_invisible_to_the_command(envs: dict[str, Env | str], env_id: str) -> None:
    """Not in the command's variables, nor in the argv or environment of any ancestor."""
    env = envs[env_id]
    if isinstance(env, str):
        pytest.skip(env)
    command = (
        'set; p=$$; while [ "$p" -gt 1 ]; do echo "== $p"; '
        "tr '\\0' '\\n' </proc/$p/cmdline; tr '\\0' '\\n' </proc/$p/environ; "
        "p=$(cut -d' ' -f4 /proc/$p/stat); done 2>/dev/null; echo walked"
    )
    run = run_like_agent(wrap_command(command, "sh", timeout=60, _sh_path=env.shell.path), env)
    parsed = run.parsed
    assert parsed.exit_code == 0, run.raw
    assert parsed.output.endswith("walked\n")
    assert f"== {run.pgid}\n" in parsed.output  # the walk reached the agent's shell
    assert run.wrapped.marker not in parsed.output


def test_sh_script_survives_the_agents_cr_stripping() -> None:
    wrapped = wrap_command("printf 'a\rb'", "sh", timeout=5)
    assert "\r" not in wrapped.script


@given(
    text=st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        max_size=300,
    )
)
@settings(max_examples=50, deadline=None, database=None)
def test_sh_round_trip_of_arbitrary_text(text: str) -> None:
    env = Env(ShellCase("sh", "/bin/sh", "sh"), "auto", dict(os.environ))
    wrapped = wrap_command(f"printf '%s' {shlex.quote(text)}", "sh", timeout=30)
    run = run_like_agent(wrapped, env)
    assert run.parsed == ParsedResult(
        started=True, completed=True, exit_code=0, timed_out=False, output=text
    )


def test_has_started_on_growing_console_text() -> None:
    env = Env(ShellCase("sh", "/bin/sh", "sh"), "auto", dict(os.environ))
    wrapped = wrap_command("echo hello", "sh", timeout=30)
    raw = run_like_agent(wrapped, env).raw
    begin_line = f"GR_BEGIN_{wrapped.marker}\n"
    ready = raw.index(begin_line) + len(begin_line)
    for i in range(len(raw) + 1):
        assert has_started(wrapped, raw[:i]) == (i >= ready), i


# --------------------------------------------------------------------------------------
# parse_result / has_started on synthetic text


M = "0123456789abcdef0123456789abcdef"


def sh_wrapped(marker: str = M) -> WrappedCommand:
    return wrap_command("true", "sh", timeout=5, marker=marker)


def win_wrapped(shell: str = "powershell", marker: str = M) -> WrappedCommand:
    return wrap_command("exit 0", shell, timeout=5, marker=marker)


def test_parse_not_started_returns_raw_text() -> None:
    raw = "sh: 1: Syntax error: something\n"
    assert parse_result(sh_wrapped(), raw) == ParsedResult(
        started=False, completed=False, exit_code=None, timed_out=False, output=raw
    )
    assert not has_started(sh_wrapped(), raw)


def test_parse_started_not_completed_returns_output_so_far() -> None:
    raw = f"\nGR_BEGIN_{M}\npartial output"
    assert parse_result(sh_wrapped(), raw) == ParsedResult(
        started=True, completed=False, exit_code=None, timed_out=False, output="partial output"
    )


def test_parse_timed_out_has_no_exit_code() -> None:
    raw = f"\nGR_BEGIN_{M}\nsome\n\nGR_END_{M} rc=124 timeout=1\n"
    assert parse_result(sh_wrapped(), raw) == ParsedResult(
        started=True, completed=True, exit_code=None, timed_out=True, output="some\n"
    )


@pytest.mark.parametrize(
    "end_line",
    [
        f"GR_END_{M[:-1]}0 rc=0 timeout=0",  # another marker
        f"GR_END_{M} rc=0 timeout=0 extra",
        f"GR_END_{M} rc=$? timeout=0",
        f"GR_END_{M} rc=%ERRORLEVEL% timeout=0",
        f'GR_END_{M} rc=" + $rc + " timeout=" + $t + "',
        f"GR_END_{M} rc=0 timeout=2",
        f"GR_END_{M} rc= timeout=0",
        f"GR_END_{M}  rc=0 timeout=0",
        f" GR_END_{M} rc=0 timeout=0",
        f"GR_END_{M.upper()} rc=0 timeout=0",
    ],
)
def test_parse_ignores_end_lines_not_in_the_exact_format(end_line: str) -> None:
    raw = f"\nGR_BEGIN_{M}\nout\n{end_line}\n"
    parsed = parse_result(sh_wrapped(), raw)
    assert parsed.started
    assert not parsed.completed
    assert parsed.exit_code is None
    assert parsed.output == f"out\n{end_line}\n"


def test_parse_takes_the_last_valid_end_line_and_first_begin_line() -> None:
    raw = (
        f"noise\nGR_BEGIN_{M}\na\nGR_BEGIN_{M}\n"
        f"\nGR_END_{M} rc=1 timeout=1\nb\n\nGR_END_{M} rc=2 timeout=0\ntrailing prompt$ "
    )
    assert parse_result(sh_wrapped(), raw) == ParsedResult(
        started=True,
        completed=True,
        exit_code=2,
        timed_out=False,
        output=f"a\nGR_BEGIN_{M}\n\nGR_END_{M} rc=1 timeout=1\nb\n",
    )


def test_parse_keeps_a_trailing_carriage_return_on_sh() -> None:
    raw = f"\nGR_BEGIN_{M}\nx\r\nGR_END_{M} rc=0 timeout=0\n"
    assert parse_result(sh_wrapped(), raw).output == "x\r"


def test_parse_sh_through_a_pty_that_turns_lf_into_crlf() -> None:
    raw = f"echoed script\r\n\r\nGR_BEGIN_{M}\r\nline\r\n\r\nGR_END_{M} rc=3 timeout=0\r\n"
    assert parse_result(sh_wrapped(), raw) == ParsedResult(
        started=True, completed=True, exit_code=3, timed_out=False, output="line\r\n"
    )


@pytest.mark.parametrize("shell", ["cmd", "powershell"])
def test_parse_windows_crlf_output(shell: str) -> None:
    wrapped = win_wrapped(shell)
    raw = (
        "PS C:\\Program Files\\Mesh Agent> "
        + wrapped.script
        + f"\r\n\r\nGR_BEGIN_{M}\r\nline 1\r\nline 2\r\n"
        + f"\r\nGR_END_{M} rc=3 timeout=0\r\nPS C:\\Program Files\\Mesh Agent> exit\r\n"
    )
    assert parse_result(wrapped, raw) == ParsedResult(
        started=True, completed=True, exit_code=3, timed_out=False, output="line 1\r\nline 2\r\n"
    )


@pytest.mark.parametrize(
    ("output", "rc", "timeout", "expected_exit", "expected_output"),
    [
        ("no newline at end", "0", "0", 0, "no newline at end"),
        ("", "0", "0", 0, ""),
        ("ends with lf\n", "1", "0", 1, "ends with lf\n"),
        ("crash\r\n", "-1073741819", "0", -1073741819, "crash\r\n"),
        ("big\r\n", "4294967295", "0", 4294967295, "big\r\n"),
        ("killed\r\n", "1", "1", None, "killed\r\n"),
    ],
)
def test_parse_windows_exit_codes(
    output: str, rc: str, timeout: str, expected_exit: int | None, expected_output: str
) -> None:
    wrapped = win_wrapped()
    raw = f"\r\nGR_BEGIN_{M}\r\n{output}\r\nGR_END_{M} rc={rc} timeout={timeout}\r\n"
    assert parse_result(wrapped, raw) == ParsedResult(
        started=True,
        completed=True,
        exit_code=expected_exit,
        timed_out=timeout == "1",
        output=expected_output,
    )


# --------------------------------------------------------------------------------------
# cmd / powershell: string level


AWKWARD_WINDOWS = [
    "echo \"double\" 'single' `backtick` $env:PATH %PATH% ^caret & | < > \\ back\\slash",
    "line 1\nline 2\r\nline 3\n",
    "Write-Output 'héllo ✓ 日本'",
    "",
    "x" * 5000,
]


def ps_payload(script: str) -> tuple[str, str]:
    """(how the command is passed, the command) for a powershell wrapper."""
    direct = re.findall(r"-EncodedCommand ([A-Za-z0-9+/=]+)'", script)
    in_file = re.findall(r"FromBase64String\('([A-Za-z0-9+/=]*)'\)", script)
    assert len(direct) + len(in_file) == 1
    if direct:
        return "direct", base64.b64decode(direct[0], validate=True).decode("utf-16-le")
    assert "-EncodedCommand ' + [System.Convert]::ToBase64String(" in script
    assert ". ([ScriptBlock]::Create([System.IO.File]::ReadAllText(" in script
    return "file", base64.b64decode(in_file[0], validate=True).decode("utf-8")


def cmd_payload(script: str) -> str:
    found = re.findall(r"FromBase64String\('([A-Za-z0-9+/=]+)'\)", script)
    assert len(found) == 1
    return base64.b64decode(found[0], validate=True).decode("utf-8")


def check_powershell_syntax(script: str) -> None:
    """A small scan of the PowerShell text: strings closed, brackets balanced."""
    stack: list[str] = []
    pairs = {")": "(", "}": "{", "]": "["}
    i = 0
    while i < len(script):
        c = script[i]
        if c == "'":
            end = script.find("'", i + 1)
            while end != -1 and script[end + 1 : end + 2] == "'":
                end = script.find("'", end + 2)
            assert end != -1, f"unclosed '...' at {i}"
            i = end + 1
            continue
        if c == '"':
            j = i + 1
            while j < len(script) and script[j] != '"':
                j += 2 if script[j] == "`" else 1
            assert j < len(script), f'unclosed "..." at {i}'
            i = j + 1
            continue
        if c in "({[":
            stack.append(c)
        elif c in ")}]":
            assert stack, f"unbalanced {c} at {i}"
            assert stack.pop() == pairs[c], f"unbalanced {c} at {i}"
        i += 1
    assert not stack


@pytest.mark.parametrize("command", AWKWARD_WINDOWS)
def test_powershell_payload_is_the_exact_command(command: str) -> None:
    wrapped = wrap_command(command, "powershell", timeout=5)
    assert wrapped.mesh_type == 2
    assert wrapped.shell == "powershell"
    how, payload = ps_payload(wrapped.script)
    assert payload == command
    assert how == ("direct" if command else "file")


@pytest.mark.parametrize("command", AWKWARD_WINDOWS)
def test_cmd_payload_is_the_command_in_a_batch_file(command: str) -> None:
    wrapped = wrap_command(command, "cmd", timeout=5)
    assert wrapped.mesh_type == 2
    assert wrapped.shell == "cmd"
    text = cmd_payload(wrapped.script)
    prologue = "@echo off\r\nchcp 65001 >nul 2>nul\r\n"
    epilogue = "\r\n@exit /b %errorlevel%\r\n"
    assert text.startswith(prologue)
    assert text.endswith(epilogue)
    body = text[len(prologue) : -len(epilogue)]
    assert body == re.sub(r"(?<!\r)\n", "\r\n", command)
    assert body.replace("\r\n", "\n") == command.replace("\r\n", "\n")


@pytest.mark.parametrize("shell", ["cmd", "powershell"])
@pytest.mark.parametrize("command", AWKWARD_WINDOWS)
def test_windows_script_is_one_ascii_line_that_cannot_fake_its_markers(
    shell: str, command: str
) -> None:
    wrapped = wrap_command(command, shell, timeout=5)
    script = wrapped.script
    assert script.isascii()
    assert "\n" not in script
    assert "\r" not in script
    check_powershell_syntax(script)
    assert script.count(f"$m = '{wrapped.marker}'") == 1
    assert f"GR_BEGIN_{wrapped.marker}" not in script
    assert f"GR_END_{wrapped.marker}" not in script
    assert "$p.StandardInput.Close()" in script
    assert "taskkill.exe')) /T /F /PID $p.Id" in script
    # echoed back in any form (cmd echoes its input), the script is no report
    for echoed in (
        script,
        f"C:\\>{script}\r\n",
        f"PS C:\\> {script}\r\nC:\\>echo GR_END_ %ERRORLEVEL% $LASTEXITCODE\r\n",
    ):
        assert not has_started(wrapped, echoed)
        assert parse_result(wrapped, echoed).started is False
        tail = f"\r\nGR_BEGIN_{wrapped.marker}\r\nout\r\n"
        parsed = parse_result(wrapped, echoed + tail + echoed)
        assert parsed.started
        assert not parsed.completed
        assert parsed.output == "out\r\n" + echoed


@pytest.mark.parametrize(
    ("timeout", "ms"),
    [(1, 1000), (1.5, 1500), (0.0001, 1), (3600, 3_600_000), (1e9, 2**31 - 1)],
)
def test_windows_timeout_is_in_milliseconds(timeout: float, ms: int) -> None:
    for shell in ("cmd", "powershell"):
        script = wrap_command("x", shell, timeout=timeout).script
        assert f"if (-not $p.WaitForExit({ms}))" in script


@pytest.mark.parametrize(
    ("command", "how"),
    [
        ("x" * 12_000, "direct"),  # 32000 base64 characters: fits a command line
        ("x" * 12_001, "file"),
        ("é" * 12_001, "file"),
        ("Write-Output 'it''s ✓'\n" * 2_800, "file"),  # 64 K, the longest command a Task takes
    ],
)
def test_powershell_commands_too_long_for_a_command_line_go_through_a_file(
    command: str, how: str
) -> None:
    wrapped = wrap_command(command, "powershell", timeout=5)
    assert ps_payload(wrapped.script) == (how, command)
    check_powershell_syntax(wrapped.script)
    direct_arguments = re.search(r"-EncodedCommand [A-Za-z0-9+/=]+", wrapped.script)
    assert direct_arguments is None or len(direct_arguments.group()) < 32_767 - 200


def test_cmd_takes_long_commands() -> None:
    big = wrap_command("echo x\n" * 9_000, "cmd", timeout=5)
    assert cmd_payload(big.script).count("echo x\r\n") == 9_000


# --------------------------------------------------------------------------------------
# wrap_command's arguments


class _Shell(enum.StrEnum):
    SH = "sh"
    CMD = "cmd"
    POWERSHELL = "powershell"
    AUTO = "auto"


def test_accepts_str_enum_shells() -> None:
    assert wrap_command("x", _Shell.SH, timeout=1).shell == "sh"
    assert type(wrap_command("x", _Shell.CMD, timeout=1).shell) is str
    assert wrap_command("x", _Shell.POWERSHELL, timeout=1).mesh_type == 2
    assert wrap_command("x", "sh", timeout=1).mesh_type == 0


@pytest.mark.parametrize("shell", ["auto", _Shell.AUTO, "bash", "", "SH"])
def test_rejects_unknown_shells(shell: str) -> None:
    with pytest.raises(ValueError, match="unknown shell"):
        wrap_command("x", shell, timeout=1)


@pytest.mark.parametrize("shell", ["sh", "cmd", "powershell"])
@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf])
def test_rejects_bad_timeouts(shell: str, timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        wrap_command("x", shell, timeout=timeout)


@pytest.mark.parametrize("shell", ["sh", "cmd", "powershell"])
def test_rejects_nul(shell: str) -> None:
    with pytest.raises(ValueError, match="NUL"):
        wrap_command("a\x00b", shell, timeout=1)


@pytest.mark.parametrize("marker", ["short", "x" * 129, "0123456789abcdef'", "0123456789abcdef\n"])
def test_rejects_bad_markers(marker: str) -> None:
    with pytest.raises(ValueError, match="marker"):
        wrap_command("x", "sh", timeout=1, marker=marker)


@pytest.mark.parametrize("shell", ["sh", "cmd", "powershell"])
def test_markers_are_random_and_kept_out_of_repr(shell: str) -> None:
    first = wrap_command("echo same", shell, timeout=1)
    second = wrap_command("echo same", shell, timeout=1)
    assert re.fullmatch(r"[0-9a-f]{32}", first.marker)
    assert first.marker != second.marker
    assert first.marker not in repr(first)
    assert f"GR_BEGIN_{first.marker}" not in first.script
    assert f"GR_END_{first.marker}" not in first.script


def sh_run(wrapped: WrappedCommand, environ: Mapping[str, str] | None = None) -> ParsedResult:
    """Run ``wrapped`` with /bin/sh as the agent does (without the agent's open stdin)."""
    done = subprocess.run(
        ["/bin/sh"], input=wrapped.script.replace("\r", "") + "\nexit\n",
        capture_output=True, text=True, timeout=60, env=dict(environ or os.environ),
    )
    return parse_result(wrapped, done.stdout + done.stderr)


def test_sh_caps_big_output_on_the_device_keeping_head_and_tail(tmp_path: Path) -> None:
    """A 3 MB output never leaves the device whole: the wrapper keeps the first and
    last output_limit/2 bytes, says how much it cut, and reports the exact exit code."""
    command = (
        "echo FIRST; head -c 3000000 /dev/zero | tr '\\0' x; echo; echo LAST >&2; exit 4"
    )
    journal = tmp_path / "journal"
    wrapped = wrap_command(command, "sh", timeout=30, output_limit=1000)
    done = subprocess.run(
        ["/bin/sh"], input=wrapped.script + "\nexit\n", capture_output=True, text=True,
        timeout=60, env={**os.environ, "GHOSTRUNNER_JOURNAL": str(journal)},
    )
    raw = done.stdout + done.stderr
    assert len(raw) < 2000
    parsed = parse_result(wrapped, raw)
    assert parsed.exit_code == 4
    assert parsed.truncated is True
    assert parsed.output.startswith("FIRST\n" + "x" * 494)
    assert parsed.output.endswith("x" * 494 + "\nLAST\n")
    total = len("FIRST\n") + 3_000_000 + len("\nLAST\n")
    assert f"[... {total - 1000} bytes cut on the device by GhostRunner ...]" in parsed.output
    # without a key nobody collects the record: the wrapper removed it itself
    assert sorted(p.name for p in journal.iterdir()) == ["id", "timeout.ok"]


def test_sh_small_output_is_not_marked_truncated() -> None:
    parsed = sh_run(wrap_command("printf abc", "sh", timeout=30, output_limit=3))
    assert (parsed.output, parsed.truncated, parsed.exit_code) == ("abc", False, 0)


# --------------------------------------------------------------------------------------
# The journal: once only, outcome recovery, collection


KEY = "k" * 16 + "1"


@pytest.mark.parametrize("env_id", ["dash-timeout", "dash-jobs", "bash-as-sh-setsid"])
def test_sh_key_runs_the_command_once_per_device(
    envs: dict[str, Env | str], env_id: str, tmp_path: Path
) -> None:
    """A second dispatch with the same key (a resend, a recovery) reports the first
    one's record and runs nothing; another key (another attempt) runs."""
    env = envs[env_id]
    if isinstance(env, str):
        pytest.skip(env)
    journal = tmp_path / "journal"
    env = attrs.evolve(env, environ={**env.environ, "GHOSTRUNNER_JOURNAL": str(journal)})
    log = tmp_path / "ran"
    command = f"echo ran >> {shlex.quote(str(log))}; echo hello; exit 3"

    def dispatch(once: str, recover: bool = False) -> ParsedResult:
        wrapped = wrap_command(command, "sh", timeout=30, once=once, recover=recover,
                               _sh_path=env.shell.path)
        return run_like_agent(wrapped, env).parsed

    first = dispatch(KEY)
    assert (first.exit_code, first.output, first.journal) == (3, "hello\n", "")
    for recover in (False, True):
        again = dispatch(KEY, recover)
        assert (again.exit_code, again.output, again.journal) == (3, "hello\n", "record")
    assert log.read_text() == "ran\n"
    other = dispatch("k" * 16 + "2")
    assert (other.exit_code, other.journal) == (3, "")
    assert log.read_text() == "ran\nran\n"
    names = {p.name for p in journal.iterdir()}
    assert {KEY, KEY + ".o", "k" * 16 + "2", "id"} <= names
    assert journal.stat().st_mode & 0o777 == 0o700


def journal_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "GHOSTRUNNER_JOURNAL": str(tmp_path / "journal")}


def test_recovery_never_creates_a_journal_and_runs_nothing_without_one(tmp_path: Path) -> None:
    """A wiped journal reads as "gone", never as "not started"."""
    environ = journal_env(tmp_path)
    log = tmp_path / "ran"
    wrapped = wrap_command(f"echo x >> {log}", "sh", timeout=30, once=KEY, recover=True)
    assert sh_run(wrapped, environ).journal == "gone"
    assert not (tmp_path / "journal").exists()
    assert not log.exists()
    # a journal emptied of its files (its id with them) is gone too
    (tmp_path / "journal").mkdir(mode=0o700)
    assert sh_run(wrapped, environ).journal == "gone"
    assert not log.exists()


def test_recovery_runs_an_attempt_the_journal_proves_never_started(tmp_path: Path) -> None:
    environ = journal_env(tmp_path)
    assert sh_run(wrap_command("true", "sh", timeout=30), environ).exit_code == 0  # makes it
    log = tmp_path / "ran"
    wrapped = wrap_command(f"echo x >> {log}; exit 5", "sh", timeout=30, once=KEY, recover=True)
    parsed = sh_run(wrapped, environ)
    assert (parsed.exit_code, parsed.journal) == (5, "")
    assert log.read_text() == "x\n"


def test_a_record_without_an_end_is_running_or_unknown(tmp_path: Path) -> None:
    """Started and not finished: still running if its wrapper lives (ask later), else
    unknown (the device restarted mid-run): never run again."""
    environ = journal_env(tmp_path)
    journal = tmp_path / "journal"
    assert sh_run(wrap_command("true", "sh", timeout=30), environ).exit_code == 0
    alive = subprocess.Popen(["sleep", "60"])
    try:
        (journal / KEY).write_text(f"s {alive.pid}\n")
        wrapped = wrap_command("echo ran", "sh", timeout=30, once=KEY, recover=True)
        assert sh_run(wrapped, environ).journal == "running"
    finally:
        alive.kill()
        alive.wait()
    assert sh_run(wrapped, environ).journal == "unknown"
    (journal / KEY).write_text("")  # created, then the device died before writing
    assert sh_run(wrapped, environ).journal == "unknown"


def test_collect_removes_the_named_records_and_old_ones_only(tmp_path: Path) -> None:
    environ = journal_env(tmp_path)
    journal = tmp_path / "journal"
    keys = [f"{c * 16}" for c in "abcd"]
    for key in keys:
        assert sh_run(wrap_command("echo hi", "sh", timeout=30, once=key), environ).exit_code == 0
    old = journal / keys[3]
    stamp = time.time() - 3 * 86400
    os.utime(old, (stamp, stamp))
    # this dispatch's own key, even with an old record, is never removed
    os.utime(journal / keys[2], (stamp, stamp))
    parsed = sh_run(wrap_command("echo again", "sh", timeout=30, once=keys[2],
                                 collect=(keys[0], keys[1])), environ)
    assert (parsed.journal, parsed.output) == ("record", "hi\n")
    parsed = sh_run(wrap_command("true", "sh", timeout=30, once="e" * 16), environ)
    assert parsed.exit_code == 0
    left = sorted(p.name for p in journal.iterdir())
    assert left == sorted(["id", "timeout.ok", keys[2], keys[2] + ".o", keys[2] + ".t",
                           keys[3] + ".o", keys[3] + ".t", "e" * 16, "e" * 16 + ".o",
                           "e" * 16 + ".t"])
    # a two-day-old record of another key goes with the next collection
    parsed = sh_run(wrap_command("true", "sh", timeout=30, once="f" * 16,
                                 collect=("e" * 16,)), environ)
    assert parsed.exit_code == 0
    left = sorted(p.name for p in journal.iterdir())
    assert keys[2] not in left  # (its .o and .t go when they are as old)


def test_a_planted_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    """Security review #3: another local user plants a link where the journal goes;
    the wrapper must neither follow it (chmod, create files in the target) nor run."""
    target = tmp_path / "victim"
    target.mkdir(mode=0o755)
    link = tmp_path / "journal"
    link.symlink_to(target)
    log = tmp_path / "ran"
    for recover in (False, True):
        wrapped = wrap_command(f"echo x >> {log}", "sh", timeout=30, once=KEY, recover=recover)
        parsed = sh_run(wrapped, journal_env(tmp_path))
        assert parsed.journal == "unusable", parsed
        assert "symbolic link" in parsed.detail
    assert target.stat().st_mode & 0o777 == 0o755
    assert list(target.iterdir()) == []
    assert not log.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory of another user")
def test_a_journal_of_another_user_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    journal.mkdir(mode=0o777)
    os.chown(journal, 65534, 65534)
    parsed = sh_run(wrap_command("echo ran", "sh", timeout=30, once=KEY), journal_env(tmp_path))
    assert (parsed.journal, parsed.started) == ("unusable", False)
    assert list(journal.iterdir()) == []


def test_no_journal_directory_refuses_to_run(tmp_path: Path) -> None:
    blocker = tmp_path / "journal"
    blocker.write_text("")
    log = tmp_path / "ran"
    parsed = sh_run(wrap_command(f"echo x >> {log}", "sh", timeout=30, once=KEY),
                    journal_env(tmp_path))
    assert parsed.journal == "unusable"
    assert not log.exists()
    assert blocker.read_text() == ""


def test_the_command_cannot_forge_its_status_through_its_parents_descriptors(
    tmp_path: Path,
) -> None:
    """Security review #5: writing a fake report (the old wrapper's ``gr_S=0;``, or a
    record line) to every descriptor of its parent and of itself changes nothing: the
    status is the one ``wait`` returned to the wrapper."""
    command = (
        "for f in /proc/$PPID/fd/* /proc/$$/fd/*; do "
        "printf 'gr_S=0;\\ne 0 0 0\\n' >\"$f\"; done 2>/dev/null; exit 7"
    )
    parsed = sh_run(wrap_command(command, "sh", timeout=30, once=KEY), journal_env(tmp_path))
    assert (parsed.exit_code, parsed.timed_out, parsed.completed) == (7, False, True)
    recovered = sh_run(wrap_command(command, "sh", timeout=30, once=KEY, recover=True),
                       journal_env(tmp_path))
    assert (recovered.exit_code, recovered.journal) == (7, "record")


@pytest.mark.skipif(shutil.which("setsid") is None or shutil.which("timeout") is None,
                    reason="needs setsid(1) and timeout(1)")
def test_a_child_that_calls_setsid_does_not_outlive_the_timeout(tmp_path: Path) -> None:
    """Security review #8: timeout(1) signals its process group; a child in a session
    of its own escaped it. On timeout the wrapper kills every process that carries the
    run's tag in its environment (Linux)."""
    seconds = str(50_000 + secrets.randbelow(40_000))
    command = f"setsid sh -c 'sleep {seconds}' </dev/null >/dev/null 2>&1 & sleep {seconds}1"
    environ = {**journal_env(tmp_path), MARK.split("=")[0]: MARK.split("=")[1]}
    try:
        parsed = sh_run(wrap_command(command, "sh", timeout=1, kill_after=1), environ)
        assert parsed.timed_out
        assert_no_process(["sleep", seconds])
    finally:
        kill_processes(["sleep", seconds])
        kill_processes(["sleep", seconds + "1"])


def test_journal_lines_need_the_exact_marker() -> None:
    wrapped = wrap_command("echo hi", "sh", timeout=5, once="a" * 16)
    m = wrapped.marker
    assert parse_result(wrapped, f"\nGR_GONE_{m}\n").journal == "gone"
    assert parse_result(wrapped, f"GR_RUNNING_{m}").journal == "running"
    assert parse_result(wrapped, f"\nGR_NOJOURNAL_{m} why\r\n").detail == "why"
    assert parse_result(wrapped, f"\nGR_GONE_{'0' * 32}\n").journal == ""
    assert parse_result(wrapped, f"x GR_GONE_{m}\n").journal == ""
    # after BEGIN it is the command's output, not the journal's word
    assert parse_result(wrapped, f"\nGR_BEGIN_{m}\nGR_GONE_{m}\n").journal == ""
    for word in ("GONE", "RUNNING", "UNKNOWN", "RECORD", "NOJOURNAL"):
        assert f"GR_{word}_{m}" not in wrapped.script
    with pytest.raises(ValueError, match="once"):
        wrap_command("echo hi", "sh", timeout=5, once="short")
    with pytest.raises(ValueError, match="collect"):
        wrap_command("echo hi", "sh", timeout=5, collect=("x;rm",))
    assert wrapped.journal and wrapped.key == "a" * 16
    assert not wrap_command("echo hi", "cmd", timeout=5, once="a" * 16).journal

"""POSIX process handling: process groups, /proc, reaping what a crashed run left.

Every lab process (server, agents) runs in its own process group, whose id is its PID.
The functions here use ``os.killpg``, signals and ``/proc`` (Linux) when called; the
module itself imports on any system.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ._common import LabError, LogFunc


def _live_stats() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name) of every live
    (non-zombie) process: state, ppid, pgrp, ..."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # Fields after the command name (which may contain spaces and parentheses).
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[0] != b"Z":
            yield int(name), fields


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    return [pid for pid, fields in _live_stats() if int(fields[2]) == pgid]


def _descendants(pid: int) -> list[int]:
    """Live processes descending from ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for child, fields in _live_stats():
        children.setdefault(int(fields[1]), []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_group(
    pgid: int,
    proc: subprocess.Popen[bytes] | None,
    *,
    kill: bool = False,
    timeout: float = 10.0,
) -> None:
    """Signal a whole process group and wait until every member is gone.

    SIGTERM first (SIGKILL with ``kill=True``), repeated every half second; whatever is
    left after ``timeout`` is SIGKILLed. ``proc`` (the group leader, our child) is reaped.
    """
    # Repeat: meshagent loses a SIGTERM that arrives while it is loading its core
    # (about 0.2 s after it connects); a second one always worked.
    sig = signal.SIGKILL if kill else signal.SIGTERM
    started = time.monotonic()
    deadline = started + timeout
    next_signal = started
    while True:
        now = time.monotonic()
        if now >= next_signal:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            next_signal = now + 0.5
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
        if not _group_members(pgid) and (proc is None or proc.returncode is not None):
            return
        if now > deadline:
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc is not None:
        proc.wait(timeout=5.0)
    if _group_members(pgid):
        raise LabError(f"process group {pgid} survived SIGKILL")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def _reap_stale_group(pid_file: Path, belongs: Callable[[int], bool], log: LogFunc) -> None:
    """Kill a process group left behind by a crashed earlier run, if it is still ours.

    ``pid_file`` holds the pgid of the previous run; ``belongs(pid)`` double-checks that
    the live process really is that lab process (pid reuse). A group led by a child of
    this very process belongs to a live lab object and is left alone.
    """
    try:
        pgid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    if _ppid(pgid) == os.getpid():
        return
    members = [pid for pid in _group_members(pgid) if belongs(pid)]
    if members:
        log(f"killing leftover process group {pgid} from an earlier run ({pid_file})")
        _kill_group(pgid, None, kill=True)
    pid_file.unlink(missing_ok=True)


def _is_agent_process(pid: int, directory: Path) -> bool:
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return Path(cwd) == directory and any("meshagent" in a for a in _cmdline(pid)[:1])


def _reap_stale_agent(directory: Path, log: LogFunc) -> None:
    _reap_stale_group(directory / "agent.pid", lambda pid: _is_agent_process(pid, directory), log)


def _read_pid(pid_file: Path) -> int | None:
    """The PID recorded in ``pid_file``, or None (no file, or not a number)."""
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2 :].split()
    return bool(fields) and fields[0] != b"Z"

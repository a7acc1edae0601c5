"""One MeshCentral agent (a device) of a lab: a local ``meshagent`` process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import _HEX_NODE_ID_RE, LabError, LabTimeoutError, _clean_env, _tail, node_id_from_hex
from ._procs import _alive, _descendants, _is_agent_process, _kill_group, _reap_stale_agent

if TYPE_CHECKING:
    from ._server import MeshLab


class Agent:
    """One MeshCentral agent (a device) of a :class:`MeshLab`, in its own directory.

    Create agents with :meth:`MeshLab.add_agent`. The directory holds a private copy of
    the Linux x86-64 agent binary (``meshagent``), its settings (``meshagent.msh``) and,
    once it ran, its identity (``meshagent.db``): the same directory is always the same
    device (same node id), also across lab restarts and new :class:`MeshLab` objects on
    the same root.

    Stopping the process is a faithful "device goes offline"; starting it again is
    "device comes online".
    """

    def __init__(self, lab: MeshLab, name: str, directory: Path) -> None:
        self._lab = lab
        self._name = name
        self._dir = directory
        self._proc: subprocess.Popen[bytes] | None = None
        # PID of an agent process started by another lab object (see MeshLab.attach)
        self._adopted: int | None = None
        self._node_id: str | None = None
        try:
            self._node_id = (directory / "nodeid").read_text().strip() or None
        except OSError:
            self._node_id = None

    def __repr__(self) -> str:
        return f"Agent(name={self._name!r}, node_id={self._node_id!r}, running={self.running})"

    @property
    def name(self) -> str:
        """Device name (``agentName`` in the ``.msh``), unique within the lab."""
        return self._name

    @property
    def directory(self) -> Path:
        """The agent's directory (binary, settings, identity, log)."""
        return self._dir

    @property
    def log_path(self) -> Path:
        """The agent process's stdout/stderr, appended on every start."""
        return self._dir / "agent.log"

    @property
    def pid(self) -> int | None:
        """PID (= process group id) of the running agent, or None."""
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        if self._adopted is not None and self._is_ours(self._adopted):
            return self._adopted
        return None

    @property
    def running(self) -> bool:
        """True while the agent process is alive."""
        return self.pid is not None

    @property
    def enrolled(self) -> bool:
        """True once the agent's node id is known (it has enrolled with the server)."""
        return self._node_id is not None

    @property
    def node_id(self) -> str:
        """The full MeshCentral node id, ``node//...``.

        Known after the first enrolment (:meth:`start` with ``wait=True``, or
        :meth:`wait_enrolled`), and kept in the agent directory afterwards.

        Raises:
            LabError: the agent has never enrolled.
        """
        if self._node_id is None:
            raise LabError(f"agent {self._name!r} has not enrolled yet: start() it first")
        return self._node_id

    def _is_ours(self, pid: int) -> bool:
        """True if ``pid`` is alive and is this agent (not a reused PID)."""
        return _alive(pid) and _is_agent_process(pid, self._dir)

    def _adopt(self, pid: int) -> bool:
        """Take over a running agent process another lab object started (see
        :meth:`MeshLab.attach`). False if ``pid`` is not this agent."""
        if self._proc is not None or not self._is_ours(pid):
            return False
        self._adopted = pid
        return True

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Start the agent process (``./meshagent`` in the foreground, own process group).

        No-op if it is already running. On the very first start the agent generates its
        identity and enrols; with ``wait=True`` this waits until it did and records
        :attr:`node_id` (about 1-2 s). Later starts never wait: use
        :meth:`MeshLab.wait_connected` to wait for the device to be online.

        Raises:
            LabError: the lab server is not running, or the agent exited at once.
            LabTimeoutError: first enrolment did not finish within ``timeout``.
        """
        if self.running:
            return
        if not self._lab.running:
            raise LabError(f"cannot start agent {self._name!r}: the lab server is not running")
        pid_file = self._dir / "agent.pid"
        _reap_stale_agent(self._dir, self._lab._log)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== agent start {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
            log.flush()
            # its commands' temporary files and GhostRunner's journal of what ran stay in
            # its directory (one agent per machine would use /var/lib/ghostrunner)
            tmp = self._dir / "tmp"
            tmp.mkdir(exist_ok=True)
            self._adopted = None
            self._proc = subprocess.Popen(
                ["./meshagent"],
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**_clean_env(), "TMPDIR": str(tmp),
                     "GHOSTRUNNER_JOURNAL": str(self.journal_path)},
                start_new_session=True,
            )
        pid_file.write_text(f"{self._proc.pid}\n")
        if wait and self._node_id is None:
            self.wait_enrolled(timeout=timeout)

    @property
    def journal_path(self) -> Path:
        """Where this agent's commands keep GhostRunner's journal (``GHOSTRUNNER_JOURNAL``
        in its environment)."""
        return self._dir / "journal"

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the agent: SIGTERM (or SIGKILL with ``kill=True``) to its process group.

        Waits until every process of the group (including commands it was running) is
        gone. No-op if it is not running.
        """
        proc, self._proc = self._proc, None
        adopted, self._adopted = self._adopted, None
        if proc is not None:
            pgid = proc.pid
        elif adopted is not None and self._is_ours(adopted):
            pgid = adopted  # started by another lab object: not our child, nothing to reap
        else:
            return
        # Commands the agent runs may sit in process groups of their own (GhostRunner's
        # wrapper puts each command in one, to kill it on timeout). A stopped device
        # runs nothing, so they go too: otherwise an orphan keeps the agent's socket
        # open and the server sees the device online until its idle timeout.
        orphans = _descendants(pgid)
        _kill_group(pgid, proc, kill=kill, timeout=timeout)
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        (self._dir / "agent.pid").unlink(missing_ok=True)

    def wait_enrolled(self, timeout: float = 60.0) -> str:
        """Wait for the first enrolment to complete and return :attr:`node_id`.

        Polls the device list until a connected device with this name appears in the
        lab's group, then asks the binary for its id (``./meshagent -nodeid``; before the
        identity exists this prints nothing, so it is only run once the server lists the
        device) and checks the server lists that id as connected.

        Raises:
            LabError: the agent is not running (and has not enrolled before).
            LabTimeoutError: not enrolled within ``timeout``.
        """
        if self._node_id is not None:
            return self._node_id
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise LabError(
                    f"agent {self._name!r} is not running (log {self.log_path}):\n"
                    + _tail(self.log_path)
                )
            listed = {
                d["_id"]
                for d in self._lab.list_devices()
                if d.get("name") == self._name and int(d.get("conn") or 0) & 1
            }
            if listed:
                out = subprocess.run(
                    ["./meshagent", "-nodeid"],
                    cwd=self._dir,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=30,
                    env=_clean_env(),
                ).stdout.strip()
                if _HEX_NODE_ID_RE.match(out):
                    node_id = node_id_from_hex(out)
                    if node_id in listed:
                        self._node_id = node_id
                        (self._dir / "nodeid").write_text(node_id + "\n")
                        return node_id
            if time.monotonic() > deadline:
                raise LabTimeoutError(
                    f"agent {self._name!r} did not enrol within {timeout:.0f} s "
                    f"(log {self.log_path})"
                )
            time.sleep(0.25)

"""A real MeshCentral lab on the loopback interface: server, device group and agents.

The lab is what GhostRunner's integration tests, demo and benchmarks run against. It
needs only Python 3.11+, Node.js (16+, tested with 20) and ``npm`` on ``PATH``; MeshCentral
itself is installed from the npm registry on first use and cached.

Layout of a lab rooted at ``root``::

    root/
      lab.json               lab state: port, admin credentials, group id (mode 0600)
      meshcentral-data/      MeshCentral's data dir (config.json, NeDB files, certificates)
      meshcentral-files/     MeshCentral's files dir
      meshcentral.log        server output (appended on every start)
      group.msh              the device group's agent settings, as served by the server
      agents/NAME/           one directory per agent: meshagent, meshagent.msh,
                             meshagent.db (its identity), agent.log, nodeid

The MeshCentral package lives in a shared cache (see :func:`install_meshcentral`); the
server is pointed at ``root`` with ``--datapath`` plus ``settings.datapath`` /
``settings.filespath`` in ``config.json`` (``--datapath`` alone only moves
``config.json``). Every process runs in its own process group, bound to 127.0.0.1 only,
with proxy variables removed from its environment; :meth:`MeshLab.close` (also run at
interpreter exit) kills all of them.

Example::

    with MeshLab(tmp_path) as lab:
        a, b = lab.add_agent("alpha"), lab.add_agent("beta")
        lab.start_agents([a, b])
        lab.wait_connected([a, b])
        b.stop()
        lab.wait_connected([b], connected=False)

This module deliberately uses the standard library only.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

__all__ = [
    "DEFAULT_VERSION",
    "Agent",
    "LabError",
    "LabTimeoutError",
    "MeshLab",
    "default_cache_dir",
    "install_meshcentral",
    "node_id_from_hex",
]

DEFAULT_VERSION: Final = "1.1.55"
"""The MeshCentral version the lab is tested with (pin it: behaviour changes between releases)."""

LogFunc = Callable[[str], None]

_INSTALL_MARKER: Final = ".ghostrunner-install-complete"
_STATE_FILE: Final = "lab.json"
_AGENT_BINARY: Final = "meshagent_x86-64"
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX_NODE_ID_RE: Final = re.compile(r"^[0-9A-Fa-f]{96}$")
_PROXY_VARS: Final = frozenset(
    {"http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}
)


class LabError(RuntimeError):
    """The lab could not do what was asked (install, start, enrol, a meshctrl call...)."""


class LabTimeoutError(LabError, TimeoutError):
    """A lab operation did not reach the expected state in time."""


def _stderr_log(message: str) -> None:
    print(f"[meshlab] {message}", file=sys.stderr, flush=True)


def _quiet_log(message: str) -> None:
    del message


# --------------------------------------------------------------------------- install


def default_cache_dir(version: str = DEFAULT_VERSION) -> Path:
    """Where :func:`install_meshcentral` puts MeshCentral ``version`` by default.

    ``$GHOSTRUNNER_LAB_CACHE`` when the variable is set (used as is: point it at a
    per-version directory if you switch versions; a different version there is simply
    reinstalled), else ``~/.cache/ghostrunner/meshcentral-<version>``.
    """
    env = os.environ.get("GHOSTRUNNER_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ghostrunner" / f"meshcentral-{version}"


def _installed_version(cache: Path) -> str | None:
    try:
        data = json.loads((cache / "node_modules" / "meshcentral" / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None


def _install_complete(cache: Path, version: str) -> bool:
    marker = cache / _INSTALL_MARKER
    try:
        recorded = marker.read_text().strip()
    except OSError:
        return False
    return recorded == version and _installed_version(cache) == version


def install_meshcentral(
    version: str = DEFAULT_VERSION,
    cache_dir: Path | str | None = None,
    *,
    log: LogFunc | None = None,
) -> Path:
    """Install ``meshcentral@<version>`` (exact pin) with npm into a cache directory, once.

    The directory gets its own ``package.json`` so that npm does not walk up into a
    parent project. A marker file, written only after npm succeeded and the installed
    version was checked, makes later calls return at once; an interrupted install is
    simply redone. Concurrent callers (other processes, e.g. pytest-xdist workers) are
    serialised with an ``fcntl`` lock on ``<cache>/.install.lock``.

    Args:
        version: MeshCentral version to install.
        cache_dir: Target directory; default :func:`default_cache_dir`.
        log: Progress messages (the install takes ~30 s cold); default: stderr.

    Returns:
        The cache directory; the package is ``<cache>/node_modules/meshcentral``.

    Raises:
        LabError: npm is missing or the install failed.
    """
    say = log or _stderr_log
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(version)
    if _install_complete(cache, version):
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _install_complete(cache, version):  # another process finished it meanwhile
            return cache
        npm = shutil.which("npm")
        if npm is None:
            raise LabError("npm not found on PATH: the MeshCentral lab needs Node.js and npm")
        (cache / _INSTALL_MARKER).unlink(missing_ok=True)
        package_json = {
            "name": "ghostrunner-meshcentral-lab",
            "version": "0.0.0",
            "private": True,
            "description": "MeshCentral installed by ghostrunner.lab",
        }
        (cache / "package.json").write_text(json.dumps(package_json, indent=2) + "\n")
        cmd = [
            npm, "install", "--no-audit", "--no-fund", "--omit=dev", "--save-exact",
            f"meshcentral@{version}",
        ]  # fmt: skip
        say(f"installing meshcentral@{version} into {cache} (takes ~30 s)")
        started = time.monotonic()
        tail: list[str] = []
        with subprocess.Popen(
            cmd,
            cwd=cache,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        ) as proc:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip()
                if line:
                    say(f"npm: {line}")
                    tail = [*tail[-39:], line]
            rc = proc.wait()
        if rc != 0:
            output = "\n".join(tail)
            raise LabError(f"npm install meshcentral@{version} failed (exit {rc}):\n{output}")
        installed = _installed_version(cache)
        if installed != version:
            raise LabError(f"npm installed meshcentral {installed!r}, expected {version!r}")
        tmp = cache / f"{_INSTALL_MARKER}.tmp"
        tmp.write_text(version + "\n")
        tmp.replace(cache / _INSTALL_MARKER)
        say(f"meshcentral@{version} installed in {time.monotonic() - started:.1f} s")
    return cache


# --------------------------------------------------------------------------- helpers


def node_id_from_hex(hex_id: str) -> str:
    """Turn ``meshagent -nodeid`` output (96 hex digits) into MeshCentral's ``node//...`` id.

    MeshCentral's form is the base64 of the 48 bytes with ``+`` replaced by ``@`` and ``/``
    by ``$``.

    Raises:
        ValueError: ``hex_id`` is not 96 hex digits.
    """
    hex_id = hex_id.strip()
    if not _HEX_NODE_ID_RE.match(hex_id):
        raise ValueError(f"not a meshagent node id: {hex_id!r}")
    encoded = base64.b64encode(binascii.unhexlify(hex_id)).decode("ascii")
    return "node//" + encoded.replace("+", "@").replace("/", "$")


def _loopback_opener() -> urllib.request.OpenerDirector:
    """urllib opener for the lab server: no proxy, its self-signed certificate accepted."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _clean_env() -> dict[str, str]:
    # Everything in the lab talks to 127.0.0.1 only. A proxy variable would also make
    # MeshCentral npm-install https-proxy-agent at start-up (a network access).
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members: list[int] = []
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
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


def _descendants(pid: int) -> list[int]:
    """Live processes descending from ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(name))
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


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def _random_password(length: int = 24) -> str:
    # Letters and digits only: the password goes on a command line that MeshCentral
    # parses with minimist (a leading "-" would be taken for an option).
    alphabet = string.ascii_letters + string.digits
    return "Lab" + "".join(secrets.choice(alphabet) for _ in range(length))


# Labs still running, closed at interpreter exit if their owner forgot.
_LIVE_LABS: set[MeshLab] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _close_live_labs() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE_LABS)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.close()


# --------------------------------------------------------------------------- agent


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
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the agent process is alive."""
        return self._proc is not None and self._proc.poll() is None

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
            # its commands' temporary files (and once-only guards) stay in its directory
            tmp = self._dir / "tmp"
            tmp.mkdir(exist_ok=True)
            self._proc = subprocess.Popen(
                ["./meshagent"],
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**_clean_env(), "TMPDIR": str(tmp)},
                start_new_session=True,
            )
        pid_file.write_text(f"{self._proc.pid}\n")
        if wait and self._node_id is None:
            self.wait_enrolled(timeout=timeout)

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the agent: SIGTERM (or SIGKILL with ``kill=True``) to its process group.

        Waits until every process of the group (including commands it was running) is
        gone. No-op if it is not running.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # Commands the agent runs may sit in process groups of their own (GhostRunner's
        # wrapper puts each command in one, to kill it on timeout). A stopped device
        # runs nothing, so they go too: otherwise an orphan keeps the agent's socket
        # open and the server sees the device online until its idle timeout.
        orphans = _descendants(proc.pid)
        _kill_group(proc.pid, proc, kill=kill, timeout=timeout)
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


# --------------------------------------------------------------------------- lab


class MeshLab:
    """A loopback-only MeshCentral server with one device group and local agents.

    Args:
        root: Directory owning all lab data (created if needed). Reopening an existing
            root reuses its server data, admin account, port, group and agents.
        version: MeshCentral version (installed on first use, see
            :func:`install_meshcentral`).
        port: HTTPS/WSS port on 127.0.0.1; default: a free port, chosen once and kept
            for the root (agents' settings contain it).
        agent_idle_timeout: Server-side idle timeout (s) of agent sockets
            (``agentIdleTimeout``); agents are told to ping more often than that
            (``controlChannelIdleTimeout``), so a silently dead link is noticed in about
            this time instead of ~2.5 min.
        log: Receives progress messages; default: none (npm progress still goes to
            stderr).
        cache_dir: Where MeshCentral is installed; default :func:`default_cache_dir`.
        flap_guard: Keep MeshCentral's anti-flapping guard on (production behaviour):
            an agent that disconnects more than 4 times within the server's 120 s window
            is shown connected but has its core cleared, so commands sent to it are
            silently dropped. Off by default, since tests stop and start agents often.

    The lab is a context manager: ``with MeshLab(path) as lab:`` starts it and closes
    it (agents and server stopped, no process left) on exit. It is not thread-safe.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        version: str = DEFAULT_VERSION,
        port: int | None = None,
        agent_idle_timeout: int = 20,
        log: LogFunc | None = None,
        cache_dir: Path | str | None = None,
        flap_guard: bool = False,
    ) -> None:
        self._flap_guard = flap_guard
        if agent_idle_timeout < 4:
            raise ValueError("agent_idle_timeout must be at least 4 seconds")
        self._root = Path(root).expanduser().resolve()
        self._version = version
        self._agent_idle_timeout = agent_idle_timeout
        self._log: LogFunc = log or _quiet_log
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._agents: dict[str, Agent] = {}
        self._node: str | None = None
        self._package: Path | None = None
        self.timings: dict[str, float] = {}
        """Seconds spent in the last install / server start / group creation (for benchmarks)."""

        self._root.mkdir(parents=True, exist_ok=True)
        self._state: dict[str, Any] = self._load_state()
        saved_version = self._state.get("version")
        if saved_version is not None and saved_version != version:
            raise LabError(f"{self._root} holds a MeshCentral {saved_version} lab, not {version}")
        saved_port = self._state.get("port")
        if saved_port is not None and port is not None and port != saved_port:
            raise LabError(
                f"{self._root} is a lab on port {saved_port} (its agents' settings say so), "
                f"not {port}"
            )
        self._port: int = int(saved_port or port or _free_port())
        self._state.update(version=version, port=self._port)
        self._save_state()

    def __repr__(self) -> str:
        return f"MeshLab(root={str(self._root)!r}, port={self._port}, running={self.running})"

    # ----------------------------------------------------------------- properties

    @property
    def root(self) -> Path:
        """The lab directory."""
        return self._root

    @property
    def data_dir(self) -> Path:
        """MeshCentral's ``meshcentral-data`` directory (inside :attr:`root`)."""
        return self._root / "meshcentral-data"

    @property
    def log_path(self) -> Path:
        """The server's stdout/stderr, appended on every start."""
        return self._root / "meshcentral.log"

    @property
    def version(self) -> str:
        """MeshCentral version of this lab."""
        return self._version

    @property
    def port(self) -> int:
        """The server's port on 127.0.0.1."""
        return self._port

    @property
    def url(self) -> str:
        """WebSocket URL for clients such as libmeshctrl: ``wss://127.0.0.1:PORT``."""
        return f"wss://127.0.0.1:{self._port}"

    @property
    def https_url(self) -> str:
        """``https://127.0.0.1:PORT`` (self-signed certificate)."""
        return f"https://127.0.0.1:{self._port}"

    @property
    def admin_user(self) -> str:
        """Name of the lab's site administrator."""
        return str(self._state.get("admin_user", "admin"))

    @property
    def admin_password(self) -> str:
        """Password of :attr:`admin_user` (random, created on the first start).

        Raises:
            LabError: the lab was never started.
        """
        password = self._state.get("admin_password")
        if not self._state.get("admin_created") or not isinstance(password, str):
            raise LabError("the lab has not been started yet: no admin account")
        return password

    @property
    def group_id(self) -> str:
        """The device group's full id, ``mesh//...``.

        Raises:
            LabError: the lab was never started.
        """
        group_id = self._state.get("group_id")
        if not isinstance(group_id, str):
            raise LabError("the lab has not been started yet: no device group")
        return group_id

    @property
    def group_name(self) -> str:
        """The device group's name."""
        return str(self._state.get("group_name", "ghostrunner-lab"))

    @property
    def running(self) -> bool:
        """True while the server process is alive (not necessarily answering)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID (= process group id) of the running server's watchdog process, or None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def agents(self) -> list[Agent]:
        """Agents added to this lab object, in creation order."""
        return list(self._agents.values())

    @property
    def package_dir(self) -> Path:
        """The installed ``node_modules/meshcentral`` (installs it if needed)."""
        if self._package is None:
            started = time.monotonic()
            cache = install_meshcentral(self._version, self._cache_dir, log=None)
            self.timings["install"] = time.monotonic() - started
            self._package = cache / "node_modules" / "meshcentral"
        return self._package

    # ----------------------------------------------------------------- state

    def _load_state(self) -> dict[str, Any]:
        try:
            data = json.loads((self._root / _STATE_FILE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise LabError(f"unreadable lab state {self._root / _STATE_FILE}: {exc}") from exc
        if not isinstance(data, dict):
            raise LabError(f"unreadable lab state {self._root / _STATE_FILE}")
        return data

    def _save_state(self) -> None:
        _write_private(self._root / _STATE_FILE, json.dumps(self._state, indent=2) + "\n")

    # ----------------------------------------------------------------- processes

    def _node_exe(self) -> str:
        if self._node is None:
            node = shutil.which("node")
            if node is None:
                raise LabError("node not found on PATH: the MeshCentral lab needs Node.js")
            self._node = node
        return self._node

    def _run_node(self, args: Sequence[str], *, timeout: float = 60.0) -> str:
        cmd = [self._node_exe(), *args]
        try:
            done = subprocess.run(
                cmd,
                cwd=self._root,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                env=_clean_env(),
            )
        except subprocess.TimeoutExpired as exc:
            raise LabTimeoutError(f"{args[:2]} took more than {timeout} s") from exc
        if done.returncode != 0:
            raise LabError(
                f"{' '.join(args[:2])} failed (exit {done.returncode}):\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    def _write_config(self) -> None:
        data_dir = self.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        (self._root / "meshcentral-files").mkdir(exist_ok=True)
        config: dict[str, Any] = {
            "settings": {
                "cert": "127.0.0.1",
                "port": self._port,
                "portBind": "127.0.0.1",
                "redirPort": 0,
                "mpsPort": 0,
                "exactPorts": True,
                "WANonly": True,
                "amtManager": False,
                "amtScanner": False,
                "meshScanner": False,
                "selfUpdate": False,
                "noAgentUpdate": 1,
                "agentTimeStampServer": False,
                "agentIdleTimeout": self._agent_idle_timeout,
                # --datapath only tells where config.json is; these move the data.
                "datapath": str(data_dir),
                "filespath": str(self._root / "meshcentral-files"),
                # Default is a daily backup into <package>/../../meshcentral-backups,
                # i.e. into the shared cache.
                "autoBackup": False,
            },
            "domains": {"": {"newAccounts": False}},
        }
        if not self._flap_guard:
            # Undocumented (meshagent.js counts disconnections only while
            # args.agentupdatetest is unset): skips the anti-flapping counter, which
            # would otherwise neuter agents that a test stops and starts often.
            config["settings"]["agentUpdateTest"] = False
        (data_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def _server_args(self, *extra: str) -> list[str]:
        return [str(self.package_dir), "--datapath", str(self.data_dir), *extra]

    def _ensure_admin(self) -> None:
        if self._state.get("admin_created"):
            return
        user = str(self._state.setdefault("admin_user", "admin"))
        password = str(self._state.setdefault("admin_password", _random_password()))
        self._save_state()
        self._log(f"creating admin account {user!r}")
        # With the server stopped: the NeDB files belong to the running server.
        self._run_node(
            self._server_args(
                "--createaccount", user, "--pass", password,
                "--email", f"{user}@lab.invalid", "--name", user,
            )
        )  # fmt: skip
        self._run_node(self._server_args("--adminaccount", user))
        self._state["admin_created"] = True
        self._save_state()

    def _is_our_server(self, pid: int) -> bool:
        args = _cmdline(pid)
        return str(self.data_dir) in args or any("meshaccelerator" in a for a in args)

    def _answers(self) -> bool:
        opener = _loopback_opener()
        try:
            with opener.open(self.https_url + "/", timeout=2.0) as resp:
                resp.read(1)
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except (OSError, ssl.SSLError):
            return False
        return True

    def start(self, timeout: float = 120.0) -> None:
        """Start the server, creating admin account and device group on first start.

        Installs MeshCentral if needed, writes ``config.json``, starts the server in its
        own process group and waits until ``https://127.0.0.1:PORT/`` answers. On the
        first start of a root it creates the admin account (before the server runs) and
        the device group, and fetches the group's agent settings. No-op if running.

        Raises:
            LabError: node/npm missing, port taken, or the server died while starting.
            LabTimeoutError: the server did not answer within ``timeout``.
        """
        if self.running:
            return
        # Processes of an earlier run on this root that crashed (or was SIGKILLed).
        _reap_stale_group(self._root / "server.pid", self._is_our_server, self._log)
        for pid_file in self._root.glob("agents/*/agent.pid"):
            agent = self._agents.get(pid_file.parent.name)
            if agent is None or not agent.running:
                _reap_stale_agent(pid_file.parent, self._log)
        _ = self.package_dir  # install first: its time is not the server's
        started = time.monotonic()
        self._write_config()
        self._ensure_admin()
        # Sockets of a server that was just stopped can linger for a moment.
        port_deadline = time.monotonic() + 10.0
        while not _port_is_free(self._port):
            if time.monotonic() > port_deadline:
                raise LabError(f"port 127.0.0.1:{self._port} is already in use")
            time.sleep(0.1)
        self._log(f"starting MeshCentral {self._version} on {self.https_url}")
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== server start {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [self._node_exe(), *self._server_args()],
                cwd=self._root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                start_new_session=True,
            )
        (self._root / "server.pid").write_text(f"{self._proc.pid}\n")
        with _LIVE_LOCK:
            _LIVE_LABS.add(self)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if not self.running:
                self._proc = None
                raise LabError(f"MeshCentral exited while starting:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise LabTimeoutError(
                    f"MeshCentral did not answer on {self.https_url} within {timeout:.0f} s:\n"
                    + _tail(self.log_path)
                )
            time.sleep(0.1)
        self.timings["server_start"] = time.monotonic() - started
        self._log(f"MeshCentral answers after {self.timings['server_start']:.1f} s")
        if "group_id" not in self._state:
            self._create_group()
        if not (self._root / "group.msh").exists():
            self._fetch_group_settings()

    def _create_group(self) -> None:
        started = time.monotonic()
        name = self.group_name
        out = self.meshctrl("adddevicegroup", "--name", name)
        match = re.search(r"\bok (mesh//\S+)", out)
        if match is None:
            raise LabError(f"could not create device group {name!r}: {out.strip()}")
        self._state.update(group_id=match.group(1), group_name=name)
        self._save_state()
        self.timings["create_group"] = time.monotonic() - started
        self._log(f"created device group {name!r}: {match.group(1)}")

    def _fetch_group_settings(self) -> None:
        short_id = self.group_id.split("/")[-1]
        query = urllib.parse.urlencode({"id": short_id})
        opener = _loopback_opener()
        with opener.open(f"{self.https_url}/meshsettings?{query}", timeout=30) as resp:
            text = resp.read().decode("utf-8", errors="replace")
        if "MeshID=" not in text or "MeshServer=" not in text:
            raise LabError(f"unexpected /meshsettings answer: {text[:200]!r}")
        (self._root / "group.msh").write_text(text)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (its whole process group); agents keep running.

        Running agents lose their connection and keep retrying with their own backoff:
        after :meth:`start` they come back by themselves, 1-8 s later in our
        measurements (use :meth:`wait_connected`). No-op if the server is not running.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            self._log("stopping MeshCentral")
            _kill_group(proc.pid, proc, timeout=timeout)
        (self._root / "server.pid").unlink(missing_ok=True)

    def restart(self, timeout: float = 120.0) -> None:
        """Stop and start the server: same data, port, group; agents keep their ids."""
        self.stop()
        self.start(timeout=timeout)

    def close(self) -> None:
        """Stop every agent of this lab and the server. Idempotent; also run at exit."""
        errors: list[BaseException] = []
        for agent in self._agents.values():
            try:
                agent.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        try:
            self.stop()
        except Exception as exc:
            errors.append(exc)
        with _LIVE_LOCK:
            _LIVE_LABS.discard(self)
        if errors:
            raise LabError(f"errors while closing the lab: {errors!r}") from errors[0]

    def __enter__(self) -> MeshLab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- meshctrl

    def meshctrl(self, *args: str, timeout: float = 60.0) -> str:
        """Run MeshCentral's ``meshctrl.js`` as the lab admin and return its stdout.

        ``args`` are the command and its options, e.g. ``("listdevices", "--json")``;
        ``--url``, ``--loginuser`` and ``--loginpass`` are added. Note that meshctrl.js
        reports many errors on stdout with exit status 0: check the output.

        Raises:
            LabError: exit status not 0.
            LabTimeoutError: it ran longer than ``timeout``.
        """
        return self._run_node(
            [
                str(self.package_dir / "meshctrl.js"),
                *args,
                "--url", self.url,
                "--loginuser", self.admin_user,
                "--loginpass", self.admin_password,
            ],
            timeout=timeout,
        )  # fmt: skip

    def list_devices(self, *, group_only: bool = True) -> list[dict[str, Any]]:
        """The server's device list (``meshctrl.js listdevices --json``).

        Each device is a dict with ``_id`` (node id), ``name``, ``meshid`` and ``conn``
        (bit 1 set = agent connected), among others.

        Args:
            group_only: Only devices of the lab's device group.
        """
        out = self.meshctrl("listdevices", "--json").strip()
        if out in ("", "None", "[]"):
            return []
        try:
            devices = json.loads(out)
        except ValueError as exc:
            raise LabError(f"listdevices did not return JSON: {out[:300]!r}") from exc
        if not isinstance(devices, list):
            raise LabError(f"listdevices did not return a list: {out[:300]!r}")
        result = [d for d in devices if isinstance(d, dict)]
        if group_only:
            group_id = self.group_id
            result = [d for d in result if d.get("meshid") == group_id]
        return result

    def connected_node_ids(self) -> set[str]:
        """Node ids of the group's devices whose agent is connected (``conn & 1``)."""
        return {d["_id"] for d in self.list_devices() if int(d.get("conn") or 0) & 1}

    def create_login_token(self, name: str = "ghostrunner") -> tuple[str, str]:
        """Create a non-expiring MeshCentral login token for the admin.

        Returns:
            ``(token_user, token_password)``; the user is ``~t:...``. They work as
            user/password for libmeshctrl's ``Session`` and skip 2FA.
        """
        out = self.meshctrl("logintokens", "--add", name)
        user = re.search(r"^Username: (\S+)$", out, re.MULTILINE)
        password = re.search(r"^Password: (\S+)$", out, re.MULTILINE)
        if user is None or password is None:
            raise LabError(f"could not create a login token: {out.strip()}")
        return user.group(1), password.group(1)

    # ----------------------------------------------------------------- agents

    def agent_settings(self, name: str) -> str:
        """The ``meshagent.msh`` text for an agent called ``name``.

        The group's settings with ``\\r`` stripped, the ``translation=`` line and blank
        lines dropped, plus ``agentName``, ``skipmaccheck=1`` (a changed network must
        not make a new identity) and ``controlChannelIdleTimeout`` below the server's
        ``agentIdleTimeout``.
        """
        try:
            text = (self._root / "group.msh").read_text()
        except FileNotFoundError as exc:
            raise LabError("the lab has not been started yet: no group settings") from exc
        lines = [
            line
            for line in text.replace("\r", "").split("\n")
            if line.strip() and not line.startswith("translation=")
        ]
        ping = max(2, self._agent_idle_timeout // 2)
        lines += [f"agentName={name}", "skipmaccheck=1", f"controlChannelIdleTimeout={ping}"]
        return "\n".join(lines) + "\n"

    def add_agent(self, name: str) -> Agent:
        """Create (or reuse) the agent directory ``root/agents/NAME``; do not start it.

        An existing directory keeps its identity, so the agent is the same device again.
        The lab must have been started once (the group settings are needed).

        Args:
            name: Device name: letters, digits, ``.``, ``_``, ``-`` (max 64).

        Raises:
            ValueError: bad or duplicate name.
            LabError: the lab was never started.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid agent name {name!r}")
        if name in self._agents:
            raise ValueError(f"agent {name!r} already exists in this lab")
        settings = self.agent_settings(name)
        directory = self._root / "agents" / name
        directory.mkdir(parents=True, exist_ok=True)
        binary = directory / "meshagent"
        if not binary.exists():
            source = self.package_dir / "agents" / _AGENT_BINARY
            tmp = directory / "meshagent.tmp"
            shutil.copyfile(source, tmp)  # the packaged file is mode 0644
            tmp.chmod(0o755)
            tmp.replace(binary)
        msh = directory / "meshagent.msh"
        if not msh.exists() or msh.read_text() != settings:
            msh.write_text(settings)
        agent = Agent(self, name, directory)
        self._agents[name] = agent
        return agent

    def start_agents(self, agents: Iterable[Agent], timeout: float = 60.0) -> None:
        """Start several agents at once and wait for the first enrolment of new ones.

        Faster than starting them one by one with ``wait=True``: new agents generate
        their identities in parallel.
        """
        todo = list(agents)
        for agent in todo:
            agent.start(wait=False)
        deadline = time.monotonic() + timeout
        for agent in todo:
            agent.wait_enrolled(timeout=max(1.0, deadline - time.monotonic()))

    def wait_connected(
        self,
        agents: Iterable[Agent],
        connected: bool = True,
        timeout: float = 30.0,
        interval: float = 0.25,
    ) -> None:
        """Wait until the server lists every agent as connected (or, with
        ``connected=False``, as disconnected), judged by ``conn & 1`` in
        ``listdevices``.

        Raises:
            LabTimeoutError: some agents are not in the wanted state after ``timeout``.
        """
        wanted = {agent.node_id: agent.name for agent in agents}
        deadline = time.monotonic() + timeout
        while True:
            online = self.connected_node_ids()
            late = [name for nid, name in wanted.items() if (nid in online) != connected]
            if not late:
                return
            if time.monotonic() > deadline:
                state = "connected" if connected else "disconnected"
                raise LabTimeoutError(f"agents not {state} after {timeout:.0f} s: {late}")
            time.sleep(interval)

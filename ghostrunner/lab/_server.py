"""The lab itself: a loopback-only MeshCentral server with one device group."""

from __future__ import annotations

import atexit
import contextlib
import json
import re
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from ._agent import Agent
from ._common import (
    LabError,
    LabTimeoutError,
    LogFunc,
    _clean_env,
    _free_port,
    _loopback_opener,
    _port_is_free,
    _quiet_log,
    _random_password,
    _require_posix,
    _tail,
    _write_private,
)
from ._install import DEFAULT_VERSION, install_meshcentral
from ._procs import (
    _alive,
    _cmdline,
    _is_agent_process,
    _kill_group,
    _read_pid,
    _reap_stale_agent,
    _reap_stale_group,
)

_STATE_FILE: Final = "lab.json"
_AGENT_BINARY: Final = "meshagent_x86-64"
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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

    A lab that should outlive this process (``ghostrunner lab up``) is left running
    with :meth:`detach`; a later object on the same root takes it over with
    :meth:`attach` (``ghostrunner lab status|down``).

    Raises:
        LabError: this is not a POSIX system with ``/proc`` (Linux), or ``root`` holds
            a lab of another version or port.
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
        _require_posix()
        self._flap_guard = flap_guard
        if agent_idle_timeout < 4:
            raise ValueError("agent_idle_timeout must be at least 4 seconds")
        self._root = Path(root).expanduser().resolve()
        self._version = version
        self._agent_idle_timeout = agent_idle_timeout
        self._log: LogFunc = log or _quiet_log
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        # PID of a server started by another lab object on this root (see attach)
        self._adopted: int | None = None
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
        return self.pid is not None

    @property
    def pid(self) -> int | None:
        """PID (= process group id) of the running server's watchdog process, or None."""
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        if self._adopted is not None and self._is_this_server(self._adopted):
            return self._adopted
        return None

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

    def _is_this_server(self, pid: int) -> bool:
        """True if ``pid`` is alive and is the server of this root (not a reused PID)."""
        return _alive(pid) and str(self.data_dir) in _cmdline(pid)

    def _answers(self) -> bool:
        opener = _loopback_opener()
        try:
            with opener.open(self.https_url + "/", timeout=2.0) as resp:
                resp.read(1)
        except urllib.error.HTTPError as exc:
            exc.close()  # its answer holds the socket: left to the collector, it warns
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
            self._adopted = None
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
        adopted, self._adopted = self._adopted, None
        if proc is not None:
            self._log("stopping MeshCentral")
            _kill_group(proc.pid, proc, timeout=timeout)
        elif adopted is not None and self._is_this_server(adopted):
            self._log(f"stopping MeshCentral (pid {adopted})")
            _kill_group(adopted, None, timeout=timeout)
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

    def detach(self) -> None:
        """Leave the server and agents running when this process exits.

        Their process groups are not closed at interpreter exit (they already run in
        sessions of their own, so they survive their parent). Their PIDs stay recorded
        under :attr:`root`, for :meth:`attach` in another process. :meth:`close` and
        :meth:`stop` still stop them if called; a later :meth:`start` registers the lab
        for closing at exit again.
        """
        with _LIVE_LOCK:
            _LIVE_LABS.discard(self)

    def attach(self) -> bool:
        """Take over a server and agents of this root that another process left running
        (see :meth:`detach`), found by their recorded PIDs.

        Every agent directory under ``root/agents`` becomes an :class:`Agent` of this
        object (see :attr:`agents`), running or not, unless it was added already. The
        processes are then this object's: :meth:`close` stops them, and so does
        interpreter exit unless :meth:`detach` is called again. A PID is only taken if
        that process still is this root's server or that directory's agent.

        Returns:
            True if the server is running.
        """
        if self._proc is None and self._adopted is None:
            pid = _read_pid(self._root / "server.pid")
            if pid is not None and self._is_this_server(pid):
                self._adopted = pid
        for directory in sorted(self._root.glob("agents/*")):
            name = directory.name
            if not _NAME_RE.match(name) or not (directory / "meshagent").exists():
                continue
            agent = self._agents.get(name)
            if agent is None:
                agent = self._agents[name] = Agent(self, name, directory)
            pid = _read_pid(directory / "agent.pid")
            if not agent.running and pid is not None and _is_agent_process(pid, directory):
                agent._adopt(pid)
        if self.running or any(agent.running for agent in self._agents.values()):
            with _LIVE_LOCK:
                _LIVE_LABS.add(self)
        return self.running

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

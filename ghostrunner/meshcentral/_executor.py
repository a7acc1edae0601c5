"""The MeshCentral :class:`~ghostrunner.Executor`, over libmeshctrl.

What MeshCentral gives us, and what this module makes of it (see
``docs/meshcentral.md`` for the measured facts behind each point):

* **Who is online.** ``nodeconnect`` events (``conn & 1``) say an agent connected, but a
  command sent in the ~0.3 s before the agent finishes starting is silently dropped. A
  device is therefore reported online (ready) only after its ``devicesessions`` event,
  or ``ready_fallback`` seconds after connecting if that event never comes. After every
  (re)login a full snapshot replaces the view, since events are lost while disconnected.
* **The session.** libmeshctrl does not fail pending calls on a drop and does not notice
  a clean close until the next send. We run one session at a time without its
  auto-reconnect, ping it every ``ping_interval`` with a timeout, and rebuild it with
  backoff whenever it is dead or silent. Every wait has a timeout.
* **Dispatch.** One device per ``runcommands`` message, a unique response id per
  dispatch (MeshCentral broadcasts replies to every session with rights on the node),
  and a wrapper (``_wrappers.py``) that prints a BEGIN line carrying a per-run random
  marker, then the command's output, then an END line carrying the exit status.
* **Delivered or not.** While a command runs the agent broadcasts its output as console
  chunks. Seeing our BEGIN marker there proves the command started. An error reply
  ("Agent not connected"), the agent's "already busy" message, or no sign of life within
  ``start_timeout`` on a session that has shown console chunks before, prove it did not:
  :class:`~ghostrunner.NotDelivered`. Started but no reply in time, or the device went
  away mid-run: :class:`~ghostrunner.OutcomeUnknown`.
* **Never twice on a resend; outcomes recovered.** Every dispatch of one attempt
  carries the same key (:func:`once_key`), under which ``sh`` agents keep a record of
  the attempt in their journal: a second dispatch of the key never runs the command
  again but reports its record (recovered), says it is still running, or that it
  started and never finished. A run whose reply was lost (no reply, the device or the
  session went away, GhostRunner restarted) is therefore a *recoverable*
  :class:`~ghostrunner.OutcomeUnknown`: the loop asks again with ``recover=True``.
  Records are removed once collected: the keys of earlier replies to a device ride
  along with a later dispatch to it (in batches of ``collect_batch``), which the loop
  sends only once those results are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs

from .._fanout import EventFanout
from .._types import (
    AgentKind,
    Device,
    DeviceEvent,
    EventKind,
    Outcome,
    RunRequest,
    Shell,
    utcnow,
)
from ..errors import NotDelivered, OutcomeUnknown, PermanentError
from ._wrappers import WrappedCommand, has_started, parse_result, wrap_command

__all__ = ["MeshCentralExecutor"]

log = logging.getLogger("ghostrunner.meshcentral")

_WINDOWS_AGENT_IDS = frozenset({1, 2, 3, 4, 21, 22, 34, 42, 43})
_BUSY_TEXT = "Run commands can't execute, already busy."
_PERMANENT_REPLIES = {"Invalid nodeid", "Access denied", "Invalid command type", "Invalid domain"}
_DEVICE_EVENTS = frozenset(
    {"nodeconnect", "devicesessions", "addnode", "removenode", "changenode",
     "nodemeshchange", "deletemesh", "createmesh", "meshchange"}
)


def agent_kind(agent: Mapping[str, Any] | None) -> AgentKind:
    """The agent family from MeshCentral's agent type id."""
    if not agent or not isinstance(agent.get("id"), int):
        return AgentKind.UNKNOWN
    return AgentKind.WINDOWS if agent["id"] in _WINDOWS_AGENT_IDS else AgentKind.POSIX


@attrs.define
class _Dispatch:
    """One command in flight: what we sent and what we have heard of it."""

    node_id: str
    wrapped: WrappedCommand
    responseid: str
    started: asyncio.Event = attrs.field(factory=asyncio.Event)
    done: asyncio.Future[dict[str, Any]] = attrs.field(
        factory=lambda: asyncio.get_running_loop().create_future()
    )
    console: str = ""
    ended: bool = False  # the console showed the END line
    busy: bool = False
    gone: bool = False  # the device disconnected while we waited


@attrs.define
class _Node:
    """Our view of one device, beyond what Device carries."""

    device: Device
    connected: bool = False
    ready: bool = False
    ready_timer: asyncio.TimerHandle | None = None


def redact_url(url: str) -> str:
    """``url`` with any password in it replaced by ``***`` (for logs and reprs)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{slash}{path}"


def once_key(request: RunRequest) -> str:
    """The key of the wrapper's once-only guard for ``request``: the same for every
    dispatch of one attempt of one run, so that a resend (after a start timeout) can
    never run the command a second time on the device; a new attempt gets a new key."""
    text = f"{request.task_id}\0{request.node_id}\0{request.attempt}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class MeshCentralExecutor:
    """Runs commands through a MeshCentral server with libmeshctrl.

    Args:
        url: the server's websocket URL, e.g. ``wss://mesh.example.com`` (or ``:PORT``).
        user: the MeshCentral user, or a login token's ``~t:...`` user name.
        password: the user's password, or the login token's password. Never logged.
        ignore_ssl: accept a self-signed server certificate.
        group_id: only manage devices of this device group (``mesh//...``).
        start_timeout: seconds to wait for a dispatched command to show it started.
        reply_grace: seconds past the task's timeout to wait for the reply.
        ping_interval: seconds between session health checks.
        ready_fallback: seconds after ``nodeconnect`` to treat a device as ready if its
            ``devicesessions`` event never arrives.
        collect_batch: records of a device's earlier attempts to remove in one go (a
            dispatch that carries them costs the device one ``find``).
    """

    def __init__(
        self,
        url: str,
        *,
        user: str,
        password: str,
        ignore_ssl: bool = False,
        group_id: str | None = None,
        start_timeout: float = 10.0,
        reply_grace: float = 15.0,
        ping_interval: float = 10.0,
        call_timeout: float = 10.0,
        ready_fallback: float = 3.0,
        reconnect_cap: float = 30.0,
        collect_batch: int = 16,
    ) -> None:
        self.url = url
        self.user = user
        self._password = password
        self.ignore_ssl = ignore_ssl
        self.group_id = group_id
        self.start_timeout = start_timeout
        self.reply_grace = reply_grace
        self.ping_interval = ping_interval
        self.call_timeout = call_timeout
        self.ready_fallback = ready_fallback
        self.reconnect_cap = reconnect_cap
        self.collect_batch = collect_batch
        self._collect: dict[str, list[str]] = {}  # node id -> keys of replied attempts
        self._nodes: dict[str, _Node] = {}
        self._group_names: dict[str, str] = {}  # device group id -> its name
        self._by_response: dict[str, _Dispatch] = {}
        self._by_node: dict[str, _Dispatch] = {}
        self._fanout = EventFanout()
        self._session: Any = None
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._console_verified = False
        self.sessions_started = 0
        self.last_error: str | None = None
        # diagnostics (monotonic seconds), read by benchmarks and operators
        self.ready_at: dict[str, float] = {}
        """When each device last became ready (its devicesessions event, or fallback)."""
        self.sent_at: dict[str, float] = {}
        """When the last command to each device was handed to the session."""

    def __repr__(self) -> str:
        return (
            f"MeshCentralExecutor(url={redact_url(self.url)!r}, user={self.user!r}, "
            f"group_id={self.group_id!r}, connected={self.connected})"
        )

    @property
    def connected(self) -> bool:
        """True while a live, logged-in session exists."""
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a session is up and its device snapshot taken."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    # ---------------------------------------------------------------- Executor: lifecycle

    async def open(self) -> None:
        """Start connecting in the background. Never fails because the server is down:
        the supervisor keeps trying with backoff; meanwhile every device is offline."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(
                self._supervise(), name="ghostrunner-meshcentral"
            )

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        for dispatch in list(self._by_response.values()):
            if not dispatch.done.done():
                dispatch.done.set_exception(OutcomeUnknown(
                    "executor closed", recoverable=dispatch.wrapped.journal))
        for node in self._nodes.values():
            if node.ready_timer is not None:
                node.ready_timer.cancel()
        self._emit(None)

    # ---------------------------------------------------------------- Executor: view

    def devices(self) -> Mapping[str, Device]:
        return {node_id: n.device for node_id, n in self._nodes.items()}

    def events(self) -> AsyncIterator[DeviceEvent]:
        return self._fanout.subscribe()

    def _emit(self, event: DeviceEvent | None) -> None:
        if event is None:
            self._fanout.close()
        else:
            self._fanout.publish(event)

    # ---------------------------------------------------------------- session supervision

    async def _supervise(self) -> None:
        from meshctrl.session import Session  # the backend import, kept to this module

        delay = 1.0
        while True:
            session = None
            listener: asyncio.Task[None] | None = None
            try:
                session = Session(
                    self.url,
                    user=self.user,
                    password=self._password,
                    ignore_ssl=self.ignore_ssl,
                    auto_reconnect=False,
                )
                await asyncio.wait_for(session.initialized.wait(), self.call_timeout + 5)
                if not session.alive:
                    raise ConnectionError(self._session_error(session))
                self._session = session
                self.sessions_started += 1
                listener = asyncio.create_task(self._listen(session), name="ghostrunner-mc-listen")
                await self._snapshot(session)
                self._connected.set()
                self.last_error = None
                delay = 1.0
                log.info("connected to MeshCentral at %s as %s", redact_url(self.url), self.user)
                self._emit(DeviceEvent(kind=EventKind.RESYNC))
                await self._watch(session, listener)
                log.warning("MeshCentral session lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = _describe(exc)
                log.warning(
                    "MeshCentral at %s unavailable (%s); retrying in %.0fs",
                    redact_url(self.url), self.last_error, delay,
                )
            finally:
                self._connected.clear()
                self._session = None
                if listener is not None:
                    listener.cancel()
                    with contextlib.suppress(BaseException):
                        await listener
                if session is not None:
                    with contextlib.suppress(BaseException):
                        await asyncio.wait_for(session.close(), 5)
                self._all_offline()
            await asyncio.sleep(delay)
            delay = min(self.reconnect_cap, delay * 2)

    def _session_error(self, session: Any) -> str:
        err = getattr(session, "_main_loop_error", None)
        return _describe(err) if err is not None else "could not connect"

    async def _watch(self, session: Any, listener: asyncio.Task[None]) -> None:
        """Return when the session is dead: closed, listener ended, or a ping unanswered."""
        while True:
            closed = asyncio.create_task(session.closed.wait())
            try:
                await asyncio.wait(
                    {closed, listener}, timeout=self.ping_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                closed.cancel()
            if session.closed.is_set() or listener.done() or not session.alive:
                return
            try:
                await session.ping(timeout=self.call_timeout)
            except Exception as exc:
                log.warning("MeshCentral ping failed: %s", _describe(exc))
                return

    async def _snapshot(self, session: Any) -> None:
        """Replace the device view with the server's list (after every login)."""
        groups = await session._send_command(
            {"action": "meshes"}, "ghostrunner_meshes", timeout=self.call_timeout,
            responseid=f"ghostrunner_meshes_{secrets.token_hex(6)}",
        )
        self._group_names = {
            str(mesh["_id"]): str(mesh.get("name") or "")
            for mesh in groups.get("meshes") or ()
            if isinstance(mesh, Mapping) and isinstance(mesh.get("_id"), str)
        }
        request: dict[str, Any] = {"action": "nodes"}
        if self.group_id:
            request["meshid"] = self.group_id
        reply = await session._send_command(
            request, "ghostrunner_nodes", timeout=self.call_timeout,
            responseid=f"ghostrunner_nodes_{secrets.token_hex(6)}",
        )
        if "result" in reply and not reply.get("nodes"):
            raise ConnectionError(f"listing devices failed: {reply['result']}")
        seen: set[str] = set()
        for mesh_id, nodes in (reply.get("nodes") or {}).items():
            if self.group_id and mesh_id != self.group_id:
                continue
            for raw in nodes:
                node_id = raw.get("_id")
                if not isinstance(node_id, str):
                    continue
                seen.add(node_id)
                connected = bool(int(raw.get("conn") or 0) & 1)
                existing = self._nodes.get(node_id)
                device = self._device_from(raw, mesh_id, existing)
                node = existing or _Node(device=device)
                node.device = device
                self._nodes[node_id] = node
                if connected and not node.connected:
                    # connected before we looked; its start-up is long over (or nearly):
                    # at worst a dispatch in that window is dropped and retried
                    self._set_ready(node, True)
                elif not connected:
                    node.connected = False
                    self._set_ready(node, False)
        for node_id in set(self._nodes) - seen:
            self._forget(node_id)

    def _device_from(self, raw: Mapping[str, Any], mesh_id: str | None,
                     existing: _Node | None) -> Device:
        # ``raw`` is a whole node (from the snapshot, addnode or changenode): MeshCentral
        # leaves ``tags`` out when a device has none
        base = existing.device if existing else Device(node_id=str(raw["_id"]))
        group_id = mesh_id or raw.get("meshid") or base.group_id
        return attrs.evolve(
            base,
            name=str(raw.get("name") or raw.get("rname") or base.name),
            group_id=group_id,
            group_name=self._group_names.get(group_id or "", base.group_name),
            tags=tuple(t for t in raw.get("tags") or () if isinstance(t, str)),
            os=raw.get("osdesc") or base.os,
            agent_kind=agent_kind(raw.get("agent")) if raw.get("agent") else base.agent_kind,
        )

    def _all_offline(self) -> None:
        changed = False
        for node in self._nodes.values():
            if node.connected or node.ready:
                node.connected = False
                self._set_ready(node, False, emit=False)
                changed = True
        for dispatch in list(self._by_node.values()):
            dispatch.gone = True
            if not dispatch.done.done():
                dispatch.done.set_exception(OutcomeUnknown(
                    "lost the MeshCentral session while the command was out",
                    recoverable=dispatch.wrapped.journal,
                ))
        if changed:
            self._emit(DeviceEvent(kind=EventKind.RESYNC))

    # ---------------------------------------------------------------- events

    async def _listen(self, session: Any) -> None:
        async for message in session.events():
            try:
                self._handle(message)
            except Exception:  # a malformed message must not stop the listener
                log.exception("could not handle a MeshCentral message")

    def _handle(self, msg: Mapping[str, Any]) -> None:
        action = msg.get("action")
        if action == "event":
            event = msg.get("event") or {}
            if event.get("action") in _DEVICE_EVENTS:
                self._device_event(event)
        elif action == "msg":
            kind = msg.get("type")
            if kind == "console":
                self._console(msg)
            elif kind == "runcommands":
                dispatch = self._by_response.get(str(msg.get("responseid")))
                if dispatch is not None and not dispatch.done.done():
                    dispatch.done.set_result(dict(msg))
        elif action == "runcommands":
            # the server's own (error) answer to our runcommands
            dispatch = self._by_response.get(str(msg.get("responseid")))
            if dispatch is not None and not dispatch.done.done():
                dispatch.done.set_result(dict(msg))

    def _group_renamed(self, event: Mapping[str, Any]) -> None:
        """A device group was created or changed: keep its name on its devices."""
        inner = event.get("mesh")
        mesh: Mapping[str, Any] = inner if isinstance(inner, Mapping) else event
        mesh_id = event.get("meshid") or mesh.get("_id")
        name = mesh.get("name")
        if not isinstance(mesh_id, str) or not isinstance(name, str):
            return  # e.g. a policy change: no name in it
        if self._group_names.get(mesh_id) == name:
            return
        self._group_names[mesh_id] = name
        for node_id, node in self._nodes.items():
            if node.device.group_id == mesh_id:
                node.device = attrs.evolve(node.device, group_name=name)
                self._emit(DeviceEvent(kind=EventKind.CHANGED, node_id=node_id))

    def _console(self, msg: Mapping[str, Any]) -> None:
        dispatch = self._by_node.get(str(msg.get("nodeid")))
        value = msg.get("value")
        if dispatch is None or not isinstance(value, str):
            return
        if value == _BUSY_TEXT and not dispatch.started.is_set():
            dispatch.busy = True
            if not dispatch.done.done():
                dispatch.done.set_exception(NotDelivered("agent busy with another command"))
            return
        if not dispatch.started.is_set():
            dispatch.console += value
            if has_started(dispatch.wrapped, dispatch.console):
                self._console_verified = True
                dispatch.started.set()
                dispatch.console = ""
                self._nudge(dispatch)
            elif len(dispatch.console) > 65536:
                dispatch.console = dispatch.console[-4096:]
        elif not dispatch.ended and dispatch.wrapped.marker in value:
            dispatch.ended = True  # the END line: the reply follows
            self._nudge(dispatch)

    def _nudge(self, dispatch: _Dispatch) -> None:
        """Make MeshCentral write to the agent now, so that its TCP acknowledgement of
        the console chunk just received goes with it.

        The agent sends a console chunk and then, as soon as the command ends, its
        reply; it does not disable Nagle's algorithm, so the reply waits until the
        server acknowledges the chunk, and the server, having nothing to send, delays
        that acknowledgement by 40 ms (Linux's minimum). Measured on the lab: 37% of
        runs of ``true`` waited 42 ms for their reply. A message of a type the agent
        ignores ("Unknown action, ignore it" in meshcore.js) ends the wait at once.
        """
        session = self._session
        if session is None:
            return
        with contextlib.suppress(Exception):
            session._message_queue.put_nowait(json.dumps(
                {"action": "msg", "type": "ghostrunner-ack", "nodeid": dispatch.node_id}
            ))

    def _device_event(self, event: Mapping[str, Any]) -> None:
        action = event["action"]
        node_id = event.get("nodeid")
        if action == "deletemesh":
            mesh_id = event.get("meshid")
            for nid in [n for n, v in self._nodes.items() if v.device.group_id == mesh_id]:
                self._forget(nid)
            return
        if action in {"createmesh", "meshchange"}:
            self._group_renamed(event)
            return
        if not isinstance(node_id, str):
            return
        mesh_id = event.get("meshid") or (event.get("node") or {}).get("meshid")
        if self.group_id and mesh_id and mesh_id != self.group_id:
            if action == "nodemeshchange" and node_id in self._nodes:
                self._forget(node_id)  # moved out of our group
            return
        if action == "removenode":
            self._forget(node_id)
            return
        node = self._nodes.get(node_id)
        if action in {"addnode", "changenode", "nodemeshchange"}:
            raw = dict(event.get("node") or {})
            raw.setdefault("_id", node_id)
            device = self._device_from(raw, mesh_id, node)
            if node is None:
                node = _Node(device=device)
                self._nodes[node_id] = node
            else:
                node.device = attrs.evolve(device, online=node.device.online)
            self._emit(DeviceEvent(kind=EventKind.CHANGED, node_id=node_id))
            return
        if node is None:
            if self.group_id and not mesh_id:
                return
            node = _Node(device=Device(
                node_id=node_id, name=node_id, group_id=mesh_id,
                group_name=self._group_names.get(mesh_id or ""),
            ))
            self._nodes[node_id] = node
        if action == "nodeconnect":
            connected = bool(int(event.get("conn") or 0) & 1)
            if connected and not node.connected:
                node.connected = True
                loop = asyncio.get_running_loop()
                if node.ready_timer is not None:
                    node.ready_timer.cancel()
                node.ready_timer = loop.call_later(
                    self.ready_fallback, self._ready_fallback, node_id
                )
            elif not connected:
                node.connected = False
                self._set_ready(node, False)
                dispatch = self._by_node.get(node_id)
                if dispatch is not None:
                    dispatch.gone = True
                    if not dispatch.done.done():
                        dispatch.done.set_exception(OutcomeUnknown(
                            "the device disconnected while the command was out",
                            recoverable=dispatch.wrapped.journal,
                        ))
        elif action == "devicesessions" and node.connected:
            self._set_ready(node, True)

    def _ready_fallback(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is not None and node.connected and not node.ready:
            log.info("no devicesessions event from %s; treating it as ready", node_id)
            self._set_ready(node, True)

    def _set_ready(self, node: _Node, ready: bool, *, emit: bool = True) -> None:
        if ready:
            node.connected = True
        if node.ready_timer is not None:
            node.ready_timer.cancel()
            node.ready_timer = None
        if node.ready == ready and node.device.online == ready:
            return
        node.ready = ready
        node.device = attrs.evolve(node.device, online=ready)
        if ready:
            self.ready_at[node.device.node_id] = time.monotonic()
        if emit:
            kind = EventKind.ONLINE if ready else EventKind.OFFLINE
            self._emit(DeviceEvent(kind=kind, node_id=node.device.node_id))

    def _forget(self, node_id: str) -> None:
        node = self._nodes.pop(node_id, None)
        if node is not None and node.ready_timer is not None:
            node.ready_timer.cancel()
        self._emit(DeviceEvent(kind=EventKind.REMOVED, node_id=node_id))

    # ---------------------------------------------------------------- Executor: run

    def recoverable(self, node_id: str) -> bool:
        node = self._nodes.get(node_id)
        return node is None or node.device.agent_kind is not AgentKind.WINDOWS

    async def run(self, request: RunRequest) -> Outcome:
        session = self._session
        if session is None or not self._connected.is_set():
            raise NotDelivered("not connected to MeshCentral")
        node = self._nodes.get(request.node_id)
        if node is None:
            raise NotDelivered("device unknown to MeshCentral")
        if not node.ready:
            raise NotDelivered("device not connected")
        if request.node_id in self._by_node:
            raise NotDelivered("a command is already in flight on this device")
        shell = request.shell
        if shell is Shell.AUTO:
            shell = Shell.CMD if node.device.agent_kind is AgentKind.WINDOWS else Shell.SH
        if shell is not Shell.SH and node.device.agent_kind is AgentKind.POSIX:
            raise PermanentError(f"shell {shell.value!r} needs a Windows agent")
        if shell is Shell.SH and node.device.agent_kind is AgentKind.WINDOWS:
            raise PermanentError("shell 'sh' is not available on a Windows agent")
        if request.recover and shell is not Shell.SH:
            raise OutcomeUnknown("Windows agents keep no record of what ran")
        key = once_key(request)
        collect: tuple[str, ...] = ()
        replied = self._collect.get(request.node_id)
        # never with a recovery request: it must find the journal as it was
        if (shell is Shell.SH and replied and len(replied) >= self.collect_batch
                and not request.recover):
            collect = tuple(k for k in replied if k != key)
            replied[:] = [k for k in replied if k == key]
        wrapped = wrap_command(
            request.command, shell.value, timeout=request.timeout,
            output_limit=request.output_limit, once=key, recover=request.recover,
            collect=collect,
        )
        dispatch = _Dispatch(
            node_id=request.node_id,
            wrapped=wrapped,
            responseid=f"ghostrunner_{secrets.token_hex(12)}",
        )
        message = {
            "action": "runcommands",
            "nodeids": [request.node_id],
            "type": wrapped.mesh_type,
            "cmds": wrapped.script,
            "runAsUser": 1 if request.run_as_user else 0,
            "reply": True,
            "responseid": dispatch.responseid,
        }
        self._by_response[dispatch.responseid] = dispatch
        self._by_node[request.node_id] = dispatch
        started_at = utcnow()
        try:
            # libmeshctrl has no public "send with my response id, don't wait" call; its
            # outgoing queue is the one place every message goes through.
            await session._message_queue.put(json.dumps(message))
            self.sent_at[request.node_id] = time.monotonic()
            reply = await self._await_reply(dispatch, request.timeout)
        finally:
            self._by_response.pop(dispatch.responseid, None)
            if self._by_node.get(request.node_id) is dispatch:
                del self._by_node[request.node_id]
        return self._outcome(dispatch, reply, started_at)

    async def _await_reply(self, dispatch: _Dispatch, timeout: float) -> dict[str, Any]:
        # phase 1: until the command shows it started (or answers, or fails)
        started = asyncio.create_task(dispatch.started.wait())
        either: set[asyncio.Future[Any]] = {started, dispatch.done}
        try:
            await asyncio.wait(
                either, timeout=self.start_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            started.cancel()
        if (
            not dispatch.done.done()
            and not dispatch.started.is_set()
            and self._console_verified
        ):
            # we see console chunks on this session, and none came: the agent never
            # started it (e.g. MeshCentral's anti-flapping guard cleared its core)
            raise NotDelivered(
                f"the agent did not start the command within {self.start_timeout:.0f}s"
            )
        # phase 2: the command runs; the wrapper kills it at `timeout` on the device
        try:
            return await asyncio.wait_for(
                asyncio.shield(dispatch.done), timeout + self.reply_grace
            )
        except TimeoutError:
            state = "started" if dispatch.started.is_set() else "sent"
            raise OutcomeUnknown(
                f"command {state} but no reply within {timeout + self.reply_grace:.0f}s",
                recoverable=dispatch.wrapped.journal,
            ) from None

    def _outcome(self, dispatch: _Dispatch, reply: Mapping[str, Any],
                 started_at: Any) -> Outcome:
        if reply.get("action") == "runcommands":
            result = str(reply.get("result"))
            if result in _PERMANENT_REPLIES:
                raise PermanentError(f"MeshCentral refused the command: {result}")
            raise NotDelivered(f"MeshCentral: {result}")
        raw = reply.get("result")
        raw = raw if isinstance(raw, str) else ""
        parsed = parse_result(dispatch.wrapped, raw)
        journal = dispatch.wrapped.journal
        if parsed.journal in ("record", "unknown") or parsed.started:
            # the device has a record of this attempt: collect it once the loop has
            # stored what it says (it sends this device nothing before that)
            key = dispatch.wrapped.key
            assert key is not None or not journal
            if key is not None:
                self._collect.setdefault(dispatch.node_id, []).append(key)
        if parsed.journal == "unusable":
            raise PermanentError(
                f"the device has no usable journal ({parsed.detail}); GhostRunner needs "
                "one to run a command at most once: see docs/meshcentral.md"
            )
        if parsed.journal == "gone":
            raise OutcomeUnknown(
                "the device's journal is gone (wiped, or the device reinstalled): nothing "
                "proves this attempt never started, so it was not run again"
            )
        if parsed.journal == "running":
            raise NotDelivered("this attempt is still running on the device "
                               "(an earlier dispatch of it started it)")
        if parsed.journal == "unknown":
            raise OutcomeUnknown(
                "the device started this attempt but recorded no outcome (did it restart "
                "while the command ran?)"
            )
        if not parsed.started and not raw.strip():
            # an agent that is stopping answers for the commands it had, with no
            # output; the wrapper never got to BEGIN, so the command never started
            if journal:  # and if it had, its record stops a resend from running it
                raise NotDelivered("the agent answered without starting the command "
                                   "(was it stopping?)")
            raise OutcomeUnknown("the agent answered with no output at all")
        if not parsed.started:
            raise PermanentError(
                "the device's shell did not run GhostRunner's wrapper; it printed: "
                + (raw if len(raw) <= 400 else raw[:400] + " [...]")
            )
        if not parsed.completed:
            raise OutcomeUnknown("the command started but its exit status never came back",
                                 recoverable=journal)
        # the wrapper bounded the output on the device (request.output_limit bytes);
        # the loop caps the text it keeps
        return Outcome(
            exit_code=None if parsed.timed_out else parsed.exit_code,
            output=parsed.output,
            output_truncated=parsed.truncated,
            timed_out=parsed.timed_out,
            started_at=None if parsed.journal == "record" else started_at,
            finished_at=None if parsed.journal == "record" else utcnow(),
            recovered=parsed.journal == "record",
        )


def _describe(exc: BaseException) -> str:
    """A short text for an exception, unwrapping libmeshctrl's ExceptionGroups."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if str(exc) else text

"""Slow and half-open connections: time limits on reading a request, and a cap on the
connections open at once, for the uvicorn server of ``ghostrunner serve``.

uvicorn bounds the time a keep-alive connection may sit idle after an answer
(``timeout_keep_alive``), but not the time a client may take to send a request: a
connection that sends half a request line and stops is held forever, and a few hundred of
them use up the process's file descriptors, after which no request is answered at all.
:class:`ConnectionGuard` adds what is missing:

- **header timeout**: a request's head (request line and headers) must have arrived
  ``header_timeout`` seconds after the connection was opened or after the previous
  answer; else the connection is closed (with a 408 when part of a request came);
- **body timeout**: its body must have arrived ``body_timeout`` seconds after its head,
  however it trickles in; else a 408 (if the answer has not started) and the connection
  is closed, and the handler reading the body sees a disconnect;
- **connection cap**: at most ``max_connections`` connections are open (fewer when the
  file descriptor limit is lower: :func:`connection_limit`). A connection over the cap
  makes room by closing the oldest connection that is waiting for a request head (idle
  keep-alive, or sending one slowly), else the oldest still sending a body; when every
  connection has a whole request being answered, the new one gets a 503 and is closed.

**Event streams** (``GET /events``, ``/ui/events``: :data:`._events.STREAM_PATHS`) are
long-lived answers: once a connection's request is one of them, it leaves the count of
``max_connections`` for a count of its own (the app caps streams at ``max_streams``,
503 beyond), so that streams never take the places of ordinary requests, and it is
never evicted (it has a whole request in progress). Instead, a stream whose client takes
nothing for ``stream_send_timeout`` seconds (the socket's buffer stays full: uvicorn
paused writing) is closed: a slow client cannot make the server hold its events. When
the server shuts down, stream connections are closed at once (uvicorn would wait for
them to finish, and they never do); clients reconnect with ``Last-Event-ID``.

The timeouts live in uvicorn's HTTP/1.1 protocol (:func:`guarded_protocol` subclasses
it); the state they read is h11's (``their_state``: ``IDLE`` while a head is awaited,
``SEND_BODY`` while a body is) and uvicorn's request cycle (``response_started``).

The cap needs one more piece, :class:`GuardedListener`, the listening socket: asyncio
accepts every connection waiting in the kernel's queue at once (up to the listen backlog,
2048) before any protocol hears of one, so a burst of connections would run out of
descriptors before the protocols could make room. The listener counts the sockets it
hands out until they are closed and, at ``max_connections + ACCEPT_SLACK``, accepts no
more until room is made (it closes the oldest waiting connection itself, and asyncio
asks again on its next round), or refuses with a 503 when no connection can give way.
So the descriptors never run out, and a client that sends a whole request promptly is
answered however many slow ones there are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any, ClassVar, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ._events import STREAM_PATHS, STREAM_WRITE

__all__ = [
    "ACCEPT_SLACK",
    "FD_RESERVE",
    "ConnectionGuard",
    "GuardedListener",
    "connection_limit",
    "fd_soft_limit",
    "guarded_protocol",
]

log = logging.getLogger("ghostrunner.http")

#: sockets accepted beyond the cap while the connections giving way are being closed
ACCEPT_SLACK = 8
#: file descriptors kept for everything but client connections: the database and its
#: WAL, shared memory and lock files, MeshCentral's connection, the listening socket,
#: logs (a running server uses about 13), and ``ACCEPT_SLACK``
FD_RESERVE = 32

_HEAD = "head"
_BODY = "body"

#: log the connections a guard closed at most this often (seconds): under attack a
#: line per connection would flood the log
_LOG_EVERY = 10.0


def fd_soft_limit() -> int | None:
    """The process's soft limit on open file descriptors (``ulimit -n``), or None."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_limit(configured: int, fd_limit: int | None) -> int:
    """How many connections may be open at once: ``configured``, or fewer so that
    ``FD_RESERVE`` descriptors stay free under the soft limit ``fd_limit`` (None: no
    limit), and at least 1."""
    if fd_limit is None or fd_limit < 0:
        return configured
    return max(1, min(configured, fd_limit - FD_RESERVE))


def _answer(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer in the envelope, written straight to the socket (the
    request, if any, was not read: the connection is closed after it)."""
    body = json.dumps({"status": status, "message": message, "data": {"error": code}},
                      separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


_REFUSED = _answer(503, "Service Unavailable", "unavailable",
                   "too many connections, each with a request in progress; retry")
_EVICTED = _answer(503, "Service Unavailable", "unavailable",
                   "too many connections: this one, the oldest waiting for its request, "
                   "made room for a new one; retry")


class ConnectionGuard:
    """The limits, and the connections open now (oldest first).

    Args:
        header_timeout: seconds a client may take to send a request's head.
        body_timeout: seconds a client may take to send a request's body, after its head.
        max_connections: connections open at once (see :func:`connection_limit`), event
            streams not counted.
        max_streams: event streams open at once (the app refuses more); their sockets
            are budgeted on top of ``max_connections``.
        stream_send_timeout: seconds an event stream's client may leave its socket full
            before it is closed.
    """

    def __init__(self, *, header_timeout: float, body_timeout: float,
                 max_connections: int, max_streams: int = 0,
                 stream_send_timeout: float = 30.0) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.max_streams = max_streams
        self.stream_send_timeout = stream_send_timeout
        self.socket_budget = max_connections + max_streams + ACCEPT_SLACK
        self.open: dict[GuardedProtocol, None] = {}  # insertion order: oldest first
        self.streams: set[GuardedProtocol] = set()  # answering an event stream
        self.sockets = 0  # accepted by the listener, not yet closed
        self.closing = 0  # closed by the guard, not yet gone
        self.closed = {"header_timeout": 0, "body_timeout": 0, "evicted": 0, "refused": 0,
                       "stalled_stream": 0}
        self._logged = dict(self.closed)
        self._last_log = 0.0

    def timeout(self, phase: str) -> float:
        return self.header_timeout if phase == _HEAD else self.body_timeout

    # ------------------------------------------------------------------ the cap

    def admit(self, conn: GuardedProtocol) -> bool:
        """A connection is made: count it, and over the cap close another one to make
        room, or refuse this one. Returns whether ``conn`` may stay."""
        self.open[conn] = None
        if len(self.open) <= self.max_connections:
            return True
        if self.make_room(but=conn):
            return True
        self.open.pop(conn, None)
        conn.close_with(_REFUSED)
        self._count("refused")
        return False

    def make_room(self, but: GuardedProtocol | None = None) -> bool:
        """Close the oldest connection waiting for a request's head, else the oldest
        still sending a body (never ``but``). Returns whether one was closed."""
        sending_body = None
        victim = None
        for conn in self.open:
            if conn is but:
                continue
            if conn.phase == _HEAD:
                victim = conn
                break
            if conn.phase == _BODY and sending_body is None:
                sending_body = conn
        victim = victim or sending_body
        if victim is None:
            return False
        self.open.pop(victim, None)
        victim.close_with(_EVICTED if victim.partial() else None)
        self._count("evicted")
        return True

    def release(self, conn: GuardedProtocol) -> None:
        self.open.pop(conn, None)
        self.streams.discard(conn)

    def stream(self, conn: GuardedProtocol) -> None:
        """``conn`` answers an event stream: it counts as a stream, not a connection."""
        self.open.pop(conn, None)
        self.streams.add(conn)

    def refuse(self, sock: socket.socket) -> None:
        """Answer 503 on a socket just accepted, and close it."""
        try:
            sock.setblocking(False)
            sock.send(_REFUSED)  # a fresh socket's buffer takes it whole
        except OSError:
            pass
        sock.close()
        self._count("refused")

    # ------------------------------------------------------------------ the log

    def timed_out(self, phase: str) -> None:
        self._count("header_timeout" if phase == _HEAD else "body_timeout")

    def _count(self, key: str) -> None:
        self.closed[key] += 1
        now = time.monotonic()
        if now - self._last_log < _LOG_EVERY:
            return
        self._last_log = now
        new = {k: v - self._logged[k] for k, v in self.closed.items() if v != self._logged[k]}
        self._logged = dict(self.closed)
        log.warning(
            "closed slow or surplus connections (%s; limits: head %gs, body %gs, %d "
            "connections)", ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in new.items()),
            self.header_timeout, self.body_timeout, self.max_connections)


class _CountedSocket(socket.socket):
    """A client connection's socket: the guard counts it until it is closed."""

    guard: ConnectionGuard
    counted: bool

    def close(self) -> None:
        if self.counted:
            self.counted = False
            self.guard.sockets -= 1
        super().close()


class GuardedListener(socket.socket):
    """The listening socket, handing out at most ``guard.socket_budget`` sockets at once.

    asyncio calls :meth:`accept` until it raises ``BlockingIOError`` (nothing waiting, or
    no room yet: asyncio asks again on its next round, when the connections closed to
    make room are gone).
    """

    guard: ConnectionGuard

    @classmethod
    def adopt(cls, sock: socket.socket, guard: ConnectionGuard) -> GuardedListener:
        """``sock`` (bound, not yet listening) as a guarded listener."""
        listener = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.guard = guard
        return listener

    def accept(self) -> tuple[socket.socket, Any]:
        guard = self.guard
        while guard.sockets >= guard.socket_budget:
            if guard.make_room() or guard.closing:
                raise BlockingIOError  # room by the next round
            # every connection has a request in progress: refuse, at once
            sock, _ = super().accept()  # BlockingIOError when nobody waits
            guard.refuse(sock)
        sock, address = super().accept()
        counted = _CountedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        counted.guard = guard
        counted.counted = True
        guard.sockets += 1
        return counted, address


class GuardedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, under a :class:`ConnectionGuard`'s limits."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase: str | None = None
        self.streaming = False
        self._deadline: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if self.guard.admit(self):
            self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unstall()
        self.phase = None
        self.guard.release(self)
        if self._closing:
            self._closing = False
            self.guard.closing -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.streaming:  # (a refused one: 401, 422, 503...) a connection again
            self.streaming = False
            self._unstall()
            self.guard.streams.discard(self)
            if not self.transport.is_closing():
                self.guard.open[self] = None
        self._watch()  # waiting for the next request's head (or a pipelined one)

    # ------------------------------------------------------------------ event streams

    def shutdown(self) -> None:
        if self.streaming and not self.transport.is_closing():
            # a stream never finishes by itself: uvicorn would wait for it until its
            # graceful shutdown timeout. Its client reconnects with Last-Event-ID.
            self.transport.abort()
        super().shutdown()

    def _stream_write(self, body: bytes) -> bool:
        """``_events.STREAM_WRITE``: write a part of an event stream's body now, framed
        as a chunk as h11 would (the answer is chunked), when the client takes what is
        sent; else False, and the stream goes through ASGI (which waits for it, and
        whose wait the stall timer watches)."""
        cycle = self.cycle
        if (cycle is None or not cycle.response_started or cycle.response_complete
                or cycle.disconnected or self.flow.write_paused
                or self.transport.is_closing()):
            return False
        if body:  # (an empty chunk would end the answer)
            self.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.streaming and self._stall is None:
            self._stall = self.loop.call_later(self.guard.stream_send_timeout, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unstall()

    def _unstall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        if not self.transport.is_closing():
            self.guard._count("stalled_stream")
            self.transport.abort()  # the app's stream sees the disconnection and ends

    # ------------------------------------------------------------------ the guard's view

    def partial(self) -> bool:
        """Part of a request came and the answer has not started."""
        if self.phase == _HEAD:
            return bool(self.conn.trailing_data[0])
        return self.phase == _BODY and not (self.cycle and self.cycle.response_started)

    def close_with(self, answer: bytes | None) -> None:
        """Write ``answer`` (if any) and close."""
        self._disarm()
        self.phase = None
        if self.transport.is_closing():
            return
        self._closing = True
        self.guard.closing += 1
        if answer is None:
            self.transport.abort()  # nothing to flush: the descriptor goes at once
            return
        self.transport.write(answer)
        self.transport.close()

    def _current_phase(self) -> str | None:
        if self.transport.is_closing():
            return None
        state = self.conn.their_state
        if state is h11.IDLE:
            return _HEAD
        if state is h11.SEND_BODY:
            return _BODY
        return None  # a whole request: the handler's time is not the client's

    def _watch(self) -> None:
        phase = self._current_phase()
        if (phase is None and not self.streaming and self.cycle is not None
                and not self.cycle.response_complete and self.cycle.scope["method"] == "GET"
                and self.cycle.scope["path"] in STREAM_PATHS):
            self.streaming = True
            self.guard.stream(self)
            extensions = cast(dict[str, Any], self.cycle.scope.setdefault("extensions", {}))
            extensions[STREAM_WRITE] = self._stream_write
        if phase == self.phase:
            return  # the deadline of this phase stands, however the data trickles
        self._disarm()
        self.phase = phase
        if phase is not None:
            self._deadline = self.loop.call_later(self.guard.timeout(phase), self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        phase = self.phase
        if phase is None:
            return
        self.guard.timed_out(phase)
        self.guard.release(self)
        what, key = ("head", "header") if phase == _HEAD else ("body", "body")
        self.close_with(_answer(
            408, "Request Timeout", "request_timeout",
            f"the request {what} did not arrive within {self.guard.timeout(phase):g} "
            f"seconds (server.{key}_timeout)",
        ) if self.partial() else None)


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` under ``guard``."""
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})

"""The console's sign-in sessions, kept in the server's memory.

Signing in exchanges an API token for a session: a random id (256 bits) that the
browser keeps in an HttpOnly, SameSite=Strict cookie. The server keeps, per session, the
SHA-256 of the token's secret (never the secret: the store keeps only that hash too), the
token's name, a CSRF token and the session's times. Every request looks the token up by
that hash, so a token revoked (through the console, the API or the CLI) ends its sessions
at once, and a change of scope applies at once.

Sessions end on sign-out, after ``idle`` without a request, after ``lifetime`` however
busy, and when the server restarts (operators sign in again). At most ``max_sessions``
are kept: past that, the least recently used one ends.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict

import attrs

__all__ = ["COOKIE", "Session", "Sessions"]

#: the session cookie's name
COOKIE = "gr_console"


@attrs.define(kw_only=True)
class Session:
    """One signed-in browser."""

    id: str = attrs.field(repr=False)
    token_hash: str = attrs.field(repr=False)
    token_name: str
    csrf: str = attrs.field(repr=False)
    created: float
    seen: float
    flash: list[tuple[str, str]] = attrs.field(factory=list)
    """Messages for the next page shown (kind, text): what an action did."""

    def check_csrf(self, given: str | None) -> bool:
        """Whether ``given`` is this session's CSRF token (constant time)."""
        return given is not None and hmac.compare_digest(given.encode(), self.csrf.encode())

    def say(self, text: str, kind: str = "info") -> None:
        self.flash.append((kind, text))

    def take_flash(self) -> list[tuple[str, str]]:
        out, self.flash = self.flash, []
        return out


class Sessions:
    """The sessions of this server process (see the module's docstring)."""

    def __init__(self, *, idle: float = 8 * 3600.0, lifetime: float = 24 * 3600.0,
                 max_sessions: int = 10_000) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self._by_id: OrderedDict[str, Session] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._by_id)

    def create(self, token_hash: str, token_name: str) -> Session:
        now = time.monotonic()
        session = Session(id=secrets.token_urlsafe(32), token_hash=token_hash,
                          token_name=token_name, csrf=secrets.token_urlsafe(32),
                          created=now, seen=now)
        self._by_id[session.id] = session
        while len(self._by_id) > self.max_sessions:
            self._by_id.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, if any (its idle time restarts)."""
        session = self.peek(session_id)
        if session is not None:
            session.seen = time.monotonic()
            self._by_id.move_to_end(session.id)
        return session

    def peek(self, session_id: str | None) -> Session | None:
        """The live session with this id, if any, its idle time left alone (an open
        event stream is not a request: it does not keep its session alive)."""
        if not session_id or len(session_id) > 128:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > self.idle or now - session.created > self.lifetime:
            del self._by_id[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def end_token(self, token_name: str) -> int:
        """End every session signed in with the token ``token_name`` (it was revoked).
        Returns how many."""
        ended = [sid for sid, s in self._by_id.items() if s.token_name == token_name]
        for sid in ended:
            del self._by_id[sid]
        return len(ended)

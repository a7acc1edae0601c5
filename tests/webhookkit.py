"""Helpers for the webhook tests: events and an event source in memory (for the
delivery worker's own tests, which drive it without a runner), a verifier written from
the Standard Webhooks specification, and a receiver on loopback that verifies every
request it gets.

The verifier is independent of ``ghostrunner_http._webhooks``: it is written from the
specification's text (the signed content is ``{id}.{timestamp}.{body}``, HMAC-SHA256 with
the base64-decoded part of the secret after ``whsec_``, ``v1,<base64>`` signatures
separated by spaces, a constant-time comparison, a timestamp tolerance). The receiver
checks every request with it and with the reference library, ``standardwebhooks`` (in
the test extra).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs
import standardwebhooks

#: a secret for the tests (32 bytes), and another one
SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@attrs.frozen
class Ev:
    """An event with defaults, for the worker's tests without a runner (the shape of
    ``ghostrunner.Event``: ``ghostrunner_http._webhooks.EventLike``)."""

    id: int
    kind: str = "run.finished"
    task_id: str = "task-1"
    node_id: str | None = "node-001"
    at: datetime = T0
    data: Mapping[str, Any] = attrs.field(factory=dict)


class ListSource:
    """An event log in memory: ``add`` events, read them back in id order."""

    def __init__(self, events: Sequence[Ev] = ()) -> None:
        self.events: list[Ev] = list(events)
        self.reads = 0

    def add(self, *events: Ev) -> None:
        self.events.extend(events)

    async def events_after(self, after_id: int, limit: int) -> Sequence[Ev]:
        self.reads += 1
        return [e for e in self.events if e.id > after_id][:limit]

    async def last_event_id(self) -> int:
        return max((e.id for e in self.events), default=0)


# --------------------------------------------------------------------------- verifying


class Invalid(Exception):
    """A request that does not verify."""


def verify(secret: str, headers: Mapping[str, str], body: bytes, *,
           now: float | None = None, tolerance: float = 300) -> dict[str, Any]:
    """Check a request as the specification says; return the parsed body.

    Raises :class:`Invalid` naming what is wrong: a missing header, a timestamp outside
    ``tolerance`` seconds of ``now``, no matching ``v1`` signature.
    """
    low = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (low.get("webhook-id"), low.get("webhook-timestamp"),
                                 low.get("webhook-signature"))
    if not (msg_id and stamp and signatures):
        raise Invalid("missing header")
    if not stamp.isdigit():
        raise Invalid("bad timestamp")
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance:
        raise Invalid("timestamp out of tolerance")
    if not secret.startswith("whsec_"):
        raise Invalid("not a whsec_ secret")
    key = base64.b64decode(secret[len("whsec_"):])
    content = msg_id.encode() + b"." + stamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest())
    found = False
    for item in signatures.split(" "):
        version, _, value = item.partition(",")
        # compare every one, in constant time
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            found = True
    if not found:
        raise Invalid("no matching signature")
    result: dict[str, Any] = json.loads(body)
    return result


def verify_with_reference(secret: str, headers: Mapping[str, str], body: bytes) -> Any:
    """The reference library's verdict: the parsed body (raises its
    ``WebhookVerificationError``)."""
    return standardwebhooks.Webhook(secret).verify(body, dict(headers))


# --------------------------------------------------------------------------- receiver


@attrs.define
class Received:
    """One request the receiver got."""

    msg_id: str
    timestamp: str
    body: dict[str, Any] | None
    valid: bool
    problem: str | None
    at: float


class Receiver:
    """An HTTP receiver on 127.0.0.1 that verifies each request's signature (the spec's
    verifier above and the reference library) and records it; it answers ``status``
    (200) after ``delay`` seconds. ``stop`` closes its port (connections are refused)
    and ``start`` opens the same port again.

    ``answers``: statuses to answer first, one per request (then ``status``);
    ``hang``: never answer (until stopped).
    """

    def __init__(self, secret: str = SECRET, *, delay: float = 0.0, status: int = 200,
                 answers: Sequence[int] = (), hang: bool = False,
                 headers: Mapping[str, str] | None = None, body: bytes = b"ok") -> None:
        self.secret = secret
        self.delay = delay
        self.status = status
        self.answers = list(answers)
        self.hang = hang
        self.headers = dict(headers or {})
        self.answer_body = body
        self.got: list[Received] = []
        self.in_progress = 0
        self.lock = threading.Condition()
        self.released = threading.Event()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with receiver.lock:
                    receiver.in_progress += 1
                try:
                    receiver._handle(self)
                finally:
                    with receiver.lock:
                        receiver.in_progress -= 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self.released.clear()
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("content-length", "0"))
        body = request.rfile.read(length)
        headers = {k: v for k, v in request.headers.items()}
        problem = None
        parsed = None
        try:
            parsed = verify(self.secret, headers, body)
            if verify_with_reference(self.secret, headers, body) != parsed:
                raise Invalid("the reference library read another body")
        except Exception as exc:  # recorded as invalid; the test asserts on it
            problem = f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.got.append(Received(headers.get("webhook-id", ""),
                                     headers.get("webhook-timestamp", ""), parsed,
                                     problem is None, problem, time.monotonic()))
            status = self.answers.pop(0) if self.answers else self.status
            self.lock.notify_all()
        if self.hang:
            self.released.wait(60)
            return
        if self.delay:
            time.sleep(self.delay)
        request.send_response(status)
        for k, v in self.headers.items():
            request.send_header(k, v)
        request.send_header("content-length", str(len(self.answer_body)))
        request.end_headers()
        with contextlib.suppress(OSError):
            request.wfile.write(self.answer_body)

    def stop(self) -> None:
        self.released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until ``count`` requests came (valid or not); False on timeout."""
        with self.lock:
            return self.lock.wait_for(lambda: len(self.got) >= count, timeout)

    def event_ids(self) -> list[int]:
        """The event ids of the valid requests, in arrival order."""
        with self.lock:
            return [r.body["data"]["id"] for r in self.got if r.valid and r.body]


@contextlib.contextmanager
def receiving(receiver: Receiver) -> Iterator[Receiver]:
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()

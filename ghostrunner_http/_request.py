"""Reading a request: the body (size-capped while it streams in), its JSON, the token.

The order every route follows, so the same input always gets the same answer:

1. read the body, refusing it past the size limit (413), and parse it as JSON (400);
2. authenticate: the ``Authorization: Bearer`` header, else the body's ``authtoken``
   (401), then check the token's scope (403);
3. check the body's fields (422, naming the field).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import attrs
from starlette.requests import ClientDisconnect, Request

from ghostrunner import GhostRunner
from ghostrunner.errors import StoreError, ValidationError
from ghostrunner.tokens import Scope, Token

from ._audit import AuditStore, note
from ._errors import BadRequest, Forbidden, PayloadTooLarge, Unauthorized
from ._events import Broadcast, StreamSlots
from ._tokens import TokenStore, hash_secret
from ._webhooks import Webhook, WebhookStore

__all__ = ["Authenticator", "Call", "Services", "authorize", "parse_json", "read_body"]

log = logging.getLogger("ghostrunner.http")

MAX_SECRET = 1024


class Authenticator:
    """Checks token secrets against the store.

    The store is looked up by the secret's SHA-256 (an index lookup, which reveals
    nothing useful about the secret), then the hashes are compared in constant time.

    Valid tokens are remembered for ``cache_ttl`` seconds, so a busy client does not cost
    a database read per request; :meth:`forget` (called when a token is deleted through
    the API) makes revocation immediate. A token removed from the database by other
    means stops working within ``cache_ttl``. ``last_used`` is written at most once per
    ``touch_every`` per token, so reads do not turn into database writes.
    """

    def __init__(
        self,
        store: TokenStore,
        clock: Callable[[], datetime],
        *,
        touch_every: timedelta = timedelta(seconds=60),
        cache_ttl: float = 30.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.touch_every = touch_every
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[Token, float]] = {}  # secret hash -> (token, until)

    async def check(self, secret: str) -> Token:
        """The token with this secret. Raises Unauthorized."""
        if not secret or len(secret) > MAX_SECRET:
            raise Unauthorized("invalid or revoked token")
        digest = hash_secret(secret)
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            token: Token | None = cached[0]
        else:
            token = await self.store.token_by_hash(digest)
            if token is None:
                self._cache.pop(digest, None)
            else:
                self._cache[digest] = (token, time.monotonic() + self.cache_ttl)
        # constant-time, against the stored hash (digest is the secret's hash)
        if token is None or not hmac.compare_digest(digest, token.secret_hash):
            raise Unauthorized("invalid or revoked token")
        now = self.clock()
        if token.last_used is None or now - token.last_used >= self.touch_every:
            try:
                await self.store.touch_token(token.name, now)
            except StoreError as exc:  # last_used is informative; never fail a request
                log.warning("could not record the use of token %r: %s", token.name, exc)
            else:
                token = attrs.evolve(token, last_used=now)
                if digest in self._cache:
                    self._cache[digest] = (token, self._cache[digest][1])
        return token

    def forget_all(self) -> None:
        """Drop every remembered token (another runner sharing the database deleted
        one)."""
        self._cache.clear()

    def forget(self, name: str) -> None:
        """Drop what is remembered of the token ``name`` (it was deleted)."""
        for digest, (token, _) in list(self._cache.items()):
            if token.name == name:
                del self._cache[digest]


@attrs.frozen(kw_only=True)
class Services:
    """What the lifespan opens and every request uses."""

    runner: GhostRunner
    tokens: TokenStore
    auth: Authenticator
    max_body_bytes: int
    executor_kind: str
    connected: Callable[[], bool | None]
    """Whether the executor is connected to its server (None: it cannot say)."""
    store_kind: str = "custom"
    """Where the tasks are kept: postgresql, sqlite, memory or custom."""
    audit: AuditStore | None = None
    """Where the audit log goes (None: a store that keeps none)."""
    audit_with_writes: bool = False
    """Whether the store keeps a create's audit entry with the task, in its transaction
    (``Store.add_task(audit=...)``; the three shipped stores do)."""
    streams: StreamSlots = attrs.field(factory=lambda: StreamSlots(100))
    """The event streams open, and how many may be."""
    broadcast: Broadcast = attrs.field(
        default=attrs.Factory(lambda self: Broadcast(self.runner), takes_self=True))
    """The event log, followed once for every event stream."""
    stream_heartbeat: float = 15.0
    stream_send_timeout: float = 30.0
    outbox: WebhookStore | None = None
    """The webhook outbox (None: a store that keeps none)."""
    webhooks: tuple[Webhook, ...] = ()
    """The configured webhooks."""
    event_log: bool = False
    """Whether the store keeps an event log (else no new event reaches the webhooks)."""
    notify_webhooks: Callable[[], None] = lambda: None
    """Wakes the webhook worker (after an operator's retry)."""


def services(request: Request) -> Services:
    """The lifespan's :class:`Services`."""
    # straight from the scope's lifespan state: request.state builds an object per call
    svc = request.scope.get("state", {}).get("services") or request.state.services
    assert isinstance(svc, Services)
    return svc


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over ``limit`` bytes:
    from ``Content-Length`` if given, else while the chunks stream in."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    # straight from the ASGI messages: Request.stream()'s generator costs more than
    # the rest of reading a small body
    while True:
        message = await request.receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _DuplicateKey(Exception):
    """A JSON object of the body names a key twice (found while decoding)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # the decoder calls this once per JSON object: a dict, and one length comparison
    # (measured: about 1.5 microseconds more per seed body than a plain decode)
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKey
    return out


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its key-value pairs, duplicates kept (to name a duplicate)."""


# one decoder: json.loads(..., parse_constant=...) would build a new one per call
_DECODER = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_unique_keys)
_PAIRS_DECODER = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_Pairs)


def _duplicate_key(text: str) -> tuple[str, str]:
    """The first key given twice, in document order, and where it is
    (``details.name``)."""
    stack: list[tuple[str, Any]] = [("", _PAIRS_DECODER.decode(text))]
    while stack:
        path, item = stack.pop()
        if isinstance(item, _Pairs):
            seen: set[str] = set()
            for key, _ in item:
                if key in seen:
                    return key, f"{path}.{key}".lstrip(".")
                seen.add(key)
            stack.extend(reversed([(f"{path}.{k}".lstrip("."), v) for k, v in item]))
        elif isinstance(item, list):
            stack.extend(reversed([(f"{path}[{i}]", v) for i, v in enumerate(item)]))
    raise AssertionError("no duplicate key")  # pragma: no cover - _DECODER found one


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates (``"\\ud800"``): valid JSON escapes, but not text any
    store or client can hold. Iterative, so deep nesting cannot overflow the stack."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            strings: Iterable[tuple[str, str]] = [(path, item)]
        elif isinstance(item, dict):
            strings = [(f"{path}.{k}".lstrip("."), k) for k in item]
            stack.extend((f"{path}.{k}".lstrip("."), v) for k, v in item.items())
        elif isinstance(item, list):
            strings = []
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
        else:
            continue
        for where, text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValidationError(where or "body", "contains an invalid \\u escape "
                                      "(lone surrogate)") from None


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}``. Raises BadRequest (400), or
    ValidationError (422) for a key given twice in one object or a lone surrogate."""
    if not raw.strip():
        return {}
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
        raw = raw[3:]
    try:
        text = raw.decode()  # "utf-8-sig" would look its codec up on every call
    except UnicodeDecodeError:
        raise BadRequest("malformed JSON: the body is not UTF-8") from None
    try:
        data = _DECODER.decode(text)
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, huge integers
        raise BadRequest(f"malformed JSON: {exc}") from None
    except _DuplicateKey:
        # which value would count is a guess (the last, for Python; the first, for some
        # parsers): refuse rather than guess, before the token is read (it could be the
        # key given twice)
        key, where = _duplicate_key(text)
        raise ValidationError(where, f"duplicate key {key!r}: a JSON object must name "
                              "each key once") from None
    if not isinstance(data, dict):
        raise BadRequest("malformed request: the body must be a JSON object")
    # decoded UTF-8 holds no surrogates: only a \\uD8xx-\\uDFxx escape can make one
    if "\\ud" in text or "\\uD" in text:
        _check_strings(data)
    return data


@attrs.frozen
class Call:
    """An authenticated request: its JSON body (``authtoken`` removed) and token."""

    body: dict[str, Any]
    token: Token
    services: Services


def _secret(request: Request, body: dict[str, Any]) -> str:
    if "authtoken" in body and not isinstance(body["authtoken"], str):
        # refused even when a header carries the token: the body is malformed
        raise Unauthorized("authtoken must be a string")
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        return value.strip()
    secret = body.get("authtoken")
    if secret is None:
        raise Unauthorized(
            "missing token: send 'Authorization: Bearer <token>' or \"authtoken\" in the "
            "JSON body"
        )
    if not isinstance(secret, str):
        raise Unauthorized("authtoken must be a string")
    return secret


async def authorize(request: Request, needed: Scope, *, fields: Iterable[str] = ()) -> Call:
    """Read and authenticate a request needing scope ``needed`` whose body may hold
    ``authtoken`` and ``fields``."""
    svc = services(request)
    body = parse_json(await read_body(request, svc.max_body_bytes))
    token = await svc.auth.check(_secret(request, body))
    note(request).token = token.name  # known from here on, for the audit log
    if not token.scope.allows(needed):
        raise Forbidden(
            f"this needs a token with scope {needed.value} (or higher); "
            f"token {token.name!r} has scope {token.scope.value}"
        )
    body.pop("authtoken", None)
    allowed = set(fields)
    for key in body:
        if key not in allowed:
            raise ValidationError(key, "unknown field")
    return Call(body, token, svc)

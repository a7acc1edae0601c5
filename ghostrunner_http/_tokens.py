"""API tokens: where they are kept (:class:`TokenStore`) and their secrets, generated
at random, shown once, stored only as a hash.

The queue (``ghostrunner``) knows nothing of tokens; this package does. A store keeps
them by implementing :class:`TokenStore` as well as ``ghostrunner.Store`` (both shipped
stores do, in the same database), with ``ghostrunner.tokens.Token`` as the record.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from ghostrunner.tokens import Scope, Token

__all__ = ["TOKENS_SIGNAL", "TokenStore", "hash_secret", "new_token", "verify_secret"]

#: The signal (``GhostRunner.signal``) a server sends the others sharing its database
#: when it deletes a token: they drop the tokens they remember (else a revoked token
#: would keep working there until their cache expires, 30 s).
TOKENS_SIGNAL = "tokens"


@runtime_checkable
class TokenStore(Protocol):
    """Durable API tokens. Same rules as ``ghostrunner.Store``: atomic, durable, only
    GhostRunner's errors (``NotFound``, ``Conflict``, ``StoreError``)."""

    async def add_token(self, token: Token) -> None:
        """Store a token. Raises ``Conflict`` if the name (or the secret) is taken."""

    async def token_by_hash(self, secret_hash: str) -> Token | None:
        """The token whose secret hashes to ``secret_hash``, if any."""

    async def list_tokens(self) -> Sequence[Token]:
        """Every token, oldest first."""

    async def delete_token(self, name: str) -> None:
        """Remove a token. Raises ``NotFound``."""

    async def touch_token(self, name: str, now: datetime) -> None:
        """Record that the token was used at ``now``."""

PREFIX = "gr_"


def hash_secret(secret: str) -> str:
    """The stored form of a token secret.

    Secrets are 256 random bits, so a plain SHA-256 is enough (no dictionary to guess
    from); it is deterministic, which lets a store find a token by hash with an index.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def verify_secret(secret: str, token: Token) -> bool:
    """Constant-time check that ``secret`` belongs to ``token``."""
    return hmac.compare_digest(hash_secret(secret), token.secret_hash)


def new_token(
    name: str,
    scope: Scope = Scope.READ,
    *,
    secret: str | None = None,
    builtin: bool = False,
    now: datetime | None = None,
) -> tuple[Token, str]:
    """Create a token. Returns ``(token, secret)``: the secret exists only in this return
    value; show it to the user once and drop it."""
    secret = secret if secret is not None else PREFIX + secrets.token_urlsafe(32)
    token = Token(
        name=name,
        secret_hash=hash_secret(secret),
        scope=scope,
        created_at=now or datetime.now(UTC),
        builtin=builtin,
    )
    return token, secret

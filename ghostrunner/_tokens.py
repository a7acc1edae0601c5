"""API token secrets: generated at random, shown once, stored only as a hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime

from ._types import Scope, Token, utcnow

__all__ = ["hash_secret", "new_token", "verify_secret"]

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
        created_at=now or utcnow(),
        builtin=builtin,
    )
    return token, secret

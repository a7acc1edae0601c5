"""API token records: what a store that keeps the HTTP API's tokens stores.

The queue itself has no notion of tokens: the HTTP package (``ghostrunner_http``) owns
their meaning (secrets, hashing, scopes checked per route) and the ``TokenStore``
protocol. These two values live here so that a store can keep tokens without importing
the HTTP package (both shipped stores do).
"""

from __future__ import annotations

import enum
from datetime import datetime

import attrs

from ._types import MAX_NAME, _aware, _member, _text, utcnow

__all__ = ["Scope", "Token"]


class Scope(enum.StrEnum):
    """What an API token may do. ``admin`` implies ``write`` implies ``read``."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    def allows(self, needed: Scope) -> bool:
        """True if a token with this scope may do what ``needed`` requires."""
        order = [Scope.READ, Scope.WRITE, Scope.ADMIN]
        return order.index(self) >= order.index(needed)


def _to_scope(value: object) -> Scope:
    return _member(Scope, "scope", value)


@attrs.frozen(kw_only=True)
class Token:
    """An API token. Only a hash of its secret is ever kept (and never shown in reprs)."""

    name: str = attrs.field(validator=_text(MAX_NAME))
    secret_hash: str = attrs.field(repr=False)
    scope: Scope = attrs.field(default=Scope.READ, converter=_to_scope)
    created_at: datetime = attrs.field(factory=utcnow, validator=_aware)
    last_used: datetime | None = attrs.field(default=None, validator=_aware)
    builtin: bool = False
    """The bootstrap admin token: it cannot be deleted."""

    @property
    def scopes(self) -> frozenset[Scope]:
        """Every scope this token's scope implies."""
        return frozenset(s for s in Scope if self.scope.allows(s))

"""Python values <-> SQLite values: timestamps, JSON text, unencodable strings.

Timestamps are INTEGER microseconds since 1970-01-01 UTC: they order correctly, are
8 bytes in the indexes (a fixed-width ISO string is 27), and come back as aware UTC
datetimes equal to what went in. Read them with
``datetime(x / 1e6, 'unixepoch', 'subsec')`` in the sqlite3 shell.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from ..errors import StoreError

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
_MIN_US: Final = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _US
_MAX_US: Final = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _US


def ts(value: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (UTC)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise StoreError(f"datetime {value!r} is not timezone-aware")
    us = (value - _EPOCH) // _US
    if not _MIN_US <= us <= _MAX_US:
        raise StoreError(f"datetime {value!r} is outside the years 1-9999 in UTC")
    return us


def tso(value: datetime | None) -> int | None:
    return None if value is None else ts(value)


@functools.lru_cache(maxsize=4096)  # runs share timestamps (queued_at, not_before...)
def dt(value: int) -> datetime:
    """The aware UTC datetime of :func:`ts`'s integer."""
    return _EPOCH + timedelta(microseconds=value)


def dto(value: int | None) -> datetime | None:
    return None if value is None else dt(value)


#: One encoder: json.dumps with options builds a new one per call.
JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def json_list(values: Iterable[str]) -> str:
    return JSON.encode(list(values))


_SURROGATES: Final = re.compile("[\ud800-\udfff]")


def storable(value: Any) -> Any:
    """``value``, with lone surrogates (undecodable bytes kept by
    ``errors="surrogateescape"``, which UTF-8 cannot encode) replaced by U+FFFD."""
    return _SURROGATES.sub("\ufffd", value) if isinstance(value, str) else value

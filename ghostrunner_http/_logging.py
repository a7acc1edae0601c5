"""Logging for ``ghostrunner serve``: one stderr handler whose formatter redacts secrets.

Nothing logs a secret on purpose; this is the belt to those braces. The formatter
redacts, in the final text (tracebacks included): the configured secrets (admin token,
MeshCentral password), anything shaped like a GhostRunner token (``gr_...``), and the
value after ``Bearer`` or ``authtoken``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import TextIO

__all__ = ["RedactingFormatter", "configure_logging", "redact"]

REDACTED = "[REDACTED]"
_TOKEN = re.compile(r"gr_[A-Za-z0-9_\-]{16,}")
_AUTH = re.compile(
    r"(?i)(bearer\s+|authtoken[\"']?\s*[:=]\s*[\"']?|password[\"']?\s*[:=]\s*[\"']?)"
    r"[^\s\"'&,;}]+"
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret, token-like string and credential value replaced."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    text = _TOKEN.sub("gr_" + REDACTED, text)
    return _AUTH.sub(lambda m: m.group(1) + REDACTED, text)


class RedactingFormatter(logging.Formatter):
    """A formatter whose output never contains the given secrets."""

    def __init__(self, fmt: str, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self.secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


def configure_logging(level: str, secrets: Iterable[str] = (),
                      stream: TextIO | None = None) -> None:
    """Send every log record (uvicorn's and libmeshctrl's included) through one
    redacting handler on ``stream`` (default stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", secrets)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    # websockets at DEBUG would dump MeshCentral's login frames
    logging.getLogger("websockets").setLevel(max(logging.INFO, root.level))

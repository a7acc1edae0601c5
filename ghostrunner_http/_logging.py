"""Logging for ``ghostrunner serve``: one stderr handler whose formatter redacts secrets.

Nothing logs a secret on purpose; this is the belt to those braces. The formatter
redacts, in the final text (tracebacks included): the configured secrets (admin token,
MeshCentral password), anything shaped like a GhostRunner token (``gr_...``), the
value after ``Bearer`` or ``authtoken``, and the password of any URL
(``wss://user:[REDACTED]@host``: :func:`redact_url`, which everything in
``ghostrunner_http`` that prints or logs a URL uses too).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import TextIO

__all__ = ["RedactingFormatter", "configure_logging", "redact", "redact_url"]

REDACTED = "[REDACTED]"
_TOKEN = re.compile(r"gr_[A-Za-z0-9_\-]{16,}")
_AUTH = re.compile(
    r"(?i)(bearer\s+|authtoken[\"']?\s*[:=]\s*[\"']?|password[\"']?\s*[:=]\s*[\"']?)"
    r"[^\s\"'&,;}]+"
)

#: scheme://user:PASSWORD@ (the password up to the authority's last "@": a raw "@" in a
#: password, which should be %40, is still taken as part of it)
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/?#@]*:)[^\s/?#]*@")


def redact_url(text: str) -> str:
    """``text`` (a URL, or text holding URLs) with the password of each URL replaced:
    ``wss://ghost:[REDACTED]@mesh.example.com``. The user name stays (it tells which
    account); a URL without a password is unchanged."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret, token-like string, credential value and URL
    password replaced."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    text = _TOKEN.sub("gr_" + REDACTED, text)
    text = redact_url(text)
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

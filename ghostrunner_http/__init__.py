"""GhostRunner's HTTP API and the ``ghostrunner`` command.

:func:`create_app` builds the Starlette application over the :mod:`ghostrunner` library;
``ghostrunner serve`` runs it with uvicorn (see :mod:`ghostrunner_http.cli`), configured
by :class:`Settings` (see :mod:`ghostrunner_http.config`). The API is described in
``docs/http-api.md`` and served as OpenAPI at ``GET /openapi.json``.
"""

from __future__ import annotations

from .app import create_app
from .config import ConfigError, FakeDevice, Settings, load_settings

__all__ = ["ConfigError", "FakeDevice", "Settings", "create_app", "load_settings"]

"""A small synchronous client of the HTTP API, for the operator commands.

Standard library only (``urllib``), so the ``ghostrunner`` command needs nothing the
server does not already need.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = ["ApiClient", "ApiFailure", "Unreachable"]


class ApiFailure(Exception):
    """The server answered with an error."""

    def __init__(self, status: int, message: str, data: Any = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.data = data


class Unreachable(Exception):
    """The server could not be reached (or did not answer in time)."""


class ApiClient:
    """Calls the API at ``url`` with ``token`` (sent as ``Authorization: Bearer``).

    Args:
        url: e.g. ``http://127.0.0.1:8080``.
        token: an API token, or None for the routes that need none.
        cafile: a CA bundle to trust for HTTPS (e.g. a self-signed server certificate).
        insecure: do not verify the server's certificate at all.
        timeout: seconds per request.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        cafile: str | None = None,
        insecure: bool = False,
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._context: ssl.SSLContext | None = None
        if self.url.startswith("https://"):
            self._context = ssl.create_default_context(cafile=cafile)
            if insecure:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        """Send one request; return the envelope's ``data``.

        Raises:
            ApiFailure: the server answered with an error status.
            Unreachable: no answer.
        """
        url = self.url + path
        if params:
            query = {k: str(v) for k, v in params.items() if v is not None}
            if query:
                url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(  # noqa: S310 - the URL is the operator's
                request, timeout=self.timeout, context=self._context
            ) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status = exc.code
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach GhostRunner at {self.url}: {reason}") from None
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiFailure(status, f"not a GhostRunner answer: {raw[:200]!r}") from None
        if not isinstance(answer, dict) or "data" not in answer:
            raise ApiFailure(status, "not a GhostRunner answer (no envelope)")
        if status >= 400:
            raise ApiFailure(status, str(answer.get("message", "")), answer.get("data"))
        return answer["data"]

"""A small synchronous client of the HTTP API, for the operator commands.

Standard library only (``urllib``), so the ``ghostrunner`` command needs nothing the
server does not already need.

Redirects are never followed: the token goes only to the URL the operator gave. (urllib
follows them by default and sends the ``Authorization`` header along, to any origin.)
GhostRunner's server never redirects; a proxy that does (http -> https, another host)
is reported as an error naming where it points, for the operator to decide.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from http.client import HTTPMessage
from typing import IO, Any, NoReturn

from ._logging import redact_url

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


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Answers 301, 302, 303, 307 and 308 with :class:`ApiFailure`, following none."""

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
        headers: HTTPMessage, newurl: str,
    ) -> NoReturn:
        fp.close()
        raise ApiFailure(
            code,
            f"the server redirected to {redact_url(newurl)}; not followed (the token goes "
            f"only to the URL given): if that is the server, use --url or GHOSTRUNNER_URL "
            f"to point at it",
        )


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
        handlers: list[urllib.request.BaseHandler] = [_RefuseRedirects()]
        if self.url.startswith("https://"):
            context = ssl.create_default_context(cafile=cafile)
            if insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"ApiClient({redact_url(self.url)!r})"

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
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status = exc.code
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(
                f"cannot reach GhostRunner at {redact_url(self.url)}: {reason}"
            ) from None
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiFailure(status, f"not a GhostRunner answer: {raw[:200]!r}") from None
        if not isinstance(answer, dict) or "data" not in answer:
            raise ApiFailure(status, "not a GhostRunner answer (no envelope)")
        if status >= 400:
            raise ApiFailure(status, str(answer.get("message", "")), answer.get("data"))
        return answer["data"]

    def stream(self, path: str, *, params: Mapping[str, Any] | None = None,
               headers: Mapping[str, str] | None = None, timeout: float = 60.0,
               ) -> Iterator[bytes]:
        """The lines of a streaming answer (``GET /events``), as they come; ends when
        the server closes it. ``timeout``: the longest silence before giving up
        (``TimeoutError``; the server's keep-alive comments count as lines).

        Raises:
            ApiFailure: the server answered with an error status.
            Unreachable: no answer.
        """
        url = self.url + path
        if params:
            query = {k: str(v) for k, v in params.items() if v is not None}
            if query:
                url += "?" + urllib.parse.urlencode(query)
        sent = {"Accept": "text/event-stream", **(headers or {})}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, method="GET", headers=sent)  # noqa: S310
        try:
            response = self._opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                answer = json.loads(raw.decode("utf-8"))
                message = str(answer.get("message", ""))
            except (UnicodeDecodeError, ValueError, AttributeError):
                message = f"not a GhostRunner answer: {raw[:200]!r}"
            raise ApiFailure(exc.code, message) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(
                f"cannot reach GhostRunner at {redact_url(self.url)}: {reason}"
            ) from None
        with response:
            while line := response.readline():
                yield line

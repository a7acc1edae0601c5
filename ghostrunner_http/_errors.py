"""Errors of the HTTP layer and the one place every exception becomes an answer.

Every answer, errors included, is the seed's InfoResponse envelope::

    {"status": 422, "message": "details.nodeids[0]: must be a non-empty node id",
     "data": {"error": "invalid_field", "field": "details.nodeids[0]"}}

``data.error`` is a stable machine-readable code; ``message`` is for humans.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ghostrunner.errors import (
    Conflict,
    GhostRunnerError,
    IllegalTransition,
    NotFound,
    StoreError,
    ValidationError,
)

from ._render import envelope

__all__ = [
    "ApiError",
    "BadRequest",
    "ConflictError",
    "Forbidden",
    "PayloadTooLarge",
    "Unauthorized",
    "exception_handlers",
]

log = logging.getLogger("ghostrunner.http")

#: HTTP status -> the ``data.error`` code of errors that have no more specific one.
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_field",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """An error answer: HTTP ``status``, a message, a code and optional extra data."""

    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        data: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.data = dict(data or {})
        self.headers = dict(headers or {})


class BadRequest(ApiError):
    """Malformed request: not JSON, not a JSON object, not UTF-8 (400)."""

    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    """No token, or one that is wrong or revoked (401)."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="ghostrunner"'})


class Forbidden(ApiError):
    """The token's scope does not allow this (403)."""

    status = 403
    code = "forbidden"


class ConflictError(ApiError):
    """The request conflicts with what exists: a duplicate name, a builtin token (409)."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    """The body is over the configured limit (413)."""

    status = 413
    code = "payload_too_large"


def _answer(status: int, message: str, code: str, data: Mapping[str, Any] | None = None,
            headers: Mapping[str, str] | None = None) -> Response:
    return envelope({"error": code, **(data or {})}, status=status, message=message,
                    headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _answer(exc.status, exc.message, exc.code, exc.data, exc.headers)


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationError)
    return _answer(422, str(exc), "invalid_field", {"field": exc.field})


async def _not_found(request: Request, exc: Exception) -> Response:
    return _answer(404, str(exc) or "not found", "not_found")


async def _conflict(request: Request, exc: Exception) -> Response:
    code = "illegal_transition" if isinstance(exc, IllegalTransition) else "conflict"
    return _answer(409, str(exc) or "conflict", code)


async def _store_error(request: Request, exc: Exception) -> Response:
    log.error("store error on %s %s: %s", request.method, request.url.path, exc)
    return _answer(503, "the database is unavailable; try again", "unavailable",
                   headers={"Retry-After": "1"})


async def _ghostrunner_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s: %r", request.method, request.url.path, exc)
    return _answer(500, "internal error", "internal_error")


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404:
        message = f"no route {request.url.path}"
    elif status == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = exc.detail
    return _answer(status, message, _CODES.get(status, "error"), headers=exc.headers)


async def _disconnect(request: Request, exc: Exception) -> Response:
    # nobody is listening any more; answer something coherent anyway
    return _answer(400, "client disconnected", "bad_request")


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path,
                  exc_info=exc)
    return _answer(500, "internal error", "internal_error")


#: Most specific first does not matter: Starlette walks each exception's MRO.
exception_handlers: dict[Any, Any] = {
    ApiError: _api_error,
    ValidationError: _validation,
    NotFound: _not_found,
    Conflict: _conflict,
    IllegalTransition: _conflict,
    StoreError: _store_error,
    GhostRunnerError: _ghostrunner_error,
    HTTPException: _http_exception,
    ClientDisconnect: _disconnect,
    Exception: _unexpected,
}

"""The operator console: server-rendered pages under ``/ui`` (see ``docs/console.md``).

:func:`console_routes` are mounted by :func:`ghostrunner_http.create_app` next to the
API's routes, in the same process and on the same port. The templates, the stylesheet
and the one script ship in this package (no build step, nothing from a CDN).
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import _views as v
from ._sessions import COOKIE, Session, Sessions
from ._views import HEADERS, Console

__all__ = ["COOKIE", "HEADERS", "Console", "Session", "Sessions", "console_routes"]


class _Hardened:
    """The static files, with ``nosniff`` and a short cache (they change with a
    release)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-content-type-options", b"nosniff"),
                    (b"cache-control", b"no-cache"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def console_routes() -> list[BaseRoute]:
    """The console's routes (every path starts with ``/ui``)."""
    static = _Hardened(StaticFiles(directory=v.HERE / "static"))
    return [
        Route("/ui", v.root, methods=["GET"]),
        Route("/ui/", v.overview, methods=["GET"], name="ui_overview"),
        Route("/ui/login", v.login_form, methods=["GET"], name="ui_login"),
        Route("/ui/login", v.login, methods=["POST"]),
        Route("/ui/logout", v.logout, methods=["POST"], name="ui_logout"),
        Route("/ui/tasks", v.tasks, methods=["GET"], name="ui_tasks"),
        Route("/ui/tasks/{task_id}", v.task_page, methods=["GET"], name="ui_task"),
        Route("/ui/tasks/{task_id}/live", v.task_live, methods=["GET"]),
        Route("/ui/events", v.events_stream, methods=["GET"]),
        Route("/ui/tasks/{task_id}/run", v.run_page, methods=["GET"]),
        Route("/ui/tasks/{task_id}/cancel", v.cancel, methods=["POST"]),
        Route("/ui/tasks/{task_id}/retry", v.retry, methods=["POST"]),
        Route("/ui/tasks/{task_id}/pause", v.pause, methods=["POST"]),
        Route("/ui/tasks/{task_id}/resume", v.resume, methods=["POST"]),
        Route("/ui/tasks/{task_id}/delete", v.delete_confirm, methods=["GET"]),
        Route("/ui/tasks/{task_id}/delete", v.delete, methods=["POST"]),
        Route("/ui/flush", v.flush_confirm, methods=["GET"]),
        Route("/ui/flush", v.flush, methods=["POST"]),
        Route("/ui/devices", v.devices_page, methods=["GET"], name="ui_devices"),
        Route("/ui/device", v.device_page, methods=["GET"]),
        Route("/ui/queue", v.queue_form, methods=["GET"], name="ui_queue"),
        Route("/ui/queue", v.queue, methods=["POST"]),
        Route("/ui/tokens", v.tokens, methods=["GET"], name="ui_tokens"),
        Route("/ui/tokens", v.token_create, methods=["POST"]),
        Route("/ui/tokens/revoke", v.token_revoke, methods=["POST"]),
        Route("/ui/audit", v.audit_page, methods=["GET"], name="ui_audit"),
        Route("/ui/webhooks", v.webhooks_page, methods=["GET"], name="ui_webhooks"),
        Route("/ui/webhooks/deliveries/{delivery_id}/retry", v.delivery_retry,
              methods=["POST"]),
        Mount("/ui/static", app=static, name="ui_static"),
    ]

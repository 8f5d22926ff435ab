"""``/api/v1/webhook``: register, list and delete webhook receivers."""

from __future__ import annotations

import json
import logging
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import attrs
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import csvimg_server._bodies as body
from csvimg._errors import CallbackUrlError, NotFoundError
from csvimg_server._errors import error
from csvimg_server._handlers.resource import Resource
from csvimg_server._options import refused_callback
from csvimg_server.auth import owner_of

__all__ = ["Webhooks"]

log = logging.getLogger("csvimg.server")

_JSON_BODY_LIMIT: Final = 64 * 1024


def _loggable(url: str) -> str:
    """A URL without userinfo and query string: receivers put tokens there."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@attrs.frozen
class Webhooks(Resource):
    """The webhook registration endpoints."""

    def routes(self) -> list[Route]:
        """``POST`` and ``GET /api/v1/webhook``, ``DELETE /api/v1/webhook/{webhook_id}``."""
        return [
            Route("/api/v1/webhook", self.add_webhook, methods=["POST"], name="add_webhook"),
            Route("/api/v1/webhook", self.list_webhooks, methods=["GET"], name="list_webhooks"),
            Route(
                "/api/v1/webhook/{webhook_id}",
                self.delete_webhook,
                methods=["DELETE"],
                name="delete_webhook",
            ),
        ]

    async def add_webhook(self, request: Request) -> Response:
        """``POST /api/v1/webhook``: register a receiver; its secret is shown once."""
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > _JSON_BODY_LIMIT:
                return error(413, f"the JSON body is larger than {_JSON_BODY_LIMIT} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested too deep (64 kB of "[")
            return error(400, 'expected a JSON body like {"callback_url": "https://..."}')
        url = data.get("callback_url") if isinstance(data, dict) else None
        if not isinstance(url, str) or not url.strip():
            return error(400, "callback_url is required and must be a string")
        owner = owner_of(request)
        try:
            webhook = await self.engine.add_webhook(url.strip(), owner=owner)
        except CallbackUrlError as exc:
            raise refused_callback(exc) from None
        log.info("webhook %s registered for %s", webhook.id, _loggable(webhook.url),
                 extra={"webhook_id": webhook.id, "owner": owner})
        registered = body.WebhookRegistered(
            message="Webhook registered successfully.",
            id=webhook.id,
            secret=webhook.secret,
            callback_url=webhook.url,
        )
        return registered.response()

    async def list_webhooks(self, request: Request) -> Response:
        """``GET /api/v1/webhook``: registrations, without their secrets."""
        hooks = await self.engine.webhooks(owner=owner_of(request))
        listed = body.Webhooks(
            webhooks=[
                body.Webhook(
                    id=h.id, callback_url=h.url, active=h.active, created_at=h.created_at
                )
                for h in hooks
            ]
        )
        return listed.response()

    async def delete_webhook(self, request: Request) -> Response:
        """``DELETE /api/v1/webhook/{webhook_id}``."""
        raw_id: str = request.path_params["webhook_id"]
        owner = owner_of(request)
        try:
            await self.engine.delete_webhook(raw_id, owner=owner)
        except NotFoundError:
            return error(404, f"no webhook {raw_id[:64]!r}")
        log.info("webhook %s deleted", raw_id, extra={"webhook_id": raw_id, "owner": owner})
        return body.WebhookDeleted(message="Webhook deleted.", id=raw_id).response()

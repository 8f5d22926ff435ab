"""The route handlers of the HTTP API, one module per resource.

`routes` binds every group to one engine and lists their routes in the
order Starlette matches them.
"""

from __future__ import annotations

from starlette.routing import Route

from csvimg.engine import Engine
from csvimg_server._handlers.images import Images
from csvimg_server._handlers.operations import Operations
from csvimg_server._handlers.requests import Requests
from csvimg_server._handlers.resource import Resource
from csvimg_server._handlers.uploads import Uploads
from csvimg_server._handlers.webhooks import Webhooks
from csvimg_server.auth import ApiKeys
from csvimg_server.metrics import Metrics

__all__ = ["Resource", "routes"]

_GROUPS: tuple[type[Resource], ...] = (Uploads, Requests, Images, Webhooks, Operations)


def routes(engine: Engine, *, keys: ApiKeys | None, metrics: Metrics) -> list[Route]:
    """Every API route, its handlers bound to *engine*, *keys* and *metrics*."""
    return [
        route
        for group in _GROUPS
        for route in group(engine, keys=keys, metrics=metrics).routes()
    ]

"""The Starlette application: the HTTP API of csvimg.

`create_app` builds a small app around one `csvimg.Engine`. Its lifespan
(`Lifespan`) opens the engine and, unless ``workers`` is 0, runs that many
worker loops plus one outbox (webhook delivery) loop in a task group;
shutdown lets in-flight images finish for a moment and then cancels (leases
hand the rest to the next worker). Every answer is JSON, errors included.

The parts live in private modules named after what they hold: the
handlers per resource in ``_handlers/``, the JSON bodies in ``_bodies``
(built on ``_shape``, which also derives their JSON Schema for
``/openapi.json``), error answers in ``_errors``, parameter parsing in
``_options``, entity tags in ``_etag`` and the lifespan in ``_lifespan``.

Routes (see `csvimg_server.openapi` for the full contract)::

    POST   /api/v1/upload                             upload a CSV
    GET    /api/v1/status/{request_id}                progress of a request
    GET    /api/v1/requests/{request_id}/items        per-image results, paginated
    GET    /api/v1/requests/{request_id}/output.csv   the output CSV (409 while running)
    GET    /api/v1/requests/{request_id}/deliveries   webhook delivery attempts
    GET    /api/v1/images/{key}                       an output image
    POST   /api/v1/webhook                            register a webhook
    GET    /api/v1/webhook                            list registrations
    DELETE /api/v1/webhook/{webhook_id}               delete a registration
    GET    /healthz                                   liveness
    GET    /readyz                                    storage and queue reachable
    GET    /metrics                                   Prometheus metrics
    GET    /openapi.json                              the OpenAPI document

With API keys (``CSVIMG_API_KEYS``, see `csvimg_server.auth`) every route
but the health checks, ``/metrics``, ``/openapi.json`` and the upload page
(``/``, ``/static/``) needs ``Authorization: Bearer <key>``, and a request
with everything about it (status, items, output CSV, deliveries, images)
and webhook registrations are visible only to the key's owner: another
owner gets the same 404 as for an unknown id. Without keys there is one
user and no access control.
"""

from __future__ import annotations

import logging
from typing import Literal

from starlette.applications import Starlette
from starlette.middleware import Middleware

from csvimg.engine import Engine
from csvimg.settings import Settings
from csvimg.urls import DefaultUrls

# DEFAULT_PAGE, MAX_PAGE and SHUTDOWN_GRACE were defined here before the
# split: still importable from this module.
from csvimg_server._bodies import DEFAULT_PAGE as DEFAULT_PAGE
from csvimg_server._bodies import MAX_PAGE as MAX_PAGE
from csvimg_server._errors import EXCEPTION_HANDLERS, JsonErrors
from csvimg_server._handlers import routes as api_routes
from csvimg_server._lifespan import SHUTDOWN_GRACE, Lifespan
from csvimg_server._shape import iso_time
from csvimg_server._urls import RouteUrls
from csvimg_server.auth import FROM_ENV, ApiKeyAuth, ApiKeys, FromEnv
from csvimg_server.logs import register_secrets
from csvimg_server.metrics import HttpMetrics, Metrics
from csvimg_server.ui import ui_routes

__all__ = ["Lifespan", "create_app", "iso_time"]

log = logging.getLogger("csvimg.server")


def _api_keys(value: ApiKeys | str | Literal[FromEnv.FROM_ENV] | None) -> ApiKeys | None:
    if value is FROM_ENV:
        return ApiKeys.from_env()
    if isinstance(value, str):
        return ApiKeys.parse(value)
    return value


def create_app(
    settings: Settings | None = None,
    *,
    workers: int = 1,
    engine: Engine | None = None,
    shutdown_grace: float = SHUTDOWN_GRACE,
    api_keys: ApiKeys | str | Literal[FromEnv.FROM_ENV] | None = FROM_ENV,
) -> Starlette:
    """Build the csvimg HTTP API.

    *settings* default to `Settings.from_env` (``CSVIMG_*`` variables);
    alternatively hand in an *engine* (then *settings* must be None: the
    engine's own are used), which the app opens but does not close.
    *workers* in-process worker loops process queued images (0: API only,
    images are processed by ``csvimg worker`` processes elsewhere); on
    shutdown in-flight images get *shutdown_grace* seconds to finish.

    *api_keys* turns on API keys: an `ApiKeys`, or a ``CSVIMG_API_KEYS``
    value to parse (blank: off); None turns them off; by default the
    ``CSVIMG_API_KEYS`` environment variable decides. A malformed value
    raises `ConfigError`. The keys are registered with the log redaction
    filter (`csvimg_server.logs`). The app's metrics are in
    ``app.state.metrics``.
    """
    if workers < 0:
        raise ValueError(f"workers must not be negative, not {workers}")
    if engine is not None and settings is not None:
        raise ValueError("pass settings or an engine, not both")
    keys = _api_keys(api_keys)
    owns = engine is None
    if engine is None:
        engine = Engine(settings or Settings.from_env())
    metrics = Metrics()
    metrics.attach(engine)
    routes = [*api_routes(engine, keys=keys, metrics=metrics), *ui_routes()]
    if owns or engine.urls == DefaultUrls():
        # URLs follow the routes; an engine handed in with its own builder keeps it.
        engine.urls = RouteUrls.from_routes(routes)
    middleware = [
        Middleware(HttpMetrics, metrics=metrics),
        Middleware(JsonErrors),
    ]
    if keys is not None:
        register_secrets(keys.secrets())
        middleware.append(Middleware(ApiKeyAuth, keys=keys))
        log.info("API keys on: %d key(s), owners %s", len(keys), ", ".join(sorted(keys.owners)))
    lifespan = Lifespan(engine, workers=workers, owns_engine=owns, shutdown_grace=shutdown_grace)
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.metrics = metrics
    return app

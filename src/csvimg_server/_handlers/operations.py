"""The operator's endpoints: health checks, metrics and the OpenAPI document."""

from __future__ import annotations

import attrs
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import csvimg_server._bodies as body
from csvimg_server._handlers.resource import Resource
from csvimg_server.metrics import CONTENT_TYPE
from csvimg_server.openapi import openapi_document

__all__ = ["Operations"]


@attrs.frozen
class Operations(Resource):
    """``/healthz``, ``/readyz``, ``/metrics`` and ``/openapi.json`` (all public)."""

    def routes(self) -> list[Route]:
        """The four operator routes."""
        return [
            Route("/healthz", self.healthz, methods=["GET"], name="healthz"),
            Route("/readyz", self.readyz, methods=["GET"], name="readyz"),
            Route("/metrics", self.metrics_text, methods=["GET"], name="metrics"),
            Route("/openapi.json", self.openapi, methods=["GET"], name="openapi"),
        ]

    async def healthz(self, request: Request) -> Response:
        """``GET /healthz``: the process answers."""
        return body.Health(status="ok").response()

    async def readyz(self, request: Request) -> Response:
        """``GET /readyz``: storage and queue answer (503 otherwise)."""
        checks = await self.engine.ready()
        ok = all(v == "ok" for v in checks.values())
        readiness = body.Readiness(status="ok" if ok else "unavailable", checks=dict(checks))
        return readiness.response(200 if ok else 503)

    async def metrics_text(self, request: Request) -> Response:
        """``GET /metrics``: Prometheus text format (public, see `csvimg_server.metrics`)."""
        rendered = await self.metrics.render(self.engine)
        return Response(rendered, headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, request: Request) -> Response:
        """``GET /openapi.json``."""
        document = openapi_document(self.base_url(request), api_keys=self.keys is not None)
        return JSONResponse(document)

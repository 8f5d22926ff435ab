"""What every group of route handlers shares: the engine, the keys, the caller."""

from __future__ import annotations

import attrs
from starlette.requests import Request
from starlette.routing import Route

from csvimg._errors import NotFoundError
from csvimg.engine import Engine
from csvimg.jobs import Request as Job
from csvimg.settings import Settings
from csvimg_server._errors import ApiError
from csvimg_server._options import request_id as parse_request_id
from csvimg_server.auth import ApiKeys, owner_of
from csvimg_server.metrics import Metrics

__all__ = ["Resource"]


@attrs.frozen
class Resource:
    """Base of the handler groups, bound to one engine.

    A subclass holds the handlers of one resource as methods and lists
    their routes in `routes`.
    """

    engine: Engine
    keys: ApiKeys | None = None
    metrics: Metrics = attrs.field(factory=Metrics)

    @property
    def settings(self) -> Settings:
        """The engine's settings."""
        return self.engine.settings

    def routes(self) -> list[Route]:
        """The routes this group serves, in matching order."""
        raise NotImplementedError

    def base_url(self, request: Request) -> str:
        """Return the base of absolute URLs: ``CSVIMG_PUBLIC_URL``, else this request's host."""
        public = self.settings.public_url
        if public:
            return public.rstrip("/")
        return str(request.base_url).rstrip("/")

    def visible(self, job: Job, request: Request) -> bool:
        """Whether the caller may see *job*: always without keys, else only its owner."""
        return self.keys is None or job.owner == owner_of(request)

    async def job(self, raw_id: str, request: Request) -> Job:
        """The request *raw_id* if the caller may see it; the same 404 otherwise."""
        request_id = parse_request_id(raw_id)
        try:
            job = await self.engine.get_request(request_id)
        except NotFoundError:
            job = None
        if job is None or not self.visible(job, request):
            raise ApiError(404, f"no request {request_id!r}")
        return job

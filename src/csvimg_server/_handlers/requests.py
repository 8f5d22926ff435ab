"""What a request is up to: its status, its items, its output CSV, its webhook deliveries."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from typing import Final

import attrs
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import csvimg_server._bodies as body
from csvimg._errors import NotFinishedError
from csvimg.jobs import Item
from csvimg.jobs import Request as Job
from csvimg_server._errors import error
from csvimg_server._handlers.resource import Resource
from csvimg_server._options import int_param

__all__ = ["Requests"]

_SAFE_STEM: Final = re.compile(r"[^A-Za-z0-9._-]+")


@attrs.frozen
class Requests(Resource):
    """The read-only endpoints under a request id."""

    def routes(self) -> list[Route]:
        """Status, items, output CSV and deliveries of a request."""
        return [
            Route("/api/v1/status/{request_id}", self.status, methods=["GET"], name="status"),
            Route(
                "/api/v1/requests/{request_id}/items", self.items, methods=["GET"], name="items"
            ),
            Route(
                "/api/v1/requests/{request_id}/output.csv",
                self.output_csv,
                methods=["GET"],
                name="output_csv",
            ),
            Route(
                "/api/v1/requests/{request_id}/deliveries",
                self.deliveries,
                methods=["GET"],
                name="deliveries",
            ),
        ]

    def status_body(self, job: Job, base: str) -> body.Status:
        """The `Status` of *job*, its URLs under *base*."""
        return body.Status(
            request_id=job.id,
            status=job.status,
            progress=body.Progress(total=job.total, done=job.done, failed=job.failed),
            created_at=job.created_at,
            updated_at=job.updated_at,
            output_csv_url=(
                self.engine.output_csv_url(job.id, base) if job.status.finished else None
            ),
        )

    def item_body(self, item: Item, base: str) -> body.Item:
        """The `Item` body of *item*, its image URL under *base*."""
        return body.Item(
            row=item.row,
            position=item.position,
            input_url=item.url,
            output_url=self.engine.image_url(item, base),
            status=item.status,
            bytes_in=item.bytes_in,
            bytes_out=item.bytes_out,
            width=item.width,
            height=item.height,
            attempts=item.attempts,
            error_code=item.error_code,
            error_message=item.error_message,
        )

    async def status(self, request: Request) -> Response:
        """``GET /api/v1/status/{request_id}``."""
        job = await self.job(request.path_params["request_id"], request)
        return self.status_body(job, self.base_url(request)).response()

    async def items(self, request: Request) -> Response:
        """``GET /api/v1/requests/{request_id}/items``: per-image results, paginated."""
        offset = int_param(request, "offset", 0, 0, 2**62)
        limit = int_param(request, "limit", body.DEFAULT_PAGE, 1, body.MAX_PAGE)
        job = await self.job(request.path_params["request_id"], request)
        items = await self.engine.items(job.id, offset=offset, limit=limit)
        base = self.base_url(request)
        following = offset + len(items)
        page = body.ItemPage(
            request_id=job.id,
            offset=offset,
            limit=limit,
            total=job.total,
            items=[self.item_body(i, base) for i in items],
            next=(
                f"{base}/api/v1/requests/{job.id}/items?offset={following}&limit={limit}"
                if items and following < job.total
                else None
            ),
        )
        return page.response()

    async def output_csv(self, request: Request) -> Response:
        """``GET /api/v1/requests/{request_id}/output.csv``: 409 while running."""
        job = await self.job(request.path_params["request_id"], request)
        base = self.base_url(request)
        chunks = self.engine.output_csv(
            job.id, url_for=functools.partial(self.engine.image_url, base_url=base)
        )
        # The first chunk is read here, so "not finished" and storage errors
        # still become a JSON answer before any header is sent.
        try:
            first = await anext(chunks)
        except NotFinishedError as exc:
            return error(409, f"the output CSV is not ready yet: {exc}", status=job.status)
        except StopAsyncIteration:  # pragma: no cover - the header row is always there
            first = b""

        async def rest() -> AsyncIterator[bytes]:
            yield first
            async for chunk in chunks:
                yield chunk

        stem = PurePosixPath((job.filename or "").replace("\\", "/")).stem
        stem = _SAFE_STEM.sub("_", stem).strip("._")[:100] or job.id
        return StreamingResponse(
            rest(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{stem}-output.csv"'},
        )

    async def deliveries(self, request: Request) -> Response:
        """``GET /api/v1/requests/{request_id}/deliveries``: webhook attempts."""
        job = await self.job(request.path_params["request_id"], request)
        found = await self.engine.deliveries(job.id)
        deliveries = body.Deliveries(
            request_id=job.id,
            deliveries=[
                body.Delivery(
                    event_id=d.event_id,
                    url=d.url,
                    attempt=d.attempt,
                    at=d.at,
                    status_code=d.status_code,
                    error=d.error,
                )
                for d in found
            ],
        )
        return deliveries.response()

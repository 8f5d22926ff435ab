"""``GET /api/v1/images/{key}``: the output images, cacheable for good."""

from __future__ import annotations

from typing import Final

import attrs
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from csvimg._errors import NotFoundError
from csvimg_server._errors import error
from csvimg_server._etag import etag_matches, quote_etag
from csvimg_server._handlers.resource import Resource
from csvimg_server._options import is_request_id

__all__ = ["IMAGE_ROUTE", "Images"]

IMAGE_ROUTE: Final = "/api/v1/images/{key:path}"
"""The image route; `csvimg_server._urls.RouteUrls` builds image URLs from it."""

_IMAGE_CACHE: Final = "public, max-age=31536000, immutable"
# With keys, shared caches must not hand one owner's image to another.
_PRIVATE_IMAGE_CACHE: Final = "private, max-age=31536000, immutable"


def _safe_key(key: str) -> bool:
    """Whether an image key is a plain relative path inside the store."""
    if not key or len(key) > 512 or "\\" in key or "\x00" in key or key.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in key.split("/"))


@attrs.frozen
class Images(Resource):
    """The image endpoint."""

    def routes(self) -> list[Route]:
        """``GET /api/v1/images/{key}``."""
        return [Route(IMAGE_ROUTE, self.image, methods=["GET"], name="image")]

    async def image(self, request: Request) -> Response:
        """``GET /api/v1/images/{key}``: an output image, cacheable for good."""
        key: str = request.path_params["key"]
        if not _safe_key(key) or not await self._image_visible(key, request):
            return error(404, "no such image")
        try:
            info = await self.engine.image_info(key)  # a key the store refuses: missing
        except NotFoundError:
            return error(404, "no such image")
        etag = quote_etag(info.etag)
        cache = _IMAGE_CACHE if self.keys is None else _PRIVATE_IMAGE_CACHE
        headers = {"ETag": etag, "Cache-Control": cache}
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and etag_matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        if info.path is not None:
            return FileResponse(info.path, media_type=info.content_type, headers=headers)
        try:
            data = await self.engine.image(key)
        except NotFoundError:
            return error(404, "no such image")
        return Response(data, media_type=info.content_type, headers=headers)

    async def _image_visible(self, key: str, request: Request) -> bool:
        """With keys, an image is its request owner's: keys start with the request id."""
        if self.keys is None:
            return True
        request_id = key.split("/", 1)[0]
        if not is_request_id(request_id):
            return False
        try:
            job = await self.engine.get_request(request_id.lower())
        except NotFoundError:
            return False
        return self.visible(job, request)

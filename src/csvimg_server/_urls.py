"""The server's public URLs, built from its own routes (`csvimg.urls.PublicUrls`)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from starlette.routing import BaseRoute, Route

from csvimg._errors import ConfigError

__all__ = ["RouteUrls"]


@attrs.frozen
class RouteUrls:
    """Image and output CSV URLs from the routes named ``image`` and ``output_csv``.

    `create_app` hands one to its engine (`csvimg.engine.Engine.urls`), so
    the URLs in answers, output CSVs and webhook events follow the routes.
    """

    image: Route
    output_csv: Route

    @classmethod
    def from_routes(cls, routes: Sequence[BaseRoute]) -> RouteUrls:
        """Find the two routes by name among *routes*; `ConfigError` if one is missing."""
        named = {r.name: r for r in routes if isinstance(r, Route)}
        try:
            return cls(image=named["image"], output_csv=named["output_csv"])
        except KeyError as exc:
            raise ConfigError(f"no route named {exc.args[0]!r}") from None

    def image_url(self, key: str, base: str) -> str:
        """``<base>/api/v1/images/<key>``."""
        return base + self.image.url_path_for("image", key=key)

    def output_csv_url(self, request_id: str, base: str) -> str:
        """``<base>/api/v1/requests/<request_id>/output.csv``."""
        return base + self.output_csv.url_path_for("output_csv", request_id=request_id)

"""Public URLs of what the engine hands out: output images and output CSVs.

The engine does not know any HTTP routes. It asks a `PublicUrls` object
(``Engine(urls=...)``) for the URL of an output image (by blob key) and of
a request's output CSV, under a base URL (``Settings.public_url``, or one
the caller passes, e.g. the host an HTTP request came to). `DefaultUrls`,
the default, gives the reference server's URLs::

    <base>/api/v1/images/<key>
    <base>/api/v1/requests/<request_id>/output.csv

An application serving images elsewhere (a CDN, its own routes) passes
its own object with the two methods.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs

__all__ = ["DefaultUrls", "PublicUrls"]


@runtime_checkable
class PublicUrls(Protocol):
    """Builds the public URLs the engine puts in outputs and webhook events."""

    def image_url(self, key: str, base: str) -> str:
        """The URL of the output image stored under blob *key*, below *base* (no trailing /)."""
        ...

    def output_csv_url(self, request_id: str, base: str) -> str:
        """The URL of *request_id*'s output CSV, below *base* (no trailing /)."""
        ...


@attrs.frozen
class DefaultUrls:
    """The reference server's URLs: ``<base><images_path><key>`` and the output CSV route."""

    images_path: str = "/api/v1/images/"
    """The prefix of image URLs, before the blob key."""

    output_csv_path: str = "/api/v1/requests/{request_id}/output.csv"
    """The output CSV's path, ``{request_id}`` replaced."""

    def image_url(self, key: str, base: str) -> str:
        """``<base><images_path><key>``."""
        return f"{base}{self.images_path}{key}"

    def output_csv_url(self, request_id: str, base: str) -> str:
        """``<base>`` + `output_csv_path` for *request_id*."""
        return base + self.output_csv_path.replace("{request_id}", request_id)

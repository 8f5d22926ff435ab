"""ManifestLimits: the bounds on one upload, and how they are read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

import attrs

from csvimg._util import env_int

__all__ = ["ManifestLimits"]


def _at_least_one(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, not {value}")


_ENV_VARS: Final = {
    "CSVIMG_MAX_UPLOAD_BYTES": "max_bytes",
    "CSVIMG_MAX_ROWS": "max_rows",
    "CSVIMG_MAX_URLS_PER_ROW": "max_urls_per_row",
    "CSVIMG_MAX_URL_LENGTH": "max_url_length",
}


@attrs.frozen
class ManifestLimits:
    """Bounds that keep one upload from exhausting memory or time.

    ``max_bytes`` caps the size of the file, ``max_rows`` the number of data
    rows, ``max_urls_per_row`` the URLs in one cell, ``max_url_length`` the
    characters of one URL, and ``max_errors`` the problems listed in one
    `ManifestError` (the rest are counted, not listed).
    """

    max_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_at_least_one)
    max_rows: int = attrs.field(default=1_000_000, validator=_at_least_one)
    max_urls_per_row: int = attrs.field(default=100, validator=_at_least_one)
    max_url_length: int = attrs.field(default=2048, validator=_at_least_one)
    max_errors: int = attrs.field(default=100, validator=_at_least_one)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ManifestLimits:
        """Build limits from ``CSVIMG_MAX_*`` variables, defaults for unset ones.

        Reads ``CSVIMG_MAX_UPLOAD_BYTES``, ``CSVIMG_MAX_ROWS``,
        ``CSVIMG_MAX_URLS_PER_ROW`` and ``CSVIMG_MAX_URL_LENGTH`` from
        *environ* (default: `os.environ`). Each must be a whole number of at
        least 1; anything else raises `csvimg.ConfigError`.
        """
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for var, name in _ENV_VARS.items():
            value = env_int(env, var, 0, low=1)
            if value:
                values[name] = value
        return cls(**values)


_DEFAULT_LIMITS: Final = ManifestLimits()

"""Resource caps of the codec, Pillow-free so `csvimg.Settings` can hold them."""

from __future__ import annotations

import os
from collections.abc import Mapping

import attrs

from csvimg._errors import ConfigError
from csvimg._util import env_int

__all__ = ["CodecLimits"]


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ConfigError(f"{attribute.name} must be a positive integer, not {value!r}")


@attrs.frozen
class CodecLimits:
    """Resource caps applied to every image before it is decoded.

    ``max_pixels`` caps width x height as declared by the file header (the
    decompression-bomb guard: decoding costs 3-4 bytes per pixel);
    ``max_input_bytes`` caps the encoded input.
    """

    max_pixels: int = attrs.field(default=50_000_000, validator=_positive)
    max_input_bytes: int = attrs.field(default=50 * 1024 * 1024, validator=_positive)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CodecLimits:
        """Build limits from ``CSVIMG_MAX_PIXELS`` in *environ* (default `os.environ`).

        Unset or empty means the default; anything but a positive integer
        raises `~csvimg.ConfigError`.
        """
        env = os.environ if environ is None else environ
        value = env_int(env, "CSVIMG_MAX_PIXELS", 0, low=1)
        if not value:
            return cls()
        return cls(max_pixels=value)

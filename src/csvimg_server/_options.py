"""Reading what a caller sends: ids in the path, query numbers, upload options.

Each parser answers a bad value with an `ApiError` (400, or 404 for an id
that cannot exist) whose message says what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import attrs
from starlette.requests import Request

from csvimg._errors import CallbackUrlError
from csvimg.codec import output_formats
from csvimg.fetch import FetchPolicy
from csvimg.jobs import ProcessOptions
from csvimg.webhooks import check_callback_url, is_webhook_id
from csvimg_server._errors import ApiError

__all__ = [
    "UPLOAD_FIELDS",
    "checked_callback",
    "int_param",
    "is_request_id",
    "process_options",
    "refused_callback",
    "request_id",
    "webhook_id",
]

UPLOAD_FIELDS: Final = frozenset({"file", "callback_url", "quality", "format", "max_dimension"})
"""The form fields ``POST /api/v1/upload`` accepts."""

_UUID: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")


def is_request_id(raw: str) -> bool:
    """Whether *raw* is a UUID, the only form a request id takes."""
    return _UUID.match(raw) is not None


def request_id(raw: str) -> str:
    """The canonical (lower-case) request id *raw*; 404 if it is not a UUID."""
    # Only canonical UUIDs reach the storage, so a malformed id is a plain
    # 404 and never a query with odd input.
    if not is_request_id(raw):
        raise ApiError(404, f"no request {raw[:64]!r}")
    return raw.lower()


def webhook_id(raw: str) -> str | None:
    """*raw* if it has the form of a webhook id, else None (`csvimg.webhooks.is_webhook_id`)."""
    return raw if is_webhook_id(raw) else None


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    """The whole-number query parameter *name*, *default* if absent or blank."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a whole number, not {raw[:32]!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}, not {value}")
    return value


async def checked_callback(url: str, fetch: FetchPolicy) -> str:
    """Validate a receiver URL (`csvimg.webhooks.check_callback_url`); 400 if refused."""
    try:
        return await check_callback_url(url, fetch)
    except CallbackUrlError as exc:
        raise refused_callback(exc) from None


def refused_callback(exc: CallbackUrlError) -> ApiError:
    """The 400 answer to a refused ``callback_url``."""
    return ApiError(400, str(exc))


def process_options(fields: Mapping[str, str], defaults: ProcessOptions) -> ProcessOptions:
    """*defaults* with the upload form's ``quality``, ``format`` and ``max_dimension``."""
    changes: dict[str, Any] = {}
    if raw := fields.get("quality", "").strip():
        try:
            changes["quality"] = int(raw)
        except ValueError:
            raise ApiError(400, f"quality must be a whole number, not {raw[:32]!r}") from None
    if raw := fields.get("format", "").strip():
        fmt = raw.upper()
        fmt = "JPEG" if fmt == "JPG" else fmt
        formats = output_formats()
        if fmt not in formats:
            raise ApiError(
                400, f"format must be one of {', '.join(sorted(formats))}, not {raw[:32]!r}"
            )
        changes["format"] = fmt
    if raw := fields.get("max_dimension", "").strip():
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ApiError(
                400, f"max_dimension must be a whole number of pixels, not {raw[:32]!r}"
            )
        changes["max_dimension"] = value
    try:
        return attrs.evolve(defaults, **changes)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None

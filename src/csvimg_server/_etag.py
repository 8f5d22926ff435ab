"""Entity tags of the output images: the ``ETag`` sent and ``If-None-Match``."""

from __future__ import annotations

__all__ = ["etag_matches", "quote_etag"]


def quote_etag(etag: str) -> str:
    """*etag* as an ``ETag`` header value: quoted unless it already is."""
    return etag if etag.startswith(('"', 'W/"')) else f'"{etag}"'


def etag_matches(header: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` *header* matches *etag*.

    Weak comparison, as RFC 9110 prescribes for If-None-Match.
    """
    if header.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in header.split(","))

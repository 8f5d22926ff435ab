"""What the commands need to know about where they print, and what they must not log."""

from __future__ import annotations

from typing import TextIO

__all__ = ["isatty", "redact_url"]


def isatty(stream: TextIO) -> bool:
    """Whether *stream* is a terminal (progress bars) rather than a file or pipe (lines)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


def redact_url(url: str) -> str:
    """Hide a password in a backend URL before logging it."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, _, hostpart = rest.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}"

"""What the commands need to know about where they print.

URLs are masked for the log with `csvimg._util.mask_password`.
"""

from __future__ import annotations

from typing import TextIO

__all__ = ["isatty"]


def isatty(stream: TextIO) -> bool:
    """Whether *stream* is a terminal (progress bars) rather than a file or pipe (lines)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


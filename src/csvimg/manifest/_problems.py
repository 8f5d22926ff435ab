"""Problem: one thing wrong with a manifest, its stable codes and message helpers."""

from __future__ import annotations

from typing import Final

import attrs

__all__ = ["PROBLEM_CODES", "Problem"]

PROBLEM_CODES: Final = frozenset(
    {
        "empty-file",
        "not-utf8",
        "not-csv",
        "missing-column",
        "duplicate-column",
        "wrong-delimiter",
        "extra-cell",
        "missing-cell",
        "blank-serial",
        "duplicate-serial",
        "blank-product-name",
        "no-urls",
        "too-many-urls",
        "bad-url",
        "bad-scheme",
        "no-rows",
        "too-many-rows",
        "too-large",
        "too-many-errors",
    }
)
"""Every `Problem.code` that `parse_manifest` and `check_image_url` may produce."""


@attrs.frozen
class Problem:
    """One thing wrong with an uploaded manifest.

    ``row`` is the row number as a spreadsheet shows it (header = 1), or
    None for a problem of the whole file; ``column`` is the column's header
    text as in the file (for ``missing-column``: the canonical name of the
    missing column), or None; ``code`` is stable and machine-readable (one
    of `PROBLEM_CODES`); ``message`` is for people and names the row.
    """

    row: int | None
    column: str | None
    code: str
    message: str

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready dict with keys row, column, code and message."""
        return {"row": self.row, "column": self.column, "code": self.code,
                "message": self.message}


def _shorten(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


"""The header: required column names, their accepted spellings, delimiter detection."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

__all__ = ["REQUIRED_COLUMNS"]

REQUIRED_COLUMNS: Final = ("S. No.", "Product Name", "Input Image Urls")
"""Canonical names of the required columns: serial, product name, image URLs."""

_HEADER_NOISE: Final = re.compile(r"[\s._\-]+")
_ALIASES: Final[Mapping[str, int]] = {
    # serial number
    "sno": 0, "serialnumber": 0, "serialno": 0, "serial": 0, "no": 0, "#": 0,
    "srno": 0, "slno": 0,
    # product name
    "productname": 1, "product": 1, "name": 1,
    # image URLs
    "inputimageurls": 2, "inputimageurl": 2, "imageurls": 2, "imageurl": 2,
    "inputurls": 2, "urls": 2, "url": 2,
}


def _canonical(cell: str) -> int | None:
    return _ALIASES.get(_HEADER_NOISE.sub("", cell.lower()))


def _wrong_delimiter(cells: list[str]) -> str | None:
    text = ",".join(cells)
    for delimiter in (";", "\t"):
        if delimiter not in text:
            continue
        found = {_canonical(part.strip().strip('"')) for part in text.split(delimiter)}
        if {0, 1, 2} <= found:
            return delimiter
    return None


"""Manifest: the validated result, and the compact sequence holding its rows."""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from typing import overload

import attrs

from csvimg.jobs import Row

__all__ = ["Manifest"]


class _Rows(Sequence[Row]):
    """The rows of a parsed manifest, kept compact; `Row` objects made on access.

    A `Row` with its ``urls`` tuple costs about 940 bytes for a row of three
    URLs, half of it the URLs split out of the URL cell. Here a row is its
    line number (in an array) and its cells; its URLs are split again from
    the URL cell when the row is read, which `parse_manifest` guarantees
    gives the same URLs (rows where it would not keep theirs). A 100,000-row
    upload takes about 45 MB instead of 95 MB. Reads as a tuple of `Row`
    (indexing, slices as tuples, iteration, equality with any sequence).
    """

    __slots__ = ("_cells", "_lines", "_odd", "_url_at", "total_urls")

    def __init__(self, url_at: int) -> None:
        self._url_at = url_at
        self._lines = array("l")
        self._cells: list[tuple[str, ...]] = []
        # Rows whose URLs are not simply the URL cell split at commas.
        self._odd: dict[int, tuple[str, ...]] = {}
        self.total_urls = 0
        """The number of URLs over all rows."""

    def _add(self, line: int, cells: tuple[str, ...], urls: list[str], plain: bool) -> None:
        if not plain:
            self._odd[len(self._cells)] = tuple(urls)
        self._lines.append(line)
        self._cells.append(cells)
        self.total_urls += len(urls)

    def _row(self, index: int) -> Row:
        cells = self._cells[index]
        urls = self._odd.get(index) if self._odd else None
        if urls is None:
            urls = tuple(cells[self._url_at].split(","))
        return Row(index, self._lines[index], cells, urls)

    def __len__(self) -> int:
        return len(self._cells)

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Row, ...]: ...

    def __getitem__(self, index: int | slice) -> Row | tuple[Row, ...]:
        if isinstance(index, slice):
            return tuple(map(self._row, range(len(self._cells))[index]))
        return self._row(range(len(self._cells))[index])

    def __iter__(self) -> Iterator[Row]:
        return map(self._row, range(len(self._cells)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(
            a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"<{len(self)} manifest rows>"


@attrs.frozen
class Manifest:
    """A validated manifest: the header and every data row, in file order.

    ``header`` holds the header cells exactly as in the file (byte-order
    mark removed, trailing blank cells dropped); ``serial_column``,
    ``name_column`` and ``url_column`` are 0-based indexes into it; every
    row's ``cells`` has exactly ``len(header)`` entries. ``rows`` reads
    like a tuple of `Row`; from `parse_manifest` it is a compact sequence
    that makes each `Row` when it is read (half the memory).
    """

    header: tuple[str, ...]
    serial_column: int
    name_column: int
    url_column: int
    rows: Sequence[Row]

    @property
    def total_urls(self) -> int:
        """The number of image URLs over all rows (duplicates counted)."""
        if isinstance(self.rows, _Rows):
            return self.rows.total_urls
        return sum(len(row.urls) for row in self.rows)


"""The output CSV: the input rows unchanged plus one column of output image URLs.

`write_output_csv` streams it from a storage; `neutralise` defuses cells a
spreadsheet would run as formulas. `csvimg.engine.Engine.output_csv` is
the usual way in: it checks the request finished and builds the URLs.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable

from csvimg._errors import StorageError
from csvimg.backends import Storage
from csvimg.jobs import Item, Request

__all__ = ["OUTPUT_COLUMN", "neutralise", "write_output_csv"]

OUTPUT_COLUMN = "Output Image Urls"
"""The name of the column the output CSV adds."""

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: str) -> str:
    """Defuse a cell a spreadsheet would run as a formula (CSV injection).

    A cell starting with ``= + - @``, tab or CR gets a leading apostrophe,
    as OWASP recommends; every other cell is returned unchanged.
    """
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


async def write_output_csv(
    storage: Storage,
    request: Request,
    to_url: Callable[[Item], str | None],
    *,
    page: int = 2000,
) -> AsyncIterator[bytes]:
    """Stream the output CSV of *request* from *storage*, a chunk per page of rows.

    Each output cell holds one URL per input URL (``to_url(item)``), in
    the same order, comma-separated; a failed image leaves its entry
    empty. Every cell is neutralised. Raises `StorageError` when items are
    missing. The request's status is not checked here.
    """
    request_id = request.id
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow([neutralise(c) for c in (*request.header, OUTPUT_COLUMN)])
    row_offset = 0
    item_offset = 0
    pending: list[Item] = []
    while True:
        rows = await storage.list_rows(request_id, offset=row_offset, limit=page)
        if not rows:
            break
        row_offset += len(rows)
        needed = sum(len(r.urls) for r in rows)
        while len(pending) < needed:
            more = await storage.list_items(
                request_id, offset=item_offset, limit=max(page, needed - len(pending))
            )
            if not more:
                raise StorageError(f"request {request_id}: items missing for output CSV")
            item_offset += len(more)
            pending.extend(more)
        taken = 0
        for row in rows:
            row_items = pending[taken : taken + len(row.urls)]
            taken += len(row.urls)
            urls = ",".join((to_url(i) or "") if i.output_key else "" for i in row_items)
            writer.writerow([neutralise(c) for c in (*row.cells, urls)])
        pending = pending[taken:]
        yield buf.getvalue().encode("utf-8")
        buf.seek(0)
        buf.truncate()
    if buf.tell():
        yield buf.getvalue().encode("utf-8")

"""Conversions between SQLite rows and `csvimg.jobs` values, and the per-item statements.

`_start` and `_finish` are the steps `SqliteStorage` runs inside its write
transactions, one item at a time (several per transaction for the batch calls).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

from csvimg._errors import StorageError
from csvimg.backends.memory import finish_outcome, lease_item, settle_item
from csvimg.backends.sqlite._schema import _SELECT_ITEMS, _SELECT_REQUESTS
from csvimg.jobs import (
    Event,
    Item,
    ItemResult,
    ItemStatus,
    ProcessOptions,
    Request,
    RequestStatus,
    Row,
    check_request,
)


def _row_values(
    rid: str, rows: Sequence[Row], plain: list[bool]
) -> Iterator[tuple[str, int, int, str, str]]:
    """Yield the ``rows`` table values of *rows*, noting whether SQL may derive their items.

    Clears ``plain[0]`` if a row breaks what `_DERIVE_ITEMS` assumes:
    indexes counting up by one from the first, URLs stored without a JSON
    escape (so SQLite's JSON decoding has nothing to get wrong).
    """
    expected = rows[0].index if rows else 0
    for r in rows:
        urls = _dumps(r.urls)
        if r.index != expected or "\\" in urls:
            plain[0] = False
        expected += 1
        yield rid, r.index, r.line, _dumps(r.cells), urls


def _dumps(strings: Sequence[str]) -> str:
    """``json.dumps(list(strings))``, twice as fast for a few strings (the C escaper)."""
    return "[" + ", ".join(map(encode_basestring_ascii, strings)) + "]"


def _request_from(row: sqlite3.Row | tuple[Any, ...]) -> Request:
    return Request(
        id=row[0],
        status=RequestStatus(row[1]),
        created_at=row[2],
        updated_at=row[3],
        total=row[4],
        done=row[5],
        failed=row[6],
        header=tuple(json.loads(row[7])),
        url_column=row[8],
        callback_url=row[9],
        options=ProcessOptions.from_dict(json.loads(row[10])),
        owner=row[11],
        filename=row[12],
    )


def _item_from(row: tuple[Any, ...]) -> Item:
    return Item(
        id=row[0],
        request_id=row[1],
        row=row[2],
        position=row[3],
        url=row[4],
        status=ItemStatus(row[5]),
        attempts=row[6],
        output_key=row[7],
        content_type=row[8],
        bytes_in=row[9],
        bytes_out=row[10],
        width=row[11],
        height=row[12],
        error_code=row[13],
        error_message=row[14],
        lease_until=row[15],
        updated_at=row[16],
    )


def _event_from(row: tuple[Any, ...]) -> Event:
    return Event(
        id=row[0],
        type=row[1],
        request_id=row[2],
        created_at=row[3],
        owner=row[4],
        callback_url=row[5],
        attempts=row[6],
        next_attempt_at=row[7],
    )


def _get_item(conn: sqlite3.Connection, item_id: str) -> Item | None:
    row = conn.execute(_SELECT_ITEMS + " WHERE id = ?", (item_id,)).fetchone()
    return None if row is None else _item_from(row)


def _get_request(conn: sqlite3.Connection, request_id: str) -> Request | None:
    row = conn.execute(_SELECT_REQUESTS + " WHERE id = ?", (request_id,)).fetchone()
    return None if row is None else _request_from(row)


def _save_item(conn: sqlite3.Connection, item: Item) -> None:
    conn.execute(
        "UPDATE items SET status = ?, attempts = ?, lease_until = ?, output_key = ?, "
        "content_type = ?, bytes_in = ?, bytes_out = ?, width = ?, height = ?, "
        "error_code = ?, error_message = ?, updated_at = ? WHERE id = ?",
        (
            item.status.value,
            item.attempts,
            item.lease_until,
            item.output_key,
            item.content_type,
            item.bytes_in,
            item.bytes_out,
            item.width,
            item.height,
            item.error_code,
            item.error_message,
            item.updated_at,
            item.id,
        ),
    )


def _start(
    conn: sqlite3.Connection, item_id: str, at: float, lease_seconds: float
) -> Item | None:
    """Lease one item inside the caller's write transaction (see `Storage.start_item`)."""
    # A lease that ran out (its worker died) is taken over.
    item = lease_item(_get_item(conn, item_id), at=at, lease_seconds=lease_seconds)
    if item is None:
        return None
    _save_item(conn, item)
    row = conn.execute("SELECT status FROM requests WHERE id = ?", (item.request_id,)).fetchone()
    if row is not None and row[0] == RequestStatus.PENDING.value:
        check_request(RequestStatus.PENDING, RequestStatus.PROCESSING)
        conn.execute(
            "UPDATE requests SET status = ?, updated_at = ? WHERE id = ?",
            (RequestStatus.PROCESSING.value, at, item.request_id),
        )
    return item


def _finish(
    conn: sqlite3.Connection, item_id: str, result: ItemResult, at: float
) -> Request | None:
    """Record one outcome inside the caller's write transaction (see `Storage.finish_item`).

    The write transaction makes the read-modify-write of the counters safe
    across threads and processes: only one caller can see the last item finish.
    """
    item = _get_item(conn, item_id)
    if item is None or item.status.finished:
        return None
    _save_item(conn, settle_item(item, result, at=at))
    request = _get_request(conn, item.request_id)
    if request is None:  # pragma: no cover - items never outlive requests
        raise StorageError(f"item {item_id} has no request {item.request_id}")
    updated, event = finish_outcome(request, result, at)
    # Relative increments, although the write lock makes them equal to
    # `updated`'s values: they stay right even if someone edits by hand.
    conn.execute(
        "UPDATE requests SET done = done + ?, failed = failed + ?, status = ?, "
        "updated_at = ? WHERE id = ?",
        (
            updated.done - request.done,
            updated.failed - request.failed,
            updated.status.value,
            at,
            request.id,
        ),
    )
    if event is None:
        return None
    conn.execute(
        "INSERT INTO events (id, type, request_id, owner, callback_url, created_at, "
        "attempts, next_attempt_at, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
        (
            event.id,
            event.type,
            event.request_id,
            event.owner,
            event.callback_url,
            event.created_at,
            event.attempts,
            event.next_attempt_at,
        ),
    )
    return updated

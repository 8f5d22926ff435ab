"""Conversions between SQLite rows and `csvimg.jobs` values, and the per-item statements.

`_read` and `_write` are the two halves of `SqliteStorage.apply`: what a
`csvimg.ledger` operation reads and what it decided, inside one write
transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

from csvimg import ledger
from csvimg.backends.sqlite._schema import (
    _SELECT_EVENTS,
    _SELECT_EXPIRED,
    _SELECT_FORGOTTEN,
    _SELECT_ITEMS,
    _SELECT_REQUESTS,
)
from csvimg.jobs import (
    Event,
    Item,
    ItemStatus,
    ProcessOptions,
    Request,
    RequestStatus,
    Row,
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
        lease_until=row[8],
    )


def _get_item(conn: sqlite3.Connection, item_id: str) -> Item | None:
    row = conn.execute(_SELECT_ITEMS + " WHERE id = ?", (item_id,)).fetchone()
    return None if row is None else _item_from(row)


def _get_request(conn: sqlite3.Connection, request_id: str) -> Request | None:
    row = conn.execute(_SELECT_REQUESTS + " WHERE id = ?", (request_id,)).fetchone()
    return None if row is None else _request_from(row)


def _by_ids(conn: sqlite3.Connection, select: str, ids: Sequence[str]) -> list[Any]:
    """Rows of *select* (a ``SELECT ... FROM t``) whose ``id`` is among *ids*."""
    rows: list[Any] = []
    for first in range(0, len(ids), _IDS_PER_SELECT):
        chunk = ids[first : first + _IDS_PER_SELECT]
        marks = ", ".join("?" * len(chunk))
        rows += conn.execute(f"{select} WHERE id IN ({marks})", chunk).fetchall()
    return rows


_IDS_PER_SELECT = 500
"""Ids per ``IN (...)`` of `_by_ids` (well under SQLite's limit of bound variables)."""


def _read(conn: sqlite3.Connection, reads: ledger.Reads) -> ledger.State:
    """What a ledger operation asks for, inside the caller's write transaction."""
    found = _by_ids(conn, _SELECT_ITEMS, reads.item_ids)
    items = {item.id: item for item in map(_item_from, found)}
    if reads.stale is not None:
        q = reads.stale
        # The statuses are literals in these statements, not parameters:
        # only then may SQLite use the partial indexes items_leased and
        # items_pending.
        for row in conn.execute(_SELECT_EXPIRED, (q.now, q.limit)):
            items[row[0]] = _item_from(row)
        forgotten = [r[0] for r in conn.execute(_SELECT_FORGOTTEN, (q.pending_before, q.limit))]
        for item in map(_item_from, _by_ids(conn, _SELECT_ITEMS, forgotten)):
            items[item.id] = item
    events = {e.id: e for e in map(_event_from, _by_ids(conn, _SELECT_EVENTS, reads.event_ids))}
    if reads.due is not None:
        for row in conn.execute(
            _SELECT_EVENTS + " WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= ?1 "
            "AND (lease_until IS NULL OR lease_until <= ?1) ORDER BY created_at, rowid LIMIT ?2",
            (reads.due.now, reads.due.limit),
        ):
            events[row[0]] = _event_from(row)
    request_ids = list(dict.fromkeys(item.request_id for item in items.values()))
    requests = {r.id: r for r in map(_request_from, _by_ids(conn, _SELECT_REQUESTS, request_ids))}
    return ledger.State(items=items, requests=requests, events=events)


def _write(conn: sqlite3.Connection, changes: ledger.Changes) -> None:
    """Write what a ledger operation decided, inside the caller's write transaction.

    Items and requests exist already (`create_request` made them): they are
    updated. Events are new or updated: insert or replace.
    """
    conn.executemany(
        "UPDATE items SET status = ?, attempts = ?, lease_until = ?, output_key = ?, "
        "content_type = ?, bytes_in = ?, bytes_out = ?, width = ?, height = ?, "
        "error_code = ?, error_message = ?, updated_at = ? WHERE id = ?",
        [
            (
                item.status.value, item.attempts, item.lease_until, item.output_key,
                item.content_type, item.bytes_in, item.bytes_out, item.width, item.height,
                item.error_code, item.error_message, item.updated_at, item.id,
            )
            for item in changes.items
        ],
    )
    conn.executemany(
        "UPDATE requests SET status = ?, done = ?, failed = ?, updated_at = ? WHERE id = ?",
        [(r.status.value, r.done, r.failed, r.updated_at, r.id) for r in changes.requests],
    )
    conn.executemany(
        "INSERT OR REPLACE INTO events (id, type, request_id, owner, callback_url, created_at, "
        "attempts, next_attempt_at, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET attempts = excluded.attempts, "
        "next_attempt_at = excluded.next_attempt_at, lease_until = excluded.lease_until",
        [
            (
                e.id, e.type, e.request_id, e.owner, e.callback_url, e.created_at,
                e.attempts, e.next_attempt_at, e.lease_until,
            )
            for e in changes.events
        ],
    )

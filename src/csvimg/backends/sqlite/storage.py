"""`SqliteStorage`: requests, rows, items, webhooks and the outbox in one SQLite file."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from csvimg._errors import NotFoundError, StorageError
from csvimg.backends.sqlite._database import DEFAULT_BUSY_TIMEOUT, _Database, parse_sqlite_url
from csvimg.backends.sqlite._rows import (
    _event_from,
    _finish,
    _get_item,
    _get_request,
    _item_from,
    _request_from,
    _row_values,
    _save_item,
    _start,
)
from csvimg.backends.sqlite._schema import (
    _DERIVE_ITEMS,
    _INSERT_REQUEST,
    _LIST_ITEMS,
    _SELECT_EVENTS,
    _SELECT_EXPIRED,
    _SELECT_FORGOTTEN,
    _SELECT_REQUESTS,
    _STORAGE_SCHEMA,
    _sql_items_available,
)
from csvimg.jobs import (
    Delivery,
    Event,
    Item,
    ItemResult,
    ItemStatus,
    Request,
    Row,
    Webhook,
    item_rows,
    now,
)
from csvimg.settings import Settings

__all__ = ["SqliteStorage"]

_ROWS_PER_CHUNK = 5000
"""Rows `SqliteStorage.create_request` reads at a time (all in one transaction)."""


class SqliteStorage:
    """Storage in one SQLite file; see `csvimg.backends.Storage`.

    One instance serves any number of tasks of one event loop; any number of
    instances (threads, processes) may share the file.
    """

    derive_items_in_sql: bool = True
    """Let SQLite make new items from the stored rows (`_DERIVE_ITEMS`) when
    it has JSON and window functions; False: insert Python tuples always."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        max_connections: int = 8,
    ) -> None:
        self.path = Path(path).absolute()
        self._db = _Database(
            self.path,
            busy_timeout=busy_timeout,
            max_connections=max_connections,
            schema=_STORAGE_SCHEMA,
        )

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> SqliteStorage:
        """Build from ``sqlite:///path.db`` (see `parse_sqlite_url`)."""
        path, busy_timeout = parse_sqlite_url(url)
        return cls(path, busy_timeout=busy_timeout)

    def __repr__(self) -> str:
        return f"SqliteStorage({str(self.path)!r})"

    async def open(self) -> None:
        """Create the database file and schema if needed."""
        await self._db.open()

    async def close(self) -> None:
        """Close the connections (the file keeps everything)."""
        await self._db.close()

    async def ping(self) -> None:
        """Raise `StorageError` unless the database answers."""
        await self._db.ping()

    async def create_request(self, request: Request, rows: Sequence[Row]) -> None:
        """Insert the request, its rows and their items in one transaction.

        Items are inserted straight from the rows as tuples (`item_rows`)
        with only the columns a new item sets; the others default to NULL.
        """
        rid = request.id
        at = request.created_at

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    _INSERT_REQUEST,
                    (
                        rid,
                        request.status.value,
                        request.created_at,
                        request.updated_at,
                        request.total,
                        request.done,
                        request.failed,
                        json.dumps(list(request.header)),
                        request.url_column,
                        request.callback_url,
                        json.dumps(request.options.to_dict()),
                        request.owner,
                        request.filename,
                    ),
                )
            except sqlite3.IntegrityError:
                raise StorageError(f"request {rid} exists already") from None
            # A chunk of rows at a time: each `Row` is read once, and only a
            # chunk of them is alive at once (a parsed manifest makes them on
            # access). Generators, not lists.
            prefix = f"{rid}."
            derive = self.derive_items_in_sql and _sql_items_available(conn)
            seq = 0
            for first in range(0, len(rows), _ROWS_PER_CHUNK):
                chunk = rows[first : first + _ROWS_PER_CHUNK]
                # Whether SQLite may make this chunk's items from the rows it
                # just stored: their indexes count up by one (so ORDER BY idx
                # is the order given) and no URL needed a JSON escape.
                plain = [derive]
                start_index = chunk[0].index if chunk else 0
                conn.executemany(
                    "INSERT INTO rows (request_id, idx, line, cells, urls) "
                    "VALUES (?, ?, ?, ?, ?)",
                    _row_values(rid, chunk, plain),
                )
                before = seq
                seq += sum(len(r.urls) for r in chunk)
                try:
                    if plain[0]:
                        conn.execute(
                            _DERIVE_ITEMS,
                            (rid, before, at, start_index, start_index + len(chunk)),
                        )
                        continue
                    conn.executemany(
                        "INSERT INTO items (id, request_id, seq, row, position, url, status, "
                        "attempts, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'PENDING', 0, ?)",
                        (
                            (prefix + str(n), rid, n, row, position, url, at)
                            for n, row, position, url in item_rows(chunk, start=before)
                        ),
                    )
                except sqlite3.IntegrityError as exc:
                    raise StorageError(f"request {rid}: duplicate item id ({exc})") from None

        await self._db.write(insert)

    async def get_request(self, request_id: str) -> Request | None:
        """Return the request or None (read on the event loop: see `_Database.read`)."""
        return await self._db.read(lambda conn: _get_request(conn, request_id))

    async def list_requests(self, *, owner: str | None = None, limit: int = 50) -> list[Request]:
        """Newest first (of *owner* when given)."""

        def query(conn: sqlite3.Connection) -> list[Request]:
            if owner is None:
                cur = conn.execute(
                    _SELECT_REQUESTS + " ORDER BY created_at DESC, rowid DESC LIMIT ?",
                    (limit,),
                )
            else:
                cur = conn.execute(
                    _SELECT_REQUESTS
                    + " WHERE owner = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                    (owner, limit),
                )
            return [_request_from(r) for r in cur]

        return await self._db.run(query)

    async def list_rows(self, request_id: str, *, offset: int = 0, limit: int = 1000) -> list[Row]:
        """Rows in upload order."""

        def query(conn: sqlite3.Connection) -> list[Row]:
            cur = conn.execute(
                "SELECT idx, line, cells, urls FROM rows WHERE request_id = ? "
                "ORDER BY idx LIMIT ? OFFSET ?",
                (request_id, limit, offset),
            )
            return [
                Row(index=r[0], line=r[1], cells=tuple(json.loads(r[2])),
                    urls=tuple(json.loads(r[3])))
                for r in cur
            ]

        return await self._db.run(query)

    async def list_items(
        self, request_id: str, *, offset: int = 0, limit: int = 1000
    ) -> list[Item]:
        """Items in (row, position) order, as they were created (by id: see _LIST_ITEMS)."""
        if limit <= 0:
            return []

        def query(conn: sqlite3.Connection) -> list[Item]:
            cur = conn.execute(_LIST_ITEMS, (request_id, max(0, offset), limit))
            return [_item_from(r) for r in cur]

        return await self._db.run(query)

    async def get_item(self, item_id: str) -> Item | None:
        """Return the item or None (read on the event loop: see `_Database.read`)."""
        return await self._db.read(lambda conn: _get_item(conn, item_id))

    async def start_item(self, item_id: str, *, lease_seconds: float) -> Item | None:
        """Lease the item (see the protocol), in one write transaction."""
        return await self._db.write(
            lambda conn: _start(conn, item_id, now(), lease_seconds), short=True
        )

    async def start_items(self, item_ids: Sequence[str], *, lease_seconds: float) -> list[Item]:
        """Lease many items in one write transaction; return those that started."""
        if not item_ids:
            return []

        def start(conn: sqlite3.Connection) -> list[Item]:
            at = now()
            started = (_start(conn, i, at, lease_seconds) for i in item_ids)
            return [item for item in started if item is not None]

        return await self._db.write(start, short=True)

    async def extend_lease(self, item_id: str, *, lease_seconds: float) -> bool:
        """Push a PROCESSING item's lease forward."""
        return bool(await self.extend_leases([item_id], lease_seconds=lease_seconds))

    async def extend_leases(self, item_ids: Sequence[str], *, lease_seconds: float) -> list[str]:
        """Push the leases of the PROCESSING items among *item_ids* forward: one transaction."""
        if not item_ids:
            return []

        def extend(conn: sqlite3.Connection) -> list[str]:
            until = now() + lease_seconds
            extended = []
            for item_id in item_ids:
                cur = conn.execute(
                    "UPDATE items SET lease_until = ? WHERE id = ? AND status = ?",
                    (until, item_id, ItemStatus.PROCESSING.value),
                )
                if cur.rowcount > 0:
                    extended.append(item_id)
            return extended

        return await self._db.write(extend, short=True)

    async def retry_item(self, item_id: str, *, error_code: str, error_message: str) -> bool:
        """Move PROCESSING -> PENDING, keeping the error for the record."""

        def retry(conn: sqlite3.Connection) -> bool:
            item = _get_item(conn, item_id)
            if item is None or item.status is not ItemStatus.PROCESSING:
                return False
            _save_item(
                conn,
                item.with_status(
                    ItemStatus.PENDING,
                    lease_until=None,
                    error_code=error_code,
                    error_message=error_message,
                ),
            )
            return True

        return await self._db.write(retry)

    async def finish_item(self, item_id: str, result: ItemResult) -> Request | None:
        """Record the outcome, bump counters, maybe finish the request: one transaction."""
        return await self._db.write(
            lambda conn: _finish(conn, item_id, result, now()), short=True
        )

    async def finish_items(self, results: Sequence[tuple[str, ItemResult]]) -> list[Request]:
        """`finish_item` for every pair, all in one write transaction."""
        if not results:
            return []

        def finish(conn: sqlite3.Connection) -> list[Request]:
            at = now()
            finished = (_finish(conn, i, result, at) for i, result in results)
            return [request for request in finished if request is not None]

        return await self._db.write(finish, short=True)

    async def stale_items(self, *, now: float, pending_before: float, limit: int) -> list[str]:
        """Take back ended leases, touch forgotten PENDING items; return their ids.

        One write transaction: PROCESSING items whose lease ended before
        *now* move back to PENDING, PENDING items untouched since
        *pending_before* are touched; both get ``updated_at = now``, so
        another sweeper (thread or process) does not return them again
        within its window.
        """

        def sweep(conn: sqlite3.Connection) -> list[str]:
            # Both selections before any update: an item moved back to
            # PENDING here must not also be picked as a forgotten PENDING one.
            # The statuses are literals, not parameters: only then may SQLite
            # use the partial indexes items_leased and items_pending.
            expired = conn.execute(_SELECT_EXPIRED, (now, limit)).fetchall()
            forgotten = conn.execute(
                _SELECT_FORGOTTEN, (pending_before, max(0, limit - len(expired)))
            ).fetchall()
            for row in expired:
                item = _item_from(row)
                _save_item(
                    conn, item.with_status(ItemStatus.PENDING, lease_until=None, updated_at=now)
                )
            conn.executemany(
                "UPDATE items SET updated_at = ? WHERE id = ?", ((now, r[0]) for r in forgotten)
            )
            return [r[0] for r in expired] + [r[0] for r in forgotten]

        return await self._db.write(sweep)

    async def add_webhook(self, webhook: Webhook) -> None:
        """Register a receiver (replacing one with the same id)."""
        await self._db.write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO webhooks (id, url, secret, created_at, owner, active) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    webhook.id,
                    webhook.url,
                    webhook.secret,
                    webhook.created_at,
                    webhook.owner,
                    int(webhook.active),
                ),
            )
        )

    async def list_webhooks(self, *, owner: str | None = None) -> list[Webhook]:
        """Registrations of *owner* (None: the ownerless ones), oldest first."""

        def query(conn: sqlite3.Connection) -> list[Webhook]:
            cur = conn.execute(
                "SELECT id, url, secret, created_at, owner, active FROM webhooks "
                "WHERE owner IS ? ORDER BY created_at, rowid",
                (owner,),
            )
            return [
                Webhook(id=r[0], url=r[1], secret=r[2], created_at=r[3], owner=r[4],
                        active=bool(r[5]))
                for r in cur
            ]

        return await self._db.run(query)

    async def set_webhook_active(self, webhook_id: str, active: bool) -> None:
        """Enable or disable a registration (unknown ids are ignored)."""
        await self._db.write(
            lambda conn: conn.execute(
                "UPDATE webhooks SET active = ? WHERE id = ?", (int(active), webhook_id)
            )
        )

    async def delete_webhook(self, webhook_id: str, *, owner: str | None = None) -> bool:
        """Delete a registration of *owner*."""

        def delete(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM webhooks WHERE id = ? AND owner IS ?", (webhook_id, owner)
            )
            return cur.rowcount > 0

        return await self._db.write(delete)

    async def claim_events(self, *, now: float, limit: int, lease_seconds: float) -> list[Event]:
        """Lease up to *limit* due, undelivered events, oldest first."""

        def claim(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                _SELECT_EVENTS
                + " WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= ? "
                "AND (lease_until IS NULL OR lease_until <= ?) "
                "ORDER BY created_at, rowid LIMIT ?",
                (now, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE events SET lease_until = ? WHERE id = ?",
                ((now + lease_seconds, r[0]) for r in rows),
            )
            return [_event_from(r) for r in rows]

        return await self._db.write(claim)

    async def reschedule_event(self, event_id: str, *, next_attempt_at: float | None) -> None:
        """Count the round and schedule the next (None: delivered, never claimed again)."""

        def reschedule(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?, "
                "lease_until = NULL WHERE id = ?",
                (next_attempt_at, event_id),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"no event {event_id}")

        await self._db.write(reschedule)

    async def add_delivery(self, request_id: str, delivery: Delivery) -> None:
        """Append one attempt to the request's log."""
        await self._db.write(
            lambda conn: conn.execute(
                "INSERT INTO deliveries (request_id, event_id, url, attempt, at, status_code, "
                "error, webhook_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request_id,
                    delivery.event_id,
                    delivery.url,
                    delivery.attempt,
                    delivery.at,
                    delivery.status_code,
                    delivery.error,
                    delivery.webhook_id,
                ),
            )
        )

    async def list_deliveries(self, request_id: str) -> list[Delivery]:
        """Return the request's attempts, oldest first."""

        def query(conn: sqlite3.Connection) -> list[Delivery]:
            cur = conn.execute(
                "SELECT event_id, url, attempt, at, status_code, error, webhook_id "
                "FROM deliveries WHERE request_id = ? ORDER BY seq",
                (request_id,),
            )
            return [
                Delivery(event_id=r[0], url=r[1], attempt=r[2], at=r[3], status_code=r[4],
                         error=r[5], webhook_id=r[6])
                for r in cur
            ]

        return await self._db.run(query)

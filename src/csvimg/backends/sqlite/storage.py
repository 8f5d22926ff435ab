"""`SqliteStorage`: requests, rows, items, webhooks and the outbox in one SQLite file."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from csvimg import ledger
from csvimg._errors import StorageError
from csvimg.backends.sqlite._database import DEFAULT_BUSY_TIMEOUT, _Database, parse_sqlite_url
from csvimg.backends.sqlite._rows import (
    _get_item,
    _get_request,
    _item_from,
    _read,
    _request_from,
    _row_values,
    _write,
)
from csvimg.backends.sqlite._schema import (
    _DERIVE_ITEMS,
    _INSERT_REQUEST,
    _LIST_ITEMS,
    _SELECT_REQUESTS,
    _STORAGE_SCHEMA,
    _sql_items_available,
)
from csvimg.jobs import (
    Delivery,
    Item,
    Request,
    Row,
    Webhook,
    item_rows,
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

    async def apply(self, op: ledger.Operation) -> ledger.Changes:
        """Apply a ledger operation in one write transaction (see the protocol).

        Operations on a batch of items by id are short writes (run on the
        calling thread, see `_Database.write`); a sweep or an outbox lease
        scans, so it runs in the pool.
        """
        reads = op.reads
        short = reads.stale is None and reads.due is None
        return await self._db.write(
            lambda conn: ledger.run(op, partial(_read, conn), partial(_write, conn)), short=short
        )

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

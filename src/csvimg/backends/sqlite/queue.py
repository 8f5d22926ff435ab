"""`SqliteQueue`: an at-least-once queue of item ids in a SQLite table."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path

import anyio

from csvimg.backends import Claim
from csvimg.backends.sqlite._database import DEFAULT_BUSY_TIMEOUT, _Database, parse_sqlite_url
from csvimg.backends.sqlite._schema import (
    _ANY_READY,
    _ENQUEUE_RANGE,
    _QUEUE_SCHEMA,
    _SELECT_READY,
)
from csvimg.jobs import ItemIds, now
from csvimg.settings import Settings

__all__ = ["SqliteQueue"]


def _token_row(token: str) -> int | None:
    head, sep, _ = token.partition("-")
    if not sep or not head.isdigit():
        return None
    return int(head)


class SqliteQueue:
    """An at-least-once queue of item ids in a SQLite table; see `csvimg.backends.Queue`.

    A claim is one ``BEGIN IMMEDIATE`` transaction that leases ready rows
    with a fresh token; the token embeds the row id, so ``ack`` /
    ``release`` / ``extend`` touch exactly that row and only while the lease
    is still this claim's. Waiting consumers poll (50 ms growing to 250 ms)
    with a cheap read before taking the write lock, and wake at once when
    this same instance enqueues, or within `watch_interval` when the
    database's WAL file changes (another process wrote: maybe an enqueue).
    """

    poll_min = 0.05
    """First pause between polls of an empty queue (seconds)."""
    poll_max = 0.25
    """Longest pause between polls (seconds)."""
    watch_interval = 0.01
    """How often a waiting consumer checks the WAL file for another process's writes.

    A ``stat`` of one file (microseconds, no thread): a worker process
    starts on a request another process stored within this, not after a
    whole poll pause.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        max_connections: int = 4,
    ) -> None:
        self.path = Path(path).absolute()
        self._db = _Database(
            self.path,
            busy_timeout=busy_timeout,
            max_connections=max_connections,
            schema=_QUEUE_SCHEMA,
        )
        self._wakeup: anyio.Event | None = None
        self._wal = f"{self.path}-wal"

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> SqliteQueue:
        """Build from ``sqlite:///path.db`` (see `parse_sqlite_url`)."""
        path, busy_timeout = parse_sqlite_url(url)
        return cls(path, busy_timeout=busy_timeout)

    def __repr__(self) -> str:
        return f"SqliteQueue({str(self.path)!r})"

    async def open(self) -> None:
        """Create the queue table if needed."""
        self._wakeup = None
        await self._db.open()

    async def close(self) -> None:
        """Close the connections (queued ids stay in the file)."""
        await self._db.close()

    async def ping(self) -> None:
        """Raise `StorageError` unless the database answers."""
        await self._db.ping()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def enqueue(self, item_ids: Sequence[str]) -> None:
        """Add ids, ready now."""
        if not item_ids:
            return

        def insert(conn: sqlite3.Connection) -> None:
            at = now()
            if type(item_ids) is ItemIds:
                # A whole request's ids: one statement makes them in SQLite
                # (half the time of binding 300,000 of them one by one).
                conn.execute(_ENQUEUE_RANGE, (item_ids.request_id, item_ids.total, at))
                return
            conn.executemany(
                "INSERT INTO queue (item_id, available_at, deliveries) VALUES (?, ?, 0)",
                ((i, at) for i in item_ids),
            )

        await self._db.write(insert)
        self._wake()

    async def _take(
        self, consumer: str, max_items: int, lease_seconds: float
    ) -> tuple[list[Claim], float | None]:
        def peek(conn: sqlite3.Connection) -> float | None:
            if conn.execute(_ANY_READY, (now(),)).fetchone() is not None:
                return None
            due = conn.execute("SELECT min(available_at) FROM queue").fetchone()[0]
            return float("inf") if due is None else float(due)

        # A plain read first (on the loop: one index probe): an empty queue
        # must not take the write lock on every poll of every idle worker.
        due = await self._db.read(peek)
        if due is not None:
            return [], None if due == float("inf") else due

        def lease(conn: sqlite3.Connection) -> list[Claim]:
            at = now()
            until = at + lease_seconds
            rows = conn.execute(
                _SELECT_READY,
                (at, max_items),
            ).fetchall()
            claims = [
                Claim(item_id=item_id, token=f"{rid}-{uuid.uuid4().hex}", deliveries=n + 1)
                for rid, item_id, n in rows
            ]
            conn.executemany(
                "UPDATE queue SET lease_token = ?, lease_until = ?, available_at = ?, "
                "consumer = ?, deliveries = ? WHERE id = ?",
                (
                    (c.token, until, until, consumer, c.deliveries, _token_row(c.token))
                    for c in claims
                ),
            )
            return claims

        return await self._db.write(lease, short=True), None

    async def claim(
        self, *, consumer: str, max_items: int, lease_seconds: float, wait: float
    ) -> list[Claim]:
        """Lease up to *max_items* ids, polling for up to *wait* seconds."""
        deadline = anyio.current_time() + wait
        pause = self.poll_min
        while True:
            # Before the look: a write landing between the look and the
            # wait still counts as news.
            wal = self._wal_state()
            claims, due = await self._take(consumer, max_items, lease_seconds)
            remaining = deadline - anyio.current_time()
            if claims or remaining <= 0:
                return claims
            sleep = min(pause, remaining)
            if due is not None:
                # Something is leased or delayed: wake when it comes due.
                sleep = max(0.001, min(sleep, due - now()))
            pause = min(pause * 1.5, self.poll_max)
            if self._wakeup is None:
                self._wakeup = anyio.Event()
            with anyio.move_on_after(sleep):
                await self._wait_for_news(self._wakeup, wal)

    def _wal_state(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._wal)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    async def _wait_for_news(
        self, wakeup: anyio.Event, before: tuple[int, int, int] | None
    ) -> None:
        """Return when this instance enqueues or the WAL file changes.

        Any write by any process changes the WAL (appended frames, or a
        reset after a checkpoint), so a change is only a hint: the caller
        polls again, which costs one read. *before* is the WAL's state
        when the caller last looked at the queue.
        """
        while True:
            with anyio.move_on_after(self.watch_interval):
                await wakeup.wait()
                return
            if self._wal_state() != before:
                return

    async def release_many(self, claims: Sequence[Claim], *, delay: float = 0.0) -> None:
        """Hand the ids these claims still hold back, ready again after *delay* seconds."""
        rows = [(rid, c.token) for c in claims if (rid := _token_row(c.token)) is not None]
        if not rows:
            return
        at = now() + delay
        await self._db.write(
            lambda conn: conn.executemany(
                "UPDATE queue SET lease_token = NULL, lease_until = NULL, consumer = NULL, "
                "available_at = ? WHERE id = ? AND lease_token = ?",
                ((at, rid, token) for rid, token in rows),
            ),
            short=True,
        )
        self._wake()

    async def ack_many(self, claims: Sequence[Claim]) -> None:
        """Delete the ids these claims still hold: one transaction."""
        rows = [(rid, c.token) for c in claims if (rid := _token_row(c.token)) is not None]
        if rows:
            await self._db.write(
                lambda conn: conn.executemany(
                    "DELETE FROM queue WHERE id = ? AND lease_token = ?", rows
                ),
                short=True,
            )

    async def extend_many(self, claims: Sequence[Claim], *, lease_seconds: float) -> None:
        """Hold the ids these claims still hold *lease_seconds* more: one transaction."""
        rows = [c for c in claims if _token_row(c.token) is not None]
        if not rows:
            return

        def extend(conn: sqlite3.Connection) -> None:
            until = now() + lease_seconds
            conn.executemany(
                "UPDATE queue SET lease_until = ?, available_at = ? "
                "WHERE id = ? AND lease_token = ?",
                ((until, until, _token_row(c.token), c.token) for c in rows),
            )

        await self._db.write(extend, short=True)

    async def depth(self) -> int:
        """Count waiting plus leased ids."""

        def count(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM queue").fetchone()[0])

        return await self._db.run(count)

"""SQLite backends (``sqlite:///path.db``): storage and queue in one file.

The embedded default: no server to run, durable, and correct with several
worker threads *and* several processes on one host sharing the file.

URLs follow SQLAlchemy's convention::

    sqlite:///csvimg.db               relative to the working directory
    sqlite:////var/lib/csvimg/db      absolute (note the fourth slash)
    sqlite:///data.db?busy_timeout=5  seconds to wait for a lock (default 30)

The same URL serves as storage and as queue (`Settings.effective_queue_url`
defaults to the storage URL), so both live in one database file.

How it stays correct under concurrency:

* WAL journal: readers never block the writer nor each other.
* Every write is one ``BEGIN IMMEDIATE`` transaction: it takes the write
  lock up front, so two writers queue on ``busy_timeout`` instead of both
  reading, then one failing to upgrade (``SQLITE_BUSY`` with no retry).
* `SqliteStorage.finish_item` reads the item, records the result, bumps the
  counters and, for the last item, moves the request and writes the outbox
  event, all in that one transaction: only one caller can see the last
  item finish, across threads and processes alike.
* ``synchronous=NORMAL``: in WAL mode a power cut may lose the last
  transactions but never corrupts the file; the queue's at-least-once
  redelivery and the stale-item sweep cover the loss.

Blocking sqlite3 calls run in worker threads (`anyio.to_thread.run_sync`),
each borrowing a connection from a small pool, except point reads and short
writes (leasing, finishing, acknowledging a batch of items), which run on
the event loop with connections that never wait for a lock: when another
process holds it, they fall back to the pool (see `_Database.write`). Nothing is kept only in
memory: a new process opening the file carries on where another stopped.
Any `sqlite3.Error` surfaces as `StorageError`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import anyio
import anyio.to_thread

from csvimg._errors import ConfigError, NotFoundError, StorageError
from csvimg.backends import Claim
from csvimg.backends.memory import finish_outcome, lease_item, settle_item
from csvimg.jobs import (
    Delivery,
    Event,
    Item,
    ItemIds,
    ItemResult,
    ItemStatus,
    ProcessOptions,
    Request,
    RequestStatus,
    Row,
    Webhook,
    check_request,
    item_rows,
    now,
)
from csvimg.plugins import BackendRegistry, hookimpl
from csvimg.settings import Settings

__all__ = ["SqliteQueue", "SqliteStorage", "parse_sqlite_url"]

T = TypeVar("T")

DEFAULT_BUSY_TIMEOUT = 30.0
"""Seconds a connection waits for another one's write lock before failing."""

_PARAMS = {"busy_timeout"}


def parse_sqlite_url(url: str) -> tuple[Path, float]:
    """Return the absolute database path and the busy timeout of a ``sqlite://`` URL.

    ``sqlite:///rel.db`` is relative to the working directory (made absolute
    now, so a later ``chdir`` changes nothing), ``sqlite:////abs.db`` is
    absolute. In-memory databases are refused: each connection would see
    its own empty database (use ``memory://`` instead).
    """
    prefix = "sqlite://"
    if not url.lower().startswith(prefix):
        raise ConfigError(f"not a sqlite URL: {url!r}")
    rest, _, query = url[len(prefix) :].partition("?")
    if not rest.startswith("/"):
        raise ConfigError(
            f"sqlite URL {url!r} has a host part; use sqlite:///relative.db "
            "or sqlite:////absolute/path.db"
        )
    raw = unquote(rest[1:])
    if not raw or raw == ":memory:" or raw.startswith("file:"):
        raise ConfigError(
            f"sqlite URL {url!r} names no database file (in-memory SQLite cannot be "
            "shared between connections: use memory:// instead)"
        )
    busy_timeout = DEFAULT_BUSY_TIMEOUT
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _PARAMS:
            raise ConfigError(
                f"unknown sqlite URL parameter {name!r} in {url!r} "
                f"(known: {', '.join(sorted(_PARAMS))})"
            )
        try:
            busy_timeout = float(value)
        except ValueError:
            raise ConfigError(f"busy_timeout must be seconds, not {value!r}") from None
        if busy_timeout < 0:
            raise ConfigError(f"busy_timeout must not be negative, not {value!r}")
    return Path(raw).absolute(), busy_timeout


def _describe(exc: sqlite3.Error, path: Path, busy_timeout: float) -> str:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return (
            f"sqlite database {path} is locked: another connection held it "
            f"longer than busy_timeout={busy_timeout:g}s ({text})"
        )
    if "full" in text:
        return f"sqlite database {path}: disk full ({text})"
    return f"sqlite database {path}: {text}"


class _Database:
    """A pool of connections to one database file, used from worker threads.

    Connections are created lazily, at most ``max_connections`` at once (the
    capacity limiter bounds the threads, hence the connections), and reused.
    Each is in autocommit mode so transactions are explicit: reads are single
    statements, writes go through `write` and its ``BEGIN IMMEDIATE``.
    """

    def __init__(
        self, path: Path, *, busy_timeout: float, max_connections: int, schema: str
    ) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.max_connections = max_connections
        self._schema = schema
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._limiter: anyio.CapacityLimiter | None = None
        self._write_lock: anyio.Lock | None = None
        self._inline: sqlite3.Connection | None = None
        self._inline_writer: sqlite3.Connection | None = None
        self._commits = 0
        self._checkpointing = False
        self._open = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,
            # Connections move between pool threads, one thread at a time.
            check_same_thread=False,
        )
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _acquire(self) -> sqlite3.Connection:
        with self._lock:
            if not self._open:
                raise StorageError(f"sqlite database {self.path} is closed")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _release(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            # Only after an error inside `write`; never hand on an open transaction.
            try:
                conn.rollback()
            except sqlite3.Error:
                conn.close()
                return
        with self._lock:
            if self._open and len(self._idle) < self.max_connections:
                self._idle.append(conn)
                return
        conn.close()

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run *fn* with a pooled connection in this (worker) thread."""
        try:
            conn = self._acquire()
        except sqlite3.Error as exc:
            raise StorageError(_describe(exc, self.path, self.busy_timeout)) from exc
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise StorageError(_describe(exc, self.path, self.busy_timeout)) from exc
        finally:
            self._release(conn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run *fn* with a pooled connection in a worker thread."""
        if self._limiter is None:
            # Created lazily: a CapacityLimiter belongs to the running event loop.
            self._limiter = anyio.CapacityLimiter(self.max_connections)
        return await anyio.to_thread.run_sync(self.call, fn, limiter=self._limiter)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a short read (*fn*: a primary-key lookup) on the calling thread.

        A thread hop costs more than such a read, and in WAL mode a reader
        does not wait for writers. The dedicated connection gives up after
        a few milliseconds when SQLite is busy anyway (WAL recovery, a
        checkpoint holding a lock), and the read then goes through the
        thread pool, so the event loop is never held for long.
        """
        conn = self._inline
        if conn is None:
            with self._lock:
                if not self._open:
                    raise StorageError(f"sqlite database {self.path} is closed")
            try:
                conn = self._connect()
                conn.execute("PRAGMA busy_timeout = 5")
            except sqlite3.Error as exc:
                raise StorageError(_describe(exc, self.path, self.busy_timeout)) from exc
            self._inline = conn
        try:
            return fn(conn)
        except sqlite3.OperationalError:
            if conn.in_transaction:  # pragma: no cover - reads open none
                conn.rollback()
            return await self.run(fn)  # busy or locked: wait in a thread instead
        except sqlite3.Error as exc:
            raise StorageError(_describe(exc, self.path, self.busy_timeout)) from exc

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, short: bool = False) -> T:
        """Run *fn* inside one ``BEGIN IMMEDIATE`` transaction.

        One write at a time per process: SQLite runs one writer anyway, and a
        writer waiting here rather than in SQLite's busy handler (which sleeps
        up to 100 ms between tries) neither wastes those sleeps nor holds a
        pool thread that a read (a status request) could use.

        A *short* write (a few rows by primary key: leasing, finishing,
        acknowledging a batch) runs on the calling thread, as `read` does:
        the thread hop costs more than the statements. Its connection never
        waits for the lock (busy timeout 0): when another process holds it,
        the write yields to the event loop and tries again a few times over
        ~15 ms, then waits in a pool thread like any other write. That
        connection does not checkpoint the WAL itself (the checkpoint's
        fsync would stall the loop): every `_CHECKPOINT_EVERY` commits a
        passive checkpoint runs in a thread of its own.
        """
        if self._write_lock is None:
            self._write_lock = anyio.Lock()  # like the limiter: one per event loop
        async with self._write_lock:
            if short:
                for pause in _INLINE_WRITE_PAUSES:
                    done, result = self._write_inline(fn)
                    if done:
                        self._committed_inline()
                        return result  # type: ignore[return-value]
                    await anyio.sleep(pause)
            return await self.run(lambda conn: _in_transaction(conn, fn))

    def _write_inline(self, fn: Callable[[sqlite3.Connection], T]) -> tuple[bool, T | None]:
        """Try *fn* in a transaction on this thread: (False, None) if the lock is taken."""
        conn = self._inline_writer
        try:
            if conn is None:
                with self._lock:
                    if not self._open:
                        raise StorageError(f"sqlite database {self.path} is closed")
                conn = self._connect()
                conn.execute("PRAGMA busy_timeout = 0")
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                self._inline_writer = conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _is_busy(exc):
                    return False, None
                raise
            result = _then_commit(conn, fn)
        except sqlite3.Error as exc:
            if conn is not None and conn.in_transaction:
                conn.rollback()
            raise StorageError(_describe(exc, self.path, self.busy_timeout)) from exc
        return True, result

    def _committed_inline(self) -> None:
        self._commits += 1
        if self._commits < _CHECKPOINT_EVERY or self._checkpointing:
            return
        self._commits = 0
        self._checkpointing = True
        threading.Thread(
            target=self._checkpoint, name=f"csvimg-checkpoint-{self.path.name}", daemon=True
        ).start()

    def _checkpoint(self) -> None:
        try:
            self.call(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())
        except StorageError:  # pragma: no cover - closed meanwhile; a later one catches up
            pass
        finally:
            self._checkpointing = False

    async def open(self) -> None:
        """Create the folder, switch to WAL and create the schema."""
        with self._lock:
            self._open = True
        # A limiter belongs to one event loop; a reopened backend may be on another.
        self._limiter = None
        self._write_lock = None

        def setup(conn: sqlite3.Connection) -> None:
            # WAL is a property of the file: set once, every later connection has it.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # pragma: no cover - exotic filesystems
                raise StorageError(
                    f"sqlite database {self.path} cannot use WAL journaling (got {mode!r})"
                )
            _in_transaction(conn, self._create_schema)

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder of {self.path}: {exc}") from exc
        try:
            await self.run(setup)
        except BaseException:
            await self.close()
            raise

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # One statement at a time: executescript() would COMMIT our
        # transaction first, and two processes opening a fresh file at once
        # must not interleave their CREATEs.
        for statement in self._schema.split(";"):
            if statement.strip():
                conn.execute(statement)

    async def close(self) -> None:
        """Close idle connections; busy ones close when handed back."""
        with self._lock:
            self._open = False
            idle, self._idle = self._idle, []
        if self._inline is not None:
            idle.append(self._inline)
            self._inline = None
        if self._inline_writer is not None:
            idle.append(self._inline_writer)
            self._inline_writer = None
        for conn in idle:
            conn.close()

    async def ping(self) -> None:
        """Raise `StorageError` unless a query answers."""
        await self.run(lambda conn: conn.execute("SELECT 1").fetchone())


_INLINE_WRITE_PAUSES = (0.0005, 0.001, 0.002, 0.004, 0.008)
"""Pauses between tries of a short write on the event loop while another process writes."""

_CHECKPOINT_EVERY = 200
"""Short writes between two passive WAL checkpoints (in a thread)."""


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)  # pragma: no cover - Python < 3.11


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    # IMMEDIATE takes the write lock now (waiting up to busy_timeout), so a
    # transaction never fails half-way trying to upgrade a read lock.
    conn.execute("BEGIN IMMEDIATE")
    return _then_commit(conn, fn)


def _then_commit(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run *fn* in the transaction just begun: commit, or roll back on any error."""
    try:
        result = fn(conn)
    except BaseException:
        conn.rollback()
        raise
    conn.execute("COMMIT")
    return result


# --------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------

_STORAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    header TEXT NOT NULL,
    url_column INTEGER NOT NULL,
    callback_url TEXT,
    options TEXT NOT NULL,
    owner TEXT,
    filename TEXT
);
CREATE INDEX IF NOT EXISTS requests_created ON requests (created_at);
CREATE INDEX IF NOT EXISTS requests_owner_created ON requests (owner, created_at);

CREATE TABLE IF NOT EXISTS rows (
    request_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    line INTEGER NOT NULL,
    cells TEXT NOT NULL,
    urls TEXT NOT NULL,
    PRIMARY KEY (request_id, idx)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    row INTEGER NOT NULL,
    position INTEGER NOT NULL,
    url TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    lease_until REAL,
    output_key TEXT,
    content_type TEXT,
    bytes_in INTEGER,
    bytes_out INTEGER,
    width INTEGER,
    height INTEGER,
    error_code TEXT,
    error_message TEXT,
    updated_at REAL NOT NULL
);
-- No index on (request_id, seq): a request's items are found by their ids,
-- item_id(request_id, seq), through the primary key (see _LIST_ITEMS);
-- one index fewer to fill for each of 300,000 new items.
DROP INDEX IF EXISTS items_request_seq;
-- Partial indexes: a new item is PENDING with no lease, so items_leased
-- gets no entry at insert time, and items_pending one short entry (an
-- append: every item of a request has the same updated_at). They replace
-- items_status_lease and items_status_updated, which indexed every item;
-- a file made by an earlier version loses those two here.
DROP INDEX IF EXISTS items_status_lease;
DROP INDEX IF EXISTS items_status_updated;
CREATE INDEX IF NOT EXISTS items_leased ON items (lease_until) WHERE status = 'PROCESSING';
CREATE INDEX IF NOT EXISTS items_pending ON items (updated_at) WHERE status = 'PENDING';

CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at REAL NOT NULL,
    owner TEXT,
    active INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_owner ON webhooks (owner, created_at);

CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    request_id TEXT NOT NULL,
    owner TEXT,
    callback_url TEXT,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at REAL,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS events_due ON events (next_attempt_at);

CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    url TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    status_code INTEGER,
    error TEXT,
    webhook_id TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_request ON deliveries (request_id, seq);
"""


_ROWS_PER_CHUNK = 5000
"""Rows `SqliteStorage.create_request` reads at a time (all in one transaction)."""

# The items of rows ?4 .. ?5 - 1 of request ?1, made by SQLite from the
# rows just stored (their urls column, a JSON array): item ?2 + k for the
# k-th URL in (idx, position) order, exactly what `item_rows` yields from
# rows whose indexes count up by one. No Python object per item: ~0.5 s
# less CPU for 300,000 items than binding them one by one.
_DERIVE_ITEMS = (
    "INSERT INTO items (id, request_id, seq, row, position, url, status, attempts, "
    "updated_at) SELECT ?1 || '.' || (?2 + row_number() OVER w - 1), ?1, "
    "?2 + row_number() OVER w - 1, r.idx, j.key, j.value, 'PENDING', 0, ?3 "
    "FROM rows AS r, json_each(r.urls) AS j "
    "WHERE r.request_id = ?1 AND r.idx >= ?4 AND r.idx < ?5 "
    "WINDOW w AS (ORDER BY r.idx, j.key)"
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


def _sql_items_available(conn: sqlite3.Connection) -> bool:
    """Whether this SQLite has what `_DERIVE_ITEMS` needs (3.25+, JSON functions)."""
    if sqlite3.sqlite_version_info < (3, 25, 0):
        return False
    try:
        conn.execute("SELECT key FROM json_each('[1]')").fetchall()
    except sqlite3.OperationalError:
        return False
    return True


def _dumps(strings: Sequence[str]) -> str:
    """``json.dumps(list(strings))``, twice as fast for a few strings (the C escaper)."""
    return "[" + ", ".join(map(encode_basestring_ascii, strings)) + "]"


_REQUEST_COLUMNS = (
    "id, status, created_at, updated_at, total, done, failed, header, url_column, "
    "callback_url, options, owner, filename"
)
_ITEM_COLUMNS = (
    "id, request_id, row, position, url, status, attempts, output_key, content_type, "
    "bytes_in, bytes_out, width, height, error_code, error_message, lease_until, updated_at"
)
_EVENT_COLUMNS = (
    "id, type, request_id, created_at, owner, callback_url, attempts, next_attempt_at"
)
# Built from the constant column lists above only; every value is a bound parameter.
_SELECT_REQUESTS = f"SELECT {_REQUEST_COLUMNS} FROM requests"  # noqa: S608
_SELECT_ITEMS = f"SELECT {_ITEM_COLUMNS} FROM items"  # noqa: S608
_SELECT_EVENTS = f"SELECT {_EVENT_COLUMNS} FROM events"  # noqa: S608
_SELECT_EXPIRED = _SELECT_ITEMS + " WHERE status = 'PROCESSING' AND lease_until < ? LIMIT ?"
_SELECT_FORGOTTEN = "SELECT id FROM items WHERE status = 'PENDING' AND updated_at < ? LIMIT ?"
# Items ?2 .. ?2 + ?3 - 1 of request ?1 (capped by its total), in seq order:
# one primary-key lookup of item_id(?1, n) per n, n counted up in SQLite.
_LIST_ITEMS = (
    "WITH RECURSIVE stop(n) AS (SELECT min(?2 + ?3, total) FROM requests WHERE id = ?1), "  # noqa: S608 - constant columns
    "seq(n) AS (SELECT ?2 FROM stop WHERE ?2 < stop.n "
    "UNION ALL SELECT seq.n + 1 FROM seq, stop WHERE seq.n + 1 < stop.n) "
    f"SELECT {_ITEM_COLUMNS} FROM seq CROSS JOIN items "
    "ON items.id = ?1 || '.' || seq.n WHERE items.request_id = ?1 ORDER BY seq.n"
)
_INSERT_REQUEST = (
    f"INSERT INTO requests ({_REQUEST_COLUMNS}) "  # noqa: S608
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


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


# --------------------------------------------------------------------------
# Queue
# --------------------------------------------------------------------------

# While leased, available_at = lease_until, so "ready" is one range scan of
# one index; lease_until is kept too so a row says plainly why it waits.
_QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    available_at REAL NOT NULL,
    lease_token TEXT,
    lease_until REAL,
    consumer TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queue_ready ON queue (available_at, id);
"""

_READY = "available_at <= ?1 AND (lease_until IS NULL OR lease_until <= ?1)"
_ANY_READY = f"SELECT 1 FROM queue WHERE {_READY} LIMIT 1"  # noqa: S608
_SELECT_READY = (
    f"SELECT id, item_id, deliveries FROM queue WHERE {_READY} "  # noqa: S608
    "ORDER BY available_at, id LIMIT ?2"
)


# The ids item_id(?1, n) for n in 0 .. ?2 - 1, ready at ?3: "n" turns into
# text as str(n) does, so each id is exactly what `ItemIds` yields.
_ENQUEUE_RANGE = (
    "WITH RECURSIVE seq(n) AS (SELECT 0 WHERE ?2 > 0 UNION ALL "
    "SELECT n + 1 FROM seq WHERE n + 1 < ?2) "
    "INSERT INTO queue (item_id, available_at, deliveries) "
    "SELECT ?1 || '.' || n, ?3, 0 FROM seq"
)


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

    async def _update(self, claim: Claim, sql: str, *params: Any) -> None:
        rid = _token_row(claim.token)
        if rid is None:
            return
        await self._db.write(
            lambda conn: conn.execute(sql, (*params, rid, claim.token)), short=True
        )

    async def ack(self, claim: Claim) -> None:
        """Delete the id, if this claim still holds it."""
        await self._update(claim, "DELETE FROM queue WHERE id = ? AND lease_token = ?")

    async def release(self, claim: Claim, *, delay: float = 0.0) -> None:
        """Hand the id back, ready again after *delay* seconds."""
        await self._update(
            claim,
            "UPDATE queue SET lease_token = NULL, lease_until = NULL, consumer = NULL, "
            "available_at = ? WHERE id = ? AND lease_token = ?",
            now() + delay,
        )
        self._wake()

    async def extend(self, claim: Claim, *, lease_seconds: float) -> None:
        """Hold the id *lease_seconds* more, if this claim still holds it."""
        await self.extend_many([claim], lease_seconds=lease_seconds)

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


@hookimpl
def csvimg_register_backends(registry: BackendRegistry) -> None:
    """Serve ``sqlite:///path.db`` for storage and queue."""
    registry.add_storage("sqlite", SqliteStorage.from_url)
    registry.add_queue("sqlite", SqliteQueue.from_url)

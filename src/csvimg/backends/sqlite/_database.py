"""The SQLite connection pool: URL parsing, transactions, busy handling, WAL checkpoints.

`_Database` is what `SqliteStorage` and `SqliteQueue` share: one file, a
small pool of connections in worker threads, and two connections used on
the event loop for point reads and short writes (see the package docstring).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, unquote

import anyio
import anyio.to_thread

from csvimg._errors import ConfigError, StorageError

__all__ = ["DEFAULT_BUSY_TIMEOUT", "parse_sqlite_url"]

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

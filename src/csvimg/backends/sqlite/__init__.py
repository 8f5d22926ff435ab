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

# The ``X as X`` imports re-export private names that tests and bench
# experiments read from here, where they lived before this module became a
# package. Patching one here does not reach the submodule that uses it.
from csvimg.backends.sqlite._database import DEFAULT_BUSY_TIMEOUT, parse_sqlite_url
from csvimg.backends.sqlite._database import _Database as _Database
from csvimg.backends.sqlite._database import _in_transaction as _in_transaction
from csvimg.backends.sqlite._rows import _dumps as _dumps
from csvimg.backends.sqlite._rows import _get_request as _get_request
from csvimg.backends.sqlite._schema import _sql_items_available as _sql_items_available
from csvimg.backends.sqlite.queue import SqliteQueue
from csvimg.backends.sqlite.storage import _ROWS_PER_CHUNK as _ROWS_PER_CHUNK
from csvimg.backends.sqlite.storage import SqliteStorage
from csvimg.hooks import BackendRegistry, hookimpl

__all__ = ["DEFAULT_BUSY_TIMEOUT", "SqliteQueue", "SqliteStorage", "parse_sqlite_url"]


@hookimpl
def csvimg_register_backends(registry: BackendRegistry) -> None:
    """Serve ``sqlite:///path.db`` for storage and queue."""
    registry.add_storage("sqlite", SqliteStorage.from_url)
    registry.add_queue("sqlite", SqliteQueue.from_url)
